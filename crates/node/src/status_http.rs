//! The node's operations endpoint: `/metrics` (Prometheus), `/livez` (the process serves) and
//! `/readyz` (the node is ready: see [`Node::not_ready`]).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::node::{Node, NodeError};

/// How often the histogram summaries behind `/metrics` are brought up to date.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct Ops {
    metrics: PrometheusHandle,
    /// The process_* metrics (CPU, memory, open files), sampled at each scrape.
    process: Arc<metrics_process::Collector>,
    /// Set once the node exists (the listener is up before: a starting node is live, not ready).
    node: Arc<OnceLock<Arc<Node>>>,
}

/// Installs the Prometheus recorder (`ringkv_*` metrics from here on), with every metric's help
/// text: histograms of seconds get second buckets, histograms of counts count buckets.
pub fn install_recorder() -> Result<PrometheusHandle, String> {
    use metrics_exporter_prometheus::Matcher;
    let mut b = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
        .map_err(|e| e.to_string())?;
    for name in crate::metrics_catalog::COUNT_HISTOGRAMS {
        b = b.set_buckets_for_metric(Matcher::Full((*name).into()), crate::metrics_catalog::COUNT_BUCKETS).map_err(|e| e.to_string())?;
    }
    let handle = b.install_recorder().map_err(|e| e.to_string())?;
    crate::metrics_catalog::describe();
    Ok(handle)
}

/// The operations routes (`/metrics`, `/livez`, `/readyz`), served on the metrics address and
/// on the HTTP gateway's. The node is given through `node` once it exists.
pub fn router(metrics: PrometheusHandle, node: Arc<OnceLock<Arc<Node>>>) -> Router {
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(UPKEEP_INTERVAL).await;
            upkeep.run_upkeep();
        }
    });
    let process = Arc::new(metrics_process::Collector::default());
    process.describe();
    Router::new()
        .route(
            "/metrics",
            get(|State(o): State<Ops>| async move {
                o.process.collect();
                o.metrics.render()
            }),
        )
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Ops { metrics, process, node })
}

/// Binds `addr` and serves `app` (the operations routes) there until the process ends.
pub async fn serve(addr: &str, app: Router) -> Result<(), NodeError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| NodeError::Bind(addr.into(), e))?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("operations endpoint stopped: {e}");
        }
    });
    Ok(())
}

/// 200 `ready` when the node is ready; 503 with one reason per line when not.
async fn readyz(State(o): State<Ops>) -> (StatusCode, String) {
    let why = match o.node.get() {
        Some(node) => node.not_ready(),
        None => vec!["starting".into()],
    };
    if why.is_empty() {
        (StatusCode::OK, "ready\n".into())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, why.iter().map(|w| format!("not ready: {w}\n")).collect())
    }
}
