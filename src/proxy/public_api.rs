//! The public API's checks (SPEC §3), in order, stopping at the first failure.

use super::headers::{ceil_secs, RateHeaders};
use super::{Gateway, Identity};
use crate::auth::api_key;
use crate::config::{Route, StoreErrorMode};
use crate::errors::GatewayError;
use crate::limits::quota;
use crate::store::{Admission, AdmitRequest, Subscription};
use pingora::http::RequestHeader;

/// Why a request was refused, with the rate-limit state to report when it is known.
pub struct Refusal {
    pub error: GatewayError,
    pub rate: Option<RateHeaders>,
}

impl From<GatewayError> for Refusal {
    fn from(error: GatewayError) -> Self {
        Self { error, rate: None }
    }
}

/// Runs checks 1–7; on success the request may be forwarded as `Identity`.
pub async fn authorize(
    gw: &Gateway,
    req: &RequestHeader,
    route: &Route,
) -> Result<(Identity, RateHeaders), Refusal> {
    // 1. present (exactly once)
    let mut keys = req.headers.get_all("x-api-key").iter();
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
            }
            .into());
        }
        (Some(_), Some(_)) => return Err(GatewayError::invalid_api_key().into()),
        (Some(key), None) => key.as_bytes(),
    };
    // 2. well formed: no store I/O for anything else
    if !api_key::is_well_formed(key) {
        return Err(GatewayError::invalid_api_key().into());
    }
    // 3. known and not revoked
    let principal = match gw.directory.lookup(key).await {
        Ok(Some(p)) => p,
        Ok(None) => return Err(GatewayError::invalid_api_key().into()),
        Err(e) => {
            gw.metrics.store_error();
            tracing::error!(error = %e, "key lookup failed");
            return Err(GatewayError::store_unavailable().into());
        }
    };
    let account = &principal.account;
    let Some(plan) = gw.config.plans.get(&account.plan) else {
        tracing::error!(account = %account.id, plan = %account.plan, "account refers to an unknown plan");
        return Err(GatewayError::store_unavailable().into());
    };
    let now_ns = gw.clock.now_ns();
    let now_unix = i64::try_from(now_ns / 1_000_000_000).unwrap_or(i64::MAX);
    let period = quota::period_at(now_unix, account.quota_anchor_day);
    let mut rate = RateHeaders {
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
    // 4. subscription
    if route.require_subscription && account.subscription != Subscription::Active {
        return Err(Refusal {
            error: GatewayError::subscription_inactive(),
            rate: Some(rate),
        });
    }
    // 5. scopes and instances: enforced by route policies (lua-free-policies), not yet declared.
    // 6 and 7. rate limit, then quota, in one store decision; a key the store just refused
    // is refused here until its retry time, at no store cost.
    if let Some((retry_after_ns, reset_after_ns)) =
        gw.directory.rate_blocked(&principal.key.id, now_ns)
    {
        rate.live = Some((0, ceil_secs(reset_after_ns)));
        return Err(Refusal {
            error: GatewayError::rate_limited(ceil_secs(retry_after_ns)),
            rate: Some(rate),
        });
    }
    let period_id = period.id();
    let decision = gw
        .store
        .admit(&AdmitRequest {
            key_id: &principal.key.id,
            account_id: &account.id,
            now_ns,
            bucket: plan.bucket,
            period_id: &period_id,
            period_end_unix: period.end_unix,
            monthly_quota: plan.monthly_requests,
        })
        .await;
    match decision {
        Ok(Admission::Allowed {
            remaining,
            reset_after_ns,
            ..
        }) => {
            rate.live = Some((remaining, ceil_secs(reset_after_ns)));
            Ok((
                Identity {
                    account_id: account.id.clone(),
                    key_id: Some(principal.key.id.clone()),
                    user_id: None,
                },
                rate,
            ))
        }
        Ok(Admission::RateLimited {
            retry_after_ns,
            reset_after_ns,
        }) => {
            // Concurrent refusals not yet given back can inflate the store's retry time, and a
            // truly refused key gets a token within one emission interval: block no longer.
            let block = retry_after_ns.min(plan.bucket.emission_interval_ns());
            gw.directory.block_rate(
                &principal.key.id,
                now_ns.saturating_add(block),
                now_ns.saturating_add(reset_after_ns),
            );
            rate.live = Some((0, ceil_secs(reset_after_ns)));
            Err(Refusal {
                error: GatewayError::rate_limited(ceil_secs(retry_after_ns)),
                rate: Some(rate),
            })
        }
        Ok(Admission::QuotaExceeded {
            remaining,
            reset_after_ns,
            ..
        }) => {
            rate.live = Some((remaining, ceil_secs(reset_after_ns)));
            Err(Refusal {
                error: GatewayError::quota_exceeded(period.seconds_left(now_unix)),
                rate: Some(rate),
            })
        }
        Err(e) => {
            gw.metrics.store_error();
            if route.on_store_error == StoreErrorMode::FailOpen {
                // The caller is known (cached); only the counting is missing. Forward unmetered.
                gw.metrics.fail_open();
                tracing::warn!(error = %e, "limits unavailable; forwarding unmetered (fail_open)");
                return Ok((
                    Identity {
                        account_id: account.id.clone(),
                        key_id: Some(principal.key.id.clone()),
                        user_id: None,
                    },
                    rate,
                ));
            }
            tracing::error!(error = %e, "rate-limit decision failed");
            Err(GatewayError::store_unavailable().into())
        }
    }
}
