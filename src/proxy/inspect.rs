//! Reading what a request carries: its whole body (bounded), and an instance id from a path
//! segment, a query parameter, or a top-level JSON body field (parsed without building the
//! document).

use crate::errors::GatewayError;
use pingora::protocols::http::ServerSession;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use std::borrow::Cow;
use std::fmt;

/// The body length a request declares in `Content-Length`, when it declares one.
pub fn declared_length(session: &ServerSession) -> Option<usize> {
    session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
}

/// Reads a whole request body, refusing more than `limit` bytes.
pub async fn read_body(session: &mut ServerSession, limit: usize) -> Result<Vec<u8>, GatewayError> {
    if declared_length(session).is_some_and(|n| n > limit) {
        return Err(GatewayError::payload_too_large());
    }
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    session.set_keepalive(None);
                    return Err(GatewayError::payload_too_large());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(_) => {
                session.set_keepalive(None);
                return Err(GatewayError::bad_request("Could not read the request body"));
            }
        }
    }
}

/// The `n`-th (0-based) non-empty segment of a normalised path.
pub fn path_segment(path: &str, n: usize) -> Option<&str> {
    path.split('/').filter(|s| !s.is_empty()).nth(n)
}

/// The first value of query parameter `name`, percent-decoded.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_encoding::percent_decode_str(k).decode_utf8().ok()?;
        (k == name).then(|| {
            percent_encoding::percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

/// Why a body could not be read for its field.
#[derive(Debug, PartialEq, Eq)]
pub struct NotAJsonObject;

/// The string value of top-level field `field` of a JSON object; `Ok(None)` when absent or not
/// a string. Other fields are skipped, never materialised.
pub fn body_field(body: &[u8], field: &str) -> Result<Option<String>, NotAJsonObject> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let found = FieldSeed(field)
        .deserialize(&mut de)
        .map_err(|_| NotAJsonObject)?;
    de.end().map_err(|_| NotAJsonObject)?;
    Ok(found)
}

struct FieldSeed<'a>(&'a str);

impl<'de> DeserializeSeed<'de> for FieldSeed<'_> {
    type Value = Option<String>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FieldSeed<'_> {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if key == self.0 && found.is_none() {
                found = map
                    .next_value::<serde_json::Value>()?
                    .as_str()
                    .map(str::to_owned);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_and_queries() {
        assert_eq!(path_segment("/api/v1/instances/abc/qr", 3), Some("abc"));
        assert_eq!(path_segment("/api/v1/instances/", 3), None);
        assert_eq!(
            query_param(Some("a=1&instanceId=x%2Dy&b"), "instanceId").as_deref(),
            Some("x-y")
        );
        assert_eq!(query_param(Some("instanceIdx=1"), "instanceId"), None);
        assert_eq!(query_param(None, "instanceId"), None);
    }

    #[test]
    fn body_fields() {
        let body = br#"{"to":"+33","nested":{"instanceId":"no"},"instanceId":"3fa85f64-5717-4562-b3fc-2c963f66afa6"}"#;
        assert_eq!(
            body_field(body, "instanceId").unwrap().as_deref(),
            Some("3fa85f64-5717-4562-b3fc-2c963f66afa6")
        );
        assert_eq!(body_field(br#"{"instanceId":7}"#, "instanceId"), Ok(None));
        assert_eq!(body_field(br#"{"a":"\u00e9"}"#, "instanceId"), Ok(None));
        assert_eq!(body_field(b"[1,2]", "instanceId"), Err(NotAJsonObject));
        assert_eq!(
            body_field(b"{\"a\":1} trailing", "instanceId"),
            Err(NotAJsonObject)
        );
        assert_eq!(body_field(b"", "instanceId"), Err(NotAJsonObject));
    }
}
