//! `ebb sources`: each source, its points, its newest readable state and its lag.

use std::process::ExitCode;

use anyhow::Result;
use jiff::Timestamp;
use serde_json::json;

use crate::cli::Global;
use crate::context::open;
use crate::output::table;

pub async fn sources(g: &Global, json: bool) -> Result<ExitCode> {
    let repo = open(g).await?;
    let mut rows = Vec::new();
    let mut out = Vec::new();
    let now = Timestamp::now();
    for source in repo.sources().await? {
        let points = repo.points(&source).await?;
        let Some(first) = points.first() else { continue };
        // The newest point that can be read, at or before now: a damaged or garbage
        // object is not taken for the source's state.
        let newest = repo.readable_point_at(&source, now).await?;
        for (p, why) in newest.iter().flat_map(|r| &r.damaged) {
            eprintln!("warning: point {} of {source} cannot be read: {why}", p.time);
        }
        let newest = newest.map(|r| r.point.time);
        // A PostgreSQL source is as recent as its newest WAL, not its last base backup.
        let wal = match streamer::pg::restore::wal_newest(&repo, &source).await {
            Ok(t) => t,
            Err(e) => {
                eprintln!("warning: the newest WAL of {source} cannot be read: {e}");
                None
            }
        };
        let durable = newest.max(wal);
        let lag = durable.map(|t| now.duration_since(t).as_secs_f64());
        out.push(json!({
            "source": source,
            "points": points.len(),
            "oldest": first.time.to_string(),
            "newest": newest.map(|t| t.to_string()),
            "wal_newest": wal.map(|t| t.to_string()),
            "lag_seconds": lag,
        }));
        rows.push(vec![
            source.clone(),
            points.len().to_string(),
            first.time.to_string(),
            newest.map_or("-".into(), |t| t.to_string()),
            lag.map_or("-".into(), |l| format!("{l:.0} s")),
        ]);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if rows.is_empty() {
        println!("no sources yet: make a point with `ebb backup PATH`");
    } else {
        table(&["SOURCE", "POINTS", "OLDEST", "NEWEST", "LAG"], &rows);
    }
    Ok(ExitCode::SUCCESS)
}
