//! Reading what a request carries: its whole body (bounded), and an instance id from a path
//! segment, a query parameter, or a top-level JSON body field (parsed without building the
//! document).

use crate::errors::GatewayError;
use pingora::protocols::http::ServerSession;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::borrow::Cow;
use std::fmt;

/// The body length a request declares in `Content-Length`, when it declares one.
pub(crate) fn declared_length(session: &ServerSession) -> Option<usize> {
    session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
}

/// How many body idle timeouts a body the gateway reads itself may take in all.
pub(crate) const BODY_PAUSES: u32 = 3;

/// Reads a whole request body, refusing more than `limit` bytes; each read may wait at most
/// `idle` (`server.body_idle_timeout`): pingora bounds an HTTP/1 read by the session's read
/// timeout, but an HTTP/2 read by nothing, so a stalled stream would hold its place forever.
/// The whole body must come within [`BODY_PAUSES`] times `idle`.
pub(crate) async fn read_body(
    session: &mut ServerSession,
    limit: usize,
    idle: std::time::Duration,
) -> Result<Vec<u8>, GatewayError> {
    if declared_length(session).is_some_and(|n| n > limit) {
        return Err(GatewayError::payload_too_large());
    }
    // A client that asked whether to send its body waits for this answer (pingora sends it
    // only when the upstream does, and no request reaches the upstream before its body is
    // read here): without it, the client stalls until its own timeout.
    if expects_continue(session.req_header()) && session.write_continue_response().await.is_err() {
        session.set_keepalive(None);
        return Err(GatewayError::unreadable_body());
    }
    // The whole body within three pauses' time: each read may pause `idle`, but a body held
    // open a byte at a time would keep its buffer (and, for a restricted key, its place before
    // the rate limit) for as long as the client likes.
    let whole = tokio::time::Instant::now() + idle.saturating_mul(BODY_PAUSES);
    let mut body = Vec::new();
    loop {
        let wait = idle.min(whole.saturating_duration_since(tokio::time::Instant::now()));
        let read = tokio::time::timeout(wait, session.read_request_body()).await;
        match read.unwrap_or_else(|_| Err(pingora::Error::new(pingora::ErrorType::ReadTimedout))) {
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
                return Err(GatewayError::unreadable_body());
            }
        }
    }
}

/// True when a request waits for `100 Continue` before sending its body (RFC 9110 §10.1.1).
pub(crate) fn expects_continue(req: &pingora::http::RequestHeader) -> bool {
    req.version != http::Version::HTTP_10
        && req.headers.get(http::header::EXPECT).is_some_and(|v| {
            v.as_bytes()
                .trim_ascii()
                .eq_ignore_ascii_case(b"100-continue")
        })
}

/// Before answering without reading the request body: drain a small declared body so
/// keep-alive stays honest, or give up keep-alive for a large or unknown one (never read
/// more than `max_bytes` for nothing, nor for longer than [`BODY_PAUSES`] times `idle`).
pub(crate) async fn settle_body(
    session: &mut ServerSession,
    max_bytes: usize,
    idle: std::time::Duration,
) {
    if session.is_body_done() {
        return;
    }
    if session.is_http2() {
        // A stream's unread body goes with the stream; the connection has nothing to keep
        // honest, and a read here would have no timeout (pingora bounds none on HTTP/2).
        return;
    }
    if session.get_keepalive().is_none() {
        // The connection closes after the answer: nothing to keep honest, and a client
        // trickling its body would hold the answer back for as long as it liked. What has
        // already come is read away (briefly): closing on unread input resets the connection,
        // and a reset can destroy the answer before the client reads it.
        if matches!(declared_length(session), Some(n) if n <= max_bytes) {
            let brief = idle.min(std::time::Duration::from_millis(100));
            let _ = tokio::time::timeout(brief, session.drain_request_body()).await;
        }
        return;
    }
    if expects_continue(session.req_header()) {
        // The client waits for `100 Continue` before sending the body, which an answer now
        // tells it not to send: draining would wait for bytes that may never come.
        session.set_keepalive(None);
        return;
    }
    match declared_length(session) {
        Some(n) if n <= max_bytes => {
            let whole = idle.saturating_mul(BODY_PAUSES);
            let drained = tokio::time::timeout(whole, session.drain_request_body()).await;
            if !matches!(drained, Ok(Ok(()))) {
                session.set_keepalive(None);
            }
        }
        _ => session.set_keepalive(None),
    }
}

/// The `n`-th (0-based) non-empty segment of a normalised path.
pub(crate) fn path_segment(path: &str, n: usize) -> Option<&str> {
    path.split('/').filter(|s| !s.is_empty()).nth(n)
}

/// Why an inspected value cannot be trusted to read the same at the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ambiguity {
    /// The field or parameter is given more than once (backends keep the first, the last, or
    /// all of them), counting spellings that differ only in case (ASP.NET, Go's encoding/json).
    Duplicate,
    /// The query string has a `;`, a separator to some parsers and not to others.
    Semicolon,
    /// More parameters than [`MAX_INSPECTED_PARAMS`]: backends silently drop those past their
    /// own limit (PHP's `max_input_vars`, qs's `parameterLimit`), the inspected one included.
    TooManyParameters,
    /// A `%` not followed by two hex digits: kept as it is by most parsers, but `%u0049` is
    /// `I` to .NET's `HttpUtility` (and classic ASP.NET), so `instance%u0049d` names it there.
    BadEscape,
}

/// The most parameters an inspected query string may carry.
pub(crate) const MAX_INSPECTED_PARAMS: usize = 100;

/// True when some backend could take query key `key` for `name`: read as it stands, with an
/// array or object suffix cut (`instanceId[]`, `instanceId[0]`, `instanceId.x`: qs, Rails,
/// Spring), as qs and Rack read a bracket-led key (`[instanceId]`), or as PHP reads any key
/// (up to a NUL, leading spaces dropped, `.` and ` ` made `_`: `.method` is `_method` to PHP);
/// each reading compared as [`same_name_to_some_backend`] does. No allocation unless PHP's
/// reading differs from the key.
fn same_parameter_to_some_backend(key: &str, name: &str) -> bool {
    // PHP reads a name as a C string: `instanceId%00x` is `instanceId` to it.
    let key = key.split('\0').next().unwrap_or(key);
    same_name_to_some_backend(key, name)
        // Any member of an array or object key (`instanceId[]`, `[instanceId]`, and a prefixed
        // one: ASP.NET Core binds `query.instanceId` to a `[FromQuery] query` model's property
        // before the bare name); Spring's field-default marker (`!instanceId`) too.
        || key
            .split(['[', ']', '.'])
            .any(|piece| same_name_to_some_backend(piece.trim_start_matches('!'), name))
        || same_name_to_some_backend(&php_name(key), name)
}

/// True when `text`, a query key or value decoded once, names `name` when decoded and split
/// again: a backend (or a proxy before it) that unescapes the query before splitting it reads
/// `instance%2549d` as `instanceId`, and `x=a%26instanceId%3DB` as a parameter of its own;
/// .NET's decoder also reads `%u0049` as `I` (`instance%25u0049d`).
fn names_when_decoded_again(text: &str, name: &str) -> bool {
    let names = |text: &str| {
        text.split(';').any(|part| {
            form_urlencoded::parse(part.as_bytes())
                .any(|(k, _)| same_parameter_to_some_backend(&k, name))
        })
    };
    text.contains(['%', '&', ';', '=', '+'])
        && (names(text) || dotnet_unescaped(text).is_some_and(|t| names(&t)))
}

/// `text` with .NET's `%uXXXX` escapes decoded (`None` when it has none): what
/// `HttpUtility.UrlDecode` reads besides `%XX`.
fn dotnet_unescaped(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let (mut i, mut changed) = (0, false);
    while i < b.len() {
        let escape = (b[i] == b'%' && matches!(b.get(i + 1), Some(b'u' | b'U')))
            .then(|| text.get(i + 2..i + 6))
            .flatten()
            .filter(|hex| hex.bytes().all(|c| c.is_ascii_hexdigit()))
            .and_then(|hex| u32::from_str_radix(hex, 16).ok())
            .and_then(char::from_u32);
        match escape {
            Some(c) => {
                out.push(c);
                i += 6;
                changed = true;
            }
            None => {
                let c = text[i..].chars().next().unwrap_or('\u{fffd}');
                out.push(c);
                i += c.len_utf8().max(1);
            }
        }
    }
    changed.then_some(out)
}

/// True when a cookie or a header field could be read as request input named `name`: PHP's
/// `$_REQUEST` holds cookies (over the query and body when no `request_order` is set, as in the
/// official images), classic ASP.NET's `Request[name]` falls back to cookies, and Spring 6.2
/// binds header fields to a model's properties (`instance-id` to `instanceId`). Cookie pairs
/// are split at `,` as well as `;`: RFC 2109 parsers (Tomcat's legacy cookie processor) read
/// `a=1,instanceId=B` as two cookies.
pub(crate) fn named_by_cookie_or_header(headers: &http::HeaderMap, name: &str) -> bool {
    !name.is_empty()
        && headers.iter().any(|(n, v)| {
            same_name_to_some_backend(n.as_str(), name)
                || (n == http::header::COOKIE
                    && String::from_utf8_lossy(v.as_bytes())
                        .split([';', ','])
                        .any(|pair| {
                            let key = pair.split('=').next().unwrap_or(pair).trim();
                            let key = percent_encoding_lossy(key);
                            same_parameter_to_some_backend(&key, name)
                        }))
        })
}

/// A cookie name as PHP reads it: percent-decoded.
fn percent_encoding_lossy(key: &str) -> Cow<'_, str> {
    if key.contains(['%', '+']) {
        form_urlencoded::parse(key.as_bytes())
            .next()
            .map_or(Cow::Borrowed(key), |(k, _)| Cow::Owned(k.into_owned()))
    } else {
        Cow::Borrowed(key)
    }
}

/// True when the query holds a `%` that is not followed by two hex digits.
fn has_bad_escape(query: &str) -> bool {
    let b = query.as_bytes();
    memchr::memchr_iter(b'%', b).any(|i| {
        !(b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
            && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    })
}

/// The variable name PHP gives query or form key `key`: leading spaces dropped, spaces and
/// dots made `_` up to an array bracket; an unclosed `[` is made `_` and ends the conversion.
fn php_name(key: &str) -> Cow<'_, str> {
    let key = key.trim_start_matches(' ');
    if !key.contains([' ', '.', '[']) {
        return Cow::Borrowed(key);
    }
    let mut out = String::with_capacity(key.len());
    for (i, c) in key.char_indices() {
        match c {
            ' ' | '.' => out.push('_'),
            '[' if key[i..].contains(']') => break,
            '[' => {
                out.push('_');
                out.push_str(&key[i + 1..]);
                break;
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// What name converters and PHP read as word separators.
fn is_separator(c: char) -> bool {
    matches!(c, '_' | '-' | '.' | ' ')
}

/// True when a backend could take `key` for `name`: the same name in any case (ASP.NET, Go's
/// encoding/json, which also folds `ſ` (U+017F) to `s` and the Kelvin sign to `k`), or with
/// separators (`_`, `-`, `.`, ` `) anywhere (`instance_id`, `_instanceId`, `instance.id`: what
/// camelCase converters in front of a handler read as `instanceId`). Leading separators count
/// only for a name that starts with one (`_method`).
fn same_name_to_some_backend(key: &str, name: &str) -> bool {
    if key.eq_ignore_ascii_case(name) {
        return true;
    }
    let keep_leading = name.starts_with(is_separator);
    folded(key, keep_leading).eq(folded(name, keep_leading))
}

/// [`same_name_to_some_backend`] for a JSON member name, read up to a NUL as a parser built
/// on C strings reads it (`"instanceId\u0000"` is `instanceId` there).
fn same_member_to_some_backend(key: &str, name: &str) -> bool {
    same_name_to_some_backend(key.split('\0').next().unwrap_or(key), name)
}

/// `s` case-folded (each character upper-cased, then lower-cased) without its separators,
/// leading ones kept when `keep_leading`.
fn folded(s: &str, keep_leading: bool) -> impl Iterator<Item = char> + '_ {
    let lead = if keep_leading {
        s.len() - s.trim_start_matches(is_separator).len()
    } else {
        0
    };
    let (head, rest) = s.split_at(lead);
    head.chars()
        .chain(rest.chars().filter(|c| !is_separator(*c)))
        .flat_map(char::to_uppercase)
        .flat_map(char::to_lowercase)
}

/// The value of query parameter `name`, percent-decoded (`+` as a space); `Ok(None)` when
/// absent. Refused when the name appears twice (in any case, or as an array or object
/// member), the query holds a `;`, or more than [`MAX_INSPECTED_PARAMS`] parameters.
pub(crate) fn query_param(query: Option<&str>, name: &str) -> Result<Option<String>, Ambiguity> {
    let Some(query) = query else { return Ok(None) };
    if query.contains(';') {
        return Err(Ambiguity::Semicolon);
    }
    if query.split('&').count() > MAX_INSPECTED_PARAMS {
        return Err(Ambiguity::TooManyParameters);
    }
    let mut found: Option<String> = None;
    let mut seen = 0usize;
    // application/x-www-form-urlencoded, as the backends parse it: `+` is a space.
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        // What a second decoding would name counts beside the real one, and is never it.
        // A key read as the name directly and again after a second decoding is one reading.
        let direct = same_parameter_to_some_backend(&k, name);
        let key = direct || names_when_decoded_again(&k, name);
        seen += usize::from(key) + usize::from(names_when_decoded_again(&v, name));
        if seen > 1 {
            return Err(Ambiguity::Duplicate);
        }
        if direct && k == name {
            found = Some(v.into_owned());
        }
    }
    Ok(found)
}

/// True when the query string has a parameter some backend could take for `name` (a body
/// field of that name would then not be the only place it is read from).
pub(crate) fn query_names(query: Option<&str>, name: &str) -> bool {
    // Split at ';' too: some parsers do, and this answer must hold for all of them.
    query.is_some_and(|q| {
        q.split(';').any(|part| {
            form_urlencoded::parse(part.as_bytes()).any(|(k, v)| {
                same_parameter_to_some_backend(&k, name)
                    || names_when_decoded_again(&k, name)
                    || names_when_decoded_again(&v, name)
            })
        })
    })
}

/// True when the query names `name` more than once as the backends read names (every reading
/// [`query_param`] counts), whatever else it holds (`;`, any number of parameters): the
/// duplicate rule that holds for every key.
pub(crate) fn query_names_twice(query: Option<&str>, name: &str) -> bool {
    let Some(query) = query else { return false };
    let mut seen = 0usize;
    for part in query.split(';') {
        for (k, v) in form_urlencoded::parse(part.as_bytes()) {
            let key =
                same_parameter_to_some_backend(&k, name) || names_when_decoded_again(&k, name);
            seen += usize::from(key) + usize::from(names_when_decoded_again(&v, name));
            if seen > 1 {
                return true;
            }
        }
    }
    false
}

/// The query's escapes, for a restricted key's inspected query: `Err(BadEscape)` when one is
/// not `%` and two hex digits (`%u0049` is `I` to .NET).
pub(crate) fn query_escapes(query: Option<&str>) -> Result<(), Ambiguity> {
    match query {
        Some(q) if has_bad_escape(q) => Err(Ambiguity::BadEscape),
        _ => Ok(()),
    }
}

/// True when the query string carries a `_method` parameter (in any case): the method
/// override of Rack, Laravel and Symfony, which would turn a request into another method than
/// the one its route policy was matched on.
pub(crate) fn has_method_override(query: Option<&str>) -> bool {
    // No '_', no character PHP turns into one, no percent-encoding: no override. The common
    // case costs one scan.
    query.is_some_and(|q| {
        q.bytes()
            .any(|b| matches!(b, b'_' | b'.' | b'[' | b'+' | b'%'))
    }) && query_names(query, "_method")
}

/// True when the request comes with a body: declared or chunked in HTTP/1.1, or an HTTP/2
/// stream not ended with its headers (h2 needs neither Content-Length nor chunking).
pub(crate) fn has_body(session: &mut ServerSession) -> bool {
    !session.is_body_empty()
}

/// Why a body could not be read for its field.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BodyError {
    NotAJsonObject,
    Ambiguous(Ambiguity),
}

/// The string value of top-level field `field` of a JSON object; `Ok(None)` when absent or not
/// a string. Other fields are skipped, never materialised. Keys are compared once decoded
/// (`"instance\u0049d"` is `instanceId`); a second key that some backend reads as `field` is
/// an ambiguity, and so is one nested at any depth with another value than the top-level one:
/// Rails' `wrap_parameters` leaves `{"message": {...}}` as it is, and a controller reading
/// `params.require(:message)` takes the nested copy.
pub(crate) fn body_field(body: &[u8], field: &str) -> Result<Option<String>, BodyError> {
    match read_field(body, field, Depth::Nested)? {
        FieldFound {
            seen: 0 | 1,
            value,
            nested,
        } if nested.iter().all(|n| n.is_some() && *n == value) => Ok(value),
        FieldFound { .. } => Err(BodyError::Ambiguous(Ambiguity::Duplicate)),
    }
}

/// True when a JSON object body has a top-level key some backend reads as `field`, whatever
/// its value (Laravel runs a POST as the method a JSON body's `_method` names).
pub(crate) fn body_names(body: &[u8], field: &str) -> Result<bool, BodyError> {
    Ok(read_field(body, field, Depth::Top)?.seen > 0)
}

/// As [`body_names`], at any depth.
pub(crate) fn body_names_anywhere(body: &[u8], field: &str) -> Result<bool, BodyError> {
    let found = read_field(body, field, Depth::Nested)?;
    Ok(found.seen > 0 || !found.nested.is_empty())
}

/// How deep a body is searched for a field.
#[derive(Clone, Copy)]
enum Depth {
    Top,
    Nested,
}

fn read_field(body: &[u8], field: &str, depth: Depth) -> Result<FieldFound, BodyError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let found = FieldSeed(field, depth)
        .deserialize(&mut de)
        .map_err(|_| BodyError::NotAJsonObject)?;
    de.end().map_err(|_| BodyError::NotAJsonObject)?;
    Ok(found)
}

/// What a body said about the field: how many top-level keys read as it, the string value of
/// the one spelled exactly so, and (when searched) the values of keys read as it below the top
/// level (`None` for one that is not a string).
struct FieldFound {
    seen: usize,
    value: Option<String>,
    nested: Vec<Option<String>>,
}

struct FieldSeed<'a>(&'a str, Depth);

impl<'de> DeserializeSeed<'de> for FieldSeed<'_> {
    type Value = FieldFound;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FieldSeed<'_> {
    type Value = FieldFound;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        let mut seen = 0usize;
        let mut nested = Vec::new();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if same_member_to_some_backend(&key, self.0) {
                seen += 1;
                if key == self.0 {
                    found = map.next_value_seed(StrValue)?;
                    continue;
                }
            }
            match self.1 {
                Depth::Top => map.next_value::<IgnoredAny>()?,
                Depth::Nested => map.next_value_seed(Nested {
                    field: self.0,
                    out: &mut nested,
                })?,
            };
        }
        // The whole document is still read to the end: a malformed tail is refused too.
        Ok(FieldFound {
            seen,
            value: found,
            nested,
        })
    }
}

/// A value read as its string, when it is one: anything else is skipped, never materialised.
struct StrValue;

impl<'de> DeserializeSeed<'de> for StrValue {
    type Value = Option<String>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrValue {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(v.to_owned()))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// Walks a value below the top level, collecting the values of keys some backend reads as
/// `field` (serde_json bounds the depth at 128).
struct Nested<'a, 'b> {
    field: &'a str,
    out: &'b mut Vec<Option<String>>,
}

impl<'de> DeserializeSeed<'de> for Nested<'_, '_> {
    type Value = IgnoredAny;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Nested<'_, '_> {
    type Value = IgnoredAny;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if same_member_to_some_backend(&key, self.field) {
                let value = map.next_value_seed(StrValue)?;
                self.out.push(value);
                continue;
            }
            map.next_value_seed(Nested {
                field: self.field,
                out: &mut *self.out,
            })?;
        }
        Ok(IgnoredAny)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq
            .next_element_seed(Nested {
                field: self.field,
                out: &mut *self.out,
            })?
            .is_some()
        {}
        Ok(IgnoredAny)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(IgnoredAny)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(IgnoredAny)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(IgnoredAny)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(IgnoredAny)
    }

    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(IgnoredAny)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(IgnoredAny)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn segments_and_queries() {
        assert_eq!(path_segment("/api/v1/instances/abc/qr", 3), Some("abc"));
        assert_eq!(path_segment("/api/v1/instances/", 3), None);
        let q = |s: &str| query_param(Some(s), "instanceId");
        assert_eq!(q("a=1&instanceId=x%2Dy&b"), Ok(Some("x-y".into())));
        assert_eq!(q("instanceIdx=1"), Ok(None));
        assert_eq!(query_param(None, "instanceId"), Ok(None));
        assert_eq!(q("instanceId=A&instanceId=B"), Err(Ambiguity::Duplicate));
        assert_eq!(q("instanceId=A&instance%49d=B"), Err(Ambiguity::Duplicate));
        assert_eq!(q("instanceId=A&InstanceID=B"), Err(Ambiguity::Duplicate));
        assert_eq!(q("instanceId=A;instanceId=B"), Err(Ambiguity::Semicolon));
        assert_eq!(q("instanceId=A&instanceId[]=B"), Err(Ambiguity::Duplicate));
        assert_eq!(q("instanceId[0]=B&instanceId=A"), Err(Ambiguity::Duplicate));
        assert_eq!(q("instanceId=A&INSTANCEID.x=B"), Err(Ambiguity::Duplicate));
        assert_eq!(q("instanceIds=B&instanceId=A"), Ok(Some("A".into())));
        let many = format!("{}&instanceId=A", "x=1&".repeat(100));
        assert_eq!(q(&many), Err(Ambiguity::TooManyParameters));
        assert!(has_method_override(Some("a=1&_Method=GET")));
        assert!(has_method_override(Some("_method")));
        assert!(!has_method_override(Some("method=GET&x_method=1")));
        // Bracket-led (qs, Rack), PHP's spellings, inner separators.
        assert_eq!(q("[instanceId]=B&instanceId=A"), Err(Ambiguity::Duplicate));
        assert_eq!(q("instanceId=A&+instanceId=B"), Err(Ambiguity::Duplicate));
        assert_eq!(q("instanceId=A&instance_id=B"), Err(Ambiguity::Duplicate));
        assert_eq!(q("instanceId=A&x_instanceId=B"), Ok(Some("A".into())));
        assert_eq!(q("instanceId=A&_instanceId=B"), Err(Ambiguity::Duplicate));
        assert_eq!(q("instanceId=A&instance.id=B"), Err(Ambiguity::Duplicate));
        assert_eq!(q("instanceId=A&instance+id=B"), Err(Ambiguity::Duplicate));
        for spelled in [
            ".method",
            "%2Emethod",
            "[method",
            "[_method]",
            "+_method",
            "_METHOD[]",
        ] {
            assert!(has_method_override(Some(spelled)), "{spelled}");
        }
        assert!(!has_method_override(Some("__method=1&a.b=2")));
        assert_eq!(php_name(" a.b c[d]"), "a_b_c");
        assert_eq!(php_name("a[b.c"), "a_b.c");
        assert!(query_names(Some("instanceId[]=1"), "instanceId"));
        assert!(!query_names(None, "instanceId"));
        // A spelling only a case-insensitive backend reads is not ours: nothing named.
        assert_eq!(q("InstanceId=A"), Ok(None));
        // A prefixed member (ASP.NET Core's `[FromQuery] query` model), Spring's `!` default.
        assert_eq!(
            q("query.instanceId=B&instanceId=A"),
            Err(Ambiguity::Duplicate)
        );
        assert_eq!(
            q("a[b][instanceId]=B&instanceId=A"),
            Err(Ambiguity::Duplicate)
        );
        assert_eq!(q("instanceId=A&!instanceId=B"), Err(Ambiguity::Duplicate));
        assert!(query_names(Some("filter.instanceId=B"), "instanceId"));
        // What a second decoding names (a key, or a value that splits into one).
        assert_eq!(
            q("instance%2549d=B&instanceId=A"),
            Err(Ambiguity::Duplicate)
        );
        assert_eq!(
            q("instanceId=A&x=a%26instanceId%3DB"),
            Err(Ambiguity::Duplicate)
        );
        assert_eq!(
            q("instanceId=a%26instanceId%3DB"),
            Err(Ambiguity::Duplicate)
        );
        assert_eq!(q("instanceId=A&x=a%26b%3Dc"), Ok(Some("A".into())));
        assert!(query_names(Some("x=1%26instance_id%3D2"), "instanceId"));
        assert_eq!(
            q("instance%25u0049d=B&instanceId=A"),
            Err(Ambiguity::Duplicate)
        );
        assert_eq!(
            q("instanceId=A&x=a%26instance%25u0049d%3DB"),
            Err(Ambiguity::Duplicate)
        );
        assert_eq!(q("instanceId=A&x=%25u+049"), Ok(Some("A".into())));
        assert_eq!(
            dotnet_unescaped("a%u00e9%U0041%u12"),
            Some("aéA%u12".into())
        );
        assert_eq!(dotnet_unescaped("é%41"), None);
        // The duplicate rule for every key holds whatever else the query holds.
        let twice = |s: &str| query_names_twice(Some(s), "instanceId");
        assert!(twice("instanceId=A&instanceId=B;x"));
        assert!(twice("instanceId=A;instance_id=B"));
        assert!(twice(&format!(
            "{}instanceId=A&instanceId=B",
            "x=1&".repeat(200)
        )));
        assert!(!twice("instanceId=A;x=1&y=100%"));
        assert!(!query_names_twice(None, "instanceId"));
        // One key read two ways is still one parameter.
        assert!(!twice("instanceId[%2B]=1;x"));
        assert_eq!(q("instanceId[%2B]=1"), Ok(None));
        // `%u0049` is `I` to .NET: refused before reading.
        assert_eq!(
            query_escapes(Some("instance%u0049d=B")),
            Err(Ambiguity::BadEscape)
        );
        assert_eq!(query_escapes(Some("a=100%")), Err(Ambiguity::BadEscape));
        assert_eq!(query_escapes(Some("a=%4")), Err(Ambiguity::BadEscape));
        assert_eq!(query_escapes(Some("a=%41%2f")), Ok(()));
        assert_eq!(query_escapes(None), Ok(()));
        // Cookies and header fields a backend binds as input.
        let headers = |pairs: &[(&str, &str)]| {
            let mut h = http::HeaderMap::new();
            for (n, v) in pairs {
                h.append(
                    http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    http::HeaderValue::from_str(v).unwrap(),
                );
            }
            h
        };
        let named =
            |pairs: &[(&str, &str)]| named_by_cookie_or_header(&headers(pairs), "instanceId");
        assert!(named(&[("cookie", "a=1; instanceId=B")]));
        assert!(named(&[("cookie", "instance%49d=B")]));
        assert!(named(&[("cookie", "INSTANCE_ID=B")]));
        assert!(named(&[("instance-id", "B")]));
        assert!(named(&[("InstanceId", "B")]));
        assert!(!named(&[
            ("cookie", "session=instanceId"),
            ("x-instance-id", "B")
        ]));
        assert!(!named_by_cookie_or_header(
            &headers(&[("cookie", "a=1")]),
            ""
        ));
    }

    #[test]
    fn body_fields() {
        let body = br#"{"to":"+33","nested":{"instanceId":"3fa85f64-5717-4562-b3fc-2c963f66afa6"},"instanceId":"3fa85f64-5717-4562-b3fc-2c963f66afa6"}"#;
        assert_eq!(
            body_field(body, "instanceId").unwrap().as_deref(),
            Some("3fa85f64-5717-4562-b3fc-2c963f66afa6")
        );
        assert_eq!(body_field(br#"{"instanceId":7}"#, "instanceId"), Ok(None));
        assert_eq!(body_field(br#"{"a":"\u00e9"}"#, "instanceId"), Ok(None));
        let not_object = Err(BodyError::NotAJsonObject);
        assert_eq!(body_field(b"[1,2]", "instanceId"), not_object);
        assert_eq!(body_field(b"{\"a\":1} trailing", "instanceId"), not_object);
        assert_eq!(body_field(b"", "instanceId"), not_object);
        let twice = Err(BodyError::Ambiguous(Ambiguity::Duplicate));
        for dup in [
            r#"{"instanceId":"A","instanceId":"B"}"#,
            r#"{"instanceId":"A","instance\u0049d":"B"}"#,
            r#"{"instanceId":"A","INSTANCEID":"B"}"#,
            r#"{"instanceId":"A","in\u017ftanceId":"B"}"#,
            r#"{"instanceId":"A","instanceId":7}"#,
            r#"{"instanceId":"A","instance_id":"B"}"#,
            r#"{"instance-Id":"B","instanceId":"A"}"#,
            r#"{"instanceId":"A","_instance_id":"B"}"#,
            r#"{"instanceId":"A","instance.id":"B"}"#,
            r#"{"instanceId":"A","instance id":"B"}"#,
            // Read up to a NUL, as a C-string parser reads a name.
            r#"{"instanceId\u0000x":"B","instanceId":"A"}"#,
            // Nested at any depth with another value, or under no top-level one.
            r#"{"to":"+33","nested":{"instanceId":"B"},"instanceId":"A"}"#,
            r#"{"instanceId":"A","x":[[{"Instance_Id":"B"}]]}"#,
            r#"{"instanceId":"A","x":{"instanceId":null}}"#,
            r#"{"x":{"instanceId":"A"}}"#,
        ] {
            assert_eq!(body_field(dup.as_bytes(), "instanceId"), twice, "{dup}");
        }
    }

    #[test]
    fn body_names_finds_a_field_whatever_its_value() {
        for body in [
            r#"{"_method":"GET"}"#,
            r#"{"a":1,"_Method":null}"#,
            r#"{"\u005fmethod":7}"#,
            r#"{"_method":1,"_method":2}"#,
        ] {
            assert_eq!(body_names(body.as_bytes(), "_method"), Ok(true), "{body}");
        }
        for body in [r#"{"method":"GET"}"#, r#"{"x":{"_method":"GET"}}"#, "{}"] {
            assert_eq!(body_names(body.as_bytes(), "_method"), Ok(false), "{body}");
        }
        // At any depth, for a field a path segment names.
        for body in [
            r#"{"a":[{"b":{"instance_id":1}}]}"#,
            r#"{"instanceId":"x"}"#,
        ] {
            assert_eq!(
                body_names_anywhere(body.as_bytes(), "instanceId"),
                Ok(true),
                "{body}"
            );
        }
        for body in [r#"{"a":["instanceId"]}"#, r#"{"a":{"instance":1}}"#, "{}"] {
            assert_eq!(
                body_names_anywhere(body.as_bytes(), "instanceId"),
                Ok(false),
                "{body}"
            );
        }
        assert_eq!(body_names(b"[]", "_method"), Err(BodyError::NotAJsonObject));
        assert_eq!(q_nul(), Err(Ambiguity::Duplicate));
    }

    fn q_nul() -> Result<Option<String>, Ambiguity> {
        query_param(Some("instanceId=A&instanceId%00x=B"), "instanceId")
    }

    /// Keys to build objects from: the field, its escaped and case-folded spellings, others.
    fn key_strategy() -> impl Strategy<Value = (String, String)> {
        // (as written in JSON, as decoded)
        prop_oneof![
            Just(("instanceId".to_owned(), "instanceId".to_owned())),
            Just(("instance\\u0049d".to_owned(), "instanceId".to_owned())),
            Just(("\\u0069nstanceId".to_owned(), "instanceId".to_owned())),
            Just(("InstanceId".to_owned(), "InstanceId".to_owned())),
            Just(("instanceid".to_owned(), "instanceid".to_owned())),
            Just(("to".to_owned(), "to".to_owned())),
            Just(("text".to_owned(), "text".to_owned())),
            Just(("instance".to_owned(), "instance".to_owned())),
        ]
    }

    fn value_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(r#""3fa85f64-5717-4562-b3fc-2c963f66afa6""#.to_owned()),
            Just(r#""B""#.to_owned()),
            Just("7".to_owned()),
            Just("null".to_owned()),
            Just(r#"{"instanceId":"nested"}"#.to_owned()),
            Just(r#"["x"]"#.to_owned()),
        ]
    }

    proptest! {
        /// Against serde_json::Value (which keeps the last of duplicate keys): with one
        /// spelling of the field at most and no nested copy, both read the same; otherwise
        /// the reader refuses.
        #[test]
        fn body_field_agrees_with_serde_json_or_refuses(
            entries in proptest::collection::vec((key_strategy(), value_strategy()), 0..6)
        ) {
            let body = format!(
                "{{{}}}",
                entries
                    .iter()
                    .map(|((written, _), v)| format!("\"{written}\":{v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            let ours = body_field(body.as_bytes(), "instanceId");
            let lookalikes = entries
                .iter()
                .filter(|((_, decoded), _)| decoded.eq_ignore_ascii_case("instanceId"))
                .count();
            // A nested copy (any value but the exact field's own) is a second reading too.
            let nested = entries
                .iter()
                .any(|((_, decoded), v)| decoded != "instanceId" && v.starts_with('{'));
            if lookalikes > 1 || nested {
                prop_assert_eq!(ours, Err(BodyError::Ambiguous(Ambiguity::Duplicate)), "{}", body);
            } else {
                let reference: serde_json::Value = serde_json::from_str(&body).unwrap();
                let expected = reference["instanceId"].as_str().map(str::to_owned);
                prop_assert_eq!(ours, Ok(expected), "{}", body);
            }
        }

        #[test]
        fn body_field_never_panics(body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = body_field(&body, "instanceId");
        }
    }
}
