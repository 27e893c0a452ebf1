//! End-to-end security tests of the `ebb` binary (DESIGN.md sections 2 and 7), each
//! run against both backends (`file://` and `s3://` on the moto test server):
//!
//! 1. no plaintext leaks: file names, directory names, contents, paths, xattrs,
//!    symlink targets and the password never appear in any stored object or name;
//! 2. every byte flip in every object (config, key slot, pack, index, manifest) is
//!    caught by `ebb verify --read-data`, naming the object, and restore never
//!    returns wrong bytes;
//! 3. swapped packs, manifests and index files are detected, never trusted;
//! 4. a wrong password fails clearly and changes nothing;
//! 5. key slots: add / remove / refuse the last one / key files 0600, and slot
//!    changes never rewrite data objects.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::{compare_trees, pseudo_random_bytes, Backend, TestRepo, TEST_PASSWORD};

// ---------------------------------------------------------------------------------
// Helpers

fn tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir().expect("creating a temp dir")
}

/// Runs `ebb ARGS` for `repo` with extra environment changes: `(name, Some(v))` sets,
/// `(name, None)` removes. Variables the harness does not clear but that would change
/// how `ebb` unlocks the repository are always removed first.
fn ebb_env(repo: &TestRepo, args: &[&str], env: &[(&str, Option<&str>)]) -> Output {
    let mut c = repo.cmd();
    c.env_remove("EBB_KEY_FILE").env_remove("EBB_NEW_PASSWORD");
    for (k, v) in env {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c.args(args);
    c.output().unwrap_or_else(|e| panic!("cannot run `ebb {}`: {e}", args.join(" ")))
}

/// What the user saw: the command, its exit status, stdout and stderr.
fn seen(repo: &TestRepo, args: &[&str], out: &Output) -> String {
    format!(
        "`ebb {}` (repository {}) exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        args.join(" "),
        repo.url(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn text(out: &Output) -> String {
    format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `ebb ARGS` and asserts exit code `code`, returning the output.
fn expect_code(repo: &TestRepo, args: &[&str], env: &[(&str, Option<&str>)], code: i32, why: &str) -> Output {
    let out = ebb_env(repo, args, env);
    assert_eq!(out.status.code(), Some(code), "{why}: expected exit code {code}\n{}", seen(repo, args, &out));
    out
}

/// Every stored object and its bytes.
fn snapshot(repo: &TestRepo) -> BTreeMap<String, Vec<u8>> {
    repo.objects()
        .into_iter()
        .map(|k| {
            let b = repo.read_object(&k);
            (k, b)
        })
        .collect()
}

/// Panics listing the objects added, removed or changed between two snapshots.
fn assert_same_objects(before: &BTreeMap<String, Vec<u8>>, after: &BTreeMap<String, Vec<u8>>, what: &str) {
    let mut diffs = Vec::new();
    for (k, v) in before {
        match after.get(k) {
            None => diffs.push(format!("removed: {k}")),
            Some(w) if w != v => diffs.push(format!("rewritten: {k} ({} -> {} bytes)", v.len(), w.len())),
            _ => {}
        }
    }
    for k in after.keys().filter(|k| !before.contains_key(*k)) {
        diffs.push(format!("added: {k}"));
    }
    assert!(diffs.is_empty(), "{what}: the store changed:\n  {}", diffs.join("\n  "));
}

fn without_keys(s: &BTreeMap<String, Vec<u8>>) -> BTreeMap<String, Vec<u8>> {
    s.iter().filter(|(k, _)| !k.starts_with("keys/")).map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// A tree as relative path -> entry (regular file contents, symlink target, dir).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Dir,
    File(Vec<u8>),
    Symlink(PathBuf),
    Other,
}

type Tree = BTreeMap<String, Entry>;

fn read_tree(root: &Path) -> Tree {
    fn walk(root: &Path, rel: &Path, out: &mut Tree) {
        let dir = root.join(rel);
        for e in fs::read_dir(&dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display())) {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            let p = root.join(&r);
            let m = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
            let key = r.to_str().expect("test trees have UTF-8 names").to_string();
            if m.is_dir() {
                out.insert(key, Entry::Dir);
                walk(root, &r, out);
            } else if m.file_type().is_symlink() {
                out.insert(key, Entry::Symlink(fs::read_link(&p).unwrap()));
            } else if m.is_file() {
                out.insert(key, Entry::File(fs::read(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))));
            } else {
                out.insert(key, Entry::Other);
            }
        }
    }
    let mut out = Tree::new();
    if root.exists() {
        walk(root, Path::new(""), &mut out);
    }
    out
}

/// The entries a failed restore lists on stderr, relative to `target` ("" = the
/// target itself), from lines of the form `  TARGET/REL: reason`.
fn listed_failures(stderr: &str, target: &Path) -> Vec<String> {
    let t = target.to_str().unwrap();
    let mut out = Vec::new();
    for line in stderr.lines() {
        let Some(rest) = line.trim_start().strip_prefix(t) else { continue };
        if let Some(r) = rest.strip_prefix('/') {
            if let Some((name, _)) = r.split_once(": ") {
                out.push(name.to_string());
            }
        } else if rest.starts_with(": ") {
            out.push(String::new());
        }
    }
    out
}

fn under(rel: &str, listed: &str) -> bool {
    listed.is_empty() || rel == listed || rel.starts_with(&format!("{listed}/"))
}

#[derive(Debug, PartialEq, Eq)]
enum Restored {
    Complete,
    /// Exit 1; the entries listed on stderr as not restored.
    Partial(Vec<String>),
}

/// Runs `ebb restore --at AT TARGET` (TARGET new) and checks the "never wrong bytes"
/// contract against `expected`: exit 0 and exactly `expected`, or exit 1 with the
/// entries it could not restore listed on stderr, each of them absent (nothing of it
/// or under it restored), every other entry restored byte-identical, nothing extra;
/// or exit 1 with nothing written at all when nothing could be restored.
/// When it fails, stderr must name one of `damaged` (the objects the test altered).
fn restore_checked(repo: &TestRepo, at: &str, target: &Path, expected: &Tree, damaged: &[&str], ctx: &str) -> Restored {
    assert!(!target.exists(), "test bug: restore target {} exists", target.display());
    let t = target.to_str().unwrap();
    let args = ["restore", "--at", at, t];
    let out = ebb_env(repo, &args, &[]);
    let what = || format!("{ctx}\n{}", seen(repo, &args, &out));
    let actual = read_tree(target);
    let err = stderr(&out);
    let listed = match out.status.code() {
        Some(0) => Vec::new(),
        Some(1) => {
            let mut listed = listed_failures(&err, target);
            if listed.is_empty() {
                // A restore that could restore nothing at all (e.g. the root tree is
                // unreadable) may fail as a whole, with one error and nothing written.
                assert!(
                    actual.is_empty(),
                    "restore exited 1 and wrote entries into the target, but listed no entry it could not \
                     restore (expected lines `  {t}/PATH: reason`); restored: {:?}\n{}",
                    actual.keys().collect::<Vec<_>>(),
                    what()
                );
                listed.push(String::new());
            }
            if !damaged.is_empty() {
                assert!(
                    damaged.iter().any(|d| err.contains(d)),
                    "restore failed but its stderr names none of the damaged objects {damaged:?}\n{}",
                    what()
                );
            }
            listed
        }
        _ => panic!("restore must exit 0 (complete) or 1 (damaged entries left out)\n{}", what()),
    };
    for l in &listed {
        assert!(
            l.is_empty() || expected.contains_key(l),
            "restore lists {l:?} as not restored, but the point has no such entry\n{}",
            what()
        );
        for (rel, e) in &actual {
            if under(rel, l) && !(rel == l && *e == Entry::Dir) {
                panic!("restore lists {l:?} as not restored, yet {rel:?} is present in the target ({e:?})\n{}", what());
            }
        }
    }
    for (rel, e) in &actual {
        match expected.get(rel) {
            None => panic!("restore produced {rel:?}, which is not in the point\n{}", what()),
            Some(x) if x != e => panic!(
                "WRONG DATA: restore produced {rel:?} different from the backed-up entry ({})\n{}",
                match (x, e) {
                    (Entry::File(a), Entry::File(b)) =>
                        format!("{} bytes expected, {} bytes restored", a.len(), b.len()),
                    _ => format!("expected {x:?}, restored {e:?}"),
                },
                what()
            ),
            _ => {}
        }
    }
    for (rel, e) in expected {
        if !actual.contains_key(rel) {
            assert!(
                listed.iter().any(|l| under(rel, l)),
                "{rel:?} ({}) is missing from the restore, but stderr does not list it (or a directory above it) as not restored\n{}",
                if matches!(e, Entry::Dir) { "directory" } else { "file" },
                what()
            );
        }
    }
    if listed.is_empty() {
        Restored::Complete
    } else {
        Restored::Partial(listed)
    }
}

/// The JSON of `ebb points --json`.
fn points(repo: &TestRepo) -> Vec<serde_json::Value> {
    let out = repo.ok(&["points", "--json"]);
    serde_json::from_str::<Vec<serde_json::Value>>(&out)
        .unwrap_or_else(|e| panic!("`ebb points --json` is not a JSON array: {e}\n{out}"))
}

fn flip(bytes: &[u8], pos: usize) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[pos] ^= 0xff;
    b
}

fn write_secret_file(path: &Path, content: &str) {
    fs::write(path, content).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

// ---------------------------------------------------------------------------------
// 1. No plaintext leaks

const MARKER_DIR: &str = "confidential-dir-91c2";
const MARKER_NESTED: &str = "nested-dir-marker-6c3d";
const MARKER_NAME: &str = "secret-name-7f3a.txt";
const MARKER_TINY_NAME: &str = "tiny-file-marker-4c8d";
const MARKER_DEEP_NAME: &str = "deep-file-marker-1a9e";
const MARKER_CONTENT: &str = "plaintext-marker-content-5be1";
const MARKER_TINY: &str = "tiny-secret-6a0f";
const MARKER_MIXED: &str = "mixed-content-marker-93b7";
const MARKER_LINK: &str = "link-name-marker-2d4e";
const MARKER_TARGET: &str = "symlink-target-marker-8e1b";
const MARKER_XATTR_NAME: &str = "user.xattr-name-marker-5f0c";
const MARKER_XATTR_VALUE: &str = "xattr-value-marker-0b7d";
const MARKER_ROOT: &str = "source-root-marker-d00d";

fn no_plaintext(b: Backend) {
    let tmp = tempdir("ebb-sec-plain-");
    let root = tmp.path().join(MARKER_ROOT);
    let dir = root.join(MARKER_DIR);
    fs::create_dir_all(dir.join(MARKER_NESTED)).unwrap();
    // Compressible: the marker repeated (~600 KiB, compresses well).
    let repeated = format!("{MARKER_CONTENT}\n").repeat(20_000);
    fs::write(dir.join(MARKER_NAME), &repeated).unwrap();
    // Tiny: compression does not pay.
    fs::write(root.join(MARKER_TINY_NAME), MARKER_TINY).unwrap();
    // Incompressible with the marker inside.
    let mut mixed = pseudo_random_bytes(0x5ec1, 256 << 10);
    mixed.splice(100_000..100_000, MARKER_MIXED.bytes());
    fs::write(root.join("mixed.bin"), &mixed).unwrap();
    fs::write(dir.join(MARKER_NESTED).join(MARKER_DEEP_NAME), b"deep\n").unwrap();
    symlink(format!("{MARKER_TARGET}/x"), root.join(MARKER_LINK)).unwrap();
    let xattrs = xattr::set(root.join(MARKER_TINY_NAME), MARKER_XATTR_NAME, MARKER_XATTR_VALUE.as_bytes()).is_ok();
    if !xattrs {
        eprintln!("note: xattrs not supported under {}, not checking xattr markers", tmp.path().display());
    }

    let repo = TestRepo::new(b);
    repo.init();
    let root_s = root.to_str().unwrap();
    repo.ok(&["backup", "--source", "docs", root_s]);
    // A second point after a change, so incremental trees are stored too.
    fs::write(dir.join(MARKER_NESTED).join(MARKER_DEEP_NAME), format!("deep {MARKER_CONTENT}\n")).unwrap();
    repo.ok(&["backup", "--source", "docs", root_s]);

    let mut markers: Vec<String> = vec![
        MARKER_DIR,
        MARKER_NESTED,
        MARKER_NAME,
        MARKER_TINY_NAME,
        MARKER_DEEP_NAME,
        MARKER_CONTENT,
        MARKER_TINY,
        MARKER_MIXED,
        MARKER_LINK,
        MARKER_TARGET,
        MARKER_ROOT,
        TEST_PASSWORD,
    ]
    .into_iter()
    .map(String::from)
    .collect();
    if xattrs {
        markers.push(MARKER_XATTR_NAME.into());
        markers.push(MARKER_XATTR_VALUE.into());
    }
    markers.push(root_s.to_string());
    // Every distinctive component of the source path (e.g. the temp dir's name);
    // short ones like "tmp" would match random ciphertext by chance.
    for c in root.components() {
        let c = c.as_os_str().to_str().unwrap();
        if c.len() >= 10 && !markers.iter().any(|m| m == c) {
            markers.push(c.to_string());
        }
    }

    let objects = snapshot(&repo);
    assert!(objects.keys().any(|k| k.starts_with("packs/")), "no packs stored: {:?}", objects.keys());
    let mut leaks = Vec::new();
    for m in &markers {
        for (k, v) in &objects {
            if k.contains(m.as_str()) {
                leaks.push(format!("object NAME {k} contains {m:?}"));
            }
            if contains(v, m.as_bytes()) {
                leaks.push(format!("object {k} ({} bytes) contains {m:?} in its stored bytes", v.len()));
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "plaintext leaked into the {b:?} repository {}:\n  {}\nobjects: {:?}",
        repo.url(),
        leaks.join("\n  "),
        objects.keys().collect::<Vec<_>>()
    );
}

#[test]
fn no_plaintext_file() {
    no_plaintext(Backend::File)
}
#[test]
fn no_plaintext_s3() {
    no_plaintext(Backend::S3)
}

// ---------------------------------------------------------------------------------
// 2. Every byte flip is caught

/// A source tree: one ~3 MiB random file, several small files in a subdirectory too.
fn make_flip_source(root: &Path) {
    fs::create_dir_all(root.join("sub/deeper")).unwrap();
    fs::write(root.join("big.bin"), pseudo_random_bytes(0xf11b, 3 << 20)).unwrap();
    fs::write(root.join("a.txt"), b"small file a\n").unwrap();
    fs::write(root.join("b.txt"), b"small file b, a little longer than a\n").unwrap();
    fs::write(root.join("sub/c.txt"), b"file c in a subdirectory\n").unwrap();
    fs::write(root.join("sub/d.bin"), pseudo_random_bytes(0xd, 8 << 10)).unwrap();
    fs::write(root.join("sub/deeper/e.txt"), b"e\n").unwrap();
}

fn every_flip_caught(b: Backend) {
    let tmp = tempdir("ebb-sec-flip-");
    let src = tmp.path().join("src");
    make_flip_source(&src);
    let expected = read_tree(&src);
    let repo = TestRepo::new(b);
    repo.init();
    repo.ok(&["backup", "--source", "src", src.to_str().unwrap()]);
    repo.ok(&["verify", "--read-data"]);

    let keys = repo.objects();
    let count = |p: &str| keys.iter().filter(|k| k.starts_with(p)).count();
    assert!(keys.iter().any(|k| k == "config"), "no config object: {keys:?}");
    assert_eq!(count("keys/"), 1, "one key slot expected after init: {keys:?}");
    assert!(count("packs/") >= 2, "expected at least 2 packs (a 3 MiB file and small files): {keys:?}");
    assert!(count("index/") >= 1, "no index object: {keys:?}");
    assert!(count("points/") >= 1, "no point manifest: {keys:?}");

    let mut restores = 0;
    for key in &keys {
        let original = repo.read_object(key);
        assert!(!original.is_empty(), "object {key} is empty");
        let n = original.len();
        let mut positions = vec![("first", 0), ("middle", n / 2), ("last", n - 1)];
        positions.dedup_by_key(|p| p.1);
        let is_pack = key.starts_with("packs/");
        let mut restore_failed = Vec::new();
        for (label, pos) in positions {
            let ctx = format!("{b:?}: object {key} ({n} bytes) with its {label} byte (offset {pos}) flipped");
            repo.write_object(key, &flip(&original, pos));

            let args = ["verify", "--read-data"];
            let out = ebb_env(&repo, &args, &[]);
            let all = text(&out);
            assert_eq!(out.status.code(), Some(1), "{ctx}: verify must exit 1\n{}", seen(&repo, &args, &out));
            assert!(
                all.contains(key.as_str()),
                "{ctx}: verify must name the damaged object {key}\n{}",
                seen(&repo, &args, &out)
            );
            if key.starts_with("keys/") {
                assert!(
                    all.contains("corrupt"),
                    "{ctx}: the only key slot is damaged; the error must say it is corrupted\n{}",
                    seen(&repo, &args, &out)
                );
            }

            if is_pack {
                restores += 1;
                let target = tmp.path().join(format!("restore-{restores}"));
                let r = restore_checked(&repo, "latest", &target, &expected, &[key.as_str()], &ctx);
                match r {
                    Restored::Complete => {
                        let diffs = compare_trees(&src, &target);
                        assert!(
                            diffs.is_empty(),
                            "{ctx}: restore succeeded but the tree differs from the source:\n  {}",
                            diffs.join("\n  ")
                        );
                    }
                    Restored::Partial(listed) => {
                        eprintln!("{ctx}: restore left out {listed:?}");
                        restore_failed.push(format!("{label}: {listed:?}"));
                    }
                }
            }

            repo.write_object(key, &original);
            let out = ebb_env(&repo, &args, &[]);
            assert_eq!(
                out.status.code(),
                Some(0),
                "{ctx}, then put back: verify must pass again\n{}",
                seen(&repo, &args, &out)
            );
        }
        if is_pack {
            assert!(
                !restore_failed.is_empty(),
                "{b:?}: no byte flip in {key} made restore fail, though every pack holds blobs the point needs \
                 (first byte: the first blob; middle: a blob for a big pack)"
            );
        }
    }
}

#[test]
fn every_flip_caught_file() {
    every_flip_caught(Backend::File)
}
#[test]
fn every_flip_caught_s3() {
    every_flip_caught(Backend::S3)
}

// ---------------------------------------------------------------------------------
// 3. Swapped objects are detected

fn swap(repo: &TestRepo, a: &str, b: &str) {
    let (ba, bb) = (repo.read_object(a), repo.read_object(b));
    assert_ne!(ba, bb, "test bug: {a} and {b} have the same bytes");
    repo.write_object(a, &bb);
    repo.write_object(b, &ba);
}

fn swapped_objects_detected(b: Backend) {
    let tmp = tempdir("ebb-sec-swap-");
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("big.bin"), pseudo_random_bytes(0x5a1, 1536 << 10)).unwrap();
    fs::write(src.join("a.txt"), b"version one of a\n").unwrap();
    fs::write(src.join("sub/b.txt"), b"b stays the same\n").unwrap();
    let repo = TestRepo::new(b);
    repo.init();
    let src_s = src.to_str().unwrap();
    repo.ok(&["backup", "--source", "src", src_s]);
    let v1 = read_tree(&src);
    fs::write(src.join("a.txt"), b"version two of a, changed\n").unwrap();
    fs::write(src.join("sub/new.bin"), pseudo_random_bytes(0x5a2, 300 << 10)).unwrap();
    repo.ok(&["backup", "--source", "src", src_s]);
    let v2 = read_tree(&src);

    let pts = points(&repo);
    assert_eq!(pts.len(), 2, "two points expected: {pts:?}");
    let t1 = pts.iter().map(|p| p["time"].as_str().expect("point time").to_string()).min().unwrap();
    let keys = repo.objects();
    let of = |p: &str| keys.iter().filter(|k| k.starts_with(p)).cloned().collect::<Vec<_>>();
    let (packs, manifests, indexes) = (of("packs/"), of("points/"), of("index/"));
    assert!(packs.len() >= 2, "at least two packs expected: {keys:?}");
    assert_eq!(manifests.len(), 2, "two point manifests expected: {keys:?}");
    let pristine = snapshot(&repo);
    let mut n = 0;
    let mut target = || {
        n += 1;
        tmp.path().join(format!("restore-{n}"))
    };

    // Packs: swap them pairwise so that every pack is in one swap.
    let mut pairs: Vec<(String, String)> =
        packs.chunks(2).filter(|c| c.len() == 2).map(|c| (c[0].clone(), c[1].clone())).collect();
    if packs.len() % 2 == 1 {
        pairs.push((packs[packs.len() - 1].clone(), packs[0].clone()));
    }
    for (a, c) in &pairs {
        let ctx = format!("{b:?}: packs {a} and {c} swapped");
        swap(&repo, a, c);
        let args = ["verify", "--read-data"];
        let out = ebb_env(&repo, &args, &[]);
        let all = text(&out);
        assert_eq!(out.status.code(), Some(1), "{ctx}: verify must exit 1\n{}", seen(&repo, &args, &out));
        for k in [a, c] {
            assert!(all.contains(k.as_str()), "{ctx}: verify must name {k}\n{}", seen(&repo, &args, &out));
        }
        restore_checked(&repo, "latest", &target(), &v2, &[a, c], &format!("{ctx}, restoring the latest point"));
        restore_checked(&repo, &t1, &target(), &v1, &[a, c], &format!("{ctx}, restoring the first point"));
        swap(&repo, a, c);
    }
    assert_same_objects(&pristine, &snapshot(&repo), "after swapping the packs back");

    // Manifests.
    let (m1, m2) = (&manifests[0], &manifests[1]);
    let ctx = format!("{b:?}: point manifests {m1} and {m2} swapped");
    swap(&repo, m1, m2);
    let out = expect_code(&repo, &["points"], &[], 1, &ctx);
    let all = text(&out);
    assert!(
        all.contains(m1.as_str()) || all.contains(m2.as_str()),
        "{ctx}: `ebb points` must name the damaged manifest\n{}",
        seen(&repo, &["points"], &out)
    );
    let out = expect_code(&repo, &["verify"], &[], 1, &ctx);
    let all = text(&out);
    for k in [m1, m2] {
        assert!(all.contains(k.as_str()), "{ctx}: verify must name {k}\n{}", seen(&repo, &["verify"], &out));
    }
    let tg = target();
    let args = ["restore", "--at", "latest", tg.to_str().unwrap()];
    let out = expect_code(
        &repo,
        &args,
        &[],
        1,
        &format!("{ctx}: restoring the latest point must fail, not restore another point's state"),
    );
    let all = text(&out);
    assert!(
        all.contains(m1.as_str()) || all.contains(m2.as_str()),
        "{ctx}: restore must name the damaged manifest\n{}",
        seen(&repo, &args, &out)
    );
    let restored = read_tree(&tg);
    assert!(
        restored.is_empty(),
        "{ctx}: restore failed but left entries in the target: {:?}\n{}",
        restored.keys(),
        seen(&repo, &args, &out)
    );
    swap(&repo, m1, m2);
    repo.ok(&["points"]);

    // Index files.
    if indexes.len() >= 2 {
        let (i1, i2) = (&indexes[0], &indexes[1]);
        let ctx = format!("{b:?}: index files {i1} and {i2} swapped");
        swap(&repo, i1, i2);
        let args = ["verify", "--read-data"];
        let out = ebb_env(&repo, &args, &[]);
        let all = text(&out);
        assert_eq!(out.status.code(), Some(1), "{ctx}: verify must exit 1\n{}", seen(&repo, &args, &out));
        for k in [i1, i2] {
            assert!(all.contains(k.as_str()), "{ctx}: verify must name {k}\n{}", seen(&repo, &args, &out));
        }
        restore_checked(&repo, "latest", &target(), &v2, &[i1, i2], &format!("{ctx}, restoring the latest point"));
        restore_checked(&repo, &t1, &target(), &v1, &[i1, i2], &format!("{ctx}, restoring the first point"));
        // A backup that cannot trust the index must not make a point that reads wrong.
        fs::write(src.join("a.txt"), b"version three of a, written while the index was swapped\n").unwrap();
        let bargs = ["backup", "--source", "src", src_s];
        let out = ebb_env(&repo, &bargs, &[]);
        let code = out.status.code();
        assert!(
            matches!(code, Some(0) | Some(1)),
            "{ctx}: backup must succeed or fail cleanly\n{}",
            seen(&repo, &bargs, &out)
        );
        swap(&repo, i1, i2);
        let out = ebb_env(&repo, &args, &[]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{ctx}, a backup run ({code:?}), index files put back: verify must pass\n{}",
            seen(&repo, &args, &out)
        );
        let want = if code == Some(0) { read_tree(&src) } else { v2.clone() };
        let r = restore_checked(
            &repo,
            "latest",
            &target(),
            &want,
            &[],
            &format!("{ctx}, after a backup with exit {code:?} and the index put back"),
        );
        assert_eq!(
            r,
            Restored::Complete,
            "{ctx}: restore of the latest point after putting the index back must be complete"
        );
    } else {
        eprintln!("note: only {} index file(s); index swap not tested ({keys:?})", indexes.len());
    }
}

#[test]
fn swapped_objects_detected_file() {
    swapped_objects_detected(Backend::File)
}
#[test]
fn swapped_objects_detected_s3() {
    swapped_objects_detected(Backend::S3)
}

// ---------------------------------------------------------------------------------
// 4. Wrong password

const WRONG_PASSWORD: &str = "wrong-password-3e9a-not-the-real-one";

fn assert_wrong_password_message(repo: &TestRepo, args: &[&str], out: &Output) {
    let err = stderr(out).to_lowercase();
    assert_eq!(out.status.code(), Some(1), "wrong password: expected exit code 1\n{}", seen(repo, args, out));
    assert!(
        err.contains("password") && err.contains("key slot") && err.contains("none"),
        "wrong password: the message must say the password opens none of the key slots\n{}",
        seen(repo, args, out)
    );
    let all = text(out);
    for secret in [WRONG_PASSWORD, TEST_PASSWORD] {
        assert!(!all.contains(secret), "a password appears in the output of ebb\n{}", seen(repo, args, out));
    }
}

fn wrong_password(b: Backend) {
    let tmp = tempdir("ebb-sec-wrongpw-");
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f.txt"), b"some data\n").unwrap();
    fs::write(src.join("r.bin"), pseudo_random_bytes(0x3e9a, 64 << 10)).unwrap();
    let repo = TestRepo::new(b);
    repo.init();
    let src_s = src.to_str().unwrap();
    repo.ok(&["backup", "--source", "src", src_s]);
    fs::write(src.join("f.txt"), b"changed data that a wrong-password backup must not store\n").unwrap();
    let slot = repo.objects().into_iter().find(|k| k.starts_with("keys/")).expect("a key slot");
    let slot_id = slot.strip_prefix("keys/").unwrap().to_string();
    let newpw = tmp.path().join("newpw");
    write_secret_file(&newpw, "another password 81f2\n");
    let before = snapshot(&repo);
    let target = tmp.path().join("restore-target");
    let t = target.to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["points"],
        vec!["backup", "--source", "src", src_s],
        vec!["restore", "--at", "latest", t],
        vec!["verify"],
        vec!["verify", "--read-data"],
        vec!["key", "add", "--new-password-file", newpw.to_str().unwrap()],
        vec!["key", "remove", &slot_id],
    ];
    for args in &cases {
        let out = ebb_env(&repo, args, &[("EBB_PASSWORD", Some(WRONG_PASSWORD))]);
        assert_wrong_password_message(&repo, args, &out);
        assert_same_objects(
            &before,
            &snapshot(&repo),
            &format!("{b:?}: after `ebb {}` with a wrong password", args.join(" ")),
        );
        if args[0] == "restore" {
            let restored = read_tree(&target);
            assert!(
                restored.is_empty(),
                "restore with a wrong password wrote into the target: {:?}\n{}",
                restored.keys(),
                seen(&repo, args, &out)
            );
        }
    }
    // The same through --password-file.
    let wrongfile = tmp.path().join("wrongpw");
    write_secret_file(&wrongfile, &format!("{WRONG_PASSWORD}\n"));
    let args = ["--password-file", wrongfile.to_str().unwrap(), "points"];
    let out = ebb_env(&repo, &args, &[("EBB_PASSWORD", None)]);
    assert_wrong_password_message(&repo, &args, &out);
    assert_same_objects(&before, &snapshot(&repo), &format!("{b:?}: after `ebb points` with a wrong password file"));
    // And the right password still works.
    repo.ok(&["verify"]);
}

#[test]
fn wrong_password_file() {
    wrong_password(Backend::File)
}
#[test]
fn wrong_password_s3() {
    wrong_password(Backend::S3)
}

// ---------------------------------------------------------------------------------
// 5. Key slots

fn slot_list(repo: &TestRepo, env: &[(&str, Option<&str>)]) -> Vec<serde_json::Value> {
    let args = ["key", "list", "--json"];
    let out = expect_code(repo, &args, env, 0, "key list");
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout)
        .unwrap_or_else(|e| panic!("`ebb key list --json` is not a JSON array: {e}\n{}", seen(repo, &args, &out)))
}

fn slot_ids(slots: &[serde_json::Value]) -> BTreeSet<String> {
    slots.iter().map(|s| s["id"].as_str().unwrap_or_else(|| panic!("slot without an id: {s}")).to_string()).collect()
}

fn key_slots(b: Backend) {
    let tmp = tempdir("ebb-sec-keys-");
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f.txt"), b"key slot test data\n").unwrap();
    fs::write(src.join("r.bin"), pseudo_random_bytes(0x7e7, 100 << 10)).unwrap();
    let repo = TestRepo::new(b);
    repo.init();
    repo.ok(&["backup", "--source", "src", src.to_str().unwrap()]);
    let data_before = without_keys(&snapshot(&repo));
    let old_pw = [("EBB_PASSWORD", Some(TEST_PASSWORD))];
    let old_ids = slot_ids(&slot_list(&repo, &old_pw));
    assert_eq!(old_ids.len(), 1, "one slot after init: {old_ids:?}");
    let old_id = old_ids.iter().next().unwrap().clone();

    // Add a password slot.
    const NEW_PASSWORD: &str = "new password for ebb tests 4b1d";
    let new_pw = [("EBB_PASSWORD", Some(NEW_PASSWORD))];
    let pwfile = tmp.path().join("new-password");
    write_secret_file(&pwfile, &format!("{NEW_PASSWORD}\n"));
    let args = ["key", "add", "--new-password-file", pwfile.to_str().unwrap()];
    let out = expect_code(&repo, &args, &[], 0, "key add --new-password-file");
    assert!(!text(&out).contains(NEW_PASSWORD), "key add printed the new password\n{}", seen(&repo, &args, &out));
    expect_code(&repo, &["points"], &new_pw, 0, "the new password must open the repository");
    expect_code(&repo, &["points"], &old_pw, 0, "the old password must still open the repository");
    let slots = slot_list(&repo, &new_pw);
    let ids = slot_ids(&slots);
    assert_eq!(ids.len(), 2, "`ebb key list --json` must show 2 slots after key add: {slots:?}");
    let new_id = ids.iter().find(|i| **i != old_id).expect("a new slot id").clone();
    assert_same_objects(&data_before, &without_keys(&snapshot(&repo)), "key add rewrote non-key objects");

    // Remove the old slot: the old password no longer opens the repository.
    expect_code(&repo, &["key", "remove", &old_id], &new_pw, 0, "key remove of the old slot");
    let out = expect_code(&repo, &["points"], &old_pw, 1, "the old password must fail after its slot was removed");
    assert_wrong_password_message(&repo, &["points"], &out);
    expect_code(&repo, &["points"], &new_pw, 0, "the new password must still work after removing the old slot");
    assert_eq!(
        slot_ids(&slot_list(&repo, &new_pw)),
        BTreeSet::from([new_id.clone()]),
        "one slot left after key remove"
    );
    assert_same_objects(&data_before, &without_keys(&snapshot(&repo)), "key remove rewrote non-key objects");

    // Removing the last slot is refused and changes nothing.
    let before = snapshot(&repo);
    let args = ["key", "remove", new_id.as_str()];
    let out = expect_code(&repo, &args, &new_pw, 1, "removing the last key slot must be refused");
    assert!(
        stderr(&out).contains("last"),
        "refusing to remove the last slot must say it is the last one\n{}",
        seen(&repo, &args, &out)
    );
    assert_same_objects(&before, &snapshot(&repo), "refused removal of the last key slot");
    expect_code(&repo, &["points"], &new_pw, 0, "the repository must still open after the refused removal");

    // --new-key-file never overwrites an existing file (it could be world-readable).
    let existing = tmp.path().join("existing.key");
    fs::write(&existing, b"not a key\n").unwrap();
    fs::set_permissions(&existing, fs::Permissions::from_mode(0o644)).unwrap();
    let args = ["key", "add", "--new-key-file", existing.to_str().unwrap()];
    let before = snapshot(&repo);
    let out = expect_code(&repo, &args, &new_pw, 1, "key add --new-key-file onto an existing file must be refused");
    assert_eq!(
        fs::read(&existing).unwrap(),
        b"not a key\n",
        "key add overwrote an existing file\n{}",
        seen(&repo, &args, &out)
    );
    assert_same_objects(&before, &snapshot(&repo), "refused key add --new-key-file onto an existing file");

    // A key-file slot, written 0600 even under umask 000.
    let keyfile = tmp.path().join("repo.key");
    let kf = keyfile.to_str().unwrap();
    let args = ["key", "add", "--new-key-file", kf];
    let mut c = repo.cmd();
    c.env_remove("EBB_KEY_FILE").env_remove("EBB_NEW_PASSWORD").env("EBB_PASSWORD", NEW_PASSWORD).args(args);
    // SAFETY: umask is async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let out = c.output().expect("running ebb key add --new-key-file");
    assert_eq!(out.status.code(), Some(0), "key add --new-key-file (under umask 000)\n{}", seen(&repo, &args, &out));
    let meta = fs::metadata(&keyfile)
        .unwrap_or_else(|e| panic!("key file {kf} not created ({e})\n{}", seen(&repo, &args, &out)));
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        0o600,
        "key file {kf} must be mode 0600\n{}",
        seen(&repo, &args, &out)
    );
    let key_text = fs::read_to_string(&keyfile).unwrap();
    let key_secret = key_text.split_whitespace().max_by_key(|w| w.len()).unwrap_or("").to_string();
    assert!(key_secret.len() >= 16, "key file holds no recognisable secret: {key_text:?}");
    assert!(!text(&out).contains(&key_secret), "key add printed the key file's secret\n{}", seen(&repo, &args, &out));
    let kf_env = [("EBB_PASSWORD", None), ("EBB_PASSWORD_FILE", None)];
    let args = ["--key-file", kf, "verify"];
    expect_code(&repo, &args, &kf_env, 0, "--key-file (no EBB_PASSWORD) must open the repository");
    let slots = slot_list(&repo, &new_pw);
    assert_eq!(slots.len(), 2, "2 slots after adding a key file: {slots:?}");
    let kf_id = slot_ids(&slots).into_iter().find(|i| *i != new_id).unwrap();
    assert_same_objects(
        &data_before,
        &without_keys(&snapshot(&repo)),
        "adding a key-file slot rewrote non-key objects",
    );

    // No secret is stored in the clear.
    for (what, secret) in
        [("new password", NEW_PASSWORD), ("old password", TEST_PASSWORD), ("key file secret", key_secret.as_str())]
    {
        let found = repo.objects_containing(secret.as_bytes());
        assert!(found.is_empty(), "the {what} appears in stored objects {found:?}");
    }

    // A damaged slot: the other slot still opens the repository and verify names the
    // damaged one; unlocking through the damaged slot says it is corrupted.
    let slot_key = format!("keys/{kf_id}");
    let original = repo.read_object(&slot_key);
    repo.write_object(&slot_key, &flip(&original, original.len() / 2));
    let out = expect_code(&repo, &["verify"], &new_pw, 1, &format!("verify with key slot {slot_key} damaged"));
    let all = text(&out);
    assert!(
        all.contains(&slot_key) && all.contains("corrupt"),
        "verify must report {slot_key} as corrupted\n{}",
        seen(&repo, &["verify"], &out)
    );
    let out = expect_code(&repo, &args, &kf_env, 1, &format!("--key-file with its slot {slot_key} damaged"));
    let all = text(&out);
    assert!(
        all.contains(&slot_key) && all.contains("corrupt"),
        "unlocking through a damaged slot must say {slot_key} is corrupted\n{}",
        seen(&repo, &args, &out)
    );
    repo.write_object(&slot_key, &original);
    expect_code(&repo, &args, &kf_env, 0, "--key-file after its slot was put back");
}

#[test]
fn key_slots_file() {
    key_slots(Backend::File)
}
#[test]
fn key_slots_s3() {
    key_slots(Backend::S3)
}
