//! Caps on concurrent connections, globally and per client address: a connection over a cap is
//! closed at accept (a TLS one before its handshake). The table holds only addresses with open
//! connections, so it is bounded by the global cap. At the global cap, a connection kept alive
//! idle between requests gives its place to the new one and is closed (nginx's reusable
//! connections): idle connections cannot keep out those that have something to ask.

use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use pingora::protocols::UniqueIDType;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Which cap refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Over {
    Global,
    PerClient,
}

impl Over {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Global => "global",
            Self::PerClient => "per_client",
        }
    }
}

/// The open connections, in all and per client address.
#[derive(Debug, Default)]
pub(crate) struct Connections {
    open: Mutex<Open>,
    refused_global: AtomicU64,
    refused_per_client: AtomicU64,
    /// Connections closed because their PROXY protocol header was refused.
    refused_proxy_header: AtomicU64,
    /// Idle connections whose place went to a new one at the global cap.
    reclaimed: AtomicU64,
    /// Connections idle now: no search for one when there is none.
    idle: Arc<AtomicUsize>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
    /// Each open connection's handle and client, by slot; `free` slots are reused.
    tracked: Vec<Option<(Arc<Reclaim>, Option<IpAddr>)>>,
    free: Vec<usize>,
    /// Where the next search for an idle connection starts.
    cursor: usize,
}

/// A connection's state as the table sees it.
const BUSY: u8 = 0;
/// Blocked reading the next request's head with nothing read of it (after a request ended).
const IDLE: u8 = 1;
/// Its place went to another connection: it closes at its next read.
const RELEASED: u8 = 2;

/// What the table and a connection share: whether the connection waits idle between requests
/// (set by the connection only while it is blocked on a read with nothing buffered), and
/// whether its place was given to another (set by the table, which then wakes it so that it
/// closes). Exactly one side wins a race: the table takes only an idle connection, and a
/// connection that reads a byte leaves idle first or closes.
#[derive(Debug)]
pub(crate) struct Reclaim {
    state: AtomicU8,
    waker: AtomicWaker,
    idle_count: Arc<AtomicUsize>,
}

impl Reclaim {
    /// The connection is blocked reading with nothing buffered, after a request: its place may
    /// be given away, and `waker` woken when it is. `false` when it already was (it must close).
    pub(crate) fn wait_idle(&self, waker: &std::task::Waker) -> bool {
        self.waker.register(waker);
        matches!(self.shift(BUSY, IDLE), Ok(()) | Err(IDLE))
    }

    /// The connection read something: it is busy again, or `false` when its place was given
    /// away meanwhile (it must close, whatever came).
    pub(crate) fn wake_busy(&self) -> bool {
        matches!(self.shift(IDLE, BUSY), Ok(()) | Err(BUSY))
    }

    /// Moves the state from `from` to `to`, keeping the count of idle connections; `Err` with
    /// the state found when it was another.
    fn shift(&self, from: u8, to: u8) -> Result<(), u8> {
        self.state
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)?;
        if to == IDLE {
            self.idle_count.fetch_add(1, Ordering::Relaxed);
        } else if from == IDLE {
            self.idle_count.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Whether the place was given away.
    pub(crate) fn released(&self) -> bool {
        self.state.load(Ordering::Acquire) == RELEASED
    }
}

impl Open {
    /// Gives the place of an idle connection back (the connection is woken, to close), when
    /// `idle` says there is one: a search of the table, under its lock, only then.
    fn reclaim_idle(&mut self, idle: &AtomicUsize) -> bool {
        if idle.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let n = self.tracked.len();
        for step in 0..n {
            let i = (self.cursor + step) % n;
            let Some((reclaim, _)) = &self.tracked[i] else {
                continue;
            };
            if reclaim.shift(IDLE, RELEASED).is_err() {
                continue;
            }
            let Some((reclaim, client)) = self.tracked[i].take() else {
                continue;
            };
            self.free.push(i);
            self.cursor = (i + 1) % n;
            self.release(client);
            reclaim.waker.wake();
            return true;
        }
        false
    }

    /// One connection of `client` fewer.
    fn release(&mut self, client: Option<IpAddr>) {
        self.total = self.total.saturating_sub(1);
        if let Some(ip) = client {
            if let Some(n) = self.per_client.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_client.remove(&ip);
                }
            }
        }
    }
}

/// One admitted connection; dropping it (the connection closed) gives its place back, unless
/// the table took it back already.
#[derive(Debug)]
pub(crate) struct Permit {
    connections: Arc<Connections>,
    /// The address counted against the per-client cap (none for exempt peers).
    client: Option<IpAddr>,
    slot: usize,
    reclaim: Arc<Reclaim>,
}

impl Connections {
    /// Admits a connection from `client` (None: exempt from the per-client cap) when both caps
    /// have room; at the global cap, in the place of an idle connection when `may_reclaim`
    /// (a connection whose client is known) and the per-client cap has room.
    pub(crate) fn admit(
        self: &Arc<Self>,
        client: Option<IpAddr>,
        max_total: usize,
        max_per_client: usize,
        may_reclaim: bool,
    ) -> Result<Permit, Over> {
        let refused = |over: Over| {
            match over {
                Over::Global => &self.refused_global,
                Over::PerClient => &self.refused_per_client,
            }
            .fetch_add(1, Ordering::Relaxed);
            Err(over)
        };
        let mut open = self.open.lock();
        if open.total >= max_total {
            let client_has_room = client
                .is_none_or(|ip| open.per_client.get(&ip).copied().unwrap_or(0) < max_per_client);
            if !(may_reclaim && client_has_room && open.reclaim_idle(&self.idle)) {
                return refused(Over::Global);
            }
            self.reclaimed.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(ip) = client {
            let n = open.per_client.entry(ip).or_insert(0);
            if *n >= max_per_client {
                if *n == 0 {
                    open.per_client.remove(&ip);
                }
                return refused(Over::PerClient);
            }
            *n += 1;
        }
        open.total += 1;
        let reclaim = Arc::new(Reclaim {
            state: AtomicU8::new(BUSY),
            waker: AtomicWaker::new(),
            idle_count: self.idle.clone(),
        });
        let entry = Some((reclaim.clone(), client));
        let slot = match open.free.pop() {
            Some(i) => {
                open.tracked[i] = entry;
                i
            }
            None => {
                open.tracked.push(entry);
                open.tracked.len() - 1
            }
        };
        Ok(Permit {
            connections: self.clone(),
            client,
            slot,
            reclaim,
        })
    }

    /// Connections waiting idle between requests now.
    pub(crate) fn idle(&self) -> usize {
        self.idle.load(Ordering::Relaxed)
    }

    /// Idle connections closed to give their place to a new one.
    pub(crate) fn reclaimed(&self) -> u64 {
        self.reclaimed.load(Ordering::Relaxed)
    }

    /// Open connections in all.
    pub(crate) fn open(&self) -> usize {
        self.open.lock().total
    }

    /// Counts a connection closed for its PROXY protocol header.
    pub(crate) fn proxy_header_refused(&self) {
        self.refused_proxy_header.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections closed for their PROXY protocol header.
    pub(crate) fn proxy_headers_refused(&self) -> u64 {
        self.refused_proxy_header.load(Ordering::Relaxed)
    }

    /// Connections closed at accept: `[(cap, count)]`.
    pub(crate) fn refused(&self) -> [(&'static str, u64); 2] {
        [
            (
                Over::Global.as_str(),
                self.refused_global.load(Ordering::Relaxed),
            ),
            (
                Over::PerClient.as_str(),
                self.refused_per_client.load(Ordering::Relaxed),
            ),
        ]
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut open = self.connections.open.lock();
        // Released under this lock: the place (and the slot) went to another connection.
        if self.reclaim.released() {
            return;
        }
        // Closed while idle (a keep-alive timeout, the client gone): no longer idle.
        let _ = self.reclaim.shift(IDLE, BUSY);
        open.release(self.client);
        open.tracked[self.slot] = None;
        open.free.push(self.slot);
    }
}

/// A place under the caps, whatever holds it (a [`Permit`], or a test's stand-in), and what
/// the table may ask of the connection that holds it.
#[derive(Debug)]
pub(crate) struct HeldPlace {
    _held: Box<dyn std::fmt::Debug + Send + Sync>,
    pub(crate) reclaim: Option<Arc<Reclaim>>,
}

impl HeldPlace {
    /// A place the table never takes back (a test's stand-in).
    #[cfg(test)]
    pub(crate) fn fixed(held: impl std::fmt::Debug + Send + Sync + 'static) -> Self {
        Self {
            _held: Box::new(held),
            reclaim: None,
        }
    }
}

impl From<Permit> for HeldPlace {
    fn from(permit: Permit) -> Self {
        Self {
            reclaim: Some(permit.reclaim.clone()),
            _held: Box::new(permit),
        }
    }
}

/// Places TLS connections took before their handshakes (pingora handshakes before the
/// application sees a stream), waiting by descriptor for the streams the handshakes yield.
/// Each is reserved as long as pingora lets a handshake take: a handshake that fails closes
/// its socket, and its place is swept once its descriptor no longer holds that socket (on
/// Linux, where `/proc/self/fd` tells; elsewhere when the reservation runs out), or replaced
/// when the descriptor is reused.
#[derive(Debug)]
pub(crate) struct Handshaking {
    pending: Mutex<Pending>,
    probe: Probe,
}

/// What socket a descriptor holds now, if that can be told: None when it is closed.
type Probe = fn(UniqueIDType) -> Option<u64>;

impl Default for Handshaking {
    fn default() -> Self {
        Self {
            pending: Mutex::default(),
            probe: socket_inode,
        }
    }
}

/// The inode of the socket descriptor `fd` holds (`/proc/self/fd/{fd}` reads `socket:[N]`).
fn socket_inode(fd: UniqueIDType) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    link.to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

#[derive(Debug, Default)]
struct Pending {
    /// Each place, until when it is reserved, and the socket its descriptor held then.
    by_id: HashMap<UniqueIDType, (Instant, HeldPlace, Option<u64>)>,
    swept: Option<Instant>,
}

impl Handshaking {
    /// Drops the places whose reservation has run out or whose socket is gone (at most once a
    /// second): called before any connection is admitted, so that places left by failed
    /// handshakes never refuse one for long.
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        let mut pending = self.pending.lock();
        if pending.by_id.is_empty()
            || pending
                .swept
                .is_some_and(|at| now.duration_since(at) < Duration::from_secs(1))
        {
            return;
        }
        pending.swept = Some(now);
        pending.by_id.retain(|_, (until, _, _)| now < *until);
        // Which sockets are gone is asked outside the lock (a descriptor each): admissions on
        // the other workers do not wait on it.
        let watched: Vec<(UniqueIDType, u64)> = pending
            .by_id
            .iter()
            .filter_map(|(id, (_, _, socket))| socket.map(|s| (*id, s)))
            .collect();
        drop(pending);
        let gone: Vec<(UniqueIDType, u64)> = watched
            .into_iter()
            .filter(|(id, socket)| (self.probe)(*id) != Some(*socket))
            .collect();
        if gone.is_empty() {
            return;
        }
        let mut pending = self.pending.lock();
        for (id, socket) in gone {
            // Unless a new connection took the descriptor meanwhile.
            if pending
                .by_id
                .get(&id)
                .is_some_and(|(_, _, s)| *s == Some(socket))
            {
                pending.by_id.remove(&id);
            }
        }
    }

    /// Keeps `permit` for the connection `id` until its handshake ends: for at most `reserved`
    /// while its socket can be watched, else (no `/proc`) for at most `blind`.
    pub(crate) fn hold(
        &self,
        id: UniqueIDType,
        permit: HeldPlace,
        reserved: Duration,
        blind: Duration,
    ) {
        // A descriptor reused: the connection it was is closed, and its place with it.
        let socket = (self.probe)(id);
        let until = Instant::now() + if socket.is_some() { reserved } else { blind };
        self.pending
            .lock()
            .by_id
            .insert(id, (until, permit, socket));
    }

    /// The place taken for connection `id` before its handshake, if one is still reserved.
    pub(crate) fn take(&self, id: UniqueIDType) -> Option<HeldPlace> {
        let (until, place, _) = self.pending.lock().by_id.remove(&id)?;
        (Instant::now() < until).then_some(place)
    }

    /// How many places wait for handshakes.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.pending.lock().by_id.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_and_places_come_back_on_drop() {
        let c = Arc::new(Connections::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = c.admit(Some(a), 3, 2, true).unwrap();
        let _a2 = c.admit(Some(a), 3, 2, true).unwrap();
        assert_eq!(c.admit(Some(a), 3, 2, true).unwrap_err(), Over::PerClient);
        let b1 = c.admit(Some(b), 3, 2, true).unwrap();
        assert_eq!(c.admit(None, 3, 2, true).unwrap_err(), Over::Global);
        drop(a1);
        let _a3 = c.admit(Some(a), 3, 2, true).unwrap();
        drop(b1);
        // An exempt peer counts toward the global cap only.
        let _p = c.admit(None, 3, 2, true).unwrap();
        assert_eq!(c.open(), 3);
        assert_eq!(c.open.lock().per_client.len(), 1);
        assert_eq!(c.admit(Some(b), 3, 0, true).unwrap_err(), Over::Global);
        assert_eq!(c.admit(Some(b), 4, 0, true).unwrap_err(), Over::PerClient);
        assert_eq!(
            c.open.lock().per_client.len(),
            1,
            "a refused address leaves nothing"
        );
        assert_eq!(c.refused(), [("global", 2), ("per_client", 2)]);
    }

    /// At the global cap an idle connection's place goes to the new one, once; a busy one
    /// keeps its place; a connection that reads first stays; the counts stay exact.
    #[test]
    fn an_idle_connection_gives_its_place_at_the_global_cap() {
        let c = Arc::new(Connections::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let waker = futures_util::task::noop_waker();
        let a1 = c.admit(Some(a), 2, 5, true).unwrap();
        let b1 = c.admit(Some(b), 2, 5, true).unwrap();
        assert_eq!(c.admit(Some(b), 2, 5, true).unwrap_err(), Over::Global);
        // Idle, then busy again before anyone came: nothing to take.
        assert!(a1.reclaim.wait_idle(&waker));
        assert!(a1.reclaim.wake_busy());
        assert_eq!(c.admit(Some(b), 2, 5, true).unwrap_err(), Over::Global);
        assert!(a1.reclaim.wait_idle(&waker));
        // Not for a place that may not reclaim, nor for a client at its own cap.
        assert_eq!(c.admit(None, 2, 5, false).unwrap_err(), Over::Global);
        assert_eq!(c.admit(Some(b), 2, 1, true).unwrap_err(), Over::Global);
        assert!(!a1.reclaim.released());
        let b2 = c.admit(Some(b), 2, 5, true).unwrap();
        assert!(a1.reclaim.released(), "the idle one gave its place");
        assert!(!a1.reclaim.wake_busy(), "and closes whatever comes");
        assert!(!a1.reclaim.wait_idle(&waker));
        assert!(!b1.reclaim.released());
        assert_eq!(c.open(), 2);
        assert_eq!(c.open.lock().per_client.get(&a), None);
        assert_eq!(c.open.lock().per_client.get(&b), Some(&2));
        assert_eq!(c.idle.load(Ordering::Relaxed), 0);
        // Its place is gone already: closing it gives back nothing.
        drop(a1);
        assert_eq!(c.open(), 2);
        assert_eq!(c.admit(Some(a), 2, 5, true).unwrap_err(), Over::Global);
        // One closed while idle leaves the idle count as it found it.
        assert!(b2.reclaim.wait_idle(&waker));
        drop(b2);
        assert_eq!(c.idle.load(Ordering::Relaxed), 0);
        let _a2 = c.admit(Some(a), 2, 5, true).unwrap();
        assert_eq!(c.open(), 2);
        assert_eq!(c.reclaimed(), 1);
        assert_eq!(c.refused(), [("global", 5), ("per_client", 0)]);
    }

    #[derive(Debug)]
    struct Place;

    /// Runs `test` on a `Handshaking` that asks `probe` about sockets, with tokio's clock
    /// paused (advanced by the test alone).
    fn with_paused_clock<F: std::future::Future<Output = ()>>(
        probe: Probe,
        test: impl FnOnce(Handshaking) -> F,
    ) {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
            .block_on(test(Handshaking {
                pending: Mutex::default(),
                probe,
            }));
    }

    #[test]
    fn places_wait_by_descriptor_and_lapsed_ones_are_swept() {
        with_paused_clock(
            |_| None,
            |h| async move {
                let ten = Duration::from_secs(10);
                h.hold(7, HeldPlace::fixed(Place), ten, ten);
                h.hold(8, HeldPlace::fixed(Place), ten, ten);
                assert_eq!(h.waiting(), 2);
                assert!(h.take(7).is_some());
                assert!(h.take(7).is_none(), "taken once");
                // A reused descriptor replaces its place.
                h.hold(8, HeldPlace::fixed(Place), ten, ten);
                assert_eq!(h.waiting(), 1);
                h.sweep();
                assert_eq!(h.waiting(), 1, "still reserved");
                tokio::time::advance(ten).await;
                h.hold(9, HeldPlace::fixed(Place), ten, ten);
                h.sweep();
                assert_eq!(h.waiting(), 1, "the reservation of 8 ran out");
                h.sweep();
                tokio::time::advance(ten).await;
                assert!(h.take(9).is_none(), "a lapsed place is not handed out");
            },
        );
    }

    /// The socket each fake descriptor holds: 0 for none (closed).
    static SOCKETS: [std::sync::atomic::AtomicU64; 4] =
        [const { std::sync::atomic::AtomicU64::new(0) }; 4];

    fn fake_socket(fd: UniqueIDType) -> Option<u64> {
        let socket = SOCKETS[usize::try_from(fd).ok()?].load(std::sync::atomic::Ordering::Relaxed);
        (socket != 0).then_some(socket)
    }

    #[test]
    fn a_place_goes_when_its_socket_does() {
        use std::sync::atomic::Ordering::Relaxed;
        with_paused_clock(fake_socket, |h| async move {
            let minute = Duration::from_secs(60);
            SOCKETS[1].store(11, Relaxed);
            SOCKETS[2].store(12, Relaxed);
            h.hold(1, HeldPlace::fixed(Place), minute, minute);
            h.hold(2, HeldPlace::fixed(Place), minute, minute);
            // The handshake on 1 failed: its socket closed, and 2's descriptor now holds
            // another socket than when its place was taken.
            SOCKETS[1].store(0, Relaxed);
            SOCKETS[2].store(22, Relaxed);
            h.sweep();
            assert_eq!(h.waiting(), 0, "both places went with their sockets");
            SOCKETS[3].store(13, Relaxed);
            h.hold(3, HeldPlace::fixed(Place), minute, minute);
            tokio::time::advance(Duration::from_secs(2)).await;
            h.sweep();
            assert_eq!(h.waiting(), 1, "a live handshake keeps its place");
            assert!(h.take(3).is_some());
        });
    }
}
