//! Connections: the redis-rs one on the store's own runtime (start-up, management, readiness),
//! the request path's own (`request_path`, `cluster_path`) chosen from the URL, and the deadline
//! and circuit breaker every call runs under.

use super::admission::LAST_USE_EVERY_NS;
use super::cluster_path::ClusterPath;
use super::link::LinkError;
use super::request_path::{RequestPath, Target};
use super::resp::{Commands, Reply};
use super::sentinel::{SentinelConn, SentinelUrl};
use super::RedisStore;
use crate::cache::BoundedCache;
use crate::config::RedisSettings;
use crate::store::breaker::Breaker;
use crate::store::StoreError;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisError, RedisResult};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Seed URLs of a `redis+cluster://` URL, or `None` for a single-node URL.
pub fn cluster_seeds(url: &str) -> Option<Vec<String>> {
    let rest = url.strip_prefix("redis+cluster://")?;
    let (auth, hosts) = match rest.rsplit_once('@') {
        Some((auth, hosts)) => (format!("{auth}@"), hosts),
        None => (String::new(), rest),
    };
    Some(
        hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| format!("redis://{auth}{h}"))
            .collect(),
    )
}

#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(SentinelConn),
}

impl Conn {
    async fn pipe<T: FromRedisValue>(&mut self, p: &Pipeline) -> RedisResult<T> {
        match self {
            Conn::Single(c) => p.query_async(c).await,
            Conn::Cluster(c) => p.query_async(c).await,
            Conn::Sentinel(c) => c.pipe(p).await,
        }
    }

    pub(super) async fn cmd<T: FromRedisValue>(&mut self, cmd: &Cmd) -> RedisResult<T> {
        match self {
            Conn::Single(c) => cmd.query_async(c).await,
            Conn::Cluster(c) => cmd.query_async(c).await,
            Conn::Sentinel(c) => c.cmd(cmd).await,
        }
    }
}

/// Where the invalidation subscriber connects: fixed nodes (the one Redis, or a cluster's
/// seeds in turn), or the primary the sentinels name at each attempt.
#[derive(Clone)]
pub(super) enum PubsubSource {
    Nodes(Vec<redis::Client>),
    Sentinel(SentinelUrl),
}

impl PubsubSource {
    /// The node to subscribe on at the `attempt`-th try.
    pub(super) async fn client(&self, attempt: usize) -> RedisResult<redis::Client> {
        match self {
            PubsubSource::Nodes(nodes) => nodes
                .get(attempt % nodes.len().max(1))
                .cloned()
                .ok_or_else(|| (redis::ErrorKind::InvalidClientConfig, "no node").into()),
            PubsubSource::Sentinel(url) => url.primary_client(&url.find_primary().await?),
        }
    }
}

/// What makes the start-up connection (redis-rs: management, readiness, the start-up checks).
pub(super) enum Connector {
    Single(redis::Client, ConnectionManagerConfig),
    Cluster(redis::cluster::ClusterClient),
    Sentinel(SentinelUrl, ConnectionManagerConfig),
}

impl Connector {
    /// Opens a connection whose I/O task runs on the calling task's runtime.
    async fn connect(&self) -> RedisResult<Conn> {
        Ok(match self {
            Connector::Single(client, config) => Conn::Single(
                client
                    .get_connection_manager_with_config(config.clone())
                    .await?,
            ),
            Connector::Cluster(client) => Conn::Cluster(client.get_async_connection().await?),
            Connector::Sentinel(url, config) => {
                Conn::Sentinel(SentinelConn::connect(url, config).await?)
            }
        })
    }
}

/// Errors that say Redis is unreachable (as opposed to a bad reply): they trip the breaker.
/// Server replies that mean "not serving now" (a replica after a failover, a node loading its
/// data, a cluster without quorum) count as unreachable too.
pub(super) fn is_outage(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.code().is_some_and(is_outage_code)
}

/// Error replies that mean "not serving now", by their code.
pub(super) fn is_outage_code(code: &str) -> bool {
    matches!(
        code,
        "READONLY" | "LOADING" | "MASTERDOWN" | "CLUSTERDOWN" | "TRYAGAIN"
    )
}

/// A failed call, as the circuit breaker and the uncertain-admission count see it.
pub(super) trait CallFailure: std::fmt::Display {
    /// Redis is not serving (trips the breaker), as opposed to a bad request.
    fn is_outage(&self) -> bool;
    /// The call certainly never reached Redis.
    fn never_sent(&self) -> bool;
}

impl CallFailure for RedisError {
    fn is_outage(&self) -> bool {
        is_outage(self)
    }
    fn never_sent(&self) -> bool {
        self.is_connection_refusal()
    }
}

impl CallFailure for LinkError {
    fn is_outage(&self) -> bool {
        LinkError::is_outage(self)
    }
    fn never_sent(&self) -> bool {
        LinkError::never_sent(self)
    }
}

/// Redis must keep what it holds: an eviction policy drops quota counters (`volatile-*`: the
/// month's usage starts again) or keys and accounts (`allkeys-*`). Refused at start-up unless
/// the operator says otherwise; a Redis that hides its configuration gets a warning.
fn check_eviction(policy: RedisResult<Vec<String>>, allowed: bool) -> Result<(), StoreError> {
    match policy {
        Ok(pair) => match pair.get(1).map(String::as_str) {
            Some("noeviction") => Ok(()),
            Some(other) if !allowed => Err(StoreError::Misconfigured(format!(
                "Redis evicts keys (maxmemory-policy {other}), which resets quotas or loses keys; \
                 set maxmemory-policy noeviction, or [store] allow_eviction = true"
            ))),
            Some(other) => {
                tracing::warn!(
                    policy = other,
                    "Redis may evict keys (allowed by store.allow_eviction)"
                );
                Ok(())
            }
            None => Ok(()),
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot read Redis's maxmemory-policy (CONFIG GET refused?); make sure it is noeviction");
            Ok(())
        }
    }
}

/// The request path's connections: one node's (a single Redis, a sentinel's primary) or a
/// cluster's, by slot.
pub(super) enum RequestRoute {
    Node(RequestPath),
    Cluster(std::sync::Arc<ClusterPath>),
}

/// Which circuit breaker a call answers to: a flood of unknown-key lookups that slows Redis
/// opens the lookups' breaker, not the admissions' (and the reverse).
#[derive(Debug, Clone, Copy)]
pub(super) enum Budget {
    /// Key and account lookups on the request path.
    Lookup,
    /// The admission pipeline and its refunds.
    Admission,
    /// Management, readiness, invalidations.
    Management,
}

impl RedisStore {
    /// Connects (bounded by a few seconds); an unreachable Redis at start is an error.
    pub fn connect(s: &RedisSettings) -> Result<Self, StoreError> {
        let fail = |e: &dyn std::fmt::Display| StoreError::Unavailable(e.to_string());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("msgflash-redis")
            .enable_all()
            .build()
            .map_err(|e| fail(&e))?;
        let connect_timeout = Duration::from_secs(3);
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(s.timeout.max(Duration::from_millis(10))))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let sentinel = crate::config::parse_sentinel_url(&s.url)
            .transpose()
            .map_err(|e| StoreError::Misconfigured(format!("store.redis_url: {e}")))?;
        let (connector, pubsub) = match (cluster_seeds(&s.url), sentinel) {
            (_, Some(url)) => (
                Connector::Sentinel(url.clone(), manager_config),
                PubsubSource::Sentinel(url),
            ),
            (Some(seeds), None) => {
                let client = redis::cluster::ClusterClient::builder(seeds.clone())
                    .connection_timeout(connect_timeout)
                    .response_timeout(s.timeout.max(Duration::from_millis(10)))
                    .retries(1)
                    .build()
                    .map_err(|e| fail(&e))?;
                let pubsub = seeds
                    .iter()
                    .map(|u| redis::Client::open(u.as_str()))
                    .collect::<RedisResult<Vec<_>>>()
                    .map_err(|e| fail(&e))?;
                (Connector::Cluster(client), PubsubSource::Nodes(pubsub))
            }
            (None, None) => {
                let client = redis::Client::open(s.url.as_str()).map_err(|e| fail(&e))?;
                (
                    Connector::Single(client.clone(), manager_config),
                    PubsubSource::Nodes(vec![client]),
                )
            }
        };
        let mut conn = runtime
            .block_on(async { tokio::time::timeout(connect_timeout, connector.connect()).await })
            .map_err(|_| fail(&"timed out connecting to Redis"))?
            .map_err(|e| fail(&e))?;
        let policy: RedisResult<Vec<String>> = runtime.block_on(async {
            conn.cmd(redis::cmd("CONFIG").arg("GET").arg("maxmemory-policy"))
                .await
        });
        check_eviction(policy, s.allow_eviction)?;
        let request_path = match (&connector, &conn) {
            (Connector::Single(client, _), _) => {
                Target::of_client(client).map(|t| RequestRoute::Node(RequestPath::new(t)))
            }
            (Connector::Sentinel(url, _), Conn::Sentinel(primary)) => Some(RequestRoute::Node(
                RequestPath::new(Target::of_sentinel(primary.clone(), url)),
            )),
            (Connector::Cluster(_), _) => {
                let seeds = cluster_seeds(&s.url)
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|u| redis::Client::open(u.as_str()).ok())
                    .filter_map(|c| Target::of_client(&c))
                    .collect::<Vec<_>>();
                (!seeds.is_empty()).then(|| {
                    let cluster = ClusterPath::new(seeds);
                    runtime.block_on(cluster.refresh_now(connect_timeout));
                    RequestRoute::Cluster(cluster)
                })
            }
            _ => None,
        }
        .ok_or_else(|| {
            StoreError::Misconfigured(
                "store.redis_url: an address the request path cannot reach (TLS is not supported)"
                    .into(),
            )
        })?;
        Ok(Self {
            runtime: Some(runtime),
            request_path,
            conn,
            connector,
            pubsub,
            timeout: s.timeout,
            quota_expiry_set: BoundedCache::new(100_000, 86_400_000_000_000),
            key_touched: BoundedCache::new(100_000, LAST_USE_EVERY_NS),
            liveness: Arc::new(super::invalidation::Liveness::new()),
            refunds_failed: std::sync::atomic::AtomicU64::new(0),
            admissions_uncertain: std::sync::atomic::AtomicU64::new(0),
            breakers: [(); 3].map(|()| {
                Breaker::new(
                    s.breaker_threshold,
                    u64::try_from(s.breaker_cooldown.as_nanos()).unwrap_or(u64::MAX),
                )
            }),
        })
    }

    /// Runs one store call under the deadline and its budget's circuit breaker.
    async fn guarded<T>(
        &self,
        budget: Budget,
        call: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, StoreError> {
        self.breaker_allows(budget)?;
        match tokio::time::timeout(self.deadline(budget), call).await {
            Ok(r) => self.judge(budget, r),
            Err(_) => self.judge(budget, Err(LinkError::Timeout)),
        }
    }

    fn breaker_allows(&self, budget: Budget) -> Result<(), StoreError> {
        if self.breakers[budget as usize].allows() {
            Ok(())
        } else {
            Err(StoreError::Unavailable("circuit open".into()))
        }
    }

    /// Tells the budget's breaker how a call went. An admission that fails after its commands
    /// may have reached Redis is counted: the request is refused (503) but may have consumed a
    /// token and a unit of quota.
    fn judge<T, E: CallFailure>(&self, budget: Budget, r: Result<T, E>) -> Result<T, StoreError> {
        let breaker = &self.breakers[budget as usize];
        match r {
            Ok(v) => {
                breaker.success();
                Ok(v)
            }
            Err(e) => {
                if e.is_outage() {
                    breaker.failure();
                }
                if !e.never_sent() && matches!(budget, Budget::Admission) {
                    self.admissions_uncertain
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Err(StoreError::Unavailable(e.to_string()))
            }
        }
    }

    /// Runs request-path commands (lookups, admissions) as one pipeline over the request path's
    /// own connections (never redis-rs). An error reply fails the call.
    pub(super) async fn run(
        &self,
        budget: Budget,
        commands: &Commands,
    ) -> Result<Vec<Reply>, StoreError> {
        self.breaker_allows(budget)?;
        let deadline = self.deadline(budget);
        let r = match &self.request_path {
            RequestRoute::Node(path) => path.call(commands, deadline).await,
            RequestRoute::Cluster(cluster) => cluster.call(commands, deadline).await,
        };
        self.judge(budget, r)
    }

    /// How long a call of `budget` may take: the store timeout on the request path; at least
    /// a second for management (a revoke waits for a replica's acknowledgement).
    pub(super) fn deadline(&self, budget: Budget) -> Duration {
        match budget {
            Budget::Lookup | Budget::Admission => self.timeout,
            Budget::Management => self.timeout.max(Duration::from_secs(1)),
        }
    }

    /// True on a Redis Cluster.
    pub(super) fn is_cluster(&self) -> bool {
        matches!(self.connector, Connector::Cluster(_))
    }

    /// A management pipeline (see [`Budget`]).
    pub(super) async fn pipe<T: FromRedisValue>(&self, p: &Pipeline) -> Result<T, StoreError> {
        self.pipe_for(Budget::Management, p).await
    }

    /// A management command (see [`Budget`]).
    pub(super) async fn cmd<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        self.cmd_for(Budget::Management, cmd).await
    }

    pub(super) async fn pipe_for<T: FromRedisValue>(
        &self,
        budget: Budget,
        p: &Pipeline,
    ) -> Result<T, StoreError> {
        let mut c = self.conn.clone();
        self.guarded(budget, async move { c.pipe(p).await }).await
    }

    pub(super) async fn cmd_for<T: FromRedisValue>(
        &self,
        budget: Budget,
        cmd: &Cmd,
    ) -> Result<T, StoreError> {
        let mut c = self.conn.clone();
        self.guarded(budget, async move { c.cmd(cmd).await }).await
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_become_seed_lists() {
        assert_eq!(cluster_seeds("redis://127.0.0.1:6379"), None);
        assert_eq!(
            cluster_seeds("redis+cluster://10.0.0.1:7000, 10.0.0.2:7001"),
            Some(vec![
                "redis://10.0.0.1:7000".into(),
                "redis://10.0.0.2:7001".into()
            ])
        );
        assert_eq!(
            cluster_seeds("redis+cluster://:secret@h1:7000,h2:7000"),
            Some(vec![
                "redis://:secret@h1:7000".into(),
                "redis://:secret@h2:7000".into()
            ])
        );
    }
}

#[cfg(test)]
mod outage_tests {
    use super::*;

    fn server_error(reply: &[u8]) -> RedisError {
        match redis::parse_redis_value(reply) {
            Ok(redis::Value::ServerError(e)) => e.into(),
            other => panic!("not a server error: {other:?}"),
        }
    }

    #[test]
    fn a_redis_that_is_not_serving_counts_as_an_outage() {
        for reply in [
            &b"-READONLY You can't write against a read only replica.\r\n"[..],
            b"-LOADING Redis is loading the dataset in memory\r\n",
            b"-MASTERDOWN Link with MASTER is down\r\n",
            b"-CLUSTERDOWN The cluster is down\r\n",
            b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n",
        ] {
            assert!(
                is_outage(&server_error(reply)),
                "{:?}",
                String::from_utf8_lossy(reply)
            );
        }
        // A reply about the request itself is not an outage.
        assert!(!is_outage(&server_error(
            b"-WRONGTYPE Operation against a key\r\n"
        )));
    }
}
