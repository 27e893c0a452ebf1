//! WAL in the repository (FORMAT.md §9b): opaque bytes addressed by timeline (a
//! `u32`) and position range (`u64`s), each piece with when its first byte was
//! received and when it was stored, and a source's other archived files kept beside
//! them as they are. What the bytes and names mean to PostgreSQL is
//! `streamer::pg`'s business.
//!
//! - `format`: object names, the system object and a piece's header.
//! - `read`: finding the pieces that cover a range and reading them back.
//! - `write`: storing pieces and files, never overwriting.

mod format;
mod read;
mod write;

pub(crate) use format::decode_piece;
pub use format::{valid_segment_size, Lsn, PieceTimes, WalPiece, WalSystem, PIECE_HEADER};
pub use read::TimelineSpans;
