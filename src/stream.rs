//! `ebb stream dir` and `ebb status`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use jiff::Timestamp;
use serde_json::json;
use streamer::state;

use crate::cli::{DirArgs, Global};
use crate::context::{file_workers, host, open, repo_url, source_or_host, walk_excludes};
use crate::output::table;
use crate::UsageError;

pub async fn stream_dir(g: &Global, d: DirArgs) -> Result<ExitCode> {
    let source = source_or_host(d.source)?;
    match std::fs::metadata(&d.path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(UsageError(format!("{} is not a directory", d.path.display())).into()),
        Err(e) => return Err(UsageError(format!("cannot stream {}: {e}", d.path.display())).into()),
    }
    let url = repo_url(g)?;
    let state_file = state::claim(d.state_dir, &url, &source)?;
    let state_dir: Vec<PathBuf> = state_file.iter().filter_map(|f| f.parent().map(PathBuf::from)).collect();
    let excludes = walk_excludes(g, &d.exclude, &d.path, &state_dir)?;
    let root = std::fs::canonicalize(&d.path).map_err(|e| UsageError(format!("{}: {e}", d.path.display())))?;
    let appends = Arc::new(
        streamer::Excludes::below("--append", &d.appends, Some(&root)).map_err(|e| UsageError(e.to_string()))?,
    );
    let metrics = serve_metrics(&source, d.rpo, d.metrics_addr).await?;
    let repo = open(g).await?;
    let opts = streamer::StreamOptions {
        snapshot: streamer::SnapshotOptions {
            source: source.clone(),
            path: d.path.clone(),
            host: host(),
            workers: file_workers(),
            excludes,
            appends,
            tails: None,
        },
        repository: url.clone(),
        rpo: d.rpo,
        rescan: d.rescan,
        append_interval: d.append_interval,
        state_file,
    };
    eprintln!(
        "streaming {} as {source} to {url} (RPO {}); stop with Ctrl-C or SIGTERM",
        d.path.display(),
        humanize(d.rpo)
    );
    holding(&repo, &source, "stream dir", async {
        streamer::stream_dir(repo.clone(), opts, metrics, stop_requested()).await.map_err(anyhow::Error::from)
    })
    .await?;
    eprintln!("stopped streaming {source}");
    Ok(ExitCode::SUCCESS)
}

/// Runs `work` holding `source`'s lease in the repository (`catalog::holding`).
pub async fn holding<T>(
    repo: &catalog::Repository,
    source: &str,
    what: &str,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    catalog::holding(repo, source, catalog::Holder::this_process(host(), what), state::pid_alive, work).await
}

/// A stream's metrics, served at `addr` when given.
pub async fn serve_metrics(
    source: &str,
    rpo: Duration,
    addr: Option<std::net::SocketAddr>,
) -> Result<Arc<streamer::metrics::Metrics>> {
    let metrics = Arc::new(streamer::metrics::Metrics::new(source, rpo.as_secs()));
    if let Some(addr) = addr {
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listen for metrics on {addr}"))?;
        tokio::spawn(streamer::metrics::serve(listener, metrics.clone()));
    }
    Ok(metrics)
}

/// Completes on SIGINT or SIGTERM.
pub async fn stop_requested() {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("install a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

pub async fn status(g: &Global, state_dir: Option<PathBuf>, json_out: bool) -> Result<ExitCode> {
    let url = repo_url(g)?;
    let dir = state_dir
        .or_else(state::default_state_dir)
        .context("no state directory: set EBB_STATE_DIR or HOME, or pass --state-dir")?;
    let streams =
        state::read_all(&dir, &url).with_context(|| format!("read the stream states in {}", dir.display()))?;
    let now = Timestamp::now();
    let breached = streams.iter().any(|s| s.breached(now));
    if json_out {
        let v: Vec<_> = streams
            .iter()
            .map(|s| {
                json!({
                    "source": s.source,
                    "kind": s.kind,
                    "path": s.path,
                    "rpo_secs": s.rpo_secs,
                    "lag_secs": s.lag(now).as_secs_f64(),
                    "breached": s.breached(now),
                    "running": s.running(now),
                    "newest_point": s.newest_point.map(|t| t.to_string()),
                    "durable_as_of": s.durable_as_of.to_string(),
                    "last_error": s.last_error,
                    "last_error_at": s.last_error_at.map(|t| t.to_string()),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if streams.is_empty() {
        eprintln!("no stream of {url} has run on this host (state directory {})", dir.display());
    } else {
        let rows: Vec<Vec<String>> = streams
            .iter()
            .map(|s| {
                let state = match (s.running(now), s.breached(now), &s.last_error) {
                    (_, true, _) => "PAST RPO",
                    // Within the RPO, but not shipping: say so before the alarm fires.
                    (true, false, Some(_)) => "failing",
                    (true, false, None) => "ok",
                    (false, false, _) => "stopped",
                };
                vec![
                    s.source.clone(),
                    s.kind.clone(),
                    humanize(Duration::from_secs(s.rpo_secs)),
                    format!("{:.1}s", s.lag(now).as_secs_f64()),
                    state.to_string(),
                    s.newest_point.map(|t| t.to_string()).unwrap_or_else(|| "-".into()),
                    s.last_error.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        table(&["SOURCE", "KIND", "RPO", "LAG", "STATE", "NEWEST POINT", "LAST ERROR"], &rows);
    }
    Ok(if breached { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// `90s` as `1m30s`.
fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, 0, 0) => format!("{h}h"),
        (h, m, _) => format!("{h}h{m}m"),
    }
}
