//! SPEC §10 client addresses: the TCP peer, unless it is a trusted proxy; forwarding headers
//! from anyone else replaced; per-client limits by that address (IPv6 by its /64).

use crate::support::*;

const LIMITED: &str = "Too many requests from this client";

fn auth_call(gw: &Gateway, headers: &[(&str, &str)]) -> crate::client::HttpResponse {
    gw.get("/api/auth/login", headers)
}

#[test]
fn an_untrusted_peer_cannot_choose_its_address() {
    let gw = Gateway::start();
    let spoofed = [
        ("x-forwarded-for", "203.0.113.1"),
        ("x-forwarded-proto", "https"),
    ];
    let seen = echoed(&auth_call(&gw, &spoofed));
    assert_eq!(seen["headers"]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "http");
    // The open route allows a burst of 3 per client: a new X-Forwarded-For each time is
    // still the same client.
    for i in 2..=3 {
        let xff = format!("203.0.113.{i}");
        echoed(&auth_call(&gw, &[("x-forwarded-for", &xff)]));
    }
    let r = auth_call(&gw, &[("x-forwarded-for", "203.0.113.4")]);
    assert_refused(&r, 429, "TOO_MANY_REQUESTS", LIMITED);
}

#[test]
fn a_trusted_proxy_says_who_the_client_is() {
    let gw = Gateway::start_with(Setup::new().server("trusted_proxies = [\"127.0.0.1/32\"]"));
    let a = [
        ("x-forwarded-for", "203.0.113.7"),
        ("x-forwarded-proto", "https"),
    ];
    let seen = echoed(&auth_call(&gw, &a));
    assert_eq!(seen["headers"]["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "https");
    echoed(&auth_call(&gw, &a));
    echoed(&auth_call(&gw, &a));
    assert_refused(&auth_call(&gw, &a), 429, "TOO_MANY_REQUESTS", LIMITED);
    // What the client wrote in front of the proxy's entry is not believed: the rightmost
    // untrusted address is still 203.0.113.7.
    let spoof = [("x-forwarded-for", "198.51.100.1, 203.0.113.7")];
    assert_refused(&auth_call(&gw, &spoof), 429, "TOO_MANY_REQUESTS", LIMITED);
    // Another client behind the same proxy has its own bucket.
    echoed(&auth_call(&gw, &[("x-forwarded-for", "203.0.113.8")]));
    // A proto the proxy could not have meant is not passed on.
    let odd = [
        ("x-forwarded-for", "203.0.113.9"),
        ("x-forwarded-proto", "gopher"),
    ];
    assert_eq!(
        echoed(&auth_call(&gw, &odd))["headers"]["x-forwarded-proto"],
        "http"
    );
}

#[test]
fn ipv6_clients_share_a_limit_per_64() {
    let gw = Gateway::start_with(Setup::new().server("trusted_proxies = [\"127.0.0.1\"]"));
    for xff in [
        "2001:db8:1:2::1",
        "2001:db8:1:2::ffff",
        "2001:db8:1:2:1:2:3:4",
    ] {
        echoed(&auth_call(&gw, &[("x-forwarded-for", xff)]));
    }
    let r = auth_call(&gw, &[("x-forwarded-for", "2001:db8:1:2:aaaa::5")]);
    assert_refused(&r, 429, "TOO_MANY_REQUESTS", LIMITED);
    echoed(&auth_call(&gw, &[("x-forwarded-for", "2001:db8:1:3::1")]));
}

#[test]
fn trusted_proxies_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &Setup::new()
            .server("trusted_proxies = [\"10.0.0.1/8\", \"proxy.local\"]\nipv6_prefix = 0"),
        free_addr(),
        free_addr(),
        free_addr(),
    );
    let err = msgflash_gateway::config::Config::load_with_env(&path, &env)
        .unwrap_err()
        .to_string();
    let p = path.display();
    assert_eq!(
        err,
        format!(
            "{p}:9:20: server.trusted_proxies: \"10.0.0.1/8\": bits are set below the prefix length (write the network address)\n\
             {p}:9:34: server.trusted_proxies: \"proxy.local\": not an IP address or CIDR block (e.g. \"10.0.0.0/8\")\n\
             {p}:10:15: server.ipv6_prefix: must be between 1 and 128, got 0"
        )
    );
}
