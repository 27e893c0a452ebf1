//! The ebb repository: object layout, keys and encryption, chunking, packs and index,
//! trees, recovery points and time resolution, restore and verification, and WAL as
//! opaque bytes by timeline and position. Both writers and readers use it; it knows
//! nothing of FUSE, never talks to PostgreSQL and reads none of its formats (LSN
//! text, WAL file names, history files: `streamer::pg`). The byte format is specified
//! in `FORMAT.md`.

mod cache;
pub mod chunker;
mod codec;
mod condemned;
mod config;
mod contents;
mod crypto;
mod error;
pub mod faults;
mod forget;
mod fragment;
#[doc(hidden)]
pub mod fuzzing;
mod generation;
mod host_index;
mod id;
mod index;
mod index_cache;
mod index_load;
mod init;
mod inventory;
mod keyfile;
mod keyslot;
pub mod lease;
mod object;
mod pack;
mod point;
mod policy;
mod prune;
mod repack;
mod repair;
mod repo;
mod restore;
pub mod retention;
mod running;
mod select;
mod spill;
mod store;
pub mod time;
pub mod tree;
mod tree_cache;
mod verify;
mod view;
pub mod wal;
mod writer;

pub use cache::ChunkCache;
pub use codec::DecodeError;
pub use condemned::Timing;
pub use config::{Config, FORMAT_VERSION};
pub use crypto::Keys;
pub use error::{BlobError, RepoError};
pub use forget::{forget, forgotten_points, judge, ForgetRecord, Forgotten, SourceVerdicts, Verdict};
pub use fragment::{Fragment, FragmentBuilder, FragmentRef, Growth, Overlay, FRAGS_DIR};
pub use id::Id;
pub use index_cache::cache_dir;
pub use init::{Created, InitPlan};
pub use keyfile::KeyFileError;
pub use keyslot::{
    decode_key_file, encode_key_file, prepare_kdf_memory, KdfParams, KeySlot, Secret, SlotKind, DEFAULT_KDF,
};
pub use lease::{holding, Holder, Lease, LeaseLost};
pub use pack::{pack_name, parse_pack_name, BlobKind, BlobRef, PackEntry};
pub use point::{validate_source, Manifest, PgInfo, PointRef, Skipped, Stats};
pub use policy::StoredPolicy;
pub use prune::{prune, PruneError, PruneOptions, PruneReport, MAX_MEMORY as PRUNE_MAX_MEMORY};
pub use repack::{MaxUnused, RepackReport};
pub use repair::{repair_index, IndexRepair};
pub use repo::{Found, PointNames, Readable, Repository};
pub use restore::{
    restore, Progress as RestoreProgress, RestoreError, RestoreOptions, RestoreReport,
    DEFAULT_MEMORY as DEFAULT_RESTORE_MEMORY,
};
pub use select::{only_source, InvertedSpan, Span};
pub use store::{canonical_url, local_name, local_path, NewObject, ObjectInfo, Store, StoreError};
pub use verify::{verify, VerifyReport};
pub use writer::{Durable, Packer, WriteError, Writer, WriterSummary};
