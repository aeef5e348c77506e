//! Assembling and running the pingora server: proxy, admin and echo listeners, health checks.

use crate::admin::AdminApp;
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::echo::EchoApp;
use crate::proxy::upstream::HealthChecker;
use crate::proxy::{Gateway, GatewayProxy};
use crate::store::{EmbeddedStore, RedisStore, Store};
use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use std::fmt;
use std::sync::Arc;
use std::thread::JoinHandle;
use tokio::sync::Notify;

/// Why the gateway could not start.
#[derive(Debug)]
pub enum StartError {
    MissingSecrets(Vec<String>),
    Store(String),
    Setup(String),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingSecrets(list) => write!(f, "{}", list.join("; ")),
            Self::Store(why) => write!(f, "cannot open the store: {why}"),
            Self::Setup(why) => write!(f, "cannot start: {why}"),
        }
    }
}

impl std::error::Error for StartError {}

/// Opens the store the configuration names.
pub fn open_store(config: &Config) -> Result<Arc<dyn Store>, StartError> {
    let err = |e: crate::store::StoreError| StartError::Store(e.to_string());
    Ok(match &config.store.redis {
        Some(redis) => Arc::new(RedisStore::connect(redis).map_err(err)?),
        None => Arc::new(EmbeddedStore::open(&config.store.data_file).map_err(err)?),
    })
}

/// Builds the pingora server and the gateway it serves.
pub fn build(config: Config, clock: Arc<dyn Clock>) -> Result<(Server, Arc<Gateway>), StartError> {
    let missing = config.missing_secrets();
    if !missing.is_empty() {
        return Err(StartError::MissingSecrets(missing));
    }
    let store = open_store(&config)?;
    let gateway = Arc::new(Gateway::new(config, store, clock).map_err(StartError::Setup)?);
    let cfg = &gateway.config;
    let grace = cfg.server.grace_period.as_secs();
    let conf = ServerConf {
        threads: cfg.server.threads,
        grace_period_seconds: Some(grace),
        graceful_shutdown_timeout_seconds: Some(grace.max(1)),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        GatewayProxy(gateway.clone()),
        "msgflash-gateway",
    );
    proxy.add_tcp(&cfg.server.listen.to_string());

    let mut admin = Service::new("msgflash-admin".to_string(), AdminApp(gateway.clone()));
    admin.add_tcp(&cfg.admin.listen.to_string());
    admin.threads = Some(1);

    let health = background_service(
        "upstream health",
        HealthChecker {
            pools: gateway.pools.clone(),
        },
    );

    server.add_service(proxy);
    server.add_service(admin);
    server.add_service(health);
    if let Some(echo_addr) = cfg.echo {
        let mut echo = Service::new("msgflash-echo".to_string(), EchoApp);
        echo.add_tcp(&echo_addr.to_string());
        echo.threads = Some(1);
        server.add_service(echo);
    }
    Ok((server, gateway))
}

/// Serves until SIGTERM (graceful), SIGINT (fast) or SIGQUIT (hand-over to a new binary).
pub fn run(config: Config) -> Result<(), StartError> {
    let (server, gateway) = build(config, Arc::new(SystemClock))?;
    let cfg = &gateway.config;
    tracing::info!(
        listen = %cfg.server.listen,
        admin = %cfg.admin.listen,
        echo = ?cfg.echo,
        routes = cfg.routes.len(),
        "msgflash-gateway starting"
    );
    server.run(RunArgs::default());
    Ok(())
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
        let (server, gateway) = build(config, clock)?;
        let stop = Arc::new(Notify::new());
        let signal = NotifyShutdown(stop.clone());
        let thread = std::thread::Builder::new()
            .name("msgflash-gateway".into())
            .spawn(move || {
                server.run(RunArgs {
                    shutdown_signal: Box::new(signal),
                })
            })
            .map_err(|e| StartError::Setup(e.to_string()))?;
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
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown();
    }
}
