//! The offline chat page at `GET /`: one document built into the binary, its style and script
//! inline, served with a Content-Security-Policy that names exactly those two by SHA-256 and
//! allows no other script, style, font, frame or connection but to this server.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

const HTML: &str = include_str!("page/page.html");
const STYLE: &str = include_str!("page/page.css");
const SCRIPT: &str = include_str!("page/page.js");

pub struct Page {
    html: String,
    csp: HeaderValue,
}

impl Page {
    pub fn new() -> Page {
        let html = HTML
            .replacen("{{STYLE}}", STYLE, 1)
            .replacen("{{SCRIPT}}", SCRIPT, 1);
        let csp = format!(
            "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; \
             connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
            sha256_base64(SCRIPT),
            sha256_base64(STYLE)
        );
        Page {
            html,
            csp: HeaderValue::from_str(&csp).expect("ASCII"),
        }
    }

    pub fn response(&self) -> Response {
        let mut r = (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            )],
            self.html.clone(),
        )
            .into_response();
        let h = r.headers_mut();
        h.insert(header::CONTENT_SECURITY_POLICY, self.csp.clone());
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    }
}

fn sha256_base64(text: &str) -> String {
    base64(&Sha256::digest(text.as_bytes()))
}

/// Standard base64 with padding (RFC 4648), as CSP hash sources are written.
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), enc);
        }
        // SHA-256 of "abc" (FIPS 180-2's example), base64.
        assert_eq!(
            sha256_base64("abc"),
            "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="
        );
    }

    #[test]
    fn the_page_is_self_contained_and_its_policy_names_its_inline_parts() {
        let p = Page::new();
        assert!(!p.html.contains("{{"), "a placeholder was left");
        // Exactly one inline script and style, and nothing loaded from elsewhere.
        assert_eq!(p.html.matches("<script>").count(), 1);
        assert_eq!(p.html.matches("<style>").count(), 1);
        for external in ["src=", "http://", "https://", "@import", "url("] {
            assert!(!p.html.contains(external), "{external}");
        }
        let csp = p.csp.to_str().unwrap();
        assert!(csp.starts_with("default-src 'none';"), "{csp}");
        assert!(csp.contains(&sha256_base64(SCRIPT)));
        assert!(csp.contains(&sha256_base64(STYLE)));
    }
}
