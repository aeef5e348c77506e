//! SPEC §10 TLS at the edge: the contract over TLS, certificates by SNI, rotation on reload for
//! new connections while open ones finish, bad files refused with the old ones kept.

use crate::client::{read_response, HttpResponse};
use crate::support::*;
use rustls::pki_types::{CertificateDer, ServerName};
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A test CA and leaf certificates it signs.
pub struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    pub fn new() -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self { cert, key }
    }

    /// Writes `<name>.pem` and `<name>.key` for a leaf serving `dns`; returns the leaf's DER.
    pub fn leaf(&self, dir: &Path, name: &str, dns: &str) -> CertificateDer<'static> {
        let params = rcgen::CertificateParams::new(vec![dns.to_owned()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
        cert.der().clone()
    }

    /// Writes the CA's certificate (PEM) to `path`.
    pub fn write_pem(&self, path: &Path) {
        std::fs::write(path, self.cert.pem()).unwrap();
    }

    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).unwrap();
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        )
    }
}

/// A TLS connection that verified the server against the test CA for `server_name`.
struct TlsConn {
    stream: BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>,
}

impl TlsConn {
    fn open(addr: SocketAddr, ca: &Ca, server_name: &str) -> Self {
        Self::open_after(addr, ca, server_name, b"")
    }

    /// A connection that writes `preamble` (a PROXY protocol header) before the handshake.
    fn open_after(addr: SocketAddr, ca: &Ca, server_name: &str, preamble: &[u8]) -> Self {
        let name = ServerName::try_from(server_name.to_owned()).unwrap();
        let conn = rustls::ClientConnection::new(ca.client_config(), name).unwrap();
        let mut tcp = TcpStream::connect(addr).unwrap();
        tcp.write_all(preamble).unwrap();
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        Self {
            stream: BufReader::new(rustls::StreamOwned::new(conn, tcp)),
        }
    }

    fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
        let mut head = format!("GET {path} HTTP/1.1\r\nhost: api.test\r\n");
        for (n, v) in headers {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
        head.push_str("\r\n");
        self.stream.get_mut().write_all(head.as_bytes()).unwrap();
        read_response(&mut self.stream, false).unwrap()
    }

    /// The leaf certificate the server presented.
    fn server_cert(&self) -> CertificateDer<'static> {
        self.stream.get_ref().conn.peer_certificates().unwrap()[0].clone()
    }
}

/// A gateway with a TLS listener serving `certs` (`(name, dns)` pairs written by `ca`).
fn tls_gateway(ca: &Ca, dir: &Path, certs: &[(&str, &str)]) -> (Gateway, SocketAddr) {
    tls_gateway_with(ca, dir, certs, "", Setup::new())
}

/// As [`tls_gateway`], with more settings for the TLS listener and the rest of `setup`.
fn tls_gateway_with(
    ca: &Ca,
    dir: &Path,
    certs: &[(&str, &str)],
    tls_extra: &str,
    setup: Setup,
) -> (Gateway, SocketAddr) {
    for (name, dns) in certs {
        ca.leaf(dir, name, dns);
    }
    let tls_addr = free_addr();
    let list = certs
        .iter()
        .map(|(name, _)| {
            let p = |ext: &str| dir.join(format!("{name}.{ext}")).display().to_string();
            format!("{{ cert = \"{}\", key = \"{}\" }}", p("pem"), p("key"))
        })
        .collect::<Vec<_>>()
        .join(", ");
    let gw = Gateway::start_with(setup.server(&format!(
        "tls = {{ listen = \"{tls_addr}\", certificates = [{list}]{tls_extra} }}"
    )));
    wait_listening(tls_addr);
    (gw, tls_addr)
}

fn files(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    )
}

#[test]
fn the_public_api_works_the_same_over_tls() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (gw, tls) = tls_gateway(&ca, dir.path(), &[("api", "api.test")]);
    let (key, _) = gw.account_with_key("acme", "pro");
    let mut conn = TlsConn::open(tls, &ca, "api.test");
    let seen = echoed(&conn.get("/api/v1/messages", &[("x-api-key", &key)]));
    assert_eq!(seen["headers"]["x-account-id"], "acme");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "https");
    // Same connection, a refusal word for word, then the plain listener beside it.
    let r = conn.get("/api/v1/messages", &[("x-api-key", "msgf_live_nope")]);
    assert_refused(&r, 401, "UNAUTHORIZED", "Invalid or revoked API key");
    let plain = echoed(&gw.get("/api/v1/messages", &[("x-api-key", &key)]));
    assert_eq!(plain["headers"]["x-forwarded-proto"], "http");
    // A head that never ends is answered 431 over TLS too, once past its bound.
    let mut endless = TlsConn::open(tls, &ca, "api.test");
    let mut head = String::from("GET /api/v1/messages HTTP/1.1\r\nhost: api.test\r\n");
    for i in 0..100 {
        head.push_str(&format!("x-pad-{i}: {}\r\n", "a".repeat(1000)));
    }
    endless.stream.get_mut().write_all(head.as_bytes()).unwrap();
    let r = read_response(&mut endless.stream, false).unwrap();
    assert_refused(&r, 431, "HEADERS_TOO_LARGE", "Request headers too large");
    // The served certificate's expiry is in the metrics (rcgen's default not_after: 4096-01-01).
    let metrics = crate::client::request(gw.admin, "GET", "/metrics", &[], None)
        .unwrap()
        .text();
    let line = format!(
        "msgflash_tls_certificate_expiry_timestamp_seconds{{file=\"{}\"}} 67090118400\n",
        dir.path().join("api.pem").display()
    );
    assert!(metrics.contains(&line), "{metrics}");
}

/// A TLS listener with the PROXY protocol reads the header before the handshake: a trusted
/// balancer's client is the client, and the protocol is still https.
#[test]
fn a_tls_listener_reads_the_proxy_header_before_the_handshake() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (gw, tls) = tls_gateway_with(
        &ca,
        dir.path(),
        &[("api", "api.test")],
        ", proxy_protocol = true",
        Setup::new().server("trusted_proxies = [\"127.0.0.1/32\"]"),
    );
    let (key, _) = gw.account_with_key("acme", "pro");
    let header = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n";
    let mut conn = TlsConn::open_after(tls, &ca, "api.test", header);
    let seen = echoed(&conn.get("/api/v1/messages", &[("x-api-key", &key)]));
    assert_eq!(seen["headers"]["x-forwarded-for"], "203.0.113.7");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "https");
    // The plain listener beside it is unchanged (no header expected there).
    let plain = echoed(&gw.get("/api/v1/messages", &[("x-api-key", &key)]));
    assert_eq!(plain["headers"]["x-forwarded-for"], "127.0.0.1");
    // A handshake without the header is dropped.
    let mut s = TcpStream::connect(tls).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    s.write_all(b"\x16\x03\x01\x00\x05hello").unwrap();
    assert_closed_without_answer(&mut s, "a TLS hello without a PROXY header");
}

/// The admin listener with its own certificates speaks TLS only; its token and answers are
/// the same; its certificate's expiry is in the metrics beside the public one's.
#[test]
fn the_admin_listener_speaks_tls_when_given_certificates() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    ca.leaf(dir.path(), "admin", "admin.test");
    let (pem, key) = files(dir.path(), "admin");
    let gw = Gateway::start_with(Setup::new().admin(&format!(
        "tls = {{ certificates = [{{ cert = \"{}\", key = \"{}\" }}] }}",
        pem.display(),
        key.display()
    )));
    let mut conn = TlsConn::open(gw.admin, &ca, "admin.test");
    assert_eq!(conn.get("/healthz", &[]).status, 200);
    let r = conn.get("/admin/v1/accounts/acme", &[]);
    assert_error(&r, 401, "UNAUTHORIZED", "Invalid or missing admin token");
    let token = format!("Bearer {}", crate::support::ADMIN_TOKEN);
    let r = conn.get("/admin/v1/accounts/nobody", &[("authorization", &token)]);
    assert_eq!(r.status, 404, "{}", r.text());
    let metrics = conn.get("/metrics", &[]).text();
    let line = format!(
        "msgflash_tls_certificate_expiry_timestamp_seconds{{file=\"{}\"}} 67090118400\n",
        pem.display()
    );
    assert!(metrics.contains(&line), "{metrics}");
    // Plain HTTP gets no HTTP answer there.
    let plain = crate::client::request(gw.admin, "GET", "/healthz", &[], None);
    assert!(plain.is_err(), "{:?}", plain.map(|r| r.status));
    // The command-line client speaks plain HTTP: it refuses, rather than send the token in
    // clear text to a listener that expects TLS.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_msgflash-gateway"))
        .arg("-c")
        .arg(gw.config_path())
        .args(["accounts", "show", "acme"])
        .env("TEST_ADMIN_TOKEN", crate::support::ADMIN_TOKEN)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "the admin listener at {} speaks TLS only, which this command does not",
            gw.admin
        )),
        "{err}"
    );
}

#[test]
fn sni_picks_the_certificate() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let api = ca.leaf(dir.path(), "api", "api.test");
    let console = ca.leaf(dir.path(), "console", "console.test");
    let tls_addr = free_addr();
    let p = |n: &str| {
        let (c, k) = files(dir.path(), n);
        format!(
            "{{ cert = \"{}\", key = \"{}\" }}",
            c.display(),
            k.display()
        )
    };
    let _gw = Gateway::start_with(Setup::new().server(&format!(
        "tls = {{ listen = \"{tls_addr}\", certificates = [{}, {}] }}",
        p("api"),
        p("console")
    )));
    wait_listening(tls_addr);
    let mut a = TlsConn::open(tls_addr, &ca, "api.test");
    assert_eq!(a.get("/nowhere", &[]).status, 404);
    assert_eq!(a.server_cert(), api);
    let mut c = TlsConn::open(tls_addr, &ca, "console.test");
    assert_eq!(c.get("/nowhere", &[]).status, 404);
    assert_eq!(c.server_cert(), console);
}

#[test]
fn a_reload_rotates_certificates_for_new_connections_and_refuses_bad_ones() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (gw, tls) = tls_gateway(&ca, dir.path(), &[("api", "api.test")]);
    let mut old = TlsConn::open(tls, &ca, "api.test");
    assert_eq!(old.get("/nowhere", &[]).status, 404);
    let first = old.server_cert();

    // New files in place, then a reload: new handshakes get them.
    let second = ca.leaf(dir.path(), "api", "api.test");
    assert_ne!(first, second);
    let r = gw.admin_call("POST", "/admin/v1/reload", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let mut new = TlsConn::open(tls, &ca, "api.test");
    assert_eq!(new.get("/nowhere", &[]).status, 404);
    assert_eq!(new.server_cert(), second);
    // The connection opened before keeps being served.
    assert_eq!(old.get("/nowhere", &[]).status, 404);

    // A key that does not go with its certificate: refused with the reason, old pair stays.
    ca.leaf(dir.path(), "other", "api.test");
    let (cert, _) = files(dir.path(), "api");
    let (_, other_key) = files(dir.path(), "other");
    std::fs::copy(&other_key, dir.path().join("api.key")).unwrap();
    let r = gw.admin_call("POST", "/admin/v1/reload", None);
    let message = r.json().unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(r.status, 400, "{message}");
    let config = gw.config_path();
    assert!(
        message.starts_with(&format!("Reload refused: {}:", config.display())),
        "{message}"
    );
    assert!(
        message.contains(&format!(
            "server.tls.certificates: the key in {} does not go with the certificate in {}",
            dir.path().join("api.key").display(),
            cert.display()
        )),
        "{message}"
    );
    let mut after = TlsConn::open(tls, &ca, "api.test");
    assert_eq!(after.get("/nowhere", &[]).status, 404);
    assert_eq!(after.server_cert(), second);
}

/// One HTTP/2 exchange over TLS (ALPN h2): (status, headers, body).
fn h2_get(
    addr: SocketAddr,
    ca: &Ca,
    requests: Vec<(String, Vec<(&'static str, String)>)>,
) -> Vec<(u16, http::HeaderMap, Vec<u8>)> {
    h2_send(
        addr,
        ca,
        requests.into_iter().map(|(p, h)| (p, h, None)).collect(),
    )
}

/// One HTTP/2 request: path, headers, and an optional body.
type H2Request = (String, Vec<(&'static str, String)>, Option<Vec<u8>>);

/// HTTP/2 exchanges over TLS (ALPN h2), each with an optional body (sent without a
/// content-length, as h2 allows).
/// An HTTP/2 client over TLS (ALPN h2) to `api.test` at `addr`, its connection driven on the
/// current runtime.
async fn h2_client(addr: SocketAddr, ca: &Ca) -> h2::client::SendRequest<bytes::Bytes> {
    let tls = h2_tls(addr, ca).await;
    let (client, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A TLS connection to `api.test` at `addr` that negotiated HTTP/2 (ALPN h2), nothing sent on it.
async fn h2_tls(
    addr: SocketAddr,
    ca: &Ca,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut config = (*ca.client_config()).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("api.test".to_owned()).unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tls
}

fn h2_send(
    addr: SocketAddr,
    ca: &Ca,
    requests: Vec<H2Request>,
) -> Vec<(u16, http::HeaderMap, Vec<u8>)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let client = h2_client(addr, ca).await;
        let mut out = Vec::new();
        for (path, headers, body) in requests {
            let mut client = client.clone().ready().await.unwrap();
            let mut req = http::Request::get(format!("https://api.test{path}"));
            for (n, v) in &headers {
                req = req.header(*n, v);
            }
            let (response, mut stream) = client
                .send_request(req.body(()).unwrap(), body.is_none())
                .unwrap();
            if let Some(body) = body {
                stream.send_data(body.into(), true).unwrap();
            }
            let response = response.await.unwrap();
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let mut body = response.into_body();
            let mut bytes = Vec::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.unwrap();
                let _ = body.flow_control().release_capacity(chunk.len());
                bytes.extend_from_slice(&chunk);
            }
            out.push((status, headers, bytes));
        }
        out
    })
}

#[test]
fn http2_gets_every_check_and_answer_of_http1() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (gw, tls) = tls_gateway(&ca, dir.path(), &[("api", "api.test")]);
    let (key, _) = gw.account_with_key("acme", "pro");
    let with_key = |k: &str| vec![("x-api-key", k.to_owned())];
    let mut answers = h2_get(
        tls,
        &ca,
        vec![
            ("/api/v1/messages".into(), with_key(&key)),
            ("/api/v1/messages".into(), with_key("msgf_live_nope")),
            ("/api/v1/..%2fapi-keys".into(), with_key(&key)),
            ("/api/v1/messages".into(), vec![]),
            // Spaces around the key: HTTP/1.1's parser drops them, HTTP/2 delivers them.
            ("/api/v1/messages".into(), with_key(&format!(" {key}\t"))),
        ],
    );
    let spaced = answers.pop().unwrap();
    assert_eq!(spaced.0, 200, "{}", String::from_utf8_lossy(&spaced.2));
    let (status, headers, body) = &answers[0];
    assert_eq!(*status, 200);
    assert_eq!(headers["x-echo"], "msgflash");
    assert_eq!(headers["ratelimit"], "\"burst\";r=9;t=1");
    let seen: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(seen["headers"]["x-account-id"], "acme");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "https");
    assert!(seen["headers"].get("x-api-key").is_none());
    let refusals = [
        (401, "UNAUTHORIZED", "Invalid or revoked API key"),
        (
            400,
            "BAD_REQUEST",
            "Ambiguous request path: it contains an encoded '/' or '\\' (%2F, %5C)",
        ),
        (
            401,
            "UNAUTHORIZED",
            "Missing API key. Send it in the x-api-key header.",
        ),
    ];
    for (answer, (status, code, message)) in answers[1..].iter().zip(refusals) {
        assert_h2_refused(answer, status, code, message);
    }
}

/// HTTP/2 only: a `:path` that starts with its query is refused as HTTP/1.1's `GET ?x` is, and
/// cookies sent as separate fields (as HTTP/2 clients send them) reach the HTTP/1.1 upstream
/// as one field (RFC 9113 §8.2.3), so that no backend reads only the first.
#[test]
fn http2_targets_without_a_path_are_refused_and_cookies_go_up_as_one() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (gw, tls) = tls_gateway(&ca, dir.path(), &[("api", "api.test")]);
    let (key, _) = gw.account_with_key("acme", "pro");
    let answers = h2_get(
        tls,
        &ca,
        vec![
            ("?instanceId=x".into(), vec![("x-api-key", key.clone())]),
            (
                "/api/v1/messages".into(),
                vec![
                    ("x-api-key", key.clone()),
                    ("cookie", "a=1".into()),
                    ("cookie", "b=2".into()),
                ],
            ),
        ],
    );
    assert_h2_refused(&answers[0], 400, "BAD_REQUEST", "Malformed request path");
    let (status, _, body) = &answers[1];
    assert_eq!(*status, 200, "{}", String::from_utf8_lossy(body));
    let seen: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(seen["headers"]["cookie"], "a=1; b=2");
}

/// An HTTP/2 answer (status, headers, body) is the gateway's own refusal: the status, the JSON
/// error word for word with its type and length, and nothing from the upstream.
#[track_caller]
fn assert_h2_refused(
    (status, headers, body): &(u16, http::HeaderMap, Vec<u8>),
    want: u16,
    code: &str,
    message: &str,
) {
    assert_eq!(*status, want, "{}", String::from_utf8_lossy(body));
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["content-length"], body.len().to_string().as_str());
    assert!(headers.get("x-echo").is_none());
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(v, error_body(code, message));
}

/// A GET's body is refused on HTTP/2 too, where no `content-length` need announce it (pingora
/// would forward it chunked, a body beside an inspected query as well); a GET that ends its
/// stream with an empty DATA frame has none, and goes upstream without a body.
#[test]
fn an_http2_get_with_a_body_is_refused_without_content_length() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (gw, tls) = tls_gateway(&ca, dir.path(), &[("api", "api.test")]);
    gw.put_account("acme", "pro", "active");
    let a = "3fa85f64-5717-4562-b3fc-2c963f66afa6";
    let r = gw.admin_call(
        "POST",
        "/admin/v1/accounts/acme/keys",
        Some(serde_json::json!({"name": "k", "instanceIds": [a]})),
    );
    let key = r.json().unwrap()["key"].as_str().unwrap().to_owned();
    let path = format!("/api/v1/messages/1?instanceId={a}");
    let answers = h2_send(
        tls,
        &ca,
        vec![
            (
                path.clone(),
                vec![("x-api-key", key.clone())],
                Some(br#"{"instanceId":"9b2e8a3c-1111-4222-8333-444455556666"}"#.to_vec()),
            ),
            (
                path.clone(),
                vec![("x-api-key", key.clone())],
                Some(Vec::new()),
            ),
            (path, vec![("x-api-key", key)], None),
        ],
    );
    assert_h2_refused(
        &answers[0],
        400,
        "BAD_REQUEST",
        "A GET or HEAD request cannot have a body",
    );
    for (status, _, body) in &answers[1..] {
        assert_eq!(*status, 200, "{}", String::from_utf8_lossy(body));
        let seen: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert!(seen["headers"].get("transfer-encoding").is_none(), "{seen}");
        assert!(seen["headers"].get("content-length").is_none(), "{seen}");
    }
}

#[test]
fn h2c_serves_http2_with_prior_knowledge_on_the_plain_listener_when_enabled() {
    let gw = Gateway::start_with(Setup::new().server("h2c = true"));
    let (key, _) = gw.account_with_key("acme", "pro");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (ok, refused) = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
        let (client, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut answers = Vec::new();
        for k in [key.as_str(), "msgf_live_nope"] {
            let mut client = client.clone().ready().await.unwrap();
            let req = http::Request::get(format!("http://{}/api/v1/messages", gw.proxy))
                .header("x-api-key", k)
                .body(())
                .unwrap();
            let (response, _) = client.send_request(req, true).unwrap();
            let response = response.await.unwrap();
            let status = response.status().as_u16();
            let mut body = response.into_body();
            let mut bytes = Vec::new();
            while let Some(chunk) = body.data().await {
                bytes.extend_from_slice(&chunk.unwrap());
            }
            answers.push((status, bytes));
        }
        (answers.remove(0), answers.remove(0))
    });
    assert_eq!(ok.0, 200);
    let seen: serde_json::Value = serde_json::from_slice(&ok.1).unwrap();
    assert_eq!(seen["headers"]["x-account-id"], "acme");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "http");
    assert_eq!(refused.0, 401);
    let v: serde_json::Value = serde_json::from_slice(&refused.1).unwrap();
    assert_eq!(v, error_body("UNAUTHORIZED", "Invalid or revoked API key"));
    // HTTP/1.1 keeps working on the same listener.
    echoed(&gw.get("/api/v1/messages", &[("x-api-key", &key)]));
}

/// One HTTP/2 request with prior knowledge (h2c) to `addr`: the request (its body empty), and
/// trailers to end the stream with instead of its head; (status, headers, body).
pub(crate) fn h2c_exchange(
    addr: SocketAddr,
    req: http::Request<()>,
    trailers: Option<http::HeaderMap>,
) -> (u16, http::HeaderMap, Vec<u8>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (client, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut client = client.ready().await.unwrap();
        let (response, mut stream) = client.send_request(req, trailers.is_none()).unwrap();
        if let Some(trailers) = trailers {
            stream.send_trailers(trailers).unwrap();
        }
        let response = response.await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let mut body = response.into_body();
        let mut bytes = Vec::new();
        while let Some(chunk) = body.data().await {
            bytes.extend_from_slice(&chunk.expect("a well-formed response body"));
        }
        (status, headers, bytes)
    })
}

/// A gateway whose head deadline is 1 s, against a keep-alive of an hour: a connection closed
/// within seconds was closed by the deadline.
fn quick_head_deadline_gateway(ca: &Ca, dir: &std::path::Path) -> (Gateway, SocketAddr) {
    tls_gateway_with(
        ca,
        dir,
        &[("api", "api.test")],
        "",
        Setup::new()
            .server("header_timeout = \"1s\"")
            .server("keepalive_timeout = \"1h\""),
    )
}

/// Whether the gateway closes an HTTP/2 connection over TLS (ALPN h2) on which `sent` was
/// written and nothing more, within 20 s (whatever it sends first: its SETTINGS, an ACK).
fn closes_after(tls: SocketAddr, ca: &Ca, sent: &[u8]) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut stream = h2_tls(tls, ca).await;
        stream.write_all(sent).await.unwrap();
        stream.flush().await.unwrap();
        let mut sink = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(20),
            stream.read_to_end(&mut sink),
        )
        .await
        .is_ok()
    })
}

/// A TLS client that negotiates HTTP/2 and then sends nothing, or only part of the preface,
/// holds a place of the connection caps: pingora waits for the preface with no deadline. It has
/// the first-byte deadline, and then the connection closes, without a request (one byte of the
/// 24-byte preface once turned the deadline off).
#[test]
fn a_silent_http2_connection_over_tls_is_closed_at_the_header_timeout() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (_gw, tls) = quick_head_deadline_gateway(&ca, dir.path());
    for sent in [&b""[..], b"P", b"PRI * HTTP/2.0\r\n"] {
        assert!(closes_after(tls, &ca, sent), "not closed after {sent:?}");
    }
}

/// An HTTP/2 request's header block (a `HEADERS` frame without `END_HEADERS`, then
/// `CONTINUATION` frames) must be complete within `header_timeout`, as an HTTP/1 head must: h2
/// and pingora would wait on a block left open for ever (one frame a minute kept it so), well
/// past the 60 s HTTP/2 idle timeout. A normal HTTP/2 request on the same gateway is served.
#[test]
fn an_http2_header_block_left_open_is_closed_at_the_header_timeout() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (gw, tls) = quick_head_deadline_gateway(&ca, dir.path());
    let (key, _) = gw.account_with_key("acme", "pro");
    let frame = |kind: u8, flags: u8, stream: u8, payload: &[u8]| {
        let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
        let mut out = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, stream];
        out.extend_from_slice(payload);
        out
    };
    let mut opening = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    opening.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    opening.extend(frame(0x1, 0x1, 1, &[0x82])); // HEADERS, END_STREAM, no END_HEADERS
    assert!(
        closes_after(tls, &ca, &opening),
        "a header block left open was not closed"
    );
    let answers = h2_get(
        tls,
        &ca,
        vec![("/api/v1/messages".into(), vec![("x-api-key", key)])],
    );
    assert_eq!(
        answers[0].0,
        200,
        "{}",
        String::from_utf8_lossy(&answers[0].2)
    );
}

/// HTTP/2's CONNECT (a tunnel in one stream) is refused in the JSON shape, as HTTP/1.1's is.
#[test]
fn http2_connect_is_refused_in_the_json_shape() {
    let answer = h2c_keyed(http::Method::CONNECT, |_| "api.test:443".into());
    assert_h2_refused(
        &answer,
        400,
        "BAD_REQUEST",
        "The CONNECT method is not served",
    );
}

/// One HTTP/2 request with prior knowledge to a gateway with h2c on, by a valid key: `method`
/// on the target `uri` makes of the gateway's address.
fn h2c_keyed(
    method: http::Method,
    uri: impl Fn(SocketAddr) -> String,
) -> (u16, http::HeaderMap, Vec<u8>) {
    let gw = Gateway::start_with(Setup::new().server("h2c = true"));
    let (key, _) = gw.account_with_key("acme", "pro");
    let req = http::Request::builder()
        .method(method)
        .uri(uri(gw.proxy))
        .header("x-api-key", key.as_str())
        .body(())
        .unwrap();
    h2c_exchange(gw.proxy, req, None)
}

/// An HTTP/2 header list may hold thousands of tiny fields within its bytes; past 256 fields
/// (what HTTP/1.1's parser takes) it is refused as too large, as on HTTP/1.1.
#[test]
fn http2_requests_with_over_256_header_fields_are_refused() {
    let gw = Gateway::start_with(Setup::new().server("h2c = true"));
    let (key, _) = gw.account_with_key("acme", "pro");
    let request = |fields: usize| {
        let mut req = http::Request::get(format!("http://{}/api/v1/messages", gw.proxy))
            .header("x-api-key", key.as_str());
        for i in 0..fields {
            req = req.header(format!("h{i}"), "v");
        }
        req.body(()).unwrap()
    };
    // Well under the bound, forwarded (the echo upstream, pingora's parser, takes 256 in all,
    // the gateway's own headers included).
    let (status, headers, _) = h2c_exchange(gw.proxy, request(240), None);
    assert_eq!((status, headers.get("x-echo").is_some()), (200, true));
    // 256 of these and the key: 257 fields.
    assert_h2_refused(
        &h2c_exchange(gw.proxy, request(256), None),
        431,
        "HEADERS_TOO_LARGE",
        "Request headers too large",
    );
}

/// HTTP/2 carries the method as sent too: one not in upper case is refused before any policy
/// reads it, as on HTTP/1.1.
#[test]
fn http2_methods_not_in_upper_case_are_refused() {
    let answer = h2c_keyed(http::Method::from_bytes(b"post").unwrap(), |addr| {
        format!("http://{addr}/api/v1/messages/send")
    });
    assert_h2_refused(
        &answer,
        400,
        "BAD_REQUEST",
        "The request method must be upper-case letters",
    );
}

/// A GET whose stream ends with trailers instead of its head has no DATA, but pingora never
/// takes its body for done and would send it upstream chunked: refused as a body.
#[test]
fn an_http2_get_ending_in_trailers_is_refused() {
    let gw = Gateway::start_with(Setup::new().server("h2c = true"));
    let (key, _) = gw.account_with_key("acme", "pro");
    let req = http::Request::get(format!("http://{}/api/v1/messages", gw.proxy))
        .header("x-api-key", key.as_str())
        .body(())
        .unwrap();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-a", http::HeaderValue::from_static("b"));
    assert_h2_refused(
        &h2c_exchange(gw.proxy, req, Some(trailers)),
        400,
        "BAD_REQUEST",
        "A GET or HEAD request cannot have a body",
    );
}

/// A `HEAD` answered by the gateway gets the head alone on HTTP/2 too (pingora drops the
/// body on HTTP/1.1 only; a DATA frame after a HEAD response is a protocol error to nghttp2).
#[test]
fn http2_head_refusals_carry_no_body() {
    let gw = Gateway::start_with(Setup::new().server("h2c = true"));
    let req = http::Request::head(format!("http://{}/api/v1/messages", gw.proxy))
        .body(())
        .unwrap();
    let (status, headers, body) = h2c_exchange(gw.proxy, req, None);
    assert_eq!(status, 401);
    assert_eq!(headers["content-type"], "application/json");
    let announced: usize = headers["content-length"].to_str().unwrap().parse().unwrap();
    assert_eq!(
        announced,
        serde_json::to_vec(&error_body(
            "UNAUTHORIZED",
            "Missing API key. Send it in the x-api-key header."
        ))
        .unwrap()
        .len()
    );
    assert!(body.is_empty());
}

/// A client that never opens its flow-control window cannot hold an answer (its stream and its
/// connection) forever: each write may wait `server.send_timeout`, then the stream is reset.
#[test]
fn an_http2_client_that_never_reads_holds_nothing() {
    let gw = Gateway::start_with(
        Setup::new()
            .server("h2c = true")
            .server("send_timeout = \"1s\""),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ended = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
        let (client, connection) = h2::client::Builder::new()
            .initial_window_size(0)
            .handshake::<_, bytes::Bytes>(tcp)
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut client = client.ready().await.unwrap();
        let req = http::Request::get(format!("http://{}/api/v1/messages", gw.proxy))
            .body(())
            .unwrap();
        let (response, _) = client.send_request(req, true).unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status().as_u16(), 401);
        let mut body = response.into_body();
        // The head is out; its body waits on a window that never opens.
        tokio::time::timeout(std::time::Duration::from_secs(10), body.data())
            .await
            .map(|d| d.map(|r| r.is_err()))
    });
    assert_eq!(ended, Ok(Some(true)), "the stream is reset, not held");
}

/// An HTTP/2 stream that declares a body and never sends it: pingora bounds no HTTP/2 body
/// read, so a refusal that drained it, or an inspection that waited for it, held the stream
/// (and its connection's place under the caps) forever. A refusal answers at once; a body the
/// gateway reads may pause `body_idle_timeout` (here 1 s) between reads, as on HTTP/1.
#[test]
fn a_stalled_http2_body_holds_nothing() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (gw, tls) = tls_gateway_with(
        &ca,
        dir.path(),
        &[("api", "api.test")],
        "",
        Setup::new().server("body_idle_timeout = \"1s\""),
    );
    let key = restricted_key(&gw, &[], &["3fa85f64-5717-4562-b3fc-2c963f66afa6"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let answers = rt.block_on(async move {
        let client = h2_client(tls, &ca).await;
        let mut statuses = Vec::new();
        let mut held = Vec::new();
        for (path, key, sent) in [
            ("/api/v1/messages/send", "msgf_live_nope", &b""[..]),
            (
                "/api/v1/messages/send",
                key.as_str(),
                &b"{\"instanceId\""[..],
            ),
        ] {
            let mut client = client.clone().ready().await.unwrap();
            let req = http::Request::post(format!("https://api.test{path}"))
                .header("x-api-key", key)
                .header("content-type", "application/json")
                .header("content-length", "1000")
                .body(())
                .unwrap();
            let (response, mut body) = client.send_request(req, false).unwrap();
            if !sent.is_empty() {
                body.send_data(sent.to_vec().into(), false).unwrap();
            }
            held.push(body);
            // A guard, not a measurement: without the fix this never came.
            let response = tokio::time::timeout(std::time::Duration::from_secs(20), response)
                .await
                .expect("an answer, not a stream held open")
                .unwrap();
            let mut body = response.into_body();
            let mut bytes = Vec::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.unwrap();
                let _ = body.flow_control().release_capacity(chunk.len());
                bytes.extend_from_slice(&chunk);
            }
            statuses.push(String::from_utf8_lossy(&bytes).into_owned());
        }
        statuses
    });
    assert_eq!(
        answers[0],
        r#"{"error":{"code":"UNAUTHORIZED","message":"Invalid or revoked API key"}}"#
    );
    assert_eq!(
        answers[1],
        r#"{"error":{"code":"BAD_REQUEST","message":"Could not read the request body"}}"#
    );
}

/// A plain TCP connection to `addr` that has written `bytes` (reads wait at most 20 s).
fn raw_tcp(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    s.write_all(bytes).unwrap();
    s
}

/// A TLS connection takes its place under the connection caps before its handshake, and must
/// send its ClientHello within `server.header_timeout`: connections that never start a
/// handshake are cut at the deadline (pingora alone would give each a minute, outside every
/// cap), and while they are open they count against their client's cap (a handshake keeps its
/// place as long as pingora lets it take, or until its socket closes).
#[test]
fn tls_connections_are_capped_and_timed_before_their_handshake() {
    use std::io::Write;
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (gw, tls) = tls_gateway_with(
        &ca,
        dir.path(),
        &[("api", "api.test")],
        "",
        Setup::new()
            .server("header_timeout = \"4s\"")
            .server("max_connections_per_client = 2"),
    );
    let open = |n: usize| {
        gw.metric_line("msgflash_connections_open ") == format!("msgflash_connections_open {n}")
    };
    let attempt = || -> std::io::Result<u16> {
        let name = ServerName::try_from("api.test".to_owned()).unwrap();
        let conn = rustls::ClientConnection::new(ca.client_config(), name).unwrap();
        let tcp = TcpStream::connect(tls)?;
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(20)))?;
        let mut stream = BufReader::new(rustls::StreamOwned::new(conn, tcp));
        stream
            .get_mut()
            .write_all(b"GET /nowhere HTTP/1.1\r\nhost: api.test\r\n\r\n")?;
        read_response(&mut stream, false).map(|r| r.status)
    };
    assert_eq!(
        attempt().unwrap(),
        404,
        "a handshake with room under the cap"
    );
    // Its place is given back once the gateway has seen it close.
    eventually("that connection closed on the gateway's side too", || {
        open(0)
    });
    let mut silent: Vec<TcpStream> = (0..2).map(|_| raw_tcp(tls, b"")).collect();
    // Both places of this client are held by connections that have sent nothing.
    eventually("both silent connections admitted", || open(2));
    assert!(
        attempt().is_err(),
        "a third connection is refused before its handshake"
    );
    for s in &mut silent {
        assert_closed_without_answer(s, "no ClientHello");
    }
    assert_eq!(attempt().unwrap(), 404, "their places are given back");
    // Handshakes that fail (a record that is no ClientHello) give their places back once
    // their sockets are closed: the client gets in again.
    let mut failed: Vec<TcpStream> = (0..2)
        .map(|_| raw_tcp(tls, &[22, 3, 1, 0, 5, 1, 2, 3, 4, 5]))
        .collect();
    for s in &mut failed {
        use std::io::Read;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
    }
    eventually("a handshake with room again", || attempt().is_ok());
}

/// Plain HTTP sent to the TLS port is closed at once: its first bytes are no TLS record, and
/// nothing waits for the length they would spell.
#[test]
fn plain_http_to_the_tls_port_is_closed_at_once() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (_gw, tls) = tls_gateway_with(
        &ca,
        dir.path(),
        &[("api", "api.test")],
        "",
        Setup::new().server("header_timeout = \"60s\""),
    );
    let mut s = raw_tcp(tls, b"GET / HTTP/1.1\r\nhost: api.test\r\n\r\n");
    assert_closed_without_answer(&mut s, "plain HTTP on the TLS port");
}
