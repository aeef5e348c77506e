//! One pipelined connection to one Redis node, for the request path: callers queue their
//! commands (in call order, under one short lock), one writer task writes each turn's queue in
//! one system call, and one reader task hands each caller its replies as they arrive, so
//! concurrent requests share one connection, one write and one read.

use super::resp::{self, Commands, ProtocolError, Reply, ServerError};
use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;

/// Calls waiting for replies on one connection, at most: past that, Redis is not keeping up
/// and a call fails at once.
const MAX_IN_FLIGHT: usize = 4096;

/// Why a call failed.
#[derive(Debug)]
pub(super) enum LinkError {
    /// Not sent: the connection is closed, being reopened, or could not be opened.
    NotSent(String),
    /// Not sent: too many calls wait on the connection.
    Busy,
    /// The connection failed after the call was written: it may have run.
    Io(String),
    /// No reply within the deadline (the connection is dropped: every later reply is behind).
    Timeout,
    /// Redis answered with an error.
    Server(ServerError),
    /// A reply broke the protocol or a bound (the connection is dropped).
    Protocol(ProtocolError),
}

impl LinkError {
    /// Whether the call certainly never reached Redis.
    pub(super) fn never_sent(&self) -> bool {
        matches!(self, LinkError::NotSent(_) | LinkError::Busy)
    }

    /// Whether this says Redis is not serving (as opposed to a bad request).
    pub(super) fn is_outage(&self) -> bool {
        match self {
            LinkError::Server(e) => super::connection::is_outage_code(e.code()),
            _ => true,
        }
    }
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkError::NotSent(why) => write!(f, "not sent to Redis: {why}"),
            LinkError::Busy => f.write_str("too many calls waiting on Redis"),
            LinkError::Io(e) => write!(f, "Redis connection failed: {e}"),
            LinkError::Timeout => f.write_str("timed out"),
            LinkError::Server(e) => write!(f, "Redis: {e}"),
            LinkError::Protocol(e) => e.fmt(f),
        }
    }
}

/// A TCP or Unix socket's writing half (both can be written through `&self`).
pub(super) enum Writer {
    Tcp(tokio::net::tcp::OwnedWriteHalf),
    Unix(tokio::net::unix::OwnedWriteHalf),
}

impl Writer {
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Writer::Tcp(w) => w.try_write(buf),
            Writer::Unix(w) => w.try_write(buf),
        }
    }

    async fn writable(&self) -> io::Result<()> {
        match self {
            Writer::Tcp(w) => w.writable().await,
            Writer::Unix(w) => w.writable().await,
        }
    }

    /// Shuts the socket both ways: the reader wakes to its end, Redis sees the client go.
    fn shut(&self) {
        let _ = match self {
            Writer::Tcp(w) => socket2::SockRef::from(w.as_ref()).shutdown(std::net::Shutdown::Both),
            Writer::Unix(w) => {
                socket2::SockRef::from(w.as_ref()).shutdown(std::net::Shutdown::Both)
            }
        };
    }

    /// Writes all of `buf`, waiting for the socket as needed.
    pub(super) async fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        let mut at = 0;
        while at < buf.len() {
            self.writable().await?;
            match self.try_write(&buf[at..]) {
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The connection.
pub(super) struct Link {
    /// The node's address (a sentinel's primary moves: the holder compares).
    pub(super) addr: String,
    writer: Writer,
    state: parking_lot::Mutex<State>,
    broken: AtomicBool,
    /// Tells the writer task there is something to write (or that the link is broken).
    wake_writer: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    /// Commands queued for the writer task, in call order.
    unsent: Vec<u8>,
    /// The writer task has been told to write `unsent`.
    flush_due: bool,
    waiting: VecDeque<Waiter>,
    broken: bool,
}

struct Waiter {
    expected: usize,
    replies: Vec<Reply>,
    done: oneshot::Sender<Result<Vec<Reply>, LinkError>>,
}

impl Link {
    /// Starts the reader task (on the calling runtime) for a connected, authenticated socket.
    pub(super) fn start<R>(addr: String, reader: R, writer: Writer) -> Arc<Self>
    where
        R: tokio::io::AsyncRead + Unpin + Send + 'static,
    {
        let link = Arc::new(Self {
            addr,
            writer,
            state: parking_lot::Mutex::default(),
            broken: AtomicBool::new(false),
            wake_writer: tokio::sync::Notify::new(),
        });
        tokio::spawn(read_replies(link.clone(), reader));
        tokio::spawn(write_requests(link.clone()));
        link
    }

    pub(super) fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Sends `commands` and waits (at most `deadline`) for all their replies, in order. An
    /// error reply among them fails the call.
    pub(super) async fn call(
        self: &Arc<Self>,
        commands: &Commands,
        deadline: Duration,
    ) -> Result<Vec<Reply>, LinkError> {
        if commands.is_empty() {
            return Ok(Vec::new());
        }
        let (done, replies) = oneshot::channel();
        {
            let mut s = self.state.lock();
            if s.broken {
                return Err(LinkError::NotSent("connection closed".into()));
            }
            if s.waiting.len() >= MAX_IN_FLIGHT {
                return Err(LinkError::Busy);
            }
            s.waiting.push_back(Waiter {
                expected: commands.len(),
                replies: Vec::with_capacity(commands.len()),
                done,
            });
            s.unsent.extend_from_slice(commands.bytes());
            if !s.flush_due {
                s.flush_due = true;
                self.wake_writer.notify_one();
            }
        }
        match tokio::time::timeout(deadline, replies).await {
            Ok(r) => settle(r),
            Err(_) => {
                // Replies come in order: a late one holds up every call behind it.
                self.fail(&mut self.state.lock(), || {
                    LinkError::Io("dropped: an earlier reply was overdue".into())
                });
                Err(LinkError::Timeout)
            }
        }
    }

    /// Drops the connection: every waiting call fails with `error()`, the socket is shut (the
    /// reader then stops).
    fn fail(&self, s: &mut State, error: impl Fn() -> LinkError) {
        if s.broken {
            return;
        }
        s.broken = true;
        self.broken.store(true, Ordering::Release);
        for w in s.waiting.drain(..) {
            let _ = w.done.send(Err(error()));
        }
        s.unsent = Vec::new();
        self.writer.shut();
        self.wake_writer.notify_one();
    }

    /// Drops the connection from outside (a server error that says it is the wrong node).
    pub(super) fn close(&self) {
        self.fail(&mut self.state.lock(), || {
            LinkError::Io("connection dropped".into())
        });
    }

    /// Hands one reply to the oldest waiting call; false if no call waits for it.
    fn deliver(s: &mut State, reply: Reply) -> bool {
        let Some(w) = s.waiting.front_mut() else {
            return false;
        };
        w.replies.push(reply);
        if w.replies.len() >= w.expected {
            if let Some(w) = s.waiting.pop_front() {
                let error = w.replies.iter().find_map(|r| match r {
                    Reply::Error(e) => Some(e.clone()),
                    _ => None,
                });
                let _ = w.done.send(match error {
                    Some(e) => Err(LinkError::Server(e)),
                    None => Ok(w.replies),
                });
            }
        }
        true
    }
}

fn settle(
    r: Result<Result<Vec<Reply>, LinkError>, oneshot::error::RecvError>,
) -> Result<Vec<Reply>, LinkError> {
    r.unwrap_or_else(|_| Err(LinkError::Io("connection dropped".into())))
}

/// Writes what callers queued, once per turn of the runtime: woken by the first call of a
/// turn, it yields once so that the other requests ready in the same turn add theirs, then
/// writes them all in one system call (under load, one write carries many requests' pipelines).
async fn write_requests(link: Arc<Link>) {
    let mut buf = Vec::with_capacity(8 * 1024);
    loop {
        link.wake_writer.notified().await;
        tokio::task::yield_now().await;
        {
            let mut s = link.state.lock();
            if s.broken {
                return;
            }
            s.flush_due = false;
            std::mem::swap(&mut buf, &mut s.unsent);
        }
        if buf.is_empty() {
            continue;
        }
        if let Err(e) = link.writer.write_all(&buf).await {
            link.fail(&mut link.state.lock(), || LinkError::Io(e.to_string()));
            return;
        }
        buf.clear();
    }
}

/// Reads replies and hands them out until the connection fails or is dropped.
async fn read_replies<R: tokio::io::AsyncRead + Unpin>(link: Arc<Link>, mut reader: R) {
    let mut buf: Vec<u8> = Vec::with_capacity(8 * 1024);
    let mut start = 0;
    loop {
        if link.is_broken() {
            return;
        }
        if start > 0 && start == buf.len() {
            buf.clear();
            start = 0;
        } else if buf.len() - start > resp::MAX_BULK + 64 * 1024 {
            link.fail(&mut link.state.lock(), || {
                LinkError::Protocol(ProtocolError("reply too large"))
            });
            return;
        } else if buf.len() == buf.capacity() && start > 0 {
            buf.drain(..start);
            start = 0;
        }
        let failure = match reader.read_buf(&mut buf).await {
            Ok(0) => Some(LinkError::Io("Redis closed the connection".into())),
            Ok(_) => None,
            Err(e) => Some(LinkError::Io(e.to_string())),
        };
        let mut s = link.state.lock();
        if let Some(e) = failure {
            let text = e.to_string();
            link.fail(&mut s, || LinkError::Io(text.clone()));
            return;
        }
        loop {
            match resp::parse(&buf[start..]) {
                Ok(Some((reply, used))) => {
                    start += used;
                    if !Link::deliver(&mut s, reply) {
                        link.fail(&mut s, || {
                            LinkError::Protocol(ProtocolError("a reply nobody asked for"))
                        });
                        return;
                    }
                }
                Ok(None) => break,
                Err(p) => {
                    link.fail(&mut s, || LinkError::Protocol(p));
                    return;
                }
            }
        }
    }
}
