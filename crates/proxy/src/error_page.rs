//! HTML error pages: built in, or `<status>.html` files from a service's `--error-pages`
//! directory. Templates may use `{{ .Status }}`, `{{ .StatusText }}` and `{{ .Message }}`.

use std::collections::HashMap;
use std::path::Path;

use http::{header, HeaderValue, Response, StatusCode};

use crate::body::{self, ProxyBody};

const BUILT_IN: &str = r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ .Status }} {{ .StatusText }}</title>
<style>
body { font-family: system-ui, sans-serif; display: flex; align-items: center; justify-content: center; min-height: 100vh; margin: 0; color: #333; background: #fafafa; }
main { text-align: center; padding: 2rem; }
h1 { font-size: 1.5rem; font-weight: 600; }
p { color: #666; }
</style>
</head>
<body>
<main>
<h1>{{ .Status }} {{ .StatusText }}</h1>
<p>{{ .Message }}</p>
</main>
</body>
</html>
"#;

#[derive(Debug, thiserror::Error)]
#[error("cannot read error pages from {path}: {source}")]
pub struct ErrorPagesError {
    path: String,
    source: std::io::Error,
}

/// A service's custom error page templates, by status code.
#[derive(Debug, Default, Clone)]
pub struct ErrorPages {
    custom: HashMap<u16, String>,
}

impl ErrorPages {
    /// Reads every `<status>.html` in `dir`.
    pub fn load(dir: &Path) -> Result<Self, ErrorPagesError> {
        let wrap = |source| ErrorPagesError {
            path: dir.display().to_string(),
            source,
        };
        let mut custom = HashMap::new();
        for entry in std::fs::read_dir(dir).map_err(wrap)? {
            let path = entry.map_err(wrap)?.path();
            let status = path
                .file_name()
                .and_then(|name| name.to_str())
                .and_then(|name| name.strip_suffix(".html"))
                .and_then(|stem| stem.parse::<u16>().ok())
                .filter(|code| (400..600).contains(code));
            if let Some(status) = status {
                custom.insert(status, std::fs::read_to_string(&path).map_err(wrap)?);
            }
        }
        Ok(Self { custom })
    }

    /// An HTML response for `status`, with `message` (escaped) in the page.
    pub fn render(&self, status: StatusCode, message: Option<&str>) -> Response<ProxyBody> {
        let template = self
            .custom
            .get(&status.as_u16())
            .map(String::as_str)
            .unwrap_or(BUILT_IN);
        let message = message.unwrap_or_else(|| default_message(status));
        let html = template
            .replace("{{ .Status }}", status.as_str())
            .replace("{{ .StatusText }}", status.canonical_reason().unwrap_or(""))
            .replace("{{ .Message }}", &escape_html(message));
        let mut response = Response::new(body::full(html));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        response
    }
}

fn default_message(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "The request could not be understood.",
        404 => "There is no service at this address.",
        413 => "The request or response was larger than this service allows.",
        502 => "The application could not be reached.",
        503 => "The service is temporarily unavailable.",
        504 => "The application took too long to respond.",
        _ => "",
    }
}

fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn text(response: Response<ProxyBody>) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn built_in_page_shows_status_and_escaped_message() {
        let page =
            ErrorPages::default().render(StatusCode::SERVICE_UNAVAILABLE, Some("<b>back soon</b>"));
        assert_eq!(page.status(), 503);
        let html = text(page).await;
        assert!(html.contains("503 Service Unavailable"));
        assert!(html.contains("&lt;b&gt;back soon&lt;/b&gt;"));
    }

    #[tokio::test]
    async fn custom_pages_replace_the_built_in_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("503.html"), "down: {{ .Message }}").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let pages = ErrorPages::load(dir.path()).unwrap();
        let html = text(pages.render(StatusCode::SERVICE_UNAVAILABLE, Some("upgrading"))).await;
        assert_eq!(html, "down: upgrading");
        let html = text(pages.render(StatusCode::NOT_FOUND, None)).await;
        assert!(html.contains("404 Not Found"));
    }
}
