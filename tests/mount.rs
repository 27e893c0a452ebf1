//! End-to-end tests of `ebb mount` with real FUSE mounts: the mounted tree equals the
//! source at each point, tools behave, damaged data gives EIO for exactly the files
//! that need it, writes get EROFS, and the daemon's lifecycle is clean.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{assert_trees_equal_with, build_fidelity_tree, pseudo_random_bytes, Backend, CompareOptions, TestRepo};
use serde_json::Value;

/// Compare options for a mount: everything, holes included (the mount answers
/// SEEK_DATA and SEEK_HOLE from the stored extents, item 22 of issue 15).
fn mount_opts() -> CompareOptions {
    CompareOptions::default()
}

/// A mount that is undone when the test ends, however it ends.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ =
            Command::new("fusermount3").arg("-u").arg("-z").arg(&self.0).stderr(std::process::Stdio::null()).status();
    }
}

fn is_mounted(path: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = path.to_str().unwrap().replace(' ', "\\040");
    info.lines().any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

fn mount(repo: &TestRepo, args: &[&str], mnt: &Path) -> (Mounted, String) {
    fs::create_dir_all(mnt).unwrap();
    let mut all = vec!["mount"];
    all.extend_from_slice(args);
    all.push(mnt.to_str().unwrap());
    // The daemon's log goes beside the mountpoint, into the test's own directory.
    let out = repo.cmd().env("EBB_STATE_DIR", state_dir(mnt)).args(&all).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "ebb {all:?} failed: {stderr}");
    assert!(is_mounted(mnt), "ebb mount returned before the mount was ready: {stderr}");
    (Mounted(mnt.to_path_buf()), stderr)
}

/// Where a test's mount daemons keep their logs: beside the mountpoint.
fn state_dir(mnt: &Path) -> PathBuf {
    mnt.parent().unwrap().join("state")
}

/// The log of the mount daemon of `mnt`.
fn daemon_log(mnt: &Path) -> PathBuf {
    let tag: String = mnt.to_str().unwrap().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    state_dir(mnt).join("mounts").join(format!("mount{tag}.log"))
}

fn daemon_pid(stderr: &str) -> i32 {
    let at = stderr.find("daemon pid ").expect("ebb mount names its daemon") + "daemon pid ".len();
    stderr[at..].split_whitespace().next().unwrap().parse().unwrap()
}

fn wait_unmounted(mnt: &Path) {
    let start = Instant::now();
    while is_mounted(mnt) {
        assert!(start.elapsed() < Duration::from_secs(10), "{} is still mounted", mnt.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A file:// repository with one point of a directory holding `f` ("data"), and
/// the working directory the test may use (the source is its `src`).
fn one_small_point() -> (TestRepo, tempfile::TempDir) {
    let repo = TestRepo::new(Backend::File);
    repo.init();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"data").unwrap();
    repo.ok(&["backup", src.to_str().unwrap()]);
    (repo, work)
}

fn cp_a(from: &Path, to: &Path) {
    let ok = Command::new("cp").args(["-a", "--sparse=always"]).arg(from).arg(to).status().unwrap();
    assert!(ok.success(), "cp -a {} {}", from.display(), to.display());
}

fn sh(cmd: &str, dir: &Path) -> (bool, String, String) {
    let o = Command::new("sh").arg("-c").arg(cmd).current_dir(dir).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn point_times(repo: &TestRepo) -> Vec<String> {
    let v: Vec<Value> = serde_json::from_str(&repo.ok(&["points", "--json"])).unwrap();
    v.iter().map(|p| p["time"].as_str().unwrap().to_string()).collect()
}

fn shows_each_point(backend: Backend) {
    let repo = TestRepo::new(backend);
    repo.init();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let info = build_fidelity_tree(&src);
    repo.ok(&["backup", "--source", "host", src.to_str().unwrap()]);
    let v1 = work.path().join("v1");
    cp_a(&src, &v1);
    std::thread::sleep(Duration::from_millis(1100));

    // Change the tree: content, a deletion, a new file.
    fs::write(src.join("added.txt"), b"new in the second point\n").unwrap();
    fs::remove_file(src.join(&info.tiny_file)).unwrap();
    let text = src.join(&info.text_file);
    let mut body = fs::read(&text).unwrap();
    body.extend_from_slice(b"appended\n");
    fs::write(&text, body).unwrap();
    repo.ok(&["backup", "--source", "host", src.to_str().unwrap()]);
    let v2 = work.path().join("v2");
    cp_a(&src, &v2);
    let times = point_times(&repo);
    assert_eq!(times.len(), 2);

    // Every point, through the timeline layout.
    let mnt = work.path().join("all");
    let (guard, _) = mount(&repo, &[], &mnt);
    let root = fs::read_dir(&mnt).unwrap().map(|e| e.unwrap().file_name()).collect::<Vec<_>>();
    assert_eq!(root, vec![std::ffi::OsString::from("host")]);
    let listed: Vec<String> =
        fs::read_dir(mnt.join("host/points")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(listed, times, "points/ lists every point, oldest first");
    assert_trees_equal_with(&v1, &mnt.join("host/points").join(&times[0]), &mount_opts());
    assert_trees_equal_with(&v2, &mnt.join("host/points").join(&times[1]), &mount_opts());
    assert_eq!(fs::read_link(mnt.join("host/latest")).unwrap(), PathBuf::from(format!("points/{}", times[1])));
    assert_trees_equal_with(&v2, &mnt.join("host/latest"), &mount_opts());
    // at/<T> resolves any form of a time on lookup: just after the first point gives it.
    let t1: jiff::Timestamp = times[0].parse().unwrap();
    let between = (t1 + jiff::SignedDuration::from_millis(500)).to_string();
    assert_trees_equal_with(&v1, &mnt.join("host/at").join(&between), &mount_opts());
    assert_trees_equal_with(&v1, &mnt.join("host/at").join(format!("@{}", t1.as_second() + 1)), &mount_opts());
    assert!(fs::metadata(mnt.join("host/at/2001-01-01T00:00:00Z")).is_err(), "before the first point there is nothing");
    assert!(fs::read_dir(mnt.join("host/at")).unwrap().next().is_none(), "at/ is resolved on lookup, not listed");

    // A point that arrives while mounted appears within seconds.
    fs::write(src.join("third.txt"), b"3").unwrap();
    repo.ok(&["backup", "--source", "host", src.to_str().unwrap()]);
    let start = Instant::now();
    loop {
        let n = fs::read_dir(mnt.join("host/points")).unwrap().count();
        if n == 3 && mnt.join("host/latest/third.txt").exists() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "the new point did not appear ({n} points shown)");
        std::thread::sleep(Duration::from_millis(100));
    }
    repo.ok(&["umount", mnt.to_str().unwrap()]);
    wait_unmounted(&mnt);
    drop(guard);

    // One moment, shown directly.
    let at = work.path().join("at");
    let (_guard, _) = mount(&repo, &["--at", &between], &at);
    assert_trees_equal_with(&v1, &at, &mount_opts());

    // The tools people use on it.
    let (ok, out, err) = sh(&format!("cat '{}'", info.text_file.display()), &at);
    assert!(ok, "{err}");
    assert_eq!(out.as_bytes(), fs::read(v1.join(&info.text_file)).unwrap());
    let copy = work.path().join("copy");
    let (ok, _, err) = sh(&format!("cp -a . '{}'", copy.display()), &at);
    assert!(ok, "cp -a from the mount: {err}");
    // cp finds the holes with SEEK_HOLE and keeps them.
    assert_trees_equal_with(&v1, &copy, &CompareOptions::default());
    let count = |dir: &Path| sh("find . | wc -l", dir).1;
    assert_eq!(count(&at), count(&v1), "find lists the same entries");
    // Files only: a directory's size is an artefact of how it grew, and the copy grew
    // differently from the source the point was made of.
    let du = "find . -type f -print0 | du -c --apparent-size --block-size=1 --files0-from=- | tail -1";
    let (ok, out, err) = sh(du, &at);
    assert!(ok, "du: {err}");
    let (_, expect, _) = sh(du, &v1);
    assert_eq!(out.split_whitespace().next(), expect.split_whitespace().next(), "du --apparent-size agrees");
    let (ok, out, _) = sh(&format!("stat -c '%s %a %u %g %Y' '{}'", info.setuid_file.display()), &at);
    let (_, expect, _) = sh(&format!("stat -c '%s %a %u %g %Y' '{}'", info.setuid_file.display()), &v1);
    assert!(ok);
    assert_eq!(out, expect);
    if info.xattrs_supported {
        let (ok, out, err) = sh(&format!("getfattr -d -e hex '{}'", info.xattr_file.display()), &at);
        let (_, expect, _) = sh(&format!("getfattr -d -e hex '{}'", info.xattr_file.display()), &v1);
        assert!(ok, "getfattr: {err}");
        assert_eq!(out, expect);
    }
    // Hard links share one inode, with the right link count.
    let inos: Vec<(u64, u64)> =
        info.hardlinks.iter().map(|p| fs::metadata(at.join(p)).map(|m| (m.ino(), m.nlink())).unwrap()).collect();
    assert!(inos.iter().all(|&i| i == inos[0]), "hard links: {inos:?}");
    assert_eq!(inos[0].1, 3);
    // Inode numbers stay the same within a mount.
    let again = fs::metadata(at.join(&info.hardlinks[1])).unwrap().ino();
    assert_eq!(again, inos[0].0);

    // Every write is refused with EROFS.
    for cmd in ["touch new", "mkdir d", "rm -f '{f}'", "echo x >> '{f}'", "chmod 0 '{f}'", "ln -s a b", "mv '{f}' z"] {
        let cmd = cmd.replace("{f}", info.text_file.to_str().unwrap());
        let (ok, _, err) = sh(&cmd, &at);
        assert!(!ok && err.contains("Read-only file system"), "{cmd}: {err}");
    }
}

#[test]
fn shows_each_point_file() {
    shows_each_point(Backend::File);
}

#[test]
fn shows_each_point_s3() {
    shows_each_point(Backend::S3);
}

/// The pack, offset and length of the only chunk of a small file in the newest point.
fn chunk_of(repo: &TestRepo, name: &str) -> (String, u64, u64) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = catalog::Store::open(repo.url(), false).unwrap();
        let secret = catalog::Secret::Password(common::TEST_PASSWORD.as_bytes().to_vec());
        let r = catalog::Repository::open(store, &secret).await.unwrap();
        let source = r.sources().await.unwrap().remove(0);
        let p = r.points(&source).await.unwrap().pop().unwrap();
        let m = r.manifest(&p).await.unwrap();
        let top = r.read_tree(&m.root_ref().unwrap()).await.unwrap().entries.remove(0);
        let tree = r.read_tree(&top.subtree.unwrap()).await.unwrap();
        let entry = tree.find(name.as_bytes()).unwrap();
        assert_eq!(entry.content.len(), 1);
        let catalog::tree::Extent::Data(b) = entry.content[0] else { panic!("{name} is a hole") };
        (catalog::pack_name(&b.pack), b.offset as u64, b.length as u64)
    })
}

#[test]
fn damaged_chunk_gives_eio_for_exactly_its_files() {
    let repo = TestRepo::new(Backend::File);
    repo.init();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    for i in 0..20u64 {
        fs::write(src.join(format!("f{i:02}")), pseudo_random_bytes(i, 50_000)).unwrap();
    }
    fs::write(src.join("big"), pseudo_random_bytes(99, 12 << 20)).unwrap();
    repo.ok(&["backup", src.to_str().unwrap()]);

    let (pack, offset, length) = chunk_of(&repo, "f07");
    let mut bytes = repo.read_object(&pack);
    bytes[(offset + length / 2) as usize] ^= 0x40;
    repo.write_object(&pack, &bytes);

    let mnt = work.path().join("mnt");
    let (_guard, _) = mount(&repo, &["--at", "latest"], &mnt);
    for entry in fs::read_dir(&src).unwrap() {
        let name = entry.unwrap().file_name();
        let got = fs::read(mnt.join(&name));
        if name == "f07" {
            let err = got.expect_err("a damaged chunk must not be read");
            assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        } else {
            let got = got.unwrap_or_else(|e| panic!("{name:?} shares nothing with the damaged chunk: {e}"));
            assert!(got == fs::read(src.join(&name)).unwrap(), "{name:?} reads back different bytes");
        }
    }
    // Metadata of the damaged file is still there: only its data is unreadable.
    assert_eq!(fs::metadata(mnt.join("f07")).unwrap().len(), 50_000);
}

/// A mount unmounted lazily (`fusermount3 -uz`) and mounted again at once: the
/// old daemon, finding its mount gone from the path, ends without unmounting what
/// is there now (it unmounted by path, which took the new mount away when it
/// looked in between; seen in CI under load). Timing decides whether the old code
/// fails here, so this repeats the remount to give the race its chances.
#[test]
fn a_mount_made_again_at_once_stays_mounted() {
    let (repo, work) = one_small_point();
    let mnt = work.path().join("mnt");
    let (mut guard, _) = mount(&repo, &["--at", "latest"], &mnt);
    for round in 0..8 {
        drop(guard);
        wait_unmounted(&mnt);
        guard = mount(&repo, &["--at", "latest"], &mnt).0;
        // The old daemon looks every 200 ms.
        std::thread::sleep(Duration::from_millis(450));
        assert!(is_mounted(&mnt), "round {round}: the new mount was taken away");
        assert_eq!(fs::read(mnt.join("f")).unwrap(), b"data");
    }
}

#[test]
fn mountpoint_checks_and_lifecycle() {
    let (repo, work) = one_small_point();

    let missing = work.path().join("missing");
    let err = repo.fails(&["mount", missing.to_str().unwrap()], 2);
    assert!(err.contains("does not exist"), "{err}");
    let file = work.path().join("file");
    fs::write(&file, b"").unwrap();
    let err = repo.fails(&["mount", file.to_str().unwrap()], 2);
    assert!(err.contains("not a directory"), "{err}");
    let full = work.path().join("full");
    fs::create_dir(&full).unwrap();
    fs::write(full.join("x"), b"").unwrap();
    let err = repo.fails(&["mount", full.to_str().unwrap()], 2);
    assert!(err.contains("not empty"), "{err}");
    let err = repo.fails(&["umount", work.path().join("src").to_str().unwrap()], 2);
    assert!(err.contains("not mounted"), "{err}");

    // A wrong password: refused by `ebb mount` itself, and no daemon is left behind.
    let mnt = work.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let log = daemon_log(&mnt);
    let out = repo
        .cmd()
        .env("EBB_PASSWORD", "not the password")
        .env("EBB_STATE_DIR", state_dir(&mnt))
        .args(["mount", mnt.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("opens none of the"), "{err}");
    assert!(!is_mounted(&mnt));
    assert!(!log.exists(), "the daemon that got no key is gone, with its log");
    // A point before the first: the daemon, which resolves it, fails after the key
    // reached it; ebb mount shows its message and exit status.
    let err = repo.fails(&["mount", "--at", "2001-01-01T00:00:00Z", mnt.to_str().unwrap()], 1);
    assert!(err.contains("before the first point"), "{err}");
    assert!(!is_mounted(&mnt));

    // Already mounted.
    let (_guard, stderr) = mount(&repo, &["--at", "latest"], &mnt);
    // The daemon got the unlocked key over a pipe: no secret in its environment.
    let environ = fs::read(format!("/proc/{}/environ", daemon_pid(&stderr))).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(!environ.contains(common::TEST_PASSWORD), "the password is in the mount daemon's environment");
    let err = repo.fails(&["mount", mnt.to_str().unwrap()], 2);
    assert!(err.contains("already"), "{err}");

    // A killed daemon leaves a dead mountpoint: ebb says how to clear it, and clears it.
    let pid = daemon_pid(&stderr);
    assert!(Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success());
    // The daemon holds two device files (one per FUSE thread): a request caught
    // between their closings gets ECONNABORTED, every later one ENOTCONN.
    let start = Instant::now();
    loop {
        match fs::metadata(&mnt).map_err(|e| e.raw_os_error()) {
            Err(Some(libc::ENOTCONN)) => break,
            Ok(_) | Err(Some(libc::ECONNABORTED)) => {}
            Err(other) => panic!("a dead mount gave errno {other:?}"),
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the mount outlived its daemon");
        std::thread::sleep(Duration::from_millis(50));
    }
    let err = repo.fails(&["mount", mnt.to_str().unwrap()], 2);
    assert!(err.contains(&format!("ebb umount {}", mnt.display())), "{err}");
    repo.ok(&["umount", mnt.to_str().unwrap()]);
    assert!(!is_mounted(&mnt));
    assert!(fs::read_dir(&mnt).unwrap().next().is_none());

    // SIGTERM unmounts cleanly.
    let (_guard, stderr) = mount(&repo, &["--at", "latest"], &mnt);
    assert_eq!(fs::read(mnt.join("f")).unwrap(), b"data");
    let pid = daemon_pid(&stderr);
    assert!(Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().success());
    wait_unmounted(&mnt);
    assert!(fs::read_dir(&mnt).unwrap().next().is_none(), "nothing is left mounted");
}

#[test]
fn disk_cache_serves_later_mounts_and_holds_no_plaintext() {
    let repo = TestRepo::new(Backend::File);
    repo.init();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    let marker = b"plaintext-in-the-cache-would-be-a-leak ".repeat(2000);
    fs::write(src.join("text"), &marker).unwrap();
    fs::write(src.join("noise"), pseudo_random_bytes(5, 6 << 20)).unwrap();
    repo.ok(&["backup", src.to_str().unwrap()]);

    let cache = work.path().join("cache");
    let mnt = work.path().join("mnt");
    let args = ["--at", "latest", "--cache-dir", cache.to_str().unwrap(), "--cache-dir-size", "64MiB"];
    let (guard, _) = mount(&repo, &args, &mnt);
    assert_eq!(fs::read(mnt.join("text")).unwrap(), marker);
    assert!(fs::read(mnt.join("noise")).unwrap() == pseudo_random_bytes(5, 6 << 20));
    drop(guard);
    wait_unmounted(&mnt);

    let cached: Vec<PathBuf> = fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(cached.len() >= 2, "chunks were kept on disk: {cached:?}");
    for f in &cached {
        let bytes = fs::read(f).unwrap();
        assert!(!bytes.windows(24).any(|w| w == &marker[..24]), "{} holds plaintext", f.display());
    }

    // With the data gone from the store, a new mount still reads from the cache.
    let saved: Vec<(String, Vec<u8>)> = repo
        .objects()
        .into_iter()
        .filter(|k| k.starts_with("packs/"))
        .map(|k| (k.clone(), repo.read_object(&k)))
        .collect();
    let data_pack = chunk_of(&repo, "text").0;
    repo.delete_object(&data_pack);
    let (guard, _) = mount(&repo, &args, &mnt);
    assert_eq!(fs::read(mnt.join("text")).unwrap(), marker, "served from the disk cache");
    drop(guard);
    wait_unmounted(&mnt);

    // A tampered cache entry is never returned: with the store gone too, that is EIO.
    for f in fs::read_dir(&cache).unwrap() {
        let f = f.unwrap().path();
        let mut b = fs::read(&f).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 1;
        fs::write(&f, b).unwrap();
    }
    let (guard, _) = mount(&repo, &args, &mnt);
    assert_eq!(fs::read(mnt.join("text")).unwrap_err().raw_os_error(), Some(libc::EIO));
    drop(guard);
    wait_unmounted(&mnt);

    // The bound holds.
    let small = ["--at", "latest", "--cache-dir", cache.to_str().unwrap(), "--cache-dir-size", "1MiB"];
    for (k, v) in &saved {
        repo.write_object(k, v);
    }
    let (_guard, _) = mount(&repo, &small, &mnt);
    let _ = fs::read(mnt.join("noise")).unwrap();
    let total: u64 = fs::read_dir(&cache).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    assert!(total <= 1 << 20, "the disk cache holds {total} bytes over its 1 MiB bound");
}

/// Item 1 of issue 15: the names of one hard-linked file share an inode within one
/// point shown, and only there. Link groups are numbered afresh in every point, so
/// hard links of another source or another point are other files: reading one
/// first used to make the others show its size and bytes.
#[test]
fn hard_links_of_other_points_and_sources_are_other_files() {
    let repo = TestRepo::new(Backend::File);
    repo.init();
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(b.join("d")).unwrap();
    let (a1, a2, b1) = (pseudo_random_bytes(1, 1000), pseudo_random_bytes(2, 2000), pseudo_random_bytes(3, 3000));
    fs::write(a.join("x"), &a1).unwrap();
    fs::hard_link(a.join("x"), a.join("x2")).unwrap();
    fs::write(b.join("d/y"), &b1).unwrap();
    fs::hard_link(b.join("d/y"), b.join("d/y2")).unwrap();
    repo.ok(&["backup", "--source", "a", a.to_str().unwrap()]);
    repo.ok(&["backup", "--source", "b", b.to_str().unwrap()]);
    // Rewritten in place: the same inode, new content, a new point.
    std::thread::sleep(Duration::from_millis(20));
    fs::write(a.join("x"), &a2).unwrap();
    repo.ok(&["backup", "--source", "a", a.to_str().unwrap()]);
    let v: Vec<Value> = serde_json::from_str(&repo.ok(&["points", "--source", "a", "--json"])).unwrap();
    let old = v[0]["time"].as_str().unwrap().to_string();

    let mnt = work.path().join("mnt");
    let (_guard, _) = mount(&repo, &[], &mnt);
    // The newest first, then the others, which must not take its inode.
    let shows = |p: &str, want: &[u8], what: &str| {
        let got = fs::read(mnt.join(p)).unwrap();
        assert!(got == want, "{p}: {what} ({} bytes shown, {} wanted)", got.len(), want.len());
    };
    shows("a/latest/x", &a2, "the newest point");
    shows("b/latest/d/y", &b1, "source b shows its own file, not a's");
    shows("b/latest/d/y2", &b1, "source b shows its own file, not a's");
    shows(&format!("a/points/{old}/x"), &a1, "the older point shows its own bytes");
    shows(&format!("a/points/{old}/x2"), &a1, "the older point shows its own bytes");
    shows(&format!("a/at/{old}/x"), &a1, "the older moment shows its own bytes");
    let ino = |p: &str| fs::metadata(mnt.join(p)).unwrap().ino();
    assert_eq!(ino("a/latest/x"), ino("a/latest/x2"), "one file's names share its inode");
    assert_eq!(ino("b/latest/d/y"), ino("b/latest/d/y2"));
    assert_ne!(ino("a/latest/x"), ino("b/latest/d/y"));
    assert_ne!(ino("a/latest/x"), ino(&format!("a/points/{old}/x")));
}

/// Items 8 and 9 of issue 15: `ebb umount` refuses what ebb did not mount; the
/// mount daemon's log is a file of its own in a private directory (a link planted
/// where it used to go, or where it goes, makes it write nowhere else), and a clean
/// `ebb umount` leaves no error in it.
#[test]
fn umount_refuses_other_mounts_and_the_daemon_log_is_private_and_clean() {
    let (repo, work) = one_small_point();

    // A tmpfs with a file: not ebb's, left alone.
    let other = work.path().join("other");
    fs::create_dir(&other).unwrap();
    assert!(Command::new("mount").args(["-t", "tmpfs", "tmpfs"]).arg(&other).status().unwrap().success());
    let _other = Mounted(other.clone());
    fs::write(other.join("keep"), b"mine").unwrap();
    let err = repo.fails(&["umount", other.to_str().unwrap()], 2);
    assert!(err.contains("not an ebb mount"), "{err}");
    assert_eq!(fs::read(other.join("keep")).unwrap(), b"mine", "the tmpfs is still mounted, as it was");

    // Links planted where the log went (a predictable name in TMPDIR) and where it
    // goes now: neither victim is written.
    let mnt = work.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let tag: String = mnt.to_str().unwrap().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    let victims = [work.path().join("victim1"), work.path().join("victim2")];
    for v in &victims {
        fs::write(v, b"precious").unwrap();
    }
    std::os::unix::fs::symlink(&victims[0], work.path().join(format!("ebb-mount{tag}.log"))).unwrap();
    std::os::unix::fs::DirBuilderExt::mode(fs::DirBuilder::new().recursive(true), 0o700)
        .create(daemon_log(&mnt).parent().unwrap())
        .unwrap();
    std::os::unix::fs::symlink(&victims[1], daemon_log(&mnt)).unwrap();
    let out = repo
        .cmd()
        .env("TMPDIR", work.path())
        .env("EBB_STATE_DIR", state_dir(&mnt))
        .args(["mount", mnt.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _guard = Mounted(mnt.clone());
    let pid = daemon_pid(&String::from_utf8_lossy(&out.stderr));
    for v in &victims {
        assert_eq!(fs::read(v).unwrap(), b"precious", "the daemon wrote through a planted link into {}", v.display());
    }
    let log = fs::symlink_metadata(daemon_log(&mnt)).unwrap();
    assert!(log.is_file(), "the log is a file of its own");
    assert_eq!(log.mode() & 0o777, 0o600);
    assert_eq!(fs::metadata(daemon_log(&mnt).parent().unwrap()).unwrap().mode() & 0o777, 0o700);

    repo.ok(&["umount", mnt.to_str().unwrap()]);
    let start = Instant::now();
    // SAFETY: signal 0 only asks whether the process exists.
    while unsafe { libc::kill(pid, 0) } == 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "the daemon outlived its mount");
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = fs::read_to_string(daemon_log(&mnt)).unwrap();
    assert!(!text.contains("Invalid argument") && !text.contains("rror"), "a clean unmount logs no error: {text}");
}

/// Item 19 of issue 15: one damaged manifest, and a garbage object named like a
/// point, hide nothing else: `ebb points` lists every point and marks those that
/// cannot be read; `restore --at` and `mount --at` fall back to the point before
/// with a warning naming the damaged one; `ebb sources` shows the newest readable
/// point (not the garbage's year 2554); the mount lists every point and gives EIO
/// only inside the damaged ones, and `latest` leads to a readable one.
#[test]
fn damaged_points_are_passed_over_and_marked() {
    let repo = TestRepo::new(Backend::File);
    repo.init();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    for round in 0..3u8 {
        fs::write(src.join("f"), [b'0' + round]).unwrap();
        repo.ok(&["backup", "--source", "s", src.to_str().unwrap()]);
    }
    let v: Vec<Value> = serde_json::from_str(&repo.ok(&["points", "--json"])).unwrap();
    let names: Vec<String> = v.iter().map(|p| p["name"].as_str().unwrap().to_string()).collect();
    let times: Vec<String> = v.iter().map(|p| p["time"].as_str().unwrap().to_string()).collect();
    // The newest manifest damaged, and a garbage object named like a point of 2554.
    let mut newest = repo.read_object(&names[2]);
    let mid = newest.len() / 2;
    newest[mid] ^= 1;
    repo.write_object(&names[2], &newest);
    repo.write_object("points/s/0000000000000000-0123456789abcdef", b"garbage");

    let out = repo.run(&["points", "--json"]);
    assert_eq!(out.status.code(), Some(1), "listed, and the exit code says something cannot be read");
    let listed: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.len(), 4, "every point is listed: {listed:?}");
    let damaged: Vec<&str> =
        listed.iter().filter(|p| p["damaged"].is_string()).map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(damaged, vec![names[2].as_str(), "points/s/0000000000000000-0123456789abcdef"]);
    let out = repo.run(&["points"]);
    assert_eq!(out.status.code(), Some(1));
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(table.matches("DAMAGED").count(), 2, "{table}");

    let out = repo.run(&["restore", "--at", "latest", work.path().join("r").to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&times[2]) && err.contains("cannot be read"), "the warning names the damaged point: {err}");
    assert_eq!(fs::read(work.path().join("r/f")).unwrap(), b"1", "the point before the damaged one");

    let sources: Vec<Value> = serde_json::from_str(&repo.ok(&["sources", "--json"])).unwrap();
    assert_eq!(sources[0]["newest"].as_str(), Some(times[1].as_str()), "{sources:?}");
    assert!(sources[0]["lag_seconds"].as_f64().unwrap() >= 0.0);

    let mnt = work.path().join("all");
    let (_all, _) = mount(&repo, &[], &mnt);
    let shown: Vec<String> =
        fs::read_dir(mnt.join("s/points")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(shown.len(), 4, "every point is listed: {shown:?}");
    assert_eq!(fs::read(mnt.join("s/points").join(&times[0]).join("f")).unwrap(), b"0");
    let inside =
        fs::read_dir(mnt.join("s/points").join(&times[2])).and_then(|d| d.collect::<Result<Vec<_>, _>>()).unwrap_err();
    assert_eq!(inside.raw_os_error(), Some(libc::EIO), "a damaged point is EIO inside");
    assert_eq!(fs::read_link(mnt.join("s/latest")).unwrap(), PathBuf::from(format!("points/{}", times[1])));
    assert_eq!(fs::read(mnt.join("s/latest/f")).unwrap(), b"1");

    let at = work.path().join("at");
    let (_at, stderr) = mount(&repo, &["--at", "latest"], &at);
    assert!(stderr.contains(&times[2]) && stderr.contains("cannot be read"), "{stderr}");
    assert_eq!(fs::read(at.join("f")).unwrap(), b"1");
}

/// `lsattr -d` of each path: the flags column.
fn lsattr(root: &Path, rels: &[&str]) -> Vec<String> {
    rels.iter()
        .map(|r| {
            let out = Command::new("lsattr").arg("-d").arg(root.join(r)).output().unwrap();
            assert!(out.status.success(), "lsattr {r}: {}", String::from_utf8_lossy(&out.stderr));
            // The filesystem's own flags (e: extents) are not kept.
            String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().replace('e', "-")
        })
        .collect()
}

/// Takes the immutable and append-only flags off a tree, so that it can be removed.
struct Unflag(PathBuf);

impl Drop for Unflag {
    fn drop(&mut self) {
        let _ = Command::new("chattr").args(["-R", "-i", "-a"]).arg(&self.0).status();
    }
}

/// Item 21 of issue 15: inode flags (`chattr +i`, `+a`, `+A`, `+d`) are kept,
/// restored last (an immutable file is still hard-linked, an append-only one still
/// gets its times), and shown in the mount to `lsattr`.
#[test]
fn inode_flags_are_kept_restored_and_shown() {
    let repo = TestRepo::new(Backend::File);
    repo.init();
    let work = tempfile::tempdir().unwrap();
    let _unflag = Unflag(work.path().to_path_buf());
    let src = work.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    for (name, data) in [("imm", "a"), ("app", "b"), ("d/noatime", "c"), ("plain", "d")] {
        fs::write(src.join(name), data).unwrap();
    }
    fs::hard_link(src.join("imm"), src.join("imm2")).unwrap();
    for (flag, name) in [("+i", "imm"), ("+a", "app"), ("+A", "d/noatime"), ("+d", "d")] {
        let ok = Command::new("chattr").arg(flag).arg(src.join(name)).status().unwrap().success();
        assert!(ok, "chattr {flag} {name} (the tests need a filesystem with inode flags, as ext4)");
    }
    let paths = ["imm", "imm2", "app", "d", "d/noatime", "plain"];
    let want = lsattr(&src, &paths);
    assert!(want[0].contains('i') && want[2].contains('a'), "{want:?}");
    repo.ok(&["backup", "--source", "s", src.to_str().unwrap()]);

    let out = work.path().join("out");
    repo.ok(&["restore", "--at", "latest", out.to_str().unwrap()]);
    assert_eq!(lsattr(&out, &paths), want, "restored with their flags");
    assert_eq!(fs::metadata(out.join("imm")).unwrap().ino(), fs::metadata(out.join("imm2")).unwrap().ino());
    let mtime = |p: &Path| fs::metadata(p).unwrap().mtime();
    assert_eq!(mtime(&out.join("app")), mtime(&src.join("app")), "times are set before append-only");
    assert_eq!(fs::read(out.join("d/noatime")).unwrap(), b"c");

    let mnt = work.path().join("mnt");
    let (_guard, _) = mount(&repo, &["--at", "latest"], &mnt);
    assert_eq!(lsattr(&mnt, &paths), want, "the mount shows them");
}

/// Item 25 of issue 15: after `ebb umount`, the daemon ends without an error. It
/// used to unmount again what was already unmounted, when it saw the mountpoint go
/// before its FUSE threads did ("unmount …: Invalid argument"). strace holds up
/// the daemon's reads of /dev/fuse, so that it always sees the mountpoint go first.
#[test]
fn a_clean_umount_leaves_no_error_when_the_daemon_is_slow_to_notice() {
    let (repo, work) = one_small_point();
    let mnt = work.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut daemon = repo.cmd();
    daemon.args(["mount", "--foreground", "--at", "latest", mnt.to_str().unwrap()]);
    let log = work.path().join("daemon.log");
    let mut child = common::repo::under_strace(&daemon, &["-P", "/dev/fuse", "--inject=read:delay_exit=1500000"])
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _guard = Mounted(mnt.clone());
    let start = Instant::now();
    while !is_mounted(&mnt) {
        assert!(start.elapsed() < Duration::from_secs(60), "not mounted: {}", fs::read_to_string(&log).unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    repo.ok(&["umount", mnt.to_str().unwrap()]);
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "the daemon outlived its mount");
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{text}");
    assert!(text.contains("unmounted") && !text.contains("Invalid argument"), "{text}");
}

/// Issue 18: a mount of a point that is forgotten and pruned while mounted never
/// gives wrong bytes: a file read before still reads (from what the mount holds)
/// or fails, and one whose data was deleted fails with EIO, which the daemon's log
/// explains.
#[test]
fn a_mounted_point_pruned_away_gives_eio_never_wrong_bytes() {
    let repo = TestRepo::new(Backend::File).with_env("EBB_GRACE", "3s");
    repo.init();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    for i in 0..8u64 {
        fs::write(src.join(format!("old{i}")), pseudo_random_bytes(i, 300_000)).unwrap();
    }
    repo.ok(&["backup", "--source", "s", src.to_str().unwrap()]);
    let first = point_times(&repo).remove(0);
    for i in 0..8u64 {
        fs::remove_file(src.join(format!("old{i}"))).unwrap();
    }
    fs::write(src.join("new"), b"the second point").unwrap();
    repo.ok(&["backup", "--source", "s", src.to_str().unwrap()]);

    let mnt = work.path().join("mnt");
    let (_guard, _) = mount(&repo, &["--at", &first], &mnt);
    let top = mnt.clone();
    let want = |i: u64| pseudo_random_bytes(i, 300_000);
    assert!(fs::read(top.join("old0")).unwrap() == want(0));

    repo.ok(&["policy", "set", "--source", "s", "--keep-last", "1"]);
    repo.ok(&["forget"]);
    // Packs are condemned once older than the grace, and deleted a grace later.
    std::thread::sleep(Duration::from_secs(4));
    repo.ok(&["prune"]);
    std::thread::sleep(Duration::from_secs(4));
    let pruned: Value = serde_json::from_str(&repo.ok(&["prune", "--json"])).unwrap();
    assert!(pruned["deleted_packs"].as_u64().unwrap() > 0, "{pruned}");

    let mut failed = 0;
    for i in 0..8u64 {
        match fs::read(top.join(format!("old{i}"))) {
            Ok(got) => assert!(got == want(i), "old{i} read back wrong bytes after its pack was pruned"),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "old{i}: {e}");
                failed += 1;
            }
        }
    }
    assert!(failed > 0, "every file of the pruned point still read: nothing was deleted under the mount");
    let log = fs::read_to_string(daemon_log(&mnt)).unwrap();
    assert!(log.contains("ebb prune"), "the daemon's log says why: {log}");
}
