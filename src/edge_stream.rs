//! Admission at accept and a deadline and size bound for each request head. Every accepted
//! connection passes [`EdgeLimits::admit`] (the connection caps) or is closed at once. A client
//! that starts a request must finish its head within `server.header_timeout`, however slowly it
//! trickles bytes (slowloris), and in at most [`EdgeLimits::max_head_bytes`] bytes. pingora 0.9.1
//! only bounds each read and buffers up to 1 MiB of head, so the gateway wraps every accepted
//! connection's stream: from the first byte of a head to its blank line the clock runs and the
//! bytes are counted; a read past the deadline fails, which closes the connection, and a head
//! past the bound is answered (431) and the connection closed before it is buffered further.
//! Idle keep-alive time between requests is not counted in a head's time: it is bounded by the
//! keep-alive timeout, which this stream also keeps (see [`EdgeStream::request_ended`]): one
//! timer per connection, re-armed by moving its deadline, where pingora's own keep-alive timeout
//! registers a new timer for every request. HTTP/2 heads and idle time are left to pingora's own
//! limits.
//! pingora's bare `400` for a head its parser refuses is replaced here by the gateway's JSON
//! answer ([`EdgeLimits::malformed`]): pingora has no hook for it.
//!
//! On a listener with the PROXY protocol on, the header is read first (within the same
//! timeout; on TLS listeners before the handshake, in `before_tls`), so that admission and
//! everything after it see the client a trusted balancer names. A TLS connection is admitted
//! before its handshake (`before_tls`); its stream comes here with its place already taken.

use crate::conn_limit::HeldPlace;
use crate::proxy_protocol::HeaderError;
use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType, ALPN,
};
use pingora::server::ShutdownWatch;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The most input read away after a refusal, before the connection closes.
const LINGER_BYTES: usize = 256 * 1024;

/// The place a connection reads its PROXY header in.
pub(crate) enum HeaderPlace {
    /// A peer that is no trusted balancer is its own client from the start (its header is read
    /// and ignored): its place under its own cap, taken at once and kept for the connection
    /// (otherwise one address could fill the global cap, a header timeout at a time).
    Client(HeldPlace),
    /// A balancer's connection: a place under the global cap while the header is read; its
    /// client's place is taken once the header names it.
    Reading {
        /// Held for its drop only: given back when the header is read.
        _held: HeldPlace,
    },
}

impl HeaderPlace {
    /// Takes the place for a connection about to read its PROXY header (None: over a cap).
    pub(crate) fn take(limits: &dyn EdgeLimits, stream: &L4Stream) -> Option<Self> {
        match crate::proxy_protocol::peer_ip(stream).filter(|ip| !limits.trusts(*ip)) {
            Some(untrusted) => limits.admit_peer(Some(untrusted)).map(Self::Client),
            None => limits.admit_any().map(|held| Self::Reading { _held: held }),
        }
    }

    /// Once the header is read: the connection's own place, if it has one already (a place
    /// taken for reading is given back).
    pub(crate) fn client(self) -> Option<HeldPlace> {
        match self {
            Self::Client(place) => Some(place),
            Self::Reading { .. } => None,
        }
    }
}

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n` (RFC 9113 §3.4): what an HTTP/2 client sends first.
const H2_PREFACE_LEN: usize = 24;

/// HTTP/2 frames as they pass, followed only as far as their 9-byte headers (payloads are
/// skipped by length): enough to see when a request's header block is open, from a `HEADERS`
/// or `PUSH_PROMISE` frame's header to the last byte of the frame that has `END_HEADERS` (RFC
/// 9113 §6.10: nothing else may come between; h2 decodes a frame only once it is whole).
#[derive(Debug, Default)]
struct H2Frames {
    header: [u8; 9],
    have: usize,
    payload_left: usize,
    block_open: bool,
    /// The frame being read ends the header block (`END_HEADERS`) once its payload is in.
    ends_block: bool,
}

impl H2Frames {
    /// Follows `bytes`; true when a header block opened in them and is still open (its
    /// deadline starts now).
    fn follow(&mut self, mut bytes: &[u8]) -> bool {
        const HEADERS: u8 = 0x1;
        const PUSH_PROMISE: u8 = 0x5;
        const CONTINUATION: u8 = 0x9;
        const END_HEADERS: u8 = 0x4;
        let mut opened = false;
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                self.payload_left -= n;
                bytes = &bytes[n..];
                self.frame_read_so_far();
                continue;
            }
            let n = (self.header.len() - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have < self.header.len() {
                break;
            }
            self.have = 0;
            let [l0, l1, l2, kind, flags, ..] = self.header;
            self.payload_left = usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2);
            let ends = flags & END_HEADERS != 0;
            match kind {
                HEADERS | PUSH_PROMISE => {
                    opened = true;
                    self.block_open = true;
                    self.ends_block = ends;
                }
                CONTINUATION => self.ends_block = ends,
                _ => {}
            }
            self.frame_read_so_far();
        }
        opened && self.block_open
    }

    /// A frame that ends the header block closes it once its payload is all in.
    fn frame_read_so_far(&mut self) {
        if self.payload_left == 0 && self.ends_block {
            self.block_open = false;
            self.ends_block = false;
        }
    }
}

/// How many bytes a request head may take, and what a head that takes more is answered.
pub(crate) trait EdgeLimits: std::fmt::Debug + Send + Sync + 'static {
    /// The most bytes of one request head (request line, headers, blank line), read when a
    /// connection is accepted.
    fn max_head_bytes(&self) -> usize;
    /// The whole HTTP/1.1 response sent before closing a connection whose head is too large.
    fn too_large(&self) -> Vec<u8>;
    /// The whole HTTP/1.1 response written in place of pingora's own bare `400` (a head its
    /// parser refused, before any request began), or None to leave pingora's as it is.
    fn malformed(&self) -> Option<Vec<u8>>;
    /// Whether a newly accepted connection from `peer` is served: a guard held as long as the
    /// connection lives, or None to close it at once.
    fn admit_peer(&self, peer: Option<IpAddr>) -> Option<HeldPlace>;
    /// A place under the global connection cap only, held while a connection's PROXY protocol
    /// header is read (before the client, and so its own cap, is known); None when full.
    fn admit_any(&self) -> Option<HeldPlace>;
    /// Whether a peer's PROXY protocol header is believed (a trusted proxy).
    fn trusts(&self, peer: IpAddr) -> bool;
    /// How long a connection may wait for its first request (then each request's end says
    /// it again, see [`EdgeStream::request_ended`]).
    fn keepalive_timeout(&self) -> Duration;
    /// How long a write to the client may make no progress (`server.send_timeout`), read when
    /// a connection is accepted.
    fn send_timeout(&self) -> Duration;
    /// A connection closed because its PROXY protocol header was refused.
    fn proxy_header_refused(&self, why: &HeaderError);
}

/// The proxy (or any server app) behind connection admission and the head deadline and bound.
pub(crate) struct EdgeApp<A> {
    pub(crate) inner: Arc<A>,
    pub(crate) timeout: Duration,
    pub(crate) limits: Arc<dyn EdgeLimits>,
    /// The plain listener requires a PROXY protocol header on every connection.
    pub(crate) proxy_protocol: bool,
    /// Places TLS connections took before their handshakes.
    pub(crate) handshaking: Arc<crate::conn_limit::Handshaking>,
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for EdgeApp<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // A reused connection comes back wrapped already (and admitted).
        let stream: Stream = if stream.as_any().is::<EdgeStream>() {
            stream
        } else {
            // A plain connection (TLS ones had theirs read before the handshake).
            let (stream, early) = if self.proxy_protocol && stream.as_any().is::<L4Stream>() {
                let mut l4 = stream.into_any().downcast::<L4Stream>().ok()?;
                // Places that failed handshakes left never refuse a connection.
                self.handshaking.sweep();
                let place = HeaderPlace::take(&*self.limits, &l4)?;
                let trusts = |ip| self.limits.trusts(ip);
                if let Err(why) = crate::proxy_protocol::accept(&mut l4, self.timeout, trusts).await
                {
                    self.limits.proxy_header_refused(&why);
                    return None;
                }
                (l4 as Stream, place.client())
            } else {
                (stream, None)
            };
            // Over a connection cap: dropping the stream closes it. A TLS connection took its
            // place before its handshake.
            let taken = if early.is_some() {
                early
            } else if stream.as_any().is::<L4Stream>() {
                None
            } else {
                self.handshaking.take(stream.id())
            };
            let permit = match taken {
                Some(permit) => permit,
                None => {
                    // Places that failed handshakes left never refuse a connection.
                    self.handshaking.sweep();
                    let peer = stream
                        .get_socket_digest()
                        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
                    self.limits.admit_peer(peer)?
                }
            };
            // A new connection's first head must begin within the header timeout, not the
            // keep-alive one: silent connections would hold the places of those that speak
            // (ten addresses at the per-client cap fill the whole table) for a minute each.
            let idle = self.limits.keepalive_timeout().min(self.timeout);
            Box::new(EdgeStream::new(
                stream,
                self.timeout,
                idle,
                self.limits.clone(),
                permit,
            ))
        };
        self.inner.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}

/// Where a connection is in its current request head.
#[derive(Debug)]
enum Head {
    /// Between requests (or before the first): no clock runs.
    Idle,
    /// A head has started: it must end (blank line) before the deadline. `tail` holds the
    /// last bytes seen, so that a blank line split across reads is found; `total` counts the
    /// head's bytes so far. `line` is false while only line breaks have come: httparse skips
    /// any number of empty lines before a request line, so they start the clock and count
    /// toward the bound, but cannot end a head. `lines` counts the line feeds from the request
    /// line on: past [`MAX_HEAD_LINES`] the head is too large, as past its byte bound.
    Reading {
        tail: [u8; 3],
        len: usize,
        total: usize,
        line: bool,
        lines: usize,
    },
    /// The head is complete (a body may follow): no clock until the request has ended
    /// ([`EdgeStream::request_ended`]: its response is written). `ended` is how many requests
    /// had ended when the head completed. Writes do not end it: an interim `100 Continue` is a
    /// write, and the body after it is not a new head.
    Done { ended: u64 },
    /// HTTP/2 by ALPN, until the client's 24-byte connection preface is in (`seen` bytes so
    /// far): the first-byte deadline runs, as before an HTTP/1 connection's first head, for the
    /// whole preface (one byte and then silence is no way past it); then [`Head::H2`]. pingora
    /// waits for the preface with no deadline of its own. Also HTTP/2 with prior knowledge
    /// (h2c), once its first bytes are the preface's.
    Preface { seen: usize },
    /// HTTP/2 after its preface: its frames are followed far enough to see a request's header
    /// block, which must be complete within the head deadline as an HTTP/1 head must (h2 and
    /// pingora would wait on `CONTINUATION` frames sent a minute apart for ever).
    H2(H2Frames),
    /// The head grew past its bound: `answer` is being written (`sent` bytes so far); then the
    /// reader sees the end of the stream and the connection closes.
    Refusing { answer: Vec<u8>, sent: usize },
    /// The refusal is written: reads take away what the client already sent (`drained` bytes
    /// so far, bounded), then end.
    Refused { drained: usize },
}

/// An admitted connection's stream (holding its place under the caps): its reads fail once a
/// request head has taken longer than the deadline, and end
/// (after a 431) once a head has grown past its bound.
#[derive(Debug)]
pub(crate) struct EdgeStream {
    inner: Stream,
    timeout: Duration,
    limits: Arc<dyn EdgeLimits>,
    /// The bound on each head's bytes (read once, when the connection is accepted).
    max_head: usize,
    head: Head,
    /// When the current head must be complete (set when it starts: one clock read).
    deadline: Instant,
    /// The connection's place under the connection caps, given back when it closes, or taken
    /// back by the table while the connection waits idle (it then closes).
    place: HeldPlace,
    /// The connection's one timer, made at its first wait, and the deadline it is set to.
    /// Moving a set deadline later costs one atomic operation (tokio re-files the timer only
    /// when it fires early), so every keep-alive wait re-arms it almost for free.
    sleep: Option<Pin<Box<Sleep>>>,
    armed: Option<Instant>,
    /// Between requests: written by the proxy (through a shared reference: see
    /// [`Self::request_ended`]), read here. Bit 0: a request ended and the next has not begun
    /// (the connection waits for a head); bits 1..: how many requests ended; set to 1 at
    /// accept (waiting for the first request).
    between: AtomicU64,
    /// The keep-alive timeout, in milliseconds, as the last request's end said it.
    idle_ms: AtomicU64,
    /// The current keep-alive wait's deadline, and the `between` value it was set for.
    idle_deadline: Option<(u64, Instant)>,
    /// Whether pingora's own answer to a malformed head is being replaced by the gateway's.
    own: OwnAnswer,
    /// How long a write may make no progress; when the one waiting now must have, and its
    /// timer (made at the first write that waits: most connections never need one).
    send_timeout: Duration,
    write_deadline: Option<Instant>,
    write_sleep: Option<Pin<Box<Sleep>>>,
}

/// pingora answers a head its parser refuses with a bare `400` (no body, no JSON) and closes
/// the connection, with no hook to change it; the edge stream sees that answer go out and
/// writes the gateway's JSON one instead. The connection closes after it either way.
#[derive(Debug)]
enum OwnAnswer {
    /// Writes pass through.
    No,
    /// The gateway's answer is being written (`sent` bytes so far) in place of pingora's.
    Replacing { answer: Vec<u8>, sent: usize },
    /// The gateway's answer is out: what pingora writes after it is dropped.
    Replaced,
}

/// pingora's pre-built `400` (`error_resp::HTTP_400_RESPONSE`, written when `read_request`
/// fails on a head it cannot parse): status 400 and an empty body. The gateway's own 400s
/// always carry a JSON body, so they never look like this.
fn is_bare_400(bytes: &[u8]) -> bool {
    let Some(head) = bytes.strip_prefix(b"HTTP/1.1 400 ") else {
        return false;
    };
    head.windows(20)
        .any(|w| w.eq_ignore_ascii_case(b"\r\ncontent-length: 0\r"))
}

impl EdgeStream {
    fn new(
        inner: Stream,
        timeout: Duration,
        idle: Duration,
        limits: Arc<dyn EdgeLimits>,
        permit: HeldPlace,
    ) -> Self {
        let off = inner.selected_alpn_proto() == Some(ALPN::H2);
        let send_timeout = limits.send_timeout();
        Self {
            inner,
            timeout,
            max_head: limits.max_head_bytes(),
            limits,
            place: permit,
            head: if off {
                Head::Preface { seen: 0 }
            } else {
                Head::Idle
            },
            deadline: Instant::now(),
            sleep: None,
            armed: None,
            between: AtomicU64::new(1),
            idle_ms: AtomicU64::new(millis(idle)),
            idle_deadline: None,
            own: OwnAnswer::No,
            send_timeout,
            write_deadline: None,
            write_sleep: None,
        }
    }

    /// The edge stream under an HTTP/1 session, if the connection has one.
    pub(crate) fn of(stream: Option<&Stream>) -> Option<&EdgeStream> {
        stream?.as_any().downcast_ref::<EdgeStream>()
    }

    /// A request on this connection began (its head is read): reads are no longer a
    /// keep-alive wait.
    pub(crate) fn request_began(&self) {
        let v = self.between.load(Ordering::Relaxed);
        self.between.store(v & !1, Ordering::Relaxed);
    }

    /// A request on this connection ended (its response is written): until the next one
    /// begins, a read that waits is a keep-alive wait, and the connection closes (as if the
    /// client had) when no byte of a new head arrives within `idle`. Reads while a response is
    /// still being written (pingora watches for the client going away) are never that wait.
    pub(crate) fn request_ended(&self, idle: Duration) {
        self.idle_ms.store(millis(idle), Ordering::Relaxed);
        let v = self.between.load(Ordering::Relaxed);
        self.between
            .store(((v >> 1) + 1) << 1 | 1, Ordering::Relaxed);
    }

    /// Whether the table gave this connection's place to another (it must close).
    fn released(&self) -> bool {
        self.place.reclaim.as_ref().is_some_and(|r| r.released())
    }

    /// A read between requests found nothing: after a request has ended (a connection yet to
    /// send its first never is: it may be about to), the table may give the place away while
    /// it waits, waking it. `false` when it already did.
    fn wait_idle(&self, cx: &Context<'_>) -> bool {
        match &self.place.reclaim {
            Some(r) if self.between.load(Ordering::Relaxed) >> 1 > 0 => r.wait_idle(cx.waker()),
            _ => true,
        }
    }

    /// A read between requests brought bytes: busy again, or `false` when the place went to
    /// another connection first.
    fn wake_busy(&self) -> bool {
        self.place.reclaim.as_ref().is_none_or(|r| r.wake_busy())
    }

    /// The keep-alive wait's deadline, when the connection waits between requests.
    fn idle_deadline(&mut self) -> Option<Instant> {
        let between = self.between.load(Ordering::Relaxed);
        if between & 1 == 0 {
            return None;
        }
        match self.idle_deadline {
            Some((set_for, deadline)) if set_for == between => Some(deadline),
            _ => {
                // At most a century: far beyond any configuration, never past `Instant`'s range.
                let ms = self
                    .idle_ms
                    .load(Ordering::Relaxed)
                    .min(100 * 365 * 86_400_000);
                let deadline = Instant::now() + Duration::from_millis(ms);
                self.idle_deadline = Some((between, deadline));
                Some(deadline)
            }
        }
    }

    /// Whether `deadline` has passed, the connection's timer set to it (and the task woken
    /// then) when it has not.
    fn passed(&mut self, deadline: Instant, cx: &mut Context<'_>) -> bool {
        let sleep = match &mut self.sleep {
            Some(sleep) => {
                if self.armed != Some(deadline) {
                    sleep.as_mut().reset(deadline);
                }
                sleep
            }
            None => self
                .sleep
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.armed = Some(deadline);
        sleep.as_mut().poll(cx).is_ready()
    }

    /// Brings the head's state up to what the proxy said (see [`Self::request_began`] and
    /// [`Self::request_ended`]) before a read. While a request is under way, what is read is
    /// its body (or a pipelined request's first bytes): not a head, whatever it holds. That
    /// includes a head that pingora found whole in bytes it had already read. Once the request
    /// whose head was read has ended, the next bytes start a new head.
    fn catch_up(&mut self) {
        let between = self.between.load(Ordering::Relaxed);
        let waiting = between & 1 == 1;
        let ended = between >> 1;
        match self.head {
            Head::Idle | Head::Reading { .. } | Head::Done { .. } if !waiting => {
                self.head = Head::Done { ended };
            }
            Head::Done { ended: then } if ended > then => self.head = Head::Idle,
            _ => {}
        }
    }

    /// An HTTP/2 connection's read: frames followed; while a request's header block is open,
    /// a read that waits past the head deadline fails (the connection closes).
    fn poll_frames(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        let Head::H2(frames) = &mut self.head else {
            return read;
        };
        match read {
            Poll::Ready(Ok(())) => {
                if frames.follow(&buf.filled()[before..]) {
                    self.deadline = Instant::now() + self.timeout;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if frames.block_open => {
                let deadline = self.deadline;
                if self.passed(deadline, cx) {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "HTTP/2 header block not complete within server.header_timeout",
                    )));
                }
                Poll::Pending
            }
            other => other,
        }
    }

    /// Follows the head through the bytes just read; starts the clock when a head starts, and
    /// turns to refusing when the head grew past its bound.
    fn saw(&mut self, bytes: &[u8]) {
        if matches!(self.head, Head::Idle) && bytes.starts_with(b"PRI * HTTP/2") {
            // h2c with prior knowledge: the preface, then frames, not an HTTP/1 head.
            self.head = Head::Preface { seen: 0 };
        }
        if let Head::Preface { seen } = self.head {
            let total = seen.saturating_add(bytes.len());
            if total < H2_PREFACE_LEN {
                self.head = Head::Preface { seen: total };
                return;
            }
            let mut frames = H2Frames::default();
            let rest = &bytes[H2_PREFACE_LEN.saturating_sub(seen).min(bytes.len())..];
            if frames.follow(rest) {
                self.deadline = Instant::now() + self.timeout;
            }
            self.head = Head::H2(frames);
            return;
        }
        if follow(&mut self.head, bytes) {
            self.deadline = Instant::now() + self.timeout;
        }
        if let Head::Done { ended } = &mut self.head {
            *ended = self.between.load(Ordering::Relaxed) >> 1;
        }
        if matches!(self.head, Head::Reading { total, .. } if total > self.max_head) {
            self.head = Head::Refusing {
                answer: self.limits.too_large(),
                sent: 0,
            };
        }
    }

    /// A write (or flush) to the client that waits may wait `send_timeout` from when it began
    /// waiting; any progress starts the clock again (nginx's `send_timeout`). pingora times
    /// HTTP/1 body writes only, in batches, and neither a head nor a flush: a client that
    /// stops reading held its connection for good.
    fn timed<T>(
        &mut self,
        result: Poll<std::io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<T>> {
        if !result.is_pending() {
            self.write_deadline = None;
            return result;
        }
        let deadline = *self
            .write_deadline
            .get_or_insert_with(|| Instant::now() + self.send_timeout);
        let sleep = self
            .write_sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() != deadline {
            sleep.as_mut().reset(deadline);
        }
        if sleep.as_mut().poll(cx).is_ready() {
            self.write_deadline = None;
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client read nothing within server.send_timeout",
            )));
        }
        Poll::Pending
    }

    /// Whether `bytes`, about to be written, are pingora's bare `400` for a head it could not
    /// parse (a write while no request is under way), and the gateway's answer replaces them.
    fn replaces(&mut self, bytes: &[u8]) -> bool {
        if matches!(self.head, Head::H2(_) | Head::Preface { .. })
            || self.between.load(Ordering::Relaxed) & 1 == 0
            || !is_bare_400(bytes)
        {
            return false;
        }
        let Some(answer) = self.limits.malformed() else {
            return false;
        };
        self.own = OwnAnswer::Replacing { answer, sent: 0 };
        true
    }

    /// Writes the gateway's answer in place of pingora's; each of pingora's writes is taken
    /// whole (`len` bytes) once it is out.
    fn poll_own(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<std::io::Result<usize>> {
        while let OwnAnswer::Replacing { answer, sent } = &mut self.own {
            if *sent == answer.len() {
                self.own = OwnAnswer::Replaced;
                break;
            }
            match Pin::new(&mut self.inner).poll_write(cx, &answer[*sent..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(0)),
                Poll::Ready(Ok(n)) => *sent += n,
                other => return other,
            }
        }
        Poll::Ready(Ok(len))
    }

    /// Reads away (bounded, without waiting) what the client sent that nobody will read: closing
    /// a socket with unread input resets the connection, and a reset can destroy the answer
    /// before the client reads it.
    fn drain_arrived(&mut self, cx: &mut Context<'_>) {
        let mut scratch = [0u8; 4096];
        let mut drained = 0;
        while drained < LINGER_BYTES {
            let mut away = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut away) {
                Poll::Ready(Ok(())) if !away.filled().is_empty() => drained += away.filled().len(),
                _ => break,
            }
        }
    }

    /// Writes the refusal; once it is out, the reader sees the end of the stream.
    fn poll_refuse(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // Written and flushed under the same clock as every other write (`timed`): a client
        // that reads nothing cannot hold the connection by not taking its refusal either.
        while let Head::Refusing { answer, sent } = &self.head {
            if *sent < answer.len() {
                let wrote = Pin::new(&mut self.inner).poll_write(cx, &answer[*sent..]);
                match self.timed(wrote, cx) {
                    Poll::Ready(Ok(0)) => self.head = Head::Refused { drained: 0 },
                    Poll::Ready(Ok(n)) => {
                        if let Head::Refusing { sent, .. } = &mut self.head {
                            *sent += n;
                        }
                    }
                    Poll::Ready(Err(e)) => {
                        self.head = Head::Refused {
                            drained: LINGER_BYTES,
                        };
                        return Poll::Ready(Err(e));
                    }
                    Poll::Pending => return Poll::Pending,
                }
            } else {
                let flushed = Pin::new(&mut self.inner).poll_flush(cx);
                match self.timed(flushed, cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(_) => self.head = Head::Refused { drained: 0 },
                }
            }
        }
        // Closing a socket with unread input resets the connection, and a reset can destroy
        // the answer before the client reads it: read away what has arrived (bounded), then end.
        let mut scratch = [0u8; 4096];
        while let Head::Refused { drained } = &mut self.head {
            if *drained >= LINGER_BYTES {
                break;
            }
            let mut away = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut away) {
                Poll::Ready(Ok(())) if !away.filled().is_empty() => {
                    *drained += away.filled().len();
                }
                // The end, an error, or nothing more arrived yet: the reader sees the end.
                _ => break,
            }
        }
        Poll::Ready(Ok(()))
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The most header fields a request may carry, on either protocol: what pingora's HTTP/1.1
/// parser takes (the header array it gives httparse).
pub(crate) const MAX_HEADER_FIELDS: usize = 256;

/// The most line feeds of a head pingora's parser takes: the request line, the header lines,
/// the blank line. One more header line is a bare 400 there; here it is the 431 of a head too
/// large.
const MAX_HEAD_LINES: usize = MAX_HEADER_FIELDS + 2;

/// Where in `bytes` a head ends (just past a line feed followed by an empty line, `\r\n` or a
/// bare `\n`, which httparse accepts too), if it does; and how many line feeds come up to that
/// end (or in all). Only the few line feeds are looked at (memchr), not every position of the
/// head and the body after it.
fn blank_line(bytes: &[u8]) -> (Option<usize>, usize) {
    let mut lines = 0;
    for at in memchr::memchr_iter(b'\n', bytes) {
        lines += 1;
        let after = &bytes[at + 1..];
        if after.starts_with(b"\n") {
            return (Some(at + 2), lines + 1);
        }
        if after.starts_with(b"\r\n") {
            return (Some(at + 3), lines + 1);
        }
    }
    (None, lines)
}

/// Moves `head` along `bytes`; true when a new head starts (the clock must start). A completed
/// head is `Done { ended: 0 }`: the caller records how many requests had ended.
fn follow(head: &mut Head, mut bytes: &[u8]) -> bool {
    if bytes.is_empty() {
        return false;
    }
    let mut started = false;
    if let Head::Idle = head {
        // The h2c preface ("PRI * HTTP/2.0") is not an HTTP/1 head.
        if bytes.starts_with(b"PRI * HTTP/2") {
            *head = Head::Preface { seen: 0 };
            return false;
        }
        started = true;
        *head = Head::Reading {
            tail: [0; 3],
            len: 0,
            total: 0,
            line: false,
            lines: 0,
        };
    }
    if let Head::Reading {
        tail,
        len,
        total,
        line,
        lines,
    } = head
    {
        if !*line {
            // Empty lines before the request line: counted, never the end of a head.
            let breaks = bytes
                .iter()
                .take_while(|b| matches!(b, b'\r' | b'\n'))
                .count();
            *total = total.saturating_add(breaks);
            bytes = &bytes[breaks..];
            if bytes.is_empty() {
                return started;
            }
            *line = true;
        }
        // The blank line may straddle two reads: look at the seam (the kept tail and the
        // first bytes of this read), then within this read. No allocation.
        let mut seam = [0u8; 6];
        let first = bytes.len().min(3);
        seam[..*len].copy_from_slice(&tail[..*len]);
        seam[*len..*len + first].copy_from_slice(&bytes[..first]);
        let seam = &seam[..*len + first];
        // Line feeds are counted in this read's bytes only (the tail's were counted before),
        // up to the head's end.
        let (ends, feeds) = match blank_line(seam) {
            (Some(end), _) => {
                let here = end.saturating_sub(*len).min(first);
                (true, memchr::memchr_iter(b'\n', &bytes[..here]).count())
            }
            (None, _) => {
                let (end, feeds) = blank_line(bytes);
                (end.is_some(), feeds)
            }
        };
        *lines += feeds;
        if *lines > MAX_HEAD_LINES {
            // Past the bound: refused as a head too large (see `EdgeStream::saw`).
            *total = usize::MAX;
            return started;
        }
        if ends {
            *head = Head::Done { ended: 0 };
            return started;
        }
        // Keep the last three bytes seen (from the seam when this read was shorter).
        let last: &[u8] = if bytes.len() >= 3 { bytes } else { seam };
        let kept = &last[last.len().saturating_sub(3)..];
        tail[..kept.len()].copy_from_slice(kept);
        *len = kept.len();
        *total = total.saturating_add(bytes.len());
    }
    started
}

impl AsyncRead for EdgeStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.as_mut().get_mut().catch_up();
        if matches!(self.head, Head::Idle) && self.released() {
            // Its place went to a new connection while it waited: closed, whatever comes now.
            return Poll::Ready(Ok(()));
        }
        match self.head {
            Head::Done { .. } => return Pin::new(&mut self.inner).poll_read(cx, buf),
            Head::H2(_) => return self.get_mut().poll_frames(cx, buf),
            Head::Refusing { .. } | Head::Refused { .. } => return self.get_mut().poll_refuse(cx),
            Head::Idle | Head::Reading { .. } | Head::Preface { .. } => {}
        }
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let this = self.as_mut().get_mut();
                if matches!(this.head, Head::Idle)
                    && buf.filled().len() > before
                    && !this.wake_busy()
                {
                    // The place went to another connection just before these bytes came.
                    buf.set_filled(before);
                    return Poll::Ready(Ok(()));
                }
                this.saw(&buf.filled()[before..]);
                if let Head::Refusing { .. } = this.head {
                    // The reader never sees the read that crossed the bound.
                    buf.set_filled(before);
                    return this.poll_refuse(cx);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let this = self.as_mut().get_mut();
                match this.head {
                    Head::Reading { .. } => {
                        let deadline = this.deadline;
                        if this.passed(deadline, cx) {
                            return Poll::Ready(Err(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "request head not complete within server.header_timeout",
                            )));
                        }
                    }
                    Head::Idle | Head::Preface { .. } => {
                        // Its place given to a new connection at the cap, or kept alive too
                        // long without a new request (or, new, silent past the first-byte
                        // deadline): the end of the stream, as pingora's own keep-alive timeout
                        // would have it (a quiet close).
                        if matches!(this.head, Head::Idle) && !this.wait_idle(cx) {
                            return Poll::Ready(Ok(()));
                        }
                        if let Some(deadline) = this.idle_deadline() {
                            if this.passed(deadline, cx) {
                                return Poll::Ready(Ok(()));
                            }
                        }
                    }
                    _ => {}
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl AsyncWrite for EdgeStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if matches!(this.own, OwnAnswer::No) && !this.replaces(buf) {
            let wrote = Pin::new(&mut this.inner).poll_write(cx, buf);
            return this.timed(wrote, cx);
        }
        this.poll_own(cx, buf.len())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let flushed = Pin::new(&mut this.inner).poll_flush(cx);
        this.timed(flushed, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let OwnAnswer::Replaced = this.own {
            this.drain_arrived(cx);
        }
        let shut = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.timed(shut, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &b[..]);
        if matches!(this.own, OwnAnswer::No) && !this.replaces(first) {
            let wrote = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
            return this.timed(wrote, cx);
        }
        this.poll_own(cx, first.len())
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for EdgeStream {
    async fn shutdown(&mut self) {
        // Through `poll_shutdown`: timed like every write.
        let _ = tokio::io::AsyncWriteExt::shutdown(self).await;
    }
}

impl UniqueID for EdgeStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for EdgeStream {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for EdgeStream {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for EdgeStream {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: pingora::protocols::raw_connect::ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for EdgeStream {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: pingora::protocols::SocketDigest) {
        self.inner.set_socket_digest(digest);
    }
}

#[async_trait]
impl Peek for EdgeStream {
    /// pingora peeks for an h2c preface (`server.h2c`: 24 bytes, however slowly they come)
    /// before it reads anything: under the deadline a read would have (the first byte's, or
    /// the keep-alive one between requests), or a silent or 23-byte client is held for ever.
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.catch_up();
        let Some(deadline) = self.idle_deadline() else {
            return self.inner.try_peek(buf).await;
        };
        match tokio::time::timeout_at(deadline, self.inner.try_peek(buf)).await {
            Ok(peeked) => peeked,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no request (or h2c preface) within the connection's deadline",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends(chunks: &[&[u8]]) -> bool {
        let mut head = Head::Idle;
        for chunk in chunks {
            follow(&mut head, chunk);
        }
        matches!(head, Head::Done { .. })
    }

    #[test]
    fn a_head_of_more_lines_than_the_parser_takes_is_too_large() {
        let head = |headers: usize| {
            let mut h = b"GET / HTTP/1.1\r\n".to_vec();
            for _ in 0..headers {
                h.extend_from_slice(b"a: 1\r\n");
            }
            // A pipelined request led by an empty line: its line feeds are not the head's.
            h.extend_from_slice(b"\r\n\r\n\nGET / HTTP/1.1\r\n");
            h
        };
        let end = head(256).len() - b"\r\n\nGET / HTTP/1.1\r\n".len();
        for cut in [1, 7, 100, 1500].into_iter().chain(end - 6..=end + 3) {
            let bytes = head(256);
            let mut state = Head::Idle;
            follow(&mut state, &bytes[..cut]);
            follow(&mut state, &bytes[cut..]);
            assert!(matches!(state, Head::Done { .. }), "{cut}: {state:?}");
            let bytes = head(257);
            let mut state = Head::Idle;
            follow(&mut state, &bytes[..cut]);
            follow(&mut state, &bytes[cut..]);
            assert!(
                matches!(
                    state,
                    Head::Reading {
                        total: usize::MAX,
                        ..
                    }
                ),
                "{cut}: {state:?}"
            );
        }
    }

    #[test]
    fn only_an_empty_400_is_taken_for_pingoras_own() {
        assert!(is_bare_400(
            b"HTTP/1.1 400 Bad Request\r\nServer: x\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(is_bare_400(
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        ));
        // The gateway's own 400s carry a body; other statuses and later writes pass.
        assert!(!is_bare_400(
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 70\r\n\r\n{}"
        ));
        assert!(!is_bare_400(
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 01\r\n\r\n"
        ));
        assert!(!is_bare_400(
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(!is_bare_400(b"{\"ok\":true}"));
    }

    #[test]
    fn the_blank_line_is_found_wherever_the_reads_split_it() {
        let head = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
        for cut in 0..head.len() {
            for cut2 in cut..head.len() {
                let parts: [&[u8]; 3] = [&head[..cut], &head[cut..cut2], &head[cut2..]];
                assert!(ends(&parts), "split at {cut}/{cut2}");
            }
        }
        let bytes: Vec<&[u8]> = head.chunks(1).collect();
        assert!(ends(&bytes), "one byte at a time");
        assert!(!ends(&[&b"GET / HTTP/1.1\r\nhost: x\r\n"[..]]));
        assert!(!ends(&[&b"GET / HTTP/1.1\r\n"[..], b"\rx\n"]));
        let mut head = Head::Idle;
        follow(&mut head, b"GET / HTTP/1.1\r\n");
        follow(&mut head, b"x-a: b\r\n");
        assert!(matches!(head, Head::Reading { total: 24, .. }), "{head:?}");
        // A bare LF before the blank line ends a head too (httparse reads it as one).
        assert!(ends(&[&b"GET / HTTP/1.1\nhost: x\n\r\n"[..]]));
        assert!(ends(&[&b"GET / HTTP/1.1\r\nhost: x\r\n\n"[..]]));
        assert!(!ends(&[&b"GET / HTTP/1.1\r\nhost: x\r\n\r"[..]]));
        // Empty lines before a request line (httparse skips them) never end a head: they
        // start the clock and count toward the bound.
        assert!(!ends(&[&b"\r\n\r\n"[..]]));
        assert!(!ends(&[&b"\r\n\r\n\r\n"[..], b"\n\n", b"\r\n"]));
        assert!(ends(&[&b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"[..]]));
        assert!(ends(&[&b"\r\n"[..], b"\r\nGET / HTTP/1.1\r\n", b"\r\n"]));
        let mut head = Head::Idle;
        assert!(follow(&mut head, b"\r\n\r\n"), "the clock starts");
        follow(&mut head, b"\n\n");
        assert!(
            matches!(
                head,
                Head::Reading {
                    total: 6,
                    line: false,
                    ..
                }
            ),
            "{head:?}"
        );
        let mut h2 = Head::Idle;
        assert!(!follow(&mut h2, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert!(matches!(h2, Head::Preface { seen: 0 }));
    }

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
        let mut out = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 1];
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn an_http2_header_block_is_open_from_headers_to_end_headers() {
        // SETTINGS, DATA and a whole HEADERS frame open nothing.
        let mut f = H2Frames::default();
        let mut bytes = frame(0x4, 0, &[0; 6]);
        bytes.extend(frame(0x1, 0x4 | 0x1, &[0x82; 40]));
        bytes.extend(frame(0x0, 0x1, &[0x04; 300]));
        assert!(!f.follow(&bytes));
        assert!(!f.block_open);
        // HEADERS without END_HEADERS opens a block, split across reads at every byte.
        let open = frame(0x1, 0x1, &[0x82; 10]);
        let mut opened = false;
        for b in &open {
            opened |= f.follow(std::slice::from_ref(b));
        }
        assert!(opened && f.block_open);
        // A CONTINUATION without END_HEADERS keeps it open; one with it closes it.
        assert!(!f.follow(&frame(0x9, 0, &[0x84; 5])));
        assert!(f.block_open);
        assert!(!f.follow(&frame(0x9, 0x4, &[0x84; 5])));
        assert!(!f.block_open);
        // Opened and closed within one read: no deadline to start.
        let mut both = frame(0x1, 0, &[1]);
        both.extend(frame(0x9, 0x4, &[1]));
        assert!(!f.follow(&both));
        assert!(!f.block_open);
        // A frame with END_HEADERS ends the block only once its payload is in: trickling the
        // payload of a last frame is no way past the deadline.
        let whole = frame(0x1, 0x4, &[0x82; 100]);
        assert!(f.follow(&whole[..9]));
        assert!(f.block_open);
        assert!(!f.follow(&whole[9..50]));
        assert!(f.block_open);
        assert!(!f.follow(&whole[50..]));
        assert!(!f.block_open);
    }
}
