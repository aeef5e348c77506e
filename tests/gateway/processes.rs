//! Real gateway processes (the built binary) sharing one Redis, on the real clock. The plans
//! used here make the outcome independent of timing (see each test).

use crate::redis_server::RedisServer;
use crate::support::*;
use msgflash_gateway::client::request;
use serde_json::json;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};

struct Process {
    child: Child,
    proxy: SocketAddr,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Process {
    fn spawn(redis: &RedisServer) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (proxy, admin, echo) = (free_addr(), free_addr(), free_addr());
        let setup = Setup {
            redis_url: Some(redis.url()),
            ..Setup::default()
        };
        let path = write_config(dir.path(), &setup, proxy, admin, echo);
        let child = Command::new(env!("CARGO_BIN_EXE_msgflash-gateway"))
            .args(["run", "-c"])
            .arg(&path)
            .env("TEST_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("TEST_JWT_SECRET", JWT_SECRET)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_listening(proxy);
        wait_listening(admin);
        Process {
            child,
            proxy,
            admin,
            _dir: dir,
        }
    }

    fn admin(&self, method: &str, path: &str, body: serde_json::Value) -> serde_json::Value {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let body = serde_json::to_vec(&body).unwrap();
        let r = request(
            self.admin,
            method,
            path,
            &[("authorization", &auth)],
            Some(&body),
        )
        .unwrap();
        assert!(r.status < 300, "{}", r.text());
        r.json().unwrap()
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
            let mut conn = msgflash_gateway::client::Connection::open(addr).unwrap();
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
    // "slow" refills one token per second: the burst of 10 is all there is unless the 20
    // requests take longer than a second to arrive.
    let statuses = fire(&nodes, &key, 10);
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        10,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        10,
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
