//! WAL in the repository (FORMAT.md §9b): opaque bytes addressed by timeline (a
//! `u32`) and position range (`u64`s), each piece with when its first byte was
//! received and when it was stored, and a source's other archived files kept beside
//! them as they are. What the bytes and names mean to PostgreSQL is
//! `streamer::pg`'s business.
//!
//! - `format`: object names, the system object and a piece's object.
//! - `read`: finding the pieces that cover a range and reading them back.
//! - `write`: storing pieces and files, never overwriting.
//! - `compact`: what of it kept base backups need, and merging a segment's pieces.

mod compact;
mod format;
mod read;
mod write;

pub use compact::{mergeable, redundant, WalKeep, MAX_MERGE};
pub(crate) use format::{decode_piece, open_piece, piece_times, seal_piece_with};
pub(crate) use format::{tli_dir, WAL_DIR};
pub use format::{valid_segment_size, Lsn, PieceTimes, WalPiece, WalSystem, PIECE_HEADER, PIECE_TIMES_PREFIX};
pub use read::TimelineSpans;
