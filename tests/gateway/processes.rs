//! Real gateway processes (the built binary) sharing one Redis, on the real clock. The plans
//! used here make the outcome independent of timing (see each test).

use crate::client::request;
use crate::redis_server::RedisServer;
use crate::support::*;
use serde_json::json;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};

pub(crate) struct Process {
    pub(crate) child: Child,
    pub(crate) proxy: SocketAddr,
    pub(crate) admin: SocketAddr,
    pub(crate) dir: std::path::PathBuf,
    pub(crate) _tmp: Option<tempfile::TempDir>,
}

impl Process {
    fn spawn(redis: &RedisServer) -> Self {
        Self::spawn_on(redis.url())
    }

    /// A gateway process on the Redis at `url` (any scheme), in its own directory.
    pub(crate) fn spawn_on(url: String) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let (proxy, admin, echo) = (free_addr(), free_addr(), free_addr());
        let setup = Setup::new().on_redis(url);
        write_config(tmp.path(), &setup, proxy, admin, echo);
        let mut p = Self::start_in(tmp.path(), proxy, admin, &[]);
        // Its upstream is its own echo service: a request before that listens is a 502.
        wait_listening(echo);
        p._tmp = Some(tmp);
        p
    }

    /// Starts the binary on the configuration already written in `dir`.
    pub(crate) fn start_in(
        dir: &std::path::Path,
        proxy: SocketAddr,
        admin: SocketAddr,
        flags: &[&str],
    ) -> Self {
        Self::start_with_stdout(dir, proxy, admin, flags, Stdio::null())
    }

    /// As [`Process::start_in`], its standard output going to `stdout`.
    pub(crate) fn start_with_stdout(
        dir: &std::path::Path,
        proxy: SocketAddr,
        admin: SocketAddr,
        flags: &[&str],
        stdout: Stdio,
    ) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_msgflash-gateway"))
            .args(["run", "-c"])
            .arg(dir.join("gateway.toml"))
            .args(flags)
            .env("TEST_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("TEST_JWT_SECRET", JWT_SECRET)
            .env("RUST_LOG", "warn")
            .stdout(stdout)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_listening(proxy);
        wait_listening(admin);
        Process {
            child,
            proxy,
            admin,
            dir: dir.to_path_buf(),
            _tmp: None,
        }
    }

    pub(crate) fn signal(&self, name: &str) {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// An admin call with the token; the answer whatever it is.
    pub(crate) fn admin_response(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> crate::client::HttpResponse {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let body = body.map(|b| serde_json::to_vec(b).unwrap());
        request(
            self.admin,
            method,
            path,
            &[("authorization", &auth)],
            body.as_deref(),
        )
        .unwrap()
    }

    /// An admin call that must succeed; its JSON answer.
    pub(crate) fn admin(
        &self,
        method: &str,
        path: &str,
        body: serde_json::Value,
    ) -> serde_json::Value {
        let r = self.admin_response(method, path, Some(&body));
        assert!(r.status < 300, "{}", r.text());
        r.json().unwrap()
    }

    /// As [`Process::admin`], retried while the store is still recovering (503), for at most
    /// 15 s.
    pub(crate) fn admin_when_ready(
        &self,
        method: &str,
        path: &str,
        body: serde_json::Value,
    ) -> serde_json::Value {
        let body = (method != "GET").then_some(&body);
        let start = std::time::Instant::now();
        loop {
            let r = self.admin_response(method, path, body);
            if r.status != 503 || start.elapsed() > std::time::Duration::from_secs(15) {
                assert!(r.status < 300, "{method} {path}: {}", r.text());
                return r.json().unwrap();
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fire(nodes: &[Process], key: &str, per_node: usize) -> Vec<u16> {
    let barrier = Arc::new(Barrier::new(nodes.len() * per_node));
    let mut handles = Vec::new();
    for node in nodes {
        for _ in 0..per_node {
            let (barrier, key, addr) = (barrier.clone(), key.to_owned(), node.proxy);
            let mut conn = crate::client::Connection::open(addr).unwrap();
            handles.push(std::thread::spawn(move || {
                barrier.wait();
                conn.send("GET", "/api/v1/x", &[("x-api-key", &key)], None)
                    .unwrap()
                    .status
            }));
        }
    }
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn two_processes_let_exactly_10_of_a_burst_of_20_through() {
    let redis = RedisServer::start();
    let nodes = [Process::spawn(&redis), Process::spawn(&redis)];
    nodes[0].admin("PUT", "/admin/v1/accounts/acme", json!({"plan": "slow"}));
    let key = nodes[1].admin("POST", "/admin/v1/accounts/acme/keys", json!({"name": "k"}))["key"]
        .as_str()
        .unwrap()
        .to_owned();
    // "slow" refills one token per second: the burst of 10 is all there is, plus one token
    // per whole second the 20 requests take to arrive (a loaded machine can stretch them).
    // Real clocks: a request stamped a few ms earlier than one whose ZADD reached Redis first
    // reads that later time, so the tenth token can be refused early (never one extra; the
    // in-process tests on one manual clock show exactly 10). Nine always pass: they have a
    // whole interval (1 s) of slack.
    let started = std::time::Instant::now();
    let statuses = fire(&nodes, &key, 10);
    let refilled = usize::try_from(started.elapsed().as_secs()).unwrap_or(usize::MAX);
    let passed = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        (9..=10 + refilled).contains(&passed),
        "{passed} passed in {refilled} s: {statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        20 - passed,
        "{statuses:?}"
    );
}

#[test]
fn three_processes_never_exceed_the_quota() {
    let redis = RedisServer::start();
    let nodes = [
        Process::spawn(&redis),
        Process::spawn(&redis),
        Process::spawn(&redis),
    ];
    nodes[0].admin("PUT", "/admin/v1/accounts/small", json!({"plan": "tiny"}));
    let key = nodes[2].admin(
        "POST",
        "/admin/v1/accounts/small/keys",
        json!({"name": "k"}),
    )["key"]
        .as_str()
        .unwrap()
        .to_owned();
    // 9 requests fit in the burst of 10, so only the quota of 5 decides.
    let statuses = fire(&nodes, &key, 3);
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        4,
        "{statuses:?}"
    );
}

#[test]
fn sighup_reloads_the_policies_of_a_running_process() {
    let redis = RedisServer::start();
    let node = Process::spawn(&redis);
    node.admin("PUT", "/admin/v1/accounts/acme", json!({"plan": "pro"}));
    let key = node.admin("POST", "/admin/v1/accounts/acme/keys", json!({"name": "k"}))["key"]
        .as_str()
        .unwrap()
        .to_owned();
    // The process runs on the real clock: the period is this month, 28 to 31 days long.
    let quota_of = || {
        let r = request(node.proxy, "GET", "/api/v1/x", &[("x-api-key", &key)], None).unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let policy = r.header("ratelimit-policy").unwrap_or_default().to_owned();
        let (quota, window) = policy
            .strip_prefix("\"burst\";q=10;w=1, \"monthly\";q=")
            .and_then(|rest| rest.split_once(";w="))
            .unwrap_or_else(|| panic!("{policy}"));
        let days = window.parse::<u64>().unwrap_or(0) / 86_400;
        assert!((28..=31).contains(&days), "{policy}");
        quota.to_owned()
    };
    assert_eq!(quota_of(), "500000");
    let plans = node.dir.join("policies/plans.toml");
    let text = std::fs::read_to_string(&plans)
        .unwrap()
        .replace("monthly_requests = 500000", "monthly_requests = 600000");
    std::fs::write(&plans, text).unwrap();
    node.signal("HUP");
    eventually("the new quota is in force", || quota_of() == "600000");
    // Still alive and serving: SIGHUP reloads, it does not terminate.
    assert_eq!(
        request(node.admin, "GET", "/healthz", &[], None)
            .unwrap()
            .status,
        200
    );
}

#[test]
fn sigquit_hands_the_sockets_to_a_new_process_without_refusing_anyone() {
    let redis = RedisServer::start();
    let old = Process::spawn(&redis);
    old.admin("PUT", "/admin/v1/accounts/acme", json!({"plan": "pro"}));
    let key = old.admin("POST", "/admin/v1/accounts/acme/keys", json!({"name": "k"}))["key"]
        .as_str()
        .unwrap()
        .to_owned();
    // Traffic on fresh connections all along (bounded: at most 20 000 requests).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (stop, key, proxy) = (stop.clone(), key.clone(), old.proxy);
        std::thread::spawn(move || {
            let mut outcomes = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && outcomes.len() < 20_000 {
                let r = request(proxy, "GET", "/api/v1/x", &[("x-api-key", &key)], None);
                outcomes.push(r.map(|r| r.status).map_err(|e| e.to_string()));
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            outcomes
        })
    };
    // The new binary waits on the upgrade socket for the listeners.
    let dir = old.dir.clone();
    let (proxy, admin) = (old.proxy, old.admin);
    let new = std::thread::spawn(move || Process::start_in(&dir, proxy, admin, &["--upgrade"]));
    let sock = old.dir.join("data/upgrade.sock");
    eventually("the new process listens on the upgrade socket", || {
        sock.exists()
    });
    old.signal("QUIT");
    let new = new.join().unwrap();
    let mut old = old;
    let exited = old.child.wait().unwrap();
    assert!(exited.success(), "{exited:?}");
    // The new process serves on the same addresses, with the same store.
    let r = request(new.proxy, "GET", "/api/v1/x", &[("x-api-key", &key)], None).unwrap();
    assert_ne!(r.status, 401, "{}", r.text());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let outcomes = traffic.join().unwrap();
    let failed: Vec<_> = outcomes
        .iter()
        .filter(|o| !matches!(o, Ok(200) | Ok(429)))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        outcomes.len()
    );
}

/// SIGTERM: a request that follows one under way on a kept-alive connection is served as
/// usual, a chunked one included (it was refused as "ambiguous framing" once pingora turned
/// keep-alive off for the drain), and the connection then closes. (Connections idle at
/// SIGTERM are closed: pingora's drain, as nginx's.)
#[test]
fn sigterm_serves_a_chunked_request_behind_one_under_way() {
    let tmp = tempfile::tempdir().unwrap();
    let (proxy, admin, echo) = (free_addr(), free_addr(), free_addr());
    // The upstream lives apart (the process's own echo stops with it: a request that needed a
    // new upstream connection after SIGTERM got a 502 under load, 3 runs in 8). Room for a
    // loaded machine: it waits for the first body up to 10 s.
    let upstream = Gateway::start();
    let setup = Setup::new().api_upstream(ApiUpstream {
        addresses: vec![At::Addr(upstream.echo.to_string())],
        read_timeout: "10s",
        ..ApiUpstream::default()
    });
    let path = write_config(tmp.path(), &setup, proxy, admin, echo);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("grace_period = \"1s\"", "grace_period = \"5s\""),
    )
    .unwrap();
    let mut p = Process::start_in(tmp.path(), proxy, admin, &[]);
    p.admin("PUT", "/admin/v1/accounts/acme", json!({"plan": "pro"}));
    let key = p.admin("POST", "/admin/v1/accounts/acme/keys", json!({"name": "k"}))["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut conn = crate::client::Connection::open(proxy).unwrap();
    // A request is under way (half its body sent) when the signal comes.
    let first = format!(
        "POST /api/v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\n\
         content-type: text/plain\r\ncontent-length: 4\r\n\r\nab"
    );
    conn.write_raw(first.as_bytes()).unwrap();
    // Its head has been through every check (its admission counted) before the signal.
    eventually("the first request is admitted", || {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let r = request(
            admin,
            "GET",
            "/admin/v1/accounts/acme",
            &[("authorization", &auth)],
            None,
        )
        .unwrap();
        r.json().unwrap()["usage"]["requests"] == 1
    });
    p.signal("TERM");
    eventually("the listener closes", || {
        std::net::TcpStream::connect(proxy).is_err()
    });
    // The rest of it, and a chunked request behind it.
    let rest = format!(
        "cdPOST /api/v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\n\
         content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n\
         7\r\n{{\"a\":1}}\r\n0\r\n\r\n"
    );
    let answers = conn.pipelined(rest.as_bytes(), 2).unwrap();
    assert_eq!(
        answers.len(),
        2,
        "{:?}",
        answers.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert_eq!(echoed(&answers[0])["body"], "abcd");
    assert_eq!(echoed(&answers[1])["body"], "{\"a\":1}");
    assert_eq!(answers[1].header("connection"), Some("close"));
    drop(conn);
    let exited = p.child.wait().unwrap();
    assert!(exited.success(), "{exited:?}");
}

/// A gateway process on the embedded store, in its own directory, with `grace_period`.
pub(crate) fn embedded_process(grace: &str) -> Process {
    let tmp = tempfile::tempdir().unwrap();
    let (proxy, admin, echo) = (free_addr(), free_addr(), free_addr());
    let path = write_config(tmp.path(), &Setup::new(), proxy, admin, echo);
    let text = std::fs::read_to_string(&path).unwrap();
    let grace_line = format!("grace_period = \"{grace}\"");
    std::fs::write(&path, text.replace("grace_period = \"1s\"", &grace_line)).unwrap();
    let mut p = Process::start_in(tmp.path(), proxy, admin, &[]);
    // Its upstream is its own echo service: a request before that listens is a 502.
    wait_listening(echo);
    p._tmp = Some(tmp);
    p
}

fn usage_in(p: &Process, account: &str) -> u64 {
    p.admin("GET", &format!("/admin/v1/accounts/{account}"), json!({}))["usage"]["requests"]
        .as_u64()
        .unwrap()
}

/// kill -9 loses at most the counts of the last second: what the usage file held is what a
/// restarted process counts from (and the OS let the data file's lock go with the process).
#[test]
fn a_crash_loses_at_most_the_last_second_of_counts() {
    let mut p = embedded_process("1s");
    p.admin("PUT", "/admin/v1/accounts/acme", json!({"plan": "pro"}));
    let key = p.admin("POST", "/admin/v1/accounts/acme/keys", json!({"name": "k"}))["key"]
        .as_str()
        .unwrap()
        .to_owned();
    for _ in 0..5 {
        let r = request(p.proxy, "GET", "/api/v1/x", &[("x-api-key", &key)], None).unwrap();
        assert_eq!(r.status, 200);
    }
    let usage_file = p.dir.join("data/store.jsonl.usage");
    eventually("the counts reach the usage file", || {
        std::fs::read_to_string(&usage_file).is_ok_and(|t| t.contains(",5]"))
    });
    p.child.kill().unwrap();
    p.child.wait().unwrap();
    let tmp = p._tmp.take();
    let (dir, proxy, admin) = (p.dir.clone(), p.proxy, p.admin);
    drop(p);
    let again = Process::start_in(&dir, proxy, admin, &[]);
    assert_eq!(usage_in(&again, "acme"), 5);
    drop(tmp);
}

/// SIGQUIT with `run --upgrade` on the embedded store: the new process serves at once with
/// the records as they are (a revoke made on the old one while the new one waited included),
/// refuses admin writes (503) until the old one has let the data file go, then owns it; no
/// write that was answered 2xx is lost, none answered 503 was half made, and every admitted
/// request is counted.
#[test]
fn sigquit_on_the_embedded_store_loses_no_write_and_no_count() {
    let old = embedded_process("2s");
    old.admin("PUT", "/admin/v1/accounts/acme", json!({"plan": "plus"}));
    let key = |p: &Process| {
        let v = p.admin("POST", "/admin/v1/accounts/acme/keys", json!({"name": "k"}));
        (
            v["key"].as_str().unwrap().to_owned(),
            v["id"].as_str().unwrap().to_owned(),
        )
    };
    let (live, _) = key(&old);
    let (doomed, doomed_id) = key(&old);
    let dir = old.dir.clone();
    let (proxy, admin) = (old.proxy, old.admin);
    let new = std::thread::spawn(move || Process::start_in(&dir, proxy, admin, &["--upgrade"]));
    let sock = old.dir.join("data/upgrade.sock");
    eventually("the new process waits on the upgrade socket", || {
        sock.exists()
    });
    // A revoke on the old process while the new one waits for the file.
    old.admin(
        "DELETE",
        &format!("/admin/v1/accounts/acme/keys/{doomed_id}"),
        json!({}),
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let running = |stop: &Arc<std::sync::atomic::AtomicBool>| {
        !stop.load(std::sync::atomic::Ordering::Relaxed)
    };
    // API traffic on fresh connections, 10 a second (the key's rate).
    let traffic = {
        let (stop, live) = (stop.clone(), live.clone());
        std::thread::spawn(move || {
            let mut statuses = Vec::new();
            while running(&stop) {
                let r = request(proxy, "GET", "/api/v1/x", &[("x-api-key", &live)], None);
                statuses.push(r.map(|r| r.status).map_err(|e| e.to_string()));
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            statuses
        })
    };
    // Admin writes all along: a new account each time.
    let writes = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let auth = format!("Bearer {ADMIN_TOKEN}");
            let mut outcomes = Vec::new();
            for i in 0.. {
                if !running(&stop) {
                    break;
                }
                let body = serde_json::to_vec(&json!({"plan": "pro"})).unwrap();
                let r = request(
                    admin,
                    "PUT",
                    &format!("/admin/v1/accounts/w{i}"),
                    &[("authorization", &auth)],
                    Some(&body),
                );
                outcomes.push((i, r.map(|r| r.status).map_err(|e| e.to_string())));
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            outcomes
        })
    };
    old.signal("QUIT");
    let new = new.join().unwrap();
    let mut old = old;
    assert!(old.child.wait().unwrap().success());
    // The new process owns the file: its writes are served.
    eventually("the new process serves writes", || {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let body = serde_json::to_vec(&json!({"plan": "pro"})).unwrap();
        request(
            admin,
            "PUT",
            "/admin/v1/accounts/probe",
            &[("authorization", &auth)],
            Some(&body),
        )
        .is_ok_and(|r| r.status == 200)
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let statuses = traffic.join().unwrap();
    let outcomes = writes.join().unwrap();

    // The revoke made on the old process holds on the new one.
    let r = request(
        new.proxy,
        "GET",
        "/api/v1/x",
        &[("x-api-key", &doomed)],
        None,
    )
    .unwrap();
    assert_eq!(r.status, 401);
    // Every write answered 200 is there; every one answered 503 is not.
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let (mut served, mut refused) = (0, 0);
    for (i, outcome) in &outcomes {
        let got = request(
            admin,
            "GET",
            &format!("/admin/v1/accounts/w{i}"),
            &[("authorization", &auth)],
            None,
        )
        .unwrap()
        .status;
        match outcome {
            Ok(200) => {
                served += 1;
                assert_eq!(got, 200, "w{i} was answered 200 and is lost");
            }
            Ok(503) => {
                refused += 1;
                assert_eq!(got, 404, "w{i} was answered 503 and is there");
            }
            other => panic!("w{i}: {other:?}"),
        }
    }
    // Every admitted request is counted, whichever process admitted it.
    let admitted = statuses.iter().filter(|s| matches!(s, Ok(200))).count() as u64;
    assert!(
        statuses.iter().all(|s| matches!(s, Ok(200) | Ok(429))),
        "{statuses:?}"
    );
    assert_eq!(usage_in(&new, "acme"), admitted);
    println!(
        "hand-over: {served} writes served, {refused} refused with 503; {admitted} requests admitted and counted"
    );
}
