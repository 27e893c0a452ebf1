//! `ebb backup`: one recovery point of a tree, with progress while it is made.

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use crate::cli::{Global, UsageError};
use crate::context::{file_workers, host, open, source_or_host, walk_excludes};
use crate::output::{bytes, point_json, spinner};

/// The exit status of a backup that saved its point without some entries.
pub const EXIT_SKIPPED: u8 = 3;

pub async fn backup(
    g: &Global,
    source: Option<String>,
    exclude: Vec<String>,
    json: bool,
    allow_skipped: bool,
    path: std::path::PathBuf,
) -> Result<ExitCode> {
    let source = source_or_host(source)?;
    if let Err(e) = std::fs::symlink_metadata(&path) {
        return Err(UsageError(format!("cannot back up {}: {e}", path.display())).into());
    }
    let excludes = walk_excludes(g, &exclude, &path, &[])?;
    let repo = open(g).await?;
    let counters = Arc::new(streamer::Counters::default());
    let opts = streamer::SnapshotOptions {
        source: source.clone(),
        path,
        host: host(),
        workers: file_workers(),
        excludes,
        appends: Default::default(),
        tails: None,
    };
    let pb = spinner(g.quiet);
    let ticker = {
        let pb = pb.clone();
        let c = counters.clone();
        tokio::spawn(async move {
            loop {
                pb.set_message(format!(
                    "{} files, {} scanned, {} read",
                    c.files.load(Ordering::Relaxed),
                    bytes(c.bytes.load(Ordering::Relaxed)),
                    bytes(c.bytes_read.load(Ordering::Relaxed))
                ));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let result = streamer::snapshot(&repo, &opts, counters).await;
    ticker.abort();
    pb.finish_and_clear();
    let (point, m) = result.map_err(|e| {
        let full = e.is_no_space();
        let e = anyhow::Error::from(e);
        if full {
            e.context(
                "the repository's filesystem is full: free space there and run the backup again; no point was saved",
            )
        } else {
            e
        }
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&point_json(&point, Some(&m)))?);
    } else {
        let s = &m.stats;
        println!(
            "point {} of source {} saved: {} files, {} dirs, {} in all, {} read, {} added in {:.1} s",
            point.time,
            point.source,
            s.files,
            s.dirs,
            bytes(s.bytes),
            bytes(s.bytes_read),
            bytes(s.new_bytes),
            s.duration_ms as f64 / 1000.0
        );
    }
    if !m.skipped.is_empty() {
        eprintln!("warning: {} entries could not be read and are not in this point:", m.skipped.len());
        for s in m.skipped.iter().take(20) {
            eprintln!("  {}: {}", s.path, s.error);
        }
        if m.skipped.len() > 20 {
            eprintln!("  … and {} more (see `ebb points --json`)", m.skipped.len() - 20);
        }
        if !allow_skipped {
            return Ok(ExitCode::from(EXIT_SKIPPED));
        }
    }
    Ok(ExitCode::SUCCESS)
}
