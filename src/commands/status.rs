//! `ebb status`: the RPO of each stream of this host, from the state files they
//! keep: lag, state and last error, and exit 1 when one is past it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use jiff::Timestamp;
use serde_json::json;
use streamer::state;

use crate::cli::Global;
use crate::context::repo_url;
use crate::output::{humanize, table};

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
                    "last_prune": s.last_prune,
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
                let prune = match &s.last_prune {
                    None => "-".to_string(),
                    Some(p) => match &p.error {
                        None => format!("{} ok", p.at),
                        Some(e) => format!("{} FAILED: {e}", p.at),
                    },
                };
                vec![
                    s.source.clone(),
                    s.kind.clone(),
                    humanize(Duration::from_secs(s.rpo_secs)),
                    format!("{:.1}s", s.lag(now).as_secs_f64()),
                    state.to_string(),
                    s.newest_point.map(|t| t.to_string()).unwrap_or_else(|| "-".into()),
                    prune,
                    s.last_error.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        table(&["SOURCE", "KIND", "RPO", "LAG", "STATE", "NEWEST POINT", "LAST PRUNE", "LAST ERROR"], &rows);
    }
    Ok(if breached { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
