//! End-to-end tests of a repository's life outside backups: creating it (and an
//! interrupted creation), losing and rebuilding its header, key slots changed
//! concurrently or interrupted, who can read its files, and the passwords it takes.
//! Processes are stopped at exact points with `strace --inject=...:signal=KILL`, a
//! real kill -9 on a chosen system call.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

use common::{pseudo_random_bytes, Backend, TestRepo};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `cmd` under strace, killed (SIGKILL) at a linkat(2): the file store makes each
/// object visible with one (a hard link of the staged file), so this kills the
/// command just as an object would appear. `at` names the link's target; without
/// it, the first link of all.
fn killed_at_link(cmd: Command, at: Option<&Path>) {
    killed_at(cmd, "linkat", at)
}

/// `cmd` under strace, killed (SIGKILL) at its first `syscall` on `at` (any path
/// without it).
fn killed_at(cmd: Command, syscall: &str, at: Option<&Path>) {
    let inject = format!("--inject={syscall}:signal=KILL:when=1");
    let path = at.map(|p| p.to_str().unwrap().to_string());
    let mut options = vec![inject.as_str()];
    if let Some(p) = &path {
        options.extend(["-P", p.as_str()]);
    }
    let out = common::repo::under_strace(&cmd, &options).output().expect("strace runs (scripts/test installs it)");
    assert!(
        !out.status.success(),
        "{:?} was meant to be killed at {syscall} of {at:?}, but it finished: {}",
        cmd.get_args().collect::<Vec<_>>(),
        stderr(&out)
    );
}

fn ebb(repo: &TestRepo, args: &[&str]) -> Command {
    let mut c = repo.cmd();
    c.args(args);
    c
}

/// A backup of one file, restored and compared.
fn backup_and_check(repo: &TestRepo, work: &Path, tag: &str) {
    let src = work.join(format!("src-{tag}"));
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), pseudo_random_bytes(5, 300_000)).unwrap();
    repo.ok(&["backup", "--source", "s", src.to_str().unwrap()]);
    let out = work.join(format!("out-{tag}"));
    repo.ok(&["restore", "--at", "latest", out.to_str().unwrap()]);
    assert_eq!(fs::read(out.join("f")).unwrap(), fs::read(src.join("f")).unwrap());
}

/// Item 6 of issue 15: an init killed between its two writes leaves a repository
/// that the next `ebb init` with the same password finishes. (Init used to write
/// `config` first: killed before its key slot, the repository could never be
/// opened, and `init` said it already existed.)
#[test]
fn an_interrupted_init_is_finished_by_the_next() {
    let work = tempfile::tempdir().unwrap();
    let repo = TestRepo::new(Backend::File);
    killed_at_link(ebb(&repo, &["init"]), Some(&repo.repo_dir().unwrap().join("config")));
    let err = repo.fails(&["points"], 1);
    assert!(err.contains("interrupted") && err.contains("ebb init"), "says what happened and what to do: {err}");
    // Another password does not take it over.
    let other = ebb(&repo, &["init"]).env("EBB_PASSWORD", "another password").output().unwrap();
    assert_eq!(other.status.code(), Some(1), "{}", stderr(&other));
    assert!(stderr(&other).contains("opens none"), "{}", stderr(&other));
    let said = stderr(&ebb(&repo, &["init"]).output().unwrap());
    assert!(said.contains("finished the interrupted creation"), "{said}");
    backup_and_check(&repo, work.path(), "a");
    assert!(repo.fails(&["init"], 1).contains("already exists"));

    // Killed at its first write (the key slot), nothing is left that matters.
    let fresh = TestRepo::new(Backend::File);
    killed_at_link(ebb(&fresh, &["init"]), None);
    fresh.init();
    backup_and_check(&fresh, work.path(), "b");

    // What an earlier ebb left when killed between its writes (a config, no key
    // slot) is started over by `init`.
    let old = TestRepo::new(Backend::File);
    old.init();
    for slot in old.objects().into_iter().filter(|o| o.starts_with("keys/")) {
        old.delete_object(&slot);
    }
    old.init();
    backup_and_check(&old, work.path(), "c");
}

/// Item 5 of issue 15: a repository that lost its `config` is not offered `ebb
/// init` (which would make every point unreadable): the message says what is
/// missing and that data is there, `init` refuses the prefix and changes nothing,
/// and `ebb repair config` brings the repository back.
fn a_lost_config_is_rebuilt_never_initialised_over(backend: Backend) {
    let work = tempfile::tempdir().unwrap();
    let repo = TestRepo::new(backend);
    repo.init();
    backup_and_check(&repo, work.path(), "a");
    repo.delete_object("config");
    let before = repo.objects();

    let err = repo.fails(&["points"], 1);
    assert!(err.contains("no `config`") && err.contains("holds data") && err.contains("ebb repair config"), "{err}");
    assert!(!err.contains("create one with `ebb init`"), "{err}");
    let err = repo.fails(&["init"], 1);
    assert!(err.contains("Do not run `ebb init`"), "{err}");
    assert_eq!(repo.objects(), before, "a refused init changes nothing");

    let err = ebb(&repo, &["repair", "config"]).env("EBB_PASSWORD", "not the password").output().unwrap();
    assert_eq!(err.status.code(), Some(1));
    assert_eq!(repo.objects(), before, "a wrong password rebuilds nothing");
    let said = repo.ok(&["repair", "config"]);
    assert!(said.contains("wrote the config"), "{said}");
    let out = work.path().join("out-again");
    repo.ok(&["restore", "--at", "latest", out.to_str().unwrap()]);
    assert_eq!(fs::read(out.join("f")).unwrap(), fs::read(work.path().join("src-a/f")).unwrap());
    repo.ok(&["verify", "--read-data"]);
}

#[test]
fn a_lost_config_is_rebuilt_never_initialised_over_file() {
    a_lost_config_is_rebuilt_never_initialised_over(Backend::File);
}

#[test]
fn a_lost_config_is_rebuilt_never_initialised_over_s3() {
    a_lost_config_is_rebuilt_never_initialised_over(Backend::S3);
}

/// The id of the key slot that `key` opens.
fn slot_of(repo: &TestRepo, key: &str) -> String {
    let mut c = ebb(repo, &["--key-file", key, "key", "list", "--json"]);
    let out = c.env_remove("EBB_PASSWORD").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    v.iter().find(|s| s["current"] == true).unwrap()["id"].as_str().unwrap().to_string()
}

fn opens_with(repo: &TestRepo, key: &str) -> bool {
    let mut c = ebb(repo, &["--key-file", key, "points"]);
    c.env_remove("EBB_PASSWORD").output().unwrap().status.success()
}

/// Item 2 of issue 15: two `ebb key remove` at once, each of the other's slot, never
/// leave the repository without a slot that opens it (they used to remove both).
#[test]
fn concurrent_key_removals_always_leave_a_working_slot() {
    let work = tempfile::tempdir().unwrap();
    for round in 0..20 {
        // Two key-file slots and nothing else: each removal unlocks with one and
        // removes the other, both as fast.
        let repo = TestRepo::new(Backend::File);
        repo.init();
        let keys: Vec<String> = (0..2)
            .map(|i| {
                let k = work.path().join(format!("k{round}-{i}"));
                repo.ok(&["key", "add", "--new-key-file", k.to_str().unwrap()]);
                k.to_str().unwrap().to_string()
            })
            .collect();
        let slots: Vec<String> = keys.iter().map(|k| slot_of(&repo, k)).collect();
        let password_slot = ebb(&repo, &["key", "list", "--json"]).output().unwrap();
        let v: Vec<serde_json::Value> = serde_json::from_slice(&password_slot.stdout).unwrap();
        let password_slot = v.iter().find(|s| s["current"] == true).unwrap()["id"].as_str().unwrap().to_string();
        repo.ok(&["key", "remove", &password_slot]);

        let removal = |key: &str, slot: &str| {
            let mut c = ebb(&repo, &["--key-file", key, "key", "remove", slot]);
            c.env_remove("EBB_PASSWORD").stderr(std::process::Stdio::piped());
            c.spawn().unwrap()
        };
        let a = removal(&keys[0], &slots[1]);
        let b = removal(&keys[1], &slots[0]);
        let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
        let (opens_0, opens_1) = (opens_with(&repo, &keys[0]), opens_with(&repo, &keys[1]));
        assert!(
            opens_0 || opens_1,
            "round {round}: no slot opens the repository any more (removals: {:?} {}, {:?} {})",
            a.status,
            stderr(&a),
            b.status,
            stderr(&b)
        );
        // `a` removed the slot of key 1, `b` that of key 0: each says whether it did.
        assert_eq!(a.status.success(), !opens_1, "round {round}: {}", stderr(&a));
        assert_eq!(b.status.success(), !opens_0, "round {round}: {}", stderr(&b));
    }
}

/// Item 7 of issue 15: `key add --new-key-file` killed at any of its writes never
/// leaves a key file that opens nothing (it used to write the file first).
#[test]
fn a_key_file_exists_only_once_its_slot_does() {
    let work = tempfile::tempdir().unwrap();
    let repo = TestRepo::new(Backend::File);
    repo.init();
    // The first link makes the slot visible; the key file's own gives it its name.
    for nth in [1, 2] {
        let key = work.path().join(format!("k{nth}"));
        let at = (nth == 2).then_some(key.as_path());
        killed_at_link(ebb(&repo, &["key", "add", "--new-key-file", key.to_str().unwrap()]), at);
        if key.exists() {
            let mut c = ebb(&repo, &["--key-file", key.to_str().unwrap(), "points"]);
            let out = c.env_remove("EBB_PASSWORD").output().unwrap();
            assert!(out.status.success(), "killed at link {nth}: the key file opens nothing: {}", stderr(&out));
        }
        let stray: Vec<_> = fs::read_dir(work.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "k1" && n != "k2")
            .collect();
        assert!(stray.is_empty(), "killed at link {nth}: nothing else is left beside it: {stray:?}");
    }
    let key = work.path().join("k3");
    repo.ok(&["key", "add", "--new-key-file", key.to_str().unwrap()]);
    let mut c = ebb(&repo, &["--key-file", key.to_str().unwrap(), "points"]);
    assert!(c.env_remove("EBB_PASSWORD").output().unwrap().status.success());
}

/// Item 10 of issue 15: on file://, what ebb writes (key slots, every object, stream
/// state) is the user's alone: files 0600, directories 0700, whatever the umask.
#[test]
fn repository_and_state_files_are_private() {
    let work = tempfile::tempdir().unwrap();
    let repo = TestRepo::new(Backend::File);
    let permissive = |mut c: Command| {
        use std::os::unix::process::CommandExt;
        // SAFETY: umask is async-signal-safe.
        unsafe {
            c.pre_exec(|| {
                libc::umask(0o022);
                Ok(())
            });
        }
        c
    };
    let run = |args: &[&str]| {
        let out = permissive(ebb(&repo, args)).env("EBB_STATE_DIR", work.path().join("state")).output().unwrap();
        assert!(out.status.success(), "ebb {args:?}: {}", stderr(&out));
    };
    run(&["init"]);
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"secret content").unwrap();
    run(&["backup", "--source", "s", src.to_str().unwrap()]);
    // A stream leaves its state file.
    let mut stream = permissive(ebb(&repo, &["stream", "dir", "--source", "t", src.to_str().unwrap()]))
        .env("EBB_STATE_DIR", work.path().join("state"))
        .spawn()
        .unwrap();
    let state = work.path().join("state");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while fs::read_dir(&state).map_or(0, |d| d.count()) == 0 {
        assert!(std::time::Instant::now() < deadline, "the stream wrote no state");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // SAFETY: a plain signal to our own child.
    unsafe { libc::kill(stream.id() as i32, libc::SIGTERM) };
    stream.wait().unwrap();

    let mut checked = 0;
    for root in [repo.repo_dir().unwrap().to_path_buf(), state] {
        let mut stack = vec![root];
        while let Some(p) = stack.pop() {
            let m = fs::symlink_metadata(&p).unwrap();
            let mode = m.permissions().mode() & 0o777;
            let want = if m.is_dir() { 0o700 } else { 0o600 };
            assert_eq!(mode, want, "{} is mode {mode:o}", p.display());
            assert_eq!(m.uid(), unsafe { libc::geteuid() });
            checked += 1;
            if m.is_dir() {
                stack.extend(fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            }
        }
    }
    assert!(checked > 10, "the repository and state were looked at ({checked} entries)");
}

/// Item 11 of issue 15: an empty or blank new password is refused (init, key add),
/// and a password or key file others can read gets a warning.
#[test]
fn blank_passwords_are_refused_and_shared_secret_files_warned_of() {
    let work = tempfile::tempdir().unwrap();
    let repo = TestRepo::new(Backend::File);
    for blank in ["", "   "] {
        let out = ebb(&repo, &["init"]).env("EBB_PASSWORD", blank).output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr(&out).contains("empty or only whitespace"), "{}", stderr(&out));
        assert!(repo.objects().is_empty(), "a refused init writes nothing");
    }
    repo.init();
    let before = repo.objects();
    let out = ebb(&repo, &["key", "add"]).env("EBB_NEW_PASSWORD", "").output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let blank_file = work.path().join("blank");
    fs::write(&blank_file, " \t \n").unwrap();
    fs::set_permissions(&blank_file, fs::Permissions::from_mode(0o600)).unwrap();
    let out = ebb(&repo, &["key", "add", "--new-password-file", blank_file.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("empty or only whitespace"), "{}", stderr(&out));
    assert_eq!(repo.objects(), before, "refused key adds write nothing");

    let shared = work.path().join("pw");
    fs::write(&shared, format!("{}\n", common::TEST_PASSWORD)).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o644)).unwrap();
    let mut c = ebb(&repo, &["--password-file", shared.to_str().unwrap(), "points"]);
    let out = c.env_remove("EBB_PASSWORD").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("can be read by other users"), "{}", stderr(&out));
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o600)).unwrap();
    let mut c = ebb(&repo, &["--password-file", shared.to_str().unwrap(), "points"]);
    let out = c.env_remove("EBB_PASSWORD").output().unwrap();
    assert!(!stderr(&out).contains("other users"), "{}", stderr(&out));
}

/// Item 20 of issue 15: `--repo memory://` does not claim to have made a repository
/// (it would vanish as ebb exits).
#[test]
fn a_memory_repository_is_refused() {
    let out = Command::new(common::repo::ebb_exe())
        .args(["--repo", "memory://", "init"])
        .env("EBB_PASSWORD", "x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(!stderr(&out).contains("created"), "{}", stderr(&out));
}

/// Item 20 of issue 15: `ebb verify` reports a point whose manifest was deleted (its
/// index file names it), and does not call that point's packs harmless leftovers.
#[test]
fn verify_reports_a_deleted_manifest() {
    let work = tempfile::tempdir().unwrap();
    let repo = TestRepo::new(Backend::File);
    repo.init();
    backup_and_check(&repo, work.path(), "a");
    let src = work.path().join("src-b");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("other"), pseudo_random_bytes(9, 200_000)).unwrap();
    repo.ok(&["backup", "--source", "s", src.to_str().unwrap()]);
    let v: Vec<serde_json::Value> = serde_json::from_str(&repo.ok(&["points", "--json"])).unwrap();
    let deleted = v[1]["name"].as_str().unwrap().to_string();
    repo.delete_object(&deleted);
    let out = ebb(&repo, &["verify"]).output().unwrap();
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(all.contains(&deleted) && all.contains("manifest was deleted"), "{all}");
    assert!(!all.contains("harmless"), "{all}");
}

/// Item 24 of issue 15: a backup killed as its pack appears leaves a half-written
/// upload; the next backup removes it (once it is old enough that no live writer
/// can own it) and adopts what was durable, storing nothing twice.
#[test]
fn what_a_killed_backup_left_is_cleaned_and_adopted() {
    let work = tempfile::tempdir().unwrap();
    let repo = TestRepo::new(Backend::File);
    repo.init();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    for i in 0..4u64 {
        fs::write(src.join(format!("f{i}")), pseudo_random_bytes(i, 3 << 20)).unwrap();
    }
    let dir = repo.repo_dir().unwrap().to_path_buf();
    killed_at_link(ebb(&repo, &["backup", "--source", "s", src.to_str().unwrap()]), None);
    let staged = |dir: &Path| -> Vec<std::path::PathBuf> {
        let mut found = Vec::new();
        let mut stack = vec![dir.join("packs")];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                } else if e.file_name().to_string_lossy().contains('#') {
                    found.push(e.path());
                }
            }
        }
        found
    };
    let left = staged(&dir);
    assert!(!left.is_empty(), "the kill left a half-written pack");
    // Old enough that no running writer can still own it.
    for f in &left {
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        fs::File::options().write(true).open(f).unwrap().set_modified(hour_ago).unwrap();
    }
    // A second backup killed once its packs are durable, as its point is about to
    // be written (the first point of the source makes its directory).
    let points_dir = dir.join("points/s");
    killed_at(ebb(&repo, &["backup", "--source", "s", src.to_str().unwrap()]), "mkdir", Some(&points_dir));
    let durable = repo.objects().into_iter().filter(|o| o.starts_with("packs/")).count();
    assert!(durable >= 2, "the killed backup's packs are durable: {durable}");
    assert!(!repo.objects().iter().any(|o| o.starts_with("points/") || o.starts_with("index/")));

    let out = ebb(&repo, &["backup", "--source", "s", "--json", src.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    for f in &left {
        assert!(!f.exists(), "{} is still there", f.display());
    }
    let point: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let added = point["stats"]["new_bytes"].as_u64().unwrap();
    assert!(added < 1 << 20, "what the killed backup made durable is adopted, not stored again: {added} bytes");
    assert_eq!(repo.objects().into_iter().filter(|o| o.starts_with("packs/")).count(), durable);
    repo.ok(&["verify", "--read-data"]);
    let out = work.path().join("out");
    repo.ok(&["restore", "--at", "latest", out.to_str().unwrap()]);
    for i in 0..4 {
        assert!(fs::read(out.join(format!("f{i}"))).unwrap() == fs::read(src.join(format!("f{i}"))).unwrap());
    }
}
