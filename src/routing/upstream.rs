//! Upstream pools: round-robin over healthy addresses, active TCP health checks, passive failures.

use crate::config::{HealthCheck, Upstream, UpstreamTls};
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::utils::tls::{parse_x509, WrappedX509};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// One address and what is known about its health.
struct Member {
    addr: SocketAddr,
    healthy: AtomicBool,
    failures: AtomicU32,
    successes: AtomicU32,
}

/// The addresses of one upstream.
pub struct Pool {
    pub name: String,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    health: Option<HealthCheck>,
    members: Vec<Member>,
    next: AtomicUsize,
    /// TLS to the members, when on: as configured, and the CA list in pingora's form.
    tls: Option<UpstreamTls>,
    ca: Option<Arc<pingora::protocols::tls::CaType>>,
    /// A digest of the CA certificates (0 without a CA file).
    ca_key: u64,
}

impl Pool {
    pub fn new(u: &Upstream) -> Self {
        Self {
            name: u.name.clone(),
            connect_timeout: u.connect_timeout,
            read_timeout: u.read_timeout,
            health: u.health_check,
            members: u
                .addresses
                .iter()
                .map(|addr| Member {
                    addr: *addr,
                    healthy: AtomicBool::new(true),
                    failures: AtomicU32::new(0),
                    successes: AtomicU32::new(0),
                })
                .collect(),
            next: AtomicUsize::new(0),
            ca: u.tls.as_ref().and_then(|t| t.ca.as_ref()).map(|certs| {
                certs
                    .iter()
                    // Parsed once already by the configuration (load_ca_bundle): no panic here.
                    .map(|der| WrappedX509::new(der.to_vec(), parse_x509))
                    .collect::<Vec<_>>()
                    .into()
            }),
            ca_key: u
                .tls
                .as_ref()
                .and_then(|t| t.ca.as_ref())
                .map_or(0, |certs| {
                    use sha2::Digest;
                    let mut h = sha2::Sha256::new();
                    for c in certs {
                        h.update(c.as_ref());
                    }
                    let d = h.finalize();
                    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
                }),
            tls: u.tls.clone(),
        }
    }

    /// The name to send and verify, the CA list, and a key that keeps connections verified
    /// against one CA list from being reused for another (pingora's pool key has SNI, not the
    /// CA), when the members speak TLS.
    pub fn tls(&self) -> Option<(&str, Option<&Arc<pingora::protocols::tls::CaType>>, u64)> {
        self.tls
            .as_ref()
            .map(|t| (t.sni.as_str(), self.ca.as_ref(), self.ca_key))
    }

    /// True when this pool was built from an identical upstream definition.
    pub fn serves(&self, u: &Upstream) -> bool {
        self.name == u.name
            && self.connect_timeout == u.connect_timeout
            && self.read_timeout == u.read_timeout
            && self.health.map(|h| {
                (
                    h.interval,
                    h.timeout,
                    h.unhealthy_threshold,
                    h.healthy_threshold,
                )
            }) == u.health_check.map(|h| {
                (
                    h.interval,
                    h.timeout,
                    h.unhealthy_threshold,
                    h.healthy_threshold,
                )
            })
            && self.tls == u.tls
            && self
                .members
                .iter()
                .map(|m| m.addr)
                .eq(u.addresses.iter().copied())
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Next healthy address in round-robin order, skipping those in `tried` (bit i = member i).
    pub fn pick(&self, tried: u64) -> Option<(usize, SocketAddr)> {
        let n = self.members.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| {
                let untried = i >= 64 || tried & (1u64 << i) == 0;
                untried && self.members[i].healthy.load(Ordering::Relaxed)
            })
            .map(|i| (i, self.members[i].addr))
    }

    /// Records the outcome of a connection attempt or health probe to member `i`.
    /// The address of member `i`.
    pub fn address(&self, i: usize) -> Option<SocketAddr> {
        self.members.get(i).map(|m| m.addr)
    }

    pub fn report(&self, i: usize, ok: bool) {
        let Some(m) = self.members.get(i) else { return };
        let (unhealthy_after, healthy_after) = self
            .health
            .map_or((1, 1), |h| (h.unhealthy_threshold, h.healthy_threshold));
        if ok {
            m.failures.store(0, Ordering::Relaxed);
            let s = m.successes.fetch_add(1, Ordering::Relaxed) + 1;
            if s >= healthy_after && !m.healthy.swap(true, Ordering::Relaxed) {
                tracing::info!(upstream = %self.name, addr = %m.addr, "upstream address healthy again");
            }
        } else {
            m.successes.store(0, Ordering::Relaxed);
            let f = m.failures.fetch_add(1, Ordering::Relaxed) + 1;
            // Without active checks a failed address is never marked down: nothing would bring it back.
            if self.health.is_some()
                && f >= unhealthy_after
                && m.healthy.swap(false, Ordering::Relaxed)
            {
                tracing::warn!(upstream = %self.name, addr = %m.addr, "upstream address marked unhealthy");
            }
        }
    }

    /// True when some address is considered healthy (what [`Pool::pick`] can give).
    pub fn has_healthy(&self) -> bool {
        self.members
            .iter()
            .any(|m| m.healthy.load(Ordering::Relaxed))
    }

    /// Number of addresses currently considered healthy.
    pub fn healthy_count(&self) -> usize {
        self.members
            .iter()
            .filter(|m| m.healthy.load(Ordering::Relaxed))
            .count()
    }
}

/// The pools in force now (read from the current snapshot each round, so reloads are followed).
pub(crate) type CurrentPools = Box<dyn Fn() -> Vec<Arc<Pool>> + Send + Sync>;

/// Probes every address of every pool that has a health check, by TCP connect.
pub(crate) struct HealthChecker {
    pub(crate) pools: CurrentPools,
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            let pools = (self.pools)();
            let checked: Vec<(&Arc<Pool>, HealthCheck)> = pools
                .iter()
                .filter_map(|p| p.health.map(|h| (p, h)))
                .collect();
            let interval = checked
                .iter()
                .map(|(_, h)| h.interval)
                .min()
                .unwrap_or(Duration::from_secs(5))
                .max(Duration::from_millis(50));
            for (pool, h) in &checked {
                for (i, m) in pool.members.iter().enumerate() {
                    let probe =
                        tokio::time::timeout(h.timeout, tokio::net::TcpStream::connect(m.addr))
                            .await;
                    pool.report(i, matches!(probe, Ok(Ok(_))));
                }
            }
            drop(checked);
            drop(pools);
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: u16, health: bool) -> Pool {
        Pool::new(&Upstream {
            name: "u".into(),
            addresses: (0..n)
                .map(|i| SocketAddr::from(([127, 0, 0, 1], 1000 + i)))
                .collect(),
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(1),
            health_check: health.then_some(HealthCheck {
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                unhealthy_threshold: 2,
                healthy_threshold: 1,
            }),
            tls: None,
            host: None,
        })
    }

    #[test]
    fn round_robin_skips_tried_and_unhealthy() {
        let p = pool(3, true);
        let picks: Vec<usize> = (0..3).map(|_| p.pick(0).unwrap().0).collect();
        assert_eq!(picks, [0, 1, 2]);
        p.report(1, false);
        assert_eq!(p.healthy_count(), 3, "one failure is below the threshold");
        p.report(1, false);
        assert_eq!(p.healthy_count(), 2);
        for _ in 0..6 {
            assert_ne!(p.pick(0).unwrap().0, 1);
        }
        assert_eq!(p.pick(0b101), None);
        p.report(1, true);
        assert_eq!(p.pick(0b101).unwrap().0, 1);
    }

    #[test]
    fn without_health_checks_addresses_stay_in_rotation() {
        let p = pool(2, false);
        p.report(0, false);
        p.report(0, false);
        assert_eq!(p.healthy_count(), 2);
    }
}
