//! The worker's small HTTP listener: `/healthz` (liveness), `/readyz` (readiness) and
//! `/metrics` (Prometheus text). Hand-rolled HTTP/1.1 — three GET routes do not need a framework.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use cropfleet::telemetry;
use cropfleet::util::now_ms;
use cropfleet::worker::WorkerState;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Install the Prometheus recorder and describe every metric.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(telemetry::STAGE_SECONDS.into()),
            telemetry::STAGE_BUCKETS,
        )?
        .install_recorder()?;
    telemetry::describe();
    Ok(handle)
}

/// Liveness fails when the main loop has not turned for this long (it turns at least every
/// 250 ms while consuming, so this means it is wedged).
const STALL_MS: u64 = 60_000;

pub async fn serve(listener: TcpListener, state: Arc<WorkerState>, metrics: Arc<PrometheusHandle>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else { continue };
        let (state, metrics) = (state.clone(), metrics.clone());
        tokio::spawn(async move {
            // Read until the end of the request head: a request may arrive in several segments.
            let mut buf = Vec::with_capacity(1024);
            let read_head = async {
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            };
            if tokio::time::timeout(std::time::Duration::from_secs(5), read_head).await.is_err() {
                return;
            }
            let req = String::from_utf8_lossy(&buf);
            let path = req.split_whitespace().nth(1).unwrap_or("/");
            let (status, ctype, body) = route(path, &state, &metrics);
            let head = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

fn route(path: &str, state: &WorkerState, metrics: &PrometheusHandle) -> (&'static str, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    match path {
        "/healthz" => {
            let age = now_ms().saturating_sub(state.heartbeat_ms.load(Ordering::Relaxed));
            if state.heartbeat_ms.load(Ordering::Relaxed) == 0 || age < STALL_MS {
                ("200 OK", TEXT, "ok\n".into())
            } else {
                ("503 Service Unavailable", TEXT, format!("main loop stalled for {age} ms\n"))
            }
        }
        "/readyz" => {
            if state.draining.load(Ordering::SeqCst) {
                ("503 Service Unavailable", TEXT, "draining\n".into())
            } else if state.ready.load(Ordering::SeqCst) {
                ("200 OK", TEXT, "ready\n".into())
            } else {
                ("503 Service Unavailable", TEXT, "not connected to the queue\n".into())
            }
        }
        "/metrics" => {
            metrics.run_upkeep();
            ("200 OK", "text/plain; version=0.0.4", metrics.render())
        }
        _ => ("404 Not Found", TEXT, "routes: /healthz /readyz /metrics\n".into()),
    }
}
