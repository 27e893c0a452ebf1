//! The store conformance suite: what every backend of `Store` must do alike, run
//! against `memory://`, `file://` and `s3://` (the moto server that `scripts/test`
//! starts and names in `EBB_TEST_S3_ENDPOINT`). A new backend (gs://, az://) gets a
//! line in `conformance!` and must pass every case.
//!
//! Where the backends differed, `Store` now hides it, and a case here pins it:
//! deleting a missing object succeeds (S3 cannot tell; file:// said NotFound); an
//! empty range is empty (object_store refused it; file:// answered it); a range past
//! the end is `Short` (S3 refused it or cut it short, file:// cut it short);
//! `list_after` lists only what is directly under the directory, names starting
//! with `.` included (file:// skipped those and subdirectories, S3 listed both).

#[path = "../../tests/common/s3.rs"]
mod s3;

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use catalog::{ObjectInfo, Store, StoreError};
use futures::{StreamExt, TryStreamExt};

#[derive(Clone, Copy, Debug)]
enum Backend {
    Memory,
    File,
    S3,
}

/// A fresh, empty store of `backend`, and what keeps it alive (a temporary directory).
fn fresh(backend: Backend) -> (Store, Option<tempfile::TempDir>) {
    static UNIQUE: AtomicUsize = AtomicUsize::new(0);
    match backend {
        Backend::Memory => (Store::memory(), None),
        Backend::File => {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("file://{}/store", dir.path().display());
            (Store::open(&url, true).unwrap(), Some(dir))
        }
        Backend::S3 => {
            let endpoint = s3::S3Endpoint::from_env();
            s3::ensure_bucket(&endpoint);
            let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
            let url = format!("s3://{}/conformance-{}-{n}-{nanos:x}", s3::S3_BUCKET, std::process::id());
            (Store::open_with(&url, true, Some(&endpoint.url)).unwrap(), None)
        }
    }
}

/// Bytes that do not compress and differ per seed.
fn noise(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

fn names(list: &[ObjectInfo]) -> Vec<&str> {
    list.iter().map(|o| o.name.as_str()).collect()
}

async fn put_new_refuses_a_taken_name(store: Store) {
    store.put_new("d/one", Bytes::from_static(b"first")).await.unwrap();
    let again = store.put_new("d/one", Bytes::from_static(b"second")).await;
    assert!(matches!(again, Err(StoreError::AlreadyExists { .. })), "{again:?}");
    assert_eq!(store.get("d/one").await.unwrap(), &b"first"[..], "the first put stays");
    store.put_overwrite("d/one", Bytes::from_static(b"replaced")).await.unwrap();
    assert_eq!(store.get("d/one").await.unwrap(), &b"replaced"[..]);
    store.put_overwrite("d/fresh", Bytes::from_static(b"new")).await.unwrap();
    assert_eq!(store.get("d/fresh").await.unwrap(), &b"new"[..], "put_overwrite creates too");
}

async fn concurrent_puts_of_one_name_have_one_winner(store: Store) {
    for round in 0..16u64 {
        let name = format!("race/{round}");
        let (a, b) = (noise(round, 4096), noise(round + 1000, 4096));
        let (ra, rb) = tokio::join!(store.put_new(&name, a.clone()), store.put_new(&name, b.clone()));
        let winner = match (&ra, &rb) {
            (Ok(()), Err(StoreError::AlreadyExists { .. })) => a,
            (Err(StoreError::AlreadyExists { .. }), Ok(())) => b,
            _ => panic!("round {round}: exactly one put must win, the other see AlreadyExists: {ra:?} {rb:?}"),
        };
        assert_eq!(store.get(&name).await.unwrap(), winner, "round {round}: the winner's bytes are stored");
    }
}

async fn what_is_missing_is_not_found(store: Store) {
    store.put_new("m/there", Bytes::from_static(b"x")).await.unwrap();
    let missing = "m/not-there";
    let get = store.get(missing).await.unwrap_err();
    assert!(get.is_not_found(), "get: {get:?}");
    let range = store.get_range(missing, 0..1).await.unwrap_err();
    assert!(range.is_not_found(), "get_range: {range:?}");
    let empty = store.get_range(missing, 0..0).await.unwrap_err();
    assert!(empty.is_not_found(), "empty get_range: {empty:?}");
    let size = store.size(missing).await.unwrap_err();
    assert!(size.is_not_found(), "size: {size:?}");
    assert!(store.list("nothing").await.unwrap().is_empty());
    assert!(store.list_after("nothing", "nothing/", 10).await.unwrap().is_empty());
    assert!(store.list_dirs("nothing").await.unwrap().is_empty());
}

async fn ranged_gets_are_exact_at_the_edges(store: Store) {
    let data = noise(7, 10_000);
    store.put_new("r/obj", data.clone()).await.unwrap();
    assert_eq!(store.size("r/obj").await.unwrap(), 10_000);
    let exact: [Range<u64>; 7] = [0..10_000, 0..1, 1..2, 4_999..5_001, 9_990..10_000, 9_999..10_000, 0..9_999];
    for r in exact {
        let got = store.get_range("r/obj", r.clone()).await.unwrap_or_else(|e| panic!("{r:?}: {e}"));
        assert_eq!(got, data.slice(r.start as usize..r.end as usize), "{r:?}");
    }
    for at in [0u64, 5_000, 10_000] {
        let got = store.get_range("r/obj", at..at).await.unwrap_or_else(|e| panic!("empty range at {at}: {e}"));
        assert!(got.is_empty(), "empty range at {at}");
    }
    for r in [9_990..10_001, 10_000..10_001, 10_001..10_002, 20_000..20_010, 0..1 << 40] {
        match store.get_range("r/obj", r.clone()).await {
            Err(StoreError::Short { size, .. }) => assert_eq!(size, 10_000, "{r:?}"),
            other => panic!("{r:?} goes past the end: expected Short, got {other:?}"),
        }
    }
    match store.get_range("r/obj", 10_001..10_001).await {
        Err(StoreError::Short { .. }) => {}
        other => panic!("an empty range past the end: expected Short, got {other:?}"),
    }
    store.put_new("r/empty", Bytes::new()).await.unwrap();
    assert!(store.get("r/empty").await.unwrap().is_empty());
    assert_eq!(store.size("r/empty").await.unwrap(), 0);
    assert!(store.get_range("r/empty", 0..0).await.unwrap().is_empty());
    assert!(matches!(store.get_range("r/empty", 0..1).await, Err(StoreError::Short { size: 0, .. })));
}

async fn listings_see_a_directory_and_nothing_else(store: Store) {
    for n in ["d/a", "d/b", "d/.hidden", "d/sub/c", "d/sub/deeper/e", "d2/x", "dd/y", "e"] {
        store.put_new(n, Bytes::from(n.as_bytes().to_vec())).await.unwrap();
    }
    let mut all = store.list("d").await.unwrap();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(names(&all), ["d/.hidden", "d/a", "d/b", "d/sub/c", "d/sub/deeper/e"], "everything below d/");
    for o in &all {
        assert_eq!(o.size, o.name.len() as u64, "{o:?}");
    }
    assert_eq!(store.list_dirs("d").await.unwrap(), ["sub"]);
    assert_eq!(store.list_dirs("d/sub").await.unwrap(), ["deeper"]);
    let mut bare = store.list_names("d").await.unwrap();
    bare.sort();
    assert_eq!(bare, names(&all), "the names of everything below d/");
    let flat = store.list_after("d", "d/", 10).await.unwrap();
    assert_eq!(flat, ["d/.hidden", "d/a", "d/b"], "directly under d/, in name order");
    assert_eq!(store.list_after("d", "d/.hidden", 10).await.unwrap(), ["d/a", "d/b"], "strictly after");
    assert_eq!(store.list_after("d", "d/", 1).await.unwrap(), ["d/.hidden"], "at most the limit");
    assert_eq!(store.list_after("d", "d/a", 1).await.unwrap(), ["d/b"], "the limit counts from after");
    assert!(store.list_after("d", "d/b", 10).await.unwrap().is_empty());
    let sample = store.sample(3).await.unwrap();
    assert_eq!(sample.len(), 3, "{sample:?}");
    let stored: BTreeSet<&str> = ["d/a", "d/b", "d/.hidden", "d/sub/c", "d/sub/deeper/e", "d2/x", "dd/y", "e"].into();
    assert!(sample.iter().all(|n| stored.contains(n.as_str())), "{sample:?}");
}

async fn listings_page_in_order(store: Store) {
    // More than one page of an S3 listing (1,000 keys).
    const N: usize = 1_100;
    futures::stream::iter(0..N)
        .map(|i| {
            let store = store.clone();
            async move { store.put_new(&format!("p/{i:05}"), Bytes::from(i.to_string())).await }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await
        .unwrap();
    let mut all: Vec<String> = store.list("p").await.unwrap().into_iter().map(|o| o.name).collect();
    all.sort();
    let want: Vec<String> = (0..N).map(|i| format!("p/{i:05}")).collect();
    assert_eq!(all, want, "every object, once");
    let tail = store.list_after("p", "p/00499", 2_000).await.unwrap();
    assert_eq!(tail, want[500..]);
    let head = store.list_after("p", "p/", 1_050).await.unwrap();
    assert_eq!(head, want[..1_050], "across a page");
}

async fn delete_removes_and_is_idempotent(store: Store) {
    store.put_new("x/gone", Bytes::from_static(b"bye")).await.unwrap();
    store.put_new("x/stays", Bytes::from_static(b"hi")).await.unwrap();
    store.delete("x/gone").await.unwrap();
    assert!(store.get("x/gone").await.unwrap_err().is_not_found());
    assert_eq!(names(&store.list("x").await.unwrap()), ["x/stays"]);
    store.delete("x/gone").await.expect("deleting again succeeds");
    store.delete("x/never").await.expect("deleting what never was succeeds");
    store.delete("nowhere/at/all").await.expect("even in a directory that does not exist");
    store.put_new("x/gone", Bytes::from_static(b"back")).await.expect("a deleted name can be used again");
    assert_eq!(store.get("x/gone").await.unwrap(), &b"back"[..]);
}

/// What prune deletes, in one call: more names than one batch, across
/// directories, some never there; every one goes and none is reported.
async fn delete_many_removes_every_name(store: Store) {
    let mut names: Vec<String> = (0..300).map(|i| format!("m/{}/{i:04}", i % 3)).collect();
    for n in &names {
        store.put_new(n, Bytes::from_static(b"m")).await.unwrap();
    }
    store.put_new("m/stays", Bytes::from_static(b"hi")).await.unwrap();
    names.push("m/never".into());
    names.push("nowhere/at/all".into());
    let failed = store.delete_many(&names.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(store.list_names("m").await.unwrap(), ["m/stays"]);
    for dir in ["m/0", "m/1", "m/2"] {
        assert_eq!(store.list_names(dir).await.unwrap(), Vec::<String>::new());
    }
}

/// An object written a piece at a time (prune's repacked packs): invisible until
/// finished, then exactly the pieces; never over a taken name; given up, nothing
/// of it is listed.
async fn new_object_appears_whole_and_only_once_finished(store: Store) {
    let mut object = store.new_object("packs/ab/streamed").await.unwrap();
    let pieces: Vec<Bytes> = (0..5).map(|i| noise(i, 100_000 + i as usize)).collect();
    for p in &pieces {
        object.write(p.to_vec()).await.unwrap();
    }
    assert_eq!(object.len(), pieces.iter().map(|p| p.len() as u64).sum::<u64>());
    assert!(store.list_names("packs").await.unwrap().is_empty(), "nothing shows before it is finished");
    object.finish().await.unwrap();
    assert_eq!(store.get("packs/ab/streamed").await.unwrap(), pieces.concat());
    assert_eq!(store.list_names("packs").await.unwrap(), ["packs/ab/streamed"]);

    store.put_new("packs/ab/taken", Bytes::from_static(b"first")).await.unwrap();
    let mut late = store.new_object("packs/ab/taken").await.unwrap();
    late.write(b"second".to_vec()).await.unwrap();
    assert!(matches!(late.finish().await, Err(StoreError::AlreadyExists { .. })));
    assert_eq!(store.get("packs/ab/taken").await.unwrap(), &b"first"[..]);

    let mut given_up = store.new_object("packs/cd/given-up").await.unwrap();
    given_up.write(b"half".to_vec()).await.unwrap();
    drop(given_up);
    assert_eq!(store.list_names("packs").await.unwrap(), ["packs/ab/streamed", "packs/ab/taken"]);
    assert!(store.get("packs/cd/given-up").await.unwrap_err().is_not_found());
}

/// Many objects read at once (`points` of a day reads its manifests so): each
/// answer in the place of its name, a missing one `NotFound` among the others,
/// and a directory is no object.
async fn get_many_answers_each_name_in_its_place(store: Store) {
    let names: Vec<String> = (0..40).map(|i| format!("g/{}/{i:03}", i % 4)).collect();
    for (i, n) in names.iter().enumerate() {
        store.put_new(n, noise(i as u64, 10 + i * 7)).await.unwrap();
    }
    let mut asked = names.clone();
    asked.insert(7, "g/1/missing".into());
    asked.push("g/0".into());
    let got = store.get_many(&asked).await;
    assert_eq!(got.len(), asked.len());
    for (name, got) in asked.iter().zip(&got) {
        match names.iter().position(|n| n == name) {
            Some(i) => assert_eq!(got.as_ref().unwrap(), &noise(i as u64, 10 + i * 7), "{name}"),
            None => assert!(got.as_ref().unwrap_err().is_not_found(), "{name}: {got:?}"),
        }
    }
    assert!(store.get_many(&[]).await.is_empty());
    assert!(store.get("g/0").await.unwrap_err().is_not_found(), "a directory is no object");
}

/// The size of each name asked for (`pg restore` looks for a run of whole WAL
/// segments so), in its place; a name missing, and a directory, are not found.
async fn sizes_answer_each_name_in_its_place(store: Store) {
    let names: Vec<String> =
        (0..20u64).map(|i| format!("wal/db/00000001/{:016x}-{:016x}", i << 24, (i + 1) << 24)).collect();
    for (i, n) in names.iter().enumerate() {
        store.put_new(n, noise(i as u64, 3 + i * 11)).await.unwrap();
    }
    let mut asked = names.clone();
    asked.insert(5, format!("wal/db/00000001/{:016x}-{:016x}", 99u64 << 24, 100u64 << 24));
    asked.push("wal/db".into());
    let got = store.sizes(&asked).await;
    assert_eq!(got.len(), asked.len());
    for (name, got) in asked.iter().zip(&got) {
        match names.iter().position(|n| n == name) {
            Some(i) => assert_eq!(got.as_ref().unwrap(), &((3 + i * 11) as u64), "{name}"),
            None => assert!(got.as_ref().unwrap_err().is_not_found(), "{name}: {got:?}"),
        }
    }
    assert!(store.sizes(&[]).await.is_empty());
}

/// What is read is counted, whole objects and ranges, by a store and its clones:
/// `pg serve` says how much of a base backup it fetched.
async fn bytes_read_are_counted(store: Store) {
    store.put_new("c/a", noise(1, 1000)).await.unwrap();
    store.put_new("c/b", noise(2, 300)).await.unwrap();
    let before = store.fetched();
    store.get("c/a").await.unwrap();
    store.clone().get_range("c/a", 10..110).await.unwrap();
    store.get_many(&["c/a".to_string(), "c/b".to_string(), "c/none".to_string()]).await;
    assert!(store.get("c/none").await.is_err());
    assert_eq!(store.fetched() - before, 1000 + 100 + 1000 + 300);
}

/// The names between two bounds (`points` of a day lists them so): every one after
/// the first bound and up to the second, in order, across the shard directories
/// `file://` keeps such names in, and nothing beyond.
async fn list_between_answers_every_name_in_range(store: Store) {
    let names: Vec<String> =
        (0..60u64).map(|i| format!("points/s/{:016x}-{:016x}", 0xe700_0000_0000_0000 + i * (3 << 38), i)).collect();
    for (i, n) in names.iter().enumerate() {
        store.put_new(n, noise(i as u64, 5)).await.unwrap();
    }
    store.put_new("points/s.other", noise(99, 5)).await.unwrap();
    for (a, b) in [(0, 59), (3, 40), (10, 11), (20, 20), (0, 0)] {
        let (after, upto) = (&names[a], &names[b]);
        for page in [1, 7, 1000] {
            let got = store.list_between("points/s", after, upto, page).await.unwrap();
            assert_eq!(got, names[a + 1..=b.max(a)], "after {a} up to {b}, pages of {page}");
        }
    }
    let upto_prefix = format!("{}.", &names[30][..25]);
    let got = store.list_between("points/s", "points/s/", &upto_prefix, 4).await.unwrap();
    assert_eq!(got, names[..=30], "a bound between names keeps what sorts before it");
}

async fn names_of_every_allowed_character_round_trip(store: Store) {
    // Object names use [A-Za-z0-9._/-]; a segment may start or end with any of them.
    let all = [
        "c/ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "c/abcdefghijklmnopqrstuvwxyz",
        "c/0123456789",
        "c/._-",
        "c/.a",
        "c/-a",
        "c/_a",
        "c/a.",
        "c/a-",
        "c/..a",
        "c/a..b",
        "c/x.y-z_0/A.b-C_9",
    ];
    for (i, n) in all.iter().enumerate() {
        store.put_new(n, noise(i as u64, 100 + i)).await.unwrap_or_else(|e| panic!("{n}: {e}"));
    }
    for (i, n) in all.iter().enumerate() {
        assert_eq!(store.get(n).await.unwrap_or_else(|e| panic!("{n}: {e}")), noise(i as u64, 100 + i), "{n}");
        assert_eq!(store.size(n).await.unwrap(), (100 + i) as u64, "{n}");
    }
    let listed: BTreeSet<String> = store.list("c").await.unwrap().into_iter().map(|o| o.name).collect();
    assert_eq!(listed, all.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>(), "listed under their own names");
    let flat: Vec<String> = store.list_after("c", "c/", 100).await.unwrap();
    let mut want: Vec<String> = all.iter().filter(|n| n.matches('/').count() == 1).map(|n| n.to_string()).collect();
    want.sort();
    assert_eq!(flat, want);
    assert_eq!(store.list_dirs("c").await.unwrap(), ["x.y-z_0"]);
    for n in all {
        store.delete(n).await.unwrap();
    }
    assert!(store.list("c").await.unwrap().is_empty());
}

async fn large_objects_round_trip(store: Store) {
    let big = noise(42, 40 << 20);
    store.put_new("big/one", big.clone()).await.unwrap();
    assert_eq!(store.size("big/one").await.unwrap(), big.len() as u64);
    let got = store.get("big/one").await.unwrap();
    assert!(got == big, "40 MiB read back as written");
    let r = (17 << 20) + 3..(18 << 20) + 11;
    assert_eq!(store.get_range("big/one", r.clone()).await.unwrap(), big.slice(r.start as usize..r.end as usize));
    let end = big.len() as u64;
    assert_eq!(store.get_range("big/one", end - 5..end).await.unwrap(), big.slice(big.len() - 5..));
}

async fn time_keyed_names_list_in_order(store: Store) {
    // What fills up with time (points, fragments, WAL pieces; a file:// store keeps
    // them in shard directories) lists like anything else: in order, from a name on.
    let mut all = Vec::new();
    for i in 0..300u64 {
        let key = u64::MAX - 1_763_720_100_000_000_000 - i * 7_000_000_000_000;
        all.push(format!("points/s/{key:016x}-{i:016x}"));
        all.push(format!("frags/s/{key:016x}-{i:016x}"));
        let lsn = i * 5_000_000;
        all.push(format!("wal/s/00000001/{lsn:016x}-{:016x}", lsn + 100));
    }
    all.extend(["points/s/zz".to_string(), "wal/s/00000001/x".to_string(), "wal/s/system".to_string()]);
    futures::stream::iter(all.clone())
        .map(|n| {
            let store = store.clone();
            async move { store.put_new(&n, Bytes::from(n.clone())).await }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await
        .unwrap();
    all.sort();
    let mut listed = Vec::new();
    for top in ["frags", "points", "wal"] {
        listed.extend(store.list_names(top).await.unwrap());
    }
    listed.sort();
    assert!(listed == all, "every name once, as written: {} listed, {} written", listed.len(), all.len());
    for dir in ["points/s", "frags/s", "wal/s/00000001"] {
        let under: Vec<&String> = all.iter().filter(|n| n.rsplit_once('/').unwrap().0 == dir).collect();
        for (from, limit) in [(None, 1000), (None, 1), (Some(7), 1), (Some(150), 3), (Some(under.len() - 2), 5)] {
            let after = from.map_or(format!("{dir}/"), |i| under[i].clone());
            let want: Vec<String> = under.iter().filter(|n| ***n > after).take(limit).map(|n| n.to_string()).collect();
            assert_eq!(store.list_after(dir, &after, limit).await.unwrap(), want, "{dir} after {after}, {limit}");
        }
    }
    let one = &all[17];
    assert_eq!(store.get(one).await.unwrap(), one.as_bytes());
    assert_eq!(store.get_range(one, 2..5).await.unwrap(), one.as_bytes()[2..5]);
    assert!(matches!(store.put_new(one, Bytes::new()).await, Err(StoreError::AlreadyExists { .. })));
    for n in &all {
        store.delete(n).await.unwrap();
    }
    assert!(store.list_names("points").await.unwrap().is_empty());
    assert!(store.list_after("wal/s/00000001", "", 10).await.unwrap().is_empty());
}

/// One test per case and backend: `memory_<case>`, `file_<case>`, `s3_<case>`.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod memory { $( #[tokio::test(flavor = "multi_thread")] async fn $case() { super::run(super::Backend::Memory, super::$case).await } )* }
        mod file { $( #[tokio::test(flavor = "multi_thread")] async fn $case() { super::run(super::Backend::File, super::$case).await } )* }
        mod s3_backend { $( #[tokio::test(flavor = "multi_thread")] async fn $case() { super::run(super::Backend::S3, super::$case).await } )* }
    };
}

async fn run<F: std::future::Future<Output = ()>>(backend: Backend, case: impl FnOnce(Store) -> F) {
    let (store, _keep) = fresh(backend);
    case(store).await
}

conformance!(
    put_new_refuses_a_taken_name,
    concurrent_puts_of_one_name_have_one_winner,
    what_is_missing_is_not_found,
    ranged_gets_are_exact_at_the_edges,
    listings_see_a_directory_and_nothing_else,
    listings_page_in_order,
    delete_removes_and_is_idempotent,
    delete_many_removes_every_name,
    new_object_appears_whole_and_only_once_finished,
    get_many_answers_each_name_in_its_place,
    sizes_answer_each_name_in_its_place,
    bytes_read_are_counted,
    list_between_answers_every_name_in_range,
    names_of_every_allowed_character_round_trip,
    large_objects_round_trip,
    time_keyed_names_list_in_order,
);
