//! End-to-end tests of the restore engine: restoring over an existing tree
//! (`--overwrite`), a restore killed partway and run again, and the memory a
//! restore of a million files takes.

mod common;

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;

use common::repo::under_strace;
use common::{assert_trees_equal, build_fidelity_tree, pseudo_random_bytes, Backend, SmallFs, TestRepo};
use serde_json::Value;

fn restore_json(repo: &TestRepo, args: &[&str]) -> Value {
    let out = repo.ok(&[&["restore", "--at", "latest", "--json"], args].concat());
    serde_json::from_str(&out).expect("restore --json prints JSON")
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

/// Every regular file under `dir` with a name of the point has the source's bytes
/// (temporary files of the restore left aside).
fn no_wrong_bytes(src: &Path, dir: &Path) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for item in fs::read_dir(&d).unwrap() {
            let item = item.unwrap();
            let t = item.file_type().unwrap();
            if t.is_dir() {
                stack.push(item.path());
            } else if t.is_file() && !item.file_name().as_bytes().starts_with(b".ebb-restore-") {
                let rel = item.path().strip_prefix(dir).unwrap().to_path_buf();
                let (got, want) = (fs::read(item.path()).unwrap(), fs::read(src.join(&rel)).unwrap());
                assert!(got == want, "{} has wrong bytes after the kill", rel.display());
            }
        }
    }
}

/// A restore with `--overwrite` killed with SIGKILL partway (once 300 of the 400
/// data files have their names) leaves no file with wrong bytes; run again, it
/// finishes the tree exactly, keeping what the first run completed, so it fetches
/// less than a whole restore; a third run fetches nothing.
#[test]
fn an_interrupted_restore_run_again_finishes_and_fetches_less() {
    let repo = TestRepo::new(Backend::File);
    repo.init();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    build_fidelity_tree(&src);
    // Many files of data of their own, so that what the first run completed counts.
    fs::create_dir(src.join("data")).unwrap();
    for i in 0..400u64 {
        fs::write(src.join(format!("data/f{i:03}")), pseudo_random_bytes(i, 20_000 + (i as usize % 7) * 30_000))
            .unwrap();
    }
    repo.ok(&["backup", "--source", "s", src.to_str().unwrap()]);

    let whole = work.path().join("whole");
    let first = restore_json(&repo, &[whole.to_str().unwrap()]);
    assert_trees_equal(&src, &whole);
    let fetched_whole = n(&first, "fetched_bytes");

    // Each rename slowed down (5 ms), so that the kill lands partway.
    let target = work.path().join("target");
    let mut cmd = repo.cmd();
    cmd.args(["restore", "--at", "latest", "--overwrite", "--memory", "16MiB", target.to_str().unwrap()]);
    let mut cmd = under_strace(&cmd, &["--inject=rename:delay_exit=5000"]);
    cmd.process_group(0).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().expect("strace runs");
    let named = |dir: &Path| {
        fs::read_dir(dir)
            .map_or(0, |d| d.filter(|e| !e.as_ref().unwrap().file_name().as_bytes().starts_with(b".ebb-")).count())
    };
    while named(&target.join("data")) < 300 {
        assert!(child.try_wait().unwrap().is_none(), "the restore finished before it could be killed");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    // The restore and strace together: killed alone, strace would let it run on.
    // SAFETY: killpg only sends a signal, to the group the child leads.
    assert_eq!(unsafe { libc::killpg(child.id() as libc::pid_t, libc::SIGKILL) }, 0);
    child.wait().unwrap();
    no_wrong_bytes(&src, &target);
    let complete = named(&target.join("data"));
    assert!((300..400).contains(&complete), "killed partway, the data files named before it are there: {complete}");

    let second = restore_json(&repo, &["--overwrite", target.to_str().unwrap()]);
    assert_trees_equal(&src, &target);
    // Data files have one name each: every one complete before the kill is kept.
    assert!(n(&second, "unchanged_files") >= complete as u64, "what the first run completed is kept: {second}");
    let fetched_again = n(&second, "fetched_bytes");
    assert!(
        fetched_again < fetched_whole * 3 / 4,
        "run again, the restore fetches only what is missing: {fetched_again} of {fetched_whole} bytes"
    );

    let third = restore_json(&repo, &["--overwrite", target.to_str().unwrap()]);
    assert_trees_equal(&src, &target);
    assert_eq!(n(&third, "fetched_bytes"), 0, "nothing to fetch over a complete restore: {third}");
    assert_eq!(n(&third, "bytes"), 0, "nothing written: {third}");
    assert!(n(&third, "unchanged_files") > n(&second, "unchanged_files"), "what the second run wrote is kept: {third}");
}

/// `--overwrite` makes the target what the point has, whatever it held: files
/// with other content (even of the same size and time), entries of another kind,
/// and entries the point does not have. Without it, a non-empty target is refused
/// and left as it was.
#[test]
fn overwrite_makes_the_target_the_point() {
    let repo = TestRepo::new(Backend::File);
    repo.init();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    build_fidelity_tree(&src);
    fs::create_dir(src.join("kinds")).unwrap();
    fs::write(src.join("kinds/was-dir"), b"a file").unwrap();
    fs::create_dir(src.join("kinds/was-file")).unwrap();
    fs::write(src.join("kinds/was-file/inside"), b"inside").unwrap();
    fs::write(src.join("kinds/same-size-and-time"), b"the point's bytes").unwrap();
    repo.ok(&["backup", "--source", "s", src.to_str().unwrap()]);

    let target = work.path().join("target");
    repo.ok(&["restore", "--at", "latest", target.to_str().unwrap()]);
    // Damage it every way.
    fs::remove_file(target.join("kinds/was-dir")).unwrap();
    fs::create_dir_all(target.join("kinds/was-dir/deep")).unwrap();
    fs::remove_dir_all(target.join("kinds/was-file")).unwrap();
    fs::write(target.join("kinds/was-file"), b"not a directory").unwrap();
    let same = target.join("kinds/same-size-and-time");
    let mtime = fs::metadata(&same).unwrap().modified().unwrap();
    fs::write(&same, b"other bytes, same").unwrap();
    fs::File::options().write(true).open(&same).unwrap().set_modified(mtime).unwrap();
    fs::write(target.join("extra"), b"not in the point").unwrap();
    fs::create_dir_all(target.join("extra-dir/sub")).unwrap();
    std::os::unix::fs::symlink("nowhere", target.join("kinds/extra-link")).unwrap();

    let before = common::compare_trees(&src, &target);
    let err = repo.fails(&["restore", "--at", "latest", target.to_str().unwrap()], 1);
    assert!(err.contains("not an empty directory") && err.contains("--overwrite"), "{err}");
    assert_eq!(common::compare_trees(&src, &target), before, "a refused restore changes nothing");

    let report = restore_json(&repo, &["--overwrite", target.to_str().unwrap()]);
    assert_trees_equal(&src, &target);
    assert!(n(&report, "removed") >= 5, "{report}");
    assert!(n(&report, "unchanged_files") > 0, "{report}");
    assert!(report["failed"].as_array().unwrap().is_empty(), "{report}");
}

/// A million small files restore within the memory budget: peak RSS (from the
/// kernel's accounting of the process) at most `--memory` plus a constant for the
/// program itself. Source, repository and target are on a tmpfs, where a million
/// inodes cost seconds rather than minutes.
#[test]
fn a_million_files_restore_within_the_memory_budget() {
    const DIRS: usize = 1000;
    const PER_DIR: usize = 1000;
    const BUDGET: u64 = 64 << 20;
    /// The program without its budget: binary, runtime, threads, allocator.
    const CONSTANT: u64 = 64 << 20;
    let fs = SmallFs::mount("6g");
    let src = fs.path().join("src");
    for d in 0..DIRS {
        let dir = src.join(format!("d{d:04}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..PER_DIR {
            fs::write(dir.join(format!("f{f:04}")), format!("file {f} of directory {d}\n")).unwrap();
        }
    }
    let repo = TestRepo::at_dir(&fs.path().join("repo"));
    repo.init();
    repo.ok(&["backup", "--source", "s", src.to_str().unwrap()]);
    // A small file takes a page of the tmpfs: room for one copy at a time.
    fs::remove_dir_all(&src).unwrap();

    let target = fs.path().join("target");
    let (status, stdout, peak) = run_measuring_peak(
        repo.cmd(),
        &["restore", "--at", "latest", "--json", "--memory", &BUDGET.to_string(), target.to_str().unwrap()],
    );
    assert_eq!(status, 0, "restore failed: {stdout}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(n(&report, "files"), (DIRS * PER_DIR) as u64, "{report}");
    eprintln!(
        "peak RSS restoring {} files: {} MiB (budget {} MiB + {} MiB for the program)",
        DIRS * PER_DIR,
        peak >> 20,
        BUDGET >> 20,
        CONSTANT >> 20
    );
    assert!(peak <= BUDGET + CONSTANT, "peak RSS {} MiB is over the budget", peak >> 20);
    for (d, f) in [(0, 0), (499, 731), (999, 999)] {
        let got = fs::read_to_string(target.join(format!("d{d:04}/f{f:04}"))).unwrap();
        assert_eq!(got, format!("file {f} of directory {d}\n"));
    }
}

/// Runs `cmd` with `args` and returns its exit code, its stdout and its peak
/// resident memory in bytes.
///
/// The kernel's peak for a process counts the memory of the process it replaced
/// at exec: a child spawned straight from this test process (posix_spawn shares
/// its memory until the exec) would report this process's own peak, tests running
/// beside it included. So a small python3 spawns it instead and reports the
/// child's `ru_maxrss` on stderr: what the program itself held.
fn run_measuring_peak(cmd: std::process::Command, args: &[&str]) -> (i32, String, u64) {
    const MEASURE: &str = "import os, sys\n\
        pid = os.fork()\n\
        if pid == 0:\n    os.execv(sys.argv[1], sys.argv[1:])\n\
        _, status, usage = os.wait4(pid, 0)\n\
        sys.stderr.write('maxrss-kib %d\\n' % usage.ru_maxrss)\n\
        sys.exit(os.waitstatus_to_exitcode(status))\n";
    let mut measured = std::process::Command::new("python3");
    measured.args(["-c", MEASURE, cmd.get_program().to_str().unwrap()]).args(cmd.get_args()).args(args);
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => measured.env(k, v),
            None => measured.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        measured.current_dir(dir);
    }
    let out = measured.stdin(std::process::Stdio::null()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let kib: u64 = stderr
        .lines()
        .find_map(|l| l.strip_prefix("maxrss-kib "))
        .unwrap_or_else(|| panic!("no peak measured: {stderr}"))
        .parse()
        .unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8(out.stdout).unwrap(), kib * 1024)
}
