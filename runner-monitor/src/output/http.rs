//! The HTTP endpoint (axum, on the agent's tokio runtime): `/metrics` in the Prometheus text
//! format, `/healthz` (the agent runs), `/readyz` (its probes are attached), and the job reports
//! as pages: `/jobs` (recent jobs) and `/jobs/ID` (one job, by CI id or key). Every route is GET:
//! nothing here changes the agent. The pages load nothing and run no script, and say so to the
//! browser (Content-Security-Policy).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    Router,
    extract::{Path, State},
    http::StatusCode,
    response::IntoResponse,
    routing::get,
};

use super::metrics::Metrics;
use crate::report::{self, SharedReports};

#[derive(Clone)]
pub struct Endpoint {
    pub metrics: Arc<Metrics>,
    /// Set once the probes are attached and the event stream is being read.
    pub ready: Arc<AtomicBool>,
    /// The pipeline's job reports, for `/jobs`.
    pub reports: Option<SharedReports>,
}

/// What a page may do: show itself with its inline style. No script, image, frame, form or
/// connection, from anywhere.
const PAGE_HEADERS: [(&str, &str); 4] = [
    ("content-type", "text/html; charset=utf-8"),
    (
        "content-security-policy",
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
];

async fn jobs(State(e): State<Endpoint>) -> impl IntoResponse {
    let list = e
        .reports
        .as_ref()
        .map(|r| report::lock(r).list())
        .unwrap_or_default();
    (PAGE_HEADERS, report::jobs_page(&list))
}

async fn job(State(e): State<Endpoint>, Path(id): Path<String>) -> impl IntoResponse {
    // Copied out under the lock, rendered after it.
    let found = e.reports.as_ref().and_then(|r| report::lock(r).find(&id));
    match found {
        Some(found) => (StatusCode::OK, PAGE_HEADERS, report::job_page(&found)),
        None => (
            StatusCode::NOT_FOUND,
            PAGE_HEADERS,
            report::jobs_page(&[]).replace(
                "No job seen since the agent started.",
                "No such job among the recent jobs.",
            ),
        ),
    }
}

async fn metrics(State(e): State<Endpoint>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        e.metrics.encode(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(e): State<Endpoint>) -> (StatusCode, &'static str) {
    if e.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

/// Binds `addr` and serves until the runtime stops. Binding errors are returned at once.
pub async fn serve(addr: SocketAddr, endpoint: Endpoint) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/jobs", get(jobs))
        // CI ids hold slashes (`9001/build`): the rest of the path is the id.
        .route("/jobs/{*id}", get(job))
        .with_state(endpoint);
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "HTTP endpoint stopped");
        }
    });
    Ok(bound)
}
