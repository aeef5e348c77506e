//! The built-in echo upstream: answers every request with what it received, as JSON.
//! It makes a fresh clone demonstrable and gives tests an upstream that records its input.

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{json, Map, Value};

/// Bodies larger than this are counted, not echoed.
const MAX_ECHO_BODY: usize = 64 * 1024;

pub(crate) struct EchoApp;

#[async_trait]
impl ServeHttp for EchoApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let mut body = Vec::new();
        let mut body_bytes = 0usize;
        while let Ok(Some(chunk)) = session.read_request_body().await {
            body_bytes += chunk.len();
            if body.len() + chunk.len() <= MAX_ECHO_BODY {
                body.extend_from_slice(&chunk);
            }
        }
        let req = session.req_header();
        let mut headers = Map::new();
        for (name, value) in req.headers.iter() {
            let v = Value::from(String::from_utf8_lossy(value.as_bytes()).into_owned());
            match headers.get_mut(name.as_str()) {
                Some(Value::Array(list)) => list.push(v),
                Some(first) => *first = Value::Array(vec![first.clone(), v]),
                None => {
                    headers.insert(name.as_str().to_owned(), v);
                }
            }
        }
        let doc = json!({
            "method": req.method.as_str(),
            "uri": req.uri.to_string(),
            "headers": headers,
            "bodyBytes": body_bytes,
            "body": String::from_utf8_lossy(&body),
        });
        let bytes = serde_json::to_vec(&doc).unwrap_or_default();
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .header("content-length", bytes.len())
            .header("x-echo", "msgflash")
            .body(bytes)
            .unwrap_or_default()
    }
}
