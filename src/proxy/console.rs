//! The console surface: Bearer JWTs, and the key-management endpoints the gateway serves itself.

use super::Identity;
use crate::errors::GatewayError;
use crate::gateway::Gateway;
use crate::live::Live;
use http::{HeaderValue, Method};
use pingora::http::RequestHeader;
use pingora::proxy::Session;

/// Verifies the console token of a request: the account it speaks for, and the identity to
/// forward.
pub(crate) fn authenticate(
    gw: &Gateway,
    live: &Live,
    req: &RequestHeader,
) -> Result<(String, Identity), GatewayError> {
    let mut values = req.headers.get_all(http::header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        if req.headers.contains_key(http::header::AUTHORIZATION) {
            // Two credentials: the backend might read the one not verified here.
            return Err(GatewayError::invalid_token());
        }
        return Err(if req.headers.contains_key("x-api-key") {
            GatewayError::api_key_on_console()
        } else {
            GatewayError::missing_bearer()
        });
    };
    let bytes = value.as_bytes();
    if bytes.len() <= 7 || !bytes[..7].eq_ignore_ascii_case(b"bearer ") {
        return Err(GatewayError::invalid_token());
    }
    let token = std::str::from_utf8(&bytes[7..])
        .map_err(|_| GatewayError::invalid_token())?
        .trim();
    match live.jwt.verify(token, gw.clock.now_unix()) {
        Ok(id) => {
            // Claims become header values: anything a header cannot carry is refused, and so
            // is whitespace in the account id, which a backend may trim or split on.
            if id.account_id.contains([' ', '\t']) {
                return Err(GatewayError::invalid_token());
            }
            let value =
                |s: &str| HeaderValue::from_str(s).map_err(|_| GatewayError::invalid_token());
            let identity = Identity {
                account_id: value(&id.account_id)?,
                key_id: None,
                user_id: id.user_id.as_deref().map(value).transpose()?,
            };
            Ok((id.account_id.clone(), identity))
        }
        Err(why) => {
            tracing::debug!(reason = %why, "console token refused");
            Err(GatewayError::invalid_token())
        }
    }
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
    let rest = path.strip_prefix("/api/api-keys")?;
    let not_a_call = || Some(Err(GatewayError::no_such_key_call()));
    let id = match rest {
        "" | "/" => None,
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

/// Serves a key-management call for the token's account: (status, JSON body).
pub(crate) async fn serve(
    gw: &Gateway,
    live: &Live,
    session: &mut Session,
    account_id: &str,
    call: KeyCall,
) -> Result<(u16, Vec<u8>), GatewayError> {
    if matches!(call, KeyCall::Create | KeyCall::Revoke(_)) {
        let every_ns = 60_000_000_000 / u64::from(KEY_WRITES_PER_MINUTE);
        gw.key_writes
            .check_every(
                account_id.to_owned(),
                gw.clock.now_ns(),
                every_ns,
                KEY_WRITES_PER_MINUTE,
            )
            .map_err(|retry_ns| {
                GatewayError::key_writes_limited(super::headers::ceil_secs(retry_ns))
            })?;
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
    }
}
