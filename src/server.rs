//! Assembling and running the pingora server: proxy, admin and echo listeners, health checks.

use crate::admin::AdminApp;
use crate::auth::jwt::KeyError;
use crate::before_tls::BeforeHandshake;
use crate::clock::{Clock, SystemClock};
use crate::config::{process_env, Config, Env, SecretProblem};
use crate::conn_limit::{Handshaking, HeldPlace};
use crate::echo::EchoApp;
use crate::edge_stream::{EdgeApp, EdgeLimits};
use crate::errors::GatewayError;
use crate::gateway::Gateway;
use crate::log_limit::LogLimit;
use crate::proxy::GatewayProxy;
use crate::routing::upstream::HealthChecker;
use crate::store::{EmbeddedStore, RedisStore, Store, StoreError};
use async_trait::async_trait;
use pingora::listeners::tls::TlsSettings;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use std::sync::Arc;
use std::thread::JoinHandle;
use tokio::sync::Notify;

/// Room in a raw request head beyond `server.max_header_bytes`, for the request line (the
/// URI's path and query) and header framing. Heads up to the sum are parsed and judged by the
/// proxy (431 when their headers weigh more); longer heads are answered 431 as they arrive,
/// before pingora buffers them (it would take up to 1 MiB).
const REQUEST_LINE_ALLOWANCE: usize = 64 * 1024;

/// The head size bound and connection caps of the current configuration, and the 431.
struct ConfiguredEdge(Arc<Gateway>);

impl std::fmt::Debug for ConfiguredEdge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConfiguredEdge")
    }
}

impl EdgeLimits for ConfiguredEdge {
    fn max_head_bytes(&self) -> usize {
        self.0
            .live()
            .config
            .server
            .max_header_bytes
            .saturating_add(REQUEST_LINE_ALLOWANCE)
    }

    fn too_large(&self) -> Vec<u8> {
        raw_refusal(&self.0, &GatewayError::headers_too_large())
    }

    fn malformed(&self) -> Option<Vec<u8>> {
        Some(raw_refusal(&self.0, &GatewayError::malformed_request()))
    }

    fn admit_peer(&self, peer: Option<std::net::IpAddr>) -> Option<HeldPlace> {
        let live = self.0.live();
        let server = &live.config.server;
        // Trusted proxies carry many clients: they count toward the global cap only.
        let client = peer
            .map(crate::client_ip::canonical)
            .filter(|ip| !server.trusted_proxies.trusts(*ip))
            .map(|ip| crate::client_ip::limit_key(ip, server.ipv6_prefix));
        let permit = self
            .0
            .connections
            .admit(
                client,
                server.max_connections,
                server.max_connections_per_client,
                true,
            )
            .ok()?;
        Some(permit.into())
    }

    fn admit_any(&self) -> Option<HeldPlace> {
        let live = self.0.live();
        let server = &live.config.server;
        let permit = self
            .0
            .connections
            .admit(
                None,
                server.max_connections,
                server.max_connections_per_client,
                // A place to read a PROXY header in: its client is not known yet.
                false,
            )
            .ok()?;
        Some(permit.into())
    }

    fn trusts(&self, peer: std::net::IpAddr) -> bool {
        self.0.live().config.server.trusted_proxies.trusts(peer)
    }

    fn keepalive_timeout(&self) -> std::time::Duration {
        self.0.live().config.server.keepalive_timeout
    }

    fn send_timeout(&self) -> std::time::Duration {
        self.0.live().config.server.send_timeout
    }

    fn proxy_header_refused(&self, why: &crate::proxy_protocol::HeaderError) {
        static LOG: LogLimit = LogLimit::per_second();
        if !why.is_refusal() {
            return;
        }
        self.0.connections.proxy_header_refused();
        if let Some(suppressed) = LOG.admit(self.0.clock.now_ns()) {
            tracing::warn!(reason = %why, suppressed, "connection closed: PROXY protocol header refused");
        }
    }
}

/// A refusal written whole by the edge stream, outside pingora's response writer: the
/// gateway's JSON error, and a close.
fn raw_refusal(gw: &Gateway, err: &GatewayError) -> Vec<u8> {
    let (head, body) = gw.refusal(err);
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(head.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        head.status
            .canonical_reason()
            .unwrap_or_default()
            .as_bytes(),
    );
    out.extend_from_slice(b"\r\n");
    for (name, value) in &head.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"connection: close\r\n\r\n");
    out.extend_from_slice(&body);
    out
}

/// Connections the admin listener holds at once, in all and per client address: probes, a
/// Prometheus and a few operators need far fewer, and no caller can take them all.
const ADMIN_MAX_CONNECTIONS: usize = 100;
const ADMIN_MAX_CONNECTIONS_PER_CLIENT: usize = 25;

/// The admin listener's edge: the proxy's head deadline and bound, and its own connection caps
/// (a caller that reaches it must not starve the probes on its one thread).
#[derive(Debug)]
struct AdminEdge(ConfiguredEdge);

impl EdgeLimits for AdminEdge {
    fn max_head_bytes(&self) -> usize {
        self.0.max_head_bytes()
    }

    fn too_large(&self) -> Vec<u8> {
        self.0.too_large()
    }

    /// The admin app (pingora's `HttpServer`) closes on a head it cannot parse, unanswered.
    fn malformed(&self) -> Option<Vec<u8>> {
        None
    }

    fn admit_peer(&self, peer: Option<std::net::IpAddr>) -> Option<HeldPlace> {
        let client = peer.map(crate::client_ip::canonical);
        let gateway = &self.0 .0;
        let permit = gateway
            .admin_connections
            .admit(
                client,
                ADMIN_MAX_CONNECTIONS,
                ADMIN_MAX_CONNECTIONS_PER_CLIENT,
                true,
            )
            .ok()?;
        Some(permit.into())
    }

    fn admit_any(&self) -> Option<HeldPlace> {
        self.admit_peer(None)
    }

    fn trusts(&self, _peer: std::net::IpAddr) -> bool {
        false
    }

    fn keepalive_timeout(&self) -> std::time::Duration {
        self.0.keepalive_timeout()
    }

    fn send_timeout(&self) -> std::time::Duration {
        self.0.send_timeout()
    }

    fn proxy_header_refused(&self, _why: &crate::proxy_protocol::HeaderError) {}
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Secrets(Vec<SecretProblem>),
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot start: {0}")]
    Keys(#[from] KeyError),
    #[error("cannot create {}: {source}", .path.display())]
    Directory {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the server thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot set up TLS: {0}")]
    Tls(String),
    #[error("cannot open the access log: {0}")]
    AccessLog(std::io::Error),
    #[error("{0}")]
    Spans(String),
}

/// pingora's TLS accept hooks, none of which the gateway needs (certificates come from the
/// resolver).
struct NoTlsCallbacks;

#[async_trait]
impl pingora::listeners::TlsAccept for NoTlsCallbacks {}

/// Opens the store the configuration names; `upgrade`: the embedded store's data file may
/// still be owned by the process this one takes over from (see [`EmbeddedStore`]).
pub fn open_store(config: &Config, upgrade: bool) -> Result<Arc<dyn Store>, StartError> {
    Ok(match &config.store.redis {
        Some(redis) => Arc::new(RedisStore::connect(redis)?),
        None if upgrade => EmbeddedStore::open_for_upgrade(&config.store.data_file)?,
        None => Arc::new(EmbeddedStore::open(&config.store.data_file)?),
    })
}

/// How a server starts.
pub struct Launch {
    pub clock: Arc<dyn Clock>,
    pub env: Env,
    /// Take the listening sockets over from a running old process (graceful binary upgrade).
    pub upgrade: bool,
}

impl Default for Launch {
    fn default() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            env: process_env(),
            upgrade: false,
        }
    }
}

/// Binds every listening address once, all at the same time, before pingora does: pingora
/// builds each service's listeners on that service's own thread and panics there when one
/// cannot bind, which leaves the others serving (a process up, ready, with no proxy). Not for
/// `run --upgrade`, which takes the bound sockets over.
fn listeners_free(config: &Config) -> Result<(), StartError> {
    let addrs = [
        Some(config.server.listen),
        config.server.tls.as_ref().map(|t| t.listen),
        Some(config.admin.listen),
        config.echo,
    ];
    // Bound, never listening: a client that connects now is refused, not taken into a backlog
    // that is dropped a moment later. SO_REUSEADDR as pingora sets it, so that connections
    // of a previous process waiting out TIME_WAIT do not count as taken; one listening does.
    let bind = |addr: std::net::SocketAddr| {
        let socket = match addr {
            std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        }?;
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        Ok::<_, std::io::Error>(socket)
    };
    // A previous process (or, in one process, a server just stopped) may close its listener a
    // moment after it is gone: "in use" is retried for a while, as pingora retries its own
    // bind (30 times, 1 s apart), but a port still taken then is refused.
    let deadline = std::time::Instant::now() + LISTENER_WAIT;
    let bind_soon = |addr: std::net::SocketAddr| loop {
        match bind(addr) {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(LISTENER_RETRY);
            }
            other => return other.map_err(|source| StartError::Listen { addr, source }),
        }
    };
    let bound = addrs
        .into_iter()
        .flatten()
        .map(bind_soon)
        .collect::<Result<Vec<_>, _>>()?;
    drop(bound);
    Ok(())
}

/// How long `run` waits for a listening address in use to come free, and how often it looks.
const LISTENER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
const LISTENER_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// Builds the pingora server and the gateway it serves.
pub fn build(config: Config, launch: Launch) -> Result<(Server, Arc<Gateway>), StartError> {
    let missing = config.secret_problems();
    if !missing.is_empty() {
        return Err(StartError::Secrets(missing));
    }
    if !launch.upgrade {
        listeners_free(&config)?;
    }
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let store = open_store(&config, launch.upgrade)?;
    let access_log = match &config.log.access {
        Some(settings) => Some(
            crate::access_log::AccessLog::start(settings.clone()).map_err(StartError::AccessLog)?,
        ),
        None => None,
    };
    #[cfg(feature = "otlp")]
    let spans = match &config.log.otlp {
        Some((endpoint, service)) => Some(
            crate::spans::Spans::start(endpoint, service)
                .map_err(|e| StartError::Spans(e.to_string()))?,
        ),
        None => None,
    };
    let mut gateway = Gateway::new(config, store, launch.clock, launch.env)?;
    gateway.access_log = access_log;
    #[cfg(feature = "otlp")]
    {
        gateway.spans = spans;
    }
    let gateway = Arc::new(gateway);
    let live = gateway.live();
    let cfg = &live.config;
    for file in [&cfg.server.upgrade_sock, &cfg.server.pid_file] {
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StartError::Directory {
                path: dir.to_path_buf(),
                source,
            })?;
        }
    }
    let grace = cfg.server.grace_period.as_secs();
    let conf = ServerConf {
        threads: cfg.server.threads,
        grace_period_seconds: Some(grace),
        graceful_shutdown_timeout_seconds: Some(grace.max(1)),
        upgrade_sock: cfg.server.upgrade_sock.display().to_string(),
        pid_file: cfg.server.pid_file.display().to_string(),
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade: launch.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let mut app =
        pingora::proxy::http_proxy(&server.configuration, GatewayProxy::new(gateway.clone()));
    // HTTP/2 connections idle as long as HTTP/1.1 ones may (set_keepalive is HTTP/1 only).
    let mut options = pingora::apps::HttpServerOptions::default();
    options.h2_idle_timeout = Some(cfg.server.keepalive_timeout);
    options.h2c = cfg.server.h2c;
    // CONNECT reaches the gateway's own checks, which refuse it in the JSON error shape
    // (pingora's own refusal is a bare 405).
    options.allow_connect_method_proxying = true;
    app.server_options = Some(options);
    // Every accepted connection's stream gets the whole-head deadline.
    let limits: Arc<dyn EdgeLimits> = Arc::new(ConfiguredEdge(gateway.clone()));
    let handshaking = Arc::new(Handshaking::default());
    let mut proxy = Service::new(
        "msgflash-gateway".to_string(),
        EdgeApp {
            inner: Arc::new(app),
            timeout: cfg.server.header_timeout,
            limits: limits.clone(),
            proxy_protocol: cfg.server.proxy_protocol,
            handshaking: handshaking.clone(),
        },
    );
    proxy.add_tcp(&cfg.server.listen.to_string());
    if let (Some(tls), Some(resolver)) = (&cfg.server.tls, &gateway.certs) {
        let mut settings = TlsSettings::with_callbacks(Box::new(NoTlsCallbacks))
            .map_err(|e| StartError::Tls(e.to_string()))?;
        settings.set_cert_resolver(resolver.clone());
        // ALPN: h2 preferred, http/1.1 allowed; every phase runs the same on both.
        settings.enable_h2();
        proxy.add_tls_with_settings(&tls.listen.to_string(), None, settings);
        // pingora runs this hook on TLS listeners only, before each handshake: the PROXY
        // header, the connection caps, the ClientHello within the head deadline.
        proxy
            .endpoints()
            .set_pre_tls_callback(Arc::new(BeforeHandshake {
                timeout: cfg.server.header_timeout,
                limits,
                proxy_protocol: tls.proxy_protocol,
                handshaking,
            }));
    }

    let mut admin = Service::new(
        "msgflash-admin".to_string(),
        EdgeApp {
            inner: Arc::new(AdminApp(gateway.clone())),
            timeout: cfg.server.header_timeout,
            limits: Arc::new(AdminEdge(ConfiguredEdge(gateway.clone()))),
            proxy_protocol: false,
            handshaking: Arc::new(Handshaking::default()),
        },
    );
    match &gateway.admin_certs {
        // TLS only (HTTP/1.1), certificates by SNI, rotated on reload like the public ones.
        Some(resolver) => {
            let mut settings = TlsSettings::with_callbacks(Box::new(NoTlsCallbacks))
                .map_err(|e| StartError::Tls(e.to_string()))?;
            settings.set_cert_resolver(resolver.clone());
            admin.add_tls_with_settings(&cfg.admin.listen.to_string(), None, settings);
        }
        None => admin.add_tcp(&cfg.admin.listen.to_string()),
    }
    admin.threads = Some(1);

    server.add_service(proxy);
    server.add_service(admin);
    server.add_service(background_service(
        "upstream health",
        HealthChecker {
            pools: {
                let gateway = gateway.clone();
                Box::new(move || gateway.live().pools.clone())
            },
        },
    ));
    server.add_service(background_service(
        "reload on SIGHUP",
        ReloadOnHangup(gateway.clone()),
    ));
    server.add_service(background_service(
        "reopen the access log on SIGUSR1",
        ReopenOnUsr1(gateway.clone()),
    ));
    if let Some(echo_addr) = cfg.echo {
        let mut echo = Service::new("msgflash-echo".to_string(), EchoApp);
        echo.add_tcp(&echo_addr.to_string());
        echo.threads = Some(1);
        server.add_service(echo);
    }
    Ok((server, gateway))
}

/// Reloads gateway.toml and the policies on SIGHUP; a refused reload is logged with its
/// reasons and changes nothing.
struct ReloadOnHangup(Arc<Gateway>);

#[async_trait]
impl BackgroundService for ReloadOnHangup {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangups = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::hangup(),
        ) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP; reload with POST /admin/v1/reload");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                got = hangups.recv() => {
                    if got.is_none() {
                        return;
                    }
                    match self.0.reload() {
                        Ok(r) => tracing::info!(routes = r.routes, route_policies = r.route_policies, plans = r.plans, needs_restart = ?r.needs_restart, "configuration reloaded"),
                        Err(why) => tracing::error!(reasons = %why, "reload refused; the current configuration stays"),
                    }
                }
            }
        }
    }
}

/// Reopens the access log file on SIGUSR1 (logrotate's `postrotate`).
struct ReopenOnUsr1(Arc<Gateway>);

#[async_trait]
impl BackgroundService for ReopenOnUsr1 {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // Installed even without an access log: logrotate's `kill -USR1` must never be the
        // default action (terminate).
        let mut signals = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::user_defined1(),
        ) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGUSR1; the access log is not reopened");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                got = signals.recv() => {
                    if got.is_none() {
                        return;
                    }
                    if let Some(log) = &self.0.access_log {
                        log.reopen();
                        tracing::info!("access log reopened");
                    }
                }
            }
        }
    }
}

/// Serves until SIGTERM (graceful), SIGINT (fast) or SIGQUIT (hand-over to a new binary
/// started with `run --upgrade`); SIGHUP reloads.
pub fn run(config: Config, upgrade: bool) -> Result<(), StartError> {
    handle_signals_from_the_start();
    let (server, gateway) = build(
        config,
        Launch {
            upgrade,
            ..Launch::default()
        },
    )?;
    let live = gateway.live();
    let cfg = &live.config;
    tracing::info!(
        listen = %cfg.server.listen,
        admin = %cfg.admin.listen,
        echo = ?cfg.echo,
        routes = cfg.routes.len(),
        upgrade,
        "msgflash-gateway starting"
    );
    drop(live);
    server.run(RunArgs::default());
    // Stopped: the embedded store's last counts are written and its files let go (a process
    // started with --upgrade is waiting for them).
    gateway.store.release();
    #[cfg(feature = "otlp")]
    if let Some(spans) = &gateway.spans {
        spans.flush();
    }
    Ok(())
}

/// SIGHUP and SIGUSR1 end a process by default, and the services that act on them start
/// listening only once the server runs: one sent in between (logrotate right after a start)
/// killed the gateway. Their handlers are installed now; tokio keeps a handler once installed
/// for the life of the process, so a signal that comes before its service listens is dropped,
/// never fatal.
fn handle_signals_from_the_start() {
    use tokio::signal::unix::{signal, SignalKind};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build();
    match runtime {
        Ok(rt) => rt.block_on(async {
            for kind in [SignalKind::hangup(), SignalKind::user_defined1()] {
                if let Err(e) = signal(kind) {
                    tracing::warn!(error = %e, "cannot handle a signal before the server runs");
                }
            }
        }),
        Err(e) => tracing::warn!(error = %e, "cannot handle signals before the server runs"),
    }
}

/// Shutdown on demand, for gateways run inside another program (tests, benches).
struct NotifyShutdown(Arc<Notify>);

#[async_trait]
impl ShutdownSignalWatch for NotifyShutdown {
    async fn recv(&self) -> ShutdownSignal {
        self.0.notified().await;
        ShutdownSignal::FastShutdown
    }
}

/// A gateway serving on its own thread.
pub struct Running {
    pub gateway: Arc<Gateway>,
    stop: Arc<Notify>,
    thread: Option<JoinHandle<()>>,
}

impl Running {
    /// Starts a gateway on a background thread; its listeners bind as the thread starts.
    pub fn start(config: Config, clock: Arc<dyn Clock>) -> Result<Running, StartError> {
        Self::start_with(
            config,
            Launch {
                clock,
                ..Launch::default()
            },
        )
    }

    /// As [`Running::start`], with secrets from `launch.env`.
    pub fn start_with(config: Config, launch: Launch) -> Result<Running, StartError> {
        let (server, gateway) = build(config, launch)?;
        let stop = Arc::new(Notify::new());
        let signal = NotifyShutdown(stop.clone());
        let thread = std::thread::Builder::new()
            .name("msgflash-gateway".into())
            .spawn(move || {
                server.run(RunArgs {
                    shutdown_signal: Box::new(signal),
                })
            })
            .map_err(StartError::Thread)?;
        Ok(Running {
            gateway,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the gateway and waits for its thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
            self.gateway.store.release();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown();
    }
}
