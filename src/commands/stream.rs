//! `ebb stream dir|pg`: continuous shipping of a tree or of PostgreSQL's WAL, one
//! writer per source, until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use streamer::pg::dsn::Dsn;
use streamer::pg::walstream::PgStreamOptions;
use streamer::state;

use crate::cli::{DirArgs, Global, PgStreamArgs, UsageError};
use crate::context::{file_workers, host, open, repo_url, source_or_host, walk_excludes};
use crate::output::humanize;

/// `ebb stream dir`: ships a tree as it changes, within its RPO.
pub async fn dir(g: &Global, d: DirArgs) -> Result<ExitCode> {
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
        streamer::PathPatterns::below("--append", &d.appends, Some(&root)).map_err(|e| UsageError(e.to_string()))?,
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
    let upkeep = upkeep(&repo, &source, d.prune_every, &metrics);
    let r = holding(&repo, &source, "stream dir", async {
        streamer::stream_dir(repo.clone(), opts, metrics, stop_requested()).await.map_err(anyhow::Error::from)
    })
    .await;
    upkeep.inspect(|u| u.abort());
    r?;
    eprintln!("stopped streaming {source}");
    Ok(ExitCode::SUCCESS)
}

/// `ebb stream pg`: WAL as a replica receives it, and base backups if asked.
pub async fn pg(g: &Global, a: PgStreamArgs) -> Result<ExitCode> {
    let source = source_or_host(a.source)?;
    let dsn = Dsn::parse(&a.dsn).map_err(|e| UsageError(e.to_string()))?;
    let slot = a.slot.unwrap_or_else(|| streamer::pg::default_slot(&source));
    let url = repo_url(g)?;
    let state_file = state::claim(a.state_dir, &url, &source)?;
    let metrics = serve_metrics(&source, a.rpo, a.metrics_addr).await?;
    let repo = open(g).await?;
    let opts = PgStreamOptions {
        source: source.clone(),
        dsn: dsn.config.clone(),
        dsn_display: dsn.shown.clone(),
        slot: slot.clone(),
        flush_interval: a.flush_interval,
        rpo: a.rpo,
        repository: url.clone(),
        state_file,
    };
    if let Some(every) = a.base_backup_every {
        let (repo, bb) = (repo.clone(), dsn.base_backup(&source, host()));
        let metrics = metrics.clone();
        tokio::spawn(async move {
            loop {
                match streamer::pg::basebackup::base_backup(&repo, &bb).await {
                    Ok((point, _)) => {
                        metrics.newest_point(point.time);
                        tracing::info!("base backup {} of {} saved", point.time, bb.source)
                    }
                    Err(e) => tracing::error!("base backup of {} failed: {e}", bb.source),
                }
                tokio::time::sleep(every).await;
            }
        });
    }
    eprintln!("streaming WAL of {} as {source} to {url} (slot {slot}); stop with Ctrl-C or SIGTERM", dsn.shown);
    let upkeep = upkeep(&repo, &source, a.prune_every, &metrics);
    let r = holding(&repo, &source, "stream pg", async {
        streamer::pg::walstream::stream_pg(repo.clone(), opts, metrics, stop_requested())
            .await
            .map_err(anyhow::Error::from)
    })
    .await;
    upkeep.inspect(|u| u.abort());
    r?;
    eprintln!("stopped streaming {source}");
    Ok(ExitCode::SUCCESS)
}

/// Runs `work` holding `source`'s lease in the repository (`catalog::holding`).
async fn holding<T>(
    repo: &catalog::Repository,
    source: &str,
    what: &str,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    catalog::holding(repo, source, catalog::Holder::this_process(host(), what), state::pid_alive, work).await
}

/// Forget and prune every `every`, when given, beside the stream.
fn upkeep(
    repo: &catalog::Repository,
    source: &str,
    every: Option<Duration>,
    metrics: &Arc<streamer::metrics::Metrics>,
) -> Option<tokio::task::JoinHandle<()>> {
    let every = every?;
    eprintln!("forgetting {source} by its policy and pruning the repository every {}", humanize(every));
    let task = streamer::upkeep::prune_every(repo.clone(), source.to_string(), host(), every, metrics.clone());
    Some(tokio::spawn(task))
}

/// A stream's metrics, served at `addr` when given.
async fn serve_metrics(
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
async fn stop_requested() {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("install a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
