//! The worker's small HTTP listener: `/healthz` (liveness), `/readyz` (readiness) and
//! `/metrics` (Prometheus text), on hyper's HTTP/1.1 server: GET and HEAD, 405 for other methods,
//! keep-alive (a scraper reuses its connection), 5 s to send a request head.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use cropfleet::telemetry;
use cropfleet::util::now_ms;
use cropfleet::worker::WorkerState;
use http_body_util::Full;
use hyper::header::{ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

/// The listener's address when `--http-addr` is not given. When its port is taken (a second
/// worker on the same host), the worker listens on a free port instead and logs it.
pub const DEFAULT_ADDR: &str = "0.0.0.0:9090";

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

/// Bind the listener. `explicit` says whether the address came from the user (flag or
/// environment): then a taken port is an error. The default address falls back to a free port
/// on the same interface, so several workers can run on one host with the same command.
pub async fn bind(addr: SocketAddr, explicit: bool) -> anyhow::Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) if !explicit && e.kind() == std::io::ErrorKind::AddrInUse => {
            let free = SocketAddr::new(addr.ip(), 0);
            let l = TcpListener::bind(free).await.with_context(|| format!("binding the health listener on {free}"))?;
            tracing::warn!(
                default = %addr,
                addr = %l.local_addr()?,
                "the default health listener port is taken (another worker on this host?); listening on a free port"
            );
            Ok(l)
        }
        Err(e) => Err(e).with_context(|| format!("binding the health listener on {addr}")),
    }
}

/// Liveness fails when the main loop has not turned for this long (it turns at least every
/// 250 ms while consuming, so this means it is wedged).
const STALL_MS: u64 = 60_000;

/// Longest wait for a request head, on a new connection or between requests on a kept-alive one.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Serve until the process exits.
pub async fn serve(listener: TcpListener, state: Arc<WorkerState>, metrics: Arc<PrometheusHandle>) {
    loop {
        let sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                // Out of file descriptors and the like: pause instead of spinning.
                tracing::warn!(error = %e, "accepting a health connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (state, metrics) = (state.clone(), metrics.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let res = respond(&req, &state, &metrics);
                async move { Ok::<_, Infallible>(res) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .keep_alive(true)
                .serve_connection(TokioIo::new(sock), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "health connection ended with an error");
            }
        });
    }
}

fn respond<B>(req: &Request<B>, state: &WorkerState, metrics: &PrometheusHandle) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut res = reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "only GET and HEAD\n".into());
        res.headers_mut().insert(ALLOW, "GET, HEAD".parse().expect("valid header"));
        return res;
    }
    match req.uri().path() {
        "/healthz" => {
            let beat = state.heartbeat_ms.load(Ordering::Relaxed);
            let age = now_ms().saturating_sub(beat);
            if beat == 0 || age < STALL_MS {
                reply(StatusCode::OK, TEXT, "ok\n".into())
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("main loop stalled for {age} ms\n"))
            }
        }
        "/readyz" => {
            if state.draining.load(Ordering::SeqCst) {
                reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "draining\n".into())
            } else if state.ready.load(Ordering::SeqCst) {
                reply(StatusCode::OK, TEXT, "ready\n".into())
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "not connected to the queue\n".into())
            }
        }
        "/metrics" => {
            metrics.run_upkeep();
            reply(StatusCode::OK, "text/plain; version=0.0.4", metrics.render())
        }
        _ => reply(StatusCode::NOT_FOUND, TEXT, "routes: /healthz /readyz /metrics\n".into()),
    }
}

/// A response with a body; hyper sends its length, and drops the body (not the length) for HEAD.
fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    res
}
