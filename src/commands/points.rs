//! `ebb points`: the points of a span of time, and what each PostgreSQL source can
//! be restored to.

use std::process::ExitCode;

use anyhow::Result;
use catalog::time::TimeSpec;
use catalog::{Manifest, PointRef, Repository};
use jiff::Timestamp;
use serde_json::json;

use crate::cli::{Global, UsageError};
use crate::context::open;
use crate::output::{bytes, point_json, table};

pub async fn points(
    g: &Global,
    source: Option<String>,
    since: Option<TimeSpec>,
    until: Option<TimeSpec>,
    json: bool,
) -> Result<ExitCode> {
    let span = catalog::Span::new(since, until, Timestamp::now())
        .map_err(|e| UsageError(format!("--since {} is after --until {}: no point can be both", e.since, e.until)))?;
    let repo = open(g).await?;
    let selected = repo.point_names().points_within(source.as_deref(), span).await?;
    // One manifest that cannot be read (damaged, foreign, gone) is listed as such;
    // the others are listed.
    let mut manifests = Vec::with_capacity(selected.len());
    for (p, r) in selected.iter().zip(repo.manifests_of(&selected).await?) {
        manifests.push(r.map_err(|e| {
            eprintln!("warning: point {} of {} cannot be read: {e}", p.time, p.source);
            e.to_string()
        }));
    }
    if json {
        let v: Vec<_> = selected
            .iter()
            .zip(&manifests)
            .map(|(p, m)| match m {
                Ok(m) => point_json(p, Some(m)),
                Err(e) => {
                    let mut v = point_json(p, None);
                    v["damaged"] = json!(e);
                    v
                }
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(listed(&manifests));
    }
    let rows: Vec<Vec<String>> = selected
        .iter()
        .zip(&manifests)
        .map(|(p, m)| {
            let Ok(m) = m else {
                let dash = || "-".to_string();
                return vec![
                    p.time.to_string(),
                    p.source.clone(),
                    p.short_id().to_string(),
                    dash(),
                    dash(),
                    dash(),
                    dash(),
                    "DAMAGED: cannot be read (`ebb verify` says more)".into(),
                ];
            };
            let mut note = String::new();
            if !m.skipped.is_empty() {
                note = format!("{} skipped", m.skipped.len());
            }
            if let Some(pg) = &m.pg {
                note = format!("base backup, timeline {}, WAL {}..{}", pg.timeline, pg.start_lsn, pg.stop_lsn);
            }
            vec![
                p.time.to_string(),
                p.source.clone(),
                p.short_id().to_string(),
                m.stats.files.to_string(),
                bytes(m.stats.bytes),
                bytes(m.stats.new_bytes),
                m.path.clone(),
                note,
            ]
        })
        .collect();
    table(&["TIME", "SOURCE", "ID", "FILES", "SIZE", "ADDED", "PATH", "NOTE"], &rows);
    pg_ranges(&repo, &selected, &manifests).await?;
    Ok(listed(&manifests))
}

/// Like `ls` and `find`: everything that could be read is listed, and the exit code
/// says whether something could not be (a damaged or swapped manifest is a reason
/// to look, even for a script that only reads the list).
fn listed(manifests: &[Result<Manifest, String>]) -> ExitCode {
    if manifests.iter().any(|m| m.is_err()) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// For each PostgreSQL source listed: the times it can be restored to, and any gap.
async fn pg_ranges(repo: &Repository, points: &[PointRef], manifests: &[Result<Manifest, String>]) -> Result<()> {
    let mut backups: std::collections::BTreeMap<&str, Vec<(Timestamp, catalog::wal::Lsn)>> = Default::default();
    for (p, m) in points.iter().zip(manifests) {
        let Ok(m) = m else { continue };
        if let Some(lsn) = m.pg.as_ref().and_then(|pg| streamer::pg::info::start(pg).ok()) {
            backups.entry(&p.source).or_default().push((p.time, lsn));
        }
    }
    for (source, b) in backups {
        let r = streamer::pg::restore::restorable(repo, source, &b).await?;
        let show = |t: Option<Timestamp>| t.map_or("-".to_string(), |t| t.to_string());
        println!(
            "{source}: restorable from {} to {} (timeline {}, WAL to {})",
            show(r.from),
            show(r.to),
            r.timeline,
            r.wal_end.as_deref().unwrap_or("-")
        );
        for g in &r.gaps {
            println!(
                "{source}: GAP in the WAL of timeline {} from {} to {} (WAL resumes from {}): restoring past it needs \
                 a base backup taken after it",
                g.timeline,
                g.from,
                g.to,
                show(g.until)
            );
        }
    }
    Ok(())
}
