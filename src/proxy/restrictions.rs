//! Check 5 of the public API (SPEC §2–3): the key's scopes and instances against what the
//! route policy declares, and whatever in the request a backend could read differently from
//! the gateway. Deny by default: a restricted key passes only a policy that says how the
//! restriction applies, and only a request the gateway reads as the backend will.

use crate::auth::Principal;
use crate::body_type;
use crate::errors::GatewayError;
use crate::inspect::{self, Ambiguity, BodyError};
use crate::live::Live;
use crate::policy::{InstanceSource, RoutePolicy, ScopeRule};
use pingora::proxy::Session;

/// Whether check 5 read the request's body: it waited on the client, for as long as the
/// client took, so what was looked up before it may have changed meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyRead {
    No,
    Yes,
}

/// Runs check 5 for `principal` on a request matched to `policy`.
pub(crate) async fn check(
    live: &Live,
    session: &mut Session,
    principal: &Principal,
    policy: Option<&RoutePolicy>,
    path: &str,
) -> Result<BodyRead, GatewayError> {
    let key = &principal.key;
    let source = policy.and_then(|p| p.instance.as_ref());
    // An inspected route's body is bounded for every key (SPEC §6: 413), though only an
    // instance-restricted key's is read: by its declared length here, and a body without one
    // is counted as it is forwarded (`Ctx::body_allowance`).
    if matches!(source, Some(InstanceSource::Body(_)))
        && inspect::declared_length(session).is_some_and(|n| n > live.config.server.max_body_bytes)
    {
        return Err(GatewayError::payload_too_large());
    }
    if key.scopes.is_empty() && key.instance_ids.is_empty() {
        // Nothing to hold the key to, but the parameter a route reads its instance from is
        // never handed on twice, for any key (SPEC §2: a duplicated query parameter is 400),
        // whatever else the query holds. The rest of a restricted key's query rules (`;`, 100
        // parameters, escapes, a body beside) and every body rule are for restricted keys
        // only: an unrestricted send is never held up.
        if let Some(InstanceSource::Query(name)) = source {
            if inspect::query_names_twice(session.req_header().uri.query(), name) {
                return Err(GatewayError::duplicate_parameter(name));
            }
        }
        return Ok(BodyRead::No);
    }
    scopes(&key.scopes, policy)?;
    let limit = BodyLimit {
        bytes: live.config.server.max_inspected_body_bytes,
        idle: live.config.server.body_idle_timeout,
    };
    let instance = match (key.instance_ids.is_empty(), source) {
        (true, _) | (false, Some(InstanceSource::InstanceFree)) => {
            return no_body_override(session, limit).await
        }
        (false, None) => return Err(GatewayError::instance_source_undeclared()),
        (false, Some(source))
            if inspect::named_by_cookie_or_header(&session.req_header().headers, source.name()) =>
        {
            return Err(GatewayError::instance_beside_request(source.name()))
        }
        (false, Some(InstanceSource::PathSegment { segment, name })) => {
            let read = nothing_beside_path(session, name, limit).await?;
            (
                inspect::path_segment(path, *segment).map(str::to_owned),
                read,
            )
        }
        (false, Some(InstanceSource::Query(name))) => (from_query(session, name)?, BodyRead::No),
        (false, Some(InstanceSource::Body(field))) => {
            (from_body(session, field, limit).await?, BodyRead::Yes)
        }
    };
    match instance {
        (Some(id), read) if key.instance_ids.iter().any(|i| **i == *id) => Ok(read),
        (Some(id), _) => Err(GatewayError::instance_not_allowed(&id)),
        (None, _) => Err(GatewayError::instance_missing()),
    }
}

/// A key with scopes passes a route whose policy names one of them, or says none is needed.
fn scopes(granted: &[Box<str>], policy: Option<&RoutePolicy>) -> Result<(), GatewayError> {
    if granted.is_empty() {
        return Ok(());
    }
    match policy.and_then(|p| p.scope.as_ref()) {
        Some(ScopeRule::NotNeeded) => Ok(()),
        Some(ScopeRule::Required(scope)) if granted.iter().any(|s| **s == **scope) => Ok(()),
        Some(ScopeRule::Required(scope)) => Err(GatewayError::scope_missing(scope)),
        None => Err(GatewayError::scope_undeclared()),
    }
}

/// Rack, Symfony and Laravel run a POST as the method a `_method` in its body names: from a
/// form (Rack takes a body without `Content-Type` for one), and in Laravel from a JSON body
/// too. A restricted key's POST body must be empty or plain JSON without that field, or the
/// backend could run another method than the policy was matched on.
async fn no_body_override(
    session: &mut Session,
    limit: BodyLimit,
) -> Result<BodyRead, GatewayError> {
    if session.req_header().method != http::Method::POST || !inspect::has_body(session) {
        return Ok(BodyRead::No);
    }
    let plain_json = body_type::is_plain_json(&session.req_header().headers);
    // Read whatever the type: a stream that may carry a body (chunked, HTTP/2) can turn out
    // empty, and an empty body carries nothing.
    let body = read_body(session, limit).await?;
    match (body.is_empty(), plain_json) {
        (true, _) => Ok(BodyRead::Yes),
        (false, false) => Err(GatewayError::restricted_body_not_json()),
        (false, true) => method_field(&body).map(|()| BodyRead::Yes),
    }
}

/// On a route whose instance is a path segment, a backend may read `name` from the query or
/// the body instead (Laravel's `$request->instanceId` prefers input to the route parameter;
/// Spring binds a request parameter over a URI variable): neither may name it. A body, on any
/// method, must be empty or plain JSON without that field (nor `_method` on a POST).
async fn nothing_beside_path(
    session: &mut Session,
    name: &str,
    limit: BodyLimit,
) -> Result<BodyRead, GatewayError> {
    let query = session.req_header().uri.query();
    if inspect::query_escapes(query).is_err() {
        return Err(GatewayError::bad_escape_in_query(name));
    }
    if inspect::query_names(query, name) {
        return Err(GatewayError::query_beside_path(name));
    }
    if !inspect::has_body(session) {
        return Ok(BodyRead::No);
    }
    let plain_json = body_type::is_plain_json(&session.req_header().headers);
    let body = read_body(session, limit).await?;
    if body.is_empty() {
        return Ok(BodyRead::Yes);
    }
    if !plain_json {
        return Err(GatewayError::body_beside_path_not_json(name));
    }
    match inspect::body_names_anywhere(&body, name) {
        Ok(false) => {}
        Ok(true) | Err(BodyError::Ambiguous(_)) => {
            return Err(GatewayError::body_beside_path(name))
        }
        Err(BodyError::NotAJsonObject) => return Err(GatewayError::body_not_json_object()),
    }
    if session.req_header().method == http::Method::POST {
        method_field(&body)?;
    }
    Ok(BodyRead::Yes)
}

/// Refuses a JSON body with a top-level `_method` (in any spelling a backend reads as it).
fn method_field(body: &[u8]) -> Result<(), GatewayError> {
    match inspect::body_names(body, "_method") {
        Ok(false) => Ok(()),
        Ok(true) | Err(BodyError::Ambiguous(_)) => Err(GatewayError::method_override_in_body()),
        Err(BodyError::NotAJsonObject) => Err(GatewayError::body_not_json_object()),
    }
}

/// The instance named by query parameter `name`; the request may have no body, which could
/// name it too (Laravel's `input()` merges both).
fn from_query(session: &mut Session, name: &str) -> Result<Option<String>, GatewayError> {
    if inspect::has_body(session) {
        return Err(GatewayError::body_beside_query(name));
    }
    let query = session.req_header().uri.query();
    inspect::query_escapes(query)
        .and_then(|()| inspect::query_param(query, name))
        .map_err(|why| match why {
            Ambiguity::Duplicate => GatewayError::duplicate_parameter(name),
            Ambiguity::Semicolon => GatewayError::semicolon_in_query(name),
            Ambiguity::TooManyParameters => GatewayError::too_many_parameters(name),
            Ambiguity::BadEscape => GatewayError::bad_escape_in_query(name),
        })
}

/// The instance named by top-level JSON field `field`; the query may not name it too, and the
/// bytes read must be the document the backend parses: JSON in UTF-8, not decoded from
/// another charset or a content coding first.
async fn from_body(
    session: &mut Session,
    field: &str,
    limit: BodyLimit,
) -> Result<Option<String>, GatewayError> {
    let query = session.req_header().uri.query();
    if inspect::query_escapes(query).is_err() {
        return Err(GatewayError::bad_escape_in_query(field));
    }
    if inspect::query_names(query, field) {
        return Err(GatewayError::query_beside_body(field));
    }
    if !body_type::is_plain_json(&session.req_header().headers) {
        return Err(GatewayError::body_not_plain_json(field));
    }
    let body = read_body(session, limit).await?;
    let instance = inspect::body_field(&body, field).map_err(|e| match e {
        BodyError::NotAJsonObject => GatewayError::body_not_json_object(),
        BodyError::Ambiguous(_) => GatewayError::duplicate_field(field),
    })?;
    if session.req_header().method == http::Method::POST {
        method_field(&body)?;
    }
    Ok(instance)
}

/// How much of a body the gateway reads, and how long each read may wait.
#[derive(Debug, Clone, Copy)]
struct BodyLimit {
    bytes: usize,
    idle: std::time::Duration,
}

/// Reads the whole body (at most `limit.bytes`) into pingora's replay buffer, from which it
/// is forwarded unchanged.
async fn read_body(session: &mut Session, limit: BodyLimit) -> Result<Vec<u8>, GatewayError> {
    session.enable_retry_buffering();
    inspect::read_body(session, limit.bytes, limit.idle).await
}
