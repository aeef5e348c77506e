//! Where a request's body ends (RFC 9112 §6), accepted only in the one spelling every parser
//! reads alike: the gateway re-frames what it forwards, but a `Content-Length` goes upstream as
//! written, and a body a backend does not expect can be read as a request of its own there.

use crate::errors::GatewayError;
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::Method;
use pingora::proxy::Session;

/// Refuses `CONNECT` (and closes), `TRACE`, a method not in upper case, and a request whose
/// framing a parser could read otherwise:
/// `Transfer-Encoding` beside `Content-Length`, a transfer coding other than `chunked` alone, a
/// `Content-Length` that is not one plain number, and a body on `GET` or `HEAD` (a backend that
/// does not expect one could read it as the next request on a shared upstream connection). The
/// first three close the connection (what follows the head cannot be told apart from the next
/// request).
pub(super) async fn check(
    session: &mut Session,
    body_idle: std::time::Duration,
) -> Result<(), GatewayError> {
    let method = &session.req_header().method;
    if *method == Method::CONNECT {
        // A tunnel (or HTTP/2's extended CONNECT) would carry anything past every check.
        session.set_keepalive(None);
        return Err(GatewayError::connect_refused());
    }
    if !upper_case_method(method.as_str()) {
        // Methods are case-sensitive (RFC 9110 §9.1), so `post` matches no policy entry for
        // POST, but Django upper-cases the method and ASP.NET Core compares it ignoring case:
        // under a catch-all entry, `post /api/v1/messages/send` would pass as another method
        // and run as a send. nginx refuses such methods too.
        return Err(GatewayError::method_not_upper_case());
    }
    if *method == Method::TRACE {
        // An echo of the request (headers a backend or this gateway added included), with no
        // use through a public gateway: nginx refuses it too.
        return Err(GatewayError::trace_refused());
    }
    let h = &session.req_header().headers;
    let refused = if h.contains_key(TRANSFER_ENCODING) {
        // pingora drops the Content-Length from the parsed head of such a request; the head
        // as received says it.
        if head_has_field(&session.as_downstream().to_h1_raw(), b"content-length") {
            Some(GatewayError::ambiguous_framing())
        } else if !only_chunked(h.get_all(TRANSFER_ENCODING).iter().map(|v| v.as_bytes())) {
            Some(GatewayError::transfer_coding_refused())
        } else {
            None
        }
    } else if h.contains_key(CONTENT_LENGTH)
        && !one_number(h.get_all(CONTENT_LENGTH).iter().map(|v| v.as_bytes()))
    {
        Some(GatewayError::content_length_refused())
    } else {
        None
    };
    if let Some(refused) = refused {
        session.set_keepalive(None);
        return Err(refused);
    }
    let method = &session.req_header().method;
    if *method != Method::GET && *method != Method::HEAD {
        return Ok(());
    }
    if !session.as_downstream().is_http2() {
        return match crate::inspect::has_body(session) {
            true => Err(GatewayError::body_on_get()),
            false => Ok(()),
        };
    }
    // HTTP/2: a stream whose head did not end it may still carry DATA, which pingora would
    // forward as a chunked body; some clients end a GET with an empty DATA frame. Read up to
    // its end: nothing passes, a byte is a body.
    if crate::inspect::declared_length(session.as_downstream()).is_some_and(|n| n > 0) {
        return Err(GatewayError::body_on_get());
    }
    if crate::inspect::has_body(session) {
        // Before the route, the key and every limit: a client that keeps its GET streams open
        // would hold their headers (up to 64 KiB each, 100 streams a connection) for as long
        // as this waits. An empty DATA frame ending the stream comes at once.
        let wait = body_idle.min(GET_END_WAIT);
        match crate::inspect::read_body(session.as_downstream_mut(), 0, wait).await {
            Ok(_) => {}
            Err(e) if e.status() == 413 => return Err(GatewayError::body_on_get()),
            Err(e) => return Err(e),
        }
        // A stream that ends with trailers (HEADERS after the head) reads as no data but never
        // as done: pingora would send it upstream as a chunked body.
        if !session.as_downstream_mut().is_body_done() {
            return Err(GatewayError::body_on_get());
        }
    }
    Ok(())
}

/// How long an HTTP/2 GET or HEAD whose head did not end its stream is given to end it (idle,
/// between frames).
const GET_END_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// A method of upper-case letters, `-` and `_` (what nginx accepts): every standard method,
/// and extension methods as they are spelled (`PROPFIND`, `M-SEARCH`).
fn upper_case_method(method: &str) -> bool {
    !method.is_empty()
        && method
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
}

/// One `Transfer-Encoding` line saying `chunked` and nothing else (any case, spaces around).
fn only_chunked<'a>(mut lines: impl Iterator<Item = &'a [u8]>) -> bool {
    match (lines.next(), lines.next()) {
        (Some(line), None) => line.trim_ascii().eq_ignore_ascii_case(b"chunked"),
        _ => false,
    }
}

/// One `Content-Length` line of 1–19 digits (no sign, list, space or second line).
fn one_number<'a>(mut lines: impl Iterator<Item = &'a [u8]>) -> bool {
    match (lines.next(), lines.next()) {
        (Some(line), None) => (1..=19).contains(&line.len()) && line.iter().all(u8::is_ascii_digit),
        _ => false,
    }
}

/// True when a raw HTTP/1 request head has a field named `name` (any case; a field name is
/// followed by ':' directly, RFC 9112 §5.1).
fn head_has_field(head: &[u8], name: &[u8]) -> bool {
    head.split(|b| *b == b'\n').skip(1).any(|line| {
        line.len() > name.len()
            && line[..name.len()].eq_ignore_ascii_case(name)
            && line[name.len()] == b':'
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_upper_case_letters() {
        for ok in ["GET", "POST", "PROPFIND", "M-SEARCH", "VERSION_CONTROL"] {
            assert!(upper_case_method(ok), "{ok}");
        }
        for bad in ["get", "Post", "POST1", "", "GE T", "GET\u{0}"] {
            assert!(!upper_case_method(bad), "{bad:?}");
        }
    }

    #[test]
    fn fields_are_found_in_the_raw_head_by_name_only() {
        let head = b"POST /content-length: HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n";
        assert!(head_has_field(head, b"content-length"));
        assert!(head_has_field(
            b"GET / HTTP/1.1\r\nCONTENT-LENGTH:3\r\n",
            b"content-length"
        ));
        assert!(!head_has_field(
            b"GET /content-length: HTTP/1.1\r\n\r\n",
            b"content-length"
        ));
        assert!(!head_has_field(
            b"GET / HTTP/1.1\r\nx-content-length: 3\r\n",
            b"content-length"
        ));
        assert!(!head_has_field(
            b"GET / HTTP/1.1\r\ncontent-lengthy: 3\r\n",
            b"content-length"
        ));
    }

    #[test]
    fn only_one_plain_spelling_of_each_framing_header_passes() {
        let lines = |l: &'static [&'static str]| l.iter().map(|s| s.as_bytes());
        assert!(only_chunked(lines(&["chunked"])));
        assert!(only_chunked(lines(&[" Chunked "])));
        for refused in [
            &["gzip, chunked"][..],
            &["identity, chunked"],
            &["chunked, chunked"],
            &["chunked", "chunked"],
            &["gzip", "chunked"],
            &["chunked;q=1"],
            &["xchunked"],
            &[""],
            &[],
        ] {
            assert!(!only_chunked(lines(refused)), "{refused:?}");
        }
        assert!(one_number(lines(&["0"])));
        assert!(one_number(lines(&["1234567890123456789"])));
        for refused in [
            &["5, 5"][..],
            &["5", "5"],
            &["+5"],
            &["-1"],
            &[" 5"],
            &["5 "],
            &["0x5"],
            &["12345678901234567890"],
            &[""],
            &[],
        ] {
            assert!(!one_number(lines(refused)), "{refused:?}");
        }
    }
}
