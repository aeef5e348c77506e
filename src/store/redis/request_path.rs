//! The request path's connection to one Redis node (a single Redis, the primary a sentinel
//! names, or one cluster primary): one pipelined [`Link`], opened on the proxy's runtime by the
//! first call and reopened after a failure (at most every [`REOPEN_EVERY`]), moved when the
//! sentinels name another primary.

use super::link::{Link, LinkError, Writer};
use super::resp::{self, Arg, Commands, Reply};
use super::sentinel::{SentinelConn, SentinelUrl};
use arc_swap::ArcSwapOption;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

/// After a failed attempt to open the connection, calls fail (503) this long before the next.
const REOPEN_EVERY: Duration = Duration::from_millis(100);

/// Where the connection goes and how it logs in.
#[derive(Clone)]
pub(super) enum Target {
    Tcp {
        host: String,
        port: u16,
        auth: Auth,
    },
    Unix {
        path: std::path::PathBuf,
        auth: Auth,
    },
    /// The primary `SentinelConn` points at now (it follows failovers).
    Sentinel {
        primary: SentinelConn,
        auth: Auth,
    },
}

/// `AUTH` and `SELECT` on every new connection.
#[derive(Clone)]
pub(super) struct Auth {
    username: Option<String>,
    password: Option<String>,
    db: i64,
}

impl Target {
    /// The target of a `redis://` (or `redis+unix://`) client; `None` for what this client does
    /// not speak (TLS).
    pub(super) fn of_client(client: &redis::Client) -> Option<Target> {
        let info = client.get_connection_info();
        let r = info.redis_settings();
        let auth = Auth {
            username: r.username().map(str::to_owned),
            password: r.password().map(str::to_owned),
            db: r.db(),
        };
        match info.addr() {
            redis::ConnectionAddr::Tcp(host, port) => Some(Target::Tcp {
                host: host.clone(),
                port: *port,
                auth,
            }),
            redis::ConnectionAddr::Unix(path) => Some(Target::Unix {
                path: path.clone(),
                auth,
            }),
            _ => None,
        }
    }

    pub(super) fn of_sentinel(primary: SentinelConn, url: &SentinelUrl) -> Target {
        Target::Sentinel {
            primary,
            auth: Auth {
                username: url.username.clone(),
                password: url.password.clone(),
                db: url.db,
            },
        }
    }

    /// A node at `host:port` that logs in as this target does (a cluster's other nodes).
    pub(super) fn with_address(&self, host: &str, port: u16) -> Target {
        let auth = match self {
            Target::Tcp { auth, .. }
            | Target::Unix { auth, .. }
            | Target::Sentinel { auth, .. } => auth.clone(),
        };
        Target::Tcp {
            host: host.to_owned(),
            port,
            auth,
        }
    }

    /// The host a TCP target connects to (empty for the others).
    pub(super) fn host(&self) -> &str {
        match self {
            Target::Tcp { host, .. } => host,
            _ => "",
        }
    }

    /// Whether a link opened to `addr` still goes where it should.
    fn still(&self, addr: &str) -> bool {
        match self {
            Target::Sentinel { primary, .. } => primary.is_at(addr),
            _ => true,
        }
    }

    async fn open(&self) -> Result<Arc<Link>, LinkError> {
        let not_sent = |e: std::io::Error| LinkError::NotSent(format!("cannot connect: {e}"));
        match self {
            Target::Tcp { host, port, auth } => {
                let stream = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(not_sent)?;
                tcp_link(format!("{host}:{port}"), stream, auth).await
            }
            Target::Sentinel { primary, auth } => {
                let addr = primary.addr();
                let stream = tokio::net::TcpStream::connect(addr.as_str())
                    .await
                    .map_err(not_sent)?;
                tcp_link(addr, stream, auth).await
            }
            Target::Unix { path, auth } => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(not_sent)?;
                let (mut r, w) = stream.into_split();
                let w = Writer::Unix(w);
                log_in(&mut r, &w, auth).await?;
                Ok(Link::start(path.display().to_string(), r, w))
            }
        }
    }

    fn follow_after(&self, e: &LinkError) {
        if let Target::Sentinel { primary, .. } = self {
            if e.is_outage() {
                primary.suspect();
            }
        }
    }
}

async fn tcp_link(
    addr: String,
    stream: tokio::net::TcpStream,
    auth: &Auth,
) -> Result<Arc<Link>, LinkError> {
    // Nagle stays on (as redis-rs leaves it): under load, the small pipelines that many
    // requests write while a reply is outstanding leave in one segment, which Redis reads and
    // answers in one go. Latency does not suffer: every pipeline has a reply coming, which
    // carries the acknowledgement Nagle waits for.
    let (mut r, w) = stream.into_split();
    let w = Writer::Tcp(w);
    log_in(&mut r, &w, auth).await?;
    Ok(Link::start(addr, r, w))
}

/// `AUTH` and `SELECT` as the URL says, before the connection serves.
async fn log_in<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
    writer: &Writer,
    auth: &Auth,
) -> Result<(), LinkError> {
    let mut c = Commands::new();
    match (&auth.username, &auth.password) {
        (Some(user), Some(pass)) => c.push(&[Arg::Str("AUTH"), Arg::Str(user), Arg::Str(pass)]),
        (None, Some(pass)) => c.push(&[Arg::Str("AUTH"), Arg::Str(pass)]),
        _ => &mut c,
    };
    if auth.db != 0 {
        c.push(&[Arg::Str("SELECT"), Arg::Int(auth.db)]);
    }
    if c.is_empty() {
        return Ok(());
    }
    let refused = |why: String| LinkError::NotSent(format!("Redis refused the log-in: {why}"));
    writer
        .write_all(c.bytes())
        .await
        .map_err(|e| refused(e.to_string()))?;
    let mut buf = Vec::with_capacity(256);
    let mut replies = 0;
    while replies < c.len() {
        if buf.len() > 4096
            || reader
                .read_buf(&mut buf)
                .await
                .map_err(|e| refused(e.to_string()))?
                == 0
        {
            return Err(refused("connection closed".into()));
        }
        while let Some((reply, used)) = resp::parse(&buf).map_err(|e| refused(e.to_string()))? {
            buf.drain(..used);
            replies += 1;
            if let Reply::Error(e) = reply {
                // The code only: the message of a failed AUTH is no place for a secret, but say
                // nothing of the request's text either.
                return Err(refused(e.code().to_owned()));
            }
        }
    }
    Ok(())
}

/// The connection, and when opening it last failed.
pub(super) struct RequestPath {
    target: Target,
    link: ArcSwapOption<Link>,
    reopening: tokio::sync::Mutex<Option<Instant>>,
}

impl Drop for RequestPath {
    /// The link's reader task holds it too: closing stops the task and the socket.
    fn drop(&mut self) {
        self.close();
    }
}

impl RequestPath {
    pub(super) fn new(target: Target) -> Self {
        Self {
            target,
            link: ArcSwapOption::empty(),
            reopening: tokio::sync::Mutex::new(None),
        }
    }

    /// Sends `commands` and returns their replies, all within `deadline`.
    pub(super) async fn call(
        &self,
        commands: &Commands,
        deadline: Duration,
    ) -> Result<Vec<Reply>, LinkError> {
        let link = match self.current() {
            Some(link) => link,
            None => {
                let started = Instant::now();
                let link = tokio::time::timeout(deadline, self.reopen())
                    .await
                    .map_err(|_| LinkError::NotSent("timed out connecting".into()))??;
                let left = deadline.saturating_sub(started.elapsed());
                return self.send(&link, commands, left).await;
            }
        };
        self.send(&link, commands, deadline).await
    }

    async fn send(
        &self,
        link: &Arc<Link>,
        commands: &Commands,
        deadline: Duration,
    ) -> Result<Vec<Reply>, LinkError> {
        let r = link.call(commands, deadline).await;
        if let Err(e) = &r {
            // A node that says it does not serve (a demoted primary's READONLY) is left, so
            // that the next call reconnects where the target points then.
            if matches!(e, LinkError::Server(_)) && e.is_outage() {
                link.close();
            }
            self.target.follow_after(e);
        }
        r
    }

    /// Drops the connection (the next call opens another).
    pub(super) fn close(&self) {
        if let Some(link) = self.link.swap(None) {
            link.close();
        }
    }

    /// The open link, if it is usable and still goes where the target points.
    fn current(&self) -> Option<Arc<Link>> {
        let guard = self.link.load();
        let link = guard.as_ref()?;
        (!link.is_broken() && self.target.still(&link.addr)).then(|| link.clone())
    }

    /// Opens a new link unless another call just did, or an attempt failed a moment ago.
    async fn reopen(&self) -> Result<Arc<Link>, LinkError> {
        let mut failed_at = self.reopening.lock().await;
        if let Some(link) = self.current() {
            return Ok(link);
        }
        if failed_at.is_some_and(|at| at.elapsed() < REOPEN_EVERY) {
            return Err(LinkError::NotSent("reconnecting".into()));
        }
        match self.target.open().await {
            Ok(link) => {
                *failed_at = None;
                // The link it replaces (broken, or to a primary the sentinels no longer name)
                // is closed: its reader task would keep it open otherwise.
                if let Some(old) = self.link.swap(Some(link.clone())) {
                    old.close();
                }
                Ok(link)
            }
            Err(e) => {
                *failed_at = Some(Instant::now());
                static LOG: crate::log_limit::LogLimit = crate::log_limit::LogLimit::per_second();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
                if let Some(suppressed) = LOG.admit(now) {
                    tracing::warn!(error = %e, suppressed, "cannot open the request path's Redis connection");
                }
                self.target.follow_after(&e);
                Err(e)
            }
        }
    }
}
