//! What can go wrong: the errors that end a restore, and why one file could not
//! be restored (which only costs that file).

use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{BlobError, RepoError};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("{path:?} does not exist in this point")]
    NoSuchPath { path: String },
    #[error(
        "target {0} exists and is not an empty directory; restore into a new or empty directory, \
         or restore over it with --overwrite"
    )]
    TargetNotEmpty(PathBuf),
    #[error("target {0} exists and is not a directory")]
    TargetNotDirectory(PathBuf),
    #[error("{op} {}: {cause}", path.display())]
    Io { op: &'static str, path: PathBuf, cause: std::io::Error },
    #[error("the point's root tree is malformed: {0}")]
    BadRoot(String),
    #[error("the target's filesystem is full (writing {}: {cause}); free space there, or restore elsewhere", path.display())]
    TargetFull { path: PathBuf, cause: std::io::Error },
}

impl From<BlobError> for RestoreError {
    fn from(e: BlobError) -> RestoreError {
        RestoreError::Repo(e.into())
    }
}

/// Why one file could not be restored.
#[derive(Debug, Clone)]
pub(super) enum FileFailure {
    /// Its data could not be read from the repository.
    Repository(String),
    /// The target would not take it.
    Target(Arc<std::io::Error>),
}

impl FileFailure {
    pub fn target(e: std::io::Error) -> FileFailure {
        FileFailure::Target(Arc::new(e))
    }
}

impl std::fmt::Display for FileFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileFailure::Repository(why) => f.write_str(why),
            FileFailure::Target(e) => write!(f, "{e}"),
        }
    }
}

pub(super) fn no_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}
