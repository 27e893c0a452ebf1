//! `ebb verify`: checking the repository, its data read in full if asked.

use std::process::ExitCode;

use anyhow::Result;
use serde_json::json;

use crate::cli::Global;
use crate::context::open;
use crate::output::spinner;

pub async fn verify(g: &Global, read_data: bool, json: bool) -> Result<ExitCode> {
    let repo = open(g).await?;
    let pb = spinner(g.quiet);
    let progress = {
        let pb = pb.clone();
        move |s: &str| pb.set_message(format!("checking {s}"))
    };
    let report = catalog::verify(&repo, read_data, &progress).await;
    pb.finish_and_clear();
    let r = report?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "points": r.points, "trees": r.trees, "data_blobs": r.data_blobs, "packs": r.packs,
                "packs_read": r.packs_read, "index_files": r.index_files, "fragments": r.fragments,
                "unreferenced_packs": r.unreferenced_packs,
                "packs_of_missing_points": r.packs_of_missing_points, "forgotten_points": r.forgotten_points,
                "errors": r.errors,
            }))?
        );
    } else {
        println!(
            "checked {} points, {} fragments, {} trees, {} data blobs, {} index files, {} packs{}",
            r.points,
            r.fragments,
            r.trees,
            r.data_blobs,
            r.index_files,
            r.packs,
            if read_data { format!(" ({} read in full)", r.packs_read) } else { String::new() }
        );
        if r.unreferenced_packs > 0 {
            println!(
                "{} packs are referenced by no point or fragment (left by an interrupted backup or by forgotten \
                 points; `ebb prune` deletes them)",
                r.unreferenced_packs
            );
        }
        if r.forgotten_points > 0 {
            println!("{} forgotten points still have index files (`ebb prune` removes them)", r.forgotten_points);
        }
        for e in &r.errors {
            eprintln!("error: {e}");
        }
    }
    if r.errors.is_empty() {
        if !json {
            println!("no errors found");
        }
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("verify found {} problems", r.errors.len());
        Ok(ExitCode::from(1))
    }
}
