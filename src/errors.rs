//! Every response the gateway makes itself: typed errors and the one JSON shape of SPEC §5.

use std::borrow::Cow;
use std::fmt;

/// The fixed error codes of SPEC §5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Unauthorized,
    Forbidden,
    SubscriptionInactive,
    ApiKeyLimitReached,
    NotFound,
    PayloadTooLarge,
    HeadersTooLarge,
    ApiRateLimitExceeded,
    MonthlyQuotaExceeded,
    TooManyRequests,
    BadGateway,
    ServiceUnavailable,
    GatewayTimeout,
    BadRequest,
}

impl ErrorCode {
    /// The code as it appears in the JSON body.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unauthorized => "UNAUTHORIZED",
            Self::Forbidden => "FORBIDDEN",
            Self::SubscriptionInactive => "SUBSCRIPTION_INACTIVE",
            Self::ApiKeyLimitReached => "API_KEY_LIMIT_REACHED",
            Self::NotFound => "NOT_FOUND",
            Self::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            Self::HeadersTooLarge => "HEADERS_TOO_LARGE",
            Self::ApiRateLimitExceeded => "API_RATE_LIMIT_EXCEEDED",
            Self::MonthlyQuotaExceeded => "MONTHLY_API_REQUEST_QUOTA_EXCEEDED",
            Self::TooManyRequests => "TOO_MANY_REQUESTS",
            Self::BadGateway => "BAD_GATEWAY",
            Self::ServiceUnavailable => "SERVICE_UNAVAILABLE",
            Self::GatewayTimeout => "GATEWAY_TIMEOUT",
            Self::BadRequest => "BAD_REQUEST",
        }
    }

    /// The HTTP status that goes with the code.
    pub fn status(self) -> u16 {
        match self {
            Self::Unauthorized => 401,
            Self::Forbidden | Self::SubscriptionInactive | Self::ApiKeyLimitReached => 403,
            Self::NotFound => 404,
            Self::PayloadTooLarge => 413,
            Self::HeadersTooLarge => 431,
            Self::ApiRateLimitExceeded | Self::MonthlyQuotaExceeded | Self::TooManyRequests => 429,
            Self::BadGateway => 502,
            Self::ServiceUnavailable => 503,
            Self::GatewayTimeout => 504,
            Self::BadRequest => 400,
        }
    }
}

/// A rejection the gateway answers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayError {
    pub code: ErrorCode,
    pub message: Cow<'static, str>,
    /// Seconds for `Retry-After`, when the client may try again later.
    pub retry_after: Option<u64>,
}

impl GatewayError {
    /// Only the catalogue below makes errors: every user-facing sentence is written once.
    fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }

    pub fn status(&self) -> u16 {
        self.code.status()
    }

    /// `{"error":{"code":"…","message":"…"}}`
    pub fn body(&self) -> Vec<u8> {
        const HEAD: &[u8] = br#"{"error":{"code":""#;
        const MIDDLE: &[u8] = br#"","message":""#;
        const TAIL: &[u8] = br#""}}"#;
        let (code, message) = (self.code.as_str(), &*self.message);
        // Every refusal runs this: when nothing needs escaping (codes never do; messages with
        // a client's text in them may), the bytes serde_json would write, copied in directly.
        if !message.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
            let mut out =
                Vec::with_capacity(HEAD.len() + code.len() + MIDDLE.len() + message.len() + 3);
            for part in [HEAD, code.as_bytes(), MIDDLE, message.as_bytes(), TAIL] {
                out.extend_from_slice(part);
            }
            return out;
        }
        // Borrowed fields, no intermediate `Value` tree.
        #[derive(serde::Serialize)]
        struct Body<'a> {
            error: Inner<'a>,
        }
        #[derive(serde::Serialize)]
        struct Inner<'a> {
            code: &'a str,
            message: &'a str,
        }
        serde_json::to_vec(&Body {
            error: Inner {
                code: self.code.as_str(),
                message: &self.message,
            },
        })
        .unwrap_or_default()
    }

    // The catalogue of messages, so that every surface says the same words.

    pub fn missing_api_key() -> Self {
        Self::new(
            ErrorCode::Unauthorized,
            "Missing API key. Send it in the x-api-key header.",
        )
    }

    pub fn bearer_on_public_api() -> Self {
        Self::new(
            ErrorCode::Unauthorized,
            "Missing API key. The public API expects the x-api-key header, not a Bearer token.",
        )
    }

    pub fn invalid_api_key() -> Self {
        Self::new(ErrorCode::Unauthorized, "Invalid or revoked API key")
    }

    pub fn missing_bearer() -> Self {
        Self::new(
            ErrorCode::Unauthorized,
            "Missing bearer token. Send it in the Authorization header.",
        )
    }

    pub fn api_key_on_console() -> Self {
        Self::new(
            ErrorCode::Unauthorized,
            "The console uses Bearer tokens: send Authorization: Bearer <token>, not x-api-key.",
        )
    }

    pub fn invalid_token() -> Self {
        Self::new(ErrorCode::Unauthorized, "Invalid or expired token")
    }

    pub fn subscription_inactive() -> Self {
        Self::new(
            ErrorCode::SubscriptionInactive,
            "The account has no active subscription for this action",
        )
    }

    pub fn rate_limited(retry_after: u64) -> Self {
        Self::new(
            ErrorCode::ApiRateLimitExceeded,
            "Too many requests: more than the allowed requests per second on this API key",
        )
        .with_retry_after(retry_after)
    }

    pub fn quota_exceeded(retry_after: u64) -> Self {
        Self::new(
            ErrorCode::MonthlyQuotaExceeded,
            "Monthly API request quota exhausted",
        )
        .with_retry_after(retry_after)
    }

    pub fn too_many_requests(retry_after: u64) -> Self {
        Self::new(
            ErrorCode::TooManyRequests,
            "Too many requests from this client",
        )
        .with_retry_after(retry_after)
    }

    pub fn auth_failures_limited(retry_after: u64) -> Self {
        Self::new(
            ErrorCode::TooManyRequests,
            "Too many failed authentications from this client",
        )
        .with_retry_after(retry_after)
    }

    pub fn key_writes_limited(retry_after: u64) -> Self {
        Self::new(
            ErrorCode::TooManyRequests,
            "Too many API key changes for this account: at most 10 a minute",
        )
        .with_retry_after(retry_after)
    }

    pub fn key_reads_limited(retry_after: u64) -> Self {
        Self::new(
            ErrorCode::TooManyRequests,
            "Too many API key listings for this account: at most 60 a minute",
        )
        .with_retry_after(retry_after)
    }

    pub fn unknown_host() -> Self {
        Self::new(ErrorCode::NotFound, "No route for this host")
    }

    pub fn no_route() -> Self {
        Self::new(ErrorCode::NotFound, "No route matches this request")
    }

    pub fn bad_path() -> Self {
        Self::new(ErrorCode::BadRequest, "Malformed request path")
    }

    /// A path refused by the normaliser: malformed, or one a backend could read differently.
    pub fn ambiguous_path(why: crate::path::PathError) -> Self {
        if why.is_ambiguous() {
            Self::new(
                ErrorCode::BadRequest,
                format!("Ambiguous request path: it contains {why}"),
            )
        } else {
            Self::bad_path()
        }
    }

    pub fn scope_missing(scope: &str) -> Self {
        Self::new(
            ErrorCode::Forbidden,
            format!("This API key lacks the scope {scope}"),
        )
    }

    pub fn scope_undeclared() -> Self {
        Self::new(
            ErrorCode::Forbidden,
            "This API key is restricted to scopes and this route is granted by none of them",
        )
    }

    pub fn instance_source_undeclared() -> Self {
        Self::new(
            ErrorCode::Forbidden,
            "This API key is restricted to specific instances and this route does not say which instance it acts on",
        )
    }

    pub fn instance_not_allowed(id: &str) -> Self {
        let shown: String = id.chars().take(64).collect();
        Self::new(
            ErrorCode::Forbidden,
            format!("This API key may not use instance {shown}"),
        )
    }

    pub fn instance_missing() -> Self {
        Self::new(
            ErrorCode::Forbidden,
            "This API key is restricted to specific instances and the request names none",
        )
    }

    pub fn body_not_json_object() -> Self {
        Self::bad_request("The request body is not a JSON object")
    }

    /// An inspected query parameter or JSON field given more than once.
    pub fn duplicate_parameter(name: &str) -> Self {
        Self::bad_request(format!(
            "The query parameter {name} is given more than once"
        ))
    }

    pub fn duplicate_field(name: &str) -> Self {
        Self::bad_request(format!("The JSON field {name} is given more than once"))
    }

    pub fn too_many_parameters(name: &str) -> Self {
        Self::bad_request(format!(
            "The query string has more than 100 parameters: {name} could be read differently"
        ))
    }

    pub fn body_beside_query(name: &str) -> Self {
        Self::bad_request(format!(
            "The request has a body: {name} could be read from it instead of the query"
        ))
    }

    pub fn query_beside_path(name: &str) -> Self {
        Self::bad_request(format!(
            "The query string names {name} too: it could be read instead of the path"
        ))
    }

    pub fn body_beside_path(name: &str) -> Self {
        Self::bad_request(format!(
            "The request body names {name} too: it could be read instead of the path"
        ))
    }

    pub fn body_beside_path_not_json(name: &str) -> Self {
        Self::bad_request(format!(
            "{name} is read from the path: a restricted key's body must be Content-Type: \
             application/json, UTF-8, without a Content-Encoding, and not name it"
        ))
    }

    pub fn query_beside_body(name: &str) -> Self {
        Self::bad_request(format!(
            "The query string names {name} too: it could be read instead of the body"
        ))
    }

    /// An inspected JSON body whose bytes are not the document a backend reads: another
    /// charset, a content coding, or not declared JSON at all.
    pub fn body_not_plain_json(field: &str) -> Self {
        Self::bad_request(format!(
            "{field} is read from the JSON body: send it as Content-Type: application/json, \
             UTF-8, without a Content-Encoding"
        ))
    }

    /// A restricted key's POST body the gateway cannot read for a method override: a form (or
    /// a body Rack takes for one), or JSON it would have to decode first.
    pub fn restricted_body_not_json() -> Self {
        Self::bad_request(
            "A restricted key's POST body must be Content-Type: application/json, UTF-8, \
             without a Content-Encoding: a body can carry a method override (_method)",
        )
    }

    pub fn method_override_in_body() -> Self {
        Self::bad_request("The request body has a _method field: method overrides are refused")
    }

    pub fn method_override() -> Self {
        Self::bad_request("The query string has a _method parameter: method overrides are refused")
    }

    /// An inspected query string with a `;`, a separator to some parsers only.
    pub fn instance_beside_request(name: &str) -> Self {
        Self::bad_request(format!(
            "A cookie or header is named {name}: a backend could read the instance from it"
        ))
    }

    pub fn bad_escape_in_query(name: &str) -> Self {
        Self::bad_request(format!(
            "The query string has a '%' not followed by two hex digits: {name} could be read differently"
        ))
    }

    pub fn semicolon_in_query(name: &str) -> Self {
        Self::bad_request(format!(
            "The query string contains ';': {name} could be read differently"
        ))
    }

    pub fn headers_too_large() -> Self {
        Self::new(ErrorCode::HeadersTooLarge, "Request headers too large")
    }

    pub fn payload_too_large() -> Self {
        Self::new(ErrorCode::PayloadTooLarge, "Request body too large")
    }

    pub fn store_unavailable() -> Self {
        Self::new(
            ErrorCode::ServiceUnavailable,
            "The key store is unavailable. Try again shortly.",
        )
        .with_retry_after(1)
    }

    pub fn no_healthy_upstream() -> Self {
        Self::new(
            ErrorCode::ServiceUnavailable,
            "No healthy upstream is available",
        )
        .with_retry_after(1)
    }

    pub fn bad_gateway() -> Self {
        Self::new(ErrorCode::BadGateway, "The upstream service failed")
    }

    pub fn gateway_timeout() -> Self {
        Self::new(ErrorCode::GatewayTimeout, "The upstream service timed out")
    }

    pub fn key_limit_reached(max: u32) -> Self {
        Self::new(
            ErrorCode::ApiKeyLimitReached,
            format!("API key limit reached: the plan allows {max} active key(s)"),
        )
    }

    // Management (admin API and the console's /api/api-keys).

    pub fn invalid_admin_token() -> Self {
        Self::new(ErrorCode::Unauthorized, "Invalid or missing admin token")
    }

    pub fn reload_refused(why: impl fmt::Display) -> Self {
        Self::bad_request(format!("Reload refused: {why}"))
    }

    /// A management body that is not JSON, or not the shape the call takes. Names the field
    /// (`scopes[1]`) but never repeats the parser's own words.
    pub fn invalid_body(field: Option<&str>) -> Self {
        Self::bad_request(match field {
            None => Cow::Borrowed(
                "Invalid request body: a required field is missing or it is not a JSON object",
            ),
            Some(f) => Cow::Owned(format!(
                "Invalid request body: {f} is unknown or of the wrong type"
            )),
        })
    }

    pub fn body_not_json() -> Self {
        Self::bad_request("Invalid request body: not a JSON document")
    }

    pub fn invalid_account_id() -> Self {
        Self::bad_request("Account ids are 1 to 128 characters of A-Z a-z 0-9 . _ : -")
    }

    pub fn unknown_plan(plan: &str, known: &[&str]) -> Self {
        Self::bad_request(format!(
            "Unknown plan \"{plan}\" (known: {})",
            known.join(", ")
        ))
    }

    pub fn plan_required() -> Self {
        Self::bad_request("A new account needs a plan")
    }

    pub fn invalid_anchor_day() -> Self {
        Self::bad_request("quotaAnchorDay must be between 1 and 31")
    }

    pub fn invalid_key_name() -> Self {
        Self::bad_request(
            "name must be 1 to 100 characters, without control, invisible or text-direction characters",
        )
    }

    pub fn too_many(what: &str, max: usize) -> Self {
        Self::bad_request(format!("At most {max} {what} per key"))
    }

    pub fn unknown_scope(scope: &str) -> Self {
        let shown: String = scope.chars().take(64).collect();
        Self::bad_request(format!("Unknown scope \"{shown}\""))
    }

    pub fn invalid_instance_id(id: &str) -> Self {
        let shown: String = id.chars().take(64).collect();
        Self::bad_request(format!("Invalid instance id \"{shown}\": expected a UUID"))
    }

    pub fn revoke_not_announced() -> Self {
        Self::new(
            ErrorCode::ServiceUnavailable,
            "The key is revoked, but not every gateway node could be told yet. Retry the revoke.",
        )
        .with_retry_after(1)
    }

    pub fn revoke_not_replicated() -> Self {
        Self::new(
            ErrorCode::ServiceUnavailable,
            "The key is revoked, but no Redis replica confirmed it yet. Retry the revoke.",
        )
        .with_retry_after(1)
    }

    pub fn account_change_not_announced() -> Self {
        Self::new(
            ErrorCode::ServiceUnavailable,
            "The account is saved, but not every gateway node could be told yet. Retry the call.",
        )
        .with_retry_after(1)
    }

    pub fn unknown_account() -> Self {
        Self::not_found("Unknown account")
    }

    pub fn unknown_key() -> Self {
        Self::not_found("Unknown API key")
    }

    pub fn no_such_key_call() -> Self {
        Self::not_found("No such key-management call")
    }

    /// The account's plan is gone from plans.toml (a reload removed it): the gateway cannot
    /// decide its limits, which is its own fault, not the caller's.
    pub fn plan_unavailable() -> Self {
        Self::new(
            ErrorCode::ServiceUnavailable,
            "The account's plan is not available on this gateway. Try again shortly.",
        )
        .with_retry_after(1)
    }

    // Reading requests.

    pub fn unreadable_body() -> Self {
        Self::bad_request("Could not read the request body")
    }

    pub fn ambiguous_framing() -> Self {
        Self::bad_request("Ambiguous request framing")
    }

    pub fn transfer_coding_refused() -> Self {
        Self::bad_request("Ambiguous request framing: Transfer-Encoding must be chunked alone")
    }

    pub fn content_length_refused() -> Self {
        Self::bad_request("Ambiguous request framing: Content-Length must be one number")
    }

    pub fn body_on_get() -> Self {
        Self::bad_request("A GET or HEAD request cannot have a body")
    }

    pub fn malformed_request() -> Self {
        Self::bad_request("Malformed request")
    }

    pub fn connect_refused() -> Self {
        Self::bad_request("The CONNECT method is not served")
    }

    pub fn trace_refused() -> Self {
        Self::bad_request("The TRACE method is not served")
    }

    pub fn header_not_utf8() -> Self {
        Self::bad_request("A request header value is not valid UTF-8")
    }

    pub fn method_not_upper_case() -> Self {
        Self::bad_request("The request method must be upper-case letters")
    }

    fn bad_request(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    fn not_found(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
}

/// The decimal numbers 0 to 255 written one after another ("0123…99100…255"): header values
/// of small numbers (remaining tokens, seconds to refill, bursts) are slices of it, shared by
/// every response without an allocation.
static SMALL_NUMBERS: [u8; 658] = small_numbers();

const fn small_numbers() -> [u8; 658] {
    let mut out = [0u8; 658];
    let (mut n, mut i) = (0u32, 0usize);
    while n < 256 {
        if n >= 100 {
            out[i] = b'0' + (n / 100) as u8;
            i += 1;
        }
        if n >= 10 {
            out[i] = b'0' + (n / 10 % 10) as u8;
            i += 1;
        }
        out[i] = b'0' + (n % 10) as u8;
        i += 1;
        n += 1;
    }
    out
}

/// `n` as a header value; below 256 without an allocation.
pub(crate) fn number_value(n: u64) -> http::HeaderValue {
    let (start, len) = match n {
        0..=9 => (n, 1),
        10..=99 => (10 + (n - 10) * 2, 2),
        100..=255 => (190 + (n - 100) * 3, 3),
        _ => return http::HeaderValue::from(n),
    };
    let start = usize::try_from(start).unwrap_or(0);
    match std::str::from_utf8(&SMALL_NUMBERS[start..start + len]) {
        Ok(digits) => http::HeaderValue::from_static(digits),
        Err(_) => http::HeaderValue::from(n),
    }
}

/// The head of every answer the gateway writes itself, on either listener: status,
/// content-type, content-length, and Retry-After when the client may try again later.
pub(crate) fn answer_head(
    status: u16,
    content_type: &'static str,
    body_len: usize,
    retry_after: Option<u64>,
) -> http::response::Parts {
    use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
    let mut parts = http::Response::new(()).into_parts().0;
    // Room for these and what joins them (rate-limit state, the request id) without a regrow.
    parts.headers = http::HeaderMap::with_capacity(12);
    parts.status =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    let h = &mut parts.headers;
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        CONTENT_LENGTH,
        number_value(u64::try_from(body_len).unwrap_or(u64::MAX)),
    );
    if let Some(secs) = retry_after {
        h.insert(RETRY_AFTER, number_value(secs));
    }
    parts
}

/// `Cache-Control: no-store`, for answers that may carry a secret (a created key).
pub(crate) fn no_store(h: &mut http::HeaderMap) {
    h.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
}

impl fmt::Display for GatewayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status(),
            self.code.as_str(),
            self.message
        )
    }
}

impl std::error::Error for GatewayError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_the_documented_shape() {
        assert_eq!(
            String::from_utf8(GatewayError::invalid_api_key().body()).unwrap(),
            r#"{"error":{"code":"UNAUTHORIZED","message":"Invalid or revoked API key"}}"#
        );
    }

    #[test]
    fn messages_are_json_escaped() {
        let e = GatewayError::new(ErrorCode::Forbidden, "scope \"a\\b\"\n");
        let body = e.body();
        assert_eq!(
            String::from_utf8(body.clone()).unwrap(),
            r#"{"error":{"code":"FORBIDDEN","message":"scope \"a\\b\"\n"}}"#
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["message"], "scope \"a\\b\"\n");
    }

    proptest::proptest! {
        /// The direct copy writes exactly what serde_json writes, whatever the message holds.
        #[test]
        fn bodies_are_what_serde_json_writes(message in "\\PC{0,40}|[\\x00-\\x7f]{0,40}") {
            let e = GatewayError::new(ErrorCode::Forbidden, message.clone());
            let expected = serde_json::to_vec(&serde_json::json!({
                "error": {"code": "FORBIDDEN", "message": message}
            }))
            .unwrap();
            proptest::prop_assert_eq!(e.body(), expected);
        }
    }

    #[test]
    fn number_values_are_the_numbers() {
        for n in (0..1_000).chain([u64::from(u32::MAX), u64::MAX]) {
            assert_eq!(number_value(n), n.to_string().as_str(), "{n}");
        }
    }

    #[test]
    fn codes_have_their_statuses() {
        assert_eq!(GatewayError::quota_exceeded(5).status(), 429);
        assert_eq!(GatewayError::quota_exceeded(5).retry_after, Some(5));
        assert_eq!(GatewayError::rate_limited(0).retry_after, Some(1));
        assert_eq!(GatewayError::subscription_inactive().status(), 403);
        assert_eq!(GatewayError::headers_too_large().status(), 431);
        assert_eq!(
            ErrorCode::MonthlyQuotaExceeded.as_str(),
            "MONTHLY_API_REQUEST_QUOTA_EXCEEDED"
        );
    }
}
