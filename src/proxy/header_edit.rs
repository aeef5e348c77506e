//! Header edits straight on the `http` maps, with prebuilt names: pingora's `insert_header`
//! re-parses and copies every name and keeps a second, case-preserving map in step.
//!
//! HTTP gives header-name case no meaning, so an edited message loses only that: standard names
//! go out title-cased (`Content-Type`), others lower-case. Everything else survives: a request
//! target the URI does not reproduce (absolute-form, non-UTF-8 bytes), H2's end-of-stream flag,
//! a response's non-standard reason phrase.

use http::request::Parts as ReqParts;
use http::response::Parts as RespParts;
use pingora::http::{RequestHeader, ResponseHeader};

/// Runs `edit` on the request's `http` parts.
pub(crate) fn edit_request<T>(req: &mut RequestHeader, edit: impl FnOnce(&mut ReqParts) -> T) -> T {
    let target = req.raw_path();
    let from_uri = req
        .uri
        .path_and_query()
        .map_or(&b""[..], |p| p.as_str().as_bytes());
    let verbatim = (target != from_uri).then(|| target.to_vec());
    let end_stream = req.send_end_stream();
    let placeholder = RequestHeader::from(http::Request::new(()).into_parts().0);
    let mut parts = ReqParts::from(std::mem::replace(req, placeholder));
    let out = edit(&mut parts);
    *req = RequestHeader::from(parts);
    if let Some(raw) = verbatim {
        // The same bytes were accepted when the request was read; should they not be now,
        // the URI's form of the target is what goes upstream.
        let _ = req.set_raw_path(&raw);
    }
    if let Some(end) = end_stream {
        req.set_send_end_stream(end);
    }
    out
}

/// Runs `edit` on the response's `http` parts.
pub(crate) fn edit_response<T>(
    resp: &mut ResponseHeader,
    edit: impl FnOnce(&mut RespParts) -> T,
) -> T {
    let reason = resp
        .get_reason_phrase()
        .filter(|r| Some(*r) != resp.status.canonical_reason())
        .map(str::to_owned);
    let placeholder = ResponseHeader::from(http::Response::new(()).into_parts().0);
    let mut parts = RespParts::from(std::mem::replace(resp, placeholder));
    let out = edit(&mut parts);
    *resp = ResponseHeader::from(parts);
    if reason.is_some() {
        // Only a status change inside `edit` could make it fail; the canonical phrase is the
        // right answer then.
        let _ = resp.set_reason_phrase(reason.as_deref());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn wire_request(req: &RequestHeader) -> String {
        // The request line and headers as pingora would write them (header order aside).
        let mut lines: Vec<String> = req
            .headers
            .iter()
            .map(|(n, v)| format!("{}: {}", n, v.to_str().unwrap_or("")))
            .collect();
        lines.sort();
        format!(
            "{} {}\n{}",
            req.method,
            String::from_utf8_lossy(req.raw_path()),
            lines.join("\n")
        )
    }

    #[test]
    fn request_edit_keeps_the_target_and_every_other_header() {
        let mut req = RequestHeader::build("POST", b"/api/v1/messages/send?x=1", None).unwrap();
        req.insert_header("X-Api-Key", "k").unwrap();
        req.insert_header("Content-Type", "application/json")
            .unwrap();
        edit_request(&mut req, |p| {
            p.headers.remove("x-api-key");
            p.headers
                .insert("x-account-id", HeaderValue::from_static("acct_1"));
        });
        assert_eq!(
            wire_request(&req),
            "POST /api/v1/messages/send?x=1\ncontent-type: application/json\nx-account-id: acct_1"
        );
    }

    #[test]
    fn request_edit_keeps_an_absolute_form_target() {
        let mut req = RequestHeader::build("GET", b"http://example.com/api/v1/x", None).unwrap();
        edit_request(&mut req, |_| ());
        assert_eq!(req.raw_path(), b"http://example.com/api/v1/x");
    }

    #[test]
    fn response_edit_keeps_a_custom_reason_phrase_and_drops_a_canonical_one() {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.set_reason_phrase(Some("Fine")).unwrap();
        edit_response(&mut resp, |p| {
            p.headers
                .insert("x-request-id", HeaderValue::from_static("r1"));
        });
        assert_eq!(resp.get_reason_phrase(), Some("Fine"));
        assert_eq!(resp.headers["x-request-id"], "r1");

        let mut resp = ResponseHeader::build(404, None).unwrap();
        edit_response(&mut resp, |_| ());
        assert_eq!(resp.get_reason_phrase(), Some("Not Found"));
        assert_eq!(resp.status, 404);
    }
}
