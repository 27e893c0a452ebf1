//! `ebb stream dir` with the real binary: points follow changes, restore at any
//! moment gives the tree of that moment, kill -9 at random instants loses nothing,
//! and a store outage past the RPO is reported and recovered from.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::compare::assert_trees_equal;
use common::repo::{check_exit, Backend, TestRepo};
use common::tree::{pseudo_random_bytes, XorShift};

static LOGS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The streams of these tests run one at a time: they measure what a stream does
/// within seconds, which a neighbour's heavy workload would only blur.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running `ebb stream dir`, killed when dropped.
struct Stream {
    child: Child,
    state_dir: PathBuf,
    log: PathBuf,
}

impl Stream {
    fn start(repo: &TestRepo, state_dir: &Path, src: &Path, extra: &[&str]) -> Stream {
        let mut c = repo.cmd();
        c.args(["stream", "dir", "--source", "s", "--state-dir"]).arg(state_dir).args(extra).arg(src);
        // A file, not a pipe: a pipe nobody reads would block the stream once full.
        let log = state_dir.with_extension(format!("{}.log", LOGS.fetch_add(1, std::sync::atomic::Ordering::SeqCst)));
        c.stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
        let child = c.spawn().expect("start ebb stream dir");
        let mut s = Stream { child, state_dir: state_dir.to_path_buf(), log };
        // Up once its state names it: it watches the tree from then on.
        let deadline = Instant::now() + Duration::from_secs(30);
        while s.state().is_none_or(|v| v["pid"] != s.child.id()) {
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!("the stream exited with {status}: {}", s.stderr());
            }
            assert!(Instant::now() < deadline, "the stream did not start: {}", s.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    /// The stream's state file, once it has written one.
    fn state(&self) -> Option<serde_json::Value> {
        let entry = std::fs::read_dir(&self.state_dir).ok()?.flatten().find(|e| {
            e.path().extension().is_some_and(|x| x == "json") && e.file_name().to_string_lossy().starts_with("s-")
        })?;
        serde_json::from_slice(&std::fs::read(entry.path()).ok()?).ok()
    }

    /// Waits until everything the source held at `t` is durable.
    fn wait_durable(&mut self, t: jiff::Timestamp, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.state() {
                let durable: jiff::Timestamp = s["durable_as_of"].as_str().unwrap().parse().unwrap();
                if durable > t {
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the stream exited with {status}: {}", self.stderr());
            }
            assert!(Instant::now() < deadline, "nothing durable after {t} within {limit:?}: {:?}", self.state());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stderr(&mut self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then the exit status and stderr.
    fn stop(mut self) -> (std::process::ExitStatus, String) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("wait for the stream");
        let err = self.stderr();
        (status, err)
    }

    fn kill9(mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A file repository, and a work directory holding an empty `src/` to stream and
/// the path of the stream's state directory.
struct Setup {
    repo: TestRepo,
    work: tempfile::TempDir,
    src: PathBuf,
    state_dir: PathBuf,
}

fn setup() -> Setup {
    let repo = TestRepo::new(Backend::File);
    repo.init();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let state_dir = work.path().join("state");
    Setup { repo, work, src, state_dir }
}

fn write(path: &Path, data: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

fn append(path: &Path, data: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::OpenOptions::new().append(true).create(true).open(path).unwrap().write_all(data).unwrap();
}

fn copy_tree(from: &Path, to: &Path) {
    let st = std::process::Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}

/// The workload: each round creates, appends to, renames and deletes files, then
/// waits until the stream has made it durable and notes that moment, with a copy of
/// the tree as it was then. Restoring each moment must give exactly that copy.
#[test]
fn restore_at_each_moment_gives_the_tree_of_that_moment() {
    let _serial = serial();
    let Setup { repo, work, src, state_dir } = setup();
    write(&src.join("keep/base.txt"), b"base\n");
    let mut stream = Stream::start(&repo, &state_dir, &src, &["--rpo", "4s", "--metrics-addr", "127.0.0.1:0"]);

    let mut moments = Vec::new();
    for round in 0..4u64 {
        write(&src.join(format!("new/f{round}")), &pseudo_random_bytes(round, 3000 + 700 * round as usize));
        append(&src.join("logs/app.log"), format!("round {round} line\n").repeat(50).as_bytes());
        if round > 0 {
            std::fs::rename(src.join(format!("new/f{}", round - 1)), src.join(format!("old-{}", round - 1))).unwrap();
        }
        if round == 2 {
            std::fs::remove_file(src.join("old-0")).unwrap();
            std::fs::remove_dir_all(src.join("keep")).unwrap();
        }
        let changed = jiff::Timestamp::now();
        stream.wait_durable(changed, Duration::from_secs(30));
        let t = jiff::Timestamp::now();
        let copy = work.path().join(format!("at-{round}"));
        copy_tree(&src, &copy);
        moments.push((t, copy));
        // A quiet moment either side of t.
        std::thread::sleep(Duration::from_millis(300));
    }

    // ebb status: running, within the RPO, exit 0.
    let out = repo.run(&["status", "--json", "--state-dir", state_dir.to_str().unwrap()]);
    check_exit("ebb status", &out, 0);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["source"], "s");
    assert_eq!(v[0]["running"], true);
    assert_eq!(v[0]["breached"], false);
    assert_eq!(v[0]["rpo_secs"], 4);

    let (status, err) = stream.stop();
    assert!(status.success(), "the stream must stop cleanly on SIGTERM: {status}\n{err}");

    for (i, (t, copy)) in moments.iter().enumerate() {
        let out = work.path().join(format!("restored-{i}"));
        repo.ok(&["restore", "--source", "s", "--at", &t.to_string(), out.to_str().unwrap()]);
        assert_trees_equal(copy, &out);
    }
    repo.ok(&["verify", "--read-data"]);
}

/// Restores `--at t` of the whole source into a fresh directory.
fn restore_at(repo: &TestRepo, t: jiff::Timestamp, into: &Path) {
    repo.ok(&["restore", "--source", "s", "--at", &t.to_string(), into.to_str().unwrap()]);
}

/// Logs are appended to line by line (each line names when it was written), rotated,
/// truncated and rewritten in place, with a long RPO, so that appends travel as
/// fragments; a file that is not a log is changed in the middle and grown. At many moments T: every line written 2 s (the default append
/// interval) or more before T is in the tree restored at T, and every file restored
/// is a state its file really had, never a mix of a rewritten file's versions.
#[test]
fn appended_lines_are_visible_at_t_once_the_interval_has_passed() {
    let _serial = serial();
    let Setup { repo, work, src, state_dir } = setup();
    let old: Vec<u8> = (0..3000).map(|i| b"abcdefghij"[i % 10]).collect();
    let new: Vec<u8> = (0..3000).map(|i| b"ABCDEFGHIJ"[i % 10]).collect();
    write(&src.join("rw.log"), &old);
    write(&src.join("trunc.log"), &old);
    write(&src.join("app.log"), b"");
    write(&src.join("table.db"), &old);
    let mut stream = Stream::start(&repo, &state_dir, &src, &["--rpo", "10m"]);
    stream.wait_durable(jiff::Timestamp::now(), Duration::from_secs(30));

    // (line, when written); every line is unique.
    let mut lines: Vec<(String, jiff::Timestamp)> = Vec::new();
    let mut moments = Vec::new();
    let begin = Instant::now();
    let mut i = 0;
    while begin.elapsed() < Duration::from_secs(9) {
        let line = format!("line {i:05} {}\n", "x".repeat(i % 50));
        append(&src.join("app.log"), line.as_bytes());
        lines.push((line, jiff::Timestamp::now()));
        match i {
            30 => {
                std::fs::rename(src.join("app.log"), src.join("app.log.1")).unwrap();
                write(&src.join("app.log"), b"");
            }
            45 => {
                // Rewritten in place, then grown: never "old then the new tail".
                let f = std::fs::OpenOptions::new().write(true).open(src.join("rw.log")).unwrap();
                std::os::unix::fs::FileExt::write_all_at(&f, &new, 0).unwrap();
                append(&src.join("rw.log"), b"and more\n");
            }
            50 => {
                // Not a log: changed in the middle and grown, it is never taken for an append.
                let f = std::fs::OpenOptions::new().write(true).open(src.join("table.db")).unwrap();
                std::os::unix::fs::FileExt::write_all_at(&f, b"CHANGED", 1000).unwrap();
                append(&src.join("table.db"), b"grown\n");
            }
            60 => {
                std::fs::OpenOptions::new().write(true).truncate(true).open(src.join("trunc.log")).unwrap();
                append(&src.join("trunc.log"), b"after the truncation\n");
            }
            _ => {}
        }
        if i % 8 == 7 {
            moments.push(jiff::Timestamp::now());
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    stream.wait_durable(jiff::Timestamp::now(), Duration::from_secs(60));
    let (status, err) = stream.stop();
    assert!(status.success(), "{err}");
    let fragments = repo.objects().iter().filter(|o| o.starts_with("frags/s/")).count();
    assert!(fragments >= 5, "appends must travel as fragments, found {fragments}:\n{err}");

    let interval = jiff::SignedDuration::from_secs(2);
    let mut rw_new = new.clone();
    rw_new.extend_from_slice(b"and more\n");
    for (k, t) in moments.iter().enumerate() {
        let out = work.path().join(format!("at-{k}"));
        restore_at(&repo, *t, &out);
        let read = |name: &str| std::fs::read(out.join(name)).unwrap_or_default();
        let logs = [read("app.log.1"), read("app.log")].concat();
        let logs = String::from_utf8(logs).unwrap();
        for (line, written) in &lines {
            if *written + interval <= *t {
                assert!(logs.contains(line.as_str()), "at {t}: {line:?} written at {written} is missing");
            }
        }
        // Every line present was written, whole, in order: the files are prefixes of what was written.
        for name in ["app.log.1", "app.log"] {
            let got = String::from_utf8(read(name)).unwrap();
            assert!(got.is_empty() || got.ends_with('\n'), "at {t}: {name} ends mid-line: {got:?}");
        }
        let rw = read("rw.log");
        assert!(
            rw == old || (rw.len() >= new.len() && rw_new.starts_with(&rw)),
            "at {t}: rw.log is a mix of versions ({} bytes)",
            rw.len()
        );
        let db = read("table.db");
        let mut db_new = old.clone();
        db_new[1000..1007].copy_from_slice(b"CHANGED");
        db_new.extend_from_slice(b"grown\n");
        assert!(db == old || db == db_new, "at {t}: table.db is a mix of versions ({} bytes)", db.len());
        let tr = read("trunc.log");
        assert!(tr == old || b"after the truncation\n".starts_with(&tr[..]), "at {t}: trunc.log is {tr:?}");
    }
    // A mount at T shows what a restore at T gives, appends included.
    for k in [moments.len() / 3, moments.len() - 1] {
        let mnt = work.path().join(format!("mnt-{k}"));
        std::fs::create_dir(&mnt).unwrap();
        let at = moments[k].to_string();
        // The daemon's log goes into the test's own directory.
        let out = repo
            .cmd()
            .env("TMPDIR", work.path())
            .args(["mount", "--source", "s", "--at", &at, mnt.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "ebb mount --at {at}: {}", String::from_utf8_lossy(&out.stderr));
        let shown = work.path().join(format!("shown-{k}"));
        copy_tree(&mnt, &shown);
        repo.ok(&["umount", mnt.to_str().unwrap()]);
        let opts = common::CompareOptions { sparseness: false, ..Default::default() };
        common::assert_trees_equal_with(&work.path().join(format!("at-{k}")), &shown, &opts);
    }
    let out = work.path().join("latest");
    restore_at(&repo, jiff::Timestamp::now(), &out);
    assert_trees_equal(&src, &out);
    repo.ok(&["verify", "--read-data"]);
}

/// Metrics are served while streaming, and `ebb status` names the source.
#[test]
fn metrics_and_status_while_streaming() {
    let _serial = serial();
    let Setup { repo, work: _work, src, state_dir } = setup();
    write(&src.join("a"), b"a");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let mut stream = Stream::start(&repo, &state_dir, &src, &["--rpo", "10s", "--metrics-addr", &addr]);
    stream.wait_durable(jiff::Timestamp::now(), Duration::from_secs(30));

    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    for m in [
        "ebb_stream_lag_seconds{source=\"s\"}",
        "ebb_stream_rpo_seconds{source=\"s\"} 10",
        "ebb_stream_points_total{source=\"s\"} 1",
    ] {
        assert!(body.contains(m), "no {m} in\n{body}");
    }

    let out = repo.run(&["status", "--state-dir", state_dir.to_str().unwrap()]);
    check_exit("ebb status", &out, 0);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("s ") && text.contains(" ok "), "{text}");

    let (status, err) = stream.stop();
    assert!(status.success(), "{err}");
}

/// Bad input: a clear message, exit 2, and nothing written.
#[test]
fn bad_stream_input_is_refused() {
    let repo = TestRepo::new(Backend::File);
    repo.init();
    let work = tempfile::tempdir().unwrap();
    let before = repo.objects();
    let missing = work.path().join("missing");
    let file = work.path().join("file");
    write(&file, b"x");
    let sd = work.path().join("state");
    let sd = sd.to_str().unwrap();
    for (args, needle) in [
        (vec!["stream", "dir", "--state-dir", sd, missing.to_str().unwrap()], "cannot stream"),
        (vec!["stream", "dir", "--state-dir", sd, file.to_str().unwrap()], "not a directory"),
        (vec!["stream", "dir", "--rpo", "0s", "--state-dir", sd, work.path().to_str().unwrap()], "too short"),
        (vec!["stream", "dir", "--rpo", "soon", "--state-dir", sd, work.path().to_str().unwrap()], "invalid duration"),
        (vec!["stream", "dir", "--exclude", "a[", "--state-dir", sd, work.path().to_str().unwrap()], "a["),
    ] {
        let err = repo.fails(&args, 2);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert_eq!(repo.objects(), before, "bad input changed the repository");
}

/// kill -9 at 20 random instants of heavy change; every restart resumes. In the
/// end the repository verifies, the newest point equals the source, and a restart
/// with nothing changed adds nothing.
#[test]
fn kill_9_twenty_times_then_verify_and_compare() {
    let _serial = serial();
    let Setup { repo, work, src, state_dir } = setup();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workload = {
        let (src, stop) = (src.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut r = XorShift::new(9);
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let n = r.next_u64() % 40;
                let p = src.join(format!("d{}/f{n}", n % 5));
                match r.next_u64() % 4 {
                    0 => write(&p, &pseudo_random_bytes(i, (r.next_u64() % 600_000) as usize)),
                    1 => append(&p, &pseudo_random_bytes(i, 5000)),
                    2 => {
                        let _ = std::fs::remove_file(&p);
                    }
                    _ => {
                        let _ = std::fs::rename(&p, src.join(format!("d{}/g{n}", (n + 1) % 5)));
                    }
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let mut r = XorShift::new(20);
    for _ in 0..20 {
        let s = Stream::start(&repo, &state_dir, &src, &["--rpo", "2s"]);
        std::thread::sleep(Duration::from_millis(300 + r.next_u64() % 1200));
        s.kill9();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    workload.join().unwrap();

    let mut s = Stream::start(&repo, &state_dir, &src, &["--rpo", "2s"]);
    s.wait_durable(jiff::Timestamp::now(), Duration::from_secs(60));
    let (status, err) = s.stop();
    assert!(status.success(), "{err}");
    repo.ok(&["verify", "--read-data"]);
    let out = work.path().join("restored");
    repo.ok(&["restore", "--source", "s", "--at", "latest", out.to_str().unwrap()]);
    assert_trees_equal(&src, &out);

    // Nothing changed since: a restart makes no new point and stores nothing.
    let points = |repo: &TestRepo| -> Vec<serde_json::Value> {
        serde_json::from_str(&repo.ok(&["points", "--source", "s", "--json"])).unwrap()
    };
    let before = points(&repo);
    let objects = repo.objects();
    let mut s = Stream::start(&repo, &state_dir, &src, &["--rpo", "2s"]);
    s.wait_durable(jiff::Timestamp::now(), Duration::from_secs(60));
    let (status, err) = s.stop();
    assert!(status.success(), "{err}");
    assert_eq!(points(&repo).len(), before.len(), "an unchanged tree made a new point");
    assert_eq!(repo.objects(), objects, "an unchanged tree stored something");
}

/// The S3 server is frozen (SIGSTOP) for longer than the RPO while files change:
/// `ebb status` reports the breach with exit 1; once the server is back the lag
/// returns under the RPO and nothing is lost.
#[test]
fn outage_past_the_rpo_is_reported_and_caught_up() {
    let _serial = serial();
    let Some(server) = std::env::var_os("EBB_TEST_MOTO_SERVER") else {
        panic!("EBB_TEST_MOTO_SERVER must name moto_server (scripts/test sets it)");
    };
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut moto = std::process::Command::new(server)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start moto_server");
    let endpoint = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let repo = TestRepo::new_s3_at(&endpoint);
    repo.init();

    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    write(&src.join("before"), b"before the outage");
    let state_dir = work.path().join("state");
    let sd = state_dir.to_str().unwrap().to_string();
    let mut stream = Stream::start(&repo, &state_dir, &src, &["--rpo", "3s"]);
    stream.wait_durable(jiff::Timestamp::now(), Duration::from_secs(30));

    // SAFETY: freezing and thawing our own child.
    unsafe { libc::kill(moto.id() as i32, libc::SIGSTOP) };
    for i in 0..10 {
        write(&src.join(format!("during/{i}")), &pseudo_random_bytes(i, 20_000));
        std::thread::sleep(Duration::from_millis(600));
    }
    let out = repo.run(&["status", "--json", "--state-dir", &sd]);
    check_exit("ebb status during the outage", &out, 1);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["breached"], true, "{v}");
    assert!(v[0]["lag_secs"].as_f64().unwrap() > 3.0, "{v}");
    unsafe { libc::kill(moto.id() as i32, libc::SIGCONT) };

    let back = jiff::Timestamp::now();
    stream.wait_durable(back, Duration::from_secs(120));
    let out = repo.run(&["status", "--json", "--state-dir", &sd]);
    check_exit("ebb status after the outage", &out, 0);
    let (status, err) = stream.stop();
    assert!(status.success(), "{err}");
    assert!(err.contains("past its RPO"), "the alarm must be in the log:\n{err}");

    let out = work.path().join("restored");
    repo.ok(&["restore", "--source", "s", "--at", "latest", out.to_str().unwrap()]);
    assert_trees_equal(&src, &out);
    let _ = moto.kill();
    let _ = moto.wait();
}

/// The newest point, restored into a fresh directory under `work`.
fn restore_latest(repo: &TestRepo, work: &Path) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let out = work.join(format!("latest-{}", N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)));
    repo.ok(&["restore", "--source", "s", "--at", "latest", out.to_str().unwrap()]);
    out
}

/// Waits until the stream has made durable what the tree held just now, then
/// checks that the newest point has `name` with `data`.
fn shipped(stream: &mut Stream, repo: &TestRepo, work: &Path, name: &str, data: &[u8]) {
    stream.wait_durable(jiff::Timestamp::now(), Duration::from_secs(60));
    let got = std::fs::read(restore_latest(repo, work).join(name));
    assert_eq!(got.ok().as_deref(), Some(data), "the newest point has {name}: {}", stream.stderr());
}

/// Item 4 of issue 15: a stream follows its PATH when the directory there is deleted
/// and made again, renamed away and replaced, or (PATH a symlink) pointed elsewhere;
/// while PATH names nothing, `ebb status` says the stream is failing, never ok. (It
/// used to keep watching the old directory: no point ever again, status ok.)
#[test]
fn a_replaced_root_is_followed_and_a_missing_one_reported() {
    let _serial = serial();
    let Setup { repo, work, src: _, state_dir } = setup();
    let d1 = work.path().join("d1");
    write(&d1.join("a"), b"first");
    let link = work.path().join("link");
    std::os::unix::fs::symlink(&d1, &link).unwrap();
    let mut stream = Stream::start(&repo, &state_dir, &link, &["--rpo", "10m"]);
    shipped(&mut stream, &repo, work.path(), "a", b"first");

    // Deleted: reported at once, not merely once the RPO has passed.
    std::fs::remove_dir_all(&d1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = repo.run(&["status", "--state-dir", state_dir.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("failing") && text.contains("is gone") {
            assert!(!text.contains(" ok "), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "status never said the stream fails: {text}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // ... and made again.
    write(&d1.join("b"), b"second");
    shipped(&mut stream, &repo, work.path(), "b", b"second");

    // Renamed away, and replaced.
    std::fs::rename(&d1, work.path().join("d1.old")).unwrap();
    write(&d1.join("c"), b"third");
    shipped(&mut stream, &repo, work.path(), "c", b"third");
    write(&d1.join("c2"), b"and later");
    shipped(&mut stream, &repo, work.path(), "c2", b"and later");

    // The symlink pointed elsewhere.
    let d2 = work.path().join("d2");
    write(&d2.join("e"), b"fourth");
    let tmp_link = work.path().join("link.new");
    std::os::unix::fs::symlink(&d2, &tmp_link).unwrap();
    std::fs::rename(&tmp_link, &link).unwrap();
    shipped(&mut stream, &repo, work.path(), "e", b"fourth");
    write(&d2.join("e2"), b"and then");
    shipped(&mut stream, &repo, work.path(), "e2", b"and then");
    let out = repo.run(&["status", "--state-dir", state_dir.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(" ok "), "{}", String::from_utf8_lossy(&out.stdout));
    let (status, err) = stream.stop();
    assert!(status.success(), "{err}");
}

/// Item 12 of issue 15: one stream per source, whatever the spelling of the
/// repository URL or the state directory each is given (three streams of one
/// source used to run at once); the repository itself says who holds it. A stream
/// killed on this host does not block the next.
#[test]
fn one_stream_per_source_whatever_the_url_or_state_directory() {
    let _serial = serial();
    let Setup { repo, work, src, state_dir } = setup();
    write(&src.join("a"), b"a");
    let first = Stream::start(&repo, &state_dir, &src, &[]);
    let pid = first.child.id();
    for (n, url) in [format!("{}/", repo.url()), format!("{}//", repo.url()), repo.url().to_string()].iter().enumerate()
    {
        let other_state = work.path().join(format!("state-{n}"));
        let mut c = repo.cmd();
        c.env("EBB_REPOSITORY", url)
            .args(["stream", "dir", "--source", "s", "--state-dir"])
            .arg(&other_state)
            .arg(&src)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("a second stream of source s runs beside the first ({url}, {})", other_state.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(&format!("(pid {pid})")) && err.contains("one writer per source"), "{err}");
    }
    first.kill9();
    let again = Stream::start(&repo, &state_dir, &src, &[]);
    let (status, err) = again.stop();
    assert!(status.success(), "{err}");
}

/// `--prune-every`: the stream forgets its source by its policy and prunes the
/// repository by itself, while it goes on shipping; `ebb status` shows how the last
/// run went, and what is left verifies and restores.
#[test]
fn a_stream_forgets_and_prunes_by_itself() {
    let _serial = serial();
    let Setup { repo, work, src, state_dir } = setup();
    let repo = repo.with_env("EBB_GRACE", "3s");
    repo.ok(&["policy", "set", "--source", "s", "--keep-last", "2"]);
    write(&src.join("f"), b"first\n");
    let mut stream = Stream::start(&repo, &state_dir, &src, &["--rpo", "2s", "--prune-every", "2s"]);
    for round in 0..6u64 {
        write(&src.join("f"), &pseudo_random_bytes(round, 50_000));
        stream.wait_durable(jiff::Timestamp::now(), Duration::from_secs(30));
    }
    // The first runs only condemn; wait for one that deleted what an earlier one condemned.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = stream.state().expect("the stream keeps its state");
        let summary = s["last_prune"]["summary"].as_str().unwrap_or_default().to_string();
        assert!(s["last_prune"]["error"].is_null(), "{s}");
        if summary.contains("forgot") && !summary.contains(": 0 packs deleted") {
            break;
        }
        assert!(Instant::now() < deadline, "no prune deleted anything within a minute: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let final_state = work.path().join("final");
    copy_tree(&src, &final_state);
    let changed = jiff::Timestamp::now();
    stream.wait_durable(changed, Duration::from_secs(30));
    let out = repo.run(&["status", "--json", "--state-dir", state_dir.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v[0]["last_prune"]["at"].is_string() && v[0]["last_prune"]["error"].is_null(), "{v}");
    let (status, err) = stream.stop();
    assert!(status.success(), "{err}");

    let points: serde_json::Value = serde_json::from_str(&repo.ok(&["points", "--json"])).unwrap();
    let n = points.as_array().unwrap().len();
    assert!((1..=4).contains(&n), "the policy keeps two, and the stream made a few since the last run: {n}");
    repo.ok(&["verify", "--read-data"]);
    let restored = work.path().join("restored");
    restore_at(&repo, changed, &restored);
    assert_trees_equal(&final_state, &restored);
}
