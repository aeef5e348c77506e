//! The admin listener: /healthz, /readyz, /metrics, and the token-protected /admin/v1 API.

use crate::auth::api_key::constant_time_eq;
use crate::edge_stream::EdgeStream;
use crate::errors::{answer_head, GatewayError};
use crate::gateway::Gateway;
use crate::inspect::read_body;
use crate::log_limit::LogLimit;
use async_trait::async_trait;
use http::{Method, Response};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::Value;
use std::sync::Arc;

pub(crate) struct AdminApp(pub Arc<Gateway>);

/// What an admin call answers: JSON or text with a status, or a refusal.
enum Reply {
    Ok {
        status: u16,
        content_type: &'static str,
        body: Vec<u8>,
    },
    Refused(GatewayError),
}

impl Reply {
    fn json(status: u16, value: &Value) -> Self {
        Reply::Ok {
            status,
            content_type: "application/json",
            body: serde_json::to_vec(value).unwrap_or_default(),
        }
    }

    fn error(e: &GatewayError) -> Self {
        Reply::Refused(e.clone())
    }
}

impl From<Result<Value, GatewayError>> for Reply {
    fn from(r: Result<Value, GatewayError>) -> Self {
        match r {
            Ok(v) => Reply::json(200, &v),
            Err(e) => Reply::Refused(e),
        }
    }
}

fn authorized(gw: &Gateway, session: &ServerSession) -> bool {
    let live = gw.live();
    let Some(expected) = live.config.admin.token.as_deref() else {
        return false;
    };
    let Some(value) = session
        .req_header()
        .headers
        .get(http::header::AUTHORIZATION)
    else {
        return false;
    };
    let bytes = value.as_bytes();
    bytes.len() > 7
        && bytes[..7].eq_ignore_ascii_case(b"bearer ")
        && constant_time_eq(&bytes[7..], expected.as_bytes())
}

/// Whether a request names the admin listener as nothing but the machine itself would: an IP
/// address, `localhost` or a `*.localhost` name, or no host at all. A page in an operator's
/// browser that rebinds its own DNS name to 127.0.0.1 (DNS rebinding) reaches a loopback
/// listener under that name, and may read what needs no token (`/metrics`, `/readyz`);
/// applied only on a plain listener bound to a loopback address, which nothing else reaches
/// by name.
fn addressed_locally(req: &http::request::Parts) -> bool {
    if crate::host_name::absent(req) {
        return true;
    }
    let Some(named) = crate::host_name::named(req) else {
        return false;
    };
    let name = named.trim_start_matches('[').trim_end_matches(']');
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    name.parse::<std::net::IpAddr>().is_ok() || name == "localhost" || name.ends_with(".localhost")
}

/// The audit trail: one line per admin call that changes something (method, path, status, the
/// peer, and a created key's id), and per refused admin credential (at most one a second, with
/// how many were suppressed). Never a body, a key or a token.
fn audit(gw: &Gateway, session: &ServerSession, method: &Method, path: &str, reply: &Reply) {
    static REFUSED: LogLimit = LogLimit::per_second();
    let Some(call) = path.strip_prefix("/admin/v1/") else {
        return;
    };
    let status = match reply {
        Reply::Ok { status, .. } => *status,
        Reply::Refused(e) => e.status(),
    };
    let peer = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    // What the caller wrote, bounded (a URI path holds no control byte or space).
    let call: String = call.chars().take(256).collect();
    if status == 401 {
        if let Some(suppressed) = REFUSED.admit(gw.clock.now_ns()) {
            tracing::warn!(%method, %call, %peer, suppressed, "admin call refused: invalid or missing token");
        }
        return;
    }
    if *method == Method::GET || *method == Method::HEAD {
        return;
    }
    let created = match reply {
        Reply::Ok {
            status: 201, body, ..
        } => serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_owned)),
        _ => None,
    };
    tracing::info!(%method, %call, status, %peer, created = created.as_deref().unwrap_or(""), "admin call");
}

impl AdminApp {
    /// `POST /admin/v1/reload`, off the admin listener's one thread: a reload reads files and
    /// resolves upstream names, and the probes must not wait for it.
    async fn reload(&self) -> Reply {
        let gw = self.0.clone();
        let outcome = match tokio::task::spawn_blocking(move || gw.reload()).await {
            Ok(outcome) => outcome,
            Err(join) => {
                tracing::error!(error = %join, "reload failed to run; the current configuration stays");
                return Reply::error(&GatewayError::reload_refused("it did not run to its end"));
            }
        };
        match outcome {
            Ok(r) => Reply::json(
                200,
                &serde_json::json!({
                    "reloaded": true, "routes": r.routes, "routePolicies": r.route_policies,
                    "plans": r.plans, "needsRestart": r.needs_restart,
                }),
            ),
            Err(why) => {
                tracing::error!(reasons = %why, "reload refused; the current configuration stays");
                Reply::error(&GatewayError::reload_refused(&why))
            }
        }
    }

    async fn route(&self, session: &mut ServerSession, method: &Method, path: &str) -> Reply {
        let gw = &*self.0;
        match (method, path) {
            (&Method::GET, "/healthz") => {
                return Reply::json(200, &serde_json::json!({"status": "ok"}))
            }
            (&Method::GET, "/readyz") => {
                return if gw.store.ready().await {
                    Reply::json(200, &serde_json::json!({"status": "ready"}))
                } else {
                    Reply::error(&GatewayError::store_unavailable())
                };
            }
            (&Method::GET, "/metrics") => {
                let mut text = gw
                    .metrics
                    .render(gw.directory.cached_keys(), gw.store.ready().await);
                let live = gw.live();
                let pools: Vec<(&str, usize, usize)> = live
                    .pools
                    .iter()
                    .map(|p| (p.name.as_str(), p.healthy_count(), p.len()))
                    .collect();
                crate::metrics::render_upstreams(&mut text, &pools);
                crate::metrics::render_invalidations(
                    &mut text,
                    gw.store.invalidations_confirmed(),
                    gw.directory.cache_checks(),
                );
                crate::metrics::render_refunds(
                    &mut text,
                    gw.store.refunds_failed(),
                    gw.store.admissions_uncertain(),
                );
                crate::metrics::render_connections(
                    &mut text,
                    (gw.connections.open(), gw.connections.idle()),
                    &gw.connections.refused(),
                    gw.connections.reclaimed(),
                    gw.connections.proxy_headers_refused(),
                );
                if let Some(log) = &gw.access_log {
                    crate::metrics::render_access_log(&mut text, log.counts());
                }
                crate::metrics::render_operations(
                    &mut text,
                    gw.directory.lookups(),
                    &gw.store.breakers(),
                    gw.reloads.snapshot(),
                );
                // Public and admin listeners' certificates, each file once.
                let mut certs: Vec<(String, i64)> = Vec::new();
                for resolver in gw.certs.iter().chain(&gw.admin_certs) {
                    for c in resolver.current().iter() {
                        let file = c.cert_file.display().to_string();
                        if !certs.iter().any(|(f, _)| *f == file) {
                            certs.push((file, c.not_after));
                        }
                    }
                }
                crate::metrics::render_certificates(&mut text, &certs);
                return Reply::Ok {
                    status: 200,
                    content_type: "text/plain; version=0.0.4",
                    body: text.into_bytes(),
                };
            }
            _ => {}
        }
        let Some(rest) = path.strip_prefix("/admin/v1/") else {
            return Reply::error(&GatewayError::no_route());
        };
        if !authorized(gw, session) {
            return Reply::error(&GatewayError::invalid_admin_token());
        }
        let segments: Vec<&str> = rest.split('/').collect();
        let m = &gw.manager;
        let live = gw.live();
        let policies = &live.config.policies;
        let limit = live.config.server.max_body_bytes;
        let idle = live.config.server.body_idle_timeout;
        match (method, segments.as_slice()) {
            (&Method::POST, ["reload"]) => self.reload().await,
            (&Method::PUT, ["accounts", id]) => match read_body(session, limit, idle).await {
                Ok(body) => m.put_account(policies, id, &body).await.into(),
                Err(e) => Reply::error(&e),
            },
            (&Method::GET, ["accounts", id]) => m.show_account(policies, id).await.into(),
            (&Method::POST, ["accounts", id, "keys"]) => {
                match read_body(session, limit, idle).await {
                    Ok(body) => match m.create_key(policies, id, &body).await {
                        Ok(v) => Reply::json(201, &v),
                        Err(e) => Reply::error(&e),
                    },
                    Err(e) => Reply::error(&e),
                }
            }
            (&Method::GET, ["accounts", id, "keys"]) => m.list_keys(id).await.into(),
            (&Method::DELETE, ["accounts", id, "keys", key_id]) => {
                m.revoke_key(id, key_id).await.into()
            }
            _ => Reply::error(&GatewayError::no_route()),
        }
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        // The edge stream times each request head: this one is read.
        if let Some(edge) = EdgeStream::of(session.stream()) {
            edge.request_began();
        }
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_owned();
        let live = self.0.live();
        // Over TLS a rebound name fails the certificate check first; `/healthz` tells nothing.
        let admin = &live.config.admin;
        let reply = if admin.tls.is_none()
            && admin.listen.ip().is_loopback()
            && path != "/healthz"
            && !addressed_locally(session.req_header())
        {
            Reply::error(&GatewayError::unknown_host())
        } else {
            self.route(session, &method, &path).await
        };
        audit(&self.0, session, &method, &path, &reply);
        // Whatever the caller sent and we did not read would poison keep-alive: drained when
        // small, else the connection closes after the answer.
        crate::inspect::settle_body(
            session,
            live.config.server.max_body_bytes,
            live.config.server.body_idle_timeout,
        )
        .await;
        // What comes next on the connection is the next request's head (the answer is
        // written as this returns).
        if let Some(edge) = EdgeStream::of(session.stream()) {
            edge.request_ended(live.config.server.keepalive_timeout);
        }
        let (mut head, body) = match reply {
            Reply::Ok {
                status,
                content_type,
                body,
            } => (answer_head(status, content_type, body.len(), None), body),
            Reply::Refused(e) => self.0.refusal(&e),
        };
        // Key creation answers with the full key, once: no cache may keep an admin answer.
        crate::errors::no_store(&mut head.headers);
        Response::from_parts(head, body)
    }
}
