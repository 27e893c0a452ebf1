//! `ebb restore`: a tree, or part of it, as it was at a moment.

use std::os::unix::ffi::OsStrExt;
use std::process::ExitCode;

use anyhow::Result;
use catalog::time::TimeSpec;
use catalog::{RepoError, Repository};
use jiff::Timestamp;

use crate::cli::{Global, UsageError};
use crate::context::open;
use crate::output::{bytes, spinner};

/// The source a reading command works on: the one given, or the only one there is.
async fn pick_source(repo: &Repository, source: Option<String>) -> Result<String> {
    repo.point_names().pick_source(source).await.map_err(|e| match e {
        e @ RepoError::SeveralSources { .. } => UsageError(e.to_string()).into(),
        e => e.into(),
    })
}

pub async fn restore(
    g: &Global,
    at: TimeSpec,
    source: Option<String>,
    path: Option<std::path::PathBuf>,
    target: std::path::PathBuf,
) -> Result<ExitCode> {
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
    let opts = catalog::RestoreOptions {
        path: path.map(|p| p.as_os_str().as_bytes().to_vec()),
        target: target.clone(),
        overlay,
    };
    let pb = spinner(g.quiet);
    pb.set_message(format!("restoring into {}", target.display()));
    let report = catalog::restore(&repo, &manifest, opts).await;
    pb.finish_and_clear();
    let report = report?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    println!(
        "restored {} files, {} dirs, {} other entries, {} into {}",
        report.files,
        report.dirs,
        report.others,
        bytes(report.bytes),
        target.display()
    );
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
