//! `ebb restore`: a tree, or part of it, as it was at a moment.

use std::os::unix::ffi::OsStrExt;
use std::process::ExitCode;

use anyhow::Result;
use catalog::time::TimeSpec;
use catalog::{RepoError, Repository};
use jiff::Timestamp;
use serde_json::json;

use crate::cli::{Global, UsageError};
use crate::context::open;
use crate::output::{bytes, progress_bar};

/// The source a reading command works on: the one given, or the only one there is.
async fn pick_source(repo: &Repository, source: Option<String>) -> Result<String> {
    repo.point_names().pick_source(source).await.map_err(|e| match e {
        e @ RepoError::SeveralSources { .. } => UsageError(e.to_string()).into(),
        e => e.into(),
    })
}

/// How to restore: `--overwrite`, `--memory`, `--json`.
pub struct How {
    pub overwrite: bool,
    pub memory: u64,
    pub json: bool,
}

/// Less than this and a restore would fetch one small span at a time.
const MIN_MEMORY: u64 = 16 << 20;

/// Buffers of 4 MiB and more (store reads, spans of packs) are mapped and go back
/// to the system when freed, so memory follows what a restore holds (its
/// `--memory`) rather than what glibc's per-thread arenas keep: without this, they
/// kept three times the budget resident.
pub fn return_large_buffers() {
    // SAFETY: mallopt only changes the allocator's tuning, under its own lock.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20) };
}

pub async fn restore(
    g: &Global,
    at: TimeSpec,
    source: Option<String>,
    path: Option<std::path::PathBuf>,
    target: std::path::PathBuf,
    how: How,
) -> Result<ExitCode> {
    if how.memory < MIN_MEMORY {
        return Err(
            UsageError(format!("--memory {} is too small: at least {}", bytes(how.memory), bytes(MIN_MEMORY))).into()
        );
    }
    if let Some(p) = &path {
        if p.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            return Err(UsageError(format!("--path {} must not contain '..'", p.display())).into());
        }
    }
    let repo = open(g).await?;
    let source = pick_source(&repo, source).await?;
    let now = Timestamp::now();
    let named = repo.resolve(&source, at, now).await?;
    // A point that cannot be read is passed over for the one before it, with a warning.
    let catalog::Readable { point, manifest, damaged } =
        repo.readable_point_at(&source, named.time).await?.ok_or_else(|| {
            anyhow::anyhow!(
                "no point of source {source} at or before {} can be read (`ebb verify` says what is damaged)",
                at.instant(now)
            )
        })?;
    for (p, why) in &damaged {
        eprintln!("warning: point {} cannot be read ({why}); restoring the one before it, {}", p.time, point.time);
    }
    let overlay = repo.overlay(&point, at.instant(now)).await?;
    let appends =
        if overlay.is_empty() { String::new() } else { format!(" with the appends until {}", at.instant(now)) };
    eprintln!("restoring point {} of source {} ({}){appends}", point.time, point.source, manifest.path);
    return_large_buffers();
    let progress = std::sync::Arc::new(catalog::RestoreProgress::default());
    let opts = catalog::RestoreOptions {
        path: path.map(|p| p.as_os_str().as_bytes().to_vec()),
        target: target.clone(),
        overlay,
        overwrite: how.overwrite,
        memory: usize::try_from(how.memory).unwrap_or(usize::MAX),
        write_back: false,
        progress: progress.clone(),
    };
    let started = std::time::Instant::now();
    let shown = show_progress(g.quiet, progress);
    let report = catalog::restore(&repo, &manifest, opts).await;
    shown.abort();
    let report = report?;
    let seconds = started.elapsed().as_secs_f64();
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    if how.json {
        let failed: Vec<_> =
            report.failed.iter().map(|(p, why)| json!({ "path": p.display().to_string(), "error": why })).collect();
        let summary = json!({
            "source": point.source,
            "point": point.time.to_string(),
            "target": target.display().to_string(),
            "files": report.files,
            "dirs": report.dirs,
            "others": report.others,
            "bytes": report.bytes,
            "unchanged_files": report.unchanged,
            "unchanged_bytes": report.unchanged_bytes,
            "removed": report.removed,
            "fetched_bytes": report.fetched,
            "seconds": seconds,
            "bytes_per_second": rate(report.bytes + report.unchanged_bytes, seconds),
            "failed": failed,
            "warnings": report.warnings.len(),
        });
        println!("{summary}");
    } else {
        let kept = if how.overwrite {
            format!(
                "; {} files ({}) were already there, {} entries removed",
                report.unchanged,
                bytes(report.unchanged_bytes),
                report.removed
            )
        } else {
            String::new()
        };
        println!(
            "restored {} files, {} dirs, {} other entries, {} into {} in {:.1}s ({}/s, {} fetched){kept}",
            report.files,
            report.dirs,
            report.others,
            bytes(report.bytes),
            target.display(),
            seconds,
            bytes(rate(report.bytes + report.unchanged_bytes, seconds)),
            bytes(report.fetched),
        );
    }
    if !report.failed.is_empty() {
        eprintln!("error: {} entries could not be restored and were left out:", report.failed.len());
        for (p, why) in &report.failed {
            eprintln!("  {}: {why}", p.display());
        }
        if report.unreadable > 0 {
            eprintln!("run `ebb verify --read-data` to see what is damaged in the repository");
        }
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

fn rate(bytes: u64, seconds: f64) -> u64 {
    if seconds > 0.0 {
        (bytes as f64 / seconds) as u64
    } else {
        0
    }
}

/// Shows files, bytes, rate and (when the totals are known) ETA on a terminal,
/// until aborted.
fn show_progress(quiet: bool, p: std::sync::Arc<catalog::RestoreProgress>) -> tokio::task::JoinHandle<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let pb = progress_bar(quiet);
    tokio::spawn(async move {
        let _clear = clear_on_drop(pb.clone());
        loop {
            let (files, total_files) = (p.files.load(Relaxed), p.total_files.load(Relaxed));
            pb.set_length(p.total_bytes.load(Relaxed));
            pb.set_position(p.bytes.load(Relaxed));
            let of = if total_files > 0 { format!("/{total_files}") } else { String::new() };
            pb.set_message(format!("{files}{of} files, {} fetched", bytes(p.fetched.load(Relaxed))));
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
}

/// Clears the progress bar when the task showing it ends or is aborted.
fn clear_on_drop(pb: indicatif::ProgressBar) -> impl Drop {
    struct Clear(indicatif::ProgressBar);
    impl Drop for Clear {
        fn drop(&mut self) {
            self.0.finish_and_clear();
        }
    }
    Clear(pb)
}
