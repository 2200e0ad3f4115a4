//! Who a request acts for, decided once before any handler runs.
//!
//! The node's operator holds the API token (`--token`), or needs none when the node has
//! none: full access. An app holds a scoped token (see [`crate::net::token`]): it reaches
//! documents only, those its grants name, and writes only where they say `rw`. Browsers
//! cannot set headers on a WebSocket, so the automerge-repo route also takes the token
//! as `?token=`; no other route does, which keeps tokens out of other URLs. Refusals
//! never quote the token, and nothing here logs a URI.

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use super::error::ApiError;
use super::guard::tokens_match;
use super::ApiState;
use crate::model::Namespace;
use crate::net::token::{self, Token};

/// The route automerge-repo clients connect to.
pub const REPO_PATH: &str = "/v1/automerge-repo";

/// What a request may do.
#[derive(Clone, Debug)]
pub enum Access {
    /// Everything the node allows locally: the operator.
    Full,
    /// What a verified scoped token grants.
    Scoped(Arc<Token>),
}

impl Access {
    /// Whether documents of `ns` may be read.
    pub fn can_read(&self, ns: &Namespace) -> bool {
        match self {
            Access::Full => true,
            Access::Scoped(t) => t.grants.can_read(ns),
        }
    }

    /// Whether documents of `ns` may be written.
    pub fn can_write(&self, ns: &Namespace) -> bool {
        match self {
            Access::Full => true,
            Access::Scoped(t) => t.grants.can_write(ns),
        }
    }

    /// Refuses a read of `ns` this access does not allow.
    pub fn check_read(&self, ns: &Namespace) -> Result<(), ApiError> {
        if self.can_read(ns) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("the token grants no access to namespace {ns}"),
            ))
        }
    }
}

/// Decides the request's [`Access`] and hands it to the handler, or refuses it.
pub(crate) async fn authorize(
    State(state): State<ApiState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let path = request.uri().path();
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    // Only scoped tokens travel in a URL: the operator's would end up in proxy logs and
    // browser histories.
    let from_query = bearer.is_none() && path == REPO_PATH;
    let given = bearer.or_else(|| {
        from_query
            .then(|| query_token(request.uri().query().unwrap_or("")))
            .flatten()
            .filter(|t| looks_scoped(t))
    });
    let access = match (given.as_deref(), state.token.as_deref()) {
        (Some(g), Some(admin)) if tokens_match(g, admin) => Access::Full,
        (Some(g), _) if looks_scoped(g) => Access::Scoped(Arc::new(verify(&state, g)?)),
        (_, Some(_)) => {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token",
            ))
        }
        (_, None) => Access::Full,
    };
    if matches!(access, Access::Scoped(_)) && !path.starts_with("/v1/docs/") && path != REPO_PATH {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("a scoped token reaches documents only (/v1/docs/…, {REPO_PATH})"),
        ));
    }
    request.extensions_mut().insert(access);
    Ok(next.run(request).await)
}

/// Whether `given` has the shape of a scoped token (three base64url parts), so that a
/// wrong operator token is answered as one, not as a damaged scoped token.
fn looks_scoped(given: &str) -> bool {
    given.split('.').count() == 3 && given.len() > 32
}

fn verify(state: &ApiState, given: &str) -> Result<Token, ApiError> {
    let unauthorized = |why: String| ApiError::new(StatusCode::UNAUTHORIZED, why);
    let node = state.node.as_ref().ok_or_else(|| {
        unauthorized("this API runs without a deployment, so it takes no scoped tokens".into())
    })?;
    let t = token::verify(given, node.ca_der(), SystemTime::now())
        .map_err(|e| unauthorized(e.to_string()))?;
    if node
        .revocations()
        .crl()
        .is_some_and(|crl| crl.revokes(&t.serial))
    {
        return Err(unauthorized(token::TokenError::Revoked.to_string()));
    }
    Ok(t)
}

/// The `token` query parameter, percent-decoded.
fn query_token(query: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == "token").then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_token_is_found_and_decoded() {
        assert_eq!(query_token("a=1&token=x.y%2Dz"), Some("x.y-z".into()));
        assert_eq!(query_token("token=abc%"), Some("abc%".into()));
        assert_eq!(query_token("tokens=abc"), None);
    }
}
