//! Entry points for fuzzing the decoders of bytes that come from the network or
//! the host's disk: the replication protocol, the BASE_BACKUP archive, WAL records,
//! timeline history files, PostgreSQL's names and LSN text, stream state files. Each takes arbitrary bytes and must never panic.
//! `tests/fuzz` runs them under libFuzzer (`scripts/fuzz`); `tests/fuzz_replay.rs`
//! replays every corpus and crash input as an ordinary test. Not part of the API.

use std::sync::{Arc, OnceLock};

use bytes::{Bytes, BytesMut};
use catalog::wal::Lsn;
use catalog::{Repository, Secret, Store, Writer};
use postgres_protocol::message::backend::Message;

use crate::pg::history::TimelinePath;
use crate::pg::lsn;
use crate::pg::names::WalFile;
use crate::pg::walscan::{Scanner, Step};
use crate::pg::wire::{data_row, notice_text, parse_copy_data, parse_message, server_error};

/// A fuzz target: its name (the directory of its corpus) and the function that
/// feeds it bytes.
pub type Target = (&'static str, fn(&[u8]));

/// Every target.
pub const TARGETS: &[Target] = &[
    ("replication", replication),
    ("backend_message", backend_message),
    ("base_backup", base_backup),
    ("walscan", walscan),
    ("history", history),
    ("pg_names", pg_names),
    ("state_file", state_file),
];

pub fn replication(data: &[u8]) {
    let _ = parse_copy_data(Bytes::copy_from_slice(data));
}

/// What the server sends, message after message, and what ebb makes of each.
pub fn backend_message(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    for _ in 0..64 {
        match parse_message(&mut buf) {
            Ok(Some(Message::DataRow(body))) => {
                let _ = data_row(&body);
            }
            Ok(Some(Message::ErrorResponse(body))) => {
                let _ = server_error(body);
            }
            Ok(Some(Message::NoticeResponse(body))) => {
                let _ = notice_text(body);
            }
            Ok(Some(Message::CopyData(body))) => {
                let _ = parse_copy_data(body.into_bytes());
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
}

/// The tar archive BASE_BACKUP sends, stored into a repository in memory.
pub fn base_backup(data: &[u8]) {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let rt = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("a runtime")
    });
    let data = data.to_vec();
    rt.block_on(async move {
        let (repo, _) = Repository::init(Store::memory(), &Secret::KeyFile([1; 32]), catalog::DEFAULT_KDF, "f".into())
            .await
            .expect("a repository in memory");
        let writer: Arc<Writer> = Writer::new(repo).await.expect("a writer");
        let w = writer.clone();
        let stored = tokio::task::spawn_blocking(move || {
            let (tx, rx) = std::sync::mpsc::channel();
            drop(tx);
            crate::pg::basebackup::read_archive(&w, std::io::Cursor::new(data), rx).map(|s| s.root)
        })
        .await
        .expect("the archive reader panicked");
        let durable = writer.finish().await;
        // What was stored reads back as a tree.
        if let (Ok(root), Ok(_)) = (stored, durable) {
            writer.repo().read_tree(&root).await.expect("a stored root tree reads back");
        }
    });
}

/// WAL records, as `pg restore` scans them for transaction ends: the WAL in two
/// pushes, the scan going as far as each allows. It must end. Scanned twice: from
/// a record start, and from a segment's start, where the page headers say where
/// the first record begins.
pub fn walscan(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else { return };
    // Where the scan starts: a record start after the first page's long header.
    scan_all(Scanner::new(Lsn(40 + u64::from(first) * 8), 16 << 20), rest);
    scan_all(Scanner::at_segment(Lsn(0), 1 << 20), rest);
}

fn scan_all(mut scanner: Scanner, wal: &[u8]) {
    let (a, b) = wal.split_at(wal.len() / 2);
    for (wal, last) in [(a, false), (b, true)] {
        scanner.push(wal, last);
        for _ in 0..1_000_000 {
            match scanner.next_record() {
                Step::NeedMore => break,
                Step::Finished => return,
                Step::Other | Step::End(_) => {}
            }
        }
    }
    assert!(matches!(scanner.next_record(), Step::Finished), "a scan of {} bytes never ended", wal.len());
}

pub fn history(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for tli in [1, 2, u32::MAX] {
        if let Ok(path) = TimelinePath::parse(tli, Some(&text)) {
            for at in [0, 1, 0x3001430, u64::MAX] {
                let _ = path.tli_at(Lsn(at));
            }
            let _ = path.end_of(tli);
        }
    }
}

/// PostgreSQL's names of the files it archives, and its LSN text.
pub fn pg_names(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    if let Ok(at) = lsn::parse(&s) {
        assert_eq!(lsn::parse(&lsn::text(at).to_string()), Ok(at));
    }
    for size in [0, 1 << 20, 16 << 20, 1 << 30, 3 << 20] {
        let _ = WalFile::parse(&s, size);
    }
}

pub fn state_file(data: &[u8]) {
    let _ = serde_json::from_slice::<crate::state::StreamState>(data);
}

/// A few valid inputs of each target (see `catalog::fuzzing::seeds`).
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out: Vec<(&'static str, Vec<u8>)> = Vec::new();
    let mut w = vec![b'w'];
    w.extend(0x0300_0028u64.to_be_bytes());
    w.extend(0x0300_1000u64.to_be_bytes());
    w.extend(0u64.to_be_bytes());
    w.extend(b"some WAL bytes");
    out.push(("replication", w.clone()));
    let mut k = vec![b'k'];
    k.extend(0x0300_1000u64.to_be_bytes());
    k.extend(0u64.to_be_bytes());
    k.push(1);
    out.push(("replication", k.clone()));

    // A DataRow of two columns (one NULL), an ErrorResponse, and a CopyData.
    let message = |tag: u8, body: &[u8]| {
        let mut m = vec![tag];
        m.extend((body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    };
    let mut row = 2u16.to_be_bytes().to_vec();
    row.extend(3i32.to_be_bytes());
    row.extend(b"abc");
    row.extend((-1i32).to_be_bytes());
    let mut stream = message(b'D', &row);
    stream.extend(message(b'E', b"SERROR\0C42501\0Mpermission denied\0\0"));
    stream.extend(message(b'd', &w));
    out.push(("backend_message", stream));

    let mut tar = tar::Builder::new(Vec::new());
    for (path, data) in [("PG_VERSION", &b"15\n"[..]), ("base/1/1259", &[7u8; 9000][..])] {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o600);
        h.set_mtime(1_763_720_100);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, path, data).expect("a tar in memory");
    }
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o700);
    h.set_size(0);
    tar.append_data(&mut h, "pg_wal/", &[][..]).expect("a tar in memory");
    out.push(("base_backup", tar.into_inner().expect("a tar in memory")));

    // One commit record right after the first page's header: its length, xid,
    // previous record, info (commit), resource manager (transactions), padding,
    // CRC, then the main data (a timestamp) as a short data block.
    let mut rec = Vec::new();
    rec.extend(34u32.to_le_bytes());
    rec.extend(1000u32.to_le_bytes());
    rec.extend(0u64.to_le_bytes());
    rec.extend([0x00, 1, 0, 0]);
    rec.extend(0u32.to_le_bytes());
    rec.extend([255, 8]);
    rec.extend(817_000_000_000_000i64.to_le_bytes());
    let mut wal = vec![0u8];
    wal.extend(&rec);
    wal.extend(vec![0u8; 64]);
    out.push(("walscan", wal));
    // A segment's first page whose header says 30 bytes of a record continue onto
    // it, then the commit record.
    let mut seg = vec![0u8];
    seg.extend(0xD110u16.to_le_bytes());
    seg.extend(3u16.to_le_bytes());
    seg.extend(1u32.to_le_bytes());
    seg.extend(0u64.to_le_bytes());
    seg.extend(30u32.to_le_bytes());
    seg.extend([0; 4]);
    seg.extend(7u64.to_le_bytes());
    seg.extend((1u32 << 20).to_le_bytes());
    seg.extend(8192u32.to_le_bytes());
    seg.extend([0x5a; 32]);
    seg.extend(&rec);
    seg.extend(vec![0u8; 64]);
    out.push(("walscan", seg));

    out.push(("history", b"1\t0/3001430\tno recovery target specified\n\n2\t0/5000000\tbefore 2026\n".to_vec()));
    for name in
        ["000000010000000100000003", "0000000A.history", "000000010000000100000003.00000028.backup", "16/B374D848"]
    {
        out.push(("pg_names", name.as_bytes().to_vec()));
    }

    let state = crate::state::StreamState {
        source: "s".into(),
        repository: "file:///r".into(),
        kind: "dir".into(),
        path: "/p".into(),
        pid: 1,
        rpo_secs: 60,
        started: jiff::Timestamp::UNIX_EPOCH,
        updated: jiff::Timestamp::UNIX_EPOCH,
        durable_as_of: jiff::Timestamp::UNIX_EPOCH,
        newest_point: None,
        last_error: Some("an error".into()),
        last_error_at: None,
        last_prune: Some(crate::state::PruneStatus {
            at: jiff::Timestamp::UNIX_EPOCH,
            summary: "forgot 1 points".into(),
            error: None,
        }),
    };
    out.push(("state_file", serde_json::to_vec_pretty(&state).expect("a state serializes")));
    out
}
