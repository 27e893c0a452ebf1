//! `ebb repair index|config`: rebuilding the index from the packs, and the header
//! object from the key slots.

use std::process::ExitCode;

use anyhow::Result;
use catalog::{Repository, Store};

use crate::cli::Global;
use crate::context::{open, repo_url};
use crate::output::spinner;
use crate::secret::secret;

pub async fn config(g: &Global) -> Result<ExitCode> {
    let url = repo_url(g)?;
    let store = Store::open(&url, false)?;
    let secret = secret(g, false)?;
    let repo = Repository::repair_config(store, &secret).await?;
    println!("wrote the config of repository {} at {url} again, from key slot {}", repo.id().short(), repo.slot());
    Ok(ExitCode::SUCCESS)
}

pub async fn index(g: &Global) -> Result<ExitCode> {
    let repo = open(g).await?;
    let pb = spinner(g.quiet);
    pb.set_message("reading the index and listing the packs");
    let r = catalog::repair_index(&repo).await;
    pb.finish_and_clear();
    let r = r?;
    println!(
        "index repaired: {} index files kept, {} rewritten, {} removed; {} entries of missing packs dropped; \
         {} packs indexed from their headers",
        r.kept, r.rewritten, r.removed, r.dropped_entries, r.indexed_packs
    );
    if r.dropped_entries > 0 {
        println!(
            "new backups store the content of the missing packs again; points that used it stay damaged \
             (`ebb verify` names them)"
        );
    }
    for p in &r.unreadable_packs {
        eprintln!("warning: pack header unreadable, so its pack stays unindexed: {p}");
    }
    Ok(ExitCode::SUCCESS)
}
