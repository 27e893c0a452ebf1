//! Entry points for fuzzing every decoder of bytes that come from disk or the store:
//! each takes arbitrary bytes and must never panic (nor loop, nor allocate beyond
//! what the bytes justify). Decoders behind encryption get the plaintext directly,
//! so that the fuzzer reaches them. `tests/fuzz` runs them under libFuzzer
//! (`scripts/fuzz`); `tests/fuzz_replay.rs` replays every corpus and crash input
//! through them as an ordinary test. Not part of the API.

use bytes::Bytes;
use jiff::Timestamp;

use crate::config::Config;
use crate::crypto::{decode_payload, Keys, MasterKey};
use crate::forget::ForgetRecord;
use crate::fragment::{Fragment, FragmentRef, Overlay};
use crate::id::Id;
use crate::index::{decode_index, encode_index};
use crate::keyslot::{decode_key_file, KeySlot, Secret, SlotKind};
use crate::object::open_object_owned;
use crate::pack::{header_len, parse_header, parse_pack_name};
use crate::point::{validate_source, Manifest, PointRef};
use crate::policy::StoredPolicy;
use crate::time::parse_time;
use crate::tree::{Entry, EntryKind, Tree};
use crate::wal::{decode_piece, open_piece, piece_times, WalPiece, WalSystem, PIECE_HEADER};

/// A fuzz target: its name (the directory of its corpus) and the function that
/// feeds it bytes.
pub type Target = (&'static str, fn(&[u8]));

/// Every target.
pub const TARGETS: &[Target] = &[
    ("config", config),
    ("key_slot", key_slot),
    ("key_file", key_file),
    ("object", object),
    ("payload", payload),
    ("pack_header", pack_header),
    ("index", index),
    ("tree", tree),
    ("manifest", manifest),
    ("fragment", fragment),
    ("wal_piece", wal_piece),
    ("wal_object", wal_object),
    ("wal_system", wal_system),
    ("names", names),
    ("time", time),
    ("policy", policy),
    ("forget_record", forget_record),
    ("condemned", condemned),
    ("index_cache", index_cache),
    ("host_index", host_index),
    ("tree_cache", tree_cache),
];

fn keys() -> Keys {
    Keys::derive(&MasterKey([7; 32]), &Id([9; 32]))
}

pub fn config(data: &[u8]) {
    if let Ok(c) = Config::decode(data) {
        assert_eq!(Config::decode(&c.encode()).ok(), Some(c));
    }
}

pub fn key_slot(data: &[u8]) {
    let _ = KeySlot::claimed_repo(data);
    let repo = Id([1; 32]);
    if let Ok(slot) = KeySlot::decode("keys/0011223344556677", &repo, data) {
        // Key files only: a password slot may ask for gigabytes of Argon2 memory,
        // which decode bounds but a fuzzer cannot afford per input.
        if slot.kind == SlotKind::Keyfile {
            let _ = slot.unwrap_key(&repo, &Secret::KeyFile([3; 32]));
        }
    }
}

pub fn key_file(data: &[u8]) {
    let _ = decode_key_file(&String::from_utf8_lossy(data));
}

pub fn object(data: &[u8]) {
    let _ = open_object_owned(&keys(), "index/0", Bytes::copy_from_slice(data));
}

pub fn payload(data: &[u8]) {
    let _ = decode_payload(Bytes::copy_from_slice(data), 16 << 20);
}

pub fn pack_header(data: &[u8]) {
    let _ = header_len(data.len() as u64, data);
    let _ = parse_header(&Id([2; 32]), data, 1 << 30);
}

pub fn index(data: &[u8]) {
    // Opened as records (what prune does), the same file or the same refusal.
    let sealed = crate::object::seal_object_raw(&keys(), "index/0", data.to_vec());
    let records = crate::index::open_index_records(&keys(), "index/0", Bytes::from(sealed));
    match (&records, decode_index(data)) {
        (Ok(r), Ok(file)) => {
            assert_eq!(r.points, file.points);
            assert_eq!(r.len(), file.entries.len());
        }
        (Err(_), Err(_)) => {}
        (r, file) => panic!("records {:?} but decoded {:?}", r.is_ok(), file.is_ok()),
    }
    if let Ok(file) = decode_index(data) {
        // Whatever the version read, what it says is written again the same.
        let again = match file.points.as_slice() {
            [] => encode_index(None, &file.entries),
            [one] => encode_index(Some(one), &file.entries),
            more => crate::index::encode_merged(more, &file.entries),
        };
        assert_eq!(decode_index(&again).ok(), Some(file));
    }
}

pub fn tree(data: &[u8]) {
    if let Ok(t) = Tree::decode(data) {
        // What decodes encodes to bytes that decode to the same tree (version 2 with
        // no flags is written as version 1; otherwise to the same bytes).
        let again = t.encode();
        assert_eq!(Tree::decode(&again).ok().as_ref(), Some(&t));
        if data.first() == Some(&1) || t.entries.iter().any(|e| e.flags != 0) {
            assert_eq!(again, data);
        }
    }
}

pub fn manifest(data: &[u8]) {
    let _ = Manifest::decode("points/s/0000000000000000-0000000000000000", data);
}

pub fn fragment(data: &[u8]) {
    if let Ok(f) = Fragment::decode(data) {
        assert_eq!(f.encode(), data);
        let mut overlay = Overlay::default();
        overlay.add(f);
        let mut e = Entry::new(b"log".to_vec(), EntryKind::File);
        (e.device, e.inode) = (1, 7);
        overlay.apply(&mut e);
    }
}

pub fn wal_piece(data: &[u8]) {
    let len = data.len().saturating_sub(PIECE_HEADER) as u64;
    let _ = decode_piece("wal/s/00000001/0-1", Bytes::copy_from_slice(data), len);
}

/// A piece's object as stored (either version), under the fuzzing key: its times
/// from its first bytes, and the whole opened for the lengths its name could give.
/// Past authentication only what the seeds hold can reach, which the corpus keeps.
pub fn wal_object(data: &[u8]) {
    let name = WAL_OBJECT_NAME;
    let _ = piece_times(&keys(), name, data);
    for len in [3, data.len() as u64, u64::MAX] {
        let _ = open_piece(&keys(), name, Bytes::copy_from_slice(data), len);
    }
}

/// The name the `wal_object` target opens its bytes as.
const WAL_OBJECT_NAME: &str = "wal/s/00000001/0000000001000000-0000000001000003";

pub fn wal_system(data: &[u8]) {
    let _ = WalSystem::decode(data);
}

pub fn names(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    let _ = PointRef::parse(&s);
    let _ = FragmentRef::parse(&s);
    let _ = parse_pack_name(&s);
    let _ = WalPiece::parse(1, &s);
    let _ = validate_source(&s);
}

pub fn time(data: &[u8]) {
    let now = Timestamp::from_second(1_763_720_100).expect("a valid time");
    let _ = parse_time(&String::from_utf8_lossy(data), now, || jiff::tz::TimeZone::UTC);
}

pub fn policy(data: &[u8]) {
    if let Ok(p) = StoredPolicy::decode("policies/s/0000000000000000-0000000000000000", data) {
        // Whatever spans and zone it holds, judging points with it terminates.
        let zone = p.policy.zone().expect("decode checked the zone");
        let times = [Timestamp::MIN, Timestamp::from_second(1_763_720_100).expect("a time"), Timestamp::MAX];
        assert_eq!(p.policy.verdicts(&zone, &times).len(), 3);
    }
}

pub fn condemned(data: &[u8]) {
    use crate::condemned::{Condemned, Rescued};
    if let Ok(c) = Condemned::decode(data) {
        assert_eq!(c.encode(), data, "a condemned set has one encoding");
    }
    if let Ok(r) = Rescued::decode(data) {
        assert_eq!(r.encode(), data, "a rescue has one encoding");
    }
}

pub fn index_cache(data: &[u8]) {
    let Some(cached) = crate::index_cache::decode_file(data) else { return };
    let mut again = data[..6 + crate::index_cache::ID_LEN].to_vec();
    for (name, bytes) in &cached.records {
        crate::index_cache::encode_record(&mut again, name, bytes);
    }
    assert_eq!(again.len() as u64, cached.len, "the records read take the length said");
    assert_eq!(crate::index_cache::decode_file(&again), Some(cached), "what decodes encodes the same");
}

pub fn host_index(data: &[u8]) {
    use crate::host_index::{decode_block, decode_fences, Header};
    if let Ok(h) = Header::decode(data) {
        assert_eq!(h.encode(), data, "a header has one encoding");
    }
    let count = data.first().map_or(0, |&n| n as usize % (crate::host_index::BLOCK + 1));
    if let Ok(entries) = decode_block(data.get(1..).unwrap_or_default(), count) {
        assert_eq!(entries.len(), count);
        assert!(entries.windows(2).all(|w| (w[0].blob.id, w[0].kind as u8) < (w[1].blob.id, w[1].kind as u8)));
    }
    if let Ok(fences) = decode_fences(data.get(1..).unwrap_or_default(), count) {
        assert_eq!(fences.len(), count);
        assert!(fences.windows(2).all(|w| w[0] < w[1]));
    }
}

pub fn tree_cache(data: &[u8]) {
    use crate::tree_cache::{read_heads, TreeUses, MAX_RECORD};
    let mut end = 0;
    let read = read_heads(std::io::Cursor::new(data), data.len() as u64, |_, start, len| {
        assert!(start >= end && len as usize <= MAX_RECORD, "records in order, each bounded");
        end = start + u64::from(len);
    });
    if read.is_some() {
        assert!(end <= data.len() as u64, "a record inside the file");
    }
    if let Ok(uses) = TreeUses::decode(data) {
        // Packs listed twice or not at all are written once, as used.
        assert_eq!(TreeUses::decode(&uses.encode()).ok(), Some(uses), "what decodes encodes the same");
    }
}

pub fn forget_record(data: &[u8]) {
    let _ = ForgetRecord::decode("forgotten/s/0000000000000000-0000000000000000", data);
}

/// A few valid inputs of each target, made by the encoders themselves: the corpora
/// start from them (`scripts/fuzz` writes them there), and the replay test runs
/// them too.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use crate::codec::Encoder;
    use crate::crypto::{compressor, encode_payload};
    use crate::keyslot::{encode_key_file, KdfParams};
    use crate::object::seal_object;
    use crate::pack::{BlobKind, BlobRef, PackEntry};
    use crate::point::PgInfo;

    let blob = BlobRef { id: Id([1; 32]), pack: Id([2; 32]), offset: 10, length: 40, raw_len: 12 };
    let mut out: Vec<(&'static str, Vec<u8>)> = Vec::new();
    out.push(("config", Config::new(Id([0xab; 32]), "2026-11-22T00:00:00Z".into()).encode()));
    let master = MasterKey([5; 32]);
    let weak = KdfParams { memory_kib: 8, iterations: 1, parallelism: 1 };
    for secret in [Secret::KeyFile([3; 32]), Secret::Password(b"pw".to_vec())] {
        let mut slot = KeySlot::create(&master, &Id([1; 32]), &secret, weak, "t".into(), "h".into()).expect("a slot");
        slot.slot = "0011223344556677".into();
        out.push(("key_slot", slot.encode()));
    }
    out.push(("key_file", encode_key_file(&[3; 32]).into_bytes()));
    out.push(("object", seal_object(&keys(), "index/0", b"abc")));
    let text = b"a payload that compresses: a payload that compresses: a payload that compresses".to_vec();
    out.push(("payload", encode_payload(&text, None)));
    out.push(("payload", encode_payload(&text, Some(&mut compressor()))));
    let mut header = Encoder::default();
    header.u32(2);
    for (kind, id, offset) in [(0u8, 3u8, 0u32), (1, 4, 40)] {
        header.u8(kind);
        header.id(&Id([id; 32]));
        header.u32(offset);
        header.u32(40);
        header.u32(12);
    }
    out.push(("pack_header", header.buf));
    let entries = [PackEntry { kind: BlobKind::Data, blob }, PackEntry { kind: BlobKind::Tree, blob }];
    out.push(("index", encode_index(Some("points/s/e78601e9e44897ff-0123456789abcdef"), &entries)));
    out.push(("index", encode_index(None, &entries[..1])));
    let merged = ["points/a/e78601e9e44897ff-0123456789abcdef".to_string(), "points/b/x".to_string()];
    out.push(("index", crate::index::encode_merged(&merged, &entries)));
    out.push(("tree", crate::tree::sample().encode()));
    out.push(("tree_cache", crate::tree_cache::TreeUses::of(&crate::tree::sample()).encode()));
    out.push(("tree_cache", crate::tree_cache::sample_file(&keys())));
    let mut flagged = crate::tree::sample();
    flagged.entries[0].flags = 0x10;
    out.push(("tree", flagged.encode()));
    let mut m =
        Manifest::new("s", Timestamp::from_second(1_763_720_100).expect("a time"), "h".into(), "pg", "/p".into(), blob);
    m.pg = Some(PgInfo {
        system_id: 7,
        timeline: 1,
        start_lsn: "0/2000028".into(),
        stop_lsn: "0/2000100".into(),
        server_version: "15.18".into(),
        segment_size: 16 << 20,
    });
    out.push(("manifest", serde_json::to_vec(&m).expect("a manifest serializes")));
    let growth = crate::fragment::Growth {
        device: 1,
        inode: 7,
        from: 0,
        mtime: crate::tree::Timestamp { sec: 9, nsec: 0 },
        chunks: vec![blob, blob],
    };
    out.push(("fragment", Fragment { growths: vec![growth] }.encode()));
    let mut piece = vec![1u8];
    piece.extend(1_763_720_100_000_000_000u64.to_le_bytes());
    piece.extend(1_763_720_101_000_000_000u64.to_le_bytes());
    piece.extend(b"wal");
    out.push(("wal_piece", piece));
    let times = crate::wal::PieceTimes {
        received: Timestamp::from_second(1_763_720_100).expect("a time"),
        stored: Timestamp::from_second(1_763_720_101).expect("a time"),
    };
    let wal_object = crate::wal::seal_piece_with(
        &keys(),
        WAL_OBJECT_NAME,
        times,
        b"wal",
        &mut crate::crypto::wal_compressor(),
        [0, 1],
    );
    out.push(("wal_object", wal_object));
    out.push(("wal_system", WalSystem { system_id: 7, segment_size: 16 << 20 }.encode()));
    for name in [
        "points/web/e78601e9e44897ff-0123456789abcdef",
        "frags/web/e78601e9e44897ff-0123456789abcdef",
        "packs/ab/abababababababababababababababababababababababababababababababab",
        "wal/db/00000002/0000000103000028-0000000103001000",
    ] {
        out.push(("names", name.as_bytes().to_vec()));
    }
    let policy = crate::retention::Policy {
        keep_last: 3,
        keep_within: Some(jiff::Span::new().days(7)),
        keep_daily: 7,
        pitr_within: Some(jiff::Span::new().hours(36)),
        time_zone: "CET-1CEST,M3.5.0,M10.5.0/3".into(),
        ..Default::default()
    };
    let stored =
        StoredPolicy { version: 1, source: "s".into(), set: "2026-11-26T00:00:00Z".into(), host: "h".into(), policy };
    out.push(("policy", serde_json::to_vec(&stored).expect("a policy serializes")));
    let record = ForgetRecord {
        version: 1,
        source: "s".into(),
        time: "2026-11-26T00:00:00Z".into(),
        host: "h".into(),
        points: vec!["points/s/e78601e9e44897ff-0123456789abcdef".into()],
    };
    out.push(("forget_record", serde_json::to_vec(&record).expect("a record serializes")));
    let condemned = crate::condemned::Condemned {
        packs: [Id([1; 32]), Id([2; 32])].into_iter().collect(),
        names: ["index/ab".to_string(), "frags/s/e78601e9e44897ff-0123456789abcdef".to_string()].into_iter().collect(),
    };
    out.push(("condemned", condemned.encode()));
    out.push(("condemned", crate::condemned::Rescued { packs: condemned.packs, names: condemned.names }.encode()));
    let mut cache = b"EBIC2\n0123456789abcdef".to_vec();
    crate::index_cache::encode_record(&mut cache, "index/ab", b"sealed bytes");
    crate::index_cache::encode_record(&mut cache, "index/cd", b"");
    out.push(("index_cache", cache));
    let header = crate::host_index::Header {
        generation: "generations/e78601e9e44897ff-0123456789abcdef".into(),
        recent: vec!["index/187b2c9a00000000-0123456789abcdef".into()],
        entries: 2,
        ..Default::default()
    };
    out.push(("host_index", header.encode()));
    let mut block = vec![2u8];
    for id in [1u8, 2] {
        block.push(BlobKind::Data as u8);
        let mut e = crate::codec::Encoder::default();
        BlobRef { id: Id([id; 32]), pack: Id([9; 32]), offset: 1, length: 2, raw_len: 3 }.encode(&mut e);
        block.extend(e.buf);
    }
    out.push(("host_index", block));
    let mut fences = vec![2u8];
    for id in [1u8, 2] {
        fences.extend([id; 32]);
        fences.push(BlobKind::Tree as u8);
    }
    out.push(("host_index", fences));
    for t in ["2026-11-21 10:15", "2026-11-21T10:15:00.250+01:00", "@1763720100.25", "2h30m ago", "latest"] {
        out.push(("time", t.as_bytes().to_vec()));
    }
    out
}
