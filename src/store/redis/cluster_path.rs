//! The request path on a Redis Cluster: the slot map read with `CLUSTER SLOTS`, one pipelined
//! [`RequestPath`] per primary, a pipeline sent to the owner of its first key's slot (all keys
//! of one call share a hash tag). The map is read again on `MOVED`, and after a call fails as an
//! outage, every [`REFRESH_EVERY`] until one succeeds (bounded): a failover is followed as soon
//! as the cluster has promoted a replica.

use super::link::LinkError;
use super::request_path::{RequestPath, Target};
use super::resp::{Arg, Commands, Reply};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the slot map is read again while calls fail, at most.
const REFRESH_EVERY: Duration = Duration::from_millis(100);
/// How many reads in a row one failure starts (a minute), before waiting for the next failure.
const REFRESH_ATTEMPTS: u32 = 600;
/// How long one node may take to answer `CLUSTER SLOTS`.
const ASK_TIMEOUT: Duration = Duration::from_millis(500);
const SLOTS: u16 = 16_384;

/// The hash slot of a key: CRC16 (XMODEM) of its hash tag (the text between the first `{` and
/// the next `}`, when not empty) or of the whole key, modulo 16384.
pub(super) fn slot_of(key: &[u8]) -> u16 {
    let tag = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .map(|close| &rest[..close])
        })
        .filter(|t| !t.is_empty())
        .unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(tag) % SLOTS
}

/// Which primary serves each slot: sorted, non-overlapping ranges.
#[derive(Default, Debug, PartialEq)]
pub(super) struct SlotMap {
    ranges: Vec<(u16, u16, Arc<str>)>,
}

impl SlotMap {
    fn owner(&self, slot: u16) -> Option<&Arc<str>> {
        let i = self.ranges.partition_point(|(_, end, _)| *end < slot);
        self.ranges
            .get(i)
            .filter(|(start, _, _)| *start <= slot)
            .map(|(_, _, node)| node)
    }

    /// Reads a `CLUSTER SLOTS` reply; `answered_by` names the node's host for entries that
    /// leave it empty.
    pub(super) fn from_reply(reply: &Reply, answered_by: &str) -> Option<SlotMap> {
        let Reply::Array(entries) = reply else {
            return None;
        };
        let mut ranges = Vec::with_capacity(entries.len());
        for entry in entries {
            let Reply::Array(fields) = entry else {
                continue;
            };
            let (Some(Reply::Int(start)), Some(Reply::Int(end)), Some(Reply::Array(primary))) =
                (fields.first(), fields.get(1), fields.get(2))
            else {
                continue;
            };
            let host = match primary.first() {
                Some(Reply::Bulk(h)) if h.as_slice() == b"?" => continue,
                Some(Reply::Bulk(h)) if !h.is_empty() => String::from_utf8_lossy(h).into_owned(),
                _ => answered_by.to_owned(),
            };
            let Some(Reply::Int(port)) = primary.get(1) else {
                continue;
            };
            let (Ok(start), Ok(end), Ok(port)) = (
                u16::try_from(*start),
                u16::try_from(*end),
                u16::try_from(*port),
            ) else {
                continue;
            };
            let node = if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            ranges.push((start.min(end), end, Arc::from(node)));
        }
        ranges.sort_by_key(|(start, _, _)| *start);
        (!ranges.is_empty()).then_some(SlotMap { ranges })
    }

    fn nodes(&self) -> impl Iterator<Item = &Arc<str>> {
        self.ranges.iter().map(|(_, _, n)| n)
    }
}

/// The cluster's request path.
pub(super) struct ClusterPath {
    /// The URL's seed nodes, and how to log in to any node.
    seeds: Vec<Target>,
    map: ArcSwap<SlotMap>,
    nodes: parking_lot::Mutex<HashMap<Arc<str>, Arc<RequestPath>>>,
    refreshing: AtomicBool,
    /// Set by a failed call, cleared by a successful one: the refresh loop runs while set.
    failing: AtomicBool,
    last_refresh: parking_lot::Mutex<Option<Instant>>,
}

impl ClusterPath {
    pub(super) fn new(seeds: Vec<Target>) -> Arc<Self> {
        Arc::new(Self {
            seeds,
            map: ArcSwap::from_pointee(SlotMap::default()),
            nodes: parking_lot::Mutex::default(),
            refreshing: AtomicBool::new(false),
            failing: AtomicBool::new(false),
            last_refresh: parking_lot::Mutex::new(None),
        })
    }

    /// Sends `commands` to the owner of their first key's slot; on `MOVED`, once more to the
    /// node it names (a `MOVED` reply means the node ran nothing of the pipeline: every key of
    /// it is in the same slot).
    pub(super) async fn call(
        self: &Arc<Self>,
        commands: &Commands,
        deadline: Duration,
    ) -> Result<Vec<Reply>, LinkError> {
        let r = self.route(commands, deadline).await;
        match &r {
            Err(e) if e.is_outage() => self.failed(),
            Ok(_) if self.failing.load(Ordering::Relaxed) => {
                self.failing.store(false, Ordering::Relaxed)
            }
            _ => {}
        }
        r
    }

    async fn route(
        self: &Arc<Self>,
        commands: &Commands,
        deadline: Duration,
    ) -> Result<Vec<Reply>, LinkError> {
        let started = Instant::now();
        let slot = slot_of(commands.first_key().unwrap_or_default());
        if self.map.load().ranges.is_empty() {
            self.refresh_now(deadline).await;
        }
        let Some(owner) = self.map.load().owner(slot).cloned() else {
            return Err(LinkError::NotSent("no node serves the key's slot".into()));
        };
        let r = self.node(&owner)?.call(commands, deadline).await;
        let moved_to = match &r {
            Err(LinkError::Server(e)) if e.code() == "MOVED" => {
                e.0.split(' ').nth(2).map(|to| match to.strip_prefix(':') {
                    // `MOVED <slot> :<port>`: the same host as the node that answered.
                    Some(port) => Arc::from(format!("{}:{port}", split_host_port(&owner).0)),
                    None => Arc::from(to),
                })
            }
            _ => None,
        };
        match moved_to {
            Some(to) => {
                self.failed();
                let left = deadline.saturating_sub(started.elapsed());
                self.node(&to)?.call(commands, left).await
            }
            None => r,
        }
    }

    /// The node's connection, made on first use.
    fn node(&self, addr: &Arc<str>) -> Result<Arc<RequestPath>, LinkError> {
        let mut nodes = self.nodes.lock();
        if let Some(n) = nodes.get(addr) {
            return Ok(n.clone());
        }
        let (host, port) = split_host_port(addr);
        let Some(like) = self.seeds.first() else {
            return Err(LinkError::NotSent("no cluster seed".into()));
        };
        let path = Arc::new(RequestPath::new(like.with_address(host, port)));
        nodes.insert(addr.clone(), path.clone());
        Ok(path)
    }

    /// A call failed: reads the slot map again in the background, every [`REFRESH_EVERY`],
    /// until it names other owners or a call succeeds (at most [`REFRESH_ATTEMPTS`] times).
    fn failed(self: &Arc<Self>) {
        self.failing.store(true, Ordering::Relaxed);
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let cluster = self.clone();
        tokio::spawn(async move {
            let before = cluster.map.load_full();
            for _ in 0..REFRESH_ATTEMPTS {
                let wait = cluster.last_refresh.lock().map_or(Duration::ZERO, |at| {
                    REFRESH_EVERY.saturating_sub(at.elapsed())
                });
                tokio::time::sleep(wait).await;
                cluster.refresh_now(ASK_TIMEOUT).await;
                if *cluster.map.load_full() != *before || !cluster.failing.load(Ordering::Relaxed) {
                    break;
                }
            }
            cluster.refreshing.store(false, Ordering::Release);
        });
    }

    /// Reads `CLUSTER SLOTS` from the known primaries, then the seeds, until one answers.
    pub(super) async fn refresh_now(&self, deadline: Duration) {
        *self.last_refresh.lock() = Some(Instant::now());
        let mut ask = Commands::new();
        ask.push(&[Arg::Str("CLUSTER"), Arg::Str("SLOTS")]);
        let mut known: Vec<Arc<str>> = self.map.load().nodes().cloned().collect();
        known.sort();
        known.dedup();
        let mut candidates: Vec<Target> = Vec::new();
        if let Some(like) = self.seeds.first() {
            for addr in known {
                let (host, port) = split_host_port(&addr);
                candidates.push(like.with_address(host, port));
            }
        }
        candidates.extend(self.seeds.iter().cloned());
        for target in candidates {
            let host = target.host().to_owned();
            // A connection of its own, closed when dropped.
            let asked = RequestPath::new(target);
            let answer = tokio::time::timeout(deadline, asked.call(&ask, deadline)).await;
            if let Ok(Ok(replies)) = answer {
                if let Some(map) = replies.first().and_then(|r| SlotMap::from_reply(r, &host)) {
                    self.install(map);
                    return;
                }
            }
        }
        tracing::debug!("no Redis Cluster node answered CLUSTER SLOTS");
    }

    /// Puts `map` in place and forgets connections to nodes it no longer names.
    fn install(&self, map: SlotMap) {
        if *self.map.load_full() == map {
            return;
        }
        let mut nodes = self.nodes.lock();
        nodes.retain(|addr, _| map.nodes().any(|n| n == addr));
        tracing::info!(ranges = map.ranges.len(), "Redis Cluster slot map read");
        self.map.store(Arc::new(map));
    }
}

fn split_host_port(addr: &str) -> (&str, u16) {
    match addr.rsplit_once(':') {
        Some((host, port)) => (
            host.trim_start_matches('[').trim_end_matches(']'),
            port.parse().unwrap_or(6379),
        ),
        None => (addr, 6379),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_hash_tag() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(
            crc16::State::<crc16::XMODEM>::calculate(b"123456789"),
            0x31C3
        );
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(
            slot_of(b"mf:{a:acme}:tat:k1"),
            slot_of(b"mf:{a:acme}:q:2026-11")
        );
        // The specification's edge cases: an empty tag hashes the whole key; the tag ends at
        // the first `}` after the first `{`.
        let whole = |k: &[u8]| crc16::State::<crc16::XMODEM>::calculate(k) % SLOTS;
        assert_eq!(slot_of(b"foo{}{bar}"), whole(b"foo{}{bar}"));
        assert_ne!(slot_of(b"foo{}{bar}"), slot_of(b"bar"));
        assert_eq!(slot_of(b"foo{{bar}}zap"), whole(b"{bar"));
        assert_eq!(slot_of(b"foo{bar}{zap}"), whole(b"bar"));
    }

    #[test]
    fn the_slot_map_names_each_slots_primary() {
        let node = |h: &str, p: i64| {
            Reply::Array(vec![
                Reply::Bulk(h.as_bytes().to_vec()),
                Reply::Int(p),
                Reply::Bulk(b"id".to_vec()),
            ])
        };
        let reply = Reply::Array(vec![
            Reply::Array(vec![
                Reply::Int(5461),
                Reply::Int(10922),
                node("10.0.0.2", 7001),
                node("10.0.0.5", 7004),
            ]),
            Reply::Array(vec![Reply::Int(0), Reply::Int(5460), node("", 7000)]),
            Reply::Array(vec![Reply::Int(10923), Reply::Int(16383), node("?", 7002)]),
        ]);
        let map = SlotMap::from_reply(&reply, "10.0.0.1").expect("map");
        assert_eq!(map.owner(0).map(|n| &**n), Some("10.0.0.1:7000"));
        assert_eq!(map.owner(5460).map(|n| &**n), Some("10.0.0.1:7000"));
        assert_eq!(map.owner(5461).map(|n| &**n), Some("10.0.0.2:7001"));
        assert_eq!(map.owner(10922).map(|n| &**n), Some("10.0.0.2:7001"));
        // An unknown primary ("?") serves nothing: its slots have no owner.
        assert_eq!(map.owner(10923), None);
        assert_eq!(map.owner(16383), None);
        assert_eq!(SlotMap::from_reply(&Reply::Int(1), "x"), None);
    }
}
