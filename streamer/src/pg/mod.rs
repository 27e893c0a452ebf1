//! PostgreSQL: WAL streamed like a replica (`ebb stream pg`), base backups over the
//! replication protocol, archive-push/get for archive_command and restore_command
//! (with helpers that push and fetch ahead of PostgreSQL's calls: `background`,
//! `spool`), and restores that recover to an exact time. PostgreSQL's formats are read here,
//! never in the catalog: LSN text (`lsn`), WAL file names (`names`), history files
//! (`history`), a base backup's record (`info`), WAL records (`walscan`) and the
//! wire protocol (`wire`).

pub mod archive;
mod background;
pub mod basebackup;
pub mod delegate;
pub mod dsn;
pub mod history;
pub mod info;
pub mod lsn;
pub mod names;
pub mod restore;
pub mod serve;
pub mod spool;
pub mod testwal;
pub mod walscan;
pub mod walstream;
pub mod wire;

pub use tokio_postgres;
pub use wire::{parse_dsn, PgError, ReplConn};

/// A replication slot name PostgreSQL accepts: lower-case letters, digits and `_`.
pub fn validate_slot(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!("invalid slot name {name:?}: use 1 to 63 lower-case letters, digits or '_'"))
    }
}

/// The slot a source streams through unless told otherwise.
pub fn default_slot(source: &str) -> String {
    let mut s: String =
        source.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect();
    s.insert_str(0, "ebb_");
    s.truncate(63);
    s
}

/// `16MB` (as `SHOW wal_segment_size` says it) in bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..digits].parse().ok()?;
    let unit = match s[digits..].trim() {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        _ => return None,
    };
    Some(n * unit)
}
