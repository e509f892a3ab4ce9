//! The API's defence against the operator's own browser: a page of another site, opened while
//! the controller's API is reachable from that browser, must not change anything, and a name
//! that resolves to loopback (DNS rebinding) must not reach an API without a token.
//!
//! - Every change (any method but `GET`, `HEAD`, `OPTIONS`) is a request a page cannot send
//!   without the browser asking first (CORS preflight, which this API never grants): it has a
//!   JSON or binary `Content-Type`, the `X-Outpost-Client` header, or a bearer token. A form
//!   post or a `no-cors` fetch has none of them.
//! - A change that says where it comes from (`Origin`) comes from this API's own origin.
//! - Without a token, every request names a loopback host (`Host: 127.0.0.1:…`,
//!   `localhost`, `[::1]`): a rebinding page's requests name its own domain.
//!
//! A pure check ([`refusal`]) and the middleware that applies it ([`guard`]).

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The header Outpost's own clients (the CLI, the status page) send with every request.
pub const CLIENT_HEADER: &str = "x-outpost-client";

/// The content types a page may send to another origin without asking (CORS "simple").
const SIMPLE_TYPES: [&str; 3] = [
    "application/x-www-form-urlencoded",
    "multipart/form-data",
    "text/plain",
];

/// Whether `host` (a `Host` header: name or address, with an optional port) names loopback.
pub fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        // [::1]:8080
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(n, _)| n),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Why a request is refused, if it is: `open` says the API takes no token.
pub fn refusal(method: &Method, headers: &HeaderMap, open: bool) -> Option<String> {
    let get = |h: header::HeaderName| headers.get(h).and_then(|v| v.to_str().ok());
    let host = get(header::HOST);
    if open && let Some(h) = host.filter(|h| !is_loopback_host(h)) {
        return Some(format!(
            "this API has no token and answers only to loopback names, not Host: {h} (a page whose name resolves here cannot use it); give the API a token to reach it by name"
        ));
    }
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return None;
    }
    if let (Some(origin), Some(host)) = (get(header::ORIGIN), host) {
        let same = origin
            .split_once("://")
            .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(host));
        if !same {
            return Some(format!(
                "a change from another site (Origin: {origin}) is refused: only Outpost's own page and clients make changes"
            ));
        }
    }
    // A bearer token is not ambient: a page cannot attach one to another site's request
    // without asking first, so a request that carries one is not a forgery.
    if headers.contains_key(CLIENT_HEADER) || headers.contains_key(header::AUTHORIZATION) {
        return None;
    }
    let kind = get(header::CONTENT_TYPE).map(|t| {
        t.split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
    });
    match kind {
        Some(k) if !SIMPLE_TYPES.contains(&k.as_str()) => None,
        _ => Some(format!(
            "a change needs Content-Type: application/json (or the {CLIENT_HEADER} header): a form or a page of another site cannot send it"
        )),
    }
}

/// The middleware: refuses what [`refusal`] refuses (403), before anything else runs.
pub async fn guard(
    State(tokens): State<std::sync::Arc<crate::tokens::Tokens>>,
    req: Request,
    next: Next,
) -> Response {
    match refusal(req.method(), req.headers(), !tokens.required()) {
        None => next.run(req).await,
        Some(why) => (
            StatusCode::FORBIDDEN,
            axum::Json(serde_json::json!({ "error": why })),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn loopback_names() {
        for h in [
            "127.0.0.1:8080",
            "localhost",
            "LOCALHOST:1",
            "[::1]:80",
            "a.localhost",
            "127.8.9.1",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "evil.example",
            "evil.example:8080",
            "10.0.0.1:80",
            "[2001:db8::1]:80",
            "localhost.evil.example",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }

    #[test]
    fn what_a_page_of_another_site_can_send_is_refused() {
        let post = Method::POST;
        let host = ("host", "127.0.0.1:8080");
        // A form post, a no-cors fetch (text/plain), no type at all: refused.
        for t in [
            "application/x-www-form-urlencoded",
            "text/plain;charset=UTF-8",
            "multipart/form-data; boundary=x",
        ] {
            assert!(
                refusal(&post, &headers(&[host, ("content-type", t)]), true).is_some(),
                "{t}"
            );
        }
        assert!(refusal(&post, &headers(&[host]), true).is_some());
        // Outpost's clients: JSON, binary uploads, or the client header.
        assert!(
            refusal(
                &post,
                &headers(&[host, ("content-type", "application/json")]),
                true
            )
            .is_none()
        );
        assert!(
            refusal(
                &post,
                &headers(&[host, ("content-type", "application/octet-stream")]),
                true
            )
            .is_none()
        );
        assert!(refusal(&post, &headers(&[host, (CLIENT_HEADER, "cli")]), true).is_none());
        assert!(
            refusal(
                &post,
                &headers(&[host, ("authorization", "Bearer x")]),
                false
            )
            .is_none()
        );
        // Another origin, even with JSON (a preflight the browser would not pass anyway).
        let other = [
            host,
            ("content-type", "application/json"),
            ("origin", "http://evil.example"),
        ];
        assert!(refusal(&post, &headers(&other), false).is_some());
        let own = [
            host,
            ("content-type", "application/json"),
            ("origin", "http://127.0.0.1:8080"),
        ];
        assert!(refusal(&post, &headers(&own), true).is_none());
        // Reads are not changes.
        assert!(refusal(&Method::GET, &headers(&[host]), true).is_none());
        // DNS rebinding: a name that is not loopback, on an API without a token, even a read.
        let rebound = [("host", "evil.example:8080")];
        assert!(refusal(&Method::GET, &headers(&rebound), true).is_some());
        assert!(
            refusal(&Method::GET, &headers(&rebound), false).is_none(),
            "a token guards it"
        );
    }
}
