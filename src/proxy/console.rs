//! The console surface: Bearer JWTs, and the key-management endpoints the gateway serves itself.

use super::auth_failures::AuthFailures;
use super::Identity;
use crate::errors::GatewayError;
use crate::gateway::Gateway;
use crate::live::Live;
use http::{HeaderValue, Method};
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use std::net::IpAddr;

/// Verifies the console token of a request from `client` (its per-client limit key): the
/// account it speaks for, and the identity to forward. Failures count toward the client's
/// limit on failed authentications; over it, only a token verified before is accepted.
pub(crate) fn authenticate(
    gw: &Gateway,
    live: &Live,
    req: &RequestHeader,
    client: Option<IpAddr>,
) -> Result<(String, Identity), GatewayError> {
    let failures = AuthFailures::new(gw, live, client);
    let invalid = || failures.failed(GatewayError::invalid_token());
    let mut values = req.headers.get_all(http::header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        if req.headers.contains_key(http::header::AUTHORIZATION) {
            // Two credentials: the backend might read the one not verified here.
            return Err(invalid());
        }
        return Err(if req.headers.contains_key("x-api-key") {
            GatewayError::api_key_on_console()
        } else {
            GatewayError::missing_bearer()
        });
    };
    let bytes = value.as_bytes();
    if bytes.len() <= 7 || !bytes[..7].eq_ignore_ascii_case(b"bearer ") {
        return Err(invalid());
    }
    let Ok(token) = std::str::from_utf8(&bytes[7..]) else {
        return Err(invalid());
    };
    // Spaces and tabs around it only: `str::trim` would also take Unicode spaces (U+3000,
    // U+00A0) that the backend, which gets the header as sent, would not.
    let token = token.trim_matches([' ', '\t']);
    let verified = live
        .jwt
        .verify_if(token, gw.clock.now_unix(), || failures.refused().is_none());
    let id = match verified {
        Ok(Some(id)) => id,
        Ok(None) => {
            return Err(failures
                .refused()
                .unwrap_or_else(GatewayError::invalid_token))
        }
        Err(why) => {
            tracing::debug!(reason = %why, "console token refused");
            // A guess is a token no key of the issuer signed. One it did sign (expired, not
            // yet valid, for another audience) is a browser behind on its session, and counting
            // it would lock out the fresh tokens of everyone behind the same address.
            return Err(if why.is_signed() {
                GatewayError::invalid_token()
            } else {
                invalid()
            });
        }
    };
    // Claims become trusted header values: the account must be an id as accounts are named
    // (no space, no byte a backend may trim, fold or split on), the user visible ASCII.
    if !crate::store::valid_id(&id.account_id)
        || id.user_id.as_deref().is_some_and(|u| !is_plain_user_id(u))
    {
        return Err(GatewayError::invalid_token());
    }
    let value = |s: &str| HeaderValue::from_str(s).map_err(|_| GatewayError::invalid_token());
    let identity = Identity {
        account_id: value(&id.account_id)?,
        key_id: None,
        user_id: id.user_id.as_deref().map(value).transpose()?,
        restrictions: None,
    };
    Ok((id.account_id.clone(), identity))
}

/// A user id (`sub`) forwarded as `x-user-id`: 1–256 bytes of visible ASCII (e-mail addresses
/// and provider ids such as `auth0|123` pass; spaces, controls and non-ASCII do not), none of
/// them a byte a backend splits a header value or a parameter on (`,` `;`) or quotes with
/// (`"` `\`): `u1,u2` would be two users to a backend that reads the header as a list.
fn is_plain_user_id(id: &str) -> bool {
    (1..=256).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b',' | b';' | b'"' | b'\\'))
}

/// A key-management call under `/api/api-keys`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum KeyCall {
    List,
    Create,
    Revoke(String),
}

/// Recognises `/api/api-keys` calls on whole path segments (`/api/api-keysX` is not one);
/// `Some(Err)` for a known path with a wrong method or too many segments.
pub(crate) fn key_call(method: &Method, path: &str) -> Option<Result<KeyCall, GatewayError>> {
    const PREFIX: &str = "/api/api-keys";
    let head = path.get(..PREFIX.len())?;
    if !head.eq_ignore_ascii_case(PREFIX) {
        return None;
    }
    let rest = &path[PREFIX.len()..];
    let whole_segment = rest.is_empty() || rest.starts_with(['/', '.']);
    if head != PREFIX && whole_segment {
        // A backend routing without regard to case would take it for the gateway's own
        // endpoint, and serve it without the plan cap or the write limit.
        return Some(Err(GatewayError::ambiguous_path(
            crate::path::PathError::CaseChangesRoute,
        )));
    }
    let not_a_call = || Some(Err(GatewayError::no_such_key_call()));
    let id = match rest {
        "" | "/" => None,
        // A format suffix (`/api/api-keys.json`, as Rails routes it): the same endpoint.
        _ if rest.starts_with('.') => return not_a_call(),
        _ => match rest.strip_prefix('/') {
            None => return None,
            Some(id) if id.contains('/') => return not_a_call(),
            Some(id) => Some(id),
        },
    };
    let call = match (method, id) {
        (&Method::GET, None) => KeyCall::List,
        (&Method::POST, None) => KeyCall::Create,
        (&Method::DELETE, Some(id)) => KeyCall::Revoke(id.to_owned()),
        _ => return not_a_call(),
    };
    Some(Ok(call))
}

/// Key creations and revocations one account may make through the console, per minute and
/// node: a token holder cannot drive unbounded writes (and fsyncs) into the store.
pub(crate) const KEY_WRITES_PER_MINUTE: u32 = 10;
/// The most of a plan's key cap the write bucket's burst makes room for.
const MAX_WRITE_BURST_CAP: u32 = 100;

/// Key listings one account may ask for through the console, per minute and node (a burst of
/// as many): a listing reads every record the account keeps (up to its cap and 100 revoked ones),
/// and a token holder could otherwise keep the store reading them in a loop.
pub(crate) const KEY_READS_PER_MINUTE: u32 = 60;

/// Serves a key-management call for the token's account: (status, JSON body).
pub(crate) async fn serve(
    gw: &Gateway,
    live: &Live,
    session: &mut Session,
    account_id: &str,
    call: KeyCall,
) -> Result<(u16, Vec<u8>), GatewayError> {
    let now_ns = gw.clock.now_ns();
    let secs = super::headers::ceil_secs;
    if matches!(call, KeyCall::Create | KeyCall::Revoke(_)) {
        let every_ns = 60_000_000_000 / u64::from(KEY_WRITES_PER_MINUTE);
        // An account may fill its plan's cap in one go, be told truthfully that it is full
        // (403 API_KEY_LIMIT_REACHED), revoke every key and make every one again (rotating
        // them all at once: 3 × cap + 1), with room to spare; a cap past 100 (an unusual plan)
        // fills at the bucket's rate.
        let burst = 3 * live
            .config
            .policies
            .plans
            .largest_max_keys()
            .min(MAX_WRITE_BURST_CAP)
            + KEY_WRITES_PER_MINUTE;
        gw.key_writes
            .check_every(account_id.to_owned(), now_ns, every_ns, burst)
            .map_err(|retry_ns| GatewayError::key_writes_limited(secs(retry_ns)))?;
    } else {
        let every_ns = 60_000_000_000 / u64::from(KEY_READS_PER_MINUTE);
        gw.key_reads
            .check_every(
                account_id.to_owned(),
                now_ns,
                every_ns,
                KEY_READS_PER_MINUTE,
            )
            .map_err(|retry_ns| GatewayError::key_reads_limited(secs(retry_ns)))?;
    }
    let value = match call {
        KeyCall::List => gw.manager.list_keys(account_id).await?,
        KeyCall::Create => {
            let body = crate::inspect::read_body(
                session,
                live.config.server.max_body_bytes,
                live.config.server.body_idle_timeout,
            )
            .await?;
            let created = gw
                .manager
                .create_key(&live.config.policies, account_id, &body)
                .await?;
            return Ok((201, serde_json::to_vec(&created).unwrap_or_default()));
        }
        KeyCall::Revoke(id) => gw.manager.revoke_key(account_id, &id).await?,
    };
    Ok((200, serde_json::to_vec(&value).unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_calls() {
        assert_eq!(
            key_call(&Method::GET, "/api/api-keys").unwrap().unwrap(),
            KeyCall::List
        );
        assert_eq!(
            key_call(&Method::POST, "/api/api-keys/").unwrap().unwrap(),
            KeyCall::Create
        );
        assert_eq!(
            key_call(&Method::DELETE, "/api/api-keys/key_1")
                .unwrap()
                .unwrap(),
            KeyCall::Revoke("key_1".into())
        );
        assert!(key_call(&Method::PUT, "/api/api-keys").unwrap().is_err());
        assert!(key_call(&Method::GET, "/api/api-keys/key_1")
            .unwrap()
            .is_err());
        assert!(key_call(&Method::DELETE, "/api/api-keys/a/b")
            .unwrap()
            .is_err());
        assert!(key_call(&Method::DELETE, "/api/api-keys").unwrap().is_err());
        assert!(key_call(&Method::GET, "/api/api-keys-other").is_none());
        assert!(key_call(&Method::DELETE, "/api/api-keysXYZ").is_none());
        assert!(key_call(&Method::DELETE, "/api/api-keys\u{e9}").is_none());
        assert!(key_call(&Method::GET, "/api/messages").is_none());
        // Other spellings of the gateway's own endpoint are never forwarded.
        for path in ["/api/API-keys", "/api/Api-Keys/key_1", "/API/api-keys"] {
            assert!(
                key_call(&Method::GET, path).is_some_and(|c| c.is_err()),
                "{path}"
            );
        }
        assert!(key_call(&Method::GET, "/api/api-keys.json")
            .unwrap()
            .is_err());
        assert!(key_call(&Method::GET, "/api/API-keysX").is_none());
    }
}
