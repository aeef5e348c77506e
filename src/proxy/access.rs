//! One request's access-log entry, from what the request's state holds at its end.

use super::Ctx;
use crate::access_log::{AccessLog, Entry};
use crate::config::AuthMode;
use crate::gateway::Gateway;
use pingora::proxy::Session;
use std::time::Duration;

fn text(v: Option<&http::HeaderValue>) -> Option<&str> {
    v.and_then(|v| v.to_str().ok())
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Hands the request's line to the access log (which never makes it wait).
pub(super) fn log(
    log: &AccessLog,
    session: &Session,
    ctx: &Ctx,
    status: u16,
    elapsed: Duration,
    gw: &Gateway,
) {
    let req = session.req_header();
    let downstream = session.as_downstream();
    let trace = ctx.trace.trace_hex();
    let route = ctx.route();
    let identity = ctx.identity.as_ref();
    let path = ctx.path.as_deref().unwrap_or_else(|| req.uri.path());
    // An open route's path can carry a secret (a reset or verification link's token): past the
    // route's prefix, it is not written down.
    // A request refused before it was routed (an unknown host, its framing) is judged by the
    // route its path would have taken.
    let routed = route.or_else(|| {
        let i = ctx.live.router.find(path)?;
        ctx.live.config.routes.get(i)
    });
    let path = match routed {
        Some(r) if r.auth == AuthMode::Open && path.len() > r.prefix.len() => {
            std::borrow::Cow::Owned(format!("{}…", r.prefix))
        }
        _ => std::borrow::Cow::Borrowed(path),
    };
    let entry = Entry {
        time_ms: i64::try_from(gw.clock.now_ns() / 1_000_000).unwrap_or(i64::MAX),
        request_id: ctx.request_id.to_str().unwrap_or_default(),
        trace_id: &trace,
        client: ctx.client,
        method: req.method.as_str(),
        path: &path,
        route: ctx.route.and_then(|i| ctx.live.labels.get(i)).map(|l| &**l),
        auth: route.map(|r| match r.auth {
            AuthMode::ApiKey => "api_key",
            AuthMode::Jwt => "jwt",
            AuthMode::Open => "open",
        }),
        status,
        code: ctx.error_code,
        account_id: text(identity.map(|i| &i.account_id)),
        key_id: text(identity.and_then(|i| i.key_id.as_ref())),
        user_id: text(identity.and_then(|i| i.user_id.as_ref())),
        upstream: route.and_then(|r| {
            ctx.member
                .and_then(|m| ctx.live.pools.get(r.upstream)?.address(m))
        }),
        upstream_status: ctx.upstream_status,
        duration_us: micros(elapsed),
        store_us: ctx.store.us,
        upstream_us: ctx.upstream_us,
        bytes_in: downstream.body_bytes_read(),
        bytes_out: downstream.body_bytes_sent(),
        user_agent: text(req.headers.get(http::header::USER_AGENT)),
        tls: downstream
            .digest()
            .and_then(|d| d.ssl_digest.as_ref())
            .map(|s| &*s.version),
    };
    log.log(&entry);
}

/// Hands the request's spans to the exporter.
#[cfg(feature = "otlp")]
pub(super) fn span(
    spans: &crate::spans::Spans,
    session: &Session,
    ctx: &Ctx,
    status: u16,
    elapsed: Duration,
) {
    let offset = |at: std::time::Instant| at.saturating_duration_since(ctx.started);
    spans.record(&crate::spans::RequestSpan {
        trace: &ctx.trace,
        method: session.req_header().method.as_str(),
        route: ctx.route.and_then(|i| ctx.live.labels.get(i)).map(|l| &**l),
        status,
        code: ctx.error_code,
        account_id: text(ctx.identity.as_ref().map(|i| &i.account_id)),
        elapsed,
        store: ctx
            .store
            .started
            .map(|at| (offset(at), Duration::from_micros(ctx.store.us))),
        upstream: ctx
            .upstream_started
            .zip(ctx.upstream_us)
            .map(|(at, us)| (offset(at), Duration::from_micros(us))),
    });
}
