//! One gateway's shared state: the reloadable snapshot, the store, caches, metrics.

use crate::auth::jwt::KeyError;
use crate::auth::Directory;
use crate::certs::CertResolver;
use crate::clock::Clock;
use crate::config::{Config, ConfigErrors, Env, SecretProblem};
use crate::errors::GatewayError;
use crate::limits::blocks::RateBlocks;
use crate::limits::local::{IpLimiter, LocalLimiter};
use crate::live::Live;
use crate::log_limit::LogLimit;
use crate::manage::Manager;
use crate::metrics::Metrics;
use crate::store::{Invalidation, Store};
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use std::sync::Arc;

pub struct Gateway {
    live: ArcSwap<Live>,
    /// Serialises reloads (SIGHUP and the admin endpoint may race).
    reloading: Mutex<()>,
    env: Env,
    pub store: Arc<dyn Store>,
    pub directory: Arc<Directory>,
    pub manager: Manager,
    pub clock: Arc<dyn Clock>,
    pub metrics: Metrics,
    pub ip_limiter: IpLimiter,
    /// The same limits by IPv6 site (a /48), with `SITE_FACTOR` clients' budget.
    pub ip_site_limiter: IpLimiter,
    /// Console key creations and revocations per account (`console::KEY_WRITES_PER_MINUTE`).
    pub key_writes: LocalLimiter<String>,
    /// Console key listings per account (`console::KEY_READS_PER_MINUTE`).
    pub key_reads: LocalLimiter<String>,
    /// Failed authentications per client (`server.auth_failures_per_minute`).
    pub(crate) auth_failures: LocalLimiter<std::net::IpAddr>,
    /// The same per IPv6 site (`client_ip::SITE_PREFIX`), for `SITE_FACTOR` clients' worth.
    pub(crate) auth_failures_by_site: LocalLimiter<std::net::IpAddr>,
    /// Per-key rate limits this node keeps alone while the store cannot decide and a route
    /// fails open: forwarded unmetered (no quota), never unlimited.
    pub(crate) fail_open_rates: LocalLimiter<Box<str>>,
    /// The TLS listener's certificates (replaced by a reload), when there is one.
    pub(crate) certs: Option<Arc<CertResolver>>,
    /// The admin listener's certificates, when it speaks TLS.
    pub(crate) admin_certs: Option<Arc<CertResolver>>,
    /// Span export, when `[log] otlp_endpoint` is set (started by the server).
    #[cfg(feature = "otlp")]
    pub(crate) spans: Option<crate::spans::Spans>,
    /// Reloads so far and how the last one went (for `/metrics`).
    pub(crate) reloads: ReloadState,
    /// The access log, unless `[log] access_log = "off"` (started by the server).
    pub(crate) access_log: Option<crate::access_log::AccessLog>,
    /// Store errors on the request path are logged at most once a second (with a count).
    pub(crate) store_error_log: LogLimit,
    /// Keys the store found over their rate, refused locally until a token can exist.
    pub(crate) rate_blocks: Arc<RateBlocks>,
    /// Open connections on the proxy listeners (`server.max_connections*`).
    pub(crate) connections: Arc<crate::conn_limit::Connections>,
    /// Open connections on the admin listener (its own fixed caps).
    pub(crate) admin_connections: Arc<crate::conn_limit::Connections>,
}

/// Per-client-IP buckets of the open routes' limits kept at most (about 100 bytes each).
const CLIENT_BUCKETS: usize = 100_000;
/// Per-account buckets of the console's key writes kept at most.
const ACCOUNT_BUCKETS: usize = 100_000;
/// Per-key buckets kept at most while a route fails open.
const KEY_BUCKETS: usize = 100_000;

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    #[error("{}", join(.0))]
    Secrets(Vec<SecretProblem>),
    #[error("{0}")]
    Keys(#[from] KeyError),
}

/// Problems one after the other, as one line.
fn join(problems: &[SecretProblem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// What a successful reload applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    pub routes: usize,
    pub route_policies: usize,
    pub plans: usize,
    /// Changed settings that take effect at the next restart only.
    pub needs_restart: Vec<&'static str>,
}

/// What `/metrics` says about reloads.
#[derive(Debug)]
pub(crate) struct ReloadState {
    /// Configurations applied since start (1: the one it started with).
    pub(crate) generation: std::sync::atomic::AtomicU64,
    pub(crate) last_ok: std::sync::atomic::AtomicBool,
    /// Unix seconds of the last reload attempt (0: none yet).
    pub(crate) last_at_unix: std::sync::atomic::AtomicU64,
}

impl ReloadState {
    /// `(generation, last reload applied, when it was tried)`.
    pub(crate) fn snapshot(&self) -> (u64, bool, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.generation.load(Relaxed),
            self.last_ok.load(Relaxed),
            self.last_at_unix.load(Relaxed),
        )
    }
}

impl Default for ReloadState {
    fn default() -> Self {
        Self {
            generation: std::sync::atomic::AtomicU64::new(1),
            last_ok: std::sync::atomic::AtomicBool::new(true),
            last_at_unix: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl Gateway {
    /// Assembles the gateway around a store; `env` supplies secrets now and at every reload.
    pub fn new(
        config: Config,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        env: Env,
    ) -> Result<Self, KeyError> {
        let ttl_ns = u64::try_from(config.cache.ttl.as_nanos()).unwrap_or(u64::MAX);
        let directory = Arc::new(Directory::new(
            store.clone(),
            clock.clone(),
            config.cache.capacity,
            config.cache.negative_capacity,
            ttl_ns,
        ));
        let rate_blocks = Arc::new(RateBlocks::new(config.cache.capacity));
        let (weak, blocks) = (Arc::downgrade(&directory), Arc::downgrade(&rate_blocks));
        store.on_invalidation(Arc::new(move |change| {
            if let Some(directory) = weak.upgrade() {
                directory.apply(&change);
            }
            // Missed messages may mean a restarted store, with counters lost: ask it again.
            if let (Invalidation::All, Some(blocks)) = (&change, blocks.upgrade()) {
                blocks.clear();
            }
        }));
        let certs = config
            .server
            .tls
            .as_ref()
            .map(|t| Arc::new(CertResolver::new(t.certs.clone())));
        let admin_certs = config
            .admin
            .tls
            .as_ref()
            .map(|certs| Arc::new(CertResolver::new(certs.clone())));
        Ok(Self {
            live: ArcSwap::from_pointee(Live::build(config, None)?),
            reloading: Mutex::new(()),
            env,
            manager: Manager::new(store.clone(), directory.clone(), clock.clone()),
            metrics: Metrics::new(),
            ip_limiter: IpLimiter::new(CLIENT_BUCKETS),
            ip_site_limiter: IpLimiter::new(CLIENT_BUCKETS),
            key_writes: LocalLimiter::new(ACCOUNT_BUCKETS),
            key_reads: LocalLimiter::new(ACCOUNT_BUCKETS),
            auth_failures: LocalLimiter::new(CLIENT_BUCKETS),
            auth_failures_by_site: LocalLimiter::new(CLIENT_BUCKETS),
            fail_open_rates: LocalLimiter::new(KEY_BUCKETS),
            certs,
            admin_certs,
            access_log: None,
            #[cfg(feature = "otlp")]
            spans: None,
            reloads: ReloadState::default(),
            rate_blocks,
            connections: Arc::default(),
            admin_connections: Arc::default(),
            store_error_log: LogLimit::per_second(),
            directory,
            store,
            clock,
        })
    }

    /// Every refusal the gateway answers itself, on the public or the admin listener, passes
    /// here: counted by code, then rendered (head and SPEC §5 body) by `errors.rs`.
    pub(crate) fn refusal(&self, err: &GatewayError) -> (http::response::Parts, Vec<u8>) {
        self.metrics.rejected(err.code.as_str());
        let body = err.body();
        let head = crate::errors::answer_head(
            err.status(),
            "application/json",
            body.len(),
            err.retry_after,
        );
        (head, body)
    }

    /// Whether requests' spans are exported (then new traces are marked sampled).
    pub(crate) fn exports_spans(&self) -> bool {
        #[cfg(feature = "otlp")]
        {
            self.spans.is_some()
        }
        #[cfg(not(feature = "otlp"))]
        {
            false
        }
    }

    /// The current snapshot.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Re-reads gateway.toml and the policy files; applies them atomically, or changes nothing
    /// and says why. In-flight requests finish on the snapshot they started with.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        let _one_at_a_time = self.reloading.lock();
        let outcome = self.reload_now();
        let r = &self.reloads;
        r.last_ok
            .store(outcome.is_ok(), std::sync::atomic::Ordering::Relaxed);
        r.last_at_unix.store(
            self.clock.now_ns() / 1_000_000_000,
            std::sync::atomic::Ordering::Relaxed,
        );
        if outcome.is_ok() {
            r.generation
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        outcome
    }

    fn reload_now(&self) -> Result<Reloaded, ReloadError> {
        let current = self.live();
        let env = &self.env;
        let config = Config::load_with_env(&current.config.path, &|name| env(name))?;
        let problems = config.secret_problems();
        if !problems.is_empty() {
            return Err(ReloadError::Secrets(problems));
        }
        for warning in &config.warnings {
            tracing::warn!("{warning}");
        }
        let needs_restart = current.restart_only_changes(&config);
        let next = Live::build(config, Some(&current))?;
        if let (Some(resolver), Some(tls)) = (&self.certs, &next.config.server.tls) {
            // New handshakes get the new files; open connections keep what they have.
            resolver.replace(tls.certs.clone());
        }
        if let (Some(resolver), Some(certs)) = (&self.admin_certs, &next.config.admin.tls) {
            resolver.replace(certs.clone());
        }
        let reloaded = Reloaded {
            routes: next.config.routes.len(),
            route_policies: next.config.policies.routes.len(),
            plans: next.config.policies.plans.names().count(),
            needs_restart,
        };
        self.live.store(Arc::new(next));
        Ok(reloaded)
    }
}
