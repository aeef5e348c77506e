//! Writing responses the gateway makes itself, with content-length and an honest connection.

use super::Ctx;
use crate::errors::answer_head;
use crate::errors::GatewayError;
use crate::gateway::Gateway;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

/// Sends `err` as SPEC §5 JSON (counted by [`Gateway::refusal`]), with Retry-After and the
/// rate-limit state when known.
pub(crate) async fn send_error(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut Ctx,
    err: &GatewayError,
) -> Result<()> {
    ctx.error_code = Some(err.code.as_str());
    let (head, body) = gw.refusal(err);
    write(session, ctx, head, body).await
}

/// Sends a JSON document with `status` (an answer the gateway serves itself: key listings, a
/// created key). Never stored by a cache on the way or in the browser: one carries a full key.
pub(crate) async fn send(
    session: &mut Session,
    ctx: &mut Ctx,
    status: u16,
    body: Vec<u8>,
) -> Result<()> {
    let mut head = answer_head(status, "application/json", body.len(), None);
    crate::errors::no_store(&mut head.headers);
    write(session, ctx, head, body).await
}

/// Whether a final response (not an interim `1xx`) has gone to the client already: nothing
/// can be answered after it.
pub(crate) fn answered(session: &Session) -> bool {
    session
        .response_written()
        .is_some_and(|r| !r.status.is_informational())
}

/// Writes a gateway-made answer: the request id and the rate-limit state join its head. Never
/// after a final response (it would become that response's body); a `HEAD` gets the head
/// alone (pingora drops the body on HTTP/1.1 but sends it on HTTP/2).
async fn write(
    session: &mut Session,
    ctx: &mut Ctx,
    mut head: http::response::Parts,
    body: Vec<u8>,
) -> Result<()> {
    if answered(session) {
        return Ok(());
    }
    let server = &ctx.live.config.server;
    crate::inspect::settle_body(session, server.max_body_bytes, server.body_idle_timeout).await;
    let h = &mut head.headers;
    if let Some(rate) = &ctx.rate {
        rate.write_to(h);
    }
    h.insert(
        ctx.live.config.forward.request_id_header.clone(),
        ctx.request_id.clone(),
    );
    let h = ResponseHeader::from(head);
    if session.req_header().method == http::Method::HEAD {
        return session.write_response_header(Box::new(h), true).await;
    }
    session.write_response_header(Box::new(h), false).await?;
    session.write_response_body(Some(body.into()), true).await?;
    Ok(())
}
