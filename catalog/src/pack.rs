//! Packs (`packs/<2 hex>/<64 hex>`): many sealed blobs in one object, so a reader
//! fetches exactly one blob with one ranged GET. A pack ends with its sealed header
//! (what each blob is and where) so it can be checked without any index.
//!
//! Layout: blob_0 .. blob_n-1 || sealed header || header length (u32 LE) || "EBP1".

use crate::codec::{DecodeError, Decoder, Encoder};
use crate::crypto::{encode_payload, open, seal, seal_into, AuthError, Keys, SEAL_OVERHEAD};
use crate::id::Id;

pub const PACKS_DIR: &str = "packs";
/// Packs are cut once they reach this size.
pub const PACK_TARGET: usize = 8 << 20;
const TRAILER_MAGIC: &[u8; 4] = b"EBP1";
const TRAILER_LEN: usize = 8;
/// The nonce counter of the header, which no blob can reach.
const HEADER_NONCE: u64 = u64::MAX;
const HEADER_AAD: &[u8] = b"ebb v1 pack header";
/// Bytes per header entry: kind, id, offset, length, raw length.
pub(crate) const HEADER_ENTRY_LEN: usize = 1 + 32 + 4 + 4 + 4;

/// What a blob holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlobKind {
    Data = 0,
    Tree = 1,
}

impl BlobKind {
    pub fn from_u8(v: u8) -> Option<BlobKind> {
        match v {
            0 => Some(BlobKind::Data),
            1 => Some(BlobKind::Tree),
            _ => None,
        }
    }
}

pub fn pack_name(id: &Id) -> String {
    let hex = id.to_hex();
    format!("{PACKS_DIR}/{}/{hex}", &hex[..2])
}

/// Parses `packs/<2 hex>/<64 hex>` back to the pack id.
pub fn parse_pack_name(name: &str) -> Option<Id> {
    let rest = name.strip_prefix(PACKS_DIR)?.strip_prefix('/')?;
    let (dir, hex) = rest.split_once('/')?;
    let id = Id::from_hex(hex)?;
    (dir == &hex[..2]).then_some(id)
}

/// Where a blob is: enough to fetch and authenticate it with no index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlobRef {
    /// The content id (keyed HMAC of the plaintext).
    pub id: Id,
    pub pack: Id,
    pub offset: u32,
    /// Sealed length in the pack.
    pub length: u32,
    /// Plaintext length.
    pub raw_len: u32,
}

pub const BLOB_REF_LEN: usize = 32 + 32 + 4 + 4 + 4;

impl BlobRef {
    pub fn encode(&self, e: &mut Encoder) {
        e.id(&self.id);
        e.id(&self.pack);
        e.u32(self.offset);
        e.u32(self.length);
        e.u32(self.raw_len);
    }

    pub fn decode(d: &mut Decoder) -> Result<BlobRef, DecodeError> {
        Ok(BlobRef { id: d.id()?, pack: d.id()?, offset: d.u32()?, length: d.u32()?, raw_len: d.u32()? })
    }

    pub fn range(&self) -> std::ops::Range<u64> {
        self.offset as u64..self.offset as u64 + self.length as u64
    }

    /// Whether this blob joins the span of one ranged GET that starts with `head`
    /// and ends with `last`: the same pack, starting after `last` ends (never
    /// before or inside it) by at most `gap` bytes, and the span then at most `max`
    /// bytes long.
    pub fn joins_span(&self, head: &BlobRef, last: &BlobRef, gap: u64, max: u64) -> bool {
        let (start, end, last_end) = (self.range().start, self.range().end, last.range().end);
        self.pack == last.pack && (last_end..=last_end + gap).contains(&start) && end - head.range().start <= max
    }
}

pub fn blob_aad(kind: BlobKind, id: &Id) -> Vec<u8> {
    let mut a = Vec::with_capacity(12 + 33);
    a.extend_from_slice(b"ebb v1 blob\0");
    a.push(kind as u8);
    a.extend_from_slice(&id.0);
    a
}

/// One entry of a pack header or an index file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    pub kind: BlobKind,
    pub blob: BlobRef,
}

/// Accumulates sealed blobs for one pack: all of it, or (`streaming`) what was
/// sealed since the last `take_sealed`.
pub struct PackBuilder {
    id: Id,
    cipher: aes_gcm::Aes256Gcm,
    buf: Vec<u8>,
    /// The bytes given out by `take_sealed`: `buf` starts there.
    taken: usize,
    entries: Vec<PackEntry>,
}

impl PackBuilder {
    pub fn new(keys: &Keys) -> PackBuilder {
        Self::with_id(keys, Id::random(), PACK_TARGET + crate::chunker::MAX_SIZE)
    }

    /// A builder whose bytes are taken as they are sealed (`take_sealed`), so that
    /// it holds little of its pack at once.
    pub fn streaming(keys: &Keys) -> PackBuilder {
        Self::with_id(keys, Id::random(), 0)
    }

    fn with_id(keys: &Keys, id: Id, capacity: usize) -> PackBuilder {
        let buf = Vec::with_capacity(capacity);
        PackBuilder { id, cipher: keys.pack_cipher(&id), buf, taken: 0, entries: Vec::new() }
    }

    pub fn id(&self) -> Id {
        self.id
    }

    /// The pack's length so far.
    pub fn len(&self) -> usize {
        self.taken + self.buf.len()
    }

    /// The bytes sealed since the last call, which the builder no longer holds:
    /// the pack is what all calls returned, then what `finish` returns.
    pub fn take_sealed(&mut self) -> Vec<u8> {
        self.taken += self.buf.len();
        std::mem::take(&mut self.buf)
    }

    /// The bytes sealed and not yet taken.
    pub fn held(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Where `add` will put a blob of this payload length: known before it is sealed,
    /// so that a writer can claim the content id first.
    pub fn next_ref(&self, id: Id, raw_len: u32, payload_len: usize) -> BlobRef {
        BlobRef {
            id,
            pack: self.id,
            offset: u32::try_from(self.len()).expect("packs stay far below 4 GiB"),
            length: u32::try_from(payload_len + SEAL_OVERHEAD).expect("the writer refuses blobs over 4 GiB"),
            raw_len,
        }
    }

    /// Seals an already framed payload (see `crypto::encode_payload`) as the next blob.
    pub fn add(&mut self, kind: BlobKind, id: Id, raw_len: u32, payload: &[u8]) -> BlobRef {
        let blob = self.next_ref(id, raw_len, payload.len());
        let counter = self.entries.len() as u64;
        seal_into(&self.cipher, counter, &blob_aad(kind, &id), payload, &mut self.buf);
        debug_assert_eq!(self.len() as u64, blob.range().end, "a sealed blob is its payload and the seal");
        self.entries.push(PackEntry { kind, blob });
        blob
    }

    /// Appends the header and trailer; returns the pack's bytes (those not taken)
    /// and its entries.
    pub fn finish(mut self) -> (Id, Vec<u8>, Vec<PackEntry>) {
        let mut e = Encoder::default();
        e.u32(self.entries.len() as u32);
        for entry in &self.entries {
            e.u8(entry.kind as u8);
            e.id(&entry.blob.id);
            e.u32(entry.blob.offset);
            e.u32(entry.blob.length);
            e.u32(entry.blob.raw_len);
        }
        let header = seal(
            &self.cipher,
            HEADER_NONCE,
            HEADER_AAD,
            &encode_payload(&e.buf, Some(&mut crate::crypto::compressor())),
        );
        self.buf.extend_from_slice(&header);
        self.buf.extend_from_slice(&(header.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(TRAILER_MAGIC);
        (self.id, self.buf, self.entries)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("pack trailer is damaged: {0}")]
    Trailer(&'static str),
    #[error("pack header: {0}")]
    Auth(#[from] AuthError),
    #[error("pack header: {0}")]
    Payload(#[from] crate::crypto::PayloadError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Reads the header of a whole pack's bytes.
pub fn read_header(keys: &Keys, pack: &Id, bytes: &[u8]) -> Result<Vec<PackEntry>, PackError> {
    let hlen = header_len(bytes.len() as u64, bytes)?;
    let body = bytes.len() - TRAILER_LEN;
    decode_header(keys, pack, &bytes[body - hlen as usize..body], (body - hlen as usize) as u64)
}

/// The length of the sealed header, from a pack's size and its trailer (its last
/// `TRAILER_LEN` bytes, or the whole pack).
pub(crate) fn header_len(size: u64, tail: &[u8]) -> Result<u64, PackError> {
    if size < TRAILER_LEN as u64 || tail.len() < TRAILER_LEN {
        return Err(PackError::Trailer("shorter than its trailer"));
    }
    let trailer = &tail[tail.len() - TRAILER_LEN..];
    if &trailer[4..] != TRAILER_MAGIC {
        return Err(PackError::Trailer("magic is not EBP1"));
    }
    let hlen = u64::from(u32::from_le_bytes(trailer[..4].try_into().expect("4 bytes")));
    if hlen > size - TRAILER_LEN as u64 {
        return Err(PackError::Trailer("header length exceeds the pack"));
    }
    Ok(hlen)
}

/// Opens a sealed header; every blob it lists must end within `blobs_end`, where
/// the header begins.
fn decode_header(keys: &Keys, pack: &Id, sealed: &[u8], blobs_end: u64) -> Result<Vec<PackEntry>, PackError> {
    let payload = open(&keys.pack_cipher(pack), HEADER_AAD, sealed)?;
    let plain = crate::crypto::decode_payload(payload.into(), 64 << 20)?;
    parse_header(pack, &plain, blobs_end)
}

/// The entries of an opened pack header.
pub(crate) fn parse_header(pack: &Id, plain: &[u8], blobs_end: u64) -> Result<Vec<PackEntry>, PackError> {
    let mut d = Decoder::new("pack header", plain);
    let n = d.count(HEADER_ENTRY_LEN)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let kind = BlobKind::from_u8(d.u8()?).ok_or_else(|| d.error("unknown blob kind"))?;
        let id = d.id()?;
        let blob = BlobRef { id, pack: *pack, offset: d.u32()?, length: d.u32()?, raw_len: d.u32()? };
        if blob.range().end > blobs_end {
            return Err(d.error("a blob lies outside the pack").into());
        }
        out.push(PackEntry { kind, blob });
    }
    d.finish()?;
    Ok(out)
}

/// Reads the header of the pack `pack`, `size` bytes long, with two ranged reads
/// (its trailer, then its header) rather than the whole pack.
pub async fn fetch_header(
    store: &crate::store::Store,
    keys: &Keys,
    pack: &Id,
    size: u64,
) -> Result<Result<Vec<PackEntry>, PackError>, crate::store::StoreError> {
    let name = pack_name(pack);
    if size < TRAILER_LEN as u64 {
        return Ok(Err(PackError::Trailer("shorter than its trailer")));
    }
    let trailer = store.get_range(&name, size - TRAILER_LEN as u64..size).await?;
    let hlen = match header_len(size, &trailer) {
        Ok(h) => h,
        Err(e) => return Ok(Err(e)),
    };
    let start = size - TRAILER_LEN as u64 - hlen;
    let sealed = store.get_range(&name, start..size - TRAILER_LEN as u64).await?;
    Ok(decode_header(keys, pack, &sealed, start))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MasterKey;

    #[test]
    fn names_round_trip() {
        let id = Id::random();
        assert_eq!(parse_pack_name(&pack_name(&id)), Some(id));
        assert_eq!(parse_pack_name("packs/00/xyz"), None);
        let mut wrong_dir = pack_name(&id);
        wrong_dir.replace_range(6..8, if &id.to_hex()[..2] == "00" { "11" } else { "00" });
        assert_eq!(parse_pack_name(&wrong_dir), None);
    }

    #[test]
    fn golden_pack() {
        // Pins the pack layout, the pack key label, blob and header AAD, and the trailer.
        let keys = Keys::derive(&MasterKey([1; 32]), &Id([2; 32]));
        let mut b = PackBuilder::with_id(&keys, Id([5; 32]), 0);
        b.add(BlobKind::Data, Id([3; 32]), 5, &encode_payload(b"hello", None));
        let (_, bytes, _) = b.finish();
        // The first blob and the header nonce, cross-checked against an independent AES-GCM.
        assert_eq!(
            hex::encode(&bytes[..40]),
            "00000000000000000000000001e52bd66efe8bf87758850669c671e4d717139fb3cc00000000ffff"
        );
        let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        assert_eq!(
            (bytes.len(), digest.as_str()),
            (120, "a1c0222488d3ebe64d2aeefce9bf0e403c6aa29a73ef568ab01df2a162c62d11")
        );
    }

    /// A pack whose bytes are taken as they are sealed is the same pack, byte for
    /// byte, with the same offsets.
    #[test]
    fn a_streamed_pack_is_the_pack_built_whole() {
        let keys = Keys::derive(&MasterKey([1; 32]), &Id([2; 32]));
        let (mut whole, mut streamed) =
            (PackBuilder::with_id(&keys, Id([5; 32]), 64), PackBuilder::with_id(&keys, Id([5; 32]), 0));
        let mut out = Vec::new();
        for n in 0..5u8 {
            let payload = encode_payload(&vec![n; 1000 * n as usize], None);
            let a = whole.add(BlobKind::Data, Id([n; 32]), 1000 * n as u32, &payload);
            let b = streamed.add(BlobKind::Data, Id([n; 32]), 1000 * n as u32, &payload);
            assert_eq!(a, b);
            assert_eq!(streamed.len(), whole.len());
            if n % 2 == 1 {
                out.extend(streamed.take_sealed());
                assert_eq!(streamed.held(), 0);
                assert_eq!(streamed.len(), whole.len(), "taking bytes out does not move the next offset");
            }
        }
        let (_, whole, _) = whole.finish();
        let (_, tail, entries) = streamed.finish();
        out.extend(tail);
        assert_eq!(out, whole);
        assert_eq!(read_header(&keys, &Id([5; 32]), &out).unwrap(), entries);
    }

    #[test]
    fn build_and_read_header() {
        let keys = Keys::derive(&MasterKey([1; 32]), &Id([2; 32]));
        let mut b = PackBuilder::new(&keys);
        let r1 = b.add(BlobKind::Data, Id([3; 32]), 5, &encode_payload(b"hello", None));
        let r2 = b.add(BlobKind::Tree, Id([4; 32]), 5, &encode_payload(b"world", None));
        let (id, bytes, entries) = b.finish();
        assert_eq!(r1.offset, 0);
        assert_eq!(r2.offset, r1.length);
        let back = read_header(&keys, &id, &bytes).unwrap();
        assert_eq!(back, entries);
        let blob = &bytes[r2.range().start as usize..r2.range().end as usize];
        let payload = open(&keys.pack_cipher(&id), &blob_aad(BlobKind::Tree, &Id([4; 32])), blob).unwrap();
        assert_eq!(&payload[1..], b"world");
        assert!(open(&keys.pack_cipher(&id), &blob_aad(BlobKind::Data, &Id([4; 32])), blob).is_err());
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - 20] ^= 1;
        assert!(read_header(&keys, &id, &bad).is_err());
        assert!(read_header(&keys, &Id([9; 32]), &bytes).is_err());
        assert!(read_header(&keys, &id, &bytes[..7]).is_err());
    }

    #[tokio::test]
    async fn the_header_is_read_with_ranged_reads() {
        let keys = Keys::derive(&MasterKey([1; 32]), &Id([2; 32]));
        let mut b = PackBuilder::new(&keys);
        b.add(BlobKind::Data, Id([3; 32]), 5, &encode_payload(b"hello", None));
        let (id, bytes, entries) = b.finish();
        let store = crate::store::Store::memory();
        store.put_new(&pack_name(&id), bytes.clone().into()).await.unwrap();
        let got = fetch_header(&store, &keys, &id, bytes.len() as u64).await.unwrap().unwrap();
        assert_eq!(got, entries);
        // A size that does not match the pack's is never a silent success.
        assert!(fetch_header(&store, &keys, &id, bytes.len() as u64 - 1).await.map_or(true, |r| r.is_err()));
    }
}
