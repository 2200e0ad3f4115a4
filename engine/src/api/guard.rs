//! Who may talk to the local API: checks every request passes before a handler sees it.
//!
//! The API listens on loopback by default, which keeps other machines out but not a web
//! page open in a browser on the same machine. Two browser attacks reach a loopback
//! server: DNS rebinding (a page on `evil.example` whose name is re-pointed to 127.0.0.1
//! reads and writes as if same-origin, but its requests still say `Host: evil.example`)
//! and cross-site request forgery (a page POSTs a form or a `text/plain` body, which
//! browsers send without asking the server first). So:
//!
//! - the `Host` must be an IP address, `localhost`, or a name the operator configured;
//! - a state-changing request from another origin (`Origin`, `Sec-Fetch-Site`) is refused,
//!   and so is a POST without a token whose content type a browser may send unasked;
//! - the bearer token, when one is required, is compared in constant time.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::ApiState;

/// Refuses requests whose `Host` could be a rebinding name, and browser requests from other
/// sites that would change something.
pub(crate) async fn same_origin_only(
    State(state): State<ApiState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let headers = request.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "a Host header is required"))?;
    if !host_allowed(host, &state.hosts) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "Host {:?} is not an address of this API (name it with --api-host to allow it)",
                host.chars().take(100).collect::<String>()
            ),
        ));
    }
    if changes_state(request.method()) {
        if let Some(why) = cross_site(request.method(), headers, host) {
            return Err(ApiError::new(StatusCode::FORBIDDEN, why));
        }
    }
    Ok(next.run(request).await)
}

/// Compares two tokens in time that depends on neither's content: both are hashed first
/// (SHA-256, so the lengths compared are equal whatever was sent) and the digests are
/// compared with `subtle`, which does not stop at the first differing byte.
pub fn tokens_match(given: &str, expected: &str) -> bool {
    let digest = |s: &str| ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    let (a, b) = (digest(given), digest(expected));
    a.as_ref().ct_eq(b.as_ref()).into()
}

fn changes_state(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Whether `host` (a `Host` header) names this API: an IP address (a rebinding attack
/// needs a name), `localhost`, or one of the operator's `names`.
pub fn host_allowed(host: &str, names: &[String]) -> bool {
    let name = strip_port(host);
    if name.is_empty() {
        return false;
    }
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<std::net::IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || names.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// `host` without its `:port`, keeping an IPv6 literal's brackets.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Why a state-changing request looks like a browser acting for another site, if it does.
fn cross_site(method: &Method, headers: &HeaderMap, host: &str) -> Option<String> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = get("sec-fetch-site") {
        if site != "same-origin" && site != "none" {
            return Some(format!("refused a {site} browser request"));
        }
    }
    if let Some(origin) = get("origin") {
        // `scheme://host[:port]`; "null" (sandboxed pages, files) is never same-origin.
        let origin_host = origin.split_once("://").map(|(_, h)| h);
        if origin_host.is_none_or(|h| !h.eq_ignore_ascii_case(host)) {
            return Some(format!(
                "refused a request from origin {:?}",
                origin.chars().take(100).collect::<String>()
            ));
        }
    }
    // A browser sends a POST with these types without asking the server first (a
    // "simple request"; PUT, PATCH and DELETE it always asks about, and this API never
    // says yes). A request with a token cannot be one: that header needs the browser to ask.
    if method == Method::POST && !headers.contains_key(header::AUTHORIZATION) {
        let content_type = get("content-type").map(|c| {
            c.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
        let simple = match content_type.as_deref() {
            None => true,
            Some(t) => matches!(
                t,
                "text/plain" | "application/x-www-form-urlencoded" | "multipart/form-data"
            ),
        };
        let has_body = headers.contains_key(header::TRANSFER_ENCODING)
            || get("content-length").is_some_and(|l| l.trim() != "0");
        if simple && has_body {
            return Some(
                "a request with a body needs a Content-Type such as application/json or \
                 application/octet-stream (browser form and text/plain posts are refused)"
                    .into(),
            );
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_that_could_be_rebound_are_refused() {
        let names = vec!["hub-1.internal".to_owned()];
        for ok in [
            "127.0.0.1:7790",
            "127.0.0.1",
            "[::1]:7790",
            "[::1]",
            "localhost:7790",
            "LOCALHOST",
            "10.1.2.3:80",
            "hub-1.internal:7790",
        ] {
            assert!(host_allowed(ok, &names), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:7790",
            "localhost.evil.example",
            "127.0.0.1.nip.io:7790",
            "",
            ":7790",
        ] {
            assert!(!host_allowed(bad, &names), "{bad}");
        }
    }

    #[test]
    fn tokens_compare_by_content() {
        assert!(tokens_match("s3cret", "s3cret"));
        assert!(!tokens_match("s3cre", "s3cret"));
        assert!(!tokens_match("", "s3cret"));
        assert!(!tokens_match("s3cret ", "s3cret"));
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().expect("value"));
        }
        h
    }

    #[test]
    fn browser_requests_from_other_sites_are_recognised() {
        let host = "127.0.0.1:7790";
        let form = headers(&[
            ("content-type", "text/plain;charset=UTF-8"),
            ("content-length", "3"),
        ]);
        assert!(
            cross_site(&Method::POST, &form, host).is_some(),
            "a text/plain post"
        );
        let no_type = headers(&[("content-length", "3")]);
        assert!(
            cross_site(&Method::POST, &no_type, host).is_some(),
            "a post without a type"
        );
        let json = headers(&[
            ("content-type", "application/json"),
            ("content-length", "3"),
        ]);
        assert!(
            cross_site(&Method::POST, &json, host).is_none(),
            "curl with a JSON body"
        );
        let with_token = headers(&[("authorization", "Bearer t"), ("content-length", "3")]);
        assert!(
            cross_site(&Method::POST, &with_token, host).is_none(),
            "a client with a token"
        );
        let curl_put = headers(&[
            ("content-type", "application/x-www-form-urlencoded"),
            ("content-length", "3"),
        ]);
        assert!(
            cross_site(&Method::PUT, &curl_put, host).is_none(),
            "curl -X PUT -d: browsers always ask before a PUT"
        );
        let empty = headers(&[("content-length", "0")]);
        assert!(
            cross_site(&Method::POST, &empty, host).is_none(),
            "nothing to forge"
        );
        let foreign = headers(&[
            ("origin", "https://evil.example"),
            ("content-type", "application/json"),
        ]);
        assert!(
            cross_site(&Method::POST, &foreign, host).is_some(),
            "another origin"
        );
        let same = headers(&[
            ("origin", "http://127.0.0.1:7790"),
            ("content-type", "application/json"),
        ]);
        assert!(
            cross_site(&Method::POST, &same, host).is_none(),
            "same origin"
        );
        assert!(cross_site(&Method::POST, &headers(&[("origin", "null")]), host).is_some());
        let fetch_meta = headers(&[
            ("sec-fetch-site", "cross-site"),
            ("content-type", "application/json"),
        ]);
        assert!(
            cross_site(&Method::POST, &fetch_meta, host).is_some(),
            "fetch metadata"
        );
    }
}
