//! The Redis store: any number of gateway nodes share keys, accounts, limits and quotas through
//! one Redis (or Redis Cluster). No server-side scripting: single commands, pipelines and
//! MULTI/EXEC only.
//!
//! Key patterns. Every key of one account carries the hash tag `{a:<account id>}`, so that the
//! transactions below touch one Redis Cluster slot. Account ids are `[A-Za-z0-9._:-]`, never braces.
//!
//! | key                              | type   | holds                                          | TTL |
//! |----------------------------------|--------|------------------------------------------------|-----|
//! | `mf:{a:<acct>}`                  | STRING | account JSON                                   | none |
//! | `mf:{a:<acct>}:keys`             | HASH   | key id -> key record JSON (SHA-256, no secret)  | none |
//! | `mf:{a:<acct>}:active`           | SET    | ids of active keys: the plan cap counts these; an id enters before its record is written and leaves only with a revoke (or a refusal over the cap) | none |
//! | `mf:{a:<acct>}:used`             | HASH   | key id -> last use, Unix ms (each node writes it at most once a minute per key) | none |
//! | `mf:{a:<acct>}:tat:<key id>`     | ZSET   | member `t`, score = GCRA theoretical arrival time (µs) | burst window + 61 s, refreshed by each node at most once a minute per key |
//! | `mf:{a:<acct>}:q:<period start>` | STRING | requests counted in the quota period            | until 35 days after the period ends |
//! | `mf:kh:<sha256 hex>`             | STRING | key record JSON, for lookup by hash             | none |
//! | channel `mf:invalidate`          | pub/sub| `k <hash>`, `a <acct>`: drop from local caches   | - |
//!
//! Key creation counts first (`SADD` + `SCARD` in MULTI), writes the record and then the
//! lookup record; nothing but a revoke ever takes a counted id out of the set, so no
//! interleaving of creates, listings and revokes on any number of nodes lets more than the
//! cap be active. A process that dies between counting and writing leaves an id counted
//! without a record (one slot short until an operator runs `SREM mf:{a:<acct>}:active <id>`):
//! the price of never uncounting a key in flight without server-side scripts.
//!
//! One authorized request costs one round trip, a pipeline of `ZADD tat GT now t; ZINCRBY tat T
//! t; INCR q` (plus `EXPIREAT q` once per period and node, and `PEXPIRE tat` + `HSET used` at
//! most once a minute per key and node: the TAT's TTL covers a minute without refresh).
//! `ZADD GT` then `ZINCRBY` computes GCRA's `max(tat, now) + T`; a rejection (rate or quota) is
//! compensated with `ZINCRBY -T` and `DECR`, so it consumes nothing. Between a rejected increment and its compensation another request can only see
//! *more* usage, never less: the limits may briefly refuse early, never admit extra.
//!
//! No MULTI/EXEC around the pipeline (it cost more client CPU than the commands themselves:
//! seven replies to parse instead of three). Redis runs one connection's commands in order, so a
//! request's `ZADD GT` precedes its `ZINCRBY`; another node's commands may come in between.
//! That only makes the answer more conservative: with requests numbered in `ZINCRBY` order,
//! request k reads `v_k = max(tat₀, now_j of every ZADD before it) + k·T`, and every j ≤ k sent
//! its ZADD before its own ZINCRBY, so `v_k ≥ max(tat₀ + k·T, max_{j≤k} now_j + (k-j+1)·T)`,
//! which is exactly what sequential GCRA would give request k. A request therefore never sees less
//! usage than some serial order would show it. A pipeline cut short by a lost connection can
//! leave a token taken without its request admitted: early refusal again, never extra.

use super::breaker::Breaker;
use super::{
    Account, Admission, AdmitRequest, CreateKeyError, Invalidation, InvalidationSink, KeyRecord,
    Store, StoreError,
};
use crate::cache::BoundedCache;
use crate::config::RedisSettings;
use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisError, RedisResult};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Invalidation channel.
pub const CHANNEL: &str = "mf:invalidate";

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
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    async fn pipe<T: FromRedisValue>(&mut self, p: &Pipeline) -> RedisResult<T> {
        match self {
            Conn::Single(c) => p.query_async(c).await,
            Conn::Cluster(c) => p.query_async(c).await,
        }
    }

    async fn cmd<T: FromRedisValue>(&mut self, cmd: &Cmd) -> RedisResult<T> {
        match self {
            Conn::Single(c) => cmd.query_async(c).await,
            Conn::Cluster(c) => cmd.query_async(c).await,
        }
    }
}

/// What makes a connection: kept so that the request path can open its own (see
/// [`RedisStore::local`]).
enum Connector {
    Single(redis::Client, ConnectionManagerConfig),
    Cluster(redis::cluster::ClusterClient),
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
        })
    }
}

fn account_key(a: &str) -> String {
    format!("mf:{{a:{a}}}")
}
fn keys_key(a: &str) -> String {
    format!("mf:{{a:{a}}}:keys")
}
fn active_key(a: &str) -> String {
    format!("mf:{{a:{a}}}:active")
}
fn used_key(a: &str) -> String {
    format!("mf:{{a:{a}}}:used")
}
fn tat_key(a: &str, key_id: &str) -> String {
    format!("mf:{{a:{a}}}:tat:{key_id}")
}
fn quota_key(a: &str, period: &str) -> String {
    format!("mf:{{a:{a}}}:q:{period}")
}
fn hash_key(hash: &str) -> String {
    format!("mf:kh:{hash}")
}

/// Errors that say Redis is unreachable (as opposed to a bad reply): they trip the breaker.
fn is_outage(e: &RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
}

fn decode<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Unavailable(format!("corrupt record: {e}")))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Persist(e.to_string()))
}

/// Shared Redis state for one gateway process.
pub struct RedisStore {
    /// Runs the connections' I/O and the invalidation subscriber; shut down in the background on drop.
    runtime: Option<tokio::runtime::Runtime>,
    /// Made at start on `runtime`: serves every caller until `local` exists.
    conn: Conn,
    connector: Connector,
    /// The connection the request path uses, opened by the first admission on the runtime that
    /// runs it (the proxy's): a store call is then no hop to another thread and back, which on
    /// a busy 2-core machine cost as much as the round trip itself. Until it exists, `conn`
    /// serves.
    local: tokio::sync::OnceCell<Conn>,
    /// Whether a request is opening `local` now, and when an attempt last failed (retried a
    /// second later at the earliest).
    local_opening: parking_lot::Mutex<LocalOpening>,
    /// Where the subscriber connects (the seeds, for a cluster).
    pubsub_clients: Vec<redis::Client>,
    timeout: Duration,
    breaker: Arc<Breaker>,
    /// account id -> the quota period whose counter expiry this node has already set.
    quota_expiry_set: BoundedCache<String, String>,
    /// Keys whose last use and TAT expiry this node wrote ("touched") less than a minute ago.
    key_touched: BoundedCache<String, ()>,
}

/// Whether the request path's own connection is being opened, and when that last failed.
#[derive(Default)]
struct LocalOpening {
    in_progress: bool,
    failed_at: Option<std::time::Instant>,
}

/// Marks the opening of the request path's connection as over when dropped.
struct ClearOnDrop<'a>(&'a parking_lot::Mutex<LocalOpening>);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.lock().in_progress = false;
    }
}

/// How often one node records a key's last use and pushes back its TAT's expiry.
const LAST_USE_EVERY_NS: u64 = 60_000_000_000;

/// A TAT key lives this long past its burst window after each refresh: a node that admits with
/// a key refreshes at least once per `LAST_USE_EVERY_NS`, so the key outlives the last request's
/// TAT (at most a burst window ahead) by a second.
const TAT_TTL_MARGIN_MS: u64 = LAST_USE_EVERY_NS / 1_000_000 + 1_000;

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
        let (connector, pubsub_clients) = match cluster_seeds(&s.url) {
            Some(seeds) => {
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
                (Connector::Cluster(client), pubsub)
            }
            None => {
                let client = redis::Client::open(s.url.as_str()).map_err(|e| fail(&e))?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    .set_response_timeout(Some(s.timeout.max(Duration::from_millis(10))))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                (Connector::Single(client.clone(), config), vec![client])
            }
        };
        let conn = runtime
            .block_on(async { tokio::time::timeout(connect_timeout, connector.connect()).await })
            .map_err(|_| fail(&"timed out connecting to Redis"))?
            .map_err(|e| fail(&e))?;
        Ok(Self {
            runtime: Some(runtime),
            conn,
            connector,
            local: tokio::sync::OnceCell::new(),
            local_opening: parking_lot::Mutex::default(),
            pubsub_clients,
            timeout: s.timeout,
            quota_expiry_set: BoundedCache::new(100_000, 86_400_000_000_000),
            key_touched: BoundedCache::new(100_000, LAST_USE_EVERY_NS),
            breaker: Arc::new(Breaker::new(
                s.breaker_threshold,
                u64::try_from(s.breaker_cooldown.as_nanos()).unwrap_or(u64::MAX),
            )),
        })
    }

    /// Runs one store call under the deadline and the circuit breaker.
    async fn guarded<T>(
        &self,
        call: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, StoreError> {
        if !self.breaker.allows() {
            return Err(StoreError::Unavailable("circuit open".into()));
        }
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) => {
                self.breaker.success();
                Ok(v)
            }
            Ok(Err(e)) => {
                if is_outage(&e) {
                    self.breaker.failure();
                }
                Err(StoreError::Unavailable(e.to_string()))
            }
            Err(_) => {
                self.breaker.failure();
                Err(StoreError::Unavailable("timed out".into()))
            }
        }
    }

    /// The request path's own connection once it exists, else the start-up one.
    fn pick(&self) -> Conn {
        self.local.get().unwrap_or(&self.conn).clone()
    }

    /// Opens the request path's connection on the calling runtime unless it exists, another
    /// request is opening it, or an attempt failed less than a second ago. Only the request
    /// that opens it waits (at most the store deadline); the others use `conn` meanwhile.
    async fn open_local(&self) {
        if self.local.initialized() {
            return;
        }
        {
            let mut state = self.local_opening.lock();
            if state.in_progress
                || state
                    .failed_at
                    .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
            {
                return;
            }
            state.in_progress = true;
        }
        // Cleared however this ends, a dropped request included.
        let _opening = ClearOnDrop(&self.local_opening);
        let failure = match tokio::time::timeout(self.timeout, self.connector.connect()).await {
            Ok(Ok(conn)) => {
                let _ = self.local.set(conn);
                None
            }
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("timed out".to_owned()),
        };
        if let Some(e) = &failure {
            tracing::warn!(error = %e, "could not open the request path's Redis connection; the shared one serves");
            self.local_opening.lock().failed_at = Some(std::time::Instant::now());
        }
    }

    async fn pipe<T: FromRedisValue>(&self, p: &Pipeline) -> Result<T, StoreError> {
        let mut c = self.pick();
        self.guarded(async move { c.pipe(p).await }).await
    }

    async fn cmd<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        let mut c = self.pick();
        self.guarded(async move { c.cmd(cmd).await }).await
    }

    async fn publish(&self, message: String) {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(CHANNEL).arg(message);
        if let Err(e) = self.cmd::<i64>(&cmd).await {
            tracing::warn!(error = %e, "could not publish a cache invalidation");
        }
    }

    async fn compensate(&self, tat: &str, quota: &str, t_us: u64) {
        let mut p = redis::pipe();
        p.cmd("ZINCRBY")
            .arg(tat)
            .arg(-(t_us as f64))
            .arg("t")
            .ignore()
            .cmd("DECR")
            .arg(quota)
            .ignore();
        if let Err(e) = self.pipe::<()>(&p).await {
            tracing::warn!(error = %e, "could not give back a rejected request's usage");
        }
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Listens on the invalidation channel; after every (re)subscription the local caches are
/// flushed, since anything published while away was missed.
async fn subscribe(clients: Vec<redis::Client>, sink: InvalidationSink) {
    let mut attempt = 0usize;
    loop {
        let client = &clients[attempt % clients.len()];
        attempt = attempt.wrapping_add(1);
        let connected =
            tokio::time::timeout(Duration::from_secs(2), client.get_async_pubsub()).await;
        if let Ok(Ok(mut pubsub)) = connected {
            if pubsub.subscribe(CHANNEL).await.is_ok() {
                sink(Invalidation::All);
                let mut messages = pubsub.on_message();
                while let Some(msg) = messages.next().await {
                    let Ok(payload) = msg.get_payload::<String>() else {
                        continue;
                    };
                    match payload.split_once(' ') {
                        Some(("k", hash)) => sink(Invalidation::Key(hash.to_owned())),
                        Some(("a", account)) => sink(Invalidation::Account(account.to_owned())),
                        _ => sink(Invalidation::All),
                    }
                }
                // Keep serving from the caches while away (an outage must not turn cached
                // callers away); the flush comes with the resubscription.
                tracing::warn!("invalidation channel lost; resubscribing");
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn key_by_hash(&self, hash_hex: &str) -> Result<Option<KeyRecord>, StoreError> {
        let json: Option<String> = self.cmd(redis::cmd("GET").arg(hash_key(hash_hex))).await?;
        json.as_deref().map(decode).transpose()
    }

    async fn account(&self, id: &str) -> Result<Option<Account>, StoreError> {
        let json: Option<String> = self.cmd(redis::cmd("GET").arg(account_key(id))).await?;
        json.as_deref().map(decode).transpose()
    }

    async fn put_account(&self, account: Account) -> Result<Account, StoreError> {
        let json = encode(&account)?;
        self.cmd::<()>(redis::cmd("SET").arg(account_key(&account.id)).arg(json))
            .await?;
        self.publish(format!("a {}", account.id)).await;
        Ok(account)
    }

    async fn create_key(
        &self,
        record: KeyRecord,
        max_keys: u32,
    ) -> Result<KeyRecord, CreateKeyError> {
        let a = record.account_id.as_str();
        let exists: bool = self.cmd(redis::cmd("EXISTS").arg(account_key(a))).await?;
        if !exists {
            return Err(CreateKeyError::UnknownAccount);
        }
        // The cap first: add, then count, atomically; whoever counts past the cap takes its
        // id back (two creates racing at the cap may both be refused: early refusal, never an
        // extra key). An id counted past the cap never gets a record, so no listing shows it.
        let mut p = redis::pipe();
        p.atomic()
            .cmd("SADD")
            .arg(active_key(a))
            .arg(&record.id)
            .ignore()
            .cmd("SCARD")
            .arg(active_key(a));
        let (count,): (u64,) = self.pipe(&p).await?;
        if count > u64::from(max_keys) {
            self.cmd::<()>(redis::cmd("SREM").arg(active_key(a)).arg(&record.id))
                .await?;
            return Err(CreateKeyError::LimitReached { max: max_keys });
        }
        // Then the record, then the lookup record: the key is usable from the last write on,
        // and nobody knows its secret before this returns. Nothing ever removes an id from
        // the set but a revoke (or the refusal above): a listing that runs meanwhile cannot
        // uncount a key being created.
        let json = encode(&record)?;
        let written = async {
            self.cmd::<()>(
                redis::cmd("HSET")
                    .arg(keys_key(a))
                    .arg(&record.id)
                    .arg(&json),
            )
            .await?;
            self.cmd::<()>(redis::cmd("SET").arg(hash_key(&record.hash)).arg(&json))
                .await
        }
        .await;
        if let Err(e) = written {
            // Give the slot back; should that fail too, the id stays counted without a record
            // (see the module doc).
            let mut p = redis::pipe();
            p.atomic()
                .cmd("SREM")
                .arg(active_key(a))
                .arg(&record.id)
                .ignore()
                .cmd("HDEL")
                .arg(keys_key(a))
                .arg(&record.id)
                .ignore();
            let _ = self.pipe::<()>(&p).await;
            // The lookup record too, in case its SET went through unseen (another slot in a
            // cluster, so its own command).
            let _ = self
                .cmd::<()>(redis::cmd("DEL").arg(hash_key(&record.hash)))
                .await;
            return Err(e.into());
        }
        self.publish(format!("k {}", record.hash)).await;
        Ok(record)
    }

    async fn list_keys(&self, account_id: &str) -> Result<Vec<KeyRecord>, StoreError> {
        // Records as they are: nothing here ever touches the cap's set (a listing that
        // "repaired" ids without a record once uncounted keys being created).
        let mut p = redis::pipe();
        p.cmd("HGETALL")
            .arg(keys_key(account_id))
            .cmd("HGETALL")
            .arg(used_key(account_id));
        let (records, used): (HashMap<String, String>, HashMap<String, u64>) =
            self.pipe(&p).await?;
        let mut keys = records
            .values()
            .map(|json| decode::<KeyRecord>(json))
            .collect::<Result<Vec<_>, _>>()?;
        for key in &mut keys {
            if let Some(ms) = used.get(&key.id) {
                key.last_used_at_ms = Some(*ms);
            }
        }
        super::oldest_first(&mut keys);
        Ok(keys)
    }

    async fn revoke_key(
        &self,
        account_id: &str,
        key_id: &str,
        now_ms: u64,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let json: Option<String> = self
            .cmd(redis::cmd("HGET").arg(keys_key(account_id)).arg(key_id))
            .await?;
        let Some(json) = json else { return Ok(None) };
        let mut record: KeyRecord = decode(&json)?;
        if record.is_active() {
            record.revoked_at_ms = Some(now_ms);
            let json = encode(&record)?;
            // The lookup record first: from here on no node that asks Redis accepts the key.
            self.cmd::<()>(redis::cmd("SET").arg(hash_key(&record.hash)).arg(&json))
                .await?;
            let mut p = redis::pipe();
            p.atomic()
                .cmd("HSET")
                .arg(keys_key(account_id))
                .arg(key_id)
                .arg(&json)
                .ignore()
                .cmd("SREM")
                .arg(active_key(account_id))
                .arg(key_id)
                .ignore()
                .cmd("DEL")
                .arg(tat_key(account_id, key_id))
                .ignore();
            self.pipe::<()>(&p).await?;
        }
        // Sent again for a key already revoked: a retry completes an invalidation that failed.
        self.publish(format!("k {}", record.hash)).await;
        let used: Option<u64> = self
            .cmd(redis::cmd("HGET").arg(used_key(account_id)).arg(key_id))
            .await?;
        record.last_used_at_ms = used.or(record.last_used_at_ms);
        Ok(Some(record))
    }

    async fn admit(&self, req: &AdmitRequest<'_>) -> Result<Admission, StoreError> {
        // Only the proxy admits: this runs on its runtime.
        self.open_local().await;
        let t_us = (1_000_000 / u64::from(req.bucket.rate_per_second.max(1))).max(1);
        let burst_us = u64::from(req.bucket.burst.max(1)) * t_us;
        let now_us = req.now_ns / 1000;
        let tat = tat_key(req.account_id, req.key_id);
        let quota = quota_key(req.account_id, req.period_id);
        // Counter expiry once per period and node; TAT expiry and last use at most once a
        // minute per key and node: the usual pipeline is ZADD, ZINCRBY, INCR. No MULTI: see the
        // module doc for why interleaving with other nodes' pipelines can only refuse early.
        let set_expiry = self
            .quota_expiry_set
            .get(req.account_id, req.now_ns)
            .is_none_or(|p| p != req.period_id);
        let touch = self.key_touched.get(req.key_id, req.now_ns).is_none();
        let mut p = redis::pipe();
        p.cmd("ZADD")
            .arg(&tat)
            .arg("GT")
            .arg(now_us)
            .arg("t")
            .ignore()
            .cmd("ZINCRBY")
            .arg(&tat)
            .arg(t_us)
            .arg("t")
            .cmd("INCR")
            .arg(&quota);
        if set_expiry {
            p.cmd("EXPIREAT")
                .arg(&quota)
                .arg(req.period_end_unix + 35 * 86_400)
                .ignore();
        }
        if touch {
            p.cmd("PEXPIRE")
                .arg(&tat)
                .arg(burst_us / 1000 + TAT_TTL_MARGIN_MS)
                .ignore();
            p.cmd("HSET")
                .arg(used_key(req.account_id))
                .arg(req.key_id)
                .arg(req.now_ns / 1_000_000)
                .ignore();
        }
        let (new_tat, used): (f64, u64) = self.pipe(&p).await?;
        if set_expiry {
            self.quota_expiry_set.insert(
                req.account_id.to_owned(),
                req.period_id.to_owned(),
                req.now_ns,
            );
        }
        if touch {
            self.key_touched
                .insert(req.key_id.to_owned(), (), req.now_ns);
        }
        let new_tat = new_tat as u64;
        let prior_tat = new_tat.saturating_sub(t_us);
        let allow_at = new_tat.saturating_sub(burst_us);
        if now_us < allow_at {
            self.compensate(&tat, &quota, t_us).await;
            return Ok(Admission::RateLimited {
                retry_after_ns: (allow_at - now_us) * 1000,
                reset_after_ns: prior_tat.saturating_sub(now_us) * 1000,
            });
        }
        if used > req.monthly_quota {
            self.compensate(&tat, &quota, t_us).await;
            let remaining = ((now_us + burst_us).saturating_sub(prior_tat.max(now_us)) / t_us)
                .min(u64::from(req.bucket.burst));
            return Ok(Admission::QuotaExceeded {
                remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
                reset_after_ns: prior_tat.saturating_sub(now_us) * 1000,
                used: used - 1,
            });
        }
        let remaining =
            ((now_us - allow_at) / t_us).min(u64::from(req.bucket.burst.saturating_sub(1)));
        Ok(Admission::Allowed {
            remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
            reset_after_ns: (new_tat - now_us) * 1000,
            used,
        })
    }

    async fn usage(&self, account_id: &str, period_id: &str) -> Result<u64, StoreError> {
        let n: Option<u64> = self
            .cmd(redis::cmd("GET").arg(quota_key(account_id, period_id)))
            .await?;
        Ok(n.unwrap_or(0))
    }

    async fn carry_usage(
        &self,
        account_id: &str,
        from: &str,
        to: &str,
        to_end_unix: i64,
    ) -> Result<(), StoreError> {
        let (from, to) = (quota_key(account_id, from), quota_key(account_id, to));
        // GETDEL takes the count once: two carries racing move it once, not twice.
        let n: Option<i64> = self.cmd(redis::cmd("GETDEL").arg(&from)).await?;
        let Some(n) = n.filter(|n| *n > 0) else {
            return Ok(());
        };
        let mut p = redis::pipe();
        p.atomic()
            .cmd("INCRBY")
            .arg(&to)
            .arg(n)
            .ignore()
            .cmd("EXPIREAT")
            .arg(&to)
            .arg(to_end_unix + 35 * 86_400)
            .ignore();
        self.pipe::<()>(&p).await
    }

    async fn ready(&self) -> bool {
        self.cmd::<String>(&redis::cmd("PING")).await.is_ok()
    }

    fn on_invalidation(&self, sink: InvalidationSink) {
        if let Some(rt) = &self.runtime {
            rt.spawn(subscribe(self.pubsub_clients.clone(), sink));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The module doc's argument for pipelines without MULTI, checked on a model of the
        /// two commands: however other requests' `ZADD GT` / `ZINCRBY` interleave, each
        /// request reads at least the TAT that serial GCRA (in ZINCRBY order) would give it.
        #[test]
        fn interleaved_pipelines_never_read_less_than_serial_gcra(
            nows in proptest::collection::vec(0u64..1_000, 1..8),
            shuffle in proptest::collection::vec(any::<u32>(), 16),
            tat0 in 0u64..1_000,
        ) {
            const T: u64 = 100;
            let n = nows.len();
            // Each request contributes its ZADD (false) and ZINCRBY (true) event, in a random
            // order in which every ZADD precedes its own ZINCRBY.
            let mut events: Vec<(usize, bool)> =
                (0..n).flat_map(|i| [(i, false), (i, true)]).collect();
            events.sort_by_key(|(i, second)| shuffle[(2 * i + usize::from(*second)) % 16]);
            let mut seen = vec![false; n];
            for e in events.iter_mut() {
                e.1 = seen[e.0];
                seen[e.0] = true;
            }
            let (mut tat, mut serial) = (tat0, tat0);
            for (i, is_incr) in events {
                if is_incr {
                    tat += T;
                    serial = serial.max(nows[i]) + T;
                    prop_assert!(tat >= serial, "read {tat}, serial GCRA {serial}");
                } else {
                    tat = tat.max(nows[i]);
                }
            }
        }
    }

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

    #[test]
    fn keys_of_one_account_share_a_hash_tag() {
        for k in [
            account_key("acme"),
            keys_key("acme"),
            active_key("acme"),
            used_key("acme"),
            tat_key("acme", "key_1"),
            quota_key("acme", "2026-11-01"),
        ] {
            assert!(k.starts_with("mf:{a:acme}"), "{k}");
        }
    }
}
