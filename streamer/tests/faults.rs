//! Failure paths of backup and restore that a process kill cannot reach
//! deterministically, met through catalog's fault-injecting store: a pack upload
//! that fails, a put the store acknowledges and loses, and reads that come back
//! corrupted, truncated or failed. Whatever the store does, no point references
//! what is not stored and no restore writes a wrong byte.

#[path = "../../tests/common/wal.rs"]
mod wal;

use std::path::Path;
use std::sync::Arc;

use catalog::faults::{Fault, Faults, Op};
use catalog::{Repository, RestoreOptions, Secret, Store, DEFAULT_KDF};
use streamer::{snapshot, Counters, PathPatterns, SnapshotOptions};

const SECRET: Secret = Secret::KeyFile([9; 32]);

/// Three files of distinct, incompressible content: 3 MiB, 2 MiB and a few bytes.
fn source() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, len, seed) in [("a", 3 << 20, 1u64), ("b", 2 << 20, 2), ("c", 40, 3)] {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let data: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(dir.path().join(name), data).unwrap();
    }
    dir
}

fn options(path: &Path) -> SnapshotOptions {
    let none = Arc::new(PathPatterns::new(&[]).unwrap());
    SnapshotOptions {
        source: "s".into(),
        path: path.to_path_buf(),
        host: "h".into(),
        workers: 2,
        excludes: none.clone(),
        appends: none,
        tails: None,
    }
}

/// A fresh repository in memory, and the same repository seen through `faults`.
async fn repositories(faults: &Faults) -> (Repository, Repository) {
    let store = Store::memory();
    let plain = Repository::init(store.clone(), &SECRET, DEFAULT_KDF, "h".into()).await.unwrap().0;
    let faulty = Repository::open(store.with_faults(faults.clone()), &SECRET).await.unwrap();
    (plain, faulty)
}

/// A repository with one point of `source()`, seen plainly and through faults that
/// are not set yet.
async fn one_point() -> (Faults, Repository, Repository, tempfile::TempDir) {
    let faults = Faults::new();
    let (plain, faulty) = repositories(&faults).await;
    let src = source();
    snapshot(&plain, &options(src.path()), Arc::new(Counters::default())).await.unwrap();
    (faults, plain, faulty, src)
}

/// Restores the newest point of `repo` into a new directory; asserts every file it
/// wrote has the source's bytes, and returns the report and the names restored.
async fn restore_checked(repo: &Repository, src: &Path) -> (catalog::RestoreReport, Vec<String>) {
    let points = repo.points("s").await.unwrap();
    let manifest = repo.manifest(points.last().expect("a point")).await.unwrap();
    let target = tempfile::tempdir().unwrap();
    let opts = RestoreOptions { target: target.path().join("r"), ..Default::default() };
    let report = catalog::restore(repo, &manifest, opts).await.unwrap();
    let mut names = Vec::new();
    for e in std::fs::read_dir(target.path().join("r")).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        let (got, want) = (std::fs::read(target.path().join("r").join(&name)).unwrap(), std::fs::read(src.join(&name)));
        assert!(got == want.unwrap(), "{name} was restored with wrong bytes");
        names.push(name);
    }
    names.sort();
    (report, names)
}

/// The writer: a pack upload that fails fails the backup, and nothing refers to
/// what was not stored: no point, no index file. The next backup succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_pack_upload_commits_nothing() {
    let faults = Faults::new();
    faults.nth(Op::Put, "packs/", 1, Fault::Fail);
    let (plain, faulty) = repositories(&faults).await;
    let src = source();
    let err = snapshot(&faulty, &options(src.path()), Arc::new(Counters::default())).await.unwrap_err();
    assert!(err.to_string().contains("injected failure"), "the store's error is named: {err}");
    assert_eq!(faults.fired(), 1);
    assert!(plain.points("s").await.unwrap().is_empty(), "no point was committed");
    assert!(plain.store().list("index").await.unwrap().is_empty(), "no index file names an unstored pack");

    faults.clear();
    snapshot(&faulty, &options(src.path()), Arc::new(Counters::default())).await.unwrap();
    let (report, names) = restore_checked(&plain, src.path()).await;
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(names, ["a", "b", "c"]);
}

/// A store that acknowledges a pack and loses it: the point is committed (the store
/// said it was durable), `verify` names the missing pack, and restore leaves out
/// exactly the files whose data was in it, writing nothing wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pack_the_store_lost_is_found_by_verify_and_never_restored_wrong() {
    let faults = Faults::new();
    faults.nth(Op::Put, "packs/", 1, Fault::Lose);
    let (plain, faulty) = repositories(&faults).await;
    let src = source();
    snapshot(&faulty, &options(src.path()), Arc::new(Counters::default())).await.unwrap();
    assert_eq!(faults.fired(), 1);

    let report = catalog::verify(&plain, false, &|_| {}).await.unwrap();
    assert!(!report.errors.is_empty(), "verify must find the lost pack");
    assert!(report.errors.iter().any(|e| e.contains("packs/")), "verify names the pack: {:?}", report.errors);
    let (restored, names) = restore_checked(&plain, src.path()).await;
    assert!(restored.unreadable > 0, "the files of the lost pack are reported: {restored:?}");
    assert_eq!(names.len() + restored.failed.len(), 3, "every file restored or reported: {names:?} {restored:?}");
}

/// Restore: a read of data that comes back corrupted, truncated or failed once is
/// made again, chunk by chunk, and nothing is lost. (Restore reads neighbouring
/// chunks of several files with one request: one bad answer must not cost them all.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_read_once_is_read_again() {
    for fault in [Fault::Corrupt, Fault::Truncate(10), Fault::Fail] {
        let (faults, plain, faulty, src) = one_point().await;
        let data = data_pack(&plain).await;
        faults.nth(Op::Get, &data, 1, fault);
        let (report, names) = restore_checked(&faulty, src.path()).await;
        assert_eq!(faults.fired(), 1, "{fault:?}: the fault was met");
        assert!(report.failed.is_empty(), "{fault:?}: nothing lost: {report:?}");
        assert_eq!(names, ["a", "b", "c"], "{fault:?}");
    }
}

/// Restore: data that every read brings back corrupted, truncated or failed costs
/// exactly the file it is in, which is reported and not written; the others are
/// exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_read_costs_exactly_its_file() {
    for fault in [Fault::Corrupt, Fault::Truncate(10), Fault::Fail] {
        let (faults, plain, faulty, src) = one_point().await;
        // A byte in the middle of b's first chunk.
        let b = first_chunk(&plain, b"b").await;
        faults.reading(&catalog::pack_name(&b.pack), u64::from(b.offset) + u64::from(b.length) / 2, fault);
        let (report, names) = restore_checked(&faulty, src.path()).await;
        assert!(faults.fired() >= 1, "{fault:?}: the fault was met");
        assert_eq!(report.failed.len(), 1, "{fault:?}: one file reported: {report:?}");
        assert!(report.failed[0].0.ends_with("b"), "{fault:?}: b is the one: {report:?}");
        assert_eq!(report.unreadable, 1, "{fault:?}: the repository's fault: {report:?}");
        assert_eq!(names, ["a", "c"], "{fault:?}: the two others restored, b not left behind: {report:?}");
    }
}

/// The pack of the files' data: the largest (trees are packed apart).
async fn data_pack(repo: &Repository) -> String {
    let packs = repo.store().list("packs").await.unwrap();
    packs.iter().max_by_key(|o| o.size).unwrap().name.clone()
}

/// Where the first chunk of the top-level file `name` of the newest point is.
async fn first_chunk(repo: &Repository, name: &[u8]) -> catalog::BlobRef {
    let points = repo.points("s").await.unwrap();
    let manifest = repo.manifest(points.last().unwrap()).await.unwrap();
    let root = repo.read_tree(&manifest.root_ref().unwrap()).await.unwrap();
    let top = repo.read_tree(root.entries[0].subtree.as_ref().unwrap()).await.unwrap();
    match top.find(name).unwrap().content[0] {
        catalog::tree::Extent::Data(b) => b,
        catalog::tree::Extent::Hole(_) => panic!("{} starts with data", String::from_utf8_lossy(name)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_read_of_the_tree_fails_the_restore_and_names_the_pack() {
    for fault in [Fault::Corrupt, Fault::Truncate(10), Fault::Fail] {
        let (faults, _, faulty, _src) = one_point().await;
        faults.nth(Op::Get, "packs/", 1, fault);
        let points = faulty.points("s").await.unwrap();
        let manifest = faulty.manifest(&points[0]).await.unwrap();
        let target = tempfile::tempdir().unwrap();
        let opts = RestoreOptions { target: target.path().join("r"), ..Default::default() };
        let err = catalog::restore(&faulty, &manifest, opts).await.unwrap_err();
        assert_eq!(faults.fired(), 1, "{fault:?}");
        assert!(err.to_string().contains("packs/"), "{fault:?}: the error names the pack: {err}");
        let left = std::fs::read_dir(target.path().join("r")).map(|d| d.count()).unwrap_or(0);
        assert_eq!(left, 0, "{fault:?}: nothing restored from a tree that could not be read");
    }
}

/// A restore asks the store for little: the trees of sibling directories come with
/// one ranged GET, and neighbouring chunks of many small files with one more. Each
/// request here waits 5 ms, as a store far away would make it wait. One
/// request per directory and one per file, as restore asked before, would be
/// 2,220 requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_of_many_small_files_makes_few_requests() {
    let src = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for d in 0..20 {
        for s in 0..10 {
            let dir = src.path().join(format!("d{d}/s{s}"));
            std::fs::create_dir_all(&dir).unwrap();
            for f in 0..10 {
                let path = dir.join(format!("f{f}"));
                let body = format!("file {d}/{s}/{f}\n").repeat(40 + f);
                std::fs::write(&path, body).unwrap();
                files.push(path.strip_prefix(src.path()).unwrap().to_path_buf());
            }
        }
    }
    let faults = Faults::new();
    let (plain, faulty) = repositories(&faults).await;
    snapshot(&plain, &options(src.path()), Arc::new(Counters::default())).await.unwrap();
    faults.always(Op::Get, "packs/", Fault::Delay(std::time::Duration::from_millis(5)));

    let points = faulty.points("s").await.unwrap();
    let manifest = faulty.manifest(&points[0]).await.unwrap();
    let target = tempfile::tempdir().unwrap();
    let opts = RestoreOptions { target: target.path().join("r"), ..Default::default() };
    let report = catalog::restore(&faulty, &manifest, opts).await.unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!((report.files, report.dirs), (2000, 221));
    for f in &files {
        let (got, want) = (std::fs::read(target.path().join("r").join(f)), std::fs::read(src.path().join(f)));
        assert!(got.unwrap() == want.unwrap(), "{} was restored with wrong bytes", f.display());
    }
    let requests = faults.fired();
    println!("{requests} requests for 2,000 files in 221 directories");
    assert!(requests <= 100, "{requests} requests for 2,000 files in 221 directories");
}

// ------------------------------------------------------------------- archive-push

/// A made-up segment of timeline `tli`, written where archive_command would name it.
fn fake_segment(dir: &Path, tli: u32, segno: u64) -> std::path::PathBuf {
    let path = dir.join(format!("{tli:08X}{:08X}{:08X}", segno >> 8, segno & 0xff));
    std::fs::write(&path, wal::fake_segment(tli, segno, segno as u8)).unwrap();
    path
}

/// archive-push: a put that fails is a failure PostgreSQL sees (it keeps the
/// segment and retries), and nothing is stored; the retry stores it exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_put_is_an_archive_push_failure_and_the_retry_stores_it() {
    use streamer::pg::archive::{archive_get, archive_push};
    let faults = Faults::new();
    faults.nth(Op::Put, "wal/", 2, Fault::Fail); // the first is the cluster's record
    let (plain, faulty) = repositories(&faults).await;
    let dir = tempfile::tempdir().unwrap();
    let seg = fake_segment(dir.path(), 1, 3);
    let name = seg.file_name().unwrap().to_str().unwrap().to_string();
    let err = archive_push(&faulty, "db", &seg).await.unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert_eq!(faults.fired(), 1);
    let got = dir.path().join("got");
    assert!(!archive_get(&plain, "db", &name, &got, None).await.unwrap(), "nothing was stored");
    assert!(!got.exists());

    archive_push(&faulty, "db", &seg).await.unwrap();
    assert!(archive_get(&plain, "db", &name, &got, None).await.unwrap());
    assert!(std::fs::read(&got).unwrap() == std::fs::read(&seg).unwrap(), "the segment, exactly");
}

/// archive-get: a stored segment read back corrupted, truncated or not at all is
/// an error (PostgreSQL stops recovery and tries again), never a file of wrong
/// bytes and never "not archived" (which would end recovery early).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_read_is_an_archive_get_error_never_a_wrong_segment() {
    use streamer::pg::archive::{archive_get, archive_push};
    let dir = tempfile::tempdir().unwrap();
    for fault in [Fault::Corrupt, Fault::Truncate(100), Fault::Fail] {
        let faults = Faults::new();
        let (plain, faulty) = repositories(&faults).await;
        let seg = fake_segment(dir.path(), 1, 4);
        let name = seg.file_name().unwrap().to_str().unwrap().to_string();
        archive_push(&plain, "db", &seg).await.unwrap();
        faults.always(Op::Get, "wal/db/00000001/", fault);
        let got = dir.path().join(format!("got-{fault:?}"));
        let r = archive_get(&faulty, "db", &name, &got, None).await;
        assert!(faults.fired() > 0, "{fault:?}: the fault was met");
        assert!(r.is_err(), "{fault:?}: an error, not {r:?}");
        assert!(!got.exists(), "{fault:?}: no file left where PostgreSQL looks");
    }
}
