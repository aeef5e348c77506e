//! The pingora adapter: each phase of pingora's `ProxyHttp` that the gateway implements, in the
//! order pingora runs them for one request (see pingora-proxy's `proxy_trait.rs` for the whole
//! chart). The decisions themselves live below: `public_api` (SPEC §3), `console` (SPEC §4),
//! routing, the store and the limits; this module only carries a request through the phases.
//!
//! `new_ctx` → `request_filter` (normalise, route, authenticate, limit: answer here or go on)
//! → `upstream_peer` → [`fail_to_connect`, retried on another address] →
//! `upstream_request_filter` (identity headers in, client copies out) → `response_filter`
//! (rate-limit headers) → [`fail_to_proxy` on any error after `request_filter`] → `logging`.

mod access;
mod auth_failures;
pub(crate) mod console;
mod early;
mod framing;
pub(crate) mod header_edit;
pub(crate) mod headers;
mod host;
pub(crate) mod public_api;
pub(crate) mod respond;
mod response_head;
mod restrictions;

use crate::auth::ForwardedRestrictions;
use crate::client_ip;
use crate::config::{AuthMode, Route};
use crate::edge_stream::EdgeStream;
use crate::errors::GatewayError;
use crate::gateway::Gateway;
use crate::live::Live;
use crate::path::PathError;
use crate::policy::InstanceSource;
use crate::trace_context::TraceContext;
use async_trait::async_trait;
use early::{header_fields, ip_limited, normalised};
use headers::RateHeaders;
use http::{HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType, Result};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

/// Who a forwarded request speaks for, as the header values that say it.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub account_id: HeaderValue,
    pub key_id: Option<HeaderValue>,
    pub user_id: Option<HeaderValue>,
    /// A restricted key's scopes and instance ids (`None`: an unrestricted key, or no key).
    pub restrictions: Option<Arc<ForwardedRestrictions>>,
}

static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Per-request state.
pub(crate) struct Ctx {
    started: Instant,
    /// The configuration this request lives by, from start to end.
    live: Arc<Live>,
    route: Option<usize>,
    /// The URI to forward when normalisation changed the path.
    rewritten: Option<http::Uri>,
    request_id: HeaderValue,
    identity: Option<Identity>,
    rate: Option<RateHeaders>,
    /// Bit i: upstream member i was tried.
    tried: u64,
    member: Option<usize>,
    /// The TCP peer, and whether it is a trusted proxy (whose forwarding headers count).
    peer: Option<IpAddr>,
    peer_trusted: bool,
    /// Who the client is (the peer, or what a trusted proxy says): what per-IP limits use.
    client: Option<IpAddr>,
    /// The client and the trusted hops after it (see `TrustedProxies::chain`).
    chain: Vec<IpAddr>,
    /// The connection is TLS, terminated here.
    tls: bool,
    /// The W3C trace this request belongs to (continued or started here).
    trace: TraceContext,
    /// The normalised path, kept for the access log (only when it is on).
    path: Option<String>,
    /// Time spent waiting on the store (key lookup and admission).
    store: public_api::StoreWait,
    /// When the first connection to an upstream was asked for, and how long until its
    /// response head came back.
    upstream_started: Option<Instant>,
    upstream_us: Option<u64>,
    upstream_status: Option<u16>,
    /// Body bytes this request may still forward (routes that inspect bodies: every key's
    /// body is bounded by `server.max_body_bytes`), and whether it sent more.
    body_allowance: Option<usize>,
    /// The bound itself, to start each attempt from (a retry replays the body).
    body_limit: Option<usize>,
    body_over: bool,
    /// The code of a refusal the gateway answered.
    error_code: Option<&'static str>,
    /// Counts this request in `msgflash_requests_in_flight` while it lives.
    _in_flight: crate::metrics::InFlight,
}

impl Ctx {
    fn route(&self) -> Option<&Route> {
        self.route.and_then(|i| self.live.config.routes.get(i))
    }
}

/// The pingora face of a [`Gateway`].
pub(crate) struct GatewayProxy(pub(crate) Arc<Gateway>);

impl GatewayProxy {
    pub(crate) fn new(gateway: Arc<Gateway>) -> Self {
        Self(gateway)
    }
}

static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

impl GatewayProxy {
    /// Decides what happens to a request: `Ok(None)` forward, `Ok(Some(..))` answered locally.
    async fn decide(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
    ) -> Result<Option<(u16, Vec<u8>)>, GatewayError> {
        let gw = &*self.0;
        let live = ctx.live.clone();
        framing::check(session, live.config.server.body_idle_timeout).await?;
        let req = session.req_header();
        // HTTP/1.1 heads hold at most 256 header lines (the edge stream counts them); an HTTP/2
        // header list could hold thousands of tiny fields within its bytes, and Node keeps only
        // a request's first 2000 headers, the gateway's own (added last) among those it drops.
        let (header_bytes, utf8) = header_fields(req);
        if header_bytes > live.config.server.max_header_bytes
            || req.headers.len() > crate::edge_stream::MAX_HEADER_FIELDS
        {
            return Err(GatewayError::headers_too_large());
        }
        if !utf8 {
            return Err(GatewayError::header_not_utf8());
        }
        if !host::allowed(req, &live.config.server.hosts) {
            return Err(GatewayError::unknown_host());
        }
        // Who the client is: the peer, unless the peer is a trusted proxy.
        let trusted = &live.config.server.trusted_proxies;
        let inet = session.client_addr().and_then(|a| a.as_inet());
        ctx.peer = inet.map(|a| client_ip::canonical(a.ip()));
        // A balancer whose PROXY header named no client speaks for nobody: its address is the
        // client's, and the forwarding headers it relayed are the client's own words.
        let speaks_for_client =
            inet.is_some_and(|a| a.port() != crate::proxy_protocol::UNNAMED_PORT);
        ctx.peer_trusted = speaks_for_client && ctx.peer.is_some_and(|p| trusted.trusts(p));
        ctx.tls = session
            .as_downstream()
            .digest()
            .is_some_and(|d| d.ssl_digest.is_some());
        // A chain is read only from a trusted peer (no allocation for anyone else).
        ctx.client = ctx.peer;
        if let (Some(peer), true) = (ctx.peer, ctx.peer_trusted) {
            let values = req.headers.get_all(&X_FORWARDED_FOR);
            ctx.chain = trusted.chain(peer, values.iter().map(HeaderValue::as_bytes));
            ctx.client = ctx.chain.first().copied();
        }
        let (path, rewritten) = normalised(req, live.config.server.path_rules)?;
        ctx.rewritten = rewritten;
        if gw.access_log.is_some() {
            ctx.path = Some(path.clone());
        }
        let route_index = live.router.find(&path).ok_or_else(GatewayError::no_route)?;
        if path.bytes().any(|b| b.is_ascii_uppercase())
            && live
                .router
                .find_ignoring_case(&path)
                .is_some_and(|i| i != route_index)
        {
            return Err(GatewayError::ambiguous_path(PathError::CaseChangesRoute));
        }
        ctx.route = Some(route_index);
        let route = &live.config.routes[route_index];
        let policy = live.config.policies.routes.find(&req.method, &path);
        if let (Some(limit), Some(client)) = (policy.and_then(|p| p.ip_limit), ctx.client) {
            ip_limited(
                gw,
                route_index,
                client,
                limit,
                live.config.server.ipv6_prefix,
            )?;
        }
        // The client's limit key, for the limit on failed authentications.
        let client = ctx
            .client
            .map(|c| client_ip::limit_key(c, live.config.server.ipv6_prefix));
        match route.auth {
            AuthMode::ApiKey => {
                // A method override would turn the request into another method than the one
                // its policy was matched on.
                if crate::inspect::has_method_override(req.uri.query()) {
                    return Err(GatewayError::method_override());
                }
                let target = public_api::Target {
                    policy,
                    path: &path,
                    upstream: &live.pools[route.upstream],
                };
                let authorized =
                    public_api::authorize(gw, &live, session, target, client, &mut ctx.store).await;
                match authorized {
                    Ok((identity, rate)) => {
                        ctx.identity = Some(identity);
                        ctx.rate = Some(rate);
                        if let Some(InstanceSource::Body(_)) =
                            policy.and_then(|p| p.instance.as_ref())
                        {
                            ctx.body_limit = Some(live.config.server.max_body_bytes);
                        }
                    }
                    Err(refusal) => {
                        ctx.rate = refusal.rate;
                        return Err(refusal.error);
                    }
                }
                Ok(None)
            }
            AuthMode::Jwt => {
                let (account_id, identity) = console::authenticate(gw, &live, req, client)?;
                if let Some(call) = console::key_call(&req.method, &path) {
                    let answer = console::serve(gw, &live, session, &account_id, call?).await?;
                    return Ok(Some(answer));
                }
                ctx.identity = Some(identity);
                Ok(None)
            }
            AuthMode::Open => Ok(None),
        }
    }
}

#[async_trait]
impl ProxyHttp for GatewayProxy {
    type CTX = Ctx;

    /// Runs first, once per request: the snapshot the request lives by, taken now.
    fn new_ctx(&self) -> Ctx {
        let live = self.0.live();
        // The wait is measured where a store can make a request wait (Redis: the store-wait
        // histogram), or something reports it; the embedded store answers in place.
        let store = public_api::StoreWait::new(
            live.config.store.redis.is_some()
                || self.0.access_log.is_some()
                || self.0.exports_spans(),
        );
        Ctx {
            started: Instant::now(),
            live,
            route: None,
            rewritten: None,
            request_id: HeaderValue::from_static(""),
            identity: None,
            rate: None,
            tried: 0,
            member: None,
            peer: None,
            peer_trusted: false,
            client: None,
            chain: Vec::new(),
            tls: false,
            trace: TraceContext::NONE,
            path: None,
            store,
            upstream_started: None,
            upstream_us: None,
            upstream_status: None,
            body_allowance: None,
            body_limit: None,
            body_over: false,
            error_code: None,
            _in_flight: self.0.metrics.in_flight(),
        }
    }

    /// Runs once the request head is read. `Ok(true)`: answered here (a refusal or a
    /// gateway-served call), pingora goes straight to `logging`; `Ok(false)`: forward.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let gw = &*self.0;
        // HTTP/1.1 pipelining (RFC 9112 §9.3.2): requests sent back to back are answered in
        // order, each through every check on its own (pingora's default drops all but the
        // first). A request that closes the connection (smuggling shapes) ends the pipeline.
        session.as_downstream_mut().set_pipelining_enabled(true);
        // A request body may pause at most `body_idle_timeout` between reads (slow POST);
        // past it the connection is closed without an answer (see `fail_to_proxy`).
        session.set_read_timeout(Some(ctx.live.config.server.body_idle_timeout));
        // An HTTP/2 client that never opens its flow-control window would hold its answers, its
        // stream and its connection forever: each write may wait so long. (On HTTP/1 the edge
        // stream times every write by its progress, heads and flushes included.)
        if session.as_downstream().is_http2() {
            session.set_write_timeout(Some(ctx.live.config.server.send_timeout));
        } else if session.req_header().version == http::Version::HTTP_10 {
            // HTTP/1.0 has no interim responses (RFC 9110 §15.2): an upstream's 103 would read
            // as the final answer.
            session.as_downstream_mut().set_ignore_info_resp(true);
        }
        // Bound idle keep-alive, without reviving a connection pingora or the client chose to
        // close: the edge stream keeps the timeout when there is one (one timer per connection);
        // pingora's own (a new timer for every request) otherwise.
        let edge = EdgeStream::of(session.as_downstream().stream())
            .map(EdgeStream::request_began)
            .is_some();
        if session.get_keepalive().is_some() {
            // 0: pingora's "no timeout of its own".
            let pingora_timeout = if edge {
                0
            } else {
                ctx.live.config.server.keepalive_timeout.as_secs()
            };
            session.set_keepalive(Some(pingora_timeout));
        }
        let headers = &session.req_header().headers;
        ctx.trace = TraceContext::from_request(
            headers.get(&TRACEPARENT).map(HeaderValue::as_bytes),
            self.0.exports_spans(),
        );
        // A client's sane id is kept; a generated one is the trace id (random, W3C), with a
        // random suffix when the trace is the client's.
        ctx.request_id = match headers.get(&ctx.live.config.forward.request_id_header) {
            Some(v) if headers::is_sane_request_id(v.as_bytes()) => v.clone(),
            _ => ctx.trace.request_id_value(),
        };
        match self.decide(session, ctx).await {
            Ok(None) => Ok(false),
            Ok(Some((status, body))) => {
                respond::send(session, ctx, status, body).await?;
                Ok(true)
            }
            Err(err) => {
                respond::send_error(gw, session, ctx, &err).await?;
                Ok(true)
            }
        }
    }

    /// Runs before each connection attempt: the next healthy address of the route's pool not
    /// tried yet. An `Err` goes to `fail_to_proxy` (503 when no address is left).
    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let upstream = ctx
            .route()
            .map(|r| r.upstream)
            .ok_or_else(|| Error::explain(ErrorType::HTTPStatus(404), "no route"))?;
        let pool = &ctx.live.pools[upstream];
        let (member, addr) = pool
            .pick(ctx.tried)
            .ok_or_else(|| Error::explain(ErrorType::HTTPStatus(503), "no healthy upstream"))?;
        if member < 64 {
            ctx.tried |= 1 << member;
        }
        ctx.member = Some(member);
        ctx.upstream_started.get_or_insert_with(Instant::now);
        let mut peer = match pool.tls() {
            // Verified against the CA list, else the system's roots, for `sni`.
            Some((sni, ca, ca_key)) => {
                let mut peer = HttpPeer::new(addr, true, sni.to_owned());
                peer.options.ca = ca.cloned();
                peer.group_key = ca_key;
                peer
            }
            None => HttpPeer::new(addr, false, String::new()),
        };
        peer.options.connection_timeout = Some(pool.connect_timeout);
        peer.options.read_timeout = Some(pool.read_timeout);
        peer.options.write_timeout = Some(pool.read_timeout);
        Ok(Box::new(peer))
    }

    /// Runs when connecting to the peer failed: marks the address, and asks pingora to retry
    /// (through `upstream_peer`) while another address is left; nothing was sent yet.
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let (Some(route), Some(member)) = (ctx.route(), ctx.member) {
            let pool = &ctx.live.pools[route.upstream];
            pool.report(member, false);
            // Another address may take the request: connecting sent nothing upstream.
            if pool.pick(ctx.tried).is_some() {
                e.set_retry(true);
            }
        }
        e
    }

    /// Counts a body on a route that inspects bodies (`Ctx::body_allowance`): past the limit
    /// the request fails, answered 413 when nothing has been answered yet. A declared length
    /// over it was refused before forwarding; this catches a body without one.
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let (Some(left), Some(chunk)) = (ctx.body_allowance.as_mut(), body.as_ref()) {
            match left.checked_sub(chunk.len()) {
                Some(rest) => *left = rest,
                None => {
                    ctx.body_over = true;
                    return Error::e_explain(
                        ErrorType::InvalidHTTPHeader,
                        "request body over server.max_body_bytes",
                    );
                }
            }
        }
        Ok(())
    }

    /// Runs before the request head goes upstream (again on a retry): client copies of the
    /// owned headers out, identity and forwarding headers in, the normalised path set.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        up: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // Each attempt counts the body from nothing: a retry replays it.
        ctx.body_allowance = ctx.body_limit;
        // A body the gateway already read (and answered `100 Continue` for) is sent whole:
        // the upstream's own `100` would reach the client a second time.
        let body_read = up.headers.contains_key(http::header::EXPECT)
            && session.as_downstream_mut().is_body_done();
        let keep_api_key = ctx.route().is_some_and(|r| r.forward_api_key);
        let host = ctx
            .route()
            .and_then(|r| ctx.live.config.upstreams.get(r.upstream))
            .and_then(|u| u.host.as_ref());
        let fwd = &ctx.live.config.forward;
        header_edit::edit_request(up, |parts| {
            let h = &mut parts.headers;
            if !keep_api_key {
                h.remove(&X_API_KEY);
            }
            ctx.live.owned_headers.remove_from(h);
            if body_read {
                h.remove(http::header::EXPECT);
            }
            if let Some(host) = host {
                h.insert(http::header::HOST, host.clone());
            }
            // Cloned, not taken: pingora rebuilds the upstream request for every attempt (a
            // retry after a reused connection failed), and each must carry the identity.
            if let Some(id) = &ctx.identity {
                h.insert(fwd.account_id_header.clone(), id.account_id.clone());
                if let Some(key_id) = &id.key_id {
                    h.insert(fwd.key_id_header.clone(), key_id.clone());
                    // The key is the request's one credential: a bearer token beside it was
                    // verified by nobody, and a backend that reads one where it finds one
                    // (a console session, an unverified decode) would take its claims.
                    h.remove(http::header::AUTHORIZATION);
                }
                if let Some(user_id) = &id.user_id {
                    h.insert(fwd.user_id_header.clone(), user_id.clone());
                }
                if let Some(r) = &id.restrictions {
                    if let Some(scopes) = &r.scopes {
                        h.insert(fwd.key_scopes_header.clone(), scopes.clone());
                    }
                    if let Some(instance_ids) = &r.instance_ids {
                        h.insert(fwd.key_instances_header.clone(), instance_ids.clone());
                    }
                }
            }
            h.insert(fwd.request_id_header.clone(), ctx.request_id.clone());
            // The trace goes on (with this hop as the parent when spans are exported); a
            // client's tracestate goes along only with the trace it belongs to, when sane.
            h.insert(TRACEPARENT.clone(), ctx.trace.traceparent_value());
            let state_ok = ctx.trace.parent_id.is_some()
                && h.get_all(&TRACESTATE).iter().count() == 1
                && h.get(&TRACESTATE)
                    .is_some_and(|v| crate::trace_context::tracestate_ok(v.as_bytes()));
            if !state_ok {
                h.remove(&TRACESTATE);
            }
            // A trusted proxy's chain is extended with it; anyone else's is replaced.
            if let Some(peer) = ctx.peer {
                // What the gateway believes of the chain (the client and the trusted hops
                // after it), then the peer: nothing a client wrote further left goes on.
                let xff = if ctx.peer_trusted && !ctx.chain.is_empty() && ctx.chain != [peer] {
                    headers::chain_value(ctx.chain.iter().copied().chain([peer]))
                } else {
                    headers::forwarded_for(None, peer)
                };
                h.insert(X_FORWARDED_FOR.clone(), xff);
            } else {
                // No peer address (a connection already reset): nothing of the client's goes on.
                h.remove(&X_FORWARDED_FOR);
            }
            // https where TLS terminates here, or where a trusted front proxy says it did.
            let https = ctx.tls || (ctx.peer_trusted && headers::last_says_https(h));
            let proto = HeaderValue::from_static(if https { "https" } else { "http" });
            h.insert(X_FORWARDED_PROTO.clone(), proto);
            headers::join_cookies(h);
        });
        if let Some(uri) = &ctx.rewritten {
            up.set_uri(uri.clone());
        }
        Ok(())
    }

    /// Runs on the upstream's response head before it goes to the client: rate-limit state
    /// and the request id added.
    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if resp.status == http::StatusCode::SWITCHING_PROTOCOLS {
            // No upgrade was asked for (`Upgrade` never goes upstream): a 101 would turn the
            // connection into a tunnel past every check. A 502 instead.
            return Err(Error::explain(
                ErrorType::HTTPStatus(502),
                "upstream switched protocols unasked",
            ));
        }
        ctx.upstream_status = Some(resp.status.as_u16());
        ctx.upstream_us = ctx
            .upstream_started
            .map(|t| u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
        // HTTP/1.0 has no chunked coding: pingora re-frames a body without a length as chunked
        // for every client; a 1.0 one gets it close-delimited instead.
        let close_delimited = !session.as_downstream().is_http2()
            && session.req_header().version == http::Version::HTTP_10
            && resp.headers.contains_key(http::header::TRANSFER_ENCODING);
        if close_delimited {
            session.set_keepalive(None);
        }
        header_edit::edit_response(resp, |parts| {
            response_head::clean(parts.status, &mut parts.headers);
            if close_delimited {
                parts.headers.remove(http::header::TRANSFER_ENCODING);
            }
            if let Some(rate) = &ctx.rate {
                if rate.live.is_none() {
                    // Forwarded unmetered (`fail_open`): no state of the gateway's to say, and
                    // none of the upstream's own passes for it.
                    headers::remove_live_rate(&mut parts.headers);
                }
                rate.write_to(&mut parts.headers);
            }
            parts.headers.insert(
                ctx.live.config.forward.request_id_header.clone(),
                ctx.request_id.clone(),
            );
        });
        Ok(())
    }

    /// Runs on any error after `request_filter` (connect, upstream I/O, timeouts): answers the
    /// client with the error's JSON unless the client is gone; the connection is not reused.
    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        // A timeout while the client still owes request body bytes is the client's stall
        // (body idle timeout), even when the upstream, waiting for the same bytes, timed out
        // first: nobody to answer, and no 504 blaming the upstream.
        let client_stalled = matches!(e.etype(), ErrorType::ReadTimedout)
            && !session.as_downstream_mut().is_body_done();
        let err = match e.etype() {
            _ if ctx.body_over => GatewayError::payload_too_large(),
            _ if client_stalled => {
                return FailToProxy {
                    error_code: 0,
                    can_reuse_downstream: false,
                };
            }
            ErrorType::HTTPStatus(503) => GatewayError::no_healthy_upstream(),
            ErrorType::HTTPStatus(404) => GatewayError::no_route(),
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
                if e.esource() != &ErrorSource::Downstream =>
            {
                GatewayError::gateway_timeout()
            }
            _ if e.esource() == &ErrorSource::Upstream => GatewayError::bad_gateway(),
            // A client that stopped sending (body idle timeout) or went away: nobody to answer.
            ErrorType::ReadTimedout
            | ErrorType::ReadError
            | ErrorType::WriteTimedout
            | ErrorType::WriteError
            | ErrorType::ConnectionClosed
                if e.esource() == &ErrorSource::Downstream =>
            {
                return FailToProxy {
                    error_code: 0,
                    can_reuse_downstream: false,
                };
            }
            _ if e.esource() == &ErrorSource::Downstream => GatewayError::malformed_request(),
            _ => GatewayError::bad_gateway(),
        };
        if let (Some(member), Some(route)) = (ctx.member, ctx.route()) {
            if matches!(
                e.etype(),
                ErrorType::ConnectRefused | ErrorType::ConnectTimedout | ErrorType::ConnectError
            ) {
                ctx.live.pools[route.upstream].report(member, false);
            }
        }
        session.set_keepalive(None);
        if respond::answered(session) {
            // The upstream's head is out (its body failed, or timed out, midway): an answer
            // now would be written into that body, and end it as if it were whole. The
            // connection closes (HTTP/2: the stream is reset) with the body cut short, which
            // the client can tell from its framing.
            ctx.error_code = Some(err.code.as_str());
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        if let Err(write) = respond::send_error(&self.0, session, ctx, &err).await {
            tracing::debug!(error = %write, "could not write the error response");
        }
        FailToProxy {
            error_code: err.status(),
            can_reuse_downstream: false,
        }
    }

    /// Runs last, for every request, answered here or upstream: the metrics.
    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        if let Some(edge) = EdgeStream::of(session.as_downstream().stream()) {
            edge.request_ended(ctx.live.config.server.keepalive_timeout);
        }
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let label = ctx.route.and_then(|i| ctx.live.labels.get(i));
        let elapsed = ctx.started.elapsed();
        let metrics = &self.0.metrics;
        metrics.record(label, status, elapsed);
        if ctx.store.us > 0 {
            metrics.store_waited(std::time::Duration::from_micros(ctx.store.us));
        }
        #[cfg(feature = "otlp")]
        if let Some(spans) = &self.0.spans {
            access::span(spans, session, ctx, status, elapsed);
        }
        if let (Some(us), Some(route)) = (ctx.upstream_us, ctx.route()) {
            if let Some(u) = ctx.live.config.upstreams.get(route.upstream) {
                metrics.upstream_answered(&u.name, std::time::Duration::from_micros(us));
            }
        }
        if let Some(log) = &self.0.access_log {
            access::log(log, session, ctx, status, elapsed, &self.0);
        }
    }
}
