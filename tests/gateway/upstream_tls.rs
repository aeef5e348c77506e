//! SPEC §10 upstreams over TLS: the gateway names the upstream by `sni`, verifies its
//! certificate against `ca_file` (or the system's roots), and refuses to forward (502) to an
//! upstream whose certificate it cannot verify.

use crate::support::*;
use crate::tls::Ca;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use serde_json::{json, Map, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;

/// A TLS upstream serving a certificate for `dns` (signed by `ca`): every request is answered
/// 200 with what it saw (the SNI, the path, the headers), like the echo upstream.
fn tls_upstream(ca: &Ca, dir: &Path, dns: &str) -> SocketAddr {
    let leaf = ca.leaf(dir, "upstream", dns);
    let key = PrivateKeyDer::from_pem_file(dir.join("upstream.key")).unwrap();
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf], key)
        .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let config = config.clone();
            std::thread::spawn(move || serve(config, tcp));
        }
    });
    addr
}

/// Answers requests on one connection until it closes or fails (a refused handshake).
fn serve(config: Arc<rustls::ServerConfig>, tcp: TcpStream) {
    let Ok(conn) = rustls::ServerConnection::new(config) else {
        return;
    };
    let mut stream = BufReader::new(rustls::StreamOwned::new(conn, tcp));
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split(' ').nth(1).unwrap_or_default().to_owned();
        let mut headers = Map::new();
        let mut length = 0usize;
        loop {
            let mut h = String::new();
            if stream.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((n, v)) = h.split_once(':') {
                let (n, v) = (n.to_ascii_lowercase(), v.trim().to_owned());
                if n == "content-length" {
                    length = v.parse().unwrap_or(0);
                }
                headers.insert(n, Value::String(v));
            }
        }
        let mut body = vec![0; length];
        if stream.read_exact(&mut body).is_err() {
            return;
        }
        let sni = stream.get_ref().conn.server_name().map(str::to_owned);
        let seen = json!({ "sni": sni, "path": path, "headers": headers }).to_string();
        let answer = format!(
            "HTTP/1.1 200 OK\r\nx-echo: msgflash\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{seen}",
            seen.len()
        );
        if stream.get_mut().write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// A gateway whose `api` upstream is `addr` over TLS, with these extra upstream settings.
fn gateway_to(addr: SocketAddr, tls: &'static str) -> Gateway {
    Gateway::start_with(Setup::new().api_upstream(ApiUpstream {
        addresses: vec![At::Addr(addr.to_string())],
        tls: Some(tls),
        ..ApiUpstream::default()
    }))
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

#[test]
fn an_upstream_over_tls_is_named_by_sni_and_verified_against_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    ca.write_pem(&dir.path().join("ca.pem"));
    let upstream = tls_upstream(&ca, dir.path(), "backend.test");
    let ca_file = dir.path().join("ca.pem").display().to_string();
    let gw = gateway_to(
        upstream,
        leak(format!(
            "tls = true\nsni = \"backend.test\"\nca_file = \"{ca_file}\""
        )),
    );
    let (key, _) = gw.account_with_key("acme", "pro");
    for _ in 0..2 {
        let seen = echoed(&gw.get("/api/v1/messages?x=1", &[("x-api-key", &key)]));
        assert_eq!(seen["sni"], "backend.test");
        assert_eq!(seen["path"], "/api/v1/messages?x=1");
        assert_eq!(seen["headers"]["x-account-id"], "acme");
    }
}

#[test]
fn an_upstream_certificate_that_does_not_verify_is_never_sent_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, other) = (Ca::new(), Ca::new());
    ca.write_pem(&dir.path().join("ca.pem"));
    other.write_pem(&dir.path().join("other.pem"));
    let upstream = tls_upstream(&ca, dir.path(), "backend.test");
    let file = |name: &str| dir.path().join(name).display().to_string();
    for settings in [
        // Signed by a CA the gateway was not told to trust.
        format!(
            "tls = true\nsni = \"backend.test\"\nca_file = \"{}\"",
            file("other.pem")
        ),
        // Not the name the gateway asked for.
        format!(
            "tls = true\nsni = \"elsewhere.test\"\nca_file = \"{}\"",
            file("ca.pem")
        ),
        // A private CA is not among the system's roots.
        "tls = true\nsni = \"backend.test\"".to_owned(),
    ] {
        let gw = gateway_to(upstream, leak(settings.clone()));
        let (key, _) = gw.account_with_key("acme", "pro");
        let r = gw.get("/api/v1/messages", &[("x-api-key", &key)]);
        assert_error(&r, 502, "BAD_GATEWAY", "The upstream service failed");
        assert_eq!(r.header("x-echo"), None, "{settings}");
    }
}

#[test]
fn upstream_tls_settings_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("empty.pem"), "").unwrap();
    let config_for = |tls: &'static str| {
        let (err, path) = config_errors(
            dir.path(),
            &Setup::new().api_upstream(ApiUpstream {
                tls: Some(tls),
                ..ApiUpstream::default()
            }),
        );
        let p = format!("{}:", path.display());
        err.lines()
            .map(|l| l.strip_prefix(&p).unwrap_or(l).to_owned())
            .collect::<Vec<_>>()
    };
    let tls_line = |errs: &[String]| {
        errs.iter()
            .map(|e| e.split_once(' ').unwrap().1.to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        tls_line(&config_for("tls = true")),
        ["upstreams.api.sni: is required with tls = true: the name sent and verified in the upstream's certificate"]
    );
    assert_eq!(
        tls_line(&config_for("sni = \"backend.test\"\nca_file = \"ca.pem\"")),
        [
            "upstreams.api.sni: applies only with tls = true",
            "upstreams.api.ca_file: applies only with tls = true"
        ]
    );
    let empty = dir.path().join("empty.pem");
    let missing = dir.path().join("missing.pem");
    assert_eq!(
        tls_line(&config_for(
            "tls = true\nsni = \"bad name!\"\nca_file = \"empty.pem\""
        )),
        [
            "upstreams.api.sni: \"bad name!\" is not a DNS name or IP address".to_owned(),
            format!(
                "upstreams.api.ca_file: {} holds no PEM certificate",
                empty.display()
            ),
        ]
    );
    // pingora would verify "my-svc.test" instead.
    assert_eq!(
        tls_line(&config_for("tls = true\nsni = \"my_svc.test\"")),
        ["upstreams.api.sni: \"my_svc.test\" is not a DNS name or IP address"]
    );
    let errs = tls_line(&config_for(
        "tls = true\nsni = \"10.0.0.1\"\nca_file = \"missing.pem\"",
    ));
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with(&format!(
            "upstreams.api.ca_file: cannot read {}: ",
            missing.display()
        )),
        "{errs:?}"
    );
}
