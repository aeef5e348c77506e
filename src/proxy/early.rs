//! Checks of a request's head before its route's authentication: the header fields' size and
//! encoding, the request-target and its normalised path, and a route policy's per-client limit.

use super::auth_failures;
use super::headers::ceil_secs;
use super::X_API_KEY;
use crate::client_ip;
use crate::errors::GatewayError;
use crate::gateway::Gateway;
use crate::path::PathError;
use pingora::http::RequestHeader;
use std::net::IpAddr;

/// The request's header fields in one pass: their size as HTTP/1.1 carries them, and whether
/// every value is UTF-8 (SPEC §6 refuses one that is not; `x-api-key` has its own refusal,
/// a malformed key's 401, and is never forwarded).
pub(super) fn header_fields(req: &RequestHeader) -> (usize, bool) {
    let mut bytes = 0;
    let mut utf8 = true;
    for (name, value) in &req.headers {
        bytes += name.as_str().len() + value.len() + 4;
        let v = value.as_bytes();
        if !v.is_ascii() && std::str::from_utf8(v).is_err() && name != X_API_KEY {
            utf8 = false;
        }
    }
    (bytes, utf8)
}

/// A route policy's per-client limit (`ip_rate_per_second` / `ip_burst`), taken for `client`.
/// A /48 holds 65,536 /64s: together they get `SITE_FACTOR` clients' budget, not one each (a
/// login or a password reset guessed from a whole site); a full site refuses before the
/// client's own bucket is charged.
pub(super) fn ip_limited(
    gw: &Gateway,
    route_index: usize,
    client: IpAddr,
    limit: crate::limits::gcra::BucketParams,
    ipv6_prefix: u8,
) -> Result<(), GatewayError> {
    let now_ns = gw.clock.now_ns();
    let refused = |retry_ns| GatewayError::too_many_requests(ceil_secs(retry_ns));
    let site = client_ip::site_key(client, ipv6_prefix).map(|site| {
        let factor = auth_failures::SITE_FACTOR;
        let params = crate::limits::gcra::BucketParams {
            rate_per_second: limit.rate_per_second.saturating_mul(factor),
            burst: limit.burst.saturating_mul(factor),
        };
        ((route_index, site), params)
    });
    if let Some((key, params)) = &site {
        let full =
            gw.ip_site_limiter
                .exhausted(key, now_ns, params.emission_interval_ns(), params.burst);
        if let Some(retry_ns) = full {
            return Err(refused(retry_ns));
        }
    }
    let own = (route_index, client_ip::limit_key(client, ipv6_prefix));
    gw.ip_limiter.check(own, now_ns, limit).map_err(refused)?;
    if let Some((key, params)) = site {
        gw.ip_site_limiter
            .check(key, now_ns, params)
            .map_err(refused)?;
    }
    Ok(())
}

/// Whether a request-target is absolute-form: a scheme (RFC 3986 §3.1) and `://`.
fn is_absolute_form(target: &[u8]) -> bool {
    let Some(end) = memchr::memmem::find(target, b"://") else {
        return false;
    };
    let scheme = &target[..end];
    scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && scheme
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
}

/// The normalised path and the URI to forward when it differs from the request's. The
/// request-target as received must be what the URI says (origin-form, valid UTF-8): otherwise
/// pingora would forward bytes the gateway never routed on.
pub(super) fn normalised(
    req: &RequestHeader,
    rules: crate::path::PathRules,
) -> Result<(String, Option<http::Uri>), GatewayError> {
    if !req.raw_path_is_utf8() {
        return Err(GatewayError::ambiguous_path(PathError::NonAscii));
    }
    // Origin-form starts with `/`, absolute-form with a scheme and its path with `/`. A target
    // that starts with its query (`GET ?x`, an HTTP/2 `:path` of `?x`) or a bare name (`GET x`)
    // has the path `/` to the `http` crate, and pingora would forward it as it came: a
    // request-target the gateway never routed on.
    let raw_target = req.raw_path();
    let starts_with_path = req
        .uri
        .path_and_query()
        .is_none_or(|pq| pq.as_str().starts_with('/'))
        && (raw_target.starts_with(b"/") || is_absolute_form(raw_target));
    if !starts_with_path {
        return Err(GatewayError::bad_path());
    }
    let raw = req.uri.path();
    let path = crate::path::normalise(raw, rules).map_err(GatewayError::ambiguous_path)?;
    let origin_form = req
        .uri
        .path_and_query()
        .is_some_and(|pq| pq.as_str().as_bytes() == req.raw_path());
    if path == raw && origin_form {
        return Ok((path.into_owned(), None));
    }
    let pq = match req.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let uri = http::Uri::try_from(pq).map_err(|_| GatewayError::bad_path())?;
    Ok((path.into_owned(), Some(uri)))
}
