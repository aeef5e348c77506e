//! The reloadable part of a gateway: configuration, policies, routes, upstream pools, JWT keys.
//! Requests take one snapshot at their start, so a reload never changes a request midway.

use crate::auth::jwt::{JwtVerifier, KeyError};
use crate::config::{Config, OwnedNames};
use crate::routing::router::Router;
use crate::routing::upstream::Pool;
use std::sync::Arc;

pub struct Live {
    pub config: Config,
    pub router: Router,
    /// By upstream index.
    pub pools: Vec<Arc<Pool>>,
    pub jwt: JwtVerifier,
    /// Metric label of each route (its prefix), by route index.
    pub labels: Vec<Arc<str>>,
    /// The request headers a client may not send upstream (from `[forward]`).
    pub(crate) owned_headers: OwnedNames,
}

impl Live {
    /// Builds a snapshot; pools whose upstream did not change keep their health state.
    pub fn build(config: Config, previous: Option<&Live>) -> Result<Live, KeyError> {
        let pools = config
            .upstreams
            .iter()
            .map(|u| {
                previous
                    .and_then(|p| p.pools.iter().find(|old| old.serves(u)))
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Pool::new(u)))
            })
            .collect();
        Ok(Live {
            jwt: JwtVerifier::new(&config.jwt)?,
            router: Router::new(&config.routes),
            labels: config
                .routes
                .iter()
                .map(|r| Arc::from(r.prefix.as_str()))
                .collect(),
            pools,
            owned_headers: OwnedNames::new(&config.forward),
            config,
        })
    }

    /// Settings that only a restart applies, named when a reload changes them.
    pub fn restart_only_changes(&self, next: &Config) -> Vec<&'static str> {
        let (a, b) = (&self.config, next);
        let mut changed = Vec::new();
        if a.server.listen != b.server.listen {
            changed.push("server.listen");
        }
        if a.server.threads != b.server.threads {
            changed.push("server.threads");
        }
        if a.server.tls.as_ref().map(|t| t.listen) != b.server.tls.as_ref().map(|t| t.listen) {
            changed.push("server.tls.listen");
        }
        if a.server.header_timeout != b.server.header_timeout {
            changed.push("server.header_timeout");
        }
        if a.server.h2c != b.server.h2c {
            changed.push("server.h2c");
        }
        if a.server.proxy_protocol != b.server.proxy_protocol {
            changed.push("server.proxy_protocol");
        }
        if a.server.tls.as_ref().map(|t| t.proxy_protocol)
            != b.server.tls.as_ref().map(|t| t.proxy_protocol)
        {
            changed.push("server.tls.proxy_protocol");
        }
        if a.admin.listen != b.admin.listen {
            changed.push("admin.listen");
        }
        if a.admin.tls.is_some() != b.admin.tls.is_some() {
            changed.push("admin.tls");
        }
        // Every store setting: the store (its timeout and breaker included) is built once.
        let redis = |s: &crate::config::StoreSettings| {
            s.redis.as_ref().map(|r| {
                (
                    r.url.clone(),
                    r.timeout,
                    r.breaker_threshold,
                    r.breaker_cooldown,
                    r.allow_eviction,
                )
            })
        };
        if a.store.data_file != b.store.data_file || redis(&a.store) != redis(&b.store) {
            changed.push("store");
        }
        if a.cache.capacity != b.cache.capacity
            || a.cache.negative_capacity != b.cache.negative_capacity
            || a.cache.ttl != b.cache.ttl
        {
            changed.push("cache");
        }
        if a.echo != b.echo {
            changed.push("echo");
        }
        if a.log != b.log {
            changed.push("log");
        }
        changed
    }
}
