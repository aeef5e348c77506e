//! Redis Sentinel (URLs parsed by the configuration, [`SentinelUrl`]): finding the current primary through the sentinels,
//! and a connection that follows a failover. A call that fails as an outage (the primary gone,
//! or a demoted one answering `READONLY`) asks the sentinels again, at most every
//! [`REFRESH_EVERY`], and the connection moves to the primary they name once it says it is one.

pub(crate) use crate::config::SentinelUrl;
use arc_swap::ArcSwap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, FromRedisValue, IntoConnectionInfo, Pipeline, RedisResult, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a failing connection asks the sentinels for the primary, at most.
const REFRESH_EVERY: Duration = Duration::from_millis(200);
/// How many times in a row a failing connection looks for the primary (every
/// [`REFRESH_EVERY`]: a minute) before it waits for the next failure to look again.
const FOLLOW_ATTEMPTS: u32 = 300;
/// How long one sentinel or candidate primary may take to answer.
const ASK_TIMEOUT: Duration = Duration::from_millis(500);

impl SentinelUrl {
    fn client(
        &self,
        host_port: &str,
        username: &Option<String>,
        password: &Option<String>,
        db: i64,
    ) -> RedisResult<redis::Client> {
        let (host, port) = host_port
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
            .ok_or((redis::ErrorKind::InvalidClientConfig, "not host:port"))?;
        let mut redis_info = redis::RedisConnectionInfo::default().set_db(db);
        if let Some(u) = username {
            redis_info = redis_info.set_username(u);
        }
        if let Some(p) = password {
            redis_info = redis_info.set_password(p);
        }
        let info = redis::ConnectionAddr::Tcp(host.to_owned(), port)
            .into_connection_info()?
            .set_redis_settings(redis_info);
        redis::Client::open(info)
    }

    /// A client for the primary at `addr`, with the URL's credentials and database.
    pub(crate) fn primary_client(&self, addr: &str) -> RedisResult<redis::Client> {
        self.client(addr, &self.username, &self.password, self.db)
    }

    /// Asks the sentinels, in order, where the primary is, and checks that it says it is one
    /// (a sentinel may lag behind a failover): its `host:port`.
    pub(crate) async fn find_primary(&self) -> RedisResult<String> {
        let mut last = None;
        for sentinel in &self.sentinels {
            let asked = async {
                let client = self.client(
                    sentinel,
                    &self.sentinel_username,
                    &self.sentinel_password,
                    0,
                )?;
                let mut conn = client.get_multiplexed_async_connection().await?;
                let (host, port): (String, u16) = redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(&self.master)
                    .query_async(&mut conn)
                    .await?;
                let addr = if host.contains(':') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                };
                let mut primary = self
                    .primary_client(&addr)?
                    .get_multiplexed_async_connection()
                    .await?;
                let role: Vec<Value> = redis::cmd("ROLE").query_async(&mut primary).await?;
                match role.first() {
                    Some(Value::BulkString(r)) if r == b"master" => Ok(addr),
                    _ => Err(redis::RedisError::from((
                        redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
                        "the named primary is not a primary (yet)",
                    ))),
                }
            };
            match tokio::time::timeout(ASK_TIMEOUT, asked).await {
                Ok(Ok(addr)) => return Ok(addr),
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    last = Some(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "a sentinel or primary did not answer in time",
                    )))
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::Io, "no sentinel answered"))
        }))
    }
}

/// A connection to whichever node the sentinels name as the primary.
#[derive(Clone)]
pub(crate) struct SentinelConn(Arc<Following>);

struct Following {
    url: SentinelUrl,
    config: ConnectionManagerConfig,
    /// The primary's address and the connection to it.
    current: ArcSwap<(String, ConnectionManager)>,
    refreshing: AtomicBool,
    last_refresh: parking_lot::Mutex<Instant>,
    /// Where the search for a new primary runs (the store's runtime).
    runtime: tokio::runtime::Handle,
}

impl SentinelConn {
    /// Connects to the primary the sentinels name now.
    pub(crate) async fn connect(
        url: &SentinelUrl,
        config: &ConnectionManagerConfig,
    ) -> RedisResult<Self> {
        let addr = url.find_primary().await?;
        let manager = url
            .primary_client(&addr)?
            .get_connection_manager_with_config(config.clone())
            .await?;
        Ok(Self(Arc::new(Following {
            url: url.clone(),
            config: config.clone(),
            current: ArcSwap::from_pointee((addr, manager)),
            refreshing: AtomicBool::new(false),
            last_refresh: parking_lot::Mutex::new(Instant::now()),
            runtime: tokio::runtime::Handle::current(),
        })))
    }

    pub(crate) async fn cmd<T: FromRedisValue>(&self, cmd: &Cmd) -> RedisResult<T> {
        let mut c = self.0.current.load().1.clone();
        let r = cmd.query_async(&mut c).await;
        self.after(&r);
        r
    }

    pub(crate) async fn pipe<T: FromRedisValue>(&self, p: &Pipeline) -> RedisResult<T> {
        let mut c = self.0.current.load().1.clone();
        let r = p.query_async(&mut c).await;
        self.after(&r);
        r
    }

    /// The primary's `host:port` now.
    pub(crate) fn addr(&self) -> String {
        self.0.current.load().0.clone()
    }

    /// Whether the primary is at `addr` now.
    pub(crate) fn is_at(&self, addr: &str) -> bool {
        self.0.current.load().0 == addr
    }

    /// After an outage-like failure, asks the sentinels again (in the background, at most
    /// every [`REFRESH_EVERY`]).
    fn after<T>(&self, r: &RedisResult<T>) {
        if let Err(e) = r {
            if super::connection::is_outage(e) {
                self.suspect();
            }
        }
    }

    /// The primary failed as in an outage: asks the sentinels again (in the background, at
    /// most every [`REFRESH_EVERY`]).
    pub(crate) fn suspect(&self) {
        {
            let mut last = self.0.last_refresh.lock();
            if last.elapsed() < REFRESH_EVERY || self.0.refreshing.swap(true, Ordering::AcqRel) {
                return;
            }
            *last = Instant::now();
        }
        let following = self.0.clone();
        self.0.runtime.spawn(async move {
            // Until the sentinels name a primary that answers as one (a failover takes a few
            // seconds: meanwhile they still name the dead one), bounded; calls meanwhile fail
            // as an outage (503), the circuit breaker keeps them short.
            for _ in 0..FOLLOW_ATTEMPTS {
                if follow(&following).await {
                    break;
                }
                tokio::time::sleep(REFRESH_EVERY).await;
            }
            *following.last_refresh.lock() = Instant::now();
            following.refreshing.store(false, Ordering::Release);
        });
    }
}

/// Moves the connection to the primary the sentinels name, if it is not where it points:
/// true once it points at a primary that answered as one.
async fn follow(f: &Following) -> bool {
    let addr = match f.url.find_primary().await {
        Ok(addr) => addr,
        Err(e) => {
            tracing::debug!(error = %e, master = %f.url.master, "no Redis primary through the sentinels yet");
            return false;
        }
    };
    if f.current.load().0 == addr {
        return true;
    }
    let connected = match f.url.primary_client(&addr) {
        Ok(client) => {
            tokio::time::timeout(
                ASK_TIMEOUT,
                client.get_connection_manager_with_config(f.config.clone()),
            )
            .await
        }
        Err(e) => Ok(Err(e)),
    };
    match connected {
        Ok(Ok(manager)) => {
            tracing::warn!(primary = %addr, master = %f.url.master, "Redis failover followed: new primary");
            f.current.store(Arc::new((addr, manager)));
            true
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, primary = %addr, "cannot connect to the new Redis primary");
            false
        }
        Err(_) => {
            tracing::warn!(primary = %addr, "timed out connecting to the new Redis primary");
            false
        }
    }
}
