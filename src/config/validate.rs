//! Turning the file's raw values into the validated model, one located error per problem.

use super::file;
use super::*;
use crate::diagnostics::{line_col, Reporter};
use http::HeaderName;
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;
use toml::Spanned;

pub(super) fn inspected_limit(r: &mut Reporter, v: &Spanned<usize>, max_body: usize) -> usize {
    let n = positive(r, "server.max_inspected_body_bytes", v);
    if n > 64 * 1024 {
        r.at(
            v.span(),
            "server.max_inspected_body_bytes",
            format!("at most 65536 (the body is replayed from pingora's 64 KiB buffer), got {n}"),
        );
    } else if n > max_body {
        // A body read and passed would be cut on its way out by the forwarded-body bound.
        r.at(
            v.span(),
            "server.max_inspected_body_bytes",
            format!("at most server.max_body_bytes ({max_body}), got {n}"),
        );
    }
    n
}

/// The idle keep-alive bound: whole seconds, at least one (pingora reads 0 s as "forever" and
/// would truncate anything shorter to it).
pub(super) fn keepalive(r: &mut Reporter, v: &Spanned<String>) -> Duration {
    let d = duration(r, "server.keepalive_timeout", v);
    if parse_duration(v.get_ref()).is_some_and(|p| p < Duration::from_secs(1)) {
        r.at(
            v.span(),
            "server.keepalive_timeout",
            format!(
                "at least 1s (pingora takes whole seconds and reads 0 as \"never close\"), got \"{}\"",
                v.get_ref()
            ),
        );
    }
    d
}

/// A duration that must not be zero (a zero timeout would cut every connection at once).
pub(super) fn nonzero_duration(r: &mut Reporter, field: &str, v: &Spanned<String>) -> Duration {
    let d = duration(r, field, v);
    if parse_duration(v.get_ref()).is_some_and(|p| p.is_zero()) {
        r.at(
            v.span(),
            field,
            format!("must be more than 0, got \"{}\"", v.get_ref()),
        );
    }
    d
}

/// Days before expiry from which `check` (and start-up) warn about a certificate.
const EXPIRY_WARNING_DAYS: i64 = 14;

pub(super) fn tls_listener(
    r: &mut Reporter,
    warnings: &mut Vec<ConfigWarning>,
    raw: &file::TlsFile,
    base: &Path,
) -> TlsListener {
    let listen = addr(r, "server.tls.listen", &raw.listen);
    let certs = certificates(
        r,
        warnings,
        "server.tls.certificates",
        &raw.certificates,
        base,
    );
    TlsListener {
        listen,
        certs,
        proxy_protocol: raw.proxy_protocol,
    }
}

/// Certificate pairs of a TLS listener, loaded and checked; expiring ones warned about.
pub(super) fn certificates(
    r: &mut Reporter,
    warnings: &mut Vec<ConfigWarning>,
    field: &str,
    raw: &Spanned<Vec<file::CertFile>>,
    base: &Path,
) -> Vec<crate::certs::ServerCert> {
    if raw.get_ref().is_empty() {
        r.at(
            raw.span(),
            field,
            "needs at least one { cert = \"chain.pem\", key = \"key.pem\" }",
        );
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    raw.get_ref()
        .iter()
        .filter_map(|c| {
            let loaded = crate::certs::ServerCert::load(
                &base.join(c.cert.get_ref()),
                &base.join(c.key.get_ref()),
            );
            match loaded {
                Ok(cert) => {
                    let days_left = (cert.not_after - now).div_euclid(86_400);
                    if days_left < EXPIRY_WARNING_DAYS {
                        let (line, column) = line_col(r.source, c.cert.span().start);
                        warnings.push(ConfigWarning {
                            file: r.file.to_path_buf(),
                            line,
                            column,
                            message: if cert.not_after <= now {
                                format!("{} has expired", c.cert.get_ref())
                            } else {
                                format!("{} expires in {days_left} days", c.cert.get_ref())
                            },
                        });
                    }
                    Some(cert)
                }
                Err(e) => {
                    r.at(c.cert.span(), field, e.to_string());
                    None
                }
            }
        })
        .collect()
}

pub(super) fn trusted_proxies(
    r: &mut Reporter,
    raw: &[Spanned<String>],
) -> crate::client_ip::TrustedProxies {
    crate::client_ip::TrustedProxies(
        raw.iter()
            .filter_map(|c| {
                let parsed: Result<crate::client_ip::Cidr, _> = c.get_ref().parse();
                let why = match parsed {
                    // Every client would name its own address: no per-client limit would hold.
                    Ok(cidr) if cidr.prefix_len() == 0 => "trusts every address, so any client \
                        could name its own (list the front proxies' networks)"
                        .to_owned(),
                    Ok(cidr) => return Some(cidr),
                    Err(e) => e.to_string(),
                };
                r.at(
                    c.span(),
                    "server.trusted_proxies",
                    format!("\"{}\": {why}", c.get_ref()),
                );
                None
            })
            .collect(),
    )
}

/// The listeners (`field`, where, address) must not overlap: two on one port (or one on all
/// addresses and another on one of them) would leave the second unable to bind at start.
pub(super) fn listeners_apart(
    r: &mut Reporter,
    listeners: &[(&str, std::ops::Range<usize>, SocketAddr)],
) {
    for (i, (field, span, a)) in listeners.iter().enumerate() {
        let clash = listeners[..i].iter().find(|(_, _, b)| {
            a.port() != 0
                && a.port() == b.port()
                && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
        });
        if let Some((other, _, _)) = clash {
            r.at(
                span.clone(),
                *field,
                format!("{a} overlaps {other}: each listener needs its own address"),
            );
        }
    }
}

/// `server.hosts`: host names (or addresses) without a port, kept in lower case.
pub(super) fn hosts(r: &mut Reporter, raw: &[Spanned<String>]) -> Vec<Box<str>> {
    raw.iter()
        .filter_map(|h| {
            let text = h.get_ref();
            let plain = text
                .parse::<http::uri::Authority>()
                .ok()
                .filter(|a| a.port().is_none() && !text.contains('@') && a.host() == text);
            if plain.is_none() || text.is_empty() {
                r.at(
                    h.span(),
                    "server.hosts",
                    format!(
                        "\"{text}\" is not a host name (use e.g. \"api.example.com\", no port)"
                    ),
                );
                return None;
            }
            Some(text.to_ascii_lowercase().into_boxed_str())
        })
        .collect()
}

pub(super) fn ipv6_prefix(r: &mut Reporter, v: &Spanned<u8>) -> u8 {
    let n = *v.get_ref();
    if !(1..=128).contains(&n) {
        r.at(
            v.span(),
            "server.ipv6_prefix",
            format!("must be between 1 and 128, got {n}"),
        );
    }
    n
}

pub(super) fn store_settings(
    r: &mut Reporter,
    raw: &file::StoreFile,
    base: &Path,
    url_from_env: Option<String>,
) -> StoreSettings {
    let timeout = raw.timeout.as_ref().map_or(Duration::from_millis(50), |t| {
        nonzero_duration(r, "store.timeout", t)
    });
    let breaker_cooldown = raw
        .breaker_cooldown
        .as_ref()
        .map_or(Duration::from_millis(500), |t| {
            duration(r, "store.breaker_cooldown", t)
        });
    let breaker_threshold = raw
        .breaker_threshold
        .as_ref()
        .map_or(3, |t| positive(r, "store.breaker_threshold", t));
    let url = url_from_env.or_else(|| {
        let url = raw.redis_url()?;
        let ok = ["redis://", "redis+cluster://"]
            .iter()
            .any(|p| url.get_ref().starts_with(p));
        match super::parse_sentinel_url(url.get_ref()) {
            Some(Err(why)) => r.at(url.span(), "store.redis_url", why),
            Some(Ok(_)) => {}
            None if !ok => r.at(
                url.span(),
                "store.redis_url",
                "expected redis://host:port, redis+cluster://host:port,host:port or \
                 redis+sentinel://host:port,host:port/master",
            ),
            None => {}
        }
        Some(url.get_ref().clone())
    });
    StoreSettings {
        data_file: base.join(
            raw.data_file
                .clone()
                .unwrap_or_else(|| "data/store.jsonl".into()),
        ),
        redis: url.map(|url| RedisSettings {
            url,
            timeout,
            breaker_threshold,
            breaker_cooldown,
            allow_eviction: raw.allow_eviction,
        }),
    }
}

pub(super) fn addr(r: &mut Reporter, field: &str, v: &Spanned<String>) -> SocketAddr {
    SocketAddr::from_str(v.get_ref()).unwrap_or_else(|_| {
        r.at(
            v.span(),
            field,
            format!("\"{}\" is not an IP:port address", v.get_ref()),
        );
        SocketAddr::from(([127, 0, 0, 1], 0))
    })
}

/// An upstream address: `IP:port`, or `host:port` resolved once, when the configuration loads.
pub(super) fn resolved(r: &mut Reporter, field: &str, v: &Spanned<String>) -> SocketAddr {
    use std::net::ToSocketAddrs;
    if let Ok(a) = SocketAddr::from_str(v.get_ref()) {
        return a;
    }
    match v.get_ref().to_socket_addrs().map(|mut it| it.next()) {
        Ok(Some(a)) => a,
        _ => {
            r.at(
                v.span(),
                field,
                format!(
                    "\"{}\" is neither IP:port nor a resolvable host:port",
                    v.get_ref()
                ),
            );
            SocketAddr::from(([127, 0, 0, 1], 0))
        }
    }
}

/// A `Host` value: a host name or address, with an optional port, nothing else.
fn host_value(r: &mut Reporter, field: &str, v: &Spanned<String>) -> Option<http::HeaderValue> {
    let text = v.get_ref();
    let authority = text.parse::<http::uri::Authority>().ok();
    match authority.filter(|a| !text.contains('@') && !a.host().is_empty()) {
        Some(_) => http::HeaderValue::from_str(text).ok(),
        None => {
            r.at(
                v.span(),
                field,
                format!(
                    "\"{text}\" is not a host (use e.g. \"api.internal\" or \"api.internal:8080\")"
                ),
            );
            None
        }
    }
}

/// The longest duration any setting takes: a day. Nothing the gateway times needs more, and a
/// deadline far enough out would overflow the clock it is added to.
const LONGEST: Duration = Duration::from_secs(24 * 3600);

pub(super) fn duration(r: &mut Reporter, field: &str, v: &Spanned<String>) -> Duration {
    match parse_duration(v.get_ref()) {
        Some(d) if d <= LONGEST => d,
        Some(_) => {
            r.at(
                v.span(),
                field,
                format!("must be at most 24h, got \"{}\"", v.get_ref()),
            );
            Duration::ZERO
        }
        None => {
            r.at(
                v.span(),
                field,
                format!(
                    "\"{}\" is not a duration (use e.g. \"250ms\", \"5s\", \"1m\")",
                    v.get_ref()
                ),
            );
            Duration::ZERO
        }
    }
}

pub(super) fn positive<T: Copy + Default + PartialOrd + std::fmt::Display>(
    r: &mut Reporter,
    field: &str,
    v: &Spanned<T>,
) -> T {
    if *v.get_ref() <= T::default() {
        r.at(
            v.span(),
            field,
            format!("must be at least 1, got {}", v.get_ref()),
        );
    }
    *v.get_ref()
}

pub(super) fn header(r: &mut Reporter, field: &str, v: &Spanned<String>) -> HeaderName {
    HeaderName::from_str(&v.get_ref().to_ascii_lowercase()).unwrap_or_else(|_| {
        r.at(
            v.span(),
            field,
            format!("\"{}\" is not a valid header name", v.get_ref()),
        );
        HeaderName::from_static("x-invalid")
    })
}

/// Headers a forwarded request cannot be framed, routed or checked right without, or that the
/// gateway reads while it forwards: no strip list or prefix may take them away (a
/// `strip_header_prefixes = ["content-"]` would send a body without its length).
const NEEDED: [&str; 13] = [
    "content-length",
    "content-type",
    "content-encoding",
    "transfer-encoding",
    "te",
    "trailer",
    "host",
    "expect",
    "x-api-key",
    "x-forwarded-for",
    "x-forwarded-proto",
    "traceparent",
    "tracestate",
];

/// A routes.toml entry that names a scope, an instance source or a required subscription for
/// paths that no `api_key` route serves: nothing there is checked against a key (console
/// tokens and open routes carry none), and the operator who wrote it should know.
pub(super) fn policies_beside_keys(
    file: &Path,
    policies: &crate::policy::Policies,
    routes: &[Route],
) -> Vec<crate::diagnostics::ConfigWarning> {
    let route_of = |path: &str| {
        routes
            .iter()
            .filter(|r| crate::path::prefix_matches(&r.prefix, path))
            .max_by_key(|r| r.prefix.len())
    };
    policies
        .routes
        .iter()
        .filter(|p| p.binds_keys())
        // Enforced wherever an api_key route lies under it (`/api/` covers `/api/v1/`).
        .filter(|p| {
            !routes.iter().any(|r| {
                r.auth == AuthMode::ApiKey && crate::path::prefix_matches(&p.prefix, &r.prefix)
            })
        })
        .filter_map(|p| {
            let auth = route_of(&p.prefix)?.auth;
            let served_by = match auth {
                AuthMode::ApiKey => return None,
                AuthMode::Jwt => "a jwt route",
                AuthMode::Open => "an open route",
            };
            let (index, line, column) = p.declared;
            Some(crate::diagnostics::ConfigWarning {
                file: file.to_path_buf(),
                line,
                column,
                message: format!(
                    "route[{index}] (\"{}\"): its scope, instance and subscription rules are not \
                     enforced: {served_by} serves these paths, and only API keys carry them",
                    p.prefix
                ),
            })
        })
        .collect()
}

/// A header name as backends may read it: any case, `_` and `.` as `-` (CGI, PHP).
fn folded(name: &str) -> String {
    name.to_ascii_lowercase().replace(['_', '.'], "-")
}

/// No strip name or prefix may cover a [`NEEDED`] header.
pub(super) fn strips_spare_needed(r: &mut Reporter, f: &file::ForwardFile) {
    let named = f
        .strip_request_headers
        .iter()
        .map(|n| ("forward.strip_request_headers", n, false))
        .chain(
            f.strip_override_headers
                .iter()
                .map(|n| ("forward.strip_override_headers", n, false)),
        )
        .chain(
            f.strip_header_prefixes
                .iter()
                .map(|n| ("forward.strip_header_prefixes", n, true)),
        );
    for (field, name, prefix) in named {
        let strip = folded(name.get_ref());
        let covered = NEEDED.iter().find(|n| {
            if prefix {
                n.starts_with(&strip)
            } else {
                **n == strip
            }
        });
        if let Some(needed) = covered {
            r.at(
                name.span(),
                field,
                format!(
                    "\"{}\" would remove {needed}, which forwarded requests need",
                    name.get_ref()
                ),
            );
        }
    }
}

/// Each header the gateway writes upstream needs a name of its own, none a [`NEEDED`] one, a
/// hop-by-hop one or the credential header the gateway removes on key routes: `account_id_header =
/// "x-request-id"` would have the request id overwrite the account id under the one name the
/// backend trusts. Names compare as a backend reads them (any case, `_` and `.` as `-`).
pub(super) fn forwarded_names_distinct(r: &mut Reporter, f: &file::ForwardFile) {
    let fold = folded;
    let written = [
        ("forward.account_id_header", &f.account_id_header),
        ("forward.key_id_header", &f.key_id_header),
        ("forward.user_id_header", &f.user_id_header),
        ("forward.request_id_header", &f.request_id_header),
        ("forward.key_scopes_header", &f.key_scopes_header),
        ("forward.key_instances_header", &f.key_instances_header),
    ];
    // Defaults have no place in the file: a clash is reported where the file names a header.
    let in_file = |n: &Spanned<String>| !n.span().is_empty();
    for (i, this) in written.iter().enumerate() {
        let folded = fold(this.1.get_ref());
        let clash = written[..i]
            .iter()
            .find(|(_, o)| fold(o.get_ref()) == folded);
        if let Some(earlier) = clash {
            let (at, other) = if in_file(this.1) || !in_file(earlier.1) {
                (this, earlier)
            } else {
                (earlier, this)
            };
            r.at(
                at.1.span(),
                at.0,
                format!(
                    "\"{}\" is {} too: each header the gateway writes needs its own name",
                    at.1.get_ref(),
                    other.0
                ),
            );
        } else if NEEDED.contains(&folded.as_str())
            || super::owned::HOP_BY_HOP.contains(&folded.as_str())
            || folded == "authorization"
        {
            r.at(
                this.1.span(),
                this.0,
                format!(
                    "\"{}\" is a header the gateway sets or removes itself",
                    this.1.get_ref()
                ),
            );
        }
    }
}

pub(super) fn upstream(
    r: &mut Reporter,
    name: &str,
    u: &file::UpstreamFile,
    base: &Path,
) -> Upstream {
    let field = |f: &str| format!("upstreams.{name}.{f}");
    if u.addresses.get_ref().is_empty() {
        r.at(
            u.addresses.span(),
            field("addresses"),
            "needs at least one address",
        );
    }
    Upstream {
        name: name.to_string(),
        addresses: u
            .addresses
            .get_ref()
            .iter()
            .map(|a| resolved(r, &field("addresses"), a))
            .collect(),
        connect_timeout: nonzero_duration(r, &field("connect_timeout"), &u.connect_timeout),
        read_timeout: nonzero_duration(r, &field("read_timeout"), &u.read_timeout),
        health_check: u.health_check.as_ref().map(|h| HealthCheck {
            interval: nonzero_duration(r, &field("health_check.interval"), &h.interval),
            timeout: nonzero_duration(r, &field("health_check.timeout"), &h.timeout),
            unhealthy_threshold: positive(
                r,
                &field("health_check.unhealthy_threshold"),
                &h.unhealthy_threshold,
            ),
            healthy_threshold: positive(
                r,
                &field("health_check.healthy_threshold"),
                &h.healthy_threshold,
            ),
        }),
        tls: upstream_tls(r, &field, u, base),
        host: u
            .host
            .as_ref()
            .and_then(|h| host_value(r, &field("host"), h)),
    }
}

/// An upstream's TLS settings: a server name is required (pingora skips verification without
/// one), and checked; the CA file, when given, must hold certificates.
fn upstream_tls(
    r: &mut Reporter,
    field: &dyn Fn(&str) -> String,
    u: &file::UpstreamFile,
    base: &Path,
) -> Option<UpstreamTls> {
    let Some(tls) = u.tls.as_ref().filter(|t| *t.get_ref()) else {
        for (name, value) in [("sni", &u.sni), ("ca_file", &u.ca_file)] {
            if let Some(v) = value {
                r.at(v.span(), field(name), "applies only with tls = true");
            }
        }
        return None;
    };
    let sni = match &u.sni {
        None => {
            r.at(
                tls.span(),
                field("sni"),
                "is required with tls = true: the name sent and verified in the upstream's certificate",
            );
            String::new()
        }
        Some(sni) => {
            if rustls_pki_types::ServerName::try_from(sni.get_ref().as_str()).is_err()
                // pingora would verify another name (its leftmost '_' becomes '-').
                || sni.get_ref().contains('_')
            {
                r.at(
                    sni.span(),
                    field("sni"),
                    format!("\"{}\" is not a DNS name or IP address", sni.get_ref()),
                );
            }
            sni.get_ref().clone()
        }
    };
    let ca = u.ca_file.as_ref().and_then(|file| {
        crate::certs::load_ca_bundle(&base.join(file.get_ref()))
            .map_err(|e| r.at(file.span(), field("ca_file"), e.to_string()))
            .ok()
    });
    Some(UpstreamTls { sni, ca })
}

pub(super) fn routes(
    r: &mut Reporter,
    raw: &[file::RouteFile],
    upstreams: &[Upstream],
) -> Vec<Route> {
    let mut out: Vec<Route> = Vec::with_capacity(raw.len());
    for (i, route) in raw.iter().enumerate() {
        let field = |f: &str| format!("routes[{i}].{f}");
        let prefix = route.prefix.get_ref().clone();
        if let Some(problem) = crate::path::prefix_problem(&prefix) {
            r.at(
                route.prefix.span(),
                field("prefix"),
                format!("\"{prefix}\" {problem}"),
            );
        }
        if out.iter().any(|o| o.prefix == prefix) {
            r.at(
                route.prefix.span(),
                field("prefix"),
                format!("\"{prefix}\" is declared twice"),
            );
        }
        let auth = match route.auth.get_ref().as_str() {
            "api_key" => AuthMode::ApiKey,
            "jwt" => AuthMode::Jwt,
            "open" => AuthMode::Open,
            other => {
                r.at(
                    route.auth.span(),
                    field("auth"),
                    format!(
                        "unknown auth mode \"{other}\" (expected \"api_key\", \"jwt\" or \"open\")"
                    ),
                );
                AuthMode::Open
            }
        };
        let upstream = upstreams
            .iter()
            .position(|u| &u.name == route.upstream.get_ref())
            .unwrap_or_else(|| {
                r.at(
                    route.upstream.span(),
                    field("upstream"),
                    format!("unknown upstream \"{}\"", route.upstream.get_ref()),
                );
                0
            });
        let known = matches!(route.auth.get_ref().as_str(), "api_key" | "jwt" | "open");
        if route.forward_api_key && known && auth != AuthMode::ApiKey {
            // Nobody checked a key on such a route: forwarded, a made-up or revoked one (on a
            // console route, another account's) would reach a backend that may take it as
            // vouched for.
            r.at(
                route.auth.span(),
                field("forward_api_key"),
                "only an api_key route can forward the key it checked",
            );
        }
        out.push(Route {
            prefix,
            auth,
            upstream,
            forward_api_key: route.forward_api_key,
        });
    }
    out
}

/// Claims checks left off: tokens minted for another service with the same key pass.
pub(super) fn jwt_warnings(path: &Path, source: &str, raw: &file::JwtFile) -> Vec<ConfigWarning> {
    let line = source
        .lines()
        .position(|l| l.trim_start().starts_with("[jwt]"))
        .map_or(1, |i| i + 1);
    let at = |message: &str| ConfigWarning {
        file: path.to_path_buf(),
        line,
        column: 1,
        message: message.to_owned(),
    };
    let mut warnings = Vec::new();
    if raw.issuer.is_none() {
        warnings.push(at(
            "jwt.issuer is not set: console tokens from any issuer are accepted",
        ));
    }
    if raw.audience.is_none() {
        warnings.push(at(
            "jwt.audience is not set: console tokens meant for any audience are accepted",
        ));
    }
    warnings
}

/// The key family an algorithm's signatures are checked with.
fn jwt_family(alg: jsonwebtoken::Algorithm) -> u8 {
    use jsonwebtoken::Algorithm as A;
    match alg {
        A::HS256 | A::HS384 | A::HS512 => 0,
        A::RS256 | A::RS384 | A::RS512 | A::PS256 | A::PS384 | A::PS512 => 1,
        A::ES256 | A::ES384 => 2,
        A::EdDSA => 3,
    }
}

/// Whether `pem` is a public key of `alg`'s family.
fn public_key_parses(alg: jsonwebtoken::Algorithm, pem: &[u8]) -> Result<(), String> {
    use jsonwebtoken::DecodingKey;
    let parsed = match jwt_family(alg) {
        1 => DecodingKey::from_rsa_pem(pem),
        2 => DecodingKey::from_ec_pem(pem),
        3 => DecodingKey::from_ed_pem(pem),
        _ => {
            return Err(format!(
                "{alg:?} takes the secret from jwt.secret_env, not a PEM key"
            ))
        }
    };
    parsed
        .map(|_| ())
        .map_err(|e| format!("not a {alg:?} public key in PEM: {e}"))
}

pub(super) fn jwt_settings(
    r: &mut Reporter,
    raw: &file::JwtFile,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> JwtSettings {
    if raw.algorithms.get_ref().is_empty() {
        r.at(
            raw.algorithms.span(),
            "jwt.algorithms",
            "no algorithm allowed: every console token would be refused",
        );
    }
    let algorithms = raw
        .algorithms
        .get_ref()
        .iter()
        .filter_map(|a| match jsonwebtoken::Algorithm::from_str(a.get_ref()) {
            Ok(alg) => Some(alg),
            Err(_) => {
                r.at(
                    a.span(),
                    "jwt.algorithms",
                    format!("unknown algorithm \"{}\"", a.get_ref()),
                );
                None
            }
        })
        .collect();
    let public_keys = raw
        .public_keys
        .iter()
        .filter_map(|k| {
            let alg = jsonwebtoken::Algorithm::from_str(k.alg.get_ref())
                .map_err(|_| {
                    r.at(
                        k.alg.span(),
                        "jwt.public_keys.alg",
                        format!("unknown algorithm \"{}\"", k.alg.get_ref()),
                    )
                })
                .ok()?;
            let path = base.join(k.pem_file.get_ref());
            let pem = std::fs::read(&path)
                .map_err(|e| {
                    r.at(
                        k.pem_file.span(),
                        "jwt.public_keys.pem_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })
                .ok()?;
            // Parsed here too, so that `check` finds what `run` would refuse.
            if let Err(why) = public_key_parses(alg, &pem) {
                r.at(
                    k.pem_file.span(),
                    "jwt.public_keys.pem_file",
                    format!("{}: {why}", path.display()),
                );
                return None;
            }
            Some((alg, k.kid.clone(), pem))
        })
        .collect::<Vec<_>>();
    let jwks = raw.jwks_file.as_ref().and_then(|f| {
        let path = base.join(f.get_ref());
        let text = std::fs::read_to_string(&path)
            .map_err(|e| {
                r.at(
                    f.span(),
                    "jwt.jwks_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })
            .ok()?;
        match serde_json::from_str::<jsonwebtoken::jwk::JwkSet>(&text) {
            Ok(_) => Some(text),
            Err(e) => {
                r.at(
                    f.span(),
                    "jwt.jwks_file",
                    format!("{}: not a JWK set: {e}", path.display()),
                );
                None
            }
        }
    });
    // An allowed public-key algorithm needs a key to check it with.
    for a in raw.algorithms.get_ref() {
        let Ok(alg) = jsonwebtoken::Algorithm::from_str(a.get_ref()) else {
            continue;
        };
        let hmac = matches!(
            alg,
            jsonwebtoken::Algorithm::HS256
                | jsonwebtoken::Algorithm::HS384
                | jsonwebtoken::Algorithm::HS512
        );
        let keyed = raw.jwks_file.is_some()
            || public_keys
                .iter()
                .any(|(k, _, _)| jwt_family(*k) == jwt_family(alg));
        if !hmac && !keyed {
            r.at(
                a.span(),
                "jwt.algorithms",
                format!(
                    "\"{}\" is allowed but no key checks it: add jwt.public_keys or jwt.jwks_file",
                    a.get_ref()
                ),
            );
        }
    }
    JwtSettings {
        algorithms,
        secret: env(&raw.secret_env),
        secret_env: raw.secret_env.clone(),
        issuer: raw.issuer.clone(),
        audience: raw.audience.clone(),
        account_claim: raw.account_claim.clone(),
        leeway: duration(r, "jwt.leeway", &raw.leeway),
        public_keys,
        jwks,
    }
}

pub(super) fn log_settings(r: &mut Reporter, raw: &file::LogFile, base: &Path) -> LogSettings {
    let json = match raw.format.get_ref().as_str() {
        "text" => false,
        "json" => true,
        other => {
            r.at(
                raw.format.span(),
                "log.format",
                format!("\"{other}\" is not \"text\" or \"json\""),
            );
            false
        }
    };
    let sample = *raw.access_log_sample.get_ref();
    if !(0.0..=1.0).contains(&sample) {
        r.at(
            raw.access_log_sample.span(),
            "log.access_log_sample",
            format!("must be between 0.0 and 1.0, got {sample}"),
        );
    }
    let mut fields = u32::MAX;
    if !raw.access_log_fields.is_empty() {
        match crate::access_log::Settings::field_mask(
            raw.access_log_fields.iter().map(|f| f.get_ref().as_str()),
        ) {
            Ok(mask) => fields = mask,
            Err(name) => {
                let at = raw
                    .access_log_fields
                    .iter()
                    .find(|f| *f.get_ref() == name)
                    .map_or(0..0, |f| f.span());
                r.at(
                    at,
                    "log.access_log_fields",
                    format!(
                        "\"{name}\" is not a field (known: {})",
                        crate::access_log::FIELDS.join(", ")
                    ),
                );
            }
        }
    }
    let buffer = positive(r, "log.access_log_buffer", &raw.access_log_buffer);
    let target = match raw.access_log.get_ref().as_str() {
        "off" => None,
        "stdout" => Some(crate::access_log::Target::Stdout),
        "" => {
            r.at(
                raw.access_log.span(),
                "log.access_log",
                "is \"off\", \"stdout\" or a file path",
            );
            None
        }
        path => Some(crate::access_log::Target::File(base.join(path))),
    };
    let otlp = raw.otlp_endpoint.as_ref().and_then(|e| {
        let url = e.get_ref();
        if !cfg!(feature = "otlp") {
            r.at(
                e.span(),
                "log.otlp_endpoint",
                "this build exports no spans (build with `--features otlp`)",
            );
            return None;
        }
        // The exporter's HTTP client is built without TLS: an https:// endpoint would fail
        // every export, quietly.
        if !url.starts_with("http://") {
            r.at(
                e.span(),
                "log.otlp_endpoint",
                format!("\"{url}\" is not an http:// URL (the exporter speaks plain HTTP: send spans to a local collector)"),
            );
            return None;
        }
        Some((url.clone(), raw.service_name.clone()))
    });
    LogSettings {
        json,
        otlp,
        access: target.map(|target| crate::access_log::Settings {
            target,
            sample,
            fields,
            buffer,
        }),
    }
}
