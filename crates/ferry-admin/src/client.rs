//! The client `ferry status` and `ferry health` read the admin endpoint with.

use std::time::Duration;

use crate::AdminError;

/// How long one request may take, connection included.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response body [`fetch`] reads.
const MAX_RESPONSE: usize = 16 * 1024 * 1024;

/// A response received by [`fetch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The HTTP status code.
    pub status: u16,
    /// The body, decoded as UTF-8 (invalid bytes replaced).
    pub body: String,
}

/// GETs a plain `http://` URL: no proxy, no redirects, 10 s limit, the
/// first 16 MiB of the body.
pub async fn fetch(url: &str) -> Result<Response, AdminError> {
    call("GET", url, None).await
}

/// Like [`fetch`] with `method` (`GET` or `POST`) and, when given, an
/// `Authorization: Bearer` token (the control API's).
pub async fn call(method: &str, url: &str, bearer: Option<&str>) -> Result<Response, AdminError> {
    let bad = |reason: &str| AdminError::Url {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    if parsed.scheme() != "http" {
        return Err(bad("only http:// URLs are supported"));
    }
    if parsed.host_str().is_none() {
        return Err(bad("no host"));
    }
    let failed = |e: reqwest::Error| AdminError::Request {
        url: url.to_string(),
        reason: describe(&e),
    };
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(TIMEOUT)
        .user_agent(concat!("ferry/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(failed)?;
    let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|_| bad("bad method"))?;
    let mut request = client.request(method, parsed);
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    let mut reply = request.send().await.map_err(failed)?;
    let status = reply.status().as_u16();
    let mut body = Vec::new();
    while let Some(chunk) = reply.chunk().await.map_err(failed)? {
        let room = MAX_RESPONSE - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() == MAX_RESPONSE {
            break;
        }
    }
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// What went wrong, with the innermost cause (reqwest's own message names
/// only the URL).
fn describe(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        return format!("no answer within {} s", TIMEOUT.as_secs());
    } else if e.is_connect() {
        "cannot connect"
    } else if e.is_body() || e.is_decode() {
        "cannot read the response"
    } else {
        "cannot send the request"
    };
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    format!("{what}: {cause}")
}
