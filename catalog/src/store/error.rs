//! What can go wrong with a store, as variants callers act on: not there, already
//! there, cut short, out of space, unreachable or unauthorised.

use std::ops::Range;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object {name} does not exist{}", missing_hint(name))]
    NotFound { name: String },
    #[error("object {name} already exists")]
    AlreadyExists { name: String },
    #[error("{op} {name}: {cause}")]
    Backend { op: &'static str, name: String, cause: object_store::Error },
    #[error("invalid repository URL {url:?}: {problem}")]
    BadUrl { url: String, problem: String },
    #[error(
        "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for \
         temporary ones), or run where the instance metadata service gives a role ({cause})"
    )]
    NoCredentials { cause: String },
    #[error("{op} {name}: {cause}")]
    Io { op: &'static str, name: String, cause: std::io::Error },
    #[error("object {name} is {size} bytes long, shorter than the range {}..{} read from it", range.start, range.end)]
    Short { name: String, range: Range<u64>, size: u64 },
}

/// What a missing object of this kind may mean.
fn missing_hint(name: &str) -> &'static str {
    if name.starts_with("packs/") {
        " (packs are deleted only by `ebb prune`, once no point uses them: the point read was forgotten and \
         pruned, or the pack was lost; `ebb verify` tells which points lack data)"
    } else if name.starts_with("points/") {
        " (the point was forgotten, or its manifest lost)"
    } else {
        ""
    }
}

impl StoreError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }

    /// Whether the object is not there, or not all there: what a damaged
    /// repository looks like, as opposed to a store that cannot be reached.
    pub fn is_missing_data(&self) -> bool {
        matches!(self, StoreError::NotFound { .. } | StoreError::Short { .. })
    }

    /// Whether the store's filesystem is full (ENOSPC or a quota), so that the
    /// user is told that rather than a generic write failure.
    pub fn is_no_space(&self) -> bool {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = match self {
            StoreError::Backend { cause, .. } => Some(cause),
            StoreError::Io { cause, .. } => Some(cause),
            _ => None,
        };
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                if matches!(io.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
                    || io.raw_os_error() == Some(libc::ENOSPC)
                {
                    return true;
                }
            }
            cause = e.source();
        }
        false
    }

    pub(super) fn from_backend(op: &'static str, name: &str, e: object_store::Error) -> StoreError {
        // With no credentials in the environment, the S3 client asks the instance
        // metadata service for a role's: its refusal is no help to the user.
        if e.to_string().contains("169.254.169.254") {
            return StoreError::NoCredentials { cause: e.to_string() };
        }
        match e {
            object_store::Error::NotFound { .. } => StoreError::NotFound { name: name.to_string() },
            object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => {
                StoreError::AlreadyExists { name: name.to_string() }
            }
            cause => StoreError::Backend { op, name: name.to_string(), cause },
        }
    }

    pub(super) fn from_io(op: &'static str, name: &str, cause: std::io::Error) -> StoreError {
        match cause.kind() {
            std::io::ErrorKind::NotFound => StoreError::NotFound { name: name.to_string() },
            _ => StoreError::Io { op, name: name.to_string(), cause },
        }
    }
}
