//! Headers every answer of the admin server carries.
//!
//! Invariant: every response, pages, API, errors and redirects alike,
//! forbids framing (`frame-ancestors 'none'`, `X-Frame-Options`) and
//! content sniffing, sends referrers only to itself, and its Content Security Policy lets a page load
//! only the console's own stylesheet and script (`/console.css`,
//! `/console.js`): no inline script or style runs, so markup that escaped
//! escaping could still not act.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;

/// The Content Security Policy of every answer.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Adds the security headers to a response.
pub async fn secure(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    let set = [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        // Not `no-referrer`: with it, browsers send `Origin: null` on the
        // console's own form posts, which the origin check must refuse.
        (header::REFERRER_POLICY, "same-origin"),
        (
            HeaderName::from_static("cross-origin-opener-policy"),
            "same-origin",
        ),
    ];
    for (name, value) in set {
        h.insert(name, HeaderValue::from_static(value));
    }
    r
}
