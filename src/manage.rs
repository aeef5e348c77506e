//! Account and key management, shared by the admin API and the console's /api/api-keys.

use crate::auth::api_key::{random_id, NewKey};
use crate::auth::Directory;
use crate::clock::Clock;
use crate::errors::GatewayError;
use crate::limits::quota;
use crate::log_limit::LogLimit;
use crate::policy::routes::valid_scope;
use crate::policy::{Plans, Policies};
use crate::store::{valid_id, valid_uuid};
use crate::store::{Account, CreateKeyError, KeyRecord, Store, StoreError, Subscription};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// Body of `PUT /admin/v1/accounts/{id}`. What it leaves out an existing account keeps (a
/// plan change must not lift a suspension); a new account is active, its period starting on
/// the 1st.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PutAccount {
    /// Required for a new account only.
    plan: Option<String>,
    subscription: Option<Subscription>,
    quota_anchor_day: Option<u8>,
}

/// Body of a key creation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CreateKey {
    name: String,
    /// Absent or `null`: none.
    #[serde(default, deserialize_with = "null_as_empty")]
    scopes: Vec<String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    instance_ids: Vec<String>,
}

/// A list that `null` leaves empty (what many clients send for "none").
fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

/// Whether a character of a key name shows as itself: no control character, no invisible
/// one (zero-width spaces and joiners, word joiners, the byte-order mark, line and paragraph
/// separators) and none of the marks that reorder text (U+061C, U+200E/F, U+202A–U+202E,
/// U+2066–U+2069), with which a name could show in a dashboard as another.
fn shown_as_is(c: char) -> bool {
    !c.is_control()
        && !matches!(
            c,
            '\u{061c}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{2069}'
                | '\u{feff}'
        )
}

/// Drops repeated entries, keeping each first one where it was.
fn dedup_in_order(list: &mut Vec<String>) {
    let mut seen = std::collections::HashSet::with_capacity(list.len());
    list.retain(|s| seen.insert(s.clone()));
}

/// The most instance ids one key may be restricted to.
pub(crate) const MAX_INSTANCE_IDS: usize = 100;
/// The most scopes one key may carry (every declared scope, at most, in practice).
pub(crate) const MAX_SCOPES: usize = 100;

/// Management operations; every answer is JSON or a [`GatewayError`].
pub struct Manager {
    store: Arc<dyn Store>,
    directory: Arc<Directory>,
    clock: Arc<dyn Clock>,
}

fn unavailable(e: StoreError) -> GatewayError {
    // At most one line a second, with the count of those it stands for.
    static LOG: LogLimit = LogLimit::per_second();
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    if let Some(suppressed) = LOG.admit(now_ns) {
        tracing::error!(error = %e, suppressed, "store error in a management call");
    }
    GatewayError::store_unavailable()
}

/// Parses a management body; a refusal names the field at fault, never the parser's words.
fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, GatewayError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        match e.inner().classify() {
            serde_json::error::Category::Data if path != "." => {
                GatewayError::invalid_body(Some(&path))
            }
            serde_json::error::Category::Data => GatewayError::invalid_body(None),
            _ => GatewayError::body_not_json(),
        }
    })?;
    de.end().map_err(|_| GatewayError::body_not_json())?;
    Ok(value)
}

/// Milliseconds since the epoch as RFC 3339 UTC, e.g. `2026-11-29T03:27:35.120Z`.
pub(crate) fn rfc3339(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A key as listed: everything but the secret.
pub(crate) fn key_view(k: &KeyRecord) -> Value {
    json!({
        "id": k.id,
        "name": k.name,
        "prefix": k.prefix,
        "last4": k.last4,
        "createdAt": rfc3339(k.created_at_ms),
        "lastUsedAt": k.last_used_at_ms.map(rfc3339),
        "revokedAt": k.revoked_at_ms.map(rfc3339),
        "scopes": k.scopes,
        "instanceIds": k.instance_ids,
    })
}

impl Manager {
    pub fn new(store: Arc<dyn Store>, directory: Arc<Directory>, clock: Arc<dyn Clock>) -> Self {
        Self {
            store,
            directory,
            clock,
        }
    }

    async fn existing_account(&self, id: &str) -> Result<Account, GatewayError> {
        if !valid_id(id) {
            return Err(GatewayError::unknown_account());
        }
        self.store
            .account_for_management(id)
            .await
            .map_err(unavailable)?
            .ok_or_else(GatewayError::unknown_account)
    }

    async fn account_view(&self, plans: &Plans, account: &Account) -> Result<Value, GatewayError> {
        let plan = plans.get(&account.plan);
        let period = quota::period_at(self.clock.now_unix(), account.quota_anchor_day);
        let requests = self
            .store
            .usage(&account.id, &period.id())
            .await
            .map_err(unavailable)?;
        let active = self
            .store
            .list_keys(&account.id)
            .await
            .map_err(unavailable)?
            .iter()
            .filter(|k| k.is_active())
            .count();
        Ok(json!({
            "id": account.id,
            "plan": account.plan,
            "subscription": account.subscription,
            "quotaAnchorDay": account.quota_anchor_day,
            "usage": {
                "period": period.id(),
                "requests": requests,
                "quota": plan.map(|p| p.monthly_requests),
            },
            "keys": { "active": active, "max": plan.map(|p| p.max_keys) },
        }))
    }

    /// `PUT /admin/v1/accounts/{id}`
    pub async fn put_account(
        &self,
        policies: &Policies,
        id: &str,
        body: &[u8],
    ) -> Result<Value, GatewayError> {
        let plans = &policies.plans;
        if !valid_id(id) {
            return Err(GatewayError::invalid_account_id());
        }
        let req: PutAccount = parse(body)?;
        if let Some(plan) = req.plan.as_deref().filter(|p| plans.get(p).is_none()) {
            let known: Vec<&str> = plans.names().collect();
            return Err(GatewayError::unknown_plan(plan, &known));
        }
        if req.quota_anchor_day.is_some_and(|d| !(1..=31).contains(&d)) {
            return Err(GatewayError::invalid_anchor_day());
        }
        let now = self.clock.now_ms();
        let existing = self
            .store
            .account_for_management(id)
            .await
            .map_err(unavailable)?;
        let created = existing.as_ref().map_or(now, |a| a.created_at_ms);
        let plan = match (req.plan, &existing) {
            (Some(plan), _) => plan,
            (None, Some(existing)) => existing.plan.clone(),
            (None, None) => return Err(GatewayError::plan_required()),
        };
        // A plan kept from before may have left plans.toml since: the account would answer
        // every request with 503 until it names one that exists.
        if plans.get(&plan).is_none() {
            let known: Vec<&str> = plans.names().collect();
            return Err(GatewayError::unknown_plan(&plan, &known));
        }
        let account = Account {
            id: id.to_owned(),
            plan,
            subscription: req
                .subscription
                .or(existing.as_ref().map(|a| a.subscription))
                .unwrap_or(Subscription::Active),
            quota_anchor_day: req
                .quota_anchor_day
                .or(existing.as_ref().map(|a| a.quota_anchor_day))
                .unwrap_or(1),
            created_at_ms: created,
            updated_at_ms: now,
        };
        let announced = self
            .store
            .put_account(account.clone())
            .await
            .map_err(unavailable)?;
        self.directory.forget_account(id);
        if let Some(old) = existing.filter(|a| a.quota_anchor_day != account.quota_anchor_day) {
            // A new anchor day starts no fresh period: the usage counted so far moves to the
            // period it starts (after the account is written, so that a failed write moves
            // nothing; requests counted meanwhile in the new period are added to, not lost).
            let now_unix = self.clock.now_unix();
            let from = quota::period_at(now_unix, old.quota_anchor_day);
            let to = quota::period_at(now_unix, account.quota_anchor_day);
            if from.id() != to.id() {
                self.store
                    .carry_usage(id, &from.id(), &to.id(), to.end_unix, now_unix)
                    .await
                    .map_err(unavailable)?;
            }
        }
        if !announced {
            return Err(GatewayError::account_change_not_announced());
        }
        self.account_view(plans, &account).await
    }

    /// `GET /admin/v1/accounts/{id}`
    pub async fn show_account(&self, policies: &Policies, id: &str) -> Result<Value, GatewayError> {
        let account = self.existing_account(id).await?;
        self.account_view(&policies.plans, &account).await
    }

    /// Creates a key; the answer holds the full key, shown this once.
    pub async fn create_key(
        &self,
        policies: &Policies,
        account_id: &str,
        body: &[u8],
    ) -> Result<Value, GatewayError> {
        let mut req: CreateKey = parse(body)?;
        let name = req.name.trim();
        if name.is_empty() || name.chars().count() > 100 || !name.chars().all(shown_as_is) {
            return Err(GatewayError::invalid_key_name());
        }
        // A scope or instance named twice is one: kept once, in the order given.
        dedup_in_order(&mut req.scopes);
        dedup_in_order(&mut req.instance_ids);
        if req.instance_ids.len() > MAX_INSTANCE_IDS {
            return Err(GatewayError::too_many("instanceIds", MAX_INSTANCE_IDS));
        }
        if req.scopes.len() > MAX_SCOPES {
            return Err(GatewayError::too_many("scopes", MAX_SCOPES));
        }
        let known = |s: &String| valid_scope(s) && policies.routes.knows_scope(s);
        if let Some(bad) = req.scopes.iter().find(|s| !known(s)) {
            return Err(GatewayError::unknown_scope(bad));
        }
        if let Some(bad) = req.instance_ids.iter().find(|s| !valid_uuid(s)) {
            return Err(GatewayError::invalid_instance_id(bad));
        }
        let account = self.existing_account(account_id).await?;
        let max = policies.plans.get(&account.plan).map_or(0, |p| p.max_keys);
        let key = NewKey::generate().map_err(|e| {
            tracing::error!(error = %e, "OS random generator failed");
            GatewayError::store_unavailable()
        })?;
        let id = random_id("key_").map_err(|_| GatewayError::store_unavailable())?;
        let record = KeyRecord {
            id,
            account_id: account.id.clone(),
            name: name.to_owned(),
            hash: key.hash().to_hex(),
            prefix: key.display_prefix(),
            last4: key.last4(),
            scopes: req.scopes,
            instance_ids: req.instance_ids,
            created_at_ms: self.clock.now_ms(),
            last_used_at_ms: None,
            revoked_at_ms: None,
        };
        let record = match self.store.create_key(record, max).await {
            Ok(r) => r,
            Err(CreateKeyError::LimitReached { max }) => {
                return Err(GatewayError::key_limit_reached(max))
            }
            Err(CreateKeyError::UnknownAccount) => return Err(GatewayError::unknown_account()),
            Err(CreateKeyError::Store(e)) => return Err(unavailable(e)),
        };
        self.directory.forget_key(&record.hash);
        let mut view = key_view(&record);
        view["key"] = Value::from(key.expose());
        Ok(view)
    }

    /// Every key of the account, without secrets.
    pub async fn list_keys(&self, account_id: &str) -> Result<Value, GatewayError> {
        let account = self.existing_account(account_id).await?;
        let keys = self
            .store
            .list_keys(&account.id)
            .await
            .map_err(unavailable)?;
        Ok(json!({ "keys": keys.iter().map(key_view).collect::<Vec<_>>() }))
    }

    /// Revokes a key; effective for the next request.
    pub async fn revoke_key(&self, account_id: &str, key_id: &str) -> Result<Value, GatewayError> {
        if !valid_id(account_id) || !valid_id(key_id) {
            return Err(GatewayError::unknown_key());
        }
        let revoked = self
            .store
            .revoke_key(account_id, key_id, self.clock.now_ms())
            .await
            .map_err(unavailable)?
            .ok_or_else(GatewayError::unknown_key)?;
        self.directory.forget_key(&revoked.record.hash);
        if !revoked.replicated {
            return Err(GatewayError::revoke_not_replicated());
        }
        if !revoked.announced {
            // "Immediate" is the promise: a revoke that other nodes did not hear of says so.
            return Err(GatewayError::revoke_not_announced());
        }
        Ok(key_view(&revoked.record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_923_255_120), "2026-11-29T03:34:15.120Z");
    }

    #[test]
    fn body_errors_name_the_field_not_the_parser() {
        let message = |body: &str| parse::<CreateKey>(body.as_bytes()).unwrap_err().message;
        let at = |f: &str| format!("Invalid request body: {f} is unknown or of the wrong type");
        assert_eq!(message(r#"{"name": 5}"#), at("name"));
        assert_eq!(
            message(r#"{"name": "a", "scopes": ["x", 7]}"#),
            at("scopes[1]")
        );
        assert_eq!(message(r#"{"name": "a", "scope": []}"#), at("scope"));
        let shape = "Invalid request body: a required field is missing or it is not a JSON object";
        assert_eq!(message(r#"{}"#), shape);
        assert_eq!(message(r#""text""#), shape);
        for broken in ["", "{", r#"{"name": "a"} x"#, "nul"] {
            assert_eq!(
                message(broken),
                "Invalid request body: not a JSON document",
                "{broken}"
            );
        }
    }

    #[test]
    fn ids_and_uuids() {
        assert!(valid_id("acc_123:eu-1.x"));
        assert!(!valid_id(""));
        assert!(!valid_id("a/b"));
        assert!(valid_uuid("3fa85f64-5717-4562-b3fc-2c963f66afa6"));
        assert!(!valid_uuid("3fa85f64-5717-4562-b3fc-2c963f66afa"));
        assert!(!valid_uuid("not-a-uuid"));
    }
}
