//! Index files (`index/<64 hex>`): which blobs each pack holds. Writers load them to
//! deduplicate; readers never need them, since every reference in a tree already says
//! where its blob is. One index file is written per recovery point, before its manifest.

use std::collections::{HashMap, HashSet};

use crate::codec::{Decoder, Encoder};
use crate::crypto::Keys;
use crate::id::Id;
use crate::object::{open_object, seal_object, ObjectError};
use crate::pack::{BlobKind, BlobRef, PackEntry, BLOB_REF_LEN};

pub const INDEX_DIR: &str = "index";
const VERSION: u8 = 1;

pub fn index_name(id: &Id) -> String {
    format!("{INDEX_DIR}/{}", id.to_hex())
}

pub fn encode_index(entries: &[PackEntry]) -> Vec<u8> {
    let mut e = Encoder::default();
    e.u8(VERSION);
    e.u32(entries.len() as u32);
    for entry in entries {
        e.u8(entry.kind as u8);
        entry.blob.encode(&mut e);
    }
    e.buf
}

pub fn decode_index(bytes: &[u8]) -> Result<Vec<PackEntry>, crate::codec::DecodeError> {
    let mut d = Decoder::new("index", bytes);
    let v = d.u8()?;
    if v != VERSION {
        return Err(d.error(format!("unknown index version {v}")));
    }
    let n = d.count(1 + BLOB_REF_LEN)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let kind = BlobKind::from_u8(d.u8()?).ok_or_else(|| d.error("unknown blob kind"))?;
        out.push(PackEntry { kind, blob: BlobRef::decode(&mut d)? });
    }
    d.finish()?;
    Ok(out)
}

pub fn seal_index(keys: &Keys, name: &str, entries: &[PackEntry]) -> Vec<u8> {
    seal_object(keys, name, &encode_index(entries))
}

pub fn open_index(keys: &Keys, name: &str, bytes: &[u8]) -> Result<Vec<PackEntry>, ObjectError> {
    let plain = open_object(keys, name, bytes)?;
    decode_index(&plain).map_err(|e| ObjectError::Decode { name: name.to_string(), cause: e })
}

/// The writer's dedup map: content id to where that content already is.
#[derive(Default)]
pub struct DedupIndex {
    map: HashMap<(BlobKind, Id), BlobRef>,
    /// Every pack some entry named, duplicates included.
    packs: HashSet<Id>,
}

impl DedupIndex {
    pub fn insert(&mut self, kind: BlobKind, blob: BlobRef) {
        self.packs.insert(blob.pack);
        self.map.entry((kind, blob.id)).or_insert(blob);
    }
    pub fn has_pack(&self, pack: &Id) -> bool {
        self.packs.contains(pack)
    }
    pub fn get(&self, kind: BlobKind, id: &Id) -> Option<BlobRef> {
        self.map.get(&(kind, *id)).copied()
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_index() {
        let entries = vec![PackEntry {
            kind: BlobKind::Tree,
            blob: BlobRef { id: Id([1; 32]), pack: Id([2; 32]), offset: 3, length: 4, raw_len: 5 },
        }];
        let bytes = encode_index(&entries);
        let mut expect = vec![1u8, 1, 0, 0, 0, 1];
        expect.extend([1u8; 32]);
        expect.extend([2u8; 32]);
        expect.extend([3, 0, 0, 0, 4, 0, 0, 0, 5, 0, 0, 0]);
        assert_eq!(bytes, expect);
        assert_eq!(decode_index(&bytes).unwrap(), entries);
        assert!(decode_index(&bytes[..bytes.len() - 1]).is_err());
    }
}
