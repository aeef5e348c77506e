//! Configuration: gateway.toml and the policy files turned into one validated model.

mod file;
mod owned;
mod redis_url;
mod secrets;
mod validate;

use crate::diagnostics::{self as error, Reporter};
pub use crate::diagnostics::{ConfigError, ConfigErrors, ConfigWarning};
use crate::policy::Policies;
use http::HeaderName;
pub(crate) use owned::OwnedNames;
pub use redis_url::{parse_sentinel_url, SentinelUrl};
pub use secrets::{SecretProblem, MIN_ADMIN_TOKEN_BYTES, MIN_HMAC_SECRET_BYTES, PLACEHOLDER_WORDS};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use validate::*;

/// The whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub server: Server,
    pub admin: Admin,
    pub store: StoreSettings,
    pub cache: CacheSettings,
    pub jwt: JwtSettings,
    pub forward: Forward,
    pub echo: Option<SocketAddr>,
    pub log: LogSettings,
    pub upstreams: Vec<Upstream>,
    pub routes: Vec<Route>,
    pub policies: Policies,
    /// Things that work but that an operator should know (`check` prints them).
    pub warnings: Vec<ConfigWarning>,
}

#[derive(Debug, Clone)]
pub struct Server {
    pub listen: SocketAddr,
    pub threads: usize,
    pub keepalive_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_body_bytes: usize,
    /// Largest body read to find an instance id (at most pingora's 64 KiB replay buffer).
    pub max_inspected_body_bytes: usize,
    pub grace_period: Duration,
    /// What the path normaliser lets through (`allow_encoded_slashes`).
    pub path_rules: crate::path::PathRules,
    /// Peers whose forwarding headers say who the client is.
    pub trusted_proxies: crate::client_ip::TrustedProxies,
    /// The host names requests may name (lower case; empty: any). A backend that builds links
    /// from `Host` (a password reset mail) would otherwise build them to the client's choice.
    pub hosts: Vec<Box<str>>,
    /// Bits of an IPv6 client address that per-client limits count under.
    pub ipv6_prefix: u8,
    /// Invalid API keys and tokens a client may send per minute (`auth_failures_per_minute`).
    pub auth_failures_per_minute: u32,
    /// The TLS listener, when configured.
    pub tls: Option<TlsListener>,
    /// HTTP/2 with prior knowledge on the plain listener.
    pub h2c: bool,
    /// The plain listener requires a PROXY protocol header on every connection.
    pub proxy_protocol: bool,
    /// The deadline for a whole request head (slowloris).
    pub header_timeout: Duration,
    /// The longest pause between reads of a request body (slow POST), HTTP/1.
    pub body_idle_timeout: Duration,
    /// The longest one write of a response may wait on a client that does not read (an
    /// HTTP/2 stream: for flow-control window), nginx's `send_timeout`.
    pub send_timeout: Duration,
    /// Connections open at once on the proxy listeners, in all.
    pub max_connections: usize,
    /// Connections open at once per client address (IPv6 by `ipv6_prefix`); trusted proxies
    /// are exempt.
    pub max_connections_per_client: usize,
    pub upgrade_sock: PathBuf,
    pub pid_file: PathBuf,
}

/// `[log]`: how operational lines are written, and the access log (none when `"off"`).
#[derive(Debug, Clone, PartialEq)]
pub struct LogSettings {
    pub json: bool,
    pub access: Option<crate::access_log::Settings>,
    /// Where spans go (OTLP/HTTP), and the service name they carry.
    pub otlp: Option<(String, String)>,
}

/// A listener that terminates TLS (1.2 and 1.3) with certificates chosen by SNI.
#[derive(Debug, Clone)]
pub struct TlsListener {
    pub listen: SocketAddr,
    /// Loaded and checked (chain parses, key matches); the first is the default.
    pub certs: Vec<crate::certs::ServerCert>,
    /// Every connection starts with a PROXY protocol header, read before the handshake.
    pub proxy_protocol: bool,
}

#[derive(Clone)]
pub struct Admin {
    pub listen: SocketAddr,
    /// When set, the admin listener speaks TLS only, with these certificates (the first the
    /// default; chosen by SNI like the public listener's).
    pub tls: Option<Vec<crate::certs::ServerCert>>,
    pub token_env: String,
    /// From the environment; `None` when the variable is unset or empty.
    pub token: Option<String>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("listen", &self.listen)
            .field("tls", &self.tls.as_ref().map(Vec::len))
            .field("token_env", &self.token_env)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Which store holds the state: Redis when a URL is set, the embedded data file otherwise.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub data_file: PathBuf,
    pub redis: Option<RedisSettings>,
}

/// How to reach Redis and how long to wait for it.
#[derive(Clone)]
pub struct RedisSettings {
    /// `redis://[user:pass@]host:port[/db]`, or `redis+cluster://host:port,host:port,...`.
    pub url: String,
    /// Deadline of one store call on the request path.
    pub timeout: Duration,
    /// Consecutive failures that open the circuit breaker.
    pub breaker_threshold: u32,
    /// How long the open breaker fails fast before probing again.
    pub breaker_cooldown: Duration,
    /// Start even when Redis's maxmemory-policy may evict keys.
    pub allow_eviction: bool,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &"<redacted>")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub capacity: usize,
    pub negative_capacity: usize,
    pub ttl: Duration,
}

#[derive(Clone)]
pub struct JwtSettings {
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    pub secret_env: String,
    pub secret: Option<String>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub account_claim: String,
    pub leeway: Duration,
    /// (algorithm, key id, PEM bytes)
    pub public_keys: Vec<(jsonwebtoken::Algorithm, Option<String>, Vec<u8>)>,
    pub jwks: Option<String>,
}

impl std::fmt::Debug for JwtSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSettings")
            .field("algorithms", &self.algorithms)
            .field("secret_env", &self.secret_env)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("account_claim", &self.account_claim)
            .finish_non_exhaustive()
    }
}

impl JwtSettings {
    /// True when an HMAC algorithm is allowed, so the shared secret is needed.
    pub fn allows_hmac(&self) -> bool {
        self.algorithms.iter().any(|a| {
            matches!(
                a,
                jsonwebtoken::Algorithm::HS256
                    | jsonwebtoken::Algorithm::HS384
                    | jsonwebtoken::Algorithm::HS512
            )
        })
    }
}

#[derive(Debug, Clone)]
pub struct Forward {
    pub account_id_header: HeaderName,
    pub key_id_header: HeaderName,
    pub user_id_header: HeaderName,
    pub request_id_header: HeaderName,
    /// A restricted key's scopes, comma-separated, for the backend (absent: no scope restriction).
    pub key_scopes_header: HeaderName,
    /// A restricted key's instance ids, comma-separated (absent: any instance).
    pub key_instances_header: HeaderName,
    pub strip_request_headers: Vec<HeaderName>,
    /// Removed too, by default `Forwarded` and the URL and method override headers.
    pub strip_override_headers: Vec<HeaderName>,
    /// Every header whose name starts with one of these is removed (lower case).
    pub strip_header_prefixes: Vec<HeaderName>,
}

impl Forward {
    /// Headers whose meaning the gateway owns: a client's copy, in any spelling a backend
    /// could read as the same name, never reaches the upstream.
    pub fn owned_headers(&self) -> impl Iterator<Item = &HeaderName> {
        [
            &self.account_id_header,
            &self.key_id_header,
            &self.user_id_header,
            &self.request_id_header,
            &self.key_scopes_header,
            &self.key_instances_header,
        ]
        .into_iter()
        .chain(self.strip_request_headers.iter())
        .chain(self.strip_override_headers.iter())
    }
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub addresses: Vec<SocketAddr>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub health_check: Option<HealthCheck>,
    /// TLS to the upstream, when on.
    pub tls: Option<UpstreamTls>,
    /// The `Host` forwarded requests carry instead of the client's (`upstreams.*.host`): where
    /// the addresses are a shared ingress or virtual hosts, the client does not pick the site.
    pub host: Option<http::HeaderValue>,
}

/// How the gateway speaks TLS to an upstream: the name it sends (SNI) and verifies, and the
/// CA certificates it trusts (the system's roots when none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    pub sni: String,
    pub ca: Option<Vec<rustls_pki_types::CertificateDer<'static>>>,
}

#[derive(Debug, Clone, Copy)]
pub struct HealthCheck {
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
}

/// How a route authenticates its callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    ApiKey,
    Jwt,
    Open,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub prefix: String,
    pub auth: AuthMode,
    /// Index into [`Config::upstreams`].
    pub upstream: usize,
    pub forward_api_key: bool,
}

/// Where secrets come from: the process environment, or a stand-in (tests).
pub type Env = std::sync::Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// The process environment.
pub fn process_env() -> Env {
    std::sync::Arc::new(|name: &str| std::env::var(name).ok())
}

/// Parses `150ms`, `2s`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n.checked_mul(60)?)),
        "h" => Some(Duration::from_secs(n.checked_mul(3600)?)),
        _ => None,
    }
}

impl Config {
    /// Reads and validates `path` and the policy files it names; secrets from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        Self::load_with_env(path, &|name| std::env::var(name).ok())
    }

    /// As [`Config::load`], with the environment supplied (for tests).
    pub fn load_with_env(
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let source = error::read_source(path)?;
        let raw: file::GatewayFile = error::parse_toml(path, &source)?;
        let base = path.parent().unwrap_or(Path::new("")).to_path_buf();
        let mut r = Reporter::new(path, &source);
        let env = |name: &str| env(name).filter(|v| !v.is_empty());
        let policies_dir = base.join(&raw.policies.dir);
        let policies = Policies::load(&policies_dir);

        let mut warnings = jwt_warnings(path, &source, &raw.jwt);
        let server = Server {
            listen: addr(&mut r, "server.listen", &raw.server.listen),
            threads: positive(&mut r, "server.threads", &raw.server.threads),
            keepalive_timeout: keepalive(&mut r, &raw.server.keepalive_timeout),
            max_header_bytes: positive(
                &mut r,
                "server.max_header_bytes",
                &raw.server.max_header_bytes,
            ),
            max_body_bytes: positive(&mut r, "server.max_body_bytes", &raw.server.max_body_bytes),
            max_inspected_body_bytes: inspected_limit(
                &mut r,
                &raw.server.max_inspected_body_bytes,
                *raw.server.max_body_bytes.get_ref(),
            ),
            grace_period: duration(&mut r, "server.grace_period", &raw.server.grace_period),
            path_rules: crate::path::PathRules {
                allow_encoded_slashes: raw.server.allow_encoded_slashes,
            },
            trusted_proxies: trusted_proxies(&mut r, &raw.server.trusted_proxies),
            hosts: hosts(&mut r, &raw.server.hosts),
            ipv6_prefix: ipv6_prefix(&mut r, &raw.server.ipv6_prefix),
            h2c: raw.server.h2c,
            proxy_protocol: raw.server.proxy_protocol,
            header_timeout: nonzero_duration(
                &mut r,
                "server.header_timeout",
                &raw.server.header_timeout,
            ),
            body_idle_timeout: nonzero_duration(
                &mut r,
                "server.body_idle_timeout",
                &raw.server.body_idle_timeout,
            ),
            send_timeout: nonzero_duration(&mut r, "server.send_timeout", &raw.server.send_timeout),
            max_connections: positive(
                &mut r,
                "server.max_connections",
                &raw.server.max_connections,
            ),
            max_connections_per_client: positive(
                &mut r,
                "server.max_connections_per_client",
                &raw.server.max_connections_per_client,
            ),
            tls: raw
                .server
                .tls
                .as_ref()
                .map(|t| tls_listener(&mut r, &mut warnings, t, &base)),
            auth_failures_per_minute: positive(
                &mut r,
                "server.auth_failures_per_minute",
                &raw.server.auth_failures_per_minute,
            ),
            upgrade_sock: base.join(
                raw.server
                    .upgrade_sock
                    .as_deref()
                    .unwrap_or("data/upgrade.sock"),
            ),
            pid_file: base.join(
                raw.server
                    .pid_file
                    .as_deref()
                    .unwrap_or("data/msgflash-gateway.pid"),
            ),
        };
        let admin = Admin {
            listen: addr(&mut r, "admin.listen", &raw.admin.listen),
            tls: raw.admin.tls.as_ref().map(|t| {
                certificates(
                    &mut r,
                    &mut warnings,
                    "admin.tls.certificates",
                    &t.certificates,
                    &base,
                )
            }),
            token: env(&raw.admin.token_env),
            token_env: raw.admin.token_env.clone(),
        };
        let redis_env = raw
            .store
            .redis_url_env
            .clone()
            .unwrap_or_else(|| "MSGFLASH_REDIS_URL".into());
        let store = store_settings(&mut r, &raw.store, &base, env(&redis_env));
        let cache = CacheSettings {
            capacity: positive(&mut r, "cache.capacity", &raw.cache.capacity),
            negative_capacity: positive(
                &mut r,
                "cache.negative_capacity",
                &raw.cache.negative_capacity,
            ),
            ttl: duration(&mut r, "cache.ttl", &raw.cache.ttl),
        };
        let jwt = jwt_settings(&mut r, &raw.jwt, &base, &env);
        let forward = Forward {
            account_id_header: header(
                &mut r,
                "forward.account_id_header",
                &raw.forward.account_id_header,
            ),
            key_id_header: header(&mut r, "forward.key_id_header", &raw.forward.key_id_header),
            user_id_header: header(
                &mut r,
                "forward.user_id_header",
                &raw.forward.user_id_header,
            ),
            request_id_header: header(
                &mut r,
                "forward.request_id_header",
                &raw.forward.request_id_header,
            ),
            key_scopes_header: header(
                &mut r,
                "forward.key_scopes_header",
                &raw.forward.key_scopes_header,
            ),
            key_instances_header: header(
                &mut r,
                "forward.key_instances_header",
                &raw.forward.key_instances_header,
            ),
            strip_request_headers: raw
                .forward
                .strip_request_headers
                .iter()
                .map(|h| header(&mut r, "forward.strip_request_headers", h))
                .collect(),
            strip_override_headers: raw
                .forward
                .strip_override_headers
                .iter()
                .map(|h| header(&mut r, "forward.strip_override_headers", h))
                .collect(),
            strip_header_prefixes: raw
                .forward
                .strip_header_prefixes
                .iter()
                .map(|h| header(&mut r, "forward.strip_header_prefixes", h))
                .collect(),
        };
        validate::forwarded_names_distinct(&mut r, &raw.forward);
        validate::strips_spare_needed(&mut r, &raw.forward);
        let echo = raw
            .echo
            .as_ref()
            .map(|e| addr(&mut r, "echo.listen", &e.listen));
        let upstreams: Vec<Upstream> = raw
            .upstreams
            .iter()
            .map(|(name, u)| upstream(&mut r, name, u, &base))
            .collect();
        let mut listeners = vec![
            ("server.listen", raw.server.listen.span(), server.listen),
            ("admin.listen", raw.admin.listen.span(), admin.listen),
        ];
        if let (Some(t), Some(raw_tls)) = (&server.tls, &raw.server.tls) {
            listeners.push(("server.tls.listen", raw_tls.listen.span(), t.listen));
        }
        if let (Some(e), Some(raw_echo)) = (echo, &raw.echo) {
            listeners.push(("echo.listen", raw_echo.listen.span(), e));
        }
        listeners_apart(&mut r, &listeners);
        let routes = routes(&mut r, &raw.routes, &upstreams);
        let log = log_settings(&mut r, &raw.log, &base);

        let mut errors = r.errors;
        let policies = match policies {
            Ok(p) => p,
            Err(ConfigErrors(mut e)) => {
                errors.append(&mut e);
                Policies::default()
            }
        };
        warnings.extend(validate::policies_beside_keys(
            &policies_dir.join("routes.toml"),
            &policies,
            &routes,
        ));
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        Ok(Config {
            path: path.to_path_buf(),
            server,
            admin,
            store,
            cache,
            jwt,
            forward,
            echo,
            log,
            upstreams,
            routes,
            policies,
            warnings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("150ms"), Some(Duration::from_millis(150)));
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("1d"), None);
    }
}
