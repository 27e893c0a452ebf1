//! Filesystem errors and their errno, one by one: a name that does not exist is
//! ENOENT, data that fails authentication or cannot be fetched is EIO, never ENOENT.

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such entry")]
    NotFound,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("not a symlink")]
    NotSymlink,
    #[error("no such attribute")]
    NoAttr,
    #[error("buffer too small")]
    Range,
    #[error("unknown inode {0}")]
    BadInode(u64),
    /// SEEK_DATA or SEEK_HOLE past the end of the file, or SEEK_DATA in a final hole.
    #[error("no data or hole there")]
    NoSuchOffset,
    #[error("invalid argument")]
    Invalid,
    /// A name to make or take is already there.
    #[error("already exists")]
    Exists,
    #[error("directory not empty")]
    NotEmpty,
    /// A local failure (the branch's scratch files: ENOSPC, EIO), or a refusal
    /// with no variant of its own, as its errno.
    #[error("{1}")]
    Os(i32, String),
    /// Data could not be fetched: never answer with wrong bytes.
    #[error("{0}")]
    Io(String),
    /// What was read is damaged, foreign or gone (failed authentication or
    /// decoding, or a missing object): asking again will not mend it.
    #[error("{0}")]
    Damaged(String),
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotSymlink => libc::EINVAL,
            FsError::NoAttr => libc::ENODATA,
            FsError::Range => libc::ERANGE,
            FsError::BadInode(_) => libc::ESTALE,
            FsError::NoSuchOffset => libc::ENXIO,
            FsError::Invalid => libc::EINVAL,
            FsError::Exists => libc::EEXIST,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::Os(errno, _) => *errno,
            FsError::Io(_) | FsError::Damaged(_) => libc::EIO,
        }
    }
}

impl From<catalog::RepoError> for FsError {
    fn from(e: catalog::RepoError) -> FsError {
        tracing::error!("{e}");
        if e.is_damage() {
            FsError::Damaged(e.to_string())
        } else {
            FsError::Io(e.to_string())
        }
    }
}
