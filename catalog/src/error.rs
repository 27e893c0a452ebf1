//! The errors of reading and writing a repository, as variants a caller can act on:
//! what is missing, what is damaged, what is busy or refused.

use jiff::Timestamp;

use crate::config::ConfigError;
use crate::keyslot::SlotError;
use crate::object::ObjectError;
use crate::pack::{pack_name, BlobKind, BlobRef};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("no ebb repository at {url} (create one with `ebb init`)")]
    NoRepository { url: String },
    #[error("a repository already exists at {url}")]
    AlreadyExists { url: String },
    #[error(
        "the repository at {url} has no `config` object, but it holds data ({holds}): its header was lost. \
         Do not run `ebb init` there; `ebb repair config` writes it again from the key slots (it needs a \
         password or key file of the repository)"
    )]
    ConfigMissing { url: String, holds: String },
    #[error(
        "{url} holds a key slot but no `config`: an `ebb init` was interrupted. Run `ebb init` again with the \
         same password or key file to finish it"
    )]
    InterruptedInit { url: String },
    #[error(
        "{url} holds key slots of an `ebb init` that was interrupted, and this password or key file opens none \
         of them: run `ebb init` with the one given then, or remove keys/ there and run `ebb init` again"
    )]
    InterruptedInitOtherSecret { url: String },
    #[error("the repository at {url} has its `config`: nothing to repair")]
    ConfigPresent { url: String },
    #[error("the password or key file opens none of the key slots of {url}, so its `config` cannot be rebuilt")]
    WrongSecretForSlots { url: String },
    #[error("the password or key file opens none of the {slots} key slots of {url}")]
    WrongSecret { url: String, slots: usize },
    #[error("the repository at {url} has no readable key slot: {problems}")]
    NoSlots { url: String, problems: String },
    #[error("the key handed over by the ebb that started this process is malformed")]
    Handoff,
    #[error("key slot {slot} not found (see `ebb key list`)")]
    NoSuchSlot { slot: String },
    #[error("refusing to remove key slot {slot}: it is the last one, and without it no one can open the repository")]
    LastSlot { slot: String },
    #[error(
        "key slot {slot} was put back: other slots were removed at the same time, and without it none would be \
         left (see `ebb key list`)"
    )]
    RemovalRace { slot: String },
    #[error("the repository has no points yet: make one with `ebb backup PATH`")]
    NoSources,
    /// No source was named, and there is more than one to choose from.
    #[error("the repository holds several sources ({known}); choose one with --source")]
    SeveralSources { known: String },
    #[error("source {name:?} has no points (sources: {known})")]
    NoPoints { name: String, known: String },
    #[error("unknown source {name:?}: the repository has no point of it (sources: {known})")]
    UnknownSource { name: String, known: String },
    #[error("{at} is before the first point of source {name:?}; the earliest is {earliest}")]
    BeforeFirst { name: String, at: Timestamp, earliest: Timestamp },
    #[error("{at} is in the future (it is now {now})")]
    Future { at: Timestamp, now: Timestamp },
    #[error("{problem}")]
    InvalidSource { problem: String },
    #[error("source {source_name:?} is already written by {holder}: one writer per source")]
    SourceBusy { source_name: String, holder: String },
    #[error(
        "source {source_name:?} holds WAL of PostgreSQL system {} (segments of {} bytes), not of system {} (segments of \
         {} bytes): use another --source for another cluster",
        stored.0, stored.1, given.0, given.1
    )]
    OtherCluster { source_name: String, stored: (u64, u64), given: (u64, u64) },
    /// The repository holds other bytes under a name that must always hold the same.
    #[error(
        "{name} already holds different content ({what}) for source {source_name:?}: is another cluster writing to it?"
    )]
    WalConflict { name: String, source_name: String, what: String },
    /// A writer stalled past its view's lifetime found packs it uses condemned or
    /// deleted.
    #[error(
        "packs this writer uses ({packs}) were condemned or deleted by `ebb prune` while it was stalled (for \
         longer than it may go without looking at what prune condemns): nothing more is committed; run it again"
    )]
    Pruned { packs: usize },
    /// A base backup whose writer stalled past its view's lifetime found WAL it
    /// needs condemned or deleted.
    #[error(
        "WAL of source {source_name:?} that this base backup needs was condemned or deleted by `ebb prune` while \
         it was stalled: the base backup is not saved; take it again"
    )]
    PrunedWal { source_name: String },
    /// The store refused a delete that forget needs (no permission, an object lock).
    #[error(
        "the store refused to delete {name} ({cause}): `ebb forget` and `ebb prune` need credentials that may \
         delete (hosts that only back up do not); run it again with them, and it finishes"
    )]
    CannotDelete { name: String, cause: Box<StoreError> },
    /// A pack prune was repacking does not hold what the points say it does.
    #[error("{pack} cannot be repacked: {problem}; it is kept (`ebb verify --read-data` says more)")]
    DamagedPack { pack: String, problem: String },
    #[error("time {time} is before 1970 and cannot name a point")]
    BadTime { time: String },
    #[error(transparent)]
    Policy(#[from] crate::retention::PolicyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error(transparent)]
    Blob(#[from] BlobError),
}

impl RepoError {
    /// Whether this says an object is damaged, foreign or gone, rather than that
    /// the store could not be asked (which retrying may mend).
    pub fn is_damage(&self) -> bool {
        match self {
            RepoError::Object(_) | RepoError::Blob(_) | RepoError::DamagedPack { .. } => true,
            RepoError::Store(e) => e.is_missing_data(),
            _ => false,
        }
    }
}

/// A blob that could not be read: names the pack object, so the user and
/// `ebb verify` can tell what is damaged.
#[derive(Debug, thiserror::Error)]
#[error("{kind} blob {id} in {pack}: {problem}")]
pub struct BlobError {
    pub kind: &'static str,
    pub id: String,
    pub pack: String,
    pub problem: String,
}

impl BlobError {
    pub fn new(kind: BlobKind, blob: &BlobRef, problem: impl Into<String>) -> BlobError {
        BlobError {
            kind: if kind == BlobKind::Tree { "tree" } else { "data" },
            id: blob.id.short(),
            pack: pack_name(&blob.pack),
            problem: problem.into(),
        }
    }
}
