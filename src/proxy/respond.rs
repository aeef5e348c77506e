//! Writing responses the gateway makes itself, with content-length and an honest connection.

use super::Ctx;
use crate::errors::GatewayError;
use crate::gateway::Gateway;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

/// Sends `err` as SPEC §5 JSON, with Retry-After and the rate-limit state when known.
pub async fn send_error(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut Ctx,
    err: &GatewayError,
) -> Result<()> {
    gw.metrics.rejected(err.code.as_str());
    send(session, ctx, err.status(), err.body(), err.retry_after).await
}

/// Sends a JSON document with `status`.
pub async fn send(
    session: &mut Session,
    ctx: &mut Ctx,
    status: u16,
    body: Vec<u8>,
    retry_after: Option<u64>,
) -> Result<()> {
    settle_request_body(session, ctx.live.config.server.max_body_bytes).await;
    // No case map: every name here is written lower-case by us.
    let mut h = ResponseHeader::build_no_case(status, Some(8))?;
    h.insert_header("content-type", "application/json")?;
    h.insert_header("content-length", body.len().to_string())?;
    if let Some(secs) = retry_after {
        h.insert_header("retry-after", secs.to_string())?;
    }
    if let Some(rate) = &ctx.rate {
        for (name, value) in rate.pairs() {
            h.insert_header(name, value)?;
        }
    }
    h.insert_header(
        ctx.live.config.forward.request_id_header.clone(),
        ctx.request_id.clone(),
    )?;
    session.write_response_header(Box::new(h), false).await?;
    session.write_response_body(Some(body.into()), true).await?;
    Ok(())
}

/// Before answering early: drain a small unread request body so keep-alive stays honest,
/// or give up keep-alive for a large or unknown one.
async fn settle_request_body(session: &mut Session, max_body_bytes: usize) {
    if session.is_body_done() {
        return;
    }
    match super::inspect::declared_length(session) {
        Some(n) if n <= max_body_bytes => {
            if session.drain_request_body().await.is_err() {
                session.set_keepalive(None);
            }
        }
        _ => session.set_keepalive(None),
    }
}
