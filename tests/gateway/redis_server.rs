//! Real `redis-server` processes on free ports, owned by the test that starts them.

use crate::support::{free_addr, wait_listening};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

/// Runs `redis-cli` against the server at `addr` and returns its output.
pub fn redis_cli(addr: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub struct RedisServer {
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    child: Option<Child>,
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Self {
        Self::start_at(free_addr(), extra)
    }

    pub fn start_at(addr: SocketAddr, extra: &[&str]) -> Self {
        let mut server = Self {
            addr,
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.addr.port().to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (see README)");
        self.child = Some(child);
        wait_listening(self.addr);
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// SIGKILL: no goodbye to the clients.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port (and, with persistence on, the same data).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Runs `redis-cli` against this server and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.addr, args)
    }

    /// `calls` per command from INFO commandstats, e.g. `incr` -> 12.
    pub fn command_calls(&self) -> std::collections::HashMap<String, u64> {
        self.cli(&["INFO", "commandstats"])
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix("cmdstat_")?;
                let (name, stats) = rest.split_once(':')?;
                let calls = stats.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
                Some((name.to_string(), calls.trim().parse().ok()?))
            })
            .collect()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A real Redis Sentinel (`redis-server … --sentinel`) watching the primary `mymaster`,
/// quick to judge it down (500 ms).
pub struct Sentinel {
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
    child: Child,
}

impl Sentinel {
    pub fn start(primary: SocketAddr, quorum: u32) -> Self {
        let addr = free_addr();
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {}\nbind 127.0.0.1\nprotected-mode no\ndir {}\n\
                 sentinel monitor mymaster 127.0.0.1 {} {quorum}\n\
                 sentinel down-after-milliseconds mymaster 500\n\
                 sentinel failover-timeout mymaster 2000\n",
                addr.port(),
                dir.path().display(),
                primary.port()
            ),
        )
        .expect("sentinel.conf");
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (see README)");
        wait_listening(addr);
        Self {
            addr,
            _dir: dir,
            child,
        }
    }

    /// Runs `redis-cli` against this sentinel.
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.addr, args)
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 20 ms (each poll runs `redis-cli`) until it holds, for at most 20 s: Redis
/// topologies take seconds to form on a loaded machine.
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "never: {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A primary, one replica in sync and three sentinels that know both and each other: ready for
/// a failover. `extra` goes to both Redis servers.
pub struct SentinelSet {
    pub primary: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<Sentinel>,
}

impl SentinelSet {
    pub fn start(extra: &[&str]) -> Self {
        // Replicas get their first copy at once (Redis waits 5 s by default to batch them).
        let mut primary_args = extra.to_vec();
        primary_args.extend(["--repl-diskless-sync-delay", "0"]);
        let primary = RedisServer::start_with(&primary_args);
        let port = primary.addr.port().to_string();
        let mut replica_args = extra.to_vec();
        replica_args.extend(["--replicaof", "127.0.0.1", &port]);
        let replica = RedisServer::start_with(&replica_args);
        let sentinels: Vec<Sentinel> = (0..3).map(|_| Sentinel::start(primary.addr, 2)).collect();
        wait_for("the replica is in sync", || {
            replica.cli(&["ROLE"]).contains("connected")
        });
        wait_for("the sentinels see the replica and each other", || {
            sentinels.iter().all(|s| {
                s.cli(&["SENTINEL", "replicas", "mymaster"])
                    .contains(&replica.addr.port().to_string())
                    && s.cli(&["SENTINEL", "sentinels", "mymaster"])
                        .matches("runid")
                        .count()
                        == 2
            })
        });
        Self {
            primary,
            replica,
            sentinels,
        }
    }

    /// The gateway's `redis+sentinel://` URL for this set.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.sentinels.iter().map(|s| s.addr.to_string()).collect();
        format!("redis+sentinel://{}/mymaster", hosts.join(","))
    }

    /// True once the sentinels name the replica as the primary.
    pub fn replica_promoted(&self) -> bool {
        self.sentinels[0].cli(&["SENTINEL", "get-master-addr-by-name", "mymaster"])
            == format!("127.0.0.1\n{}\n", self.replica.addr.port())
    }
}

/// A real Redis Cluster on loopback: `primaries` primaries with `replicas` replicas each,
/// created with `redis-cli --cluster create`, ok and (replicas) in sync.
pub struct Cluster {
    pub nodes: Vec<RedisServer>,
}

impl Cluster {
    pub fn start(primaries: usize, replicas: usize, node_timeout_ms: u32, extra: &[&str]) -> Self {
        let timeout = node_timeout_ms.to_string();
        let mut opts = vec![
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            &timeout,
            // Replicas get their first copy at once (Redis waits 5 s by default).
            "--repl-diskless-sync-delay",
            "0",
        ];
        opts.extend(extra);
        let nodes: Vec<RedisServer> = (0..primaries * (1 + replicas))
            .map(|_| RedisServer::start_at(crate::support::free_cluster_addr(), &opts))
            .collect();
        let addrs: Vec<String> = nodes.iter().map(|n| n.addr.to_string()).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        wait_for("the cluster is ok and every replica in sync", || {
            nodes.iter().all(|n| {
                n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok") && {
                    let role = n.cli(&["ROLE"]);
                    role.starts_with("master") || role.contains("connected")
                }
            })
        });
        Self { nodes }
    }

    /// The gateway's `redis+cluster://` URL (every node a seed).
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self.nodes.iter().map(|n| n.addr.to_string()).collect();
        format!("redis+cluster://{}", seeds.join(","))
    }
}
