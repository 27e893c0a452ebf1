//! Prometheus metrics of a stream, served as text on `--metrics-addr` at `/metrics`.
//! The exposition format is a few lines of text; serving it needs no framework.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Debug, Default)]
pub struct Metrics {
    pub source: String,
    pub rpo_secs: AtomicU64,
    /// Milliseconds, so that sub-second lag shows.
    pub lag_ms: AtomicU64,
    pub breached: AtomicBool,
    pub points: AtomicU64,
    pub fragments: AtomicU64,
    pub bytes_shipped: AtomicU64,
    pub errors: AtomicU64,
    /// Unix time of the newest durable state, in milliseconds.
    pub durable_ms: AtomicU64,
    /// Unix time of the source's newest point (a base backup, for PostgreSQL), in
    /// nanoseconds (its exact time, which names it); 0 when there is none.
    pub newest_point_ns: AtomicU64,
    /// How the last forget and prune this stream ran went (`--prune-every`).
    pub last_prune: Mutex<Option<crate::state::PruneStatus>>,
}

impl Metrics {
    pub fn new(source: &str, rpo_secs: u64) -> Metrics {
        Metrics { source: source.to_string(), rpo_secs: AtomicU64::new(rpo_secs), ..Default::default() }
    }

    /// Notes a new newest point of the source.
    pub fn newest_point(&self, time: jiff::Timestamp) {
        let ns = u64::try_from(time.as_nanosecond()).unwrap_or(0).max(1);
        self.newest_point_ns.fetch_max(ns, Ordering::Relaxed);
    }

    /// The newest point noted, if any.
    pub fn newest_point_time(&self) -> Option<jiff::Timestamp> {
        match self.newest_point_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => jiff::Timestamp::from_nanosecond(i128::from(ns)).ok(),
        }
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let l = format!("source=\"{}\"", self.source);
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{l}}} {value}");
        };
        metric(
            "ebb_stream_lag_seconds",
            "gauge",
            "Now minus the time of the newest state that is durable in the repository.",
            format!("{:.3}", get(&self.lag_ms) as f64 / 1000.0),
        );
        metric("ebb_stream_rpo_seconds", "gauge", "The recovery point objective.", get(&self.rpo_secs).to_string());
        metric(
            "ebb_stream_rpo_breached",
            "gauge",
            "1 while the lag is past the RPO.",
            u8::from(self.breached.load(Ordering::Relaxed)).to_string(),
        );
        metric("ebb_stream_points_total", "counter", "Recovery points committed.", get(&self.points).to_string());
        metric(
            "ebb_stream_fragments_total",
            "counter",
            "Fragments committed (bytes appended to files, between points).",
            get(&self.fragments).to_string(),
        );
        metric(
            "ebb_stream_bytes_shipped_total",
            "counter",
            "Bytes stored in the repository (encrypted and compressed).",
            get(&self.bytes_shipped).to_string(),
        );
        metric("ebb_stream_errors_total", "counter", "Failed attempts to ship.", get(&self.errors).to_string());
        metric(
            "ebb_stream_newest_point_timestamp_seconds",
            "gauge",
            "Unix time of the source's newest recovery point (0: none yet).",
            format!("{:.3}", get(&self.newest_point_ns) as f64 / 1e9),
        );
        metric(
            "ebb_stream_durable_timestamp_seconds",
            "gauge",
            "Unix time of the newest durable state.",
            format!("{:.3}", get(&self.durable_ms) as f64 / 1000.0),
        );
        if let Some(p) = self.last_prune.lock().expect("last prune lock").as_ref() {
            metric(
                "ebb_stream_last_prune_timestamp_seconds",
                "gauge",
                "Unix time the last forget and prune of --prune-every ended.",
                format!("{:.3}", p.at.as_millisecond() as f64 / 1000.0),
            );
            metric(
                "ebb_stream_last_prune_ok",
                "gauge",
                "1 if the last forget and prune of --prune-every succeeded.",
                u8::from(p.error.is_none()).to_string(),
            );
        }
        out
    }
}

/// Serves `metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else { continue };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut got = 0;
            // The request head; its first line is all that matters.
            while got < buf.len() {
                match tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut buf[got..])).await {
                    Ok(Ok(n)) if n > 0 => got += n,
                    _ => break,
                }
                if buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..got]);
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = if head.starts_with("GET ") && (path == "/metrics" || path == "/") {
                ("200 OK", metrics.render())
            } else {
                ("404 Not Found", "not found: metrics are at /metrics\n".to_string())
            };
            let reply = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(reply.as_bytes()).await;
        });
    }
}
