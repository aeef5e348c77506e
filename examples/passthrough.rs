// A plain pingora 0.9 reverse proxy with no authentication: the framework's own cost,
// measured by `bench/run.sh` next to nginx and msgflash-gateway.
//
// Every request goes to one upstream over pingora's pooled keep-alive connections.
// Settings come from environment variables so that the benchmark can try pingora's knobs
// without rebuilding:
//
// | variable | default | meaning |
// |---|---|---|
// | `PT_LISTEN` | `127.0.0.1:27181` | listen address |
// | `PT_UPSTREAM` | `127.0.0.1:27180` | upstream address |
// | `PT_THREADS` | `2` | `ServerConf::threads` |
// | `PT_WORK_STEALING` | `1` | `ServerConf::work_stealing` (0 = one current-thread runtime per thread) |
// | `PT_POOL` | `128` | `ServerConf::upstream_keepalive_pool_size` |
// | `PT_LISTENER_TASKS` | `1` | `ServerConf::listener_tasks_per_fd` |
// | `PT_KEEPALIVE_LIMIT` | unset | `HttpServerOptions::keepalive_request_limit` |
// | `PT_REUSEPORT` | `0` | `TcpSocketOptions::so_reuseport` on the listener |
// | `PT_PID_FILE` | `/tmp/msgflash-passthrough.pid` | pid file (`ServerConf::pid_file`) |
// | `PT_REFUSE` | `0` | 1: answer every request itself with the gateway's 401 (same status, headers and body), forwarding nothing: pingora's floor for a refusal |
//
// The allocator is the system one; `bench/run.sh` tries jemalloc and mimalloc through
// `LD_PRELOAD` (Debian's libjemalloc2 / libmimalloc2.0), which needs no new dependency.

use async_trait::async_trait;
use bytes::Bytes;
use pingora::apps::HttpServerOptions;
use pingora::http::ResponseHeader;
use pingora::listeners::TcpSocketOptions;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use pingora::upstreams::peer::HttpPeer;
use pingora::Result;
use std::net::SocketAddr;

struct Passthrough {
    upstream: SocketAddr,
    refuse: bool,
}

/// The gateway's answer to an unknown key, byte for byte but for the request id.
const REFUSAL_BODY: &[u8] =
    br#"{"error":{"code":"UNAUTHORIZED","message":"Invalid or revoked API key"}}"#;

#[async_trait]
impl ProxyHttp for Passthrough {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> Result<bool> {
        if !self.refuse {
            return Ok(false);
        }
        // The body is read first, as the gateway does: unread, it would cost the connection.
        session.drain_request_body().await?;
        // Built on the `http` maps with static values: the cheapest head pingora can write.
        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts.status = http::StatusCode::UNAUTHORIZED;
        let h = &mut parts.headers;
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        h.insert(
            http::header::CONTENT_LENGTH,
            http::HeaderValue::from(REFUSAL_BODY.len()),
        );
        h.insert(
            http::HeaderName::from_static("x-request-id"),
            http::HeaderValue::from_static("a35b3ba15ba1d6d8c84fa86163571bc7"),
        );
        let head = ResponseHeader::from(parts);
        session.write_response_header(Box::new(head), false).await?;
        session
            .write_response_body(Some(Bytes::from_static(REFUSAL_BODY)), true)
            .await?;
        Ok(true)
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

#[allow(
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

#[allow(
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]
fn main() {
    let listen: String = env_or("PT_LISTEN", "127.0.0.1:27181".to_string());
    let upstream: SocketAddr = env_or("PT_UPSTREAM", "127.0.0.1:27180".parse().unwrap());
    let conf = ServerConf {
        threads: env_or("PT_THREADS", 2usize),
        work_stealing: env_or::<u8>("PT_WORK_STEALING", 1) != 0,
        upstream_keepalive_pool_size: env_or("PT_POOL", 128usize),
        listener_tasks_per_fd: env_or("PT_LISTENER_TASKS", 1usize),
        pid_file: env_or("PT_PID_FILE", "/tmp/msgflash-passthrough.pid".to_string()),
        upgrade_sock: env_or(
            "PT_UPGRADE_SOCK",
            "/tmp/msgflash-passthrough.sock".to_string(),
        ),
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    eprintln!(
        "passthrough: listen {listen} -> {upstream}; threads {} work_stealing {} pool {} listener_tasks {}",
        conf.threads, conf.work_stealing, conf.upstream_keepalive_pool_size, conf.listener_tasks_per_fd
    );
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        Passthrough {
            upstream,
            refuse: env_or::<u8>("PT_REFUSE", 0) != 0,
        },
        "passthrough",
    );
    if let Ok(v) = std::env::var("PT_KEEPALIVE_LIMIT") {
        let mut opts = HttpServerOptions::default();
        opts.keepalive_request_limit = Some(v.parse().expect("PT_KEEPALIVE_LIMIT: a number"));
        proxy.app_logic_mut().expect("proxy app").server_options = Some(opts);
    }
    if env_or::<u8>("PT_REUSEPORT", 0) != 0 {
        let mut sock = TcpSocketOptions::default();
        sock.so_reuseport = Some(true);
        proxy.add_tcp_with_settings(&listen, sock);
    } else {
        proxy.add_tcp(&listen);
    }
    server.add_service(proxy);
    server.run(RunArgs::default());
}
