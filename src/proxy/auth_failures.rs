//! Failed authentications of one client (SPEC §10), on the public API and the console alike:
//! over `server.auth_failures_per_minute`, a credential not already known here is refused
//! without being looked up or verified, so a flood of guesses stops costing the store (keys)
//! or the CPU (token signatures) anything.

use super::headers::ceil_secs;
use crate::errors::GatewayError;
use crate::gateway::Gateway;
use crate::live::Live;
use std::net::IpAddr;

/// How many clients' failures an IPv6 site (a /48) may add up to: past it, its clients are
/// refused as one over its own limit is, so that a /48's 65,536 /64s do not each get a budget.
pub(crate) const SITE_FACTOR: u32 = 16;

/// One request's view of its client's failures.
pub(crate) struct AuthFailures<'a> {
    gw: &'a Gateway,
    /// The client's limit key (None: not limited, e.g. a trusted proxy without a chain).
    client: Option<IpAddr>,
    /// The IPv6 site the client belongs to, when clients count by a longer prefix.
    site: Option<IpAddr>,
    every_ns: u64,
    burst: u32,
    /// Read when first needed: a credential found in a cache never asks.
    now_ns: std::sync::OnceLock<u64>,
}

impl<'a> AuthFailures<'a> {
    pub(crate) fn new(gw: &'a Gateway, live: &Live, client: Option<IpAddr>) -> Self {
        let per_minute = live.config.server.auth_failures_per_minute;
        let ipv6_prefix = live.config.server.ipv6_prefix;
        Self {
            gw,
            client,
            site: client.and_then(|c| crate::client_ip::site_key(c, ipv6_prefix)),
            every_ns: 60_000_000_000 / u64::from(per_minute.max(1)),
            burst: per_minute,
            now_ns: std::sync::OnceLock::new(),
        }
    }

    /// The site's bucket: `SITE_FACTOR` times the client's, refilled as fast.
    fn site_every_burst(&self) -> (u64, u32) {
        (
            (self.every_ns / u64::from(SITE_FACTOR)).max(1),
            self.burst.saturating_mul(SITE_FACTOR),
        )
    }

    fn now_ns(&self) -> u64 {
        *self.now_ns.get_or_init(|| self.gw.clock.now_ns())
    }

    /// The refusal for a client over its limit, if it is.
    pub(crate) fn refused(&self) -> Option<GatewayError> {
        let client = self.client?;
        let own =
            self.gw
                .auth_failures
                .exhausted(&client, self.now_ns(), self.every_ns, self.burst);
        let site = || {
            let (every_ns, burst) = self.site_every_burst();
            self.site.and_then(|site| {
                self.gw
                    .auth_failures_by_site
                    .exhausted(&site, self.now_ns(), every_ns, burst)
            })
        };
        own.or_else(site)
            .map(|retry_ns| GatewayError::auth_failures_limited(ceil_secs(retry_ns)))
    }

    /// Counts one failure and answers it: `refusal`, or 429 once the client is over its limit.
    pub(crate) fn failed(&self, refusal: GatewayError) -> GatewayError {
        if let Some(refused) = self.refused() {
            return refused;
        }
        if let Some(client) = self.client {
            let _ =
                self.gw
                    .auth_failures
                    .check_every(client, self.now_ns(), self.every_ns, self.burst);
        }
        if let Some(site) = self.site {
            let (every_ns, burst) = self.site_every_burst();
            let _ = self
                .gw
                .auth_failures_by_site
                .check_every(site, self.now_ns(), every_ns, burst);
        }
        refusal
    }
}
