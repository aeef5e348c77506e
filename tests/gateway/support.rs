//! Test harness: a real gateway (in-process, real listeners) with a manual clock, the built-in
//! echo upstream as the recording backend, and helpers that speak HTTP to both listeners.

use crate::client::{request, Connection, HttpResponse};
use msgflash_gateway::clock::ManualClock;
use msgflash_gateway::config::Config;
use msgflash_gateway::server::{Launch, Running};
use serde_json::{json, Value};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
pub const JWT_SECRET: &str = "hs256-test-key-0123456789abcdef0123456789";
/// 2026-11-29T00:00:00Z: every test starts its clock here.
pub const T0: u64 = 1_795_910_400;

/// A free port for a listener the test starts later. Not an ephemeral port (the kernel hands
/// those out to outgoing connections, so one found free could be taken before the gateway or
/// Redis binds it): ports come from below the ephemeral range (32768 on Linux), each once per
/// test process, starting at an offset drawn from the process id so that two test processes
/// rarely meet, and each is checked free by binding it. (The check alone cannot keep two
/// processes apart: both may find a port free before either binds it, and pingora's
/// listeners bind with `SO_REUSEPORT`, so both would then serve it.)
pub fn free_addr() -> SocketAddr {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    free_port_in(22_800, 9_900, 6_961, &NEXT, |_| true)
}

/// A port whose Redis Cluster bus port (+10000) is free too, both below the ephemeral range.
pub fn free_cluster_addr() -> SocketAddr {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    free_port_in(20_000, 2_700, 2_659, &NEXT, |port| {
        TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
    })
}

/// A port in `low..low + span`, the search starting at `pid × stride` (mod `span`): nextest
/// starts each test in its own process, mostly with consecutive ids, and `stride` puts
/// processes whose ids differ by less than 64 at least 153 ports apart (41 in the cluster
/// range), where `pid` alone put them one port apart.
fn free_port_in(
    low: u16,
    span: u16,
    stride: u32,
    next: &AtomicU16,
    also: impl Fn(u16) -> bool,
) -> SocketAddr {
    let spread = u64::from(std::process::id()) * u64::from(stride) % u64::from(span);
    let offset = u16::try_from(spread).unwrap_or(0);
    for _ in 0..span {
        let n = next.fetch_add(1, Ordering::Relaxed) % span;
        let port = low + (offset + n) % span;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            if also(port) {
                return l.local_addr().expect("local addr");
            }
        }
    }
    panic!("no free port between {low} and {}", low + span)
}

/// Waits until something accepts connections on `addr` (bounded: 20 s).
pub fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::yield_now();
    }
}

/// The test route policies (`Setup::policies` is appended).
pub const ROUTE_POLICIES: &str = r#"
scopes = ["messages:send", "messages:read", "instances:read"]

[[route]]
prefix = "/api/auth/"
ip_rate_per_second = 1
ip_burst = 3

[[route]]
prefix = "/api/v1/messages/send"
methods = ["POST"]
scope = "messages:send"
instance = { from = "body", field = "instanceId" }

[[route]]
prefix = "/api/v1/messages/"
methods = ["GET"]
scope = "messages:read"
require_subscription = false
instance = { from = "query", param = "instanceId" }

[[route]]
prefix = "/api/v1/instances/"
scope = "instances:read"
instance = { from = "path", segment = 3 }
"#;

pub const PLANS: &str = r#"
[plans.free]
max_keys = 1
monthly_requests = 1000
[plans.starter]
max_keys = 3
monthly_requests = 50
[plans.pro]
max_keys = 10
monthly_requests = 500000
[plans.plus]
max_keys = 10
monthly_requests = 5000000
[plans.tiny]
max_keys = 2
monthly_requests = 5
[plans.slow]
max_keys = 3
monthly_requests = 1000
rate_per_second = 1
burst = 10
"#;

/// Which store a gateway runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    Redis,
}

/// Runs each named `fn(Backend)` as a test on both stores, so that they cannot drift.
#[macro_export]
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $( #[test] fn $name() { super::$name($crate::support::Backend::Embedded) } )*
        }
        mod redis {
            $( #[test] fn $name() { super::$name($crate::support::Backend::Redis) } )*
        }
    };
}

/// How a test gateway differs from the default, said with the builder methods below:
/// `Setup::new().on_redis(url).sharing(clock).route_policies(SHIPPED)`.
#[derive(Clone)]
pub struct Setup {
    redis_url: Option<String>,
    clock: Option<Arc<ManualClock>>,
    /// Extra [[route]] policies appended to the test routes.toml.
    more_policies: String,
    /// Replaces the whole test routes.toml (e.g. with the shipped one).
    route_policies: Option<String>,
    /// Extra lines in the [server] table.
    server: String,
    /// Extra lines in the [admin] table.
    admin: String,
    /// The [log] table's lines (the access log is off when empty).
    log: String,
    api_upstream: ApiUpstream,
    plans: String,
}

/// An address of the test's `api` upstream.
#[derive(Clone)]
pub enum At {
    /// The gateway's own echo upstream.
    Echo,
    /// Any other address (a dead port, a silent listener).
    Addr(String),
}

/// The `[upstreams.api]` table of a test gateway.
#[derive(Clone)]
pub struct ApiUpstream {
    pub addresses: Vec<At>,
    pub connect_timeout: &'static str,
    pub read_timeout: &'static str,
    /// `{ interval = …, timeout = …, unhealthy_threshold = … }`
    pub health_check: Option<&'static str>,
    /// Lines of TLS settings (`tls = true`, `sni = …`, `ca_file = …`).
    pub tls: Option<&'static str>,
    /// `host = "…"`: the Host forwarded requests carry.
    pub host: Option<&'static str>,
}

impl Default for ApiUpstream {
    fn default() -> Self {
        Self {
            addresses: vec![At::Echo],
            connect_timeout: "1s",
            read_timeout: "2s",
            health_check: None,
            tls: None,
            host: None,
        }
    }
}

impl ApiUpstream {
    fn toml(&self, echo: SocketAddr) -> String {
        let addresses = self
            .addresses
            .iter()
            .map(|a| match a {
                At::Echo => format!("\"{echo}\""),
                At::Addr(addr) => format!("\"{addr}\""),
            })
            .collect::<Vec<_>>()
            .join(", ");
        let mut t = format!(
            "[upstreams.api]\naddresses = [{addresses}]\nconnect_timeout = \"{}\"\nread_timeout = \"{}\"\n",
            self.connect_timeout, self.read_timeout
        );
        if let Some(h) = self.health_check {
            t.push_str(&format!("health_check = {h}\n"));
        }
        if let Some(host) = self.host {
            t.push_str(&format!("host = \"{host}\"\n"));
        }
        if let Some(tls) = self.tls {
            t.push_str(tls);
            t.push('\n');
        }
        t
    }
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            redis_url: None,
            clock: None,
            more_policies: String::new(),
            route_policies: None,
            server: String::new(),
            admin: String::new(),
            log: String::new(),
            api_upstream: ApiUpstream::default(),
            plans: PLANS.into(),
        }
    }
}

impl Setup {
    pub fn new() -> Self {
        Self::default()
    }

    /// The Redis store at `url` instead of the embedded one.
    pub fn on_redis(mut self, url: String) -> Self {
        self.redis_url = Some(url);
        self
    }

    /// A clock shared with other gateways (multi-node tests).
    pub fn sharing(mut self, clock: &Arc<ManualClock>) -> Self {
        self.clock = Some(clock.clone());
        self
    }

    /// These route policies instead of the test ones.
    pub fn route_policies(mut self, toml: &str) -> Self {
        self.route_policies = Some(toml.to_owned());
        self
    }

    /// These route policies after the test ones.
    pub fn more_policies(mut self, toml: &str) -> Self {
        self.more_policies.push_str(toml);
        self
    }

    /// A line in `[server]`.
    pub fn server(mut self, line: &str) -> Self {
        self.server.push_str(line);
        self.server.push('\n');
        self
    }

    /// A line in `[log]` (any line: the access log is on, to stdout unless a line says where).
    pub fn log(mut self, line: &str) -> Self {
        self.log.push_str(line);
        self.log.push('\n');
        self
    }

    /// A line in `[admin]`.
    pub fn admin(mut self, line: &str) -> Self {
        self.admin.push_str(line);
        self.admin.push('\n');
        self
    }

    pub fn api_upstream(mut self, upstream: ApiUpstream) -> Self {
        self.api_upstream = upstream;
        self
    }
}

pub struct Gateway {
    pub dir: tempfile::TempDir,
    pub clock: Arc<ManualClock>,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub echo: SocketAddr,
    pub running: Option<Running>,
    /// The Redis this gateway started for itself (Backend::Redis).
    pub redis: Option<crate::redis_server::RedisServer>,
    setup: Setup,
}

pub fn write_config(
    dir: &Path,
    s: &Setup,
    proxy: SocketAddr,
    admin: SocketAddr,
    echo: SocketAddr,
) -> PathBuf {
    std::fs::create_dir_all(dir.join("policies")).expect("mkdir");
    std::fs::write(dir.join("policies/plans.toml"), &s.plans).expect("plans");
    std::fs::write(
        dir.join("policies/routes.toml"),
        s.route_policies
            .clone()
            .unwrap_or_else(|| format!("{ROUTE_POLICIES}\n{}", s.more_policies)),
    )
    .expect("routes");
    let api = s.api_upstream.toml(echo);
    let text = format!(
        r#"
[server]
listen = "{proxy}"
threads = 2
max_header_bytes = 8192
max_body_bytes = 4096
max_inspected_body_bytes = 2048
grace_period = "1s"
{server}

[admin]
listen = "{admin}"
token_env = "TEST_ADMIN_TOKEN"
{admin_extra}

[store]
data_file = "data/store.jsonl"
{redis}

[policies]
dir = "policies"

[jwt]
algorithms = ["HS256"]
secret_env = "TEST_JWT_SECRET"
issuer = "msgflash"
audience = "msgflash-console"

[forward]
strip_request_headers = ["x-internal-user"]

[echo]
listen = "{echo}"

[log]
{log}

{api}
[upstreams.console]
addresses = ["{echo}"]

[[routes]]
prefix = "/api/v1/"
auth = "api_key"
upstream = "api"

[[routes]]
prefix = "/api/auth/"
auth = "open"
upstream = "console"

[[routes]]
prefix = "/api/"
auth = "jwt"
upstream = "console"
"#,
        server = s.server,
        admin_extra = s.admin,
        log = if s.log.is_empty() {
            "access_log = \"off\""
        } else {
            &s.log
        },
        redis = s
            .redis_url
            .as_ref()
            .map(|u| format!("redis_url = \"{u}\"\ntimeout = \"200ms\""))
            .unwrap_or_default(),
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).expect("config");
    path
}

/// What loading a gateway configuration written for `setup` in `dir` refuses (every error, as
/// `check` prints them), and the file's path (the errors name it).
pub fn config_errors(dir: &Path, setup: &Setup) -> (String, PathBuf) {
    let path = write_config(dir, setup, free_addr(), free_addr(), free_addr());
    let err = Config::load_with_env(&path, &env)
        .expect_err("the configuration is refused")
        .to_string();
    (err, path)
}

pub fn env(name: &str) -> Option<String> {
    match name {
        "TEST_ADMIN_TOKEN" => Some(ADMIN_TOKEN.into()),
        "TEST_JWT_SECRET" => Some(JWT_SECRET.into()),
        _ => None,
    }
}

impl Gateway {
    pub fn start() -> Self {
        Self::start_with(Setup::default())
    }

    /// A gateway on `backend`; for Redis, with a redis-server of its own.
    pub fn on(backend: Backend) -> Self {
        Self::start_with_backend(backend, Setup::new())
    }

    /// `setup` on `backend`; for Redis, with a redis-server of its own.
    pub fn start_with_backend(backend: Backend, setup: Setup) -> Self {
        match backend {
            Backend::Embedded => Self::start_with(setup),
            Backend::Redis => {
                let redis = crate::redis_server::RedisServer::start();
                let mut gw = Self::start_with(setup.on_redis(redis.url()));
                gw.redis = Some(redis);
                gw
            }
        }
    }

    pub fn start_with(setup: Setup) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut gw = Gateway {
            dir,
            clock: setup
                .clock
                .clone()
                .unwrap_or_else(|| Arc::new(ManualClock::at_unix(T0))),
            redis: None,
            proxy: free_addr(),
            admin: free_addr(),
            echo: free_addr(),
            running: None,
            setup,
        };
        gw.boot();
        gw
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("gateway.toml")
    }

    fn boot(&mut self) {
        let path = write_config(
            self.dir.path(),
            &self.setup,
            self.proxy,
            self.admin,
            self.echo,
        );
        let config = Config::load_with_env(&path, &env).unwrap_or_else(|e| panic!("config: {e}"));
        let launch = Launch {
            clock: self.clock.clone(),
            env: Arc::new(env),
            upgrade: false,
        };
        let running = Running::start_with(config, launch).unwrap_or_else(|e| panic!("start: {e}"));
        self.running = Some(running);
        wait_listening(self.proxy);
        wait_listening(self.admin);
        wait_listening(self.echo);
    }

    /// Stops the gateway and starts it again on the same ports and data file.
    pub fn restart(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop();
        }
        self.boot();
    }

    pub fn admin_call(&self, method: &str, path: &str, body: Option<Value>) -> HttpResponse {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let bytes = body.map(|b| serde_json::to_vec(&b).expect("json"));
        request(
            self.admin,
            method,
            path,
            &[("authorization", &auth)],
            bytes.as_deref(),
        )
        .expect("admin call")
    }

    pub fn put_account(&self, id: &str, plan: &str, subscription: &str) {
        let r = self.admin_call(
            "PUT",
            &format!("/admin/v1/accounts/{id}"),
            Some(json!({"plan": plan, "subscription": subscription})),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }

    /// Creates a key and returns (key, key id).
    pub fn create_key(&self, account: &str) -> (String, String) {
        let r = self.admin_call(
            "POST",
            &format!("/admin/v1/accounts/{account}/keys"),
            Some(json!({"name": "test"})),
        );
        assert_eq!(r.status, 201, "{}", r.text());
        let v = r.json().expect("json");
        (
            v["key"].as_str().expect("key").to_owned(),
            v["id"].as_str().expect("id").to_owned(),
        )
    }

    /// An account on `plan` with one key.
    pub fn account_with_key(&self, id: &str, plan: &str) -> (String, String) {
        self.put_account(id, plan, "active");
        self.create_key(id)
    }

    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
        request(self.proxy, "GET", path, headers, None).expect("request")
    }

    pub fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> HttpResponse {
        request(self.proxy, method, path, headers, body).expect("request")
    }

    /// `n` connections, each served one request with `key` (so the gateway has admitted them).
    pub fn held_connections(&self, key: &str, n: usize) -> Vec<Connection> {
        (0..n)
            .map(|_| {
                let mut c = self.connect();
                echoed(
                    &c.send("GET", "/api/v1/x", &[("x-api-key", key)], None)
                        .unwrap(),
                );
                c
            })
            .collect()
    }

    /// The admin listener's `/metrics` line that starts with `prefix` (empty when none does).
    pub fn metric_line(&self, prefix: &str) -> String {
        request(self.admin, "GET", "/metrics", &[], None)
            .unwrap()
            .text()
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_default()
            .to_string()
    }

    pub fn connect(&self) -> Connection {
        Connection::open(self.proxy).expect("connect")
    }

    pub fn token(&self, account: &str, ttl_secs: i64) -> String {
        msgflash_gateway::auth::jwt::mint_hs256(&msgflash_gateway::auth::jwt::MintRequest {
            secret: JWT_SECRET,
            account_claim: "account_id",
            account_id: account,
            sub: Some("user-1"),
            issuer: Some("msgflash"),
            audience: Some("msgflash-console"),
            now_unix: T0 as i64,
            ttl_secs,
        })
        .expect("mint")
    }
}

/// The error body SPEC §5 prescribes.
pub fn error_body(code: &str, message: &str) -> Value {
    json!({"error": {"code": code, "message": message}})
}

/// Asserts status, JSON error body, content-type and content-length of a gateway-made response.
#[track_caller]
pub fn assert_error(r: &HttpResponse, status: u16, code: &str, message: &str) {
    assert_eq!(r.status, status, "body: {}", r.text());
    assert_eq!(r.json().expect("json body"), error_body(code, message));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.header("content-length"),
        Some(r.body.len().to_string().as_str())
    );
}

/// As [`assert_error`], and the answer is the gateway's own: the upstream never saw the request.
#[track_caller]
pub fn assert_refused(r: &HttpResponse, status: u16, code: &str, message: &str) {
    assert_error(r, status, code, message);
    assert_eq!(r.header("x-echo"), None, "the upstream answered");
}

/// A key on `acme` (pro) with the given restrictions.
pub fn restricted_key(gw: &Gateway, scopes: &[&str], instances: &[&str]) -> String {
    gw.put_account("acme", "pro", "active");
    let r = gw.admin_call(
        "POST",
        "/admin/v1/accounts/acme/keys",
        Some(json!({"name": "restricted", "scopes": scopes, "instanceIds": instances})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    r.json().unwrap()["key"].as_str().unwrap().to_owned()
}

/// Asserts that the gateway closed `stream` (end of stream or reset) without writing a byte.
#[track_caller]
pub fn assert_closed_without_answer(stream: &mut TcpStream, what: &str) {
    use std::io::Read;
    let mut out = Vec::new();
    let closed = match stream.read_to_end(&mut out) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(closed, "{what}: the connection was not closed");
    assert!(
        out.is_empty(),
        "{what}: {:?}",
        String::from_utf8_lossy(&out)
    );
}

/// What the echo upstream says it received.
pub fn echoed(r: &HttpResponse) -> Value {
    assert_eq!(r.status, 200, "body: {}", r.text());
    assert_eq!(
        r.header("x-echo"),
        Some("msgflash"),
        "not from the upstream"
    );
    r.json().expect("echo json")
}

/// Polls `f` until it holds (bounded); returns how long it took.
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(10), "never: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
    start.elapsed()
}

/// Fires `per_node` requests at each node at once; returns the statuses.
pub fn burst_across(nodes: &[&Gateway], key: &str, per_node: usize) -> Vec<u16> {
    let total = nodes.len() * per_node;
    let barrier = Arc::new(Barrier::new(total));
    let mut handles = Vec::new();
    for gw in nodes {
        for _ in 0..per_node {
            let (barrier, key) = (barrier.clone(), key.to_owned());
            let mut conn = gw.connect();
            handles.push(std::thread::spawn(move || {
                barrier.wait();
                conn.send("GET", "/api/v1/messages", &[("x-api-key", &key)], None)
                    .expect("request")
                    .status
            }));
        }
    }
    handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect()
}
