//! The admin routes as an axum [`Router`]: what each path answers.
//!
//! GET and HEAD only (axum answers HEAD from the GET handler without the
//! body); anything else is `405` with `Allow: GET, HEAD`. No response may
//! be cached.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use ferry_core::stats::Stats;

use crate::metrics::{Metrics, CONTENT_TYPE as METRICS_CONTENT_TYPE};
use crate::AdminInfo;

/// What the handlers read.
#[derive(Debug, Clone)]
struct Admin {
    stats: Arc<Stats>,
    info: Arc<AdminInfo>,
    metrics: Arc<Metrics>,
}

/// The router answering `/`, `/healthz`, `/readyz`, `/metrics` and `/status`.
pub(crate) fn router(stats: Arc<Stats>, info: AdminInfo) -> Router {
    let admin = Admin {
        metrics: Arc::new(Metrics::new(stats.clone(), info.limits)),
        stats,
        info: Arc::new(info),
    };
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .fallback(unknown)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::map_response(no_store))
        .with_state(admin)
}

async fn index() -> &'static str {
    "ferry admin endpoint: /healthz /readyz /metrics /status\n"
}

async fn healthz(State(admin): State<Admin>) -> Response {
    let now = ferry_core::stats::mono_us();
    match crate::liveness(&admin.stats, &admin.info.limits, now) {
        Ok(()) => "ok\n".into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {why}\n"),
        )
            .into_response(),
    }
}

async fn readyz(State(admin): State<Admin>) -> Response {
    let now = ferry_core::stats::mono_us();
    match crate::readiness(&admin.stats, &admin.info.limits, now) {
        Ok(()) => "ready\n".into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(admin): State<Admin>) -> Response {
    let body = admin.metrics.render();
    ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], body).into_response()
}

async fn status(State(admin): State<Admin>) -> Response {
    let doc = crate::status_json(&admin.stats, &admin.info);
    let mut body = serde_json::to_string_pretty(&doc).unwrap_or_else(|_| "{}".into());
    body.push('\n');
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Any other path: `404`, or `405` for a method other than GET and HEAD.
async fn unknown(method: Method) -> Response {
    if method == Method::GET || method == Method::HEAD {
        let body = "not found; try /healthz, /readyz, /metrics or /status\n";
        (StatusCode::NOT_FOUND, body).into_response()
    } else {
        method_not_allowed().await
    }
}

async fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(header::ALLOW, "GET, HEAD")],
        "only GET and HEAD are allowed\n",
    )
        .into_response()
}

/// Admin pages describe the present: never cache them.
async fn no_store(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
