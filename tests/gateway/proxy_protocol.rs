//! SPEC §10 client addresses through the PROXY protocol: a listener with the option on reads a
//! v1 or v2 header first on every connection; a trusted balancer's header names the client
//! that limits, caps and `X-Forwarded-For` then use; anyone else's is read and ignored; a
//! connection without a valid header is closed without an answer.

use crate::client::Connection;
use crate::support::*;
use std::io::Write;
use std::net::{Ipv6Addr, TcpStream};

const LIMITED: &str = "Too many requests from this client";
const TRUSTED: &str = "trusted_proxies = [\"127.0.0.1/32\"]";

fn v1(client: &str) -> Vec<u8> {
    format!("PROXY TCP4 {client} 10.0.0.1 51234 443\r\n").into_bytes()
}

/// A v2 PROXY header for an IPv6 client, with a TLV the gateway skips.
fn v2_ipv6(client: Ipv6Addr) -> Vec<u8> {
    let mut body = client.octets().to_vec();
    body.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
    body.extend_from_slice(&[0xc8, 0x01, 0x01, 0xbb]);
    body.extend_from_slice(&[0x04, 0x00, 0x02, 0xab, 0xcd]); // PP2_TYPE_NOOP
    v2(0x21, 0x21, &body)
}

fn v2(ver_cmd: u8, family: u8, body: &[u8]) -> Vec<u8> {
    let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    out.extend_from_slice(&[ver_cmd, family]);
    out.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// A connection that has written `header` first.
fn behind(gw: &Gateway, header: &[u8]) -> Connection {
    let mut c = gw.connect();
    c.write_raw(header).unwrap();
    c
}

fn login(c: &mut Connection) -> crate::client::HttpResponse {
    c.send("GET", "/api/auth/login", &[], None).unwrap()
}

fn proxied_gateway(extra: &str) -> Gateway {
    let mut setup = Setup::new().server("proxy_protocol = true");
    for line in extra.lines() {
        setup = setup.server(line);
    }
    Gateway::start_with(setup)
}

#[test]
fn a_trusted_balancer_names_the_client_in_v1_and_v2_headers() {
    let gw = proxied_gateway(TRUSTED);
    let mut a = behind(&gw, &v1("203.0.113.7"));
    // A client's own X-Forwarded-For is not believed: the balancer's word is.
    let seen = echoed(
        &a.send(
            "GET",
            "/api/auth/login",
            &[("x-forwarded-for", "198.51.100.1")],
            None,
        )
        .unwrap(),
    );
    assert_eq!(seen["headers"]["x-forwarded-for"], "203.0.113.7");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "http");
    // The same client on the same connection and on a new one shares one per-client bucket
    // (the open route allows a burst of 3).
    echoed(&login(&mut a));
    echoed(&login(&mut behind(&gw, &v1("203.0.113.7"))));
    assert_refused(&login(&mut a), 429, "TOO_MANY_REQUESTS", LIMITED);
    // Another client behind the same balancer has its own.
    let client: Ipv6Addr = "2001:db8:7::9".parse().unwrap();
    let seen = echoed(&login(&mut behind(&gw, &v2_ipv6(client))));
    assert_eq!(seen["headers"]["x-forwarded-for"], "2001:db8:7::9");
}

#[test]
fn an_untrusted_peers_header_is_read_and_its_address_ignored() {
    let gw = proxied_gateway("");
    let seen = echoed(&login(&mut behind(&gw, &v1("203.0.113.7"))));
    assert_eq!(seen["headers"]["x-forwarded-for"], "127.0.0.1");
    // Three calls from "three clients" are one client: the peer.
    echoed(&login(&mut behind(&gw, &v1("203.0.113.8"))));
    echoed(&login(&mut behind(&gw, &v2_ipv6(Ipv6Addr::LOCALHOST))));
    let r = login(&mut behind(&gw, &v1("203.0.113.9")));
    assert_refused(&r, 429, "TOO_MANY_REQUESTS", LIMITED);
}

/// v2 `LOCAL` (a health check) and v1 `UNKNOWN` name no client: the peer is the client, and
/// although the balancer is trusted, the forwarding headers on such a connection are not (an
/// L4 balancer writes none: they are whatever it relayed from the client).
#[test]
fn a_balancers_own_connection_is_its_own_client() {
    let gw = proxied_gateway(TRUSTED);
    let local = v2(0x20, 0x11, &[192, 0, 2, 1, 10, 0, 0, 1, 0, 80, 0, 80]);
    for header in [local, b"PROXY UNKNOWN\r\n".to_vec()] {
        let mut c = behind(&gw, &header);
        let claimed = [
            ("x-forwarded-for", "198.51.100.1"),
            ("x-forwarded-proto", "https"),
        ];
        let seen = echoed(&c.send("GET", "/api/auth/login", &claimed, None).unwrap());
        assert_eq!(seen["headers"]["x-forwarded-for"], "127.0.0.1");
        assert_eq!(seen["headers"]["x-forwarded-proto"], "http");
    }
}

#[test]
fn a_connection_without_a_valid_header_is_closed_and_counted() {
    let gw = proxied_gateway(&format!("{TRUSTED}\nheader_timeout = \"1s\""));
    let bad: [&[u8]; 4] = [
        b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n",
        b"PROXY TCP4 203.0.113.7 10.0.0.1 051234 443\r\nGET /health HTTP/1.1\r\nhost: x\r\n\r\n",
        b"PROXY TCP4 2001:db8::1 10.0.0.1 1 443\r\nGET /health HTTP/1.1\r\nhost: x\r\n\r\n",
        // Never finished: closed at the header timeout.
        b"PROXY TCP4 203.0.113.7 ",
    ];
    for bytes in bad {
        let mut s = TcpStream::connect(gw.proxy).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        s.write_all(bytes).unwrap();
        assert_closed_without_answer(&mut s, &String::from_utf8_lossy(bytes));
    }
    assert_eq!(
        gw.metric_line("msgflash_proxy_headers_refused_total"),
        "msgflash_proxy_headers_refused_total 4"
    );
}

#[test]
fn connection_caps_count_the_client_a_balancer_names() {
    let gw = proxied_gateway(&format!("{TRUSTED}\nmax_connections_per_client = 1"));
    let (key, _) = gw.account_with_key("acme", "pro");
    let call = |c: &mut Connection| c.send("GET", "/api/v1/x", &[("x-api-key", &key)], None);
    let mut a = behind(&gw, &v1("203.0.113.7"));
    echoed(&call(&mut a).unwrap());
    // A second connection for the same client is over its cap; another client's is not.
    let mut again = behind(&gw, &v1("203.0.113.7"));
    assert!(call(&mut again).is_err(), "a second connection was served");
    echoed(&call(&mut behind(&gw, &v1("203.0.113.8"))).unwrap());
    assert_eq!(
        gw.metric_line("msgflash_connections_refused_total{cap=\"per_client\"}"),
        "msgflash_connections_refused_total{cap=\"per_client\"} 1"
    );
}

/// A peer that is no trusted balancer is its own client from its first byte (its header is
/// read and ignored): its connections take places under its own cap at once, so one address
/// cannot fill the global cap with connections that never finish a header. A third silent one
/// over a cap of two is closed at once, not held for the header timeout (an hour here).
#[test]
fn an_untrusted_peer_reading_its_header_counts_under_its_own_cap() {
    let gw = proxied_gateway("max_connections_per_client = 2\nheader_timeout = \"1h\"");
    // The start-up probe's connection (from 127.0.0.1 too) is gone first.
    eventually("no connection is open", || {
        gw.metric_line("msgflash_connections_open") == "msgflash_connections_open 0"
    });
    let silent: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(gw.proxy).unwrap())
        .collect();
    // Both hold their places before the third comes (the table is filled in accept order).
    eventually("two connections are open", || {
        gw.metric_line("msgflash_connections_open") == "msgflash_connections_open 2"
    });
    let mut third = TcpStream::connect(gw.proxy).unwrap();
    third
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    assert_closed_without_answer(&mut third, "a third connection over the peer's cap");
    assert_eq!(
        gw.metric_line("msgflash_connections_refused_total{cap=\"per_client\"}"),
        "msgflash_connections_refused_total{cap=\"per_client\"} 1"
    );
    drop(silent);
}

#[test]
fn turning_it_on_or_off_takes_a_restart() {
    let gw = proxied_gateway(TRUSTED);
    let text = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(
        gw.config_path(),
        text.replace("proxy_protocol = true", "proxy_protocol = false"),
    )
    .unwrap();
    let r = gw.admin_call("POST", "/admin/v1/reload", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json().unwrap()["needsRestart"],
        serde_json::json!(["server.proxy_protocol"])
    );
    // Still on until then.
    echoed(&login(&mut behind(&gw, &v1("203.0.113.7"))));
}
