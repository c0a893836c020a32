//! The operator's HTTP port: Prometheus metrics, liveness and readiness, and the client side of the
//! `healthcheck` subcommand (so the container image needs no curl). Never blocks the processing loop.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::health::Health;

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
static GLOBAL_LABELS: OnceLock<Vec<(String, String)>> = OnceLock::new();

/// Labels every metric of this process carries (a rebuild's number, so that its metrics are told apart from
/// the live daemon's). Takes effect only before the recorder is installed.
pub fn set_global_labels(labels: Vec<(String, String)>) {
    let _ = GLOBAL_LABELS.set(labels);
}

/// Installs the process-wide Prometheus recorder once; later calls return the same handle.
pub fn metrics_handle() -> Option<PrometheusHandle> {
    RECORDER
        .get_or_init(|| {
            let buckets = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ];
            let mut builder = PrometheusBuilder::new();
            for (k, v) in GLOBAL_LABELS.get().into_iter().flatten() {
                builder = builder.add_global_label(k, v);
            }
            builder
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(crate::catalogue::BATCH_SIZE.into()),
                        &[1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0],
                    )
                })
                .and_then(|b| b.install_recorder())
                .map_err(|e| tracing::warn!(error = %e, "Prometheus recorder not installed"))
                .ok()
        })
        .clone()
}

/// How often histogram samples are folded into their buckets when nobody scrapes.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Folds the histogram samples recorded since the last scrape into their buckets, every `every`, until `stop`.
/// The recorder keeps every sample until a scrape or an upkeep: without this, a deployment that does not scrape
/// `/metrics` grows by a few bytes per handler call, for ever.
pub async fn upkeep(handle: PrometheusHandle, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => handle.run_upkeep(),
        }
    }
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: Option<PrometheusHandle>,
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let state = AppState {
        health,
        metrics: metrics_handle(),
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    match s.metrics {
        Some(h) => (StatusCode::OK, h.render()),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            String::from("metrics recorder unavailable\n"),
        ),
    }
}

async fn live(State(s): State<AppState>) -> impl IntoResponse {
    if s.health.live() {
        (StatusCode::OK, "live\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "processing loop stalled\n")
    }
}

async fn ready(State(s): State<AppState>) -> impl IntoResponse {
    let r = s.health.readiness();
    let code = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(r))
}

/// `event-processor healthcheck`: GET `/health/live` on the local port; true on HTTP 200.
pub async fn probe(host: &str, port: u16, path: &str) -> Result<bool, std::io::Error> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect((host, port)).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let head = String::from_utf8_lossy(&buf);
        Ok(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"))
    };
    tokio::time::timeout(Duration::from_secs(3), fut)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::from(std::io::ErrorKind::TimedOut)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn upkeep_folds_samples_until_stopped_then_ends() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            for i in 0..1000 {
                metrics::histogram!("upkeep_test_seconds").record(f64::from(i) / 1000.0);
            }
        });
        let stop = CancellationToken::new();
        let task = tokio::spawn(upkeep(
            handle.clone(),
            Duration::from_millis(5),
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!task.is_finished(), "runs while not stopped");
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("ends once stopped")
            .expect("no panic");
        // Folded samples are still reported: upkeep moves them, it does not drop them.
        let text = handle.render();
        assert!(
            text.contains("upkeep_test_seconds_count 1000"),
            "all samples reported:\n{text}"
        );
    }
}
