//! The host a request names: the authority of an absolute-form target or HTTP/2's
//! `:authority`, else `Host`, without its port.

/// The host part a request names (an IPv6 literal with its brackets); `None` when it names none
/// or one whose port is not digits (`api.example.com:evil.example` names no host).
pub(crate) fn named(req: &http::request::Parts) -> Option<&str> {
    // The authority whole, port included: `http::Uri` accepts any port characters, and pingora
    // sends the authority upstream as `Host`.
    match req.uri.authority() {
        Some(authority) => without_port(authority.as_str()),
        None => req
            .headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .and_then(without_port),
    }
}

/// Whether the request carries no host at all (an HTTP/1.0 request without `Host`).
pub(crate) fn absent(req: &http::request::Parts) -> bool {
    req.uri.authority().is_none() && !req.headers.contains_key(http::header::HOST)
}

/// The host part of a `Host` value (an IPv6 literal with its brackets), when what follows it
/// is nothing or a port of digits.
fn without_port(value: &str) -> Option<&str> {
    let (host, rest) = match value.find(']') {
        Some(end) if value.starts_with('[') => value.split_at(end + 1),
        _ => value.split_at(value.find(':').unwrap_or(value.len())),
    };
    let port_ok = match rest.strip_prefix(':') {
        Some(port) => port.bytes().all(|b| b.is_ascii_digit()),
        None => rest.is_empty(),
    };
    port_ok.then_some(host)
}
