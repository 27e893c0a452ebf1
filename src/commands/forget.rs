//! `ebb forget`: each source's policy applied, every point listed as kept (and by
//! which rules) or removed.

use std::process::ExitCode;

use anyhow::Result;
use catalog::SourceVerdicts;
use serde_json::json;

use crate::cli::Global;
use crate::context::{host, open};
use crate::output::table;

pub async fn forget(g: &Global, source: Option<String>, dry_run: bool, json: bool) -> Result<ExitCode> {
    let repo = open(g).await?;
    let verdicts = catalog::judge(&repo, source.as_deref()).await?;
    let done = if dry_run { None } else { Some(catalog::forget(&repo, &verdicts, &host()).await?) };
    if json {
        let v: Vec<_> = verdicts
            .iter()
            .map(|sv| {
                let points: Vec<_> = sv
                    .points
                    .iter()
                    .map(|v| {
                        json!({
                            "name": v.point.name,
                            "time": v.point.time.to_string(),
                            "id": v.point.short_id(),
                            "keep": v.keep,
                            "reasons": v.reasons,
                        })
                    })
                    .collect();
                json!({
                    "source": sv.source,
                    "rules": sv.policy.as_ref().map(|p| p.policy.describe()),
                    "kept": sv.points.iter().filter(|v| v.keep).count(),
                    "removed": sv.removed().count(),
                    "points": points,
                })
            })
            .collect();
        let out = json!({"dry_run": dry_run, "sources": v, "records": done.map(|d| d.records).unwrap_or_default()});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    for sv in &verdicts {
        print_source(sv, dry_run);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_source(sv: &SourceVerdicts, dry_run: bool) {
    let rules = sv.policy.as_ref().map(|p| p.policy.describe()).unwrap_or_default();
    if rules.is_empty() {
        println!("{}: no retention policy (`ebb policy set`): all {} points kept", sv.source, sv.points.len());
        return;
    }
    println!("{}: {}", sv.source, rules.join(", "));
    let rows: Vec<Vec<String>> = sv
        .points
        .iter()
        .rev()
        .map(|v| {
            let action = match (v.keep, dry_run) {
                (true, _) => "keep",
                (false, true) => "would remove",
                (false, false) => "removed",
            };
            let why: Vec<&str> = v.reasons.iter().map(|r| r.as_str()).collect();
            vec![v.point.time.to_string(), v.point.short_id().to_string(), action.into(), why.join(", ")]
        })
        .collect();
    table(&["TIME", "ID", "ACTION", "KEPT BY"], &rows);
    let removed = sv.removed().count();
    let verb = if dry_run { "would be removed" } else { "removed" };
    println!(
        "{}: {} kept, {removed} {verb}{}",
        sv.source,
        sv.points.len() - removed,
        if removed > 0 { "; `ebb prune` then deletes the data only they referenced" } else { "" }
    );
}
