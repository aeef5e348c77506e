//! A real three-master Redis Cluster on loopback: limits, quotas, caps and revocation hold.

use crate::redis_server::Cluster;
use crate::support::*;
use msgflash_gateway::clock::ManualClock;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

fn statuses(handles: Vec<std::thread::JoinHandle<u16>>) -> Vec<u16> {
    handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect()
}

#[test]
fn a_three_master_cluster_behaves_as_one_store() {
    let cluster = Cluster::start(3, 0, 5000, &[]);
    let clock = Arc::new(ManualClock::at_unix(T0));
    let n: Vec<Arc<Gateway>> = (0..2)
        .map(|_| {
            Arc::new(Gateway::start_with(
                Setup::new().on_redis(cluster.url()).sharing(&clock),
            ))
        })
        .collect();

    // Several accounts, so that their hash tags land on different masters.
    let accounts = ["acme", "globex", "initech", "umbrella", "hooli", "stark"];
    for a in accounts {
        n[0].put_account(a, "pro", "active");
    }
    let slots: std::collections::HashSet<String> = accounts
        .iter()
        .map(|a| cluster.nodes[0].cli(&["CLUSTER", "KEYSLOT", &format!("mf:{{a:{a}}}")]))
        .collect();
    assert!(slots.len() > 1);

    // Burst: 20 across two nodes, exactly 10 through, for every account.
    let nodes = [&*n[0], &*n[1]];
    for a in accounts {
        let (key, _) = n[0].create_key(a);
        let s = burst_across(&nodes, &key, 10);
        assert_eq!(s.iter().filter(|x| **x == 200).count(), 10, "{a}: {s:?}");
    }

    // Quota: 5 a month, 9 concurrent requests on two nodes.
    n[1].put_account("small", "tiny", "active");
    let (key, key_id) = n[1].create_key("small");
    let s = burst_across(&[&*n[0], &*n[1], &*n[0]], &key, 3);
    assert_eq!(s.iter().filter(|x| **x == 200).count(), 5, "{s:?}");

    // Key cap: "tiny" allows 2; one exists; 6 concurrent creates on two nodes add exactly one.
    let barrier = Arc::new(Barrier::new(6));
    let handles = (0..6)
        .map(|i| {
            let (barrier, gw) = (barrier.clone(), n[i % 2].clone());
            std::thread::spawn(move || {
                barrier.wait();
                let body = serde_json::json!({"name": format!("k{i}")});
                gw.admin_call("POST", "/admin/v1/accounts/small/keys", Some(body))
                    .status
            })
        })
        .collect();
    let s = statuses(handles);
    assert_eq!(s.iter().filter(|x| **x == 201).count(), 1, "{s:?}");

    // Revocation through node A; node B refuses the (cached) key.
    clock.advance_ms(1000);
    assert_eq!(
        n[1].get("/api/v1/x", &[("x-api-key", &key)]).status,
        429,
        "quota spent, key still known"
    );
    let r = n[0].admin_call(
        "DELETE",
        &format!("/admin/v1/accounts/small/keys/{key_id}"),
        None,
    );
    assert_eq!(r.status, 200);
    let start = Instant::now();
    while n[1].get("/api/v1/x", &[("x-api-key", &key)]).status != 401 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "node B kept accepting a revoked key"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}
