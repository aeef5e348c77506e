//! Writing responses the gateway makes itself, with content-length and an honest connection.

use super::Ctx;
use crate::errors::GatewayError;
use crate::gateway::Gateway;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::HeaderValue;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

/// Sends `err` as SPEC §5 JSON, with Retry-After and the rate-limit state when known.
pub(crate) async fn send_error(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut Ctx,
    err: &GatewayError,
) -> Result<()> {
    gw.metrics.rejected(err.code.as_str());
    send(session, ctx, err.status(), err.body(), err.retry_after).await
}

/// Sends a JSON document with `status`.
pub(crate) async fn send(
    session: &mut Session,
    ctx: &mut Ctx,
    status: u16,
    body: Vec<u8>,
    retry_after: Option<u64>,
) -> Result<()> {
    crate::inspect::settle_body(session, ctx.live.config.server.max_body_bytes).await;
    let mut parts = http::Response::new(()).into_parts().0;
    parts.status = http::StatusCode::from_u16(status)
        .map_err(|_| pingora::Error::new(pingora::ErrorType::InternalError))?;
    let h = &mut parts.headers;
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    if let Some(secs) = retry_after {
        h.insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    if let Some(rate) = &ctx.rate {
        rate.write_to(h);
    }
    h.insert(
        ctx.live.config.forward.request_id_header.clone(),
        ctx.request_id.clone(),
    );
    let h = ResponseHeader::from(parts);
    session.write_response_header(Box::new(h), false).await?;
    session.write_response_body(Some(body.into()), true).await?;
    Ok(())
}
