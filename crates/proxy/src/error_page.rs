//! HTML error pages: built in, or `<status>.html` files from a service's `--error-pages`
//! directory: Go templates, as in kamal-proxy (see [`crate::page_template`] for what they may
//! use), with `.Message` (the stop message, else empty), `.Status` and `.StatusText`.

use std::collections::HashMap;
use std::path::Path;

use http::{header, HeaderValue, Response, StatusCode};

use crate::body::{self, ProxyBody};
use crate::page_template::{PageData, PageTemplate, TemplateError};

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
pub enum ErrorPagesError {
    #[error("cannot read error pages from {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("error page {path}, {source}")]
    Template { path: String, source: TemplateError },
}

/// A service's custom error page templates, by status code.
#[derive(Debug, Default, Clone)]
pub struct ErrorPages {
    custom: HashMap<u16, PageTemplate>,
}

static BUILT_IN_PAGE: std::sync::LazyLock<PageTemplate> =
    std::sync::LazyLock::new(|| PageTemplate::parse(BUILT_IN).expect("the built-in page parses"));

impl ErrorPages {
    /// Reads and parses every `<status>.html` in `dir`; a page that cannot be evaluated is
    /// refused, naming the file and line.
    pub fn load(dir: &Path) -> Result<Self, ErrorPagesError> {
        let wrap = |source| ErrorPagesError::Read {
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
                let source = std::fs::read_to_string(&path).map_err(wrap)?;
                let page =
                    PageTemplate::parse(&source).map_err(|source| ErrorPagesError::Template {
                        path: path.display().to_string(),
                        source,
                    })?;
                custom.insert(status, page);
            }
        }
        Ok(Self { custom })
    }

    /// An HTML response for `status`, with `message` (escaped) in the page.
    pub fn render(&self, status: StatusCode, message: Option<&str>) -> Response<ProxyBody> {
        let status_text = status.canonical_reason().unwrap_or("");
        let html = match self.custom.get(&status.as_u16()) {
            // As in kamal-proxy, a custom page gets a message only when there is one.
            Some(page) => page.render(&PageData {
                message: message.unwrap_or(""),
                status: status.as_u16(),
                status_text,
            }),
            None => BUILT_IN_PAGE.render(&PageData {
                message: message.unwrap_or_else(|| default_message(status)),
                status: status.as_u16(),
                status_text,
            }),
        };
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

    #[test]
    fn a_page_that_cannot_be_evaluated_is_refused_naming_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("502.html"), "<p>\n{{ template \"x\" }}</p>").unwrap();
        let error = ErrorPages::load(dir.path()).unwrap_err().to_string();
        assert!(
            error.contains("502.html") && error.contains("line 2"),
            "{error}"
        );
    }
}
