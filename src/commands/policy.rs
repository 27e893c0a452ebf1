//! `ebb policy set|show`: the retention rules of each source, kept in the repository.

use std::process::ExitCode;

use anyhow::Result;
use catalog::retention::{system_zone_name, Policy};
use catalog::StoredPolicy;
use serde_json::json;

use crate::cli::{Global, PolicySetArgs, UsageError};
use crate::context::{host, open};
use crate::output::table;

pub async fn set(g: &Global, a: Box<PolicySetArgs>) -> Result<ExitCode> {
    let a = *a;
    let counts = [a.keep_last, a.keep_hourly, a.keep_daily, a.keep_weekly, a.keep_monthly, a.keep_yearly];
    let names_a_rule = counts.iter().any(Option::is_some) || a.keep_within.is_some() || a.pitr_within.is_some();
    if !names_a_rule && !a.clear && a.time_zone.is_none() {
        return Err(UsageError(
            "name at least one rule to set (--keep-last, --keep-within, --keep-daily, … --pitr-within), \
             --time-zone, or --clear"
                .into(),
        )
        .into());
    }
    if let Some(z) = &a.time_zone {
        catalog::retention::zone(z).map_err(|e| UsageError(e.to_string()))?;
    }
    let repo = open(g).await?;
    let source = repo.point_names().pick_source(a.source).await?;
    let current = repo.policy(&source).await?.map(|s| s.policy);
    let mut p = if a.clear { Policy::default() } else { current.clone().unwrap_or_default() };
    let set = |field: &mut u32, v: Option<u32>| {
        if let Some(v) = v {
            *field = v;
        }
    };
    set(&mut p.keep_last, a.keep_last);
    set(&mut p.keep_hourly, a.keep_hourly);
    set(&mut p.keep_daily, a.keep_daily);
    set(&mut p.keep_weekly, a.keep_weekly);
    set(&mut p.keep_monthly, a.keep_monthly);
    set(&mut p.keep_yearly, a.keep_yearly);
    if let Some(s) = a.keep_within {
        p.keep_within = s.0;
    }
    if let Some(s) = a.pitr_within {
        p.pitr_within = s.0;
    }
    p.time_zone = match a.time_zone {
        Some(z) => z,
        None if p.time_zone.is_empty() => system_zone_name(),
        None => p.time_zone,
    };
    repo.set_policy(&source, p.clone(), host()).await?;
    let rules = p.describe();
    if rules.is_empty() {
        println!("{source}: no rules: `ebb forget` keeps every point");
    } else {
        println!("{source}: {} (time zone {})", rules.join(", "), p.time_zone);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn show(g: &Global, source: Option<String>, json: bool) -> Result<ExitCode> {
    let repo = open(g).await?;
    let sources = match source {
        Some(s) => vec![s],
        None => {
            let mut all = repo.sources().await?;
            all.extend(repo.policy_sources().await?);
            all.sort();
            all.dedup();
            all
        }
    };
    let mut shown: Vec<(String, Option<StoredPolicy>)> = Vec::new();
    for s in sources {
        let p = repo.policy(&s).await?;
        shown.push((s, p));
    }
    if json {
        let v: Vec<_> = shown
            .iter()
            .map(|(source, p)| match p {
                None => json!({"source": source, "policy": null}),
                Some(p) => json!({
                    "source": source,
                    "policy": p.policy,
                    "rules": p.policy.describe(),
                    "set": p.set,
                    "host": p.host,
                }),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = shown
        .iter()
        .map(|(source, p)| match p {
            None => vec![source.clone(), "none: every point is kept".into(), "-".into(), "-".into()],
            Some(p) => {
                let rules = p.policy.describe();
                let rules = if rules.is_empty() { "none: every point is kept".into() } else { rules.join(", ") };
                vec![source.clone(), rules, p.policy.time_zone.clone(), format!("{} by {}", p.set, p.host)]
            }
        })
        .collect();
    table(&["SOURCE", "RULES", "TIME ZONE", "SET"], &rows);
    Ok(ExitCode::SUCCESS)
}
