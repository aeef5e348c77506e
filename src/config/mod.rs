//! Configuration: gateway.toml and the policy files turned into one validated model.

pub mod error;
mod file;

use crate::policy::Policies;
use error::Reporter;
pub use error::{ConfigError, ConfigErrors};
use http::HeaderName;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;
use toml::Spanned;

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
    pub upstreams: Vec<Upstream>,
    pub routes: Vec<Route>,
    pub policies: Policies,
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
    pub upgrade_sock: PathBuf,
    pub pid_file: PathBuf,
}

#[derive(Clone)]
pub struct Admin {
    pub listen: SocketAddr,
    pub token_env: String,
    /// From the environment; `None` when the variable is unset or empty.
    pub token: Option<String>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("listen", &self.listen)
            .field("token_env", &self.token_env)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Which store holds the state: Redis when a URL is set, the embedded data file otherwise.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub data_file: PathBuf,
    pub redis: Option<crate::store::RedisSettings>,
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

#[derive(Debug, Clone)]
pub struct Forward {
    pub account_id_header: HeaderName,
    pub key_id_header: HeaderName,
    pub user_id_header: HeaderName,
    pub request_id_header: HeaderName,
    pub strip_request_headers: Vec<HeaderName>,
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub addresses: Vec<SocketAddr>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub health_check: Option<HealthCheck>,
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

/// What a route does when the store cannot decide the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorMode {
    /// 503 SERVICE_UNAVAILABLE with Retry-After.
    FailClosed,
    /// Forward a known (cached) caller unmetered, counted in metrics.
    FailOpen,
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
        let source = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                line: 0,
                column: 0,
                field: "(file)".into(),
                message: format!("cannot read: {e}"),
            }])
        })?;
        let base = path.parent().unwrap_or(Path::new("")).to_path_buf();
        let mut r = Reporter::new(path, &source);
        let raw: file::GatewayFile = match toml::from_str(&source) {
            Ok(raw) => raw,
            Err(e) => {
                r.toml(&e);
                return Err(ConfigErrors(r.errors));
            }
        };
        let env = |name: &str| env(name).filter(|v| !v.is_empty());
        let policies_dir = base.join(&raw.policies.dir);
        let policies = Policies::load(&policies_dir);

        let server = Server {
            listen: addr(&mut r, "server.listen", &raw.server.listen),
            threads: positive(&mut r, "server.threads", &raw.server.threads),
            keepalive_timeout: duration(
                &mut r,
                "server.keepalive_timeout",
                &raw.server.keepalive_timeout,
            ),
            max_header_bytes: positive(
                &mut r,
                "server.max_header_bytes",
                &raw.server.max_header_bytes,
            ),
            max_body_bytes: positive(&mut r, "server.max_body_bytes", &raw.server.max_body_bytes),
            max_inspected_body_bytes: inspected_limit(&mut r, &raw.server.max_inspected_body_bytes),
            grace_period: duration(&mut r, "server.grace_period", &raw.server.grace_period),
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
            strip_request_headers: raw
                .forward
                .strip_request_headers
                .iter()
                .map(|h| header(&mut r, "forward.strip_request_headers", h))
                .collect(),
        };
        let echo = raw
            .echo
            .as_ref()
            .map(|e| addr(&mut r, "echo.listen", &e.listen));
        let upstreams: Vec<Upstream> = raw
            .upstreams
            .iter()
            .map(|(name, u)| upstream(&mut r, name, u))
            .collect();
        let routes = routes(&mut r, &raw.routes, &upstreams);

        let mut errors = r.errors;
        let policies = match policies {
            Ok(p) => p,
            Err(ConfigErrors(mut e)) => {
                errors.append(&mut e);
                Policies::default()
            }
        };
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
            upstreams,
            routes,
            policies,
        })
    }

    /// Problems that stop `run` but not `check`: missing secrets.
    pub fn missing_secrets(&self) -> Vec<String> {
        let mut missing = Vec::new();
        if self.admin.token.is_none() {
            missing.push(format!(
                "the admin token is not set: export {}",
                self.admin.token_env
            ));
        }
        let needs_secret = self.jwt.algorithms.iter().any(|a| {
            matches!(
                a,
                jsonwebtoken::Algorithm::HS256
                    | jsonwebtoken::Algorithm::HS384
                    | jsonwebtoken::Algorithm::HS512
            )
        });
        if needs_secret && self.jwt.secret.is_none() {
            missing.push(format!(
                "jwt.algorithms allows HMAC but the secret is not set: export {}",
                self.jwt.secret_env
            ));
        }
        missing
    }
}

fn inspected_limit(r: &mut Reporter, v: &Spanned<usize>) -> usize {
    let n = positive(r, "server.max_inspected_body_bytes", v);
    if n > 64 * 1024 {
        r.at(
            v.span(),
            "server.max_inspected_body_bytes",
            format!("at most 65536 (the body is replayed from pingora's 64 KiB buffer), got {n}"),
        );
    }
    n
}

fn store_settings(
    r: &mut Reporter,
    raw: &file::StoreFile,
    base: &Path,
    url_from_env: Option<String>,
) -> StoreSettings {
    let timeout = raw.timeout.as_ref().map_or(Duration::from_millis(50), |t| {
        duration(r, "store.timeout", t)
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
        let url = raw.store_url()?;
        let ok = ["redis://", "redis+cluster://"]
            .iter()
            .any(|p| url.get_ref().starts_with(p));
        if !ok {
            r.at(
                url.span(),
                "store.redis_url",
                "expected redis://host:port or redis+cluster://host:port,host:port",
            );
        }
        Some(url.get_ref().clone())
    });
    StoreSettings {
        data_file: base.join(
            raw.data_file
                .clone()
                .unwrap_or_else(|| "data/store.jsonl".into()),
        ),
        redis: url.map(|url| crate::store::RedisSettings {
            url,
            timeout,
            breaker_threshold,
            breaker_cooldown,
        }),
    }
}

fn addr(r: &mut Reporter, field: &str, v: &Spanned<String>) -> SocketAddr {
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
fn resolved(r: &mut Reporter, field: &str, v: &Spanned<String>) -> SocketAddr {
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

fn duration(r: &mut Reporter, field: &str, v: &Spanned<String>) -> Duration {
    parse_duration(v.get_ref()).unwrap_or_else(|| {
        r.at(
            v.span(),
            field,
            format!(
                "\"{}\" is not a duration (use e.g. \"250ms\", \"5s\", \"1m\")",
                v.get_ref()
            ),
        );
        Duration::ZERO
    })
}

fn positive<T: Copy + Default + PartialOrd + std::fmt::Display>(
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

fn header(r: &mut Reporter, field: &str, v: &Spanned<String>) -> HeaderName {
    HeaderName::from_str(&v.get_ref().to_ascii_lowercase()).unwrap_or_else(|_| {
        r.at(
            v.span(),
            field,
            format!("\"{}\" is not a valid header name", v.get_ref()),
        );
        HeaderName::from_static("x-invalid")
    })
}

fn upstream(r: &mut Reporter, name: &str, u: &file::UpstreamFile) -> Upstream {
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
        connect_timeout: duration(r, &field("connect_timeout"), &u.connect_timeout),
        read_timeout: duration(r, &field("read_timeout"), &u.read_timeout),
        health_check: u.health_check.as_ref().map(|h| HealthCheck {
            interval: duration(r, &field("health_check.interval"), &h.interval),
            timeout: duration(r, &field("health_check.timeout"), &h.timeout),
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
    }
}

fn routes(r: &mut Reporter, raw: &[file::RouteFile], upstreams: &[Upstream]) -> Vec<Route> {
    let mut out: Vec<Route> = Vec::with_capacity(raw.len());
    for (i, route) in raw.iter().enumerate() {
        let field = |f: &str| format!("routes[{i}].{f}");
        let prefix = route.prefix.get_ref().clone();
        if !prefix.starts_with('/') {
            r.at(
                route.prefix.span(),
                field("prefix"),
                format!("\"{prefix}\" must start with '/'"),
            );
        } else if crate::path::normalise(&prefix)
            .map(|p| p != prefix)
            .unwrap_or(true)
        {
            r.at(
                route.prefix.span(),
                field("prefix"),
                format!("\"{prefix}\" is not a normalised path"),
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
        out.push(Route {
            prefix,
            auth,
            upstream,
            forward_api_key: route.forward_api_key,
        });
    }
    out
}

fn jwt_settings(
    r: &mut Reporter,
    raw: &file::JwtFile,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> JwtSettings {
    let algorithms = raw
        .algorithms
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
            Some((alg, k.kid.clone(), pem))
        })
        .collect();
    let jwks = raw.jwks_file.as_ref().and_then(|f| {
        let path = base.join(f.get_ref());
        std::fs::read_to_string(&path)
            .map_err(|e| {
                r.at(
                    f.span(),
                    "jwt.jwks_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })
            .ok()
    });
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
