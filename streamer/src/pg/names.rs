//! PostgreSQL's names for the files it archives and asks for (segments, timeline
//! histories, `.backup` and `.partial` files), and where the repository keeps each:
//! a segment as pieces by timeline and position, a history by its timeline, any
//! other file under its own name.

use catalog::{RepoError, Repository};

/// A file name PostgreSQL archives or asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalFile {
    /// `000000010000000A000000FF`: a whole segment.
    Segment { tli: u32, segno: u64 },
    /// `00000002.history`.
    History { tli: u32 },
    /// `….partial`, `….backup`: stored and served as they are.
    Other,
}

fn hex_u32(s: &str) -> Option<u32> {
    (s.len() == 8 && s.bytes().all(|b| b.is_ascii_hexdigit())).then(|| u32::from_str_radix(s, 16).ok()).flatten()
}

impl WalFile {
    /// What `name` is, for segments of `segment_size` bytes; `None` for a name
    /// PostgreSQL never archives.
    pub fn parse(name: &str, segment_size: u64) -> Option<WalFile> {
        if !catalog::wal::valid_segment_size(segment_size) || !name.is_ascii() {
            return None;
        }
        let per_id = 0x1_0000_0000 / segment_size;
        if name.len() == 24 {
            let (tli, log, seg) = (hex_u32(&name[..8])?, hex_u32(&name[8..16])?, hex_u32(&name[16..])?);
            if u64::from(seg) >= per_id {
                return None;
            }
            return Some(WalFile::Segment { tli, segno: u64::from(log) * per_id + u64::from(seg) });
        }
        if let Some(tli) = name.strip_suffix(".history").and_then(hex_u32) {
            return Some(WalFile::History { tli });
        }
        let stem = name.split('.').next()?;
        let ok = name.len() <= 64
            && stem.len() == 24
            && stem.bytes().all(|b| b.is_ascii_hexdigit())
            && (name.ends_with(".partial") || name.ends_with(".backup"));
        ok.then_some(WalFile::Other)
    }
}

/// The file name of segment `segno` on timeline `tli`.
pub fn segment_file_name(tli: u32, segno: u64, segment_size: u64) -> String {
    let per_id = 0x1_0000_0000 / segment_size;
    format!("{tli:08X}{:08X}{:08X}", segno / per_id, segno % per_id)
}

/// Whether `name` looks like a segment's: 24 hex digits (any segment size).
pub(crate) fn is_segment_name(name: &str) -> bool {
    name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The timeline whose history `name` is (`0000000A.history`).
fn history_tli(name: &str) -> Option<u32> {
    name.strip_suffix(".history").and_then(hex_u32)
}

/// The files PostgreSQL archives beside segments, by the names it gives them: a
/// timeline history is kept as the history of its timeline, anything else under
/// its name.
pub trait ArchivedFiles {
    /// Stores the history or other file `name` of `source`. The same content again
    /// is success; other content under the same name is an error.
    fn put_wal_file(
        &self,
        source: &str,
        name: &str,
        data: &[u8],
    ) -> impl std::future::Future<Output = Result<(), RepoError>> + Send;

    /// The history or other file `name` of `source`, as archived, if stored.
    fn wal_file(
        &self,
        source: &str,
        name: &str,
    ) -> impl std::future::Future<Output = Result<Option<Vec<u8>>, RepoError>> + Send;
}

impl ArchivedFiles for Repository {
    async fn put_wal_file(&self, source: &str, name: &str, data: &[u8]) -> Result<(), RepoError> {
        match history_tli(name) {
            Some(tli) => self.put_wal_history(source, tli, data).await,
            None => self.put_wal_other_file(source, name, data).await,
        }
    }

    async fn wal_file(&self, source: &str, name: &str) -> Result<Option<Vec<u8>>, RepoError> {
        match history_tli(name) {
            Some(tli) => self.wal_history(source, tli).await,
            None => self.wal_other_file(source, name).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_wal_file_names() {
        assert_eq!(segment_file_name(1, 0x1_03, 16 << 20), "000000010000000100000003");
        assert_eq!(
            WalFile::parse("000000010000000100000003", 16 << 20),
            Some(WalFile::Segment { tli: 1, segno: 0x103 })
        );
        assert_eq!(WalFile::parse("00000001000000010000FF03", 16 << 20), None, "no such segment of 16 MiB");
        assert_eq!(WalFile::parse("0000000A.history", 16 << 20), Some(WalFile::History { tli: 10 }));
        assert_eq!(WalFile::parse("000000010000000100000003.00000028.backup", 16 << 20), Some(WalFile::Other));
        assert_eq!(WalFile::parse("../etc/passwd", 16 << 20), None);
        // Item 15 of issue 15: 24 bytes that are not 24 characters, and a segment
        // size no cluster has, are no WAL names (they used to panic).
        assert_eq!(WalFile::parse("0000000100000001000000é", 16 << 20), None);
        assert_eq!(WalFile::parse("000000010000000100000003", 0), None);
        assert_eq!(WalFile::parse("000000010000000100000003", 3 << 20), None);
        assert!(is_segment_name("000000010000000100000003") && !is_segment_name("0000000A.history"));
    }

    #[tokio::test]
    async fn history_files_are_kept_by_timeline_others_by_name() {
        let store = catalog::Store::open("memory://", true).unwrap();
        let secret = catalog::Secret::Password(b"pw".to_vec());
        let kdf = catalog::KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 };
        let repo = Repository::init(store, &secret, kdf, "h".into()).await.unwrap().0;
        repo.put_wal_file("db", "0000000A.history", b"1\t0/3001430\tx\n").await.unwrap();
        assert_eq!(repo.wal_history("db", 10).await.unwrap().as_deref(), Some(&b"1\t0/3001430\tx\n"[..]));
        assert!(repo.wal_file("db", "0000000a.history").await.unwrap().is_some(), "either case names it");
        let label = "000000010000000100000003.00000028.backup";
        repo.put_wal_file("db", label, b"label").await.unwrap();
        assert_eq!(repo.wal_other_file("db", label).await.unwrap().as_deref(), Some(&b"label"[..]));
        assert!(repo.put_wal_file("db", label, b"other").await.is_err());
        let names: Vec<String> = repo.store().list("wal/db").await.unwrap().into_iter().map(|o| o.name).collect();
        assert!(names.contains(&"wal/db/history/0000000a".to_string()), "{names:?}");
        assert!(names.contains(&format!("wal/db/files/{label}")), "{names:?}");
    }
}
