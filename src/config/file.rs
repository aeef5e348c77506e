//! The shape of gateway.toml as written: serde structs, unknown fields refused.

use serde::Deserialize;
use std::collections::BTreeMap;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct GatewayFile {
    pub server: ServerFile,
    #[serde(default)]
    pub admin: AdminFile,
    #[serde(default)]
    pub store: StoreFile,
    #[serde(default)]
    pub cache: CacheFile,
    #[serde(default)]
    pub policies: PoliciesFile,
    #[serde(default)]
    pub jwt: JwtFile,
    #[serde(default)]
    pub forward: ForwardFile,
    pub echo: Option<EchoFile>,
    #[serde(default)]
    pub log: LogFile,
    pub upstreams: BTreeMap<String, UpstreamFile>,
    pub routes: Vec<RouteFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServerFile {
    pub listen: Spanned<String>,
    #[serde(default = "default_threads")]
    pub threads: Spanned<usize>,
    #[serde(default = "default_keepalive")]
    pub keepalive_timeout: Spanned<String>,
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: Spanned<usize>,
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: Spanned<usize>,
    #[serde(default = "default_max_inspected_body_bytes")]
    pub max_inspected_body_bytes: Spanned<usize>,
    #[serde(default = "default_grace_period")]
    pub grace_period: Spanned<String>,
    /// Keep `%2F` / `%5C` in paths instead of refusing them (400) — off by default.
    #[serde(default)]
    pub allow_encoded_slashes: bool,
    /// Peers (CIDRs) whose X-Forwarded-For / X-Forwarded-Proto are believed.
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
    /// The host names the gateway answers to (empty: any).
    #[serde(default)]
    pub hosts: Vec<Spanned<String>>,
    /// Invalid API keys and tokens one client may send per minute before unknown credentials
    /// get 429.
    #[serde(default = "default_auth_failures")]
    pub auth_failures_per_minute: Spanned<u32>,
    /// Prefix length an IPv6 client is limited by.
    #[serde(default = "default_ipv6_prefix")]
    pub ipv6_prefix: Spanned<u8>,
    /// Where a new process started with `run --upgrade` receives the listening sockets.
    pub upgrade_sock: Option<String>,
    pub pid_file: Option<String>,
    /// A TLS listener beside the plain one.
    pub tls: Option<TlsFile>,
    /// How long a client may take to send a whole request head.
    #[serde(default = "default_header_timeout")]
    pub header_timeout: Spanned<String>,
    /// How long a request body may pause between reads.
    #[serde(default = "default_body_idle_timeout")]
    pub body_idle_timeout: Spanned<String>,
    /// How long one write of a response to the client may wait for the client to read.
    #[serde(default = "default_send_timeout")]
    pub send_timeout: Spanned<String>,
    /// Connections open at once on the proxy listeners, in all and per client address.
    #[serde(default = "default_max_connections")]
    pub max_connections: Spanned<usize>,
    #[serde(default = "default_max_connections_per_client")]
    pub max_connections_per_client: Spanned<usize>,
    /// Serve HTTP/2 with prior knowledge (h2c) on the plain listener too.
    #[serde(default)]
    pub h2c: bool,
    /// Every connection to the plain listener starts with a PROXY protocol header (v1 or v2).
    #[serde(default)]
    pub proxy_protocol: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TlsFile {
    pub listen: Spanned<String>,
    pub certificates: Spanned<Vec<CertFile>>,
    /// Every connection starts with a PROXY protocol header, before the TLS handshake.
    #[serde(default)]
    pub proxy_protocol: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CertFile {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AdminFile {
    /// SPEC §7: `127.0.0.1:9090` unless said otherwise.
    #[serde(default = "default_admin_listen")]
    pub listen: Spanned<String>,
    #[serde(default = "default_admin_token_env")]
    pub token_env: String,
    /// TLS on the admin listener (it then speaks nothing else).
    pub tls: Option<AdminTlsFile>,
}

impl Default for AdminFile {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            token_env: default_admin_token_env(),
            tls: None,
        }
    }
}

fn default_admin_listen() -> Spanned<String> {
    spanned("127.0.0.1:9090".into())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AdminTlsFile {
    pub certificates: Spanned<Vec<CertFile>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StoreFile {
    pub data_file: Option<String>,
    pub redis_url: Option<Spanned<String>>,
    pub redis_url_env: Option<String>,
    pub timeout: Option<Spanned<String>>,
    pub breaker_threshold: Option<Spanned<u32>>,
    pub breaker_cooldown: Option<Spanned<String>>,
    /// Start even when Redis's maxmemory-policy evicts keys (quotas or keys may be lost).
    #[serde(default)]
    pub allow_eviction: bool,
}

impl StoreFile {
    pub(super) fn redis_url(&self) -> Option<&Spanned<String>> {
        self.redis_url.as_ref()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CacheFile {
    #[serde(default = "default_cache_capacity")]
    pub capacity: Spanned<usize>,
    #[serde(default = "default_cache_capacity")]
    pub negative_capacity: Spanned<usize>,
    #[serde(default = "default_cache_ttl")]
    pub ttl: Spanned<String>,
}

impl Default for CacheFile {
    fn default() -> Self {
        Self {
            capacity: default_cache_capacity(),
            negative_capacity: default_cache_capacity(),
            ttl: default_cache_ttl(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PoliciesFile {
    #[serde(default = "default_policies_dir")]
    pub dir: String,
}

impl Default for PoliciesFile {
    fn default() -> Self {
        Self {
            dir: default_policies_dir(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct JwtFile {
    /// Spanned whole too: an empty list has no element to point at.
    #[serde(default = "default_algorithms")]
    pub algorithms: Spanned<Vec<Spanned<String>>>,
    #[serde(default = "default_jwt_secret_env")]
    pub secret_env: String,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    #[serde(default = "default_account_claim")]
    pub account_claim: String,
    #[serde(default = "default_leeway")]
    pub leeway: Spanned<String>,
    #[serde(default)]
    pub public_keys: Vec<PublicKeyFile>,
    pub jwks_file: Option<Spanned<String>>,
}

impl Default for JwtFile {
    fn default() -> Self {
        Self {
            algorithms: default_algorithms(),
            secret_env: default_jwt_secret_env(),
            issuer: None,
            audience: None,
            account_claim: default_account_claim(),
            leeway: default_leeway(),
            public_keys: Vec::new(),
            jwks_file: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PublicKeyFile {
    pub alg: Spanned<String>,
    pub kid: Option<String>,
    pub pem_file: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ForwardFile {
    #[serde(default = "d_account_header")]
    pub account_id_header: Spanned<String>,
    #[serde(default = "d_key_header")]
    pub key_id_header: Spanned<String>,
    #[serde(default = "d_user_header")]
    pub user_id_header: Spanned<String>,
    #[serde(default = "d_request_id_header")]
    pub request_id_header: Spanned<String>,
    #[serde(default = "d_key_scopes_header")]
    pub key_scopes_header: Spanned<String>,
    #[serde(default = "d_key_instances_header")]
    pub key_instances_header: Spanned<String>,
    #[serde(default)]
    pub strip_request_headers: Vec<Spanned<String>>,
    /// Headers some backends take as the request's URL, method or client chain.
    #[serde(default = "d_override_headers")]
    pub strip_override_headers: Vec<Spanned<String>>,
    /// Header name prefixes whose every header is removed (trace baggage one entry per header).
    #[serde(default = "d_strip_prefixes")]
    pub strip_header_prefixes: Vec<Spanned<String>>,
}

impl Default for ForwardFile {
    fn default() -> Self {
        Self {
            account_id_header: d_account_header(),
            key_id_header: d_key_header(),
            user_id_header: d_user_header(),
            request_id_header: d_request_id_header(),
            key_scopes_header: d_key_scopes_header(),
            key_instances_header: d_key_instances_header(),
            strip_request_headers: Vec::new(),
            strip_override_headers: d_override_headers(),
            strip_header_prefixes: d_strip_prefixes(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EchoFile {
    pub listen: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UpstreamFile {
    pub addresses: Spanned<Vec<Spanned<String>>>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Spanned<String>,
    #[serde(default = "default_read_timeout")]
    pub read_timeout: Spanned<String>,
    pub health_check: Option<HealthCheckFile>,
    /// Speak TLS to these addresses, verifying the certificate for `sni`.
    pub tls: Option<Spanned<bool>>,
    pub sni: Option<Spanned<String>>,
    /// CA certificates (PEM) to verify against instead of the system's roots.
    pub ca_file: Option<Spanned<String>>,
    /// The `Host` requests to these addresses carry, in place of the client's.
    pub host: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HealthCheckFile {
    #[serde(default = "default_hc_interval")]
    pub interval: Spanned<String>,
    #[serde(default = "default_hc_timeout")]
    pub timeout: Spanned<String>,
    #[serde(default = "one")]
    pub unhealthy_threshold: Spanned<u32>,
    #[serde(default = "one")]
    pub healthy_threshold: Spanned<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RouteFile {
    pub prefix: Spanned<String>,
    pub auth: Spanned<String>,
    pub upstream: Spanned<String>,
    #[serde(default)]
    pub forward_api_key: bool,
}

fn spanned<T>(v: T) -> Spanned<T> {
    Spanned::new(0..0, v)
}
fn default_threads() -> Spanned<usize> {
    spanned(2)
}
fn default_keepalive() -> Spanned<String> {
    spanned("60s".into())
}
fn default_max_header_bytes() -> Spanned<usize> {
    spanned(16 * 1024)
}
fn default_max_body_bytes() -> Spanned<usize> {
    spanned(1024 * 1024)
}
fn default_max_inspected_body_bytes() -> Spanned<usize> {
    spanned(64 * 1024)
}
fn default_grace_period() -> Spanned<String> {
    spanned("5s".into())
}
fn default_body_idle_timeout() -> Spanned<String> {
    spanned("10s".into())
}
fn default_send_timeout() -> Spanned<String> {
    spanned("60s".into())
}
fn default_max_connections() -> Spanned<usize> {
    spanned(10_000)
}
fn default_max_connections_per_client() -> Spanned<usize> {
    spanned(1_000)
}
fn default_header_timeout() -> Spanned<String> {
    spanned("10s".into())
}
fn default_auth_failures() -> Spanned<u32> {
    spanned(600)
}
fn default_ipv6_prefix() -> Spanned<u8> {
    spanned(64)
}
fn default_admin_token_env() -> String {
    "MSGFLASH_ADMIN_TOKEN".into()
}
fn default_cache_capacity() -> Spanned<usize> {
    spanned(100_000)
}
fn default_cache_ttl() -> Spanned<String> {
    spanned("30s".into())
}
fn default_policies_dir() -> String {
    "lua-free-policies".into()
}
fn default_algorithms() -> Spanned<Vec<Spanned<String>>> {
    spanned(vec![spanned("HS256".into())])
}
fn default_jwt_secret_env() -> String {
    "MSGFLASH_JWT_SECRET".into()
}
fn default_account_claim() -> String {
    "account_id".into()
}
fn default_leeway() -> Spanned<String> {
    spanned("0s".into())
}
fn d_account_header() -> Spanned<String> {
    spanned("x-account-id".into())
}
fn d_key_header() -> Spanned<String> {
    spanned("x-api-key-id".into())
}
fn d_user_header() -> Spanned<String> {
    spanned("x-user-id".into())
}
fn d_request_id_header() -> Spanned<String> {
    spanned("x-request-id".into())
}
fn d_key_scopes_header() -> Spanned<String> {
    spanned("x-api-key-scopes".into())
}
fn d_key_instances_header() -> Spanned<String> {
    spanned("x-api-key-instance-ids".into())
}
/// Baggage carried one entry per header, under a prefix: Jaeger's `uberctx-{key}`, the
/// OpenTracing propagator's `ot-baggage-{key}` (OpenTelemetry's `ot` propagator reads it into
/// the request's baggage, as it reads W3C `baggage`) and Spring Cloud Sleuth 2's
/// `baggage-{key}`.
pub(super) const STRIP_PREFIXES: [&str; 3] = ["uberctx-", "ot-baggage-", "baggage-"];
fn d_strip_prefixes() -> Vec<Spanned<String>> {
    STRIP_PREFIXES
        .iter()
        .map(|p| spanned((*p).into()))
        .collect()
}
/// `Forwarded` and the other client-address, scheme and host headers (the gateway writes its
/// own `X-Forwarded-For` / `-Proto` only; Rails, Rack, CDN-aware code, WebLogic's and Jetty's
/// proxy support and the usual PHP client-address snippets read these), the URL
/// overrides of IIS, Symfony and Zend, the method overrides of Rails, Express, Spring and
/// ASP.NET, and the user other authenticating proxies vouch for (oauth2-proxy, Apache's
/// `REMOTE_USER`, SiteMinder, Kong, Azure App Service, Google IAP, AWS ALB, Cloudflare Access),
/// which a backend configured to trust one of them would take as the caller; the client
/// certificate a TLS-terminating proxy vouches for (Envoy's XFCC, Tomcat's `SSLValve`, nginx,
/// IIS ARR, Traefik, AWS ALB and Cloudflare mTLS: the gateway verifies none, and a certificate is public), and
/// W3C `baggage` and Jaeger's `jaeger-baggage` (OpenTelemetry and Jaeger SDKs load them as the
/// request's context: an `account.id` there would sit beside the gateway's `x-account-id`).
pub(super) const OVERRIDE_HEADERS: [&str; 91] = [
    "forwarded",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "client-ip",
    "x-cluster-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-ssl",
    "x-forwarded-scheme",
    "front-end-https",
    "x-url-scheme",
    "x-original-url",
    "x-rewrite-url",
    "x-original-host",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-preferred-username",
    "x-forwarded-groups",
    "x-forwarded-access-token",
    "x-auth-request-user",
    "x-auth-request-email",
    "x-auth-request-preferred-username",
    "x-auth-request-groups",
    "x-auth-request-access-token",
    "remote-user",
    "x-remote-user",
    "sm-user",
    "x-consumer-id",
    "x-consumer-username",
    "x-consumer-custom-id",
    "x-credential-identifier",
    "x-authenticated-userid",
    "x-userinfo",
    "x-ms-client-principal",
    "x-ms-client-principal-id",
    "x-ms-client-principal-name",
    "x-goog-authenticated-user-email",
    "x-goog-authenticated-user-id",
    "x-amzn-oidc-identity",
    "x-amzn-oidc-data",
    "x-amzn-oidc-accesstoken",
    "cf-access-authenticated-user-email",
    "cf-access-jwt-assertion",
    "x-original-forwarded-for",
    "x-forwarded",
    "forwarded-for",
    "proxy-client-ip",
    "wl-proxy-client-ip",
    "wl-proxy-ssl",
    "wl-proxy-client-cert",
    "x-proxied-https",
    "proxy-ssl-id",
    "proxy-auth-cert",
    "x-forwarded-server",
    "x-forwarded-uri",
    "x-forwarded-method",
    "x-original-uri",
    "x-original-method",
    "fly-client-ip",
    "x-appengine-remote-addr",
    "x-azure-clientip",
    "x-envoy-external-address",
    "x-forwarded-client-cert",
    "x-client-cert",
    "x-ssl-client-cert",
    "ssl-client-cert",
    "ssl-client-escaped-cert",
    "ssl-client-verify",
    "ssl-client-subject-dn",
    "ssl-client-issuer-dn",
    "x-arr-clientcert",
    "x-forwarded-tls-client-cert",
    "x-forwarded-tls-client-cert-info",
    "x-amzn-mtls-clientcert",
    "x-amzn-mtls-clientcert-leaf",
    "x-ssl-client-verify",
    "x-ssl-client-dn",
    "x-ssl-client-s-dn",
    "x-ssl-cert",
    "cf-client-cert-der-base64",
    "cf-client-cert-sha256",
    "baggage",
    "correlation-context",
    "jaeger-baggage",
];
fn d_override_headers() -> Vec<Spanned<String>> {
    OVERRIDE_HEADERS
        .iter()
        .map(|h| spanned(h.to_string()))
        .collect()
}
fn default_connect_timeout() -> Spanned<String> {
    spanned("2s".into())
}
fn default_read_timeout() -> Spanned<String> {
    spanned("30s".into())
}
fn default_hc_interval() -> Spanned<String> {
    spanned("5s".into())
}
fn default_hc_timeout() -> Spanned<String> {
    spanned("1s".into())
}
fn one() -> Spanned<u32> {
    spanned(1)
}

/// `[log]`: operational log format and the access log.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LogFile {
    #[serde(default = "default_log_format")]
    pub format: Spanned<String>,
    #[serde(default = "default_access_log")]
    pub access_log: Spanned<String>,
    #[serde(default = "default_access_log_sample")]
    pub access_log_sample: Spanned<f64>,
    #[serde(default)]
    pub access_log_fields: Vec<Spanned<String>>,
    #[serde(default = "default_access_log_buffer")]
    pub access_log_buffer: Spanned<usize>,
    /// OTLP/HTTP traces endpoint (cargo feature `otlp`).
    pub otlp_endpoint: Option<Spanned<String>>,
    #[serde(default = "default_service_name")]
    pub service_name: String,
}

impl Default for LogFile {
    fn default() -> Self {
        Self {
            format: default_log_format(),
            access_log: default_access_log(),
            access_log_sample: default_access_log_sample(),
            access_log_fields: Vec::new(),
            access_log_buffer: default_access_log_buffer(),
            otlp_endpoint: None,
            service_name: default_service_name(),
        }
    }
}

fn default_service_name() -> String {
    "msgflash-gateway".into()
}

fn default_log_format() -> Spanned<String> {
    Spanned::new(0..0, "text".into())
}

fn default_access_log() -> Spanned<String> {
    Spanned::new(0..0, "stdout".into())
}

fn default_access_log_sample() -> Spanned<f64> {
    Spanned::new(0..0, 1.0)
}

fn default_access_log_buffer() -> Spanned<usize> {
    // Lines are at most a few KiB (client-written values are cut): tens of MiB at worst.
    Spanned::new(0..0, 8192)
}
