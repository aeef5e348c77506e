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
    // Another client behind the same proxy has its own bucket, and what it wrote left of the
    // proxy's entry is not passed on.
    let seen = echoed(&auth_call(
        &gw,
        &[("x-forwarded-for", "198.51.100.9, 203.0.113.8")],
    ));
    assert_eq!(seen["headers"]["x-forwarded-for"], "203.0.113.8, 127.0.0.1");
    // A proxy that appends speaks last: the client's own `https` in front of it is not
    // believed, on another line or in the same list.
    for proto in [&["https", "http"][..], &["https, http"]] {
        let mut h = vec![("x-forwarded-for", "203.0.113.10")];
        h.extend(proto.iter().map(|p| ("x-forwarded-proto", *p)));
        assert_eq!(
            echoed(&auth_call(&gw, &h))["headers"]["x-forwarded-proto"],
            "http",
            "{proto:?}"
        );
    }
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

/// Failed authentications count per client (an IPv6 /64) and per site (its /48), which may
/// fail sixteen clients' worth: one holder of a /48 does not get 65,536 budgets of guesses.
#[test]
fn an_ipv6_site_shares_a_budget_of_failed_authentications() {
    let gw = Gateway::start_with(
        Setup::new().server("trusted_proxies = [\"127.0.0.1\"]\nauth_failures_per_minute = 2"),
    );
    let guess = |xff: &str| {
        gw.get(
            "/api/v1/x",
            &[
                ("x-api-key", &format!("msgf_live_{}", "7".repeat(64))),
                ("x-forwarded-for", xff),
            ],
        )
    };
    for client in 0..16 {
        for _ in 0..2 {
            let r = guess(&format!("2001:db8:5:{client:x}::1"));
            assert_refused(&r, 401, "UNAUTHORIZED", "Invalid or revoked API key");
        }
    }
    // A seventeenth /64 of the same /48, its own budget untouched.
    let r = guess("2001:db8:5:99::1");
    assert_refused(
        &r,
        429,
        "TOO_MANY_REQUESTS",
        "Too many failed authentications from this client",
    );
    assert_eq!(r.header("retry-after"), Some("2"));
    // Another site, and an IPv4 client, are their own.
    let r = guess("2001:db8:6::1");
    assert_refused(&r, 401, "UNAUTHORIZED", "Invalid or revoked API key");
    let r = guess("203.0.113.9");
    assert_refused(&r, 401, "UNAUTHORIZED", "Invalid or revoked API key");
}

/// Every failed authentication counts (SPEC §10), the ones refused before any lookup too: a
/// malformed key, a key sent twice, two `Authorization` headers, another scheme. A missing
/// credential is no failed authentication.
#[test]
fn malformed_and_doubled_credentials_count_as_failures() {
    let over = |r: crate::client::HttpResponse| {
        assert_refused(
            &r,
            429,
            "TOO_MANY_REQUESTS",
            "Too many failed authentications from this client",
        );
    };
    let unseen = format!("msgf_live_{}", "7".repeat(64));
    for doubled in [false, true] {
        let gw = Gateway::start_with(Setup::new().server("auth_failures_per_minute = 3"));
        let (valid, _) = gw.account_with_key("acme", "pro");
        for _ in 0..5 {
            assert_eq!(gw.get("/api/v1/x", &[]).status, 401, "missing: not counted");
        }
        for _ in 0..3 {
            let r = if doubled {
                gw.get("/api/v1/x", &[("x-api-key", &valid), ("x-api-key", &valid)])
            } else {
                gw.get("/api/v1/x", &[("x-api-key", "msgf_live_nope")])
            };
            assert_refused(&r, 401, "UNAUTHORIZED", "Invalid or revoked API key");
        }
        over(gw.get("/api/v1/x", &[("x-api-key", &unseen)]));
    }
    for doubled in [false, true] {
        let gw = Gateway::start_with(Setup::new().server("auth_failures_per_minute = 3"));
        let token = format!("Bearer {}", gw.token("acme", 3600));
        for _ in 0..3 {
            let r = if doubled {
                gw.get(
                    "/api/instances",
                    &[("authorization", &token), ("authorization", &token)],
                )
            } else {
                gw.get(
                    "/api/instances",
                    &[("authorization", "Basic YWNtZTpodW50ZXIy")],
                )
            };
            assert_refused(&r, 401, "UNAUTHORIZED", "Invalid or expired token");
        }
        over(gw.get("/api/instances", &[("authorization", &token)]));
    }
}

/// Per-client limits count IPv6 clients by their /64, and a /48 holds 65,536 of them: the
/// site's /64s together get 16 clients' budget on a limited route (a login guessed from a whole
/// site), a client refused for its site keeps its own budget, and a client of another site is
/// not touched.
#[test]
fn an_ipv6_site_shares_sixteen_clients_budget_on_a_limited_route() {
    let gw = Gateway::start_with(Setup::new().server("trusted_proxies = [\"127.0.0.1/32\"]"));
    // ip_burst = 3: 16 clients of one /48, 3 each, all pass.
    for n in 0..16 {
        let from = format!("2001:db8:1:{n:x}::1");
        for _ in 0..3 {
            echoed(&auth_call(&gw, &[("x-forwarded-for", &from)]));
        }
    }
    // A 17th /64 of the same site, its own bucket full: refused for the site, and those
    // refusals take nothing from its own bucket: a second later (the site has refilled 16) it
    // still has its burst of 3, then its own limit.
    let seventeenth = [("x-forwarded-for", "2001:db8:1:10::1")];
    for _ in 0..3 {
        assert_refused(
            &auth_call(&gw, &seventeenth),
            429,
            "TOO_MANY_REQUESTS",
            LIMITED,
        );
    }
    gw.clock.advance_ms(1000);
    for _ in 0..3 {
        echoed(&auth_call(&gw, &seventeenth));
    }
    assert_refused(
        &auth_call(&gw, &seventeenth),
        429,
        "TOO_MANY_REQUESTS",
        LIMITED,
    );
    echoed(&auth_call(&gw, &[("x-forwarded-for", "2001:db8:2::1")]));
    echoed(&auth_call(&gw, &[("x-forwarded-for", "203.0.113.20")]));
}

#[test]
fn trusted_proxies_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let (err, path) = config_errors(
        dir.path(),
        &Setup::new().server(
            "trusted_proxies = [\"10.0.0.1/8\", \"proxy.local\", \"::/0\"]\nipv6_prefix = 0",
        ),
    );
    let p = path.display();
    assert_eq!(
        err,
        format!(
            "{p}:9:20: server.trusted_proxies: \"10.0.0.1/8\": bits are set below the prefix length (write the network address)\n\
             {p}:9:34: server.trusted_proxies: \"proxy.local\": not an IP address or CIDR block (e.g. \"10.0.0.0/8\")\n\
             {p}:9:49: server.trusted_proxies: \"::/0\": trusts every address, so any client could name its own (list the front proxies' networks)\n\
             {p}:10:15: server.ipv6_prefix: must be between 1 and 128, got 0"
        )
    );
}

/// One client's guesses do not lock out the legitimate keys behind the same address (a NAT, a
/// platform's egress): past the limit, a key this node found valid within a day is still looked
/// up once its cache entry has expired; a valid key it never saw waits like a guess.
fn keys_seen_valid_stay_usable_behind_an_address_that_guesses(b: Backend) {
    let gw = Gateway::start_with_backend(b, Setup::new().server("auth_failures_per_minute = 1"));
    let (valid, _) = gw.account_with_key("acme", "pro");
    let (unseen, _) = gw.create_key("acme");
    echoed(&gw.get("/api/v1/x", &[("x-api-key", &valid)]));
    let guess = format!("msgf_live_{}", "7".repeat(64));
    assert_eq!(gw.get("/api/v1/x", &[("x-api-key", &guess)]).status, 401);
    assert_eq!(gw.get("/api/v1/x", &[("x-api-key", &guess)]).status, 429);
    // Past the cache's 30 s; the limit gives a token back only after 60 s.
    gw.clock.advance_ms(31_000);
    echoed(&gw.get("/api/v1/x", &[("x-api-key", &valid)]));
    assert_refused(
        &gw.get("/api/v1/x", &[("x-api-key", &unseen)]),
        429,
        "TOO_MANY_REQUESTS",
        "Too many failed authentications from this client",
    );
}

fn a_flood_of_guessed_keys_stops_costing_lookups(b: Backend) {
    let gw = Gateway::start_with_backend(b, Setup::new().server("auth_failures_per_minute = 20"));
    let (valid, _) = gw.account_with_key("acme", "pro");
    echoed(&gw.get("/api/v1/x", &[("x-api-key", &valid)]));
    let (uncached, _) = gw.create_key("acme");
    let lookups_before = gw
        .redis
        .as_ref()
        .map(|r| r.command_calls().get("get").copied().unwrap_or(0));
    let guess = |i: u32| format!("msgf_live_{:064x}", u64::from(i) + 7);
    for i in 0..20 {
        let r = gw.get("/api/v1/x", &[("x-api-key", &guess(i))]);
        assert_refused(&r, 401, "UNAUTHORIZED", "Invalid or revoked API key");
    }
    // Over the limit: a guess, a malformed key and a valid key this node has not seen yet are
    // all refused without a lookup; the key it knows still passes.
    for key in [guess(99).as_str(), "msgf_live_nope", uncached.as_str()] {
        let r = gw.get("/api/v1/x", &[("x-api-key", key)]);
        assert_refused(
            &r,
            429,
            "TOO_MANY_REQUESTS",
            "Too many failed authentications from this client",
        );
        assert_eq!(r.header("retry-after"), Some("3"));
    }
    echoed(&gw.get("/api/v1/x", &[("x-api-key", &valid)]));
    for i in 100..300 {
        assert_eq!(gw.get("/api/v1/x", &[("x-api-key", &guess(i))]).status, 429);
    }
    if let (Some(before), Some(redis)) = (lookups_before, &gw.redis) {
        let after = redis.command_calls().get("get").copied().unwrap_or(0);
        println!(
            "{} store lookups for 223 bad keys from one client",
            after - before
        );
        // One GET per guess under the limit (and the account of the valid key), none after.
        assert!(
            after - before <= 21,
            "{} lookups for 223 bad keys",
            after - before
        );
    }
    // A token comes back every 3 s (20 a minute): one more lookup may happen then.
    gw.clock.advance_ms(3_000);
    let r = gw.get("/api/v1/x", &[("x-api-key", &uncached)]);
    assert_eq!(r.status, 200, "{}", r.text());
}

crate::on_both_stores!(
    a_flood_of_guessed_keys_stops_costing_lookups,
    keys_seen_valid_stay_usable_behind_an_address_that_guesses,
);

/// Asserts that a new connection is closed at accept: a request on it gets no answer at all.
#[track_caller]
fn assert_closed_at_accept(gw: &Gateway) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(gw.proxy).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let _ = s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n");
    assert_closed_without_answer(&mut s, "a connection over the cap");
}

/// Connections per client address are capped; a closed one gives its place back; the refusals
/// are counted by cap.
#[test]
fn connections_per_client_are_capped_at_accept() {
    let gw = Gateway::start_with(Setup::new().server("max_connections_per_client = 2"));
    let (key, _) = gw.account_with_key("acme", "pro");
    let mut held = gw.held_connections(&key, 2);
    assert_closed_at_accept(&gw);
    assert_eq!(
        gw.metric_line("msgflash_connections_refused_total{cap=\"per_client\"}"),
        "msgflash_connections_refused_total{cap=\"per_client\"} 1"
    );
    assert_eq!(
        gw.metric_line("msgflash_connections_open "),
        "msgflash_connections_open 2"
    );
    // The held connections are still served; once one closes, a new one is admitted.
    echoed(
        &held[0]
            .send("GET", "/api/v1/x", &[("x-api-key", &key)], None)
            .unwrap(),
    );
    drop(held.pop());
    eventually("a closed connection gives its place back", || {
        gw.metric_line("msgflash_connections_open ") == "msgflash_connections_open 1"
    });
    echoed(&gw.get("/api/v1/x", &[("x-api-key", &key)]));
}

/// Trusted proxies are exempt from the per-client cap, not from the global one. At the global
/// cap, connections with a request under way keep their places; one kept alive idle gives its
/// place to the new connection and is closed (nginx's reusable connections).
#[test]
fn trusted_proxies_meet_only_the_global_connection_cap() {
    use std::io::Write;
    let gw = Gateway::start_with(
        Setup::new()
            .server("trusted_proxies = [\"127.0.0.1/32\"]")
            .server("max_connections_per_client = 1")
            .server("max_connections = 2"),
    );
    let (key, _) = gw.account_with_key("acme", "pro");
    // Two heads begun, not finished: requests under way.
    let busy: Vec<std::net::TcpStream> = (0..2)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(gw.proxy).unwrap();
            s.write_all(b"GET /api/v1/x HTTP/1.1\r\nhost: x\r\n")
                .unwrap();
            s
        })
        .collect();
    eventually("both are admitted", || {
        gw.metric_line("msgflash_connections_open ") == "msgflash_connections_open 2"
    });
    assert_closed_at_accept(&gw);
    assert_eq!(
        gw.metric_line("msgflash_connections_refused_total{cap=\"global\"}"),
        "msgflash_connections_refused_total{cap=\"global\"} 1"
    );
    drop(busy);
    eventually("their places come back", || {
        gw.metric_line("msgflash_connections_open ") == "msgflash_connections_open 0"
    });
    // One connection kept alive after a request (idle), one with a head begun (busy): a new
    // connection is served in the idle one's place, which closes on its own, unasked.
    let mut idle = gw.held_connections(&key, 1).remove(0);
    let mut busy = gw.connect();
    busy.write_raw(b"GET /api/v1/x HTTP/1.1\r\nhost: x\r\n")
        .unwrap();
    eventually("both are admitted, one waits idle", || {
        gw.metric_line("msgflash_connections_open ") == "msgflash_connections_open 2"
            && gw.metric_line("msgflash_connections_idle ") == "msgflash_connections_idle 1"
    });
    echoed(&gw.get("/api/v1/x", &[("x-api-key", &key)]));
    assert_eq!(
        gw.metric_line("msgflash_connections_reclaimed_total"),
        "msgflash_connections_reclaimed_total 1"
    );
    assert_eq!(idle.read_until_closed().unwrap(), b"", "closed quietly");
    // The busy one kept its place: its request is answered.
    let r = busy
        .raw(format!("x-api-key: {key}\r\n\r\n").as_bytes())
        .unwrap();
    echoed(&r);
    eventually("the counts come back", || {
        gw.metric_line("msgflash_connections_open ") == "msgflash_connections_open 1"
    });
}
