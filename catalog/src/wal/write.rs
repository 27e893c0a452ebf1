//! Writing a source's WAL: claiming the source for one cluster, storing pieces and
//! the files kept beside them. Every put is conditional: the same name always holds
//! the same bytes, so a piece stored twice (a restart after a crash) is stored once,
//! and different bytes under one name are an error, never an overwrite.

use jiff::Timestamp;

use super::format::{
    history_name, other_file_name, seal_piece, system_name, PieceTimes, WalPiece, WalSystem, PIECE_HEADER,
};
use crate::error::RepoError;
use crate::object::seal_object;
use crate::repo::Repository;
use crate::store::StoreError;

thread_local! {
    /// Each thread's WAL compressor, kept from piece to piece: a context made per
    /// piece costs its allocation and set-up every time.
    static WAL_COMPRESSOR: std::cell::RefCell<zstd::bulk::Compressor<'static>> =
        std::cell::RefCell::new(crate::crypto::wal_compressor());
}

impl Repository {
    /// Records the cluster of `source`'s WAL, or checks that it is the one recorded.
    pub async fn claim_wal_system(&self, source: &str, system: WalSystem) -> Result<(), RepoError> {
        let name = system_name(source);
        if self.wal_system(source).await?.is_none() {
            let sealed = seal_object(self.keys(), &name, &system.encode());
            match self.store().put_new(&name, sealed.into()).await {
                Ok(()) => return Ok(()),
                Err(StoreError::AlreadyExists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        match self.wal_system(source).await? {
            Some(s) if s == system => Ok(()),
            Some(s) => Err(RepoError::OtherCluster {
                source_name: source.to_string(),
                stored: (s.system_id, s.segment_size),
                given: (system.system_id, system.segment_size),
            }),
            None => Err(StoreError::NotFound { name }.into()),
        }
    }

    /// Stores `wal` as the piece `piece` of `source`, whose first byte was received
    /// at `received`. A piece already stored with the same bytes is success; with
    /// other bytes, an error.
    pub async fn put_wal(
        &self,
        source: &str,
        piece: &WalPiece,
        received: Timestamp,
        wal: &[u8],
    ) -> Result<(), RepoError> {
        self.put_wal_with_times(source, piece, PieceTimes { received, stored: Timestamp::now() }, wal).await
    }

    /// `put_wal` of the WAL that follows the first `PIECE_HEADER` bytes of `buf`:
    /// room the stream's buffers keep (a piece's times went there before they were
    /// sealed apart), left as it is.
    pub async fn put_wal_buf(
        &self,
        source: &str,
        piece: &WalPiece,
        received: Timestamp,
        buf: &[u8],
    ) -> Result<(), RepoError> {
        self.put_wal(source, piece, received, &buf[PIECE_HEADER.min(buf.len())..]).await
    }

    /// `put_wal` with both times given: a merge of pieces keeps theirs.
    pub(crate) async fn put_wal_with_times(
        &self,
        source: &str,
        piece: &WalPiece,
        times: PieceTimes,
        wal: &[u8],
    ) -> Result<(), RepoError> {
        assert_eq!(piece.len(), wal.len() as u64, "a piece's name gives its length");
        let name = piece.name(source);
        let sealed = WAL_COMPRESSOR.with_borrow_mut(|c| seal_piece(self.keys(), &name, times, wal, c));
        match self.store().put_new(&name, sealed.into()).await {
            Ok(()) => Ok(()),
            Err(StoreError::AlreadyExists { .. }) => {
                let (_, stored) = self.read_wal(source, piece).await?;
                if stored.as_ref() == wal {
                    Ok(())
                } else {
                    Err(RepoError::WalConflict {
                        name,
                        source_name: source.to_string(),
                        what: format!("WAL of timeline {} at {:#x}..{:#x}", piece.tli, piece.start.0, piece.end.0),
                    })
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Stores the history of timeline `tli` of `source`. The same content again is
    /// success; other content is an error.
    pub async fn put_wal_history(&self, source: &str, tli: u32, data: &[u8]) -> Result<(), RepoError> {
        self.put_wal_object(source, &history_name(source, tli), &format!("history of timeline {tli}"), data).await
    }

    /// Stores another file archived for `source` under `name`, as it is. The same
    /// content again is success; other content under the same name is an error.
    pub async fn put_wal_other_file(&self, source: &str, name: &str, data: &[u8]) -> Result<(), RepoError> {
        self.put_wal_object(source, &other_file_name(source, name), name, data).await
    }

    /// Puts `data` as `object` unless it exists; then what it holds must be `data`.
    async fn put_wal_object(&self, source: &str, object: &str, what: &str, data: &[u8]) -> Result<(), RepoError> {
        let sealed = seal_object(self.keys(), object, data);
        match self.store().put_new(object, sealed.into()).await {
            Ok(()) => Ok(()),
            Err(StoreError::AlreadyExists { .. }) => match self.get_wal_object(object).await? {
                Some(stored) if stored == data => Ok(()),
                _ => Err(RepoError::WalConflict {
                    name: object.to_string(),
                    source_name: source.to_string(),
                    what: what.to_string(),
                }),
            },
            Err(e) => Err(e.into()),
        }
    }
}
