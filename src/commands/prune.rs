//! `ebb prune`: what no point needs, condemned now and deleted after the grace.

use std::process::ExitCode;

use anyhow::Result;
use catalog::{MaxUnused, PruneOptions, Timing};

use crate::cli::Global;
use crate::context::open;
use crate::output::{bytes, humanize, spinner};

pub async fn prune(g: &Global, dry_run: bool, max_unused: MaxUnused, memory: u64, json: bool) -> Result<ExitCode> {
    // Prune's memory is what it holds, not what its threads freed and the allocator
    // kept: two malloc arenas, not eight per core, and free memory given back every
    // second (on the 100,000-point bench history the first run's peak went from
    // 260 to 223 MiB with the trimming alone). The mount daemon does the same.
    // SAFETY: mallopt only tunes the allocator; any value is safe to pass.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let trim = tokio::spawn(async {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            // SAFETY: malloc_trim only returns free memory to the system.
            unsafe { libc::malloc_trim(0) };
        }
    });
    let repo = open(g).await?;
    let timing = Timing::from_env();
    let pb = spinner(g.quiet);
    let progress = {
        let pb = pb.clone();
        move |s: &str| pb.set_message(format!("reading {s}"))
    };
    let opts = PruneOptions {
        dry_run,
        timing,
        wal_positions: Some(streamer::pg::info::wal_positions),
        max_unused,
        max_memory: memory,
    };
    let report = catalog::prune(&repo, opts, &progress).await;
    trim.abort();
    pb.finish_and_clear();
    let r = report?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    let (would, verb) = if dry_run { ("would be ", "would ") } else { ("", "") };
    println!(
        "{} points and {} fragments use {} of {} packs ({} of {})",
        r.points,
        r.fragments,
        r.live_packs,
        r.packs,
        bytes(r.live_bytes),
        bytes(r.pack_bytes)
    );
    println!("{would}deleted: {} packs ({}), condemned by an earlier run", r.deleted_packs, bytes(r.deleted_bytes));
    if r.spared_packs > 0 {
        println!("spared: {} condemned packs, used again or rescued by a writer since", r.spared_packs);
    }
    println!(
        "{would}condemned: {} packs ({}), deleted by a run once {} have passed{}",
        r.condemned_packs,
        bytes(r.condemned_bytes),
        humanize(timing.grace),
        r.next_sweep.as_deref().map(|t| format!(" (from {t})")).unwrap_or_default()
    );
    if r.condemned_fragments + r.folded_fragments > 0 {
        println!(
            "fragments a later point holds: {} {would}deleted, {} {would}condemned",
            r.folded_fragments, r.condemned_fragments
        );
    }
    if r.wal_pieces > 0 {
        println!(
            "WAL: {} pieces; {} {would}deleted, {} {would}condemned (no kept base backup needs them, or a larger \
             piece holds them)",
            r.wal_pieces, r.deleted_wal_pieces, r.condemned_wal_pieces
        );
    }
    if r.merged_segments > 0 {
        println!("WAL: {} finished segments written again as one piece each", r.merged_segments);
    }
    if r.repack.packs > 0 {
        let rp = &r.repack;
        println!(
            "{verb}repacked: {} packs ({}, of it {} used) into {} new packs ({}); {} points {would}written again to \
             use them",
            rp.packs,
            bytes(rp.bytes),
            bytes(rp.used_bytes),
            rp.written_packs,
            bytes(rp.written_bytes),
            rp.rewritten_points
        );
    }
    if r.young_packs > 0 {
        println!(
            "unused but younger than {}: {} packs (a writer may be about to use them)",
            humanize(timing.grace),
            r.young_packs
        );
    }
    if r.deleted_objects > 0 {
        println!("{verb}deleted {} index files, records and other objects no longer needed", r.deleted_objects);
    }
    if r.merged_index_files > 0 {
        println!("merged {} small index files into a few larger ones", r.merged_index_files);
    }
    if r.rewritten_index_files > 0 {
        println!("{verb}wrote {} index files again without the packs deleted", r.rewritten_index_files);
    }
    if r.spilled_bytes > 0 {
        println!("held {} of what points use on local disk, past --memory", bytes(r.spilled_bytes));
    }
    for p in &r.problems {
        eprintln!("warning: {p}");
    }
    Ok(ExitCode::SUCCESS)
}
