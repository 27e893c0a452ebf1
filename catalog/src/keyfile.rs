//! Key files on disk. A new key file is written where no one sees it (an anonymous
//! file in the target's directory, mode 0600) and gets its name only once its key
//! slot is durable: a crash at any moment leaves either no key file, or one that
//! opens the repository, never one that opens nothing. `Repository::add_key_file`
//! makes a new key, its key slot and its file in that order.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::RepoError;
use crate::id::random_bytes;
use crate::keyslot::{encode_key_file, KdfParams, KeySlot, Secret};
use crate::repo::Repository;

/// Why no key file was added; no key slot was left for it either way.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("create key file {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Slot(#[from] RepoError),
    #[error("write key file {} (the key slot made for it is removed)", path.display())]
    Publish {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Repository {
    /// A new random key, a key slot it opens, and the key file `path` that holds
    /// it, named only once its slot is durable. If the file cannot be named, the
    /// slot is removed again. Fails if `path` exists.
    pub async fn add_key_file(&self, path: &Path, kdf: KdfParams, host: String) -> Result<KeySlot, KeyFileError> {
        let key: [u8; 32] = random_bytes();
        let pending =
            PendingKeyFile::create(path, &key).map_err(|source| KeyFileError::Create { path: path.into(), source })?;
        let slot = self.add_slot(Secret::KeyFile(key), kdf, host).await?;
        if let Err(source) = pending.publish() {
            let _ = self.remove_slot(&slot.slot).await;
            return Err(KeyFileError::Publish { path: path.into(), source });
        }
        Ok(slot)
    }
}

/// A key file written but not yet named.
pub struct PendingKeyFile {
    file: File,
    path: PathBuf,
    /// Where the file is while unnamed, on filesystems without `O_TMPFILE`.
    staged: Option<PathBuf>,
}

impl PendingKeyFile {
    /// Writes the key file for `secret`, durable but nameless, to be named `path`
    /// by `publish`. Fails if `path` exists.
    pub fn create(path: &Path, secret: &[u8; 32]) -> std::io::Result<PendingKeyFile> {
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(std::io::Error::new(std::io::ErrorKind::AlreadyExists, "the file exists already"));
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let (mut file, staged) =
            match std::fs::OpenOptions::new().write(true).mode(0o600).custom_flags(libc::O_TMPFILE).open(&dir) {
                Ok(f) => (f, None),
                // Filesystems without O_TMPFILE: a hidden name of its own, removed if unused.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)) => {
                    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    let staged =
                        dir.join(format!(".{name}.{}.ebb-partial", hex::encode(crate::id::random_bytes::<6>())));
                    let f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&staged)?;
                    (f, Some(staged))
                }
                Err(e) => return Err(e),
            };
        let written = file.write_all(encode_key_file(secret).as_bytes()).and_then(|()| file.sync_all());
        let pending = PendingKeyFile { file, path: path.to_path_buf(), staged };
        written?;
        Ok(pending)
    }

    /// Gives the key file its name (never over an existing file), durably.
    pub fn publish(mut self) -> std::io::Result<()> {
        match self.staged.take() {
            None => {
                let fd = std::ffi::CString::new(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
                    .expect("no NUL in a number");
                let to = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(self.path.as_os_str()))
                    .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
                // SAFETY: two valid NUL-terminated paths; linkat only reads them.
                let rc = unsafe {
                    libc::linkat(libc::AT_FDCWD, fd.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::AT_SYMLINK_FOLLOW)
                };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Some(staged) => {
                let linked = std::fs::hard_link(&staged, &self.path);
                let _ = std::fs::remove_file(&staged);
                linked?;
            }
        }
        let dir = self.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        File::open(dir)?.sync_all()
    }
}

impl Drop for PendingKeyFile {
    fn drop(&mut self) {
        if let Some(staged) = self.staged.take() {
            let _ = std::fs::remove_file(staged);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn named_only_when_published_and_never_over_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let pending = PendingKeyFile::create(&path, &[7; 32]).unwrap();
        assert!(!path.exists(), "not named before it is published");
        pending.publish().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(crate::keyslot::decode_key_file(&text), Some([7; 32]));
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(PendingKeyFile::create(&path, &[8; 32]).is_err(), "an existing file is never replaced");

        let dropped = dir.path().join("d");
        drop(PendingKeyFile::create(&dropped, &[9; 32]).unwrap());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "a dropped key file leaves nothing");
    }

    #[tokio::test]
    async fn a_key_file_added_opens_the_repository_and_one_not_made_leaves_no_slot() {
        let store = crate::Store::open("memory://", true).unwrap();
        let kdf = KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 };
        let repo = Repository::init(store, &Secret::Password(b"pw".to_vec()), kdf, "h".into()).await.unwrap().0;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let slot = repo.add_key_file(&path, kdf, "h".into()).await.unwrap();
        let key = crate::keyslot::decode_key_file(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let found = Repository::find(repo.store().clone()).await.unwrap();
        assert_eq!(found.unlock(&Secret::KeyFile(key)).await.unwrap().slot(), slot.slot);

        let slots = repo.key_slots().await.unwrap().0.len();
        let again = repo.add_key_file(&path, kdf, "h".into()).await;
        assert!(matches!(again, Err(KeyFileError::Create { .. })), "an existing file is never replaced");
        assert_eq!(repo.key_slots().await.unwrap().0.len(), slots, "and no slot is made for it");
        let no_dir = repo.add_key_file(&dir.path().join("none/k"), kdf, "h".into()).await;
        assert!(matches!(no_dir, Err(KeyFileError::Create { .. })));
        assert_eq!(repo.key_slots().await.unwrap().0.len(), slots);
    }
}
