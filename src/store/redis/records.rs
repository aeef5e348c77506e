//! Accounts and key records: lookups, the account write, key creation under the plan's cap,
//! listing, revocation, and the quota counters management reads or moves.
//!
//! The cap: creation counts first (`SADD` + `SCARD` in MULTI), writes the record and then the
//! lookup record; nothing but a revoke ever takes a counted id out of the set, so no
//! interleaving of creates, listings and revokes on any number of nodes lets more than the
//! cap be active. A process that dies between counting and writing leaves an id counted
//! without a record (one slot short until an operator runs `SREM mf:{a:<acct>}:active <id>`):
//! the price of never uncounting a key in flight without server-side scripts.

use super::connection::Budget;
use super::resp::{Arg, Commands, Reply};
use super::schema::{
    account_key, account_parts, active_key, decode, decode_bytes, encode, hash_key, hash_parts,
    keys_key, quota_key, tat_key, used_key,
};
use super::RedisStore;
use crate::store::{Account, CreateKeyError, KeyRecord, Revoked, StoreError};
use std::collections::HashMap;

/// Records (the `Store` methods that manage accounts and keys).
impl RedisStore {
    pub(super) async fn key_by_hash(
        &self,
        hash_hex: &str,
    ) -> Result<Option<KeyRecord>, StoreError> {
        self.get_record(&hash_parts(hash_hex)).await
    }

    pub(super) async fn account(&self, id: &str) -> Result<Option<Account>, StoreError> {
        self.get_record(&account_parts(id)).await
    }

    /// The admin API's read: over the management connection, so that the request path's own
    /// connection is opened by the proxy (its tasks live on the runtime that first uses it).
    pub(super) async fn account_for_management(
        &self,
        id: &str,
    ) -> Result<Option<Account>, StoreError> {
        let json: Option<String> = self.cmd(redis::cmd("GET").arg(account_key(id))).await?;
        json.as_deref().map(decode).transpose()
    }

    /// A request-path lookup: `GET` of one record.
    async fn get_record<T: serde::de::DeserializeOwned>(
        &self,
        key: &[&str],
    ) -> Result<Option<T>, StoreError> {
        let mut c = Commands::new();
        c.push(&[Arg::Str("GET"), Arg::Concat(key)]);
        match self.run(Budget::Lookup, &c).await?.first() {
            Some(Reply::Bulk(json)) => decode_bytes(json).map(Some),
            Some(Reply::Nil) => Ok(None),
            _ => Err(StoreError::Unavailable("unexpected reply to GET".into())),
        }
    }

    pub(super) async fn put_account(&self, account: Account) -> Result<bool, StoreError> {
        let json = encode(&account)?;
        self.cmd::<()>(redis::cmd("SET").arg(account_key(&account.id)).arg(json))
            .await?;
        // An account change (plan, subscription) every node must see: the caller says so when
        // it could not be told, and a retry writes the same record and tells it again.
        Ok(self.publish(format!("a {}", account.id)).await.is_ok())
    }

    pub(super) async fn create_key(
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
        // Nobody can have cached this key (its secret is new), so the announcement is a
        // courtesy to negative caches: its failure does not undo the create.
        let _ = self.publish(format!("k {}", record.hash)).await;
        Ok(record)
    }

    pub(super) async fn list_keys(&self, account_id: &str) -> Result<Vec<KeyRecord>, StoreError> {
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
        crate::store::oldest_first(&mut keys);
        Ok(keys)
    }

    pub(super) async fn revoke_key(
        &self,
        account_id: &str,
        key_id: &str,
        now_ms: u64,
    ) -> Result<Option<Revoked>, StoreError> {
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
            if let Err(e) = self.forget_old_revoked(account_id).await {
                // The revoke is done; the next one tries again.
                tracing::warn!(error = %e, "could not forget old revoked keys");
            }
        }
        // Where Redis has replicas, one must hold the revoke before it is reported done: a
        // failover to a replica that never saw it would bring the key back.
        let replicated = self.replicated().await;
        // Sent again for a key already revoked: a retry completes an invalidation that failed.
        let announced = replicated && self.publish(format!("k {}", record.hash)).await.is_ok();
        // Only for the answer's lastUsedAt: the revoke is done, a failure here must not hide it.
        let used: Option<u64> = self
            .cmd(redis::cmd("HGET").arg(used_key(account_id)).arg(key_id))
            .await
            .ok()
            .flatten();
        record.last_used_at_ms = used.or(record.last_used_at_ms);
        Ok(Some(Revoked {
            record,
            announced,
            replicated,
        }))
    }

    /// Forgets the account's revoked records beyond [`crate::store::REVOKED_KEYS_KEPT`]: out
    /// of the listing first, then their lookup records (another slot in a cluster, so their
    /// own commands). An absent lookup record is a 401, as a revoked one is.
    async fn forget_old_revoked(&self, account_id: &str) -> Result<(), StoreError> {
        let records: HashMap<String, String> = self
            .cmd(redis::cmd("HGETALL").arg(keys_key(account_id)))
            .await?;
        let keys = records
            .values()
            .map(|json| decode::<KeyRecord>(json))
            .collect::<Result<Vec<_>, _>>()?;
        let doomed = crate::store::revoked_beyond_kept(keys.iter());
        if doomed.is_empty() {
            return Ok(());
        }
        let mut p = redis::pipe();
        p.atomic();
        for hash in [keys_key(account_id), used_key(account_id)] {
            p.cmd("HDEL").arg(hash);
            for key in &doomed {
                p.arg(&key.id);
            }
            p.ignore();
        }
        self.pipe::<()>(&p).await?;
        for key in doomed {
            self.cmd::<()>(redis::cmd("DEL").arg(hash_key(&key.hash)))
                .await?;
        }
        Ok(())
    }

    /// True when this connection's writes so far are on at least one replica, or when there
    /// is none (`INFO replication`, then `WAIT 1` within half the management deadline). A
    /// cluster answers true: its replicas are per shard, out of reach of one `WAIT` here.
    async fn replicated(&self) -> bool {
        if self.is_cluster() {
            return true;
        }
        let info: Result<String, _> = self.cmd(redis::cmd("INFO").arg("replication")).await;
        let replicas = info.ok().and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("connected_slaves:"))
                .and_then(|n| n.trim().parse::<u32>().ok())
        });
        match replicas {
            Some(0) => true,
            // INFO refused (some managed Redis): the replicas cannot be known; not a reason to
            // fail every revoke.
            None => true,
            Some(_) => {
                let deadline = self.deadline(Budget::Management);
                let wait_ms = u64::try_from(deadline.as_millis() / 2)
                    .unwrap_or(500)
                    .max(1);
                let acked: Result<i64, _> = self.cmd(redis::cmd("WAIT").arg(1).arg(wait_ms)).await;
                acked.is_ok_and(|n| n >= 1)
            }
        }
    }

    pub(super) async fn usage(&self, account_id: &str, period_id: &str) -> Result<u64, StoreError> {
        let n: Option<u64> = self
            .cmd(redis::cmd("GET").arg(quota_key(account_id, period_id)))
            .await?;
        Ok(n.unwrap_or(0))
    }

    pub(super) async fn carry_usage(
        &self,
        account_id: &str,
        from: &str,
        to: &str,
        to_end_unix: i64,
        now_unix: i64,
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
            .cmd("EXPIRE")
            .arg(&to)
            .arg(super::admission::quota_ttl_secs(to_end_unix, now_unix))
            .ignore();
        self.pipe::<()>(&p).await
    }
}
