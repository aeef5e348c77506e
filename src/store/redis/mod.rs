//! The Redis store: any number of gateway nodes share keys, accounts, limits and quotas through
//! one Redis (or Redis Cluster). No server-side scripting: single commands, pipelines and
//! MULTI/EXEC only. One concern per file:
//!
//! - `schema`: every key and channel (the table), record encoding;
//! - `connection`: connections, deadline, circuit breaker;
//! - `resp`: the protocol, as much as the request path speaks;
//! - `link`: one pipelined connection shared by concurrent requests;
//! - `request_path`: opening that connection, reopening it, following a sentinel's primary;
//! - `cluster_path`: a cluster's slot map and one such connection per primary;
//! - `admission`: one request's rate limit and quota, and why the pipeline needs no MULTI;
//! - `records`: accounts and keys, the plan's cap;
//! - `invalidation`: publishing changes, the subscriber;
//! - `sentinel`: `redis+sentinel://` URLs and a connection that follows failovers.

mod admission;
mod cluster_path;
mod connection;
mod invalidation;
mod link;
#[cfg(test)]
mod link_tests;
mod records;
mod request_path;
mod resp;
mod schema;
mod sentinel;

use super::breaker::Breaker;
use super::{
    Account, Admission, AdmitRequest, CreateKeyError, InvalidationSink, KeyRecord, Revoked, Store,
    StoreError,
};
use crate::cache::BoundedCache;
use crate::limits::gcra::BucketParams;
use async_trait::async_trait;
pub use connection::cluster_seeds;
use connection::{Conn, Connector, RequestRoute};
pub use schema::CHANNEL;
use std::sync::Arc;
use std::time::Duration;

/// Shared Redis state for one gateway process.
pub struct RedisStore {
    /// Runs the connections' I/O and the invalidation subscriber; shut down in the background on drop.
    runtime: Option<tokio::runtime::Runtime>,
    /// Made at start on `runtime`: management, readiness and start-up checks (redis-rs).
    conn: Conn,
    connector: Connector,
    /// Lookups and admissions: the gateway's own pipelined connections, opened on the runtime
    /// of the first request that uses them (the proxy's), so that a store call is no hop to
    /// another thread and back.
    request_path: RequestRoute,
    /// Where the subscriber connects (the seeds of a cluster in turn; the sentinels' primary).
    pubsub: connection::PubsubSource,
    timeout: Duration,
    /// When the invalidation subscriber last heard the channel.
    liveness: Arc<invalidation::Liveness>,
    /// Refunds (of a refused request's token and quota unit) that Redis did not take.
    refunds_failed: std::sync::atomic::AtomicU64,
    /// Admission pipelines that failed after they may have reached Redis.
    admissions_uncertain: std::sync::atomic::AtomicU64,
    /// One circuit breaker per [`connection::Budget`].
    breakers: [Breaker; 3],
    /// account id -> the quota period whose counter expiry this node has already set.
    quota_expiry_set: BoundedCache<String, String>,
    /// Keys whose last use and TAT expiry this node wrote ("touched") less than a minute ago.
    key_touched: BoundedCache<String, ()>,
}

#[async_trait]
impl Store for RedisStore {
    async fn key_by_hash(&self, hash_hex: &str) -> Result<Option<KeyRecord>, StoreError> {
        RedisStore::key_by_hash(self, hash_hex).await
    }

    async fn account(&self, id: &str) -> Result<Option<Account>, StoreError> {
        RedisStore::account(self, id).await
    }

    async fn account_for_management(&self, id: &str) -> Result<Option<Account>, StoreError> {
        RedisStore::account_for_management(self, id).await
    }

    async fn put_account(&self, account: Account) -> Result<bool, StoreError> {
        RedisStore::put_account(self, account).await
    }

    async fn create_key(
        &self,
        record: KeyRecord,
        max_keys: u32,
    ) -> Result<KeyRecord, CreateKeyError> {
        RedisStore::create_key(self, record, max_keys).await
    }

    async fn list_keys(&self, account_id: &str) -> Result<Vec<KeyRecord>, StoreError> {
        RedisStore::list_keys(self, account_id).await
    }

    async fn revoke_key(
        &self,
        account_id: &str,
        key_id: &str,
        now_ms: u64,
    ) -> Result<Option<Revoked>, StoreError> {
        RedisStore::revoke_key(self, account_id, key_id, now_ms).await
    }

    async fn admit(&self, req: &AdmitRequest<'_>) -> Result<Admission, StoreError> {
        RedisStore::admit(self, req).await
    }

    async fn bucket_state(
        &self,
        account_id: &str,
        key_id: &str,
        now_ns: u64,
        bucket: BucketParams,
    ) -> Result<(u32, u64), StoreError> {
        RedisStore::bucket_state(self, account_id, key_id, now_ns, bucket).await
    }

    async fn usage(&self, account_id: &str, period_id: &str) -> Result<u64, StoreError> {
        RedisStore::usage(self, account_id, period_id).await
    }

    async fn carry_usage(
        &self,
        account_id: &str,
        from: &str,
        to: &str,
        to_end_unix: i64,
        now_unix: i64,
    ) -> Result<(), StoreError> {
        RedisStore::carry_usage(self, account_id, from, to, to_end_unix, now_unix).await
    }

    async fn ready(&self) -> bool {
        self.cmd::<String>(&redis::cmd("PING")).await.is_ok()
    }

    fn on_invalidation(&self, sink: InvalidationSink) {
        if let Some(rt) = &self.runtime {
            rt.spawn(invalidation::subscribe(
                self.pubsub.clone(),
                sink,
                self.liveness.clone(),
            ));
        }
    }

    fn invalidations_confirmed(&self) -> bool {
        self.liveness.confirmed()
    }

    fn breakers(&self) -> Vec<(&'static str, bool)> {
        ["lookup", "admission", "management"]
            .into_iter()
            .zip(self.breakers.iter().map(Breaker::is_tripped))
            .collect()
    }

    fn admissions_uncertain(&self) -> u64 {
        self.admissions_uncertain
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn refunds_failed(&self) -> u64 {
        self.refunds_failed
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}
