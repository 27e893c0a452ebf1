//! `ebb init`: a new repository, refused where one (or data) is already.

use std::process::ExitCode;

use anyhow::Result;
use catalog::{Repository, Store};

use crate::cli::{Global, UsageError};
use crate::context::{host, repo_url};
use crate::secret::secret;

pub async fn init(g: &Global) -> Result<ExitCode> {
    let url = repo_url(g)?;
    if url.starts_with("memory://") {
        return Err(UsageError(
            "memory:// is for ebb's own tests: a repository there would vanish when ebb exits; \
             use file:///path or s3://bucket/prefix"
                .into(),
        )
        .into());
    }
    let store = Store::open(&url, true)?;
    // Refused before a password is asked for: a repository, or data, is there.
    Repository::init_plan(&store).await?;
    let secret = secret(g, true)?;
    let (repo, created) = Repository::init(store, &secret, catalog::DEFAULT_KDF, host()).await?;
    match created {
        catalog::Created::New => eprintln!("created ebb repository {} at {url}", repo.id().short()),
        catalog::Created::Finished => {
            eprintln!("finished the interrupted creation of ebb repository {} at {url}", repo.id().short())
        }
    }
    eprintln!("keep the password safe: without it the data cannot be read, by you or anyone");
    Ok(ExitCode::SUCCESS)
}
