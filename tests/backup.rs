//! End-to-end tests of `ebb backup`, `restore`, `points` and time resolution, on the
//! `file://` store and on the S3-compatible server that `scripts/test` starts.

mod common;

use std::fs;
use std::path::Path;

use common::{assert_trees_equal, build_fidelity_tree, pseudo_random_bytes, Backend, SmallFs, TestRepo};
use jiff::{SignedDuration, Timestamp};
use serde_json::Value;

fn points(repo: &TestRepo, source: &str) -> Vec<Value> {
    let out = repo.ok(&["points", "--source", source, "--json"]);
    serde_json::from_str::<Value>(&out).expect("points --json prints JSON").as_array().expect("an array").clone()
}

fn time_of(point: &Value) -> Timestamp {
    point["time"].as_str().expect("time is a string").parse().expect("time is RFC 3339")
}

fn backup(repo: &TestRepo, source: &str, path: &Path) -> Value {
    let out = repo.ok(&["backup", "--source", source, "--json", path.to_str().unwrap()]);
    serde_json::from_str(&out).expect("backup --json prints JSON")
}

// ---------------------------------------------------------------- round trip

fn round_trip(backend: Backend) {
    let repo = TestRepo::new(backend);
    repo.init();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let info = build_fidelity_tree(&src);
    let point = backup(&repo, "fidelity", &src);
    assert_eq!(point["skipped"].as_array().map(Vec::len), Some(0), "nothing is skipped as root: {point}");

    let out = work.path().join("restored");
    repo.ok(&["restore", "--at", "latest", out.to_str().unwrap()]);
    assert_trees_equal(&src, &out);

    // One file, and one directory, restored on their own land as TARGET/<name>.
    let one = work.path().join("one");
    let rel = info.exact_mtime_file.strip_prefix(&src).unwrap_or(&info.exact_mtime_file).to_path_buf();
    repo.ok(&["restore", "--at", "latest", "--path", rel.to_str().unwrap(), one.to_str().unwrap()]);
    let name = rel.file_name().unwrap();
    assert_eq!(fs::read(one.join(name)).unwrap(), fs::read(src.join(&rel)).unwrap());

    let sub = work.path().join("sub");
    let rel_dir = info.wide_dir.strip_prefix(&src).unwrap_or(&info.wide_dir).to_path_buf();
    repo.ok(&["restore", "--at", "latest", "--path", rel_dir.to_str().unwrap(), sub.to_str().unwrap()]);
    assert_trees_equal(&src.join(&rel_dir), &sub.join(rel_dir.file_name().unwrap()));

    // A path that is not in the point is an error that changes nothing.
    let none = work.path().join("none");
    let err = repo.fails(&["restore", "--at", "latest", "--path", "no/such/file", none.to_str().unwrap()], 1);
    assert!(err.contains("does not exist in this point"), "{err}");
    // Restoring over existing files is refused.
    let err = repo.fails(&["restore", "--at", "latest", out.to_str().unwrap()], 1);
    assert!(err.contains("not an empty directory"), "{err}");
}

#[test]
fn round_trip_file() {
    round_trip(Backend::File);
}

#[test]
fn round_trip_s3() {
    round_trip(Backend::S3);
}

// ---------------------------------------------------------------- time

/// The tree as it was at each of three points; `--at` any time between two points
/// gives the earlier one, in every accepted form of a time.
fn time_travel(backend: Backend) {
    let repo = TestRepo::new(backend);
    repo.init();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("data");
    fs::create_dir(&src).unwrap();
    let mut times = Vec::new();
    for version in 1..=3 {
        fs::write(src.join("version.txt"), format!("version {version}\n")).unwrap();
        fs::write(src.join(format!("only-in-{version}")), b"x").unwrap();
        if version > 1 {
            fs::remove_file(src.join(format!("only-in-{}", version - 1))).unwrap();
        }
        let p = backup(&repo, "timeline", &src);
        times.push(time_of(&p));
        // Points at least a second apart, so whole-second forms fall between them.
        std::thread::sleep(std::time::Duration::from_millis(1200));
    }
    assert_eq!(points(&repo, "timeline").len(), 3);

    // A local time zone that is not UTC, so "local" is really tested.
    let tz = "XST-05:30";
    let offset = SignedDuration::from_mins(330);
    let check = |at: &str, version: usize| {
        let out = work.path().join(format!("at-{}", at.replace([' ', ':', '@', '.', '+'], "_")));
        let mut cmd = repo.cmd();
        cmd.env("TZ", tz).args(["restore", "--at", at, out.to_str().unwrap()]);
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "restore --at {at:?}: {}", String::from_utf8_lossy(&o.stderr));
        let got = fs::read_to_string(out.join("version.txt")).unwrap();
        assert_eq!(got, format!("version {version}\n"), "restore --at {at:?}");
        assert!(
            out.join(format!("only-in-{version}")).exists(),
            "restore --at {at:?} has the files of version {version}"
        );
        assert_eq!(fs::read_dir(&out).unwrap().count(), 2, "restore --at {at:?} has exactly that version's files");
    };
    for (i, &t) in times.iter().enumerate() {
        // Exactly at the point, and just after it.
        check(&t.to_string(), i + 1);
        let mid = t + SignedDuration::from_millis(500);
        check(&mid.to_string(), i + 1);
        check(&format!("{}", mid.strftime("%Y-%m-%dT%H:%M:%S%.3f+00:00")), i + 1);
        check(&format!("@{}.{:09}", mid.as_second(), mid.subsec_nanosecond()), i + 1);
        // Local time with whole seconds: the second after the point is still before the next.
        let next_second = Timestamp::from_second(t.as_second() + 1).unwrap();
        let local = (next_second + offset).strftime("%Y-%m-%d %H:%M:%S").to_string();
        check(&local, i + 1);
    }
    check("latest", 3);

    // Before the first point: an error naming the earliest point.
    let err = repo.fails(&["restore", "--at", "15m ago", work.path().join("early").to_str().unwrap()], 1);
    assert!(err.contains("before the first point"), "{err}");
    assert!(err.contains(&times[0].to_string()), "the message names the earliest point {}: {err}", times[0]);
    assert!(!work.path().join("early").exists(), "a failed restore creates nothing");
    let before = (times[0] - SignedDuration::from_millis(1)).to_string();
    let err = repo.fails(&["restore", "--at", &before, work.path().join("early").to_str().unwrap()], 1);
    assert!(err.contains(&times[0].to_string()), "{err}");

    // Malformed times are usage errors that list the accepted forms.
    for bad in ["yesterday", "2026-11-21", "10:15", "@12abc", "soon ago"] {
        let err = repo.fails(&["restore", "--at", bad, work.path().join("bad").to_str().unwrap()], 2);
        assert!(err.contains("RFC 3339") && err.contains("@1763720100") && err.contains("15m ago"), "{err}");
    }
    // The future is an error.
    let err = repo.fails(&["restore", "--at", "2999-01-01T00:00:00Z", work.path().join("future").to_str().unwrap()], 1);
    assert!(err.contains("in the future"), "{err}");

    // points --since/--until select by time.
    let mid1 = (times[0] + SignedDuration::from_millis(500)).to_string();
    let mid2 = (times[1] + SignedDuration::from_millis(500)).to_string();
    let out = repo.ok(&["points", "--since", &mid1, "--until", &mid2, "--json"]);
    let sel: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(sel.len(), 1, "{out}");
    assert_eq!(time_of(&sel[0]), times[1]);
}

#[test]
fn time_travel_file() {
    time_travel(Backend::File);
}

#[test]
fn time_travel_s3() {
    time_travel(Backend::S3);
}

// ---------------------------------------------------------------- dedup

fn store_size(repo: &TestRepo) -> u64 {
    match repo.repo_dir() {
        Some(dir) => {
            repo.objects().iter().map(|k| fs::metadata(dir.join(catalog::local_path(k).as_ref())).unwrap().len()).sum()
        }
        None => repo.objects().iter().map(|k| repo.read_object(k).len() as u64).sum(),
    }
}

/// An unchanged tree of over 1 GiB costs less than 1 % on the second backup, and
/// one changed byte in a 100 MiB file costs about one chunk.
fn dedup(backend: Backend) {
    let repo = TestRepo::new(backend);
    repo.init();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("big");
    fs::create_dir_all(src.join("small")).unwrap();
    let mut total = 0u64;
    for i in 0..10u64 {
        let data = pseudo_random_bytes(1000 + i, 110 << 20);
        total += data.len() as u64;
        fs::write(src.join(format!("blob-{i}.bin")), data).unwrap();
    }
    for i in 0..2000u64 {
        let data = pseudo_random_bytes(i, 4096 + (i as usize % 7) * 1000);
        total += data.len() as u64;
        fs::write(src.join("small").join(format!("f{i:04}")), data).unwrap();
    }
    assert!(total >= 1 << 30, "the tree holds at least 1 GiB ({total} bytes)");

    let first = backup(&repo, "big", &src);
    let after_first = store_size(&repo);
    assert!(after_first >= total * 95 / 100, "incompressible data is stored whole: {after_first} of {total}");

    let second = backup(&repo, "big", &src);
    let after_second = store_size(&repo);
    let added = after_second - after_first;
    assert!(added * 100 < total, "an unchanged re-backup added {added} bytes to a {total}-byte tree");
    assert_eq!(second["stats"]["new_data_blobs"], 0, "{second}");
    assert_eq!(second["stats"]["bytes_read"], 0, "unchanged files are not read again: {second}");
    assert_eq!(first["stats"]["files"], second["stats"]["files"]);

    // One byte in the middle of a 100+ MiB file.
    let target = src.join("blob-4.bin");
    let mut data = fs::read(&target).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    fs::write(&target, &data).unwrap();
    let third = backup(&repo, "big", &src);
    let added = store_size(&repo) - after_second;
    let new_data = third["stats"]["new_data_blobs"].as_u64().unwrap();
    assert!((1..=2).contains(&new_data), "one changed byte stored {new_data} new chunks: {third}");
    // A chunk is at most 4 MiB (about 1 MiB on average), plus trees, index and manifest.
    assert!(added < 2 * (4 << 20) + (256 << 10), "one changed byte added {added} bytes");

    // And the changed file reads back exactly.
    let out = work.path().join("out");
    repo.ok(&["restore", "--at", "latest", "--path", "blob-4.bin", out.to_str().unwrap()]);
    assert!(fs::read(out.join("blob-4.bin")).unwrap() == data, "restored bytes differ");
}

#[test]
fn dedup_file() {
    dedup(Backend::File);
}

#[test]
fn dedup_s3() {
    dedup(Backend::S3);
}

// ---------------------------------------------------------------- errors and edges

#[test]
fn unreadable_files_are_skipped_and_reported() {
    // Runs ebb as an unprivileged user who cannot read one file of the tree.
    let repo_dir = tempfile::tempdir().unwrap();
    let repo_url = format!("file://{}/repo", repo_dir.path().display());
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("readable"), b"hello").unwrap();
    fs::write(src.join("secret"), b"no").unwrap();
    fs::create_dir(src.join("closed")).unwrap();
    fs::write(src.join("closed/inside"), b"no").unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(src.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(src.join("closed"), fs::Permissions::from_mode(0o700)).unwrap();
    for d in [repo_dir.path(), work.path()] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o777)).unwrap();
    }
    let as_nobody = |args: &[&str]| {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", common::repo::ebb_exe().to_str().unwrap()])
            .args(args)
            .env("EBB_REPOSITORY", &repo_url)
            .env("EBB_PASSWORD", "pw")
            .env("HOME", work.path());
        c.output().expect("setpriv runs")
    };
    let o = as_nobody(&["init"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A backup with unreadable files still makes a point, and exits 3 (item 20 of
    // issue 15): a script sees the point is incomplete.
    let o = as_nobody(&["backup", "--source", "s", src.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "a backup that skipped entries says so in its exit status: {stderr}");
    assert!(stderr.contains("could not be read") && stderr.contains("secret") && stderr.contains("closed"), "{stderr}");
    let o = as_nobody(&["points", "--json"]);
    let pts: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    let skipped = pts[0]["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 2, "the point says what it lacks: {}", pts[0]);
    let o = as_nobody(&["backup", "--allow-skipped", "--source", "s", src.to_str().unwrap()]);
    assert!(o.status.success(), "told that skipped entries are fine: {}", String::from_utf8_lossy(&o.stderr));
    let out = work.path().join("out");
    let o = as_nobody(&["restore", "--at", "latest", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(fs::read(out.join("readable")).unwrap(), b"hello");
    assert!(!out.join("secret").exists());
}

#[test]
fn bad_input_changes_nothing() {
    let repo = TestRepo::new(Backend::File);
    // No repository yet.
    let err = repo.fails(&["points"], 1);
    assert!(err.contains("ebb init"), "{err}");
    repo.init();
    let err = repo.fails(&["init"], 1);
    assert!(err.contains("already exists"), "{err}");
    let before = repo.objects();
    // A path that does not exist, a bad source name, a bad flag.
    repo.fails(&["backup", "/no/such/path"], 2);
    repo.fails(&["backup", "--source", "a/b", "/tmp"], 2);
    repo.fails(&["restore", "/tmp/x"], 2);
    repo.fails(&["points", "--since", "whenever"], 2);
    let err = repo.fails(&["restore", "--at", "latest", "/tmp/never-made"], 1);
    assert!(err.contains("no points"), "{err}");
    assert_eq!(repo.objects(), before, "bad input changed the store");

    // Several sources: reading commands ask which.
    let work = tempfile::tempdir().unwrap();
    fs::write(work.path().join("f"), b"1").unwrap();
    backup(&repo, "one", work.path());
    backup(&repo, "two", work.path());
    let err = repo.fails(&["restore", "--at", "latest", work.path().join("o").to_str().unwrap()], 2);
    assert!(err.contains("--source") && err.contains("one") && err.contains("two"), "{err}");
    let sources: Vec<Value> = serde_json::from_str(&repo.ok(&["sources", "--json"])).unwrap();
    assert_eq!(sources.len(), 2);
    assert_eq!(sources[0]["points"], 1);
}

// ---------------------------------------------------------------- a full disk

/// Runs `ebb ARGS` and kills it if it has not ended within `limit`.
fn run_within(repo: &TestRepo, args: &[&str], limit: std::time::Duration) -> std::process::Output {
    let mut child = repo
        .cmd()
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!("`ebb {}` still ran after {limit:?}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// Item 13 of issue 15: a backup onto a full filesystem fails at once with the
/// store's error, naming ENOSPC (it used to hang for ever, waiting for files queued
/// for workers that had stopped). Once there is room, the next backup succeeds and
/// does not store again what the failed one already made durable.
#[test]
fn a_backup_onto_a_full_filesystem_fails_promptly_and_says_why() {
    // At most 4 packs of at most 12 MiB (8 MiB and one chunk) are being written at
    // once: when 64 MiB are full, at least 16 MiB are in packs that were made durable,
    // however the uploads overlapped. 90 MiB of distinct content never fit.
    let small = SmallFs::mount("64m");
    let repo = TestRepo::at_dir(&small.path().join("repo"));
    repo.init();
    // Two levels of directories, and files read in parallel: the walk has files
    // queued for the workers when the store fills up.
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(src.join("a/b")).unwrap();
    let distinct = 30u64 * (3 << 20);
    for i in 0..30u64 {
        let data = pseudo_random_bytes(i, 3 << 20);
        fs::write(src.join(format!("a/b/f{i}")), &data).unwrap();
        fs::write(src.join(format!("a/g{i}")), &data).unwrap();
    }
    let limit = std::time::Duration::from_secs(120);
    let out = run_within(&repo, &["backup", "--source", "full", src.to_str().unwrap()], limit);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("No space left on device"), "the store's error is named: {err}");
    assert!(err.contains("is full"), "the user is told the repository's filesystem is full: {err}");
    assert_eq!(points(&repo, "full").len(), 0, "no point was committed");
    // Complete packs (an interrupted upload is a staged `<name>#<n>` file).
    let durable: u64 = repo
        .objects()
        .iter()
        .filter(|k| k.starts_with("packs/") && !k.contains('#'))
        .map(|k| repo.read_object(k).len() as u64)
        .sum();
    assert!(durable >= 16 << 20, "only {durable} bytes of packs are durable");

    small.resize("512m");
    let first = backup(&repo, "full", &src);
    let added = first["stats"]["new_bytes"].as_u64().unwrap();
    assert!(
        added + durable <= distinct + (1 << 20),
        "what the failed run stored ({durable} bytes) is not stored again ({added} bytes added)"
    );
    repo.ok(&["verify"]);
    let restored = work.path().join("restored");
    repo.ok(&["restore", "--at", "latest", restored.to_str().unwrap()]);
    assert_trees_equal(&src, &restored);
}

// ---------------------------------------------------------------- a lost pack

/// Item 3 of issue 15: after a pack is lost, a backup does not reference what it
/// held (it used to deduplicate against the index, report success and be
/// unrestorable): it stores that content again. `ebb verify` names the damaged
/// point and `ebb repair index`, which drops the lost pack from the index.
fn a_lost_pack_is_stored_again(backend: Backend) {
    let repo = TestRepo::new(backend);
    repo.init();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    for i in 0..4u64 {
        fs::write(src.join(format!("f{i}")), pseudo_random_bytes(i, 3 << 20)).unwrap();
    }
    backup(&repo, "lost", &src);
    let packs: Vec<String> = repo.objects().into_iter().filter(|o| o.starts_with("packs/")).collect();
    assert!(packs.len() >= 2, "{packs:?}");
    repo.delete_object(&packs[0]);

    // The same tree again: nothing changed on disk, but the lost chunks are read again.
    let out = repo.cmd().args(["backup", "--source", "lost", "--json", src.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ebb repair index"), "the user hears of the lost pack and what to do: {stderr}");
    let restored = work.path().join("restored");
    repo.ok(&["restore", "--at", "latest", restored.to_str().unwrap()]);
    assert_trees_equal(&src, &restored);

    let err = repo.fails(&["verify"], 1);
    assert!(err.contains(&packs[0]) && err.contains("ebb repair index"), "{err}");
    let said = repo.ok(&["repair", "index"]);
    assert!(said.contains("entries of missing packs dropped"), "{said}");
    // Nothing of the lost pack is left in the index: no warning on the next backup.
    let out = repo.cmd().args(["backup", "--source", "lost", src.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("missing"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_lost_pack_is_stored_again_file() {
    a_lost_pack_is_stored_again(Backend::File);
}

#[test]
fn a_lost_pack_is_stored_again_s3() {
    a_lost_pack_is_stored_again(Backend::S3);
}

// ---------------------------------------------------------------- mistakes and special files

/// Items 14, 20 and 23 of issue 15: patterns that can never match and --since
/// after --until are usage errors that change nothing; a tree that holds its own
/// repository leaves it out, with a warning; a FIFO given as PATH is stored as a
/// FIFO, never opened (which blocked for ever); identical files read in parallel
/// are stored once.
#[test]
fn mistakes_are_refused_and_special_cases_handled() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    fs::create_dir_all(&tree).unwrap();
    // The repository lives inside the tree that is backed up.
    let repo = TestRepo::at_dir(&tree.join("repo"));
    repo.init();
    let before = repo.objects();
    let t = tree.to_str().unwrap();
    for bad in ["../outside", "a/../b", "/etc/passwd"] {
        let err = repo.fails(&["backup", "--source", "m", "--exclude", bad, t], 2);
        assert!(err.contains("never match"), "{bad}: {err}");
    }
    let err = repo.fails(&["points", "--since", "@2000000000", "--until", "@1000000000"], 2);
    assert!(err.contains("--since") && err.contains("--until"), "{err}");
    assert_eq!(repo.objects(), before, "refused commands change nothing");

    // Three identical files of 4 MiB, and the repository inside the tree.
    let same = pseudo_random_bytes(23, 4 << 20);
    for i in 0..3 {
        fs::write(tree.join(format!("copy{i}")), &same).unwrap();
    }
    let out = repo.cmd().args(["backup", "--source", "m", "--json", t]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("lies inside") && err.contains("left out"), "the user is told: {err}");
    let point: Value = serde_json::from_slice(&out.stdout).unwrap();
    let added = point["stats"]["new_bytes"].as_u64().unwrap();
    assert!(added < 5 << 20, "4 MiB stored once, not three times: {added} bytes added");
    let restored = work.path().join("restored");
    repo.ok(&["restore", "--at", "latest", restored.to_str().unwrap()]);
    assert!(!restored.join("repo").exists(), "the repository was not backed up into itself");
    assert!(fs::read(restored.join("copy2")).unwrap() == same);

    // A FIFO as PATH: stored as what it is, without waiting for a writer.
    let fifo = work.path().join("fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let out =
        run_within(&repo, &["backup", "--source", "f", fifo.to_str().unwrap()], std::time::Duration::from_secs(60));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let back = work.path().join("fifo-back");
    repo.ok(&["restore", "--source", "f", "--at", "latest", back.to_str().unwrap()]);
    use std::os::unix::fs::FileTypeExt;
    assert!(fs::symlink_metadata(back.join("fifo")).unwrap().file_type().is_fifo());
}

/// Item 20 of issue 15: a restore that runs out of space says the target is full,
/// and stops (it used to go on, and send the user to `ebb verify`).
#[test]
fn a_restore_onto_a_full_filesystem_says_so() {
    let repo = TestRepo::new(Backend::File);
    repo.init();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    for i in 0..8u64 {
        fs::write(src.join(format!("f{i}")), pseudo_random_bytes(i, 3 << 20)).unwrap();
    }
    backup(&repo, "s", &src);
    let small = SmallFs::mount("8m");
    let out = run_within(
        &repo,
        &["restore", "--at", "latest", small.path().join("r").to_str().unwrap()],
        std::time::Duration::from_secs(120),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("filesystem is full"), "{err}");
    assert!(!err.contains("ebb verify"), "nothing is wrong with the repository: {err}");
}

/// Item 20 of issue 15: an S3 repository without credentials says so, and which
/// variables to set, instead of showing the instance metadata service's answer.
#[test]
fn s3_without_credentials_says_what_to_set() {
    let repo = TestRepo::new(Backend::S3);
    let mut c = repo.cmd();
    for v in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"] {
        c.env_remove(v);
    }
    let out = c.args(["points"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no AWS credentials") && err.contains("AWS_ACCESS_KEY_ID"), "{err}");
}
