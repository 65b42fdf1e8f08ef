//! The control API under `/control/…`: act on a running ferry (reindex,
//! pause and resume an index, retry dead letters, start a verify) and read
//! what only it knows (index states, dead letters, the last verify).
//!
//! Off unless a token is configured (`admin.token_file` / `admin.token_env`):
//! then every `/control/…` path answers `404` saying how to turn it on. On,
//! each request must carry `Authorization: Bearer <token>`, compared in
//! constant time (`subtle`); a missing or wrong token is `401`.
//!
//! This crate does not act itself: each request becomes an [`Action`] sent
//! with a reply channel to whoever holds the receiving end (the binary,
//! which calls the engine), and the reply's JSON is the response body.
//!
//! | method | path | action |
//! |---|---|---|
//! | GET  | `/control/indexes` | [`Action::Indexes`] |
//! | POST | `/control/indexes/{name}/reindex` | [`Action::Reindex`] |
//! | POST | `/control/indexes/{name}/pause` | [`Action::Pause`] |
//! | POST | `/control/indexes/{name}/resume` | [`Action::Resume`] |
//! | GET  | `/control/dead-letters?index=&limit=` | [`Action::DeadLetters`] |
//! | POST | `/control/dead-letters/retry?index=` | [`Action::RetryDeadLetters`] |
//! | GET  | `/control/verify` | [`Action::VerifyStatus`] |
//! | POST | `/control/verify?index=&sample=&repair=` | [`Action::StartVerify`] |

use std::sync::Arc;

use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use serde_json::Value;
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, oneshot};

/// Dead letters listed per request unless `limit` says otherwise.
pub const DEFAULT_LIST_LIMIT: usize = 1000;
/// Most dead letters one list request returns.
pub const MAX_LIST_LIMIT: usize = 10_000;

/// What a control request asks the running ferry to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Every configured index with its state and counters.
    Indexes,
    /// Rebuild the index into a new one beside it (as `ferry reindex`),
    /// restarting the pipeline so it begins at once.
    Reindex(String),
    /// Stop writing the index (searches keep the index as it is).
    Pause(String),
    /// Start writing the index again: it is rebuilt beside the paused one.
    Resume(String),
    /// Up to `limit` dead letters (of one index, or all) and their count.
    DeadLetters {
        /// Only this index.
        index: Option<String>,
        /// Entries returned at most.
        limit: usize,
    },
    /// Rebuild every dead-lettered document from its row and write it.
    RetryDeadLetters {
        /// Only this index.
        index: Option<String>,
    },
    /// Start a verify in the background (one at a time).
    StartVerify {
        /// Only this index.
        index: Option<String>,
        /// Check a random sample of this many rows.
        sample: Option<usize>,
        /// Rewrite the documents that differ.
        repair: bool,
    },
    /// The running or last verify.
    VerifyStatus,
}

/// Why an action was not done; each maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// No such index (`404`).
    #[error("{0}")]
    NotFound(String),
    /// The state forbids it: already paused, a verify already running (`409`).
    #[error("{0}")]
    Conflict(String),
    /// The request is malformed (`400`).
    #[error("{0}")]
    BadRequest(String),
    /// It failed (`500`): the database or the cluster refused or is unreachable.
    #[error("{0}")]
    Failed(String),
}

impl ControlError {
    fn status(&self) -> StatusCode {
        match self {
            ControlError::NotFound(_) => StatusCode::NOT_FOUND,
            ControlError::Conflict(_) => StatusCode::CONFLICT,
            ControlError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ControlError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// One request for the actor, with where to send the answer.
#[derive(Debug)]
pub struct ControlRequest {
    /// What to do.
    pub action: Action,
    /// The answer: a JSON document, or why not.
    pub reply: oneshot::Sender<Result<Value, ControlError>>,
}

/// The control API's configuration: its token and the channel actions go to.
#[derive(Clone)]
pub struct ControlApi {
    token: Arc<[u8]>,
    actions: mpsc::Sender<ControlRequest>,
}

impl std::fmt::Debug for ControlApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlApi { token: <redacted> }")
    }
}

impl ControlApi {
    /// The API guarded by `token`, sending its actions to `actions`.
    pub fn new(token: &str, actions: mpsc::Sender<ControlRequest>) -> ControlApi {
        ControlApi {
            token: token.as_bytes().into(),
            actions,
        }
    }

    async fn ask(&self, action: Action) -> Response {
        let (reply, answer) = oneshot::channel();
        if self
            .actions
            .send(ControlRequest { action, reply })
            .await
            .is_err()
        {
            return failed("ferry is shutting down");
        }
        match answer.await {
            Ok(Ok(doc)) => json(StatusCode::OK, &doc),
            Ok(Err(e)) => refused(&e),
            Err(_) => failed("the action was abandoned (ferry is shutting down)"),
        }
    }
}

/// The `/control` routes: the API when `api` is set, else `404` telling how
/// to turn it on.
pub(crate) fn routes(api: Option<ControlApi>) -> Router {
    let Some(api) = api else {
        return Router::new()
            .route("/control", any(off))
            .route("/control/{*rest}", any(off));
    };
    Router::new()
        .route("/control/indexes", get(indexes))
        .route("/control/indexes/{name}/{action}", post(index_action))
        .route("/control/dead-letters", get(dead_letters))
        .route("/control/dead-letters/retry", post(retry))
        .route("/control/verify", get(verify_status).post(verify_start))
        .layer(axum::middleware::from_fn_with_state(api.clone(), guard))
        .with_state(api)
}

async fn off() -> Response {
    json(
        StatusCode::NOT_FOUND,
        &serde_json::json!({"error": "the control API is off: set admin.token_file or admin.token_env and restart ferry"}),
    )
}

/// Lets a request through only with `Authorization: Bearer <token>`.
async fn guard(State(api): State<ControlApi>, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    let ok = given.is_some_and(|t| bool::from(t.ct_eq(&api.token)));
    if ok {
        return next.run(request).await;
    }
    let why = if given.is_none() {
        "missing bearer token: send Authorization: Bearer <the token of admin.token_file / admin.token_env>"
    } else {
        "wrong bearer token"
    };
    let mut r = json(
        StatusCode::UNAUTHORIZED,
        &serde_json::json!({ "error": why }),
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"ferry\""),
    );
    r
}

async fn indexes(State(api): State<ControlApi>) -> Response {
    api.ask(Action::Indexes).await
}

async fn index_action(
    State(api): State<ControlApi>,
    Path((name, action)): Path<(String, String)>,
) -> Response {
    let action = match action.as_str() {
        "reindex" => Action::Reindex(name),
        "pause" => Action::Pause(name),
        "resume" => Action::Resume(name),
        other => {
            return json(
                StatusCode::NOT_FOUND,
                &serde_json::json!({"error": format!("unknown action {other:?}: use reindex, pause or resume")}),
            )
        }
    };
    api.ask(action).await
}

async fn dead_letters(State(api): State<ControlApi>, RawQuery(q): RawQuery) -> Response {
    let q = Query::parse(q);
    let limit = match q.number("limit") {
        Ok(n) => n.unwrap_or(DEFAULT_LIST_LIMIT).min(MAX_LIST_LIMIT),
        Err(e) => return refused(&e),
    };
    api.ask(Action::DeadLetters {
        index: q.get("index"),
        limit,
    })
    .await
}

async fn retry(State(api): State<ControlApi>, RawQuery(q): RawQuery) -> Response {
    let index = Query::parse(q).get("index");
    api.ask(Action::RetryDeadLetters { index }).await
}

async fn verify_status(State(api): State<ControlApi>) -> Response {
    api.ask(Action::VerifyStatus).await
}

async fn verify_start(State(api): State<ControlApi>, RawQuery(q): RawQuery) -> Response {
    let q = Query::parse(q);
    let sample = match q.number("sample") {
        Ok(n) => n,
        Err(e) => return refused(&e),
    };
    let repair = matches!(q.get("repair").as_deref(), Some("true" | "1"));
    api.ask(Action::StartVerify {
        index: q.get("index"),
        sample,
        repair,
    })
    .await
}

/// Decoded query parameters.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: Option<String>) -> Query {
        let raw = raw.unwrap_or_default();
        Query(
            url::form_urlencoded::parse(raw.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(k, v)| k == key && !v.is_empty())
            .map(|(_, v)| v.clone())
    }

    /// A non-negative integer parameter, or the error naming it.
    fn number(&self, key: &str) -> Result<Option<usize>, ControlError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                ControlError::BadRequest(format!("{key}={v:?} is not a non-negative integer"))
            }),
        }
    }
}

/// The answer for an action refused with `e`.
fn refused(e: &ControlError) -> Response {
    json(e.status(), &serde_json::json!({"error": e.to_string()}))
}

fn failed(why: &str) -> Response {
    json(
        StatusCode::SERVICE_UNAVAILABLE,
        &serde_json::json!({ "error": why }),
    )
}

fn json(status: StatusCode, doc: &Value) -> Response {
    let mut body = serde_json::to_string_pretty(doc).unwrap_or_else(|_| "{}".into());
    body.push('\n');
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{call, AdminInfo, AdminServer};
    use ferry_core::stats::Stats;
    use std::net::SocketAddr;

    const TOKEN: &str = "s3cret-token";

    /// Serves the admin endpoint with `api`; a fake actor answers every
    /// action with its debug text.
    async fn start(control: bool) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<ControlRequest>(4);
        tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                let answer = match &req.action {
                    Action::Pause(n) if n == "nope" => {
                        Err(ControlError::NotFound("no [[index]] named \"nope\"".into()))
                    }
                    a => Ok(serde_json::json!({ "did": format!("{a:?}") })),
                };
                let _ = req.reply.send(answer);
            }
        });
        let mut server = AdminServer::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        if control {
            server = server.with_control(ControlApi::new(TOKEN, tx));
        }
        let addr = server.local_addr();
        let info = AdminInfo {
            slot: "s".into(),
            version: "0",
            limits: crate::HealthLimits::default(),
        };
        let task = tokio::spawn(async move {
            let _ = server.run(Arc::new(Stats::default()), info).await;
        });
        (addr, task)
    }

    #[tokio::test]
    async fn control_api_needs_the_exact_bearer_token() {
        let (addr, task) = start(true).await;
        let base = format!("http://{addr}");
        for (method, path) in [
            ("GET", "/control/indexes"),
            ("POST", "/control/indexes/users/pause"),
            ("POST", "/control/dead-letters/retry"),
            ("GET", "/control/verify"),
        ] {
            let url = format!("{base}{path}");
            let missing = call(method, &url, None).await.expect("answer");
            assert_eq!(missing.status, 401, "{path}: {}", missing.body);
            assert!(
                missing.body.contains("missing bearer token"),
                "{}",
                missing.body
            );
            for wrong in ["s3cret-tokeN", "s3cret-token2", "s3cret-toke", ""] {
                let r = call(method, &url, Some(wrong)).await.expect("answer");
                assert_eq!(r.status, 401, "{path} with {wrong:?}: {}", r.body);
            }
            let right = call(method, &url, Some(TOKEN)).await.expect("answer");
            assert_eq!(right.status, 200, "{path}: {}", right.body);
        }
        let r = call(
            "POST",
            &format!("{base}/control/indexes/users/pause"),
            Some(TOKEN),
        )
        .await
        .expect("answer");
        assert!(r.body.contains(r#"Pause(\"users\")"#), "{}", r.body);
        let r = call(
            "GET",
            &format!("{base}/control/dead-letters?index=a%20b&limit=99999"),
            Some(TOKEN),
        )
        .await
        .expect("answer");
        assert!(
            r.body.contains(r#"index: Some(\"a b\"), limit: 10000"#),
            "{}",
            r.body
        );
        let r = call(
            "POST",
            &format!("{base}/control/indexes/nope/pause"),
            Some(TOKEN),
        )
        .await
        .expect("answer");
        assert_eq!(r.status, 404, "{}", r.body);
        let r = call(
            "GET",
            &format!("{base}/control/dead-letters?limit=x"),
            Some(TOKEN),
        )
        .await
        .expect("answer");
        assert_eq!(r.status, 400, "{}", r.body);
        // The read-only routes need no token.
        let r = call("GET", &format!("{base}/healthz"), None)
            .await
            .expect("answer");
        assert_eq!(r.status, 200);
        task.abort();
    }

    #[tokio::test]
    async fn control_api_is_off_without_a_token() {
        let (addr, task) = start(false).await;
        for (method, path) in [
            ("GET", "/control/indexes"),
            ("POST", "/control/indexes/users/pause"),
            ("GET", "/control"),
        ] {
            let r = call(method, &format!("http://{addr}{path}"), Some(TOKEN))
                .await
                .expect("answer");
            assert_eq!(r.status, 404, "{path}: {}", r.body);
            assert!(r.body.contains("admin.token_file"), "{}", r.body);
        }
        task.abort();
    }
}
