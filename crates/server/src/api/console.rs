//! The operator console's files, served at `/console/` on the AWS protocol listener: static
//! assets built from console/ and embedded at build time (build.rs). The console is a client
//! of the AWS front on the same origin: every action is a SigV4-signed AWS KMS request, so
//! nothing here reads or changes anything, and no route bypasses the signature check.
//!
//! Every answer carries a strict Content-Security-Policy (scripts, styles and connections
//! only from this origin, no inline script, no framing), and the page names the service's
//! region so that the browser signs for it.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

macro_rules! asset {
    ($file:literal) => {
        include_bytes!(concat!(env!("OUT_DIR"), "/console/", $file))
    };
}

const INDEX: &[u8] = asset!("index.html");
const APP: &[u8] = asset!("app.js");
const CSS: &[u8] = asset!("console.css");

/// Whether this binary carries the console, or only the page that says how to build it.
pub const BUILT: bool = matches!(env!("HSM_KMS_CONSOLE").as_bytes(), b"built");

/// What every console answer allows the page: its own scripts, styles, images and
/// connections; nothing inline, no plugins, no forms posted anywhere, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The console's routes, for the AWS front's router.
pub fn router(region: &str) -> axum::Router {
    let index = page(region);
    axum::Router::new()
        .route("/console", get(|| async { redirect("/console/") }))
        .route(
            "/console/",
            get(move || {
                let index = index.clone();
                async move { file(index, "text/html; charset=utf-8") }
            }),
        )
        .route(
            "/console/app.js",
            get(|| async { file(APP.to_vec(), "text/javascript; charset=utf-8") }),
        )
        .route(
            "/console/console.css",
            get(|| async { file(CSS.to_vec(), "text/css; charset=utf-8") }),
        )
        .route(
            "/console/{*rest}",
            get(|| async { secured(StatusCode::NOT_FOUND, b"Not found".to_vec(), "text/plain") }),
        )
}

/// index.html with the service's region in its `hsm-kms-region` meta element.
fn page(region: &str) -> Vec<u8> {
    let escaped: String = region
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    String::from_utf8_lossy(INDEX)
        .replace("%REGION%", &escaped)
        .into_bytes()
}

fn file(body: Vec<u8>, content_type: &'static str) -> Response {
    secured(StatusCode::OK, body, content_type)
}

fn redirect(to: &'static str) -> Response {
    let mut r = secured(StatusCode::PERMANENT_REDIRECT, Vec::new(), "text/plain");
    r.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(to));
    r
}

fn secured(status: StatusCode, body: Vec<u8>, content_type: &'static str) -> Response {
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    // The files change with the binary: the browser revalidates instead of keeping an old one.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_names_the_region_and_nothing_else_can_be_injected() {
        let page = String::from_utf8(page("eu-west-1\"><script>")).unwrap();
        assert!(!page.contains("<script>alert"));
        assert!(!page.contains("%REGION%"));
        if BUILT {
            assert!(page.contains("content=\"eu-west-1script\""), "{page}");
        }
    }

    #[test]
    fn every_answer_is_locked_down() {
        let r = file(Vec::new(), "text/html");
        let csp = r.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap();
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(directive), "{csp}");
        }
        assert!(!csp.contains("unsafe"), "{csp}");
        assert_eq!(r.headers()[header::X_FRAME_OPTIONS], "DENY");
    }
}
