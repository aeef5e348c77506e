//! The public API's checks (SPEC §3), in order, stopping at the first failure.

use super::auth_failures::AuthFailures;
use super::headers::{ceil_secs, RateHeaders};
use super::restrictions::BodyRead;
use super::Identity;
use crate::auth::{api_key, Lookup, Principal};
use crate::errors::GatewayError;
use crate::gateway::Gateway;
use crate::limits::blocks::RateGate;
use crate::limits::quota;
use crate::live::Live;
use crate::metrics::Limit;
use crate::policy::{RoutePolicy, StoreErrorMode};
use crate::store::{Admission, AdmitRequest, StoreError, Subscription};
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use std::net::IpAddr;

/// Why a request was refused, with the rate-limit state to report when it is known.
pub(crate) struct Refusal {
    pub error: GatewayError,
    pub rate: Option<RateHeaders>,
}

impl From<GatewayError> for Refusal {
    fn from(error: GatewayError) -> Self {
        Self { error, rate: None }
    }
}

/// Checks 1–3: the key, present once, well formed, known and not revoked.
async fn principal(
    gw: &Gateway,
    live: &Live,
    req: &RequestHeader,
    client: Option<IpAddr>,
) -> Result<Principal, GatewayError> {
    let mut keys = req.headers.get_all(&super::X_API_KEY).iter();
    let key = match (keys.next(), keys.next()) {
        (None, _) => {
            let bearer = req
                .headers
                .get(http::header::AUTHORIZATION)
                .is_some_and(|v| {
                    v.as_bytes().len() > 7 && v.as_bytes()[..7].eq_ignore_ascii_case(b"bearer ")
                });
            return Err(if bearer {
                GatewayError::bearer_on_public_api()
            } else {
                GatewayError::missing_api_key()
            });
        }
        (Some(_), Some(_)) => None,
        // Surrounding spaces: what HTTP/1.1's parser drops, HTTP/2 delivers as sent.
        (Some(key), None) => Some(key.as_bytes().trim_ascii()),
    };
    let failures = AuthFailures::new(gw, live, client);
    // No store I/O for anything that cannot be a key; a failed authentication all the same
    // (SPEC §10), and past the limit refused as one.
    let Some(key) = key.filter(|k| api_key::is_well_formed(k)) else {
        return Err(failures.failed(GatewayError::invalid_api_key()));
    };
    match gw
        .directory
        .lookup(key, || failures.refused().is_none())
        .await
    {
        Ok(Lookup::Found(p)) => Ok(p),
        Ok(Lookup::Unknown) => Err(failures.failed(GatewayError::invalid_api_key())),
        Ok(Lookup::NotAsked) => Err(failures
            .refused()
            .unwrap_or_else(GatewayError::invalid_api_key)),
        Err(e) => {
            gw.metrics.store_error();
            if let Some(suppressed) = gw.store_error_log.admit(gw.clock.now_ns()) {
                tracing::error!(error = %e, suppressed, "key lookup failed");
            }
            Err(GatewayError::store_unavailable())
        }
    }
}

/// [`principal`], its wait on the store counted in `store`.
async fn principal_timed(
    gw: &Gateway,
    live: &Live,
    req: &RequestHeader,
    client: Option<IpAddr>,
    store: &mut StoreWait,
) -> Result<Principal, GatewayError> {
    let waited = store.start();
    let found = principal(gw, live, req, client).await;
    store.add(waited);
    found
}

/// When a request first waited on the store, and for how long in all (microseconds): read
/// only on a store that can make a request wait (Redis, for the store-wait histogram) or where
/// something else reports it (the access log, exported spans): the embedded store, with
/// neither, reads no clock for it.
#[derive(Debug, Default)]
pub(crate) struct StoreWait {
    pub(crate) started: Option<std::time::Instant>,
    pub(crate) us: u64,
    timed: bool,
}

impl StoreWait {
    /// A wait that is measured when `timed`.
    pub(crate) fn new(timed: bool) -> Self {
        Self {
            timed,
            ..Self::default()
        }
    }

    fn start(&mut self) -> Option<std::time::Instant> {
        if !self.timed {
            return None;
        }
        let now = std::time::Instant::now();
        self.started.get_or_insert(now);
        Some(now)
    }

    fn add(&mut self, since: Option<std::time::Instant>) {
        if let Some(since) = since {
            self.us = self
                .us
                .saturating_add(u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX));
        }
    }
}

/// What a public API request is for: its route's policy, its normalised path, the upstream
/// pool it would go to.
pub(crate) struct Target<'a> {
    pub policy: Option<&'a RoutePolicy>,
    pub path: &'a str,
    pub upstream: &'a crate::routing::upstream::Pool,
}

/// What an account's plan allows now: the plan, the time the decision is taken at, the quota
/// period it falls in and the rate-limit headers a refusal reports.
struct Terms<'a> {
    plan: &'a crate::policy::Plan,
    now_ns: u64,
    now_unix: i64,
    period: quota::Period,
    rate: RateHeaders,
}

impl<'a> Terms<'a> {
    fn of(gw: &Gateway, live: &'a Live, account: &crate::store::Account) -> Result<Self, Refusal> {
        let Some(plan) = live.config.policies.plans.get(&account.plan) else {
            tracing::error!(account = %account.id, plan = %account.plan, "account refers to an unknown plan");
            return Err(GatewayError::plan_unavailable().into());
        };
        let now_ns = gw.clock.now_ns();
        let now_unix = i64::try_from(now_ns / 1_000_000_000).unwrap_or(i64::MAX);
        let period = quota::period_at(now_unix, account.quota_anchor_day);
        let rate = RateHeaders {
            burst: plan.bucket.burst,
            burst_window: u64::from(
                plan.bucket
                    .burst
                    .div_ceil(plan.bucket.rate_per_second.max(1)),
            )
            .max(1),
            quota: plan.monthly_requests,
            period_secs: period.seconds(),
            live: None,
        };
        Ok(Self {
            plan,
            now_ns,
            now_unix,
            period,
            rate,
        })
    }

    fn refuse(&self, error: GatewayError) -> Refusal {
        Refusal {
            error,
            rate: Some(self.rate),
        }
    }
}

/// Check 4: the account's subscription, where the route requires one.
fn subscribed(
    policy: Option<&RoutePolicy>,
    account: &crate::store::Account,
    terms: &Terms<'_>,
) -> Result<(), Refusal> {
    let required = policy.and_then(|p| p.require_subscription).unwrap_or(true);
    if required && account.subscription != Subscription::Active {
        return Err(terms.refuse(GatewayError::subscription_inactive()));
    }
    Ok(())
}

/// `refused` (a refusal after the key is known, before its bucket) with the bucket's state
/// as it stands, no token taken: SPEC §3 has every `/api/v1/` response carry it. A key this
/// node holds blocked, or whose bucket it read within an interval, costs no store call; a
/// store that cannot answer leaves the policy alone.
async fn with_bucket(
    gw: &Gateway,
    found: &Principal,
    terms: &Terms<'_>,
    mut refused: Refusal,
    store: &mut StoreWait,
) -> Refusal {
    let Some(rate) = refused.rate.as_mut() else {
        return refused;
    };
    let key_id: &str = &found.key.id;
    // Now, not when the terms were read: a body read in between took the client's time.
    let now_ns = gw.clock.now_ns();
    let blocks = &gw.rate_blocks;
    if let Some(full_after_ns) = blocks.blocked_until_full(key_id, now_ns) {
        rate.live = Some((0, ceil_secs(full_after_ns)));
        return refused;
    }
    let interval_ns = terms.plan.bucket.emission_interval_ns();
    if let Some((remaining, reset_after_ns)) = blocks.recent_read(key_id, now_ns, interval_ns) {
        rate.live = Some((remaining, ceil_secs(reset_after_ns)));
        return refused;
    }
    if found.store_failed {
        return refused;
    }
    let waited = store.start();
    let state = gw
        .store
        .bucket_state(&found.account.id, key_id, now_ns, terms.plan.bucket)
        .await;
    store.add(waited);
    match state {
        Ok((remaining, reset_after_ns)) => {
            blocks.remember_read(key_id, remaining, reset_after_ns, now_ns);
            rate.live = Some((remaining, ceil_secs(reset_after_ns)));
        }
        Err(e) => {
            gw.metrics.store_error();
            tracing::debug!(error = %e, "bucket state unavailable for a refusal");
        }
    }
    refused
}

/// Runs checks 1–7 for a request from `client` (its per-client limit key); on success the
/// request may be forwarded as `Identity`.
pub(crate) async fn authorize(
    gw: &Gateway,
    live: &Live,
    session: &mut Session,
    target: Target<'_>,
    client: Option<IpAddr>,
    store: &mut StoreWait,
) -> Result<(Identity, RateHeaders), Refusal> {
    let Target {
        policy,
        path,
        upstream,
    } = target;
    let mut found = principal_timed(gw, live, session.req_header(), client, store).await?;
    let mut terms = Terms::of(gw, live, &found.account)?;
    // 4. subscription
    if let Err(refused) = subscribed(policy, &found.account, &terms) {
        return Err(with_bucket(gw, &found, &terms, refused, store).await);
    }
    // 5. scopes and instances
    match super::restrictions::check(live, session, &found, policy, path).await {
        Err(e) => return Err(with_bucket(gw, &found, &terms, terms.refuse(e), store).await),
        Ok(BodyRead::No) => {}
        Ok(BodyRead::Yes) => {
            // Reading the body took as long as the client chose: the key may have been
            // revoked meanwhile, the account changed, the month turned. Look again.
            found = principal_timed(gw, live, session.req_header(), client, store).await?;
            terms = Terms::of(gw, live, &found.account)?;
            if let Err(refused) = subscribed(policy, &found.account, &terms) {
                return Err(with_bucket(gw, &found, &terms, refused, store).await);
            }
        }
    }
    // Nothing to forward to: refused before steps 6 and 7, which would count a request that
    // never reaches the upstream.
    if !upstream.has_healthy() {
        let refused = terms.refuse(GatewayError::no_healthy_upstream());
        return Err(with_bucket(gw, &found, &terms, refused, store).await);
    }
    let principal = found;
    let account = principal.account.clone();
    let Terms {
        plan,
        now_ns,
        now_unix,
        period,
        mut rate,
    } = terms;
    let refuse = |error: GatewayError, rate: RateHeaders| Refusal {
        error,
        rate: Some(rate),
    };
    let identity = Identity {
        account_id: principal.account_id_value.clone(),
        key_id: Some(principal.key_id_value.clone()),
        user_id: None,
        restrictions: principal.key.forwarded.clone(),
    };
    // 6 and 7. rate limit, then quota, in one store decision; a key the store just refused
    // is refused here until its retry time, at no store cost.
    let interval_ns = plan.bucket.emission_interval_ns();
    let key_id: &str = &principal.key.id;
    if let RateGate::Refuse {
        retry_after_ns,
        reset_after_ns,
    } = gw.rate_blocks.gate(key_id, now_ns, interval_ns)
    {
        rate.live = Some((0, ceil_secs(reset_after_ns)));
        gw.metrics.limit_refused(&account.plan, Limit::Rate);
        return Err(refuse(
            GatewayError::rate_limited(ceil_secs(retry_after_ns)),
            rate,
        ));
    }
    let period_id = period.id();
    // The lookup just met a store outage: one store timeout per request, not two.
    let waited = store.start();
    let decision = if principal.store_failed {
        Err(StoreError::Unavailable(
            "the key lookup just failed; admission not tried".into(),
        ))
    } else {
        gw.store
            .admit(&AdmitRequest {
                key_id: &principal.key.id,
                account_id: &account.id,
                now_ns,
                bucket: plan.bucket,
                period_id: &period_id,
                period_end_unix: period.end_unix,
                monthly_quota: plan.monthly_requests,
                in_flight: &principal.key.in_flight,
            })
            .await
    };
    store.add(waited);
    match decision {
        Ok(Admission::Allowed {
            remaining,
            reset_after_ns,
            ..
        }) => {
            rate.live = Some((remaining, ceil_secs(reset_after_ns)));
            if remaining == 0 {
                // The bucket is empty: the next token is due at new_tat + T - burst·T, and never
                // later than one interval from now (concurrent refusals may inflate new_tat).
                let next_token = now_ns
                    .saturating_add(reset_after_ns)
                    .saturating_add(interval_ns)
                    .saturating_sub(u64::from(plan.bucket.burst) * interval_ns)
                    .min(now_ns.saturating_add(interval_ns));
                gw.rate_blocks.block(
                    key_id,
                    next_token,
                    now_ns.saturating_add(reset_after_ns),
                    now_ns,
                );
            } else {
                gw.rate_blocks.unblock(key_id);
            }
            Ok((identity, rate))
        }
        Ok(Admission::RateLimited {
            retry_after_ns,
            reset_after_ns,
        }) => {
            // Concurrent refusals not yet given back can inflate the store's retry time, and a
            // truly refused key gets a token within one emission interval: block no longer.
            let block = retry_after_ns.min(interval_ns);
            gw.rate_blocks.block(
                key_id,
                now_ns.saturating_add(block),
                now_ns.saturating_add(reset_after_ns),
                now_ns,
            );
            rate.live = Some((0, ceil_secs(reset_after_ns)));
            gw.metrics.limit_refused(&account.plan, Limit::Rate);
            Err(refuse(
                GatewayError::rate_limited(ceil_secs(retry_after_ns)),
                rate,
            ))
        }
        Ok(Admission::Revoked) => {
            // The store's word is final: this node's cache had not heard of the revoke yet.
            gw.rate_blocks.unblock(key_id);
            if let Some(raw) = session.req_header().headers.get(&super::X_API_KEY) {
                let hash = crate::auth::api_key::KeyHash::of(raw.as_bytes().trim_ascii());
                gw.directory.forget_key(&hash.to_hex());
            }
            Err(GatewayError::invalid_api_key().into())
        }
        Ok(Admission::QuotaExceeded {
            remaining,
            reset_after_ns,
            ..
        }) => {
            gw.rate_blocks.unblock(key_id);
            rate.live = Some((remaining, ceil_secs(reset_after_ns)));
            gw.metrics.limit_refused(&account.plan, Limit::Quota);
            Err(refuse(
                GatewayError::quota_exceeded(period.seconds_left(now_unix)),
                rate,
            ))
        }
        Err(e) => {
            gw.rate_blocks.unblock(key_id);
            gw.metrics.store_error();
            let mode = policy
                .and_then(|p| p.on_store_error)
                .unwrap_or(StoreErrorMode::FailClosed);
            if mode == StoreErrorMode::FailOpen {
                // The caller is known (cached); only the counting is missing. Forward unmetered
                // (no quota), but within the plan's rate, kept by this node alone: a client
                // that can make the store fail must not make its key unlimited.
                if let Err(retry_ns) =
                    gw.fail_open_rates
                        .check(Box::from(key_id), now_ns, plan.bucket)
                {
                    // Emptied: full again after a burst's worth of intervals.
                    let full_after = u64::from(plan.bucket.burst).saturating_mul(interval_ns);
                    rate.live = Some((0, ceil_secs(full_after)));
                    gw.metrics.limit_refused(&account.plan, Limit::Rate);
                    return Err(refuse(
                        GatewayError::rate_limited(ceil_secs(retry_ns)),
                        rate,
                    ));
                }
                gw.metrics.fail_open();
                if let Some(suppressed) = gw.store_error_log.admit(now_ns) {
                    tracing::warn!(error = %e, suppressed, "limits unavailable; forwarding unmetered (fail_open)");
                }
                return Ok((identity, rate));
            }
            if let Some(suppressed) = gw.store_error_log.admit(now_ns) {
                tracing::error!(error = %e, suppressed, "rate-limit decision failed");
            }
            Err(GatewayError::store_unavailable().into())
        }
    }
}
