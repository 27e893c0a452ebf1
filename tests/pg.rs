//! PostgreSQL with the real binary and a real PostgreSQL 15 server (run as the
//! postgres user): WAL through `ebb stream pg` and through `archive-push`, base
//! backups, and `ebb pg restore --at T` giving exactly the transactions committed
//! at or before T, checked by starting PostgreSQL on the restored directory.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::pg::{open_up, share_with_postgres, Pg, PASSWORD};
use common::pseudo_random_bytes;
use common::repo::{check_exit, Backend, TestRepo};
use common::wal::fake_segment;
use jiff::Timestamp;

/// The servers of these tests start one at a time: they are heavy for two cores.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A repository, a key file and a copy of ebb that the postgres user can read and
/// run (restore_command runs as that user).
struct Setup {
    work: tempfile::TempDir,
    repo: TestRepo,
    key: PathBuf,
    ebb: PathBuf,
}

impl Setup {
    fn new(backend: Backend) -> Setup {
        Setup::with_repo(TestRepo::new(backend))
    }

    fn with_repo(repo: TestRepo) -> Setup {
        let work = tempfile::tempdir().unwrap();
        repo.init();
        let key = work.path().join("ebb.key");
        repo.ok(&["key", "add", "--new-key-file", key.to_str().unwrap()]);
        let ebb = work.path().join("ebb");
        std::fs::copy(common::repo::ebb_exe(), &ebb).unwrap();
        let st = Command::new("chown").arg("postgres").arg(&key).status().unwrap();
        assert!(st.success());
        if let Some(dir) = repo.repo_dir() {
            share_with_postgres(dir);
        }
        open_up(work.path());
        Setup { work, repo, key, ebb }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    fn cmd(&self) -> Command {
        let mut c = self.repo.cmd_at(&self.ebb);
        c.arg("--key-file").arg(&self.key).env("PGPASSWORD", PASSWORD);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        check_exit(&format!("ebb {}", args.join(" ")), &out, 0);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ebb pg restore --at T` into a new directory, PostgreSQL started on it and
    /// recovered; returns the server.
    fn restore(&self, source: &str, at: &str, env: Vec<(String, String)>) -> Pg {
        let dir = tempfile::Builder::new().prefix("restored-").tempdir_in(self.work.path()).unwrap().keep();
        let data = dir.join("data");
        self.ok(&["pg", "restore", "--source", source, "--at", at, data.to_str().unwrap()]);
        let pg = Pg::restored(&dir, &data, env);
        pg.wait_promoted();
        pg
    }
}

/// A running `ebb stream pg`, killed when dropped.
struct Streamer {
    child: Child,
    log: PathBuf,
}

impl Streamer {
    fn start(s: &Setup, pg: &Pg, source: &str, extra: &[&str]) -> Streamer {
        let log = s.path(&format!("stream-{}.log", Timestamp::now().as_nanosecond()));
        let child = s
            .cmd()
            .args(["stream", "pg", "--source", source, "--dsn", &pg.dsn(), "--state-dir"])
            .arg(s.path("state"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Streamer { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Waits until the slot confirms everything the server has flushed: the stream
/// says the WAL is durable, which it may say only once the store has it.
fn wait_slot_caught_up(pg: &Pg, slot: &str, streamer: &Streamer) {
    let lsn = pg.sql("select pg_current_wal_flush_lsn()");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = pg.sql(&format!(
            "select coalesce(restart_lsn >= '{lsn}', false) from pg_replication_slots where slot_name = '{slot}'"
        ));
        if r == "t" {
            return;
        }
        assert!(Instant::now() < deadline, "slot {slot} did not reach {lsn}: {r}\n{}", streamer.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Inserts rows `from..to` into `t`, one transaction each, a little apart, and
/// returns their commit times.
fn commit_rows(pg: &Pg, from: u32, to: u32, pause: Duration) -> Vec<(u32, Timestamp)> {
    for i in from..to {
        pg.sql(&format!("insert into t values ({i}, repeat('x', 200))"));
        std::thread::sleep(pause);
    }
    commit_times(pg, from, to)
}

fn commit_times(pg: &Pg, from: u32, to: u32) -> Vec<(u32, Timestamp)> {
    let out = pg.sql(&format!(
        "select id, to_char(pg_xact_commit_timestamp(xmin) at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') \
         from t where id >= {from} and id < {to} order by id"
    ));
    out.lines()
        .map(|l| {
            let (id, ts) = l.split_once('|').unwrap();
            (id.parse().unwrap(), ts.parse().unwrap())
        })
        .collect()
}

/// The table the tests commit to, with rows 0 to 9 from before any backup: every
/// restore holds them (the `0..10` the checks expect).
fn seed(pg: &Pg) {
    pg.sql("create table t (id int primary key, pad text)");
    pg.sql("insert into t select g, 'before' from generate_series(0, 9) g");
}

/// The ids in `t` of a restored server.
fn ids(pg: &Pg) -> Vec<u32> {
    pg.sql("select id from t order by id").lines().map(|l| l.parse().unwrap()).collect()
}

/// The ids committed at or before `at`.
fn expected(commits: &[(u32, Timestamp)], at: Timestamp) -> Vec<u32> {
    commits.iter().filter(|(_, t)| *t <= at).map(|(i, _)| *i).collect()
}

fn micro(t: Timestamp, delta: i64) -> Timestamp {
    Timestamp::from_microsecond(t.as_microsecond() + delta).unwrap()
}

/// Restores at several moments between commits, at a commit's exact microsecond
/// and one before it, and after the last, and checks each against the commit times.
fn check_moments(s: &Setup, source: &str, commits: &[(u32, Timestamp)], env: &[(String, String)]) {
    let n = commits.len();
    let mid = |a: Timestamp, b: Timestamp| {
        Timestamp::from_microsecond((a.as_microsecond() + b.as_microsecond()) / 2).unwrap()
    };
    let moments = [
        mid(commits[n / 4].1, commits[n / 4 + 1].1),
        commits[n / 2].1,
        micro(commits[n / 2].1, -1),
        mid(commits[n - 2].1, commits[n - 1].1),
        micro(commits[n - 1].1, 500_000),
    ];
    for at in moments {
        let pg = s.restore(source, &at.to_string(), env.to_vec());
        let got = ids(&pg);
        let want: Vec<u32> = (0..10).chain(expected(commits, at)).collect();
        assert_eq!(got, want, "restored at {at}\n{}", pg.log());
    }
}

#[test]
fn stream_pg_restores_exactly_the_transactions_committed_by_t() {
    let _serial = serial();
    let s = Setup::new(Backend::File);
    let pg = Pg::init(&s.path("primary"), "");
    seed(&pg);
    let streamer = Streamer::start(&s, &pg, "db", &[]);
    let out = s.ok(&["pg", "base-backup", "--source", "db", "--dsn", &pg.dsn()]);
    assert!(out.contains("base backup"), "{out}");
    let commits = commit_rows(&pg, 100, 140, Duration::from_millis(30));
    wait_slot_caught_up(&pg, "ebb_db", &streamer);
    // `ebb status` shows the stream, caught up; `ebb points` the base backup and
    // the restorable range, up to the WAL just streamed.
    let status = s.ok(&["status", "--json", "--state-dir", s.path("state").to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!((v[0]["source"].as_str(), v[0]["kind"].as_str()), (Some("db"), Some("pg")), "{v}");
    assert!(v[0]["lag_secs"].as_f64().unwrap() < 5.0 && v[0]["breached"] == false, "{v}");
    let points = s.ok(&["points", "--source", "db"]);
    assert!(points.contains("base backup, timeline 1"), "{points}");
    let range = points.lines().find(|l| l.starts_with("db: restorable from")).unwrap_or_default();
    let to: Timestamp = range.split(" to ").nth(1).and_then(|r| r.split(' ').next()).unwrap().parse().unwrap();
    assert!(to >= commits.last().unwrap().1, "{points}");
    check_moments(&s, "db", &commits, &[]);

    // A second base backup of a mostly unchanged database stores little.
    let out = s.ok(&["pg", "base-backup", "--source", "db", "--dsn", &pg.dsn()]);
    let added = out.rsplit(", ").next().unwrap_or_default().to_string();
    assert!(added.contains("KiB") || added.ends_with(" B added\n"), "second base backup added too much: {out}");
}

#[test]
fn stream_pg_takes_a_base_backup_every_interval() {
    let _serial = serial();
    let s = Setup::new(Backend::File);
    let pg = Pg::init(&s.path("primary"), "");
    seed(&pg);
    let streamer = Streamer::start(&s, &pg, "db", &["--base-backup-every", "2s"]);
    // One base backup when the stream starts, then one every 2 s.
    let base_backups = || s.ok(&["points", "--source", "db"]).matches("base backup, timeline 1").count();
    let deadline = Instant::now() + Duration::from_secs(120);
    while base_backups() < 3 {
        assert!(Instant::now() < deadline, "fewer than 3 base backups after 120 s\n{}", streamer.log());
        std::thread::sleep(Duration::from_millis(250));
    }
    let commits = commit_rows(&pg, 100, 110, Duration::from_millis(30));
    wait_slot_caught_up(&pg, "ebb_db", &streamer);
    // The newest base backup and the WAL after it give every row.
    let (_, last) = *commits.last().unwrap();
    let restored = s.restore("db", &last.to_string(), Vec::new());
    assert_eq!(ids(&restored), (0..10).chain(100..110).collect::<Vec<u32>>(), "{}", restored.log());
}

/// The WAL of each base backup named by `ebb points`: `(start, stop)` positions.
fn base_backup_wal(s: &Setup, source: &str) -> Vec<(u64, u64)> {
    let lsn = |t: &str| {
        let (hi, lo) = t.split_once('/').unwrap();
        (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
    };
    let points = s.ok(&["points", "--source", source]);
    points
        .lines()
        .filter(|l| l.contains("base backup, timeline"))
        .filter_map(|l| l.split("WAL ").nth(1))
        .map(|w| {
            let (a, b) = w.split_once("..").unwrap();
            (lsn(a), lsn(b.split_whitespace().next().unwrap()))
        })
        .collect()
}

/// The WAL pieces stored for `source` on timeline 1: `(start, end)` of each.
fn wal_pieces(s: &Setup, source: &str) -> Vec<(u64, u64)> {
    let dir = format!("wal/{source}/00000001/");
    let mut out: Vec<(u64, u64)> = s
        .repo
        .objects()
        .into_iter()
        .filter_map(|o| {
            let (a, b) = o.strip_prefix(&dir)?.split_once('-')?;
            Some((u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?))
        })
        .collect();
    out.sort();
    out
}

/// Issue 18: the stream stores each segment it received from its first byte whole
/// too, once its pieces are durable; forget and prune of a PostgreSQL source
/// delete the WAL no kept base backup needs and the pieces a whole segment holds,
/// while the stream goes on; every moment after the kept base backup still
/// restores exactly, a moment before it is refused clearly, and `verify
/// --read-data` passes.
#[test]
fn prune_deletes_the_wal_no_kept_base_backup_needs_and_merges_segments() {
    const SEG: u64 = 16 << 20;
    let _serial = serial();
    let s = Setup::with_repo(TestRepo::new(Backend::File).with_env("EBB_GRACE", "3s"));
    let pg = Pg::init(&s.path("primary"), "");
    seed(&pg);
    let streamer = Streamer::start(&s, &pg, "db", &[]);
    s.ok(&["pg", "base-backup", "--source", "db", "--dsn", &pg.dsn()]);
    let early = commit_rows(&pg, 100, 110, Duration::from_millis(20));
    for i in 0..2 {
        pg.sql("select pg_switch_wal()");
        commit_rows(&pg, 110 + i, 111 + i, Duration::ZERO);
    }
    s.ok(&["pg", "base-backup", "--source", "db", "--dsn", &pg.dsn()]);
    let mut commits = commit_rows(&pg, 200, 215, Duration::from_millis(30));
    pg.sql("select pg_switch_wal()");
    commits.extend(commit_rows(&pg, 215, 230, Duration::from_millis(30)));
    wait_slot_caught_up(&pg, "ebb_db", &streamer);

    let bases = base_backup_wal(&s, "db");
    assert_eq!(bases.len(), 2, "{bases:?}");
    let kept_start = bases.iter().map(|b| b.0).max().unwrap();
    let mut before = wal_pieces(&s, "db");
    let last_segment = before.iter().map(|p| (p.1 - 1) / SEG).max().unwrap();
    let first_segment = before.iter().map(|p| p.0 / SEG).min().unwrap();
    // Every segment the stream received from its first byte, but the one it
    // receives now, is stored whole (put once its pieces are durable: soon after).
    let whole = |pieces: &[(u64, u64)], seg: u64| pieces.contains(&(seg * SEG, (seg + 1) * SEG));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(first_segment + 1..last_segment).all(|seg| whole(&before, seg)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        before = wal_pieces(&s, "db");
    }
    assert!(last_segment > first_segment + 2, "segments streamed: {first_segment} to {last_segment}");
    for seg in first_segment + 1..last_segment {
        assert!(whole(&before, seg), "segment {seg} is not stored whole: {before:x?}");
    }
    assert!(
        before.iter().filter(|p| p.1 <= kept_start).count() > 1,
        "WAL before the kept base backup, in pieces: {before:?}"
    );

    s.ok(&["policy", "set", "--source", "db", "--keep-last", "1"]);
    s.ok(&["forget"]);
    let first: serde_json::Value = serde_json::from_str(&s.ok(&["prune", "--json"])).unwrap();
    assert!(first["condemned_wal_pieces"].as_u64().unwrap() > 0, "{first}");
    std::thread::sleep(Duration::from_secs(4));
    let second: serde_json::Value = serde_json::from_str(&s.ok(&["prune", "--json"])).unwrap();
    assert_eq!(second["deleted_wal_pieces"], first["condemned_wal_pieces"], "{second}");

    let after = wal_pieces(&s, "db");
    eprintln!("WAL pieces: {} before prune, {} after", before.len(), after.len());
    assert!(after.len() < before.len(), "{} pieces before, {} after", before.len(), after.len());
    let kept_segment = kept_start / SEG;
    for p in &after {
        assert!(p.1 > kept_start, "a piece before the kept base backup's start is left: {p:x?}");
        let segment = p.0 / SEG;
        if segment > kept_segment && segment < last_segment {
            assert_eq!((p.0 % SEG, p.1 - p.0), (0, SEG), "a finished segment in one piece: {after:x?}");
        }
    }
    // The stream went on meanwhile; every moment after the kept base backup
    // restores exactly, and one before it is refused as such.
    commits.extend(commit_rows(&pg, 230, 235, Duration::from_millis(30)));
    wait_slot_caught_up(&pg, "ebb_db", &streamer);
    let n = commits.len();
    for at in [commits[0].1, micro(commits[n / 2].1, -1), commits[n / 2].1, micro(commits[n - 1].1, 500_000)] {
        let restored = s.restore("db", &at.to_string(), Vec::new());
        // Rows 100 to 111 were committed before the kept base backup.
        let want: Vec<u32> = (0..10).chain(100..112).chain(expected(&commits, at)).collect();
        assert_eq!(ids(&restored), want, "restored at {at}\n{}", restored.log());
    }
    let out = s.run(&["pg", "restore", "--source", "db", "--at", &early[5].1.to_string(), "/nonexistent/x"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("earliest moment"), "{err}");
    s.ok(&["verify", "--read-data"]);
}

/// The points of `source`, oldest first: `(time, path)` of each.
fn points_of(s: &Setup, source: &str) -> Vec<(Timestamp, String)> {
    let out = s.ok(&["points", "--source", source, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut points: Vec<(Timestamp, String)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["time"].as_str().unwrap().parse().unwrap(), p["path"].as_str().unwrap_or("").to_string()))
        .collect();
    points.sort();
    points
}

/// When `ebb stream dir` says everything up to now is durable.
fn wait_dir_durable(s: &Setup, state: &std::path::Path, after: Timestamp) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // Exit 1 says the stream is behind its RPO: the state is there all the same.
        let out = s.run(&["status", "--json", "--state-dir", state.to_str().unwrap()]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if v[0]["durable_as_of"].as_str().and_then(|t| t.parse::<Timestamp>().ok()).is_some_and(|d| d > after) {
            return;
        }
        assert!(Instant::now() < deadline, "stream dir made nothing durable after {after}: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Issue 18, the test that matters most. While `ebb stream dir` (a tree whose
/// files change, and a log that grows), `ebb stream pg` (under pgbench, a base
/// backup every 5 s) and repeated `ebb backup` of trees that share content with
/// it and with each other all write to one repository, `forget` and `prune` with
/// an aggressive policy run 20 times, then 10 more times killed with -9 at random
/// moments. Afterwards `verify --read-data` passes; every kept backup restores
/// exactly the tree it was taken of; every moment of the stream's `pitr_within`
/// window restores the tree of that moment; PITR at moments of the database's
/// window is exact.
fn lifecycle_under_concurrent_writers(backend: Backend) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    let _serial = serial();
    // A short grace, and so a short life for writers' views: S3 (moto on this
    // loaded host) answers more slowly.
    let grace = if backend == Backend::S3 { "6s" } else { "3s" };
    let s = Setup::with_repo(TestRepo::new(backend).with_env("EBB_GRACE", grace));
    let pg = Pg::init(&s.path("primary"), "");
    seed(&pg);
    let bench = |args: &[&str]| {
        let mut c = common::pg::as_postgres(&common::pg::bin("pgbench"));
        c.args(["-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", "postgres"]).args(args).arg("postgres");
        c.env("PGPASSWORD", PASSWORD).stdout(Stdio::null()).stderr(Stdio::null());
        c
    };
    assert!(bench(&["-i", "-s", "2", "-q"]).status().unwrap().success(), "pgbench -i");
    let streamer = Streamer::start(&s, &pg, "db", &["--base-backup-every", "5s"]);
    s.ok(&["policy", "set", "--source", "db", "--keep-last", "2", "--pitr-within", "20s"]);
    s.ok(&["policy", "set", "--source", "web", "--keep-last", "2", "--pitr-within", "15s"]);
    s.ok(&["policy", "set", "--source", "b", "--keep-last", "3"]);

    // Content the stream and the backups share: block k of a family.
    let block = |k: u64| pseudo_random_bytes(k % 23, 40_000 + (k % 23) as usize * 1000);
    let web = s.path("web");
    std::fs::create_dir_all(web.join("data")).unwrap();
    std::fs::write(web.join("app.log"), b"start\n").unwrap();
    let dir_state = s.path("dir-state");
    let mut dir_stream = s
        .cmd()
        .args(["stream", "dir", "--source", "web", "--rpo", "2s", "--append-interval", "1s", "--state-dir"])
        .arg(&dir_state)
        .arg(&web)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(s.path("stream-dir.log")).unwrap())
        .spawn()
        .unwrap();
    let mut pgbench = bench(&["-c", "2", "-R", "40", "-T", "600"]).spawn().unwrap();

    let stop = AtomicBool::new(false);
    let moments: Mutex<Vec<(Timestamp, PathBuf)>> = Mutex::new(Vec::new());
    // Backups saved, and refused for a stall.
    let snaps = Mutex::new((0u64, 0u64));
    let mut killed = 0;
    std::thread::scope(|scope| {
        // The stream's tree changes; a copy of it at each moment it is durable.
        scope.spawn(|| {
            let mut round = 0u64;
            while !stop.load(Ordering::SeqCst) {
                std::fs::write(web.join(format!("data/f{}", round % 7)), block(round)).unwrap();
                let _ = std::fs::remove_file(web.join(format!("data/f{}", (round + 3) % 7)));
                let mut log = std::fs::OpenOptions::new().append(true).open(web.join("app.log")).unwrap();
                std::io::Write::write_all(&mut log, format!("round {round}\n").repeat(20).as_bytes()).unwrap();
                drop(log);
                wait_dir_durable(&s, &dir_state, Timestamp::now());
                let t = Timestamp::now();
                let copy = s.path(&format!("web-at-{round}"));
                let st = Command::new("cp").arg("-a").arg(&web).arg(&copy).status().unwrap();
                assert!(st.success());
                moments.lock().unwrap().push((t, copy));
                std::thread::sleep(Duration::from_millis(300));
                round += 1;
            }
        });
        // Backups of trees that share blocks with the stream and each other.
        scope.spawn(|| {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let snap = s.path(&format!("snap-{i}"));
                std::fs::create_dir_all(snap.join("shared")).unwrap();
                for k in i..i + 4 {
                    std::fs::write(snap.join(format!("shared/b{k}")), block(k)).unwrap();
                }
                std::fs::write(snap.join("own"), pseudo_random_bytes(1000 + i, 30_000)).unwrap();
                let out = s.run(&["backup", "--source", "b", snap.to_str().unwrap()]);
                if out.status.success() {
                    snaps.lock().unwrap().0 += 1;
                } else {
                    // A writer slower than its view may live (the grace is short
                    // here) commits nothing, and says to run it again.
                    let err = String::from_utf8_lossy(&out.stderr);
                    assert!(err.contains("while it was stalled"), "backup failed: {err}");
                    snaps.lock().unwrap().1 += 1;
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        // Commits whose times PITR is checked against.
        scope.spawn(|| {
            let mut id = 100;
            while !stop.load(Ordering::SeqCst) {
                pg.sql(&format!("insert into t values ({id}, 'x')"));
                id += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
        });

        let mut rng = common::XorShift::new(0x5eed);
        let mut deleted = [("deleted_packs", 0u64), ("deleted_wal_pieces", 0)];
        // Points written again by repacking, under the writers.
        let mut repacked = 0;
        // The shortest forget and prune of the first 20 runs: the kills below
        // land within them, so mid-way whatever speed this host runs at.
        let (mut forget_took, mut prune_took) = (Duration::MAX, Duration::MAX);
        for run in 0..30 {
            std::thread::sleep(Duration::from_millis(300 + rng.next_u64() % 700));
            if run < 20 {
                let started = Instant::now();
                s.ok(&["forget"]);
                forget_took = forget_took.min(started.elapsed());
                let started = Instant::now();
                let r: serde_json::Value = serde_json::from_str(&s.ok(&["prune", "--json"])).unwrap();
                prune_took = prune_took.min(started.elapsed());
                for (key, sum) in deleted.iter_mut() {
                    *sum += r[*key].as_u64().unwrap();
                }
                repacked += r["repack"]["rewritten_points"].as_u64().unwrap();
                continue;
            }
            // Killed at a random moment, in forget or in prune.
            let (what, took): (&[&str], _) =
                if run % 2 == 0 { (&["forget"], forget_took) } else { (&["prune"], prune_took) };
            let within = (took.as_micros() as u64 * 9 / 10).max(1);
            let mut child = s.cmd().args(what).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
            std::thread::sleep(Duration::from_micros(rng.next_u64() % within));
            if child.try_wait().unwrap().is_none() {
                killed += 1;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        stop.store(true, Ordering::SeqCst);
        eprintln!(
            "deleted while the writers wrote: {deleted:?}; {repacked} points repacked; \
             shortest forget {forget_took:?}, prune {prune_took:?}"
        );
        for (key, sum) in deleted {
            assert!(sum > 0, "no {key} in 20 runs");
        }
        assert!(repacked > 0, "no point repacked in 20 runs");
    });
    let _ = pgbench.kill();
    let _ = pgbench.wait();
    wait_slot_caught_up(&pg, "ebb_db", &streamer);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(dir_stream.id() as i32, libc::SIGTERM) };
    assert!(dir_stream.wait().unwrap().success(), "{}", std::fs::read_to_string(s.path("stream-dir.log")).unwrap());
    drop(streamer);
    let (saved, stalled) = *snaps.lock().unwrap();
    eprintln!(
        "{} moments, {saved} backups ({stalled} refused for a stall), {killed} of 10 runs killed before they ended",
        moments.lock().unwrap().len(),
    );
    assert!(saved > 10 * stalled.max(1), "too many backups stalled: {saved} saved, {stalled} refused");
    assert!(killed >= 5, "too few runs were killed mid-way: {killed}");

    // What the last runs condemned is swept by runs after the grace.
    s.ok(&["forget"]);
    let pause = Duration::from_secs(if backend == Backend::S3 { 7 } else { 4 });
    for _ in 0..2 {
        s.ok(&["prune"]);
        std::thread::sleep(pause);
    }
    let last: serde_json::Value = serde_json::from_str(&s.ok(&["prune", "--json"])).unwrap();
    assert!(last["problems"].as_array().unwrap().is_empty(), "{last}");
    s.ok(&["verify", "--read-data"]);

    // Every kept backup is the tree it was taken of.
    let kept = points_of(&s, "b");
    assert_eq!(kept.len(), 3, "{kept:?}");
    for (i, (t, path)) in kept.iter().enumerate() {
        let out = s.path(&format!("restored-b-{i}"));
        s.ok(&["restore", "--source", "b", "--at", &t.to_string(), out.to_str().unwrap()]);
        common::assert_trees_equal(std::path::Path::new(path), &out);
    }
    // Every moment of the stream's window is the tree of that moment.
    let web_points = points_of(&s, "web");
    let newest = web_points.last().unwrap().0;
    let older = web_points.iter().filter(|(t, _)| *t < newest - jiff::SignedDuration::from_secs(15)).count();
    assert!(older <= 1, "only the point the window starts from is older: {web_points:?}");
    let window_start = newest - jiff::SignedDuration::from_secs(14);
    let moments = moments.into_inner().unwrap();
    let in_window: Vec<&(Timestamp, PathBuf)> = moments.iter().filter(|(t, _)| *t >= window_start).collect();
    assert!(in_window.len() >= 3, "{} moments in the window", in_window.len());
    for (i, (t, copy)) in in_window.iter().enumerate() {
        let out = s.path(&format!("restored-web-{i}"));
        s.ok(&["restore", "--source", "web", "--at", &t.to_string(), out.to_str().unwrap()]);
        common::assert_trees_equal(copy, &out);
    }
    // PITR in the database's window is exact.
    let commits = commit_times(&pg, 100, 1_000_000);
    let bases = points_of(&s, "db");
    assert!(bases.len() >= 2, "{bases:?}");
    let newest_base = bases.last().unwrap().0;
    // The window reaches back 18 s, or to the first base backup when the stream
    // is younger than that.
    let from = (newest_base - jiff::SignedDuration::from_secs(18)).max(bases[0].0);
    let candidates: Vec<Timestamp> = commits.iter().map(|c| c.1).filter(|t| *t >= from).collect();
    assert!(candidates.len() > 10, "{} commits in the window", candidates.len());
    let n = candidates.len();
    let env = if backend == Backend::S3 { s3_env(&s.repo) } else { Vec::new() };
    for at in [candidates[0], micro(candidates[n / 2], -1), candidates[n - 1]] {
        let restored = s.restore("db", &at.to_string(), env.clone());
        let want: Vec<u32> = (0..10).chain(expected(&commits, at)).collect();
        assert_eq!(ids(&restored), want, "restored at {at}\n{}", restored.log());
    }
}

#[test]
fn lifecycle_under_concurrent_writers_on_file() {
    lifecycle_under_concurrent_writers(Backend::File);
}

#[test]
fn lifecycle_under_concurrent_writers_on_s3() {
    lifecycle_under_concurrent_writers(Backend::S3);
}

/// The AWS variables `TestRepo::cmd` sets for an `s3://` repository, for servers
/// whose archive_command or restore_command runs ebb.
fn s3_env(repo: &TestRepo) -> Vec<(String, String)> {
    let c = repo.cmd();
    c.get_envs()
        .filter_map(|(k, v)| Some((k.to_str()?.to_string(), v?.to_str()?.to_string())))
        .filter(|(k, _)| k.starts_with("AWS_"))
        .collect()
}

/// A server in `dir` whose `archive_command` is `push`, run with `env` (the
/// archiver runs ebb with the server's environment).
fn archiving_server(dir: &std::path::Path, push: &str, env: &[(String, String)]) -> Pg {
    let mut pg = Pg::init(dir, "");
    pg.stop();
    pg.env = env.to_vec();
    let conf = pg.data.join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str(&format!("archive_mode = on\narchive_command = '{push}'\n"));
    std::fs::write(&conf, text).unwrap();
    pg.start();
    pg
}

/// A moto server of the test's own, which it can freeze and thaw.
struct Moto {
    child: Child,
    endpoint: String,
}

impl Moto {
    fn start() -> Moto {
        let server = std::env::var_os("EBB_TEST_MOTO_SERVER")
            .expect("EBB_TEST_MOTO_SERVER must name moto_server (scripts/test sets it)");
        let port = common::pg::free_port();
        let child = Command::new(server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto { child, endpoint: format!("http://127.0.0.1:{port}") }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    /// Turns on versioning and IAM in this server (`tests/common/moto_iam.py`):
    /// returns the credentials of a host that may list, get and put but not
    /// delete, and of an administrator.
    fn enforce_iam(&self) -> (Credentials, Credentials) {
        let out = Command::new(moto_python())
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/common/moto_iam.py"))
            .args([&self.endpoint, common::s3::S3_BUCKET, "setup"])
            .output()
            .unwrap();
        check_exit("moto_iam.py setup", &out, 0);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let creds = |who: &str| Credentials {
            id: v[who][0].as_str().unwrap().to_string(),
            secret: v[who][1].as_str().unwrap().to_string(),
        };
        (creds("host"), creds("admin"))
    }

    /// How many versions each object has, and the objects deleted.
    fn versions(&self, admin: &Credentials) -> (std::collections::BTreeMap<String, u64>, Vec<String>) {
        let out = Command::new(moto_python())
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/common/moto_iam.py"))
            .args([&self.endpoint, common::s3::S3_BUCKET, "versions", &admin.id, &admin.secret])
            .output()
            .unwrap();
        check_exit("moto_iam.py versions", &out, 0);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            serde_json::from_value(v["versions"].clone()).unwrap(),
            serde_json::from_value(v["delete_markers"].clone()).unwrap(),
        )
    }
}

/// An S3 access key.
struct Credentials {
    id: String,
    secret: String,
}

/// The python of moto's virtualenv, beside `moto_server`.
fn moto_python() -> PathBuf {
    let server = std::env::var_os("EBB_TEST_MOTO_SERVER")
        .expect("EBB_TEST_MOTO_SERVER must name moto_server (scripts/test sets it)");
    PathBuf::from(server).with_file_name("python")
}

/// Issue 18: hosts hold credentials that cannot delete, and S3 versioning shows
/// whether anything was overwritten. With them, `backup`, `stream dir` (with a
/// log), `stream pg` with a base backup, and PostgreSQL's `archive-push` all work,
/// and restores and PITR are exact; no object ever gets a second version or a
/// delete marker. `forget` with such a key says what it needs; with a key that
/// may delete, forget and prune work.
#[test]
fn hosts_without_delete_rights_back_up_stream_and_archive() {
    let _serial = serial();
    let moto = Moto::start();
    let repo = TestRepo::new_s3_at(&moto.endpoint);
    let (host, admin) = moto.enforce_iam();
    let repo = repo
        .with_env("AWS_ACCESS_KEY_ID", &host.id)
        .with_env("AWS_SECRET_ACCESS_KEY", &host.secret)
        .with_env("EBB_GRACE", "3s");
    let s = Setup::with_repo(repo);

    // Backups that share content.
    let src = s.path("tree");
    common::build_fidelity_tree(&src);
    s.ok(&["backup", "--source", "files", src.to_str().unwrap()]);
    std::fs::write(src.join("added"), b"a file of the second backup").unwrap();
    s.ok(&["backup", "--source", "files", src.to_str().unwrap()]);

    // A stream of a directory with a log that grows.
    let logs = s.path("logs");
    std::fs::create_dir(&logs).unwrap();
    std::fs::write(logs.join("app.log"), b"first line\n").unwrap();
    let state = s.path("dir-state");
    let mut stream = s
        .cmd()
        .args(["stream", "dir", "--source", "logs", "--rpo", "2s", "--append-interval", "1s", "--state-dir"])
        .arg(&state)
        .arg(&logs)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let mut log = std::fs::OpenOptions::new().append(true).open(logs.join("app.log")).unwrap();
    std::io::Write::write_all(&mut log, b"second line\n").unwrap();
    let appended = Timestamp::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = s.ok(&["status", "--json", "--state-dir", state.to_str().unwrap()]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let durable = v[0]["durable_as_of"].as_str().and_then(|t| t.parse::<Timestamp>().ok());
        if durable.is_some_and(|d| d > appended) {
            break;
        }
        if let Ok(Some(status)) = stream.try_wait() {
            let mut err = String::new();
            std::io::Read::read_to_string(stream.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("stream dir exited with {status}: {err}");
        }
        assert!(Instant::now() < deadline, "the stream never made the log durable: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(stream.id() as i32, libc::SIGTERM) };
    let out = stream.wait_with_output().unwrap();
    assert!(out.status.success(), "stream dir: {}", String::from_utf8_lossy(&out.stderr));

    // PostgreSQL: streamed, a base backup, and archived by archive_command.
    let push = format!("{} --key-file {} pg archive-push --source arch %p", s.ebb.display(), s.key.display());
    let mut env = s3_env(&s.repo);
    env.push(("EBB_REPOSITORY".into(), s.repo.url().to_string()));
    env.push(("EBB_GRACE".into(), "3s".into()));
    let pg = archiving_server(&s.path("primary"), &push, &env);
    seed(&pg);
    let streamer = Streamer::start(&s, &pg, "db", &[]);
    s.ok(&["pg", "base-backup", "--source", "db", "--dsn", &pg.dsn()]);
    s.ok(&["pg", "base-backup", "--source", "arch", "--dsn", &pg.dsn()]);
    let commits = commit_rows(&pg, 100, 120, Duration::from_millis(30));
    let last = pg.sql("select pg_walfile_name(pg_switch_wal())");
    pg.wait_for(
        "the archiver",
        &format!("select coalesce(last_archived_wal >= '{last}', false) from pg_stat_archiver"),
        Duration::from_secs(60),
    );
    wait_slot_caught_up(&pg, "ebb_db", &streamer);
    drop(streamer);

    // Nothing was overwritten or deleted, whatever each writer tried.
    let (versions, deleted) = moto.versions(&admin);
    assert!(versions.len() > 20, "{versions:?}");
    let twice: Vec<&String> = versions.iter().filter(|(_, n)| **n > 1).map(|(k, _)| k).collect();
    assert!(twice.is_empty(), "overwritten: {twice:?}");
    assert!(deleted.is_empty(), "deleted: {deleted:?}");

    // What they wrote restores exactly, read with the same key.
    let out = s.path("restored-tree");
    s.ok(&["restore", "--source", "files", "--at", "latest", out.to_str().unwrap()]);
    common::assert_trees_equal(&src, &out);
    let out = s.path("restored-logs");
    s.ok(&["restore", "--source", "logs", "--at", "latest", out.to_str().unwrap()]);
    assert_eq!(std::fs::read(out.join("app.log")).unwrap(), b"first line\nsecond line\n");
    let at = commits[commits.len() / 2].1;
    for source in ["db", "arch"] {
        let restored = s.restore(source, &at.to_string(), env.clone());
        assert_eq!(ids(&restored), (0..10).chain(expected(&commits, at)).collect::<Vec<u32>>(), "{source}");
    }

    // Forget needs a key that may delete, and says so; with one, forget and prune
    // delete.
    s.ok(&["policy", "set", "--source", "files", "--keep-last", "1"]);
    let out = s.run(&["forget"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("need credentials that may delete"), "{err}");
    let as_admin = |args: &[&str]| {
        let mut c = s.cmd();
        c.env("AWS_ACCESS_KEY_ID", &admin.id).env("AWS_SECRET_ACCESS_KEY", &admin.secret).args(args);
        let out = c.output().unwrap();
        check_exit(&format!("ebb {} (administrator)", args.join(" ")), &out, 0);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    as_admin(&["forget"]);
    as_admin(&["prune"]);
    std::thread::sleep(Duration::from_secs(4));
    let pruned: serde_json::Value = serde_json::from_str(&as_admin(&["prune", "--json"])).unwrap();
    // The second backup holds all the first one did, so the forgotten point frees
    // no pack; the WAL archived from before the base backups goes.
    assert!(pruned["deleted_wal_pieces"].as_u64().unwrap() > 0, "{pruned}");
    let points = s.ok(&["points", "--source", "files"]);
    assert_eq!(points.lines().filter(|l| l.contains(" files ")).count(), 1, "{points}");
    let (_, deleted) = moto.versions(&admin);
    assert!(deleted.iter().any(|k| k.contains("/points/files/")), "{deleted:?}");
    s.ok(&["verify", "--read-data"]);
}

#[test]
fn archive_push_and_get_restore_exactly_and_refuse_a_different_segment() {
    let _serial = serial();
    let s = Setup::new(Backend::S3);
    // Pushing ahead: the next ready segments go with each call, noted in a
    // directory of the archiver's own.
    let pushed = s.path("pushed");
    std::fs::create_dir(&pushed).unwrap();
    assert!(Command::new("chown").arg("postgres").arg(&pushed).status().unwrap().success());
    let push = format!(
        "{} --key-file {} pg archive-push --source arch --state-dir {} %p",
        s.ebb.display(),
        s.key.display(),
        pushed.display()
    );
    let mut env = s3_env(&s.repo);
    env.push(("EBB_REPOSITORY".into(), s.repo.url().to_string()));
    let dir = s.path("primary");
    let pg = archiving_server(&dir, &push, &env);
    seed(&pg);
    s.ok(&["pg", "base-backup", "--source", "arch", "--dsn", &pg.dsn()]);
    let commits = commit_rows(&pg, 100, 124, Duration::from_millis(30));
    let last = pg.sql("select pg_walfile_name(pg_switch_wal())");
    pg.wait_for(
        "the archiver",
        &format!("select coalesce(last_archived_wal >= '{last}', false) from pg_stat_archiver"),
        Duration::from_secs(60),
    );
    check_moments(&s, "arch", &commits, &env);

    // archive-get of a segment that is not there: exit 1, PostgreSQL's "not found".
    let dest = s.path("got");
    let out = s.run(&["pg", "archive-get", "--source", "arch", "0000000100000009000000AA", dest.to_str().unwrap()]);
    check_exit("archive-get of a missing segment", &out, 1);
    // The same segment again: success; other bytes under its name: refused.
    let seg = s.path(&last);
    s.ok(&["pg", "archive-get", "--source", "arch", &last, seg.to_str().unwrap()]);
    let out = s.run(&["pg", "archive-push", "--source", "arch", seg.to_str().unwrap()]);
    check_exit("archive-push of the same segment again", &out, 0);
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[100_000] ^= 0xff;
    std::fs::write(&seg, &bytes).unwrap();
    let out = s.run(&["pg", "archive-push", "--source", "arch", seg.to_str().unwrap()]);
    check_exit("archive-push of a different segment under the same name", &out, 1);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("different content"), "{err}");
    // The same through the background pusher: a segment marked ready, as
    // PostgreSQL marks it. The pusher's failure is the call's failure.
    let wal = s.path("wal");
    std::fs::create_dir_all(wal.join("archive_status")).unwrap();
    std::fs::write(wal.join(&last), &bytes).unwrap();
    std::fs::write(wal.join("archive_status").join(format!("{last}.ready")), b"").unwrap();
    let state = s.path("pusher-state");
    let out = s.run(&[
        "pg",
        "archive-push",
        "--source",
        "arch",
        "--state-dir",
        state.to_str().unwrap(),
        wal.join(&last).to_str().unwrap(),
    ]);
    check_exit("archive-push of a different segment, through the pusher", &out, 1);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("different content"), "{err}");
    // And what is stored did not change.
    let again = s.path("again");
    s.ok(&["pg", "archive-get", "--source", "arch", &last, again.to_str().unwrap()]);
    bytes[100_000] ^= 0xff;
    assert!(std::fs::read(&again).unwrap() == bytes, "the stored segment changed");
    // Pushers exit once nothing has been ready for a while: none is left behind.
    let start = std::time::Instant::now();
    loop {
        let left = Command::new("pgrep").args(["-f", "archive-push.*--pusher"]).output().unwrap();
        if !left.status.success() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "a pusher is still running: {left:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn clear_errors_for_bad_connections_privileges_wal_level_and_a_lost_slot() {
    let _serial = serial();
    let s = Setup::new(Backend::File);
    let pg = Pg::init(&s.path("primary"), "max_slot_wal_keep_size = 32MB\nmax_wal_size = 64MB");
    let stream = |dsn: &str, password: &str| {
        let out = s
            .cmd()
            .env("PGPASSWORD", password)
            .args(["stream", "pg", "--source", "e", "--dsn", dsn, "--state-dir"])
            .arg(s.path("state"))
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let closed = common::pg::free_port();
    let (code, err) = stream(&format!("host=127.0.0.1 port={closed} user=postgres"), PASSWORD);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot connect") && err.contains(&closed.to_string()), "{err}");
    let (code, err) = stream("host=127.0.0.1 port=notaport", PASSWORD);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--dsn"), "{err}");
    let (code, err) = stream(&pg.dsn(), "wrong");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("password authentication failed"), "{err}");
    pg.sql("create role norep login password 'norep'");
    let (code, err) = stream(&format!("host=127.0.0.1 port={} user=norep dbname=postgres", pg.port), "norep");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("REPLICATION"), "{err}");

    // wal_level too low: no WAL senders at all.
    let mut low = Pg::init(&s.path("minimal"), "wal_level = minimal\nmax_wal_senders = 0");
    let (code, err) = stream(&low.dsn(), PASSWORD);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("wal_level") && err.contains("max_wal_senders"), "{err}");
    low.stop();

    // A slot PostgreSQL invalidated while the stream was away.
    let mut streamer = Streamer::start(&s, &pg, "e", &[]);
    s.ok(&["pg", "base-backup", "--source", "e", "--dsn", &pg.dsn()]);
    wait_slot_caught_up(&pg, "ebb_e", &streamer);
    streamer.kill9();
    pg.sql("create table w (x text)");
    for _ in 0..6 {
        pg.sql("insert into w select repeat('z', 1000) from generate_series(1, 3000)");
        pg.sql("select pg_switch_wal()");
    }
    pg.sql("checkpoint");
    pg.wait_for(
        "the slot to be invalidated",
        "select wal_status = 'lost' from pg_replication_slots where slot_name = 'ebb_e'",
        Duration::from_secs(30),
    );
    let (code, err) = stream(&pg.dsn(), PASSWORD);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("invalidated") && err.contains("pg_drop_replication_slot"), "{err}");
    // Once the slot is recreated, the WAL PostgreSQL removed is a gap, shown as one.
    pg.sql("select pg_drop_replication_slot('ebb_e')");
    let streamer = Streamer::start(&s, &pg, "e", &[]);
    pg.sql("insert into w values ('after')");
    wait_slot_caught_up(&pg, "ebb_e", &streamer);
    let out = s.ok(&["points", "--source", "e"]);
    assert!(out.contains("e: restorable from") && out.contains("GAP in the WAL of timeline 1"), "{out}");
    assert!(streamer.log().contains("gap"), "{}", streamer.log());
}

#[test]
fn pitr_works_on_both_timelines_after_a_restored_copy_is_promoted_and_streamed() {
    let _serial = serial();
    let s = Setup::new(Backend::File);
    let pg = Pg::init(&s.path("primary"), "");
    seed(&pg);
    let mut first = Streamer::start(&s, &pg, "tl", &[]);
    s.ok(&["pg", "base-backup", "--source", "tl", "--dsn", &pg.dsn()]);
    let old = commit_rows(&pg, 100, 120, Duration::from_millis(30));
    wait_slot_caught_up(&pg, "ebb_tl", &first);
    first.kill9();

    // Failover: a copy restored to a moment on timeline 1 is promoted (timeline 2)
    // and becomes the primary that ebb streams from, into the same source.
    let branch = micro(old[10].1, 1);
    let mut copy = s.restore("tl", &branch.to_string(), Vec::new());
    copy.stop();
    std::fs::write(
        copy.data.join("postgresql.auto.conf"),
        std::fs::read_to_string(copy.data.join("postgresql.auto.conf")).unwrap() + "archive_mode = 'off'\n",
    )
    .unwrap();
    copy.start();
    assert_eq!(copy.sql("select timeline_id from pg_control_checkpoint()"), "2");
    let second = Streamer::start(&s, &copy, "tl", &[]);
    let new = commit_rows(&copy, 200, 220, Duration::from_millis(30));
    wait_slot_caught_up(&copy, "ebb_tl", &second);
    let err = second.log();
    assert!(!err.contains("gap"), "{err}");

    // A moment on timeline 1 before the branch: the old primary's rows.
    let at = Timestamp::from_microsecond((old[4].1.as_microsecond() + old[5].1.as_microsecond()) / 2).unwrap();
    let r = s.restore("tl", &at.to_string(), Vec::new());
    assert_eq!(ids(&r), (0..10).chain(expected(&old, at)).collect::<Vec<_>>(), "{}", r.log());
    drop(r);
    // Moments on timeline 2: timeline 1 up to the branch, then the new primary's rows.
    for at in [new[5].1, micro(new[15].1, -1), micro(new[19].1, 300_000)] {
        let r = s.restore("tl", &at.to_string(), Vec::new());
        let want: Vec<u32> = (0..10).chain(expected(&old, branch)).chain(expected(&new, at)).collect();
        let wal: Vec<String> = s.repo.objects().into_iter().filter(|o| o.starts_with("wal/")).collect();
        assert_eq!(ids(&r), want, "restored at {at}\n{}\n{wal:#?}\n{}", r.log(), second.log());
    }
}

#[test]
fn kill_9_under_heavy_wal_and_a_store_outage_lose_nothing() {
    let _serial = serial();
    let moto = Moto::start();
    let repo = TestRepo::new_s3_at(&moto.endpoint);
    let s = Setup::with_repo(repo);
    let env = s3_env(&s.repo);
    let pg = Pg::init(&s.path("primary"), "max_wal_size = 1GB");
    seed(&pg);
    pg.sql("create table big (id int, pad text)");
    let mut streamer = Streamer::start(&s, &pg, "dur", &[]);
    s.ok(&["pg", "base-backup", "--source", "dur", "--dsn", &pg.dsn()]);

    // Heavy WAL, and the streamer killed with -9 twice in the middle of it.
    let load = Command::new(common::pg::bin("psql"))
        .args(["-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", "postgres", "-d", "postgres", "-qAt", "-c"])
        .arg("insert into big select g, md5(g::text) || repeat('w', 300) from generate_series(1, 300000) g")
        .env("PGPASSWORD", PASSWORD)
        .spawn()
        .unwrap();
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(1500));
        streamer.kill9();
        streamer = Streamer::start(&s, &pg, "dur", &[]);
    }
    let out = load.wait_with_output().unwrap();
    assert!(out.status.success());
    let commits = commit_rows(&pg, 100, 120, Duration::from_millis(20));
    wait_slot_caught_up(&pg, "ebb_dur", &streamer);

    // The store stops answering: the slot must not move past what is durable.
    moto.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(2));
    let slot = "select restart_lsn from pg_replication_slots where slot_name = 'ebb_dur'";
    let before = pg.sql(slot);
    let during = commit_rows(&pg, 300, 310, Duration::from_millis(100));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(pg.sql(slot), before, "the slot advanced while the store was down");
    let behind = pg.sql(&format!("select pg_current_wal_flush_lsn() > '{before}'"));
    assert_eq!(behind, "t", "the server must have WAL the store could not take");
    moto.signal(libc::SIGCONT);
    wait_slot_caught_up(&pg, "ebb_dur", &streamer);

    let all: Vec<(u32, Timestamp)> = commits.iter().chain(during.iter()).cloned().collect();
    let r = s.restore("dur", "latest", env.clone());
    assert_eq!(ids(&r), (0..10).chain(all.iter().map(|c| c.0)).collect::<Vec<_>>(), "{}", r.log());
    assert_eq!(r.sql("select count(*) from big"), "300000");
    drop(r);
    let at = micro(commits[7].1, 0);
    let r = s.restore("dur", &at.to_string(), env);
    assert_eq!(ids(&r), (0..10).chain(expected(&all, at)).collect::<Vec<_>>(), "{}", r.log());
    assert_eq!(r.sql("select count(*) from big"), "300000");
}

/// Item 16 of issue 15: a malformed timeline history file is answered to
/// PostgreSQL as "cannot read" (exit 126, which stops recovery to be started
/// again), not as "missing" (exit 1, which would end recovery early on a damaged
/// object); a history that is not there at all is missing.
#[test]
fn a_malformed_history_file_is_an_error_not_missing() {
    let repo = TestRepo::new(Backend::File);
    repo.init();
    let work = tempfile::tempdir().unwrap();
    let seg = work.path().join("000000010000000000000001");
    std::fs::write(&seg, fake_segment(1, 1, 0)).unwrap();
    repo.ok(&["pg", "archive-push", "--read-ahead", "0", "--source", "db", seg.to_str().unwrap()]);
    let history = work.path().join("00000002.history");
    std::fs::write(&history, b"this is not a history file\n").unwrap();
    repo.ok(&["pg", "archive-push", "--read-ahead", "0", "--source", "db", history.to_str().unwrap()]);

    let dest = work.path().join("got");
    let out = repo.run(&["pg", "archive-get", "--source", "db", "000000020000000000000001", dest.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(126), "{err}");
    assert!(err.contains("history file of timeline 2") && err.contains("malformed"), "{err}");
    assert!(!dest.exists());
    let out = repo.run(&["pg", "archive-get", "--source", "db", "000000030000000000000001", dest.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    repo.ok(&["pg", "archive-get", "--source", "db", "000000010000000000000001", dest.to_str().unwrap()]);
    assert!(std::fs::read(&dest).unwrap() == std::fs::read(&seg).unwrap());
}

/// A file:// repository holding made-up segments 1 to `last` of timeline 1 (16
/// MiB each, segment N filled with the byte N), and the data directory of a
/// server that would fetch them.
struct Archive {
    repo: TestRepo,
    work: tempfile::TempDir,
}

impl Archive {
    fn new(last: u64) -> Archive {
        let a = Archive { repo: TestRepo::new(Backend::File), work: tempfile::tempdir().unwrap() };
        a.repo.init();
        std::fs::create_dir_all(a.pg_wal()).unwrap();
        for segno in 1..=last {
            a.push(segno);
        }
        a
    }

    fn name(segno: u64) -> String {
        format!("0000000100000000{segno:08X}")
    }

    fn segment(segno: u64) -> Vec<u8> {
        fake_segment(1, segno, segno as u8)
    }

    fn push(&self, segno: u64) {
        let path = self.work.path().join(Archive::name(segno));
        std::fs::write(&path, Archive::segment(segno)).unwrap();
        self.repo.ok(&["pg", "archive-push", "--read-ahead", "0", "--source", "db", path.to_str().unwrap()]);
    }

    fn pg_wal(&self) -> PathBuf {
        self.work.path().join("data/pg_wal")
    }

    /// Where PostgreSQL's restore_command puts what it fetched.
    fn dest(&self) -> PathBuf {
        self.pg_wal().join("RECOVERYXLOG")
    }

    fn spool(&self) -> PathBuf {
        self.pg_wal().join("ebb-spool")
    }

    /// `archive-get --prefetch N` of segment `segno`, as PostgreSQL runs it, from
    /// the repository `url`.
    fn get(&self, segno: u64, prefetch: usize, url: &str) -> Output {
        let mut c = self.repo.cmd();
        c.env("EBB_REPOSITORY", url).args(["pg", "archive-get", "--source", "db", "--prefetch"]);
        c.arg(prefetch.to_string()).arg(Archive::name(segno)).arg(self.dest());
        c.output().unwrap()
    }

    /// The segments in the spool, by name.
    fn spooled(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.spool())
            .into_iter()
            .flatten()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit()))
            .collect();
        names.sort();
        names
    }

    fn wait_spooled(&self, segno: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.spooled().contains(&Archive::name(segno)) {
            assert!(Instant::now() < deadline, "segment {segno} never spooled: {:?}\n{}", self.spooled(), self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.spool().join("fetcher.log")).unwrap_or_default()
    }

    fn got(&self, segno: u64) -> bool {
        std::fs::read(self.dest()).unwrap() == Archive::segment(segno)
    }
}

/// Issue 17: `archive-get --prefetch N` leaves the N segments after the one asked
/// for to a background fetcher, which spools them; the next calls take theirs from
/// the spool without the repository. The spool holds at most N. The end of the
/// archive is "not found" at once, and never a stale "not found" once the
/// segment is there. The fetcher goes, and empties the spool, once PostgreSQL has
/// asked for nothing for a while.
#[test]
fn archive_get_takes_segments_fetched_ahead_from_a_bounded_spool() {
    let a = Archive::new(12);
    let url = a.repo.url().to_string();
    let out = a.get(1, 4, &url);
    check_exit("archive-get of the first segment", &out, 0);
    assert!(a.got(1));
    let want: Vec<String> = (2..=5).map(Archive::name).collect();
    (2..=5).for_each(|segno| a.wait_spooled(segno));
    assert_eq!(a.spooled(), want, "the 4 segments after the first\n{}", a.log());
    // The next calls need no repository: theirs is in the spool.
    for segno in 2..=9 {
        a.wait_spooled(segno);
        let out = a.get(segno, 4, "file:///nonexistent");
        check_exit(&format!("archive-get of segment {segno} from the spool"), &out, 0);
        assert!(a.got(segno), "segment {segno}");
        assert!(a.spooled().len() <= 4, "at most 4 spooled: {:?}", a.spooled());
    }
    // Fetched ahead of the calls that come: 10 to 12, and no further.
    (10..=12).for_each(|segno| a.wait_spooled(segno));
    assert_eq!(a.spooled(), (10..=12).map(Archive::name).collect::<Vec<_>>());

    // The end of the archive: "not found", at once, the fetcher running or not.
    let asked = Instant::now();
    let out = a.get(13, 4, &url);
    check_exit("archive-get past the end of the archive", &out, 1);
    assert!(asked.elapsed() < Duration::from_secs(5), "not found took {:?}", asked.elapsed());
    a.push(13);
    let out = a.get(13, 4, &url);
    check_exit("archive-get of the segment archived since", &out, 0);
    assert!(a.got(13));

    let deadline = Instant::now() + Duration::from_secs(60);
    while !a.spooled().is_empty() || std::fs::File::open(a.spool().join("lock")).unwrap().try_lock().is_err() {
        assert!(Instant::now() < deadline, "the fetcher is still there: {:?}", a.spooled());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Issue 17: no partial or wrong segment ever reaches PostgreSQL from the spool. A
/// fetcher killed with -9 while it writes a segment (strace holds up its writes)
/// leaves it aside, and the call for it gets it whole; a file under a segment's
/// name that is not that segment is dropped, and the call fetches the segment.
#[test]
fn a_fetcher_killed_while_writing_never_hands_over_a_partial_segment() {
    let a = Archive::new(6);
    let url = a.repo.url().to_string();
    // A fetcher of our own, under strace, for the segment after the first.
    std::fs::create_dir_all(a.spool()).unwrap();
    std::fs::write(a.spool().join("next"), Archive::name(1)).unwrap();
    let aside = a.spool().join(format!(".{}.tmp", Archive::name(2)));
    let mut fetcher = a.repo.cmd();
    fetcher.args(["pg", "archive-get", "--source", "db", "--prefetch", "1", "--fetcher"]);
    fetcher.arg(Archive::name(1)).arg(a.dest());
    let options = ["--inject=write:delay_enter=5000000", "-P", aside.to_str().unwrap()];
    let mut traced = common::repo::under_strace(&fetcher, &options).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !aside.exists() {
        assert!(Instant::now() < deadline, "the fetcher never began writing segment 2");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    let children = Command::new("pgrep").args(["-P", &traced.id().to_string()]).output().unwrap();
    let pid: i32 = String::from_utf8_lossy(&children.stdout).trim().parse().expect("the traced fetcher's pid");
    // SAFETY: killing the fetcher this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let _ = traced.wait();
    assert!(a.spooled().is_empty(), "nothing under a segment's name: {:?}", a.spooled());
    assert!(std::fs::metadata(&aside).unwrap().len() < 16 << 20, "killed before all of it was written");

    let out = a.get(2, 1, &url);
    check_exit("archive-get of the segment the fetcher was writing", &out, 0);
    assert!(a.got(2));

    // Under segment 4's name: a short file, then segment 5. Neither is handed over.
    for planted in [Archive::segment(4)[..100_000].to_vec(), Archive::segment(5)] {
        std::fs::write(a.spool().join(Archive::name(4)), planted).unwrap();
        let out = a.get(4, 1, &url);
        check_exit("archive-get of segment 4 over a wrong file in the spool", &out, 0);
        assert!(a.got(4));
    }
    assert!(!a.dest().with_extension("ebb-partial").exists());
}

/// Item 17 of issue 15: a segment that conflicts with what is archived, pushed
/// through the background pusher, fails with the pusher's whole message (its note
/// of the failure used to be read while still being written, giving `ebb: ` alone).
/// strace holds up every write to the note's name, so that the reader always
/// comes while it is being written.
#[test]
fn a_conflicting_segment_fails_with_its_reason() {
    let repo = TestRepo::new(Backend::File);
    repo.init();
    let work = tempfile::tempdir().unwrap();
    let wal = work.path().join("pg_wal");
    std::fs::create_dir_all(wal.join("archive_status")).unwrap();
    let name = "000000010000000000000001";
    let seg = wal.join(name);
    let ready = wal.join("archive_status").join(format!("{name}.ready"));
    let put = |content: u8| {
        // As PostgreSQL does it: the segment whole in its place, then marked ready.
        let _ = std::fs::remove_file(&ready);
        let tmp = wal.join("xlogtemp");
        std::fs::write(&tmp, fake_segment(1, 1, content)).unwrap();
        std::fs::rename(&tmp, &seg).unwrap();
        std::fs::write(&ready, b"").unwrap();
    };
    put(1);
    let state = work.path().join("state0");
    let first =
        repo.cmd().env("EBB_STATE_DIR", &state).args(["pg", "archive-push", "--source", "db"]).arg(&seg).output();
    let first = first.unwrap();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    // Where the pusher keeps its notes, below a state directory.
    let notes = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .find(|n| n.to_string_lossy().ends_with(".pushed"))
        .expect("the pusher's notes");

    for round in 1..3u8 {
        put(1 + round);
        // A state directory of its own, so that this call starts its own pusher, traced.
        let state = work.path().join(format!("state{round}"));
        let note = state.join(&notes).join(format!("{name}.error"));
        let mut push = repo.cmd();
        push.env("EBB_STATE_DIR", &state).args(["pg", "archive-push", "--source", "db"]).arg(&seg);
        let options = ["--inject=write:delay_enter=300000", "-P", note.to_str().unwrap()];
        let out = common::repo::under_strace(&push, &options).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "round {round}: {err}");
        assert!(err.contains("different content"), "round {round}: the failure says why: {err:?}");
    }
}

/// Item 18 of issue 15: for a PostgreSQL source, `ebb sources` measures the lag by
/// its newest WAL (not its last base backup), `ebb status` shows the newest base
/// backup, and `ebb pg restore` says what is missing: an unknown source is called
/// unknown, a source with WAL but no base backup says so, and a moment before the
/// first base backup names the earliest one can restore to.
#[test]
fn pg_sources_status_and_restore_say_what_there_is() {
    let _serial = serial();
    let s = Setup::new(Backend::File);
    let pg = Pg::init(&s.path("primary"), "");
    seed(&pg);
    let target = s.path("never").to_str().unwrap().to_string();
    let out = s.run(&["pg", "restore", "--source", "nosuch", "--at", "latest", &target]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("unknown source \"nosuch\""), "{err}");

    let mut streamer = Streamer::start(&s, &pg, "db", &[]);
    commit_rows(&pg, 100, 103, Duration::ZERO);
    wait_slot_caught_up(&pg, "ebb_db", &streamer);
    let out = s.run(&["pg", "restore", "--source", "db", "--at", "latest", &target]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("has WAL but no base backup yet"), "{err}");
    streamer.kill9();

    s.ok(&["pg", "base-backup", "--source", "db", "--dsn", &pg.dsn()]);
    let points: Vec<serde_json::Value> = serde_json::from_str(&s.ok(&["points", "--source", "db", "--json"])).unwrap();
    let backup: Timestamp = points[0]["time"].as_str().unwrap().parse().unwrap();
    let streamer = Streamer::start(&s, &pg, "db", &[]);
    commit_rows(&pg, 103, 106, Duration::ZERO);
    wait_slot_caught_up(&pg, "ebb_db", &streamer);

    let sources: Vec<serde_json::Value> = serde_json::from_str(&s.ok(&["sources", "--json"])).unwrap();
    let age_of_backup = Timestamp::now().duration_since(backup).as_secs_f64();
    let wal: Timestamp = sources[0]["wal_newest"].as_str().expect("the newest WAL's time").parse().unwrap();
    assert!(wal > backup, "WAL was stored after the base backup: {sources:?}");
    let lag = sources[0]["lag_seconds"].as_f64().unwrap();
    assert!(lag < age_of_backup, "the lag is the WAL's ({lag} s), not the base backup's age ({age_of_backup} s)");

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = s.ok(&["status", "--json", "--state-dir", s.path("state").to_str().unwrap()]);
        let v: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        if v.iter().any(|st| st["source"] == "db" && st["newest_point"] == backup.to_string()) {
            break;
        }
        assert!(Instant::now() < deadline, "status never showed the base backup as the newest point: {out}");
        std::thread::sleep(Duration::from_millis(200));
    }

    let before = (backup - jiff::SignedDuration::from_secs(1)).to_string();
    let out = s.run(&["pg", "restore", "--source", "db", "--at", &before, &target]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("earliest moment") && err.contains(&backup.to_string()), "{err}");
    drop(streamer);
}

/// WAL streaming over a store that is slow to accept and fails one upload (the
/// fault-injecting store, issue 16; a kill cannot make a store slow): the server is
/// never told WAL is flushed before the repository holds it, whenever we look, and
/// once the store behaves again everything the server wrote is stored.
#[test]
fn the_server_hears_wal_is_flushed_only_once_the_store_has_it() {
    use catalog::faults::{Fault, Faults, Op};
    use catalog::{Repository, Secret, Store, DEFAULT_KDF};
    use streamer::pg::walstream::{stream_pg, PgStreamOptions};

    let work = tempfile::tempdir().unwrap();
    share_with_postgres(work.path());
    let pg = Pg::init(&work.path().join("pg"), "");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let faults = Faults::new();
    let pieces = "wal/db/00000001/";
    faults.nth(Op::Put, pieces, 2, Fault::Fail);
    faults.always(Op::Put, pieces, Fault::Delay(Duration::from_millis(1500)));
    let (plain, faulty) = rt.block_on(async {
        let store = Store::memory();
        let secret = Secret::KeyFile([4; 32]);
        let plain = Repository::init(store.clone(), &secret, DEFAULT_KDF, "h".into()).await.unwrap().0;
        (plain, Repository::open(store.with_faults(faults.clone()), &secret).await.unwrap())
    });
    let mut dsn = streamer::pg::parse_dsn(&pg.dsn()).unwrap();
    dsn.password(PASSWORD);
    let opts = PgStreamOptions {
        source: "db".into(),
        dsn,
        dsn_display: pg.dsn(),
        slot: "ebb_faults".into(),
        flush_interval: Duration::from_millis(200),
        rpo: Duration::from_secs(900),
        repository: "memory://".into(),
        state_file: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics = std::sync::Arc::new(streamer::metrics::Metrics::new("db", 900));
    let stream = rt.spawn(stream_pg(faulty, opts, metrics, async move {
        let _ = stopped.await;
    }));

    // Where the stored pieces reach, contiguously from the first.
    let stored_to = |rt: &tokio::runtime::Runtime| -> u64 {
        let mut ranges: Vec<(u64, u64)> = rt
            .block_on(plain.store().list(pieces.trim_end_matches('/')))
            .unwrap()
            .iter()
            .filter_map(|o| {
                let (s, e) = o.name.rsplit('/').next()?.split_once('-')?;
                Some((u64::from_str_radix(s, 16).ok()?, u64::from_str_radix(e, 16).ok()?))
            })
            .collect();
        ranges.sort();
        let mut to = ranges.first().map_or(0, |r| r.0);
        for (s, e) in ranges {
            if s <= to {
                to = to.max(e);
            }
        }
        to
    };
    let lsn = |s: &str| -> u64 {
        let (hi, lo) = s.trim().split_once('/').unwrap_or_else(|| panic!("not an LSN: {s:?}"));
        (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
    };
    pg.wait_for("the stream", "select count(*) = 1 from pg_stat_replication", Duration::from_secs(60));
    pg.sql("create table t (x int)");
    // (what the server was told, what the store held) at each look.
    let mut seen: Vec<(u64, u64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut target = 0;
    for round in 0..6 {
        pg.sql(&format!("insert into t select generate_series(1, 20000); select {round}"));
        target = lsn(&pg.sql("select pg_current_wal_flush_lsn()"));
        loop {
            // What the server was told, then what the store has: told first, so a
            // piece the store got later cannot make a wrong report look right.
            let told = pg.sql("select coalesce(flush_lsn, '0/0') from pg_stat_replication");
            let told = if told.is_empty() { 0 } else { lsn(&told) };
            let held = stored_to(&rt);
            seen.push((told, held));
            if told >= target {
                break;
            }
            assert!(Instant::now() < deadline, "WAL to {target:X} never became durable (told {told:X}, held {held:X})");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // The stream began where its first piece begins: being told that much is
    // flushed acknowledges nothing received. Anything past it must have been held.
    let first = rt.block_on(plain.store().list_after(pieces.trim_end_matches('/'), "", 1)).unwrap();
    let began = u64::from_str_radix(first[0].rsplit('/').next().unwrap().split('-').next().unwrap(), 16).unwrap();
    assert!(seen.len() > 20, "looked {} times", seen.len());
    assert!(seen.iter().any(|&(told, held)| told > began && held > began), "the stream was seen shipping");
    for &(told, held) in &seen {
        assert!(told <= held.max(began), "the server was told {told:X} is flushed; the store held WAL to {held:X}");
    }
    assert!(faults.fired() >= 3, "the store was slow, and failed once: {} faults met", faults.fired());
    assert!(stored_to(&rt) >= target, "all the WAL the server flushed is stored");
    let _ = stop.send(());
    rt.block_on(stream).unwrap().unwrap();
}

/// A running `ebb pg serve`: the process, its scratch directory and port; stopped
/// with SIGTERM (or killed) when dropped.
struct Served {
    child: Child,
    scratch: PathBuf,
    port: u16,
    out: PathBuf,
}

impl Served {
    /// Starts `ebb pg serve --at AT` and waits until it says PostgreSQL answers.
    fn start(s: &Setup, at: Timestamp, extra: &[&str], scratch: &std::path::Path) -> Served {
        Served::start_in(s, at, extra, scratch, true)
    }

    /// The same with the default scratch (as root: /var/tmp/ebb-pg-serve/db).
    fn start_default(s: &Setup, at: Timestamp) -> Served {
        Served::start_in(s, at, &[], std::path::Path::new("/var/tmp/ebb-pg-serve/db"), false)
    }

    fn start_in(s: &Setup, at: Timestamp, extra: &[&str], scratch: &std::path::Path, given: bool) -> Served {
        let out = s.path(&format!("served-{}.out", Timestamp::now().as_nanosecond()));
        let mut cmd = s.cmd();
        cmd.args(["pg", "serve", "--source", "db", "--at", &at.to_string()]);
        if given {
            cmd.arg("--scratch").arg(scratch);
        }
        let child = cmd
            .args(extra)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(out.with_extension("err")).unwrap())
            .spawn()
            .unwrap();
        let mut served = Served { child, scratch: scratch.to_path_buf(), port: 0, out };
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let text = std::fs::read_to_string(&served.out).unwrap_or_default();
            if let Some(port) = text.split(" port=").nth(1).and_then(|r| r.split(' ').next()) {
                served.port = port.parse().unwrap();
                return served;
            }
            let exited = served.child.try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "pg serve did not answer: {exited:?}\n{}",
                served.said()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn said(&self) -> String {
        let err = std::fs::read_to_string(self.out.with_extension("err")).unwrap_or_default();
        let log = std::fs::read_to_string(self.scratch.join("postgres.log")).unwrap_or_default();
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{err}\n--- server log ---\n{log}",
            std::fs::read_to_string(&self.out).unwrap_or_default()
        )
    }

    fn psql(&self, sql: &str) -> Output {
        Command::new(common::pg::bin("psql"))
            .arg("-h")
            .arg(self.scratch.join("run"))
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", "postgres", "-qAt", "-c", sql])
            .output()
            .unwrap()
    }

    fn sql(&self, sql: &str) -> String {
        let out = self.psql(sql);
        assert!(out.status.success(), "{sql}: {}\n{}", String::from_utf8_lossy(&out.stderr), self.said());
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn ids(&self) -> Vec<u32> {
        self.sql("select id from t order by id").lines().map(|l| l.parse().unwrap()).collect()
    }

    /// SIGTERM, and the exit: 0, with the server stopped, nothing mounted and the
    /// scratch deleted.
    fn stop(self) {
        let err = self.out.with_extension("err");
        self.stopped();
        let err = std::fs::read_to_string(err).unwrap();
        assert!(err.contains("answering at T after fetching") && err.contains("from the repository in all"), "{err}");
    }

    /// SIGTERM, and the exit as `stop`, whatever ebb said.
    fn stopped(mut self) {
        // SAFETY: kill only sends a signal to the child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(90);
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "pg serve did not stop\n{}", self.said());
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(status.success(), "{status}\n{}", self.said());
        assert!(!mountd::mounts::is_mounted(&self.scratch.join("data")), "{}", self.said());
        assert!(!self.scratch.exists(), "the scratch is deleted");
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every object of the repository with its bytes.
fn snapshot(repo: &TestRepo) -> Vec<(String, Vec<u8>)> {
    repo.objects().into_iter().map(|k| (k.clone(), repo.read_object(&k))).collect()
}

/// A process whose working directory lies under `dir`, if any.
fn process_in(dir: &std::path::Path) -> Option<String> {
    std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
        let cwd = std::fs::read_link(e.path().join("cwd")).ok()?;
        let cwd = cwd.to_string_lossy();
        let cwd = cwd.strip_suffix(" (deleted)").unwrap_or(&cwd);
        std::path::Path::new(cwd).starts_with(dir).then(|| e.file_name().to_string_lossy().into_owned())
    })
}

fn process_alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

#[test]
fn pg_serve_answers_at_t_without_a_restore_and_writes_nothing_back() {
    let _serial = serial();
    let s = Setup::new(Backend::File);
    let pg = Pg::init(&s.path("primary"), "");
    seed(&pg);
    pg.sql("create extension amcheck");
    let mut streamer = Streamer::start(&s, &pg, "db", &[]);
    s.ok(&["pg", "base-backup", "--source", "db", "--dsn", &pg.dsn()]);
    let commits = commit_rows(&pg, 100, 130, Duration::from_millis(30));
    wait_slot_caught_up(&pg, "ebb_db", &streamer);
    streamer.kill9();
    let before = snapshot(&s.repo);
    let scratch = s.path("serve");
    let n = commits.len();
    let between = |a: Timestamp, b: Timestamp| {
        Timestamp::from_microsecond((a.as_microsecond() + b.as_microsecond()) / 2).unwrap()
    };
    // Between two commits, at one's exact microsecond, and after the last (no
    // transaction ended after it: all the WAL is replayed, and the server waits).
    for at in [between(commits[n / 4].1, commits[n / 4 + 1].1), commits[n / 2].1, micro(commits[n - 1].1, 500_000)] {
        let served = Served::start(&s, at, &[], &scratch);
        let want: Vec<u32> = (0..10).chain(expected(&commits, at)).collect();
        assert_eq!(served.ids(), want, "served at {at}\n{}", served.said());
        let said = std::fs::read_to_string(&served.out).unwrap();
        assert!(said.contains("base backup") && said.contains("replaying WAL"), "{said}");
        let check = Command::new(common::pg::bin("pg_amcheck"))
            .arg("-h")
            .arg(scratch.join("run"))
            .args(["-p", &served.port.to_string(), "-U", "postgres", "--heapallindexed", "-d", "postgres"])
            .output()
            .unwrap();
        assert!(check.status.success(), "pg_amcheck: {}{}", String::from_utf8_lossy(&check.stdout), served.said());
        let write = served.psql("insert into t values (9999, 'no')");
        assert!(!write.status.success(), "a standby paused at T takes no writes");
        // A second run on the same scratch is refused, and changes nothing.
        let second =
            s.run(&["pg", "serve", "--source", "db", "--at", &at.to_string(), "--scratch", scratch.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&second.stderr);
        assert!(second.status.code() == Some(2) && err.contains("another `ebb pg serve` uses"), "{err}");
        assert_eq!(served.ids(), want, "the first still serves");
        served.stop();
    }
    // A scratch that holds anything else is refused and left alone.
    let busy = s.path("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("keep"), b"mine").unwrap();
    let refused = s.run(&["pg", "serve", "--source", "db", "--at", "latest", "--scratch", busy.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(refused.status.code() == Some(2) && err.contains("not an `ebb pg serve` scratch"), "{err}");
    assert_eq!(std::fs::read(busy.join("keep")).unwrap(), b"mine");

    // Promoted at T: it takes writes, which stay in the branch.
    let at = commits[n / 2].1;
    let served = Served::start(&s, at, &["--writable"], &scratch);
    served.sql("insert into t values (100000, 'branch')");
    let want: Vec<u32> = (0..10).chain(expected(&commits, at)).chain([100000]).collect();
    assert_eq!(served.ids(), want);
    served.stop();
    // After the last commit: all the WAL replayed, then promoted where it ends.
    let after = micro(commits[n - 1].1, 500_000);
    let served = Served::start(&s, after, &["--writable"], &scratch);
    served.sql("insert into t values (100001, 'branch')");
    let want: Vec<u32> = (0..10).chain(expected(&commits, after)).chain([100001]).collect();
    assert_eq!(served.ids(), want, "{}", served.said());
    served.stop();

    // One table as it was at T, dumped without a restore and loaded into a fresh
    // database: exactly its rows at T.
    let dumped = s
        .cmd()
        .args(["pg", "dump", "--source", "db", "--at", &at.to_string(), "--scratch"])
        .arg(&scratch)
        .args(["--", "-t", "t"])
        .output()
        .unwrap();
    assert!(dumped.status.success(), "pg dump: {}", String::from_utf8_lossy(&dumped.stderr));
    assert!(!scratch.exists() && !mountd::mounts::is_mounted(&scratch.join("data")), "pg dump cleans up");
    pg.sql("create database fresh");
    let mut load = Command::new(common::pg::bin("psql"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "fresh",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
        ])
        .env("PGPASSWORD", PASSWORD)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut load.stdin.take().unwrap(), &dumped.stdout).unwrap();
    assert!(load.wait().unwrap().success(), "the dump loads");
    let loaded = Command::new(common::pg::bin("psql"))
        .args(["-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", "postgres", "-d", "fresh", "-qAt", "-c"])
        .arg("select id from t order by id")
        .env("PGPASSWORD", PASSWORD)
        .output()
        .unwrap();
    let loaded: Vec<u32> = String::from_utf8_lossy(&loaded.stdout).lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(loaded, (0..10).chain(expected(&commits, at)).collect::<Vec<u32>>());

    // Killed with -9: the server dies with it; the mount left behind is cleared by
    // `ebb umount`, and a run in the same scratch clears what is left.
    for clear_with_umount in [true, false] {
        let mut served = Served::start(&s, at, &[], &scratch);
        let pidfile = std::fs::read_to_string(scratch.join("data/postmaster.pid")).unwrap();
        let pid: i32 = pidfile.lines().next().unwrap().parse().unwrap();
        served.child.kill().unwrap();
        served.child.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while process_alive(pid) {
            assert!(Instant::now() < deadline, "the server outlived a killed pg serve");
            std::thread::sleep(Duration::from_millis(100));
        }
        if clear_with_umount {
            s.ok(&["umount", scratch.join("data").to_str().unwrap()]);
            assert!(!mountd::mounts::is_mounted(&scratch.join("data")));
        }
        // No process is left in the data directory (the server's children notice
        // their parent is gone).
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Some(p) = process_in(&scratch) {
            assert!(Instant::now() < deadline, "process {p} is still in {}", scratch.display());
            std::thread::sleep(Duration::from_millis(100));
        }
        drop(served);
        let again = Served::start(&s, at, &[], &scratch);
        assert_eq!(again.ids(), (0..10).chain(expected(&commits, at)).collect::<Vec<u32>>(), "{}", again.said());
        again.stop();
    }
    assert!(snapshot(&s.repo) == before, "every object of the repository is byte-identical");
}

/// The pack, offset and length of the first chunk of `path` (under the data
/// directory) in the newest base backup of `source`.
fn first_chunk_of(s: &Setup, source: &str, path: &str) -> (String, u64, u64) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = catalog::Store::open(s.repo.url(), false).unwrap();
        let key = catalog::decode_key_file(&std::fs::read_to_string(&s.key).unwrap()).unwrap();
        let r = catalog::Repository::open(store, &catalog::Secret::KeyFile(key)).await.unwrap();
        let p = r.points(source).await.unwrap().pop().unwrap();
        let m = r.manifest(&p).await.unwrap();
        let mut entry = r.read_tree(&m.root_ref().unwrap()).await.unwrap().entries.remove(0);
        for name in path.split('/') {
            let tree = r.read_tree(&entry.subtree.unwrap()).await.unwrap();
            entry = tree.find(name.as_bytes()).unwrap_or_else(|| panic!("{path}: no {name}")).clone();
        }
        let Some(catalog::tree::Extent::Data(b)) = entry.content.first() else { panic!("{path} has no data") };
        (catalog::pack_name(&b.pack), b.offset as u64, b.length as u64)
    })
}

/// A damaged chunk of a table's file is an I/O error for queries that read that
/// table, which PostgreSQL reports; the other tables answer, and no query returns
/// wrong rows.
#[test]
fn pg_serve_reports_a_damaged_chunk_as_an_error_for_its_table() {
    let _serial = serial();
    let s = Setup::new(Backend::File);
    let pg = Pg::init(&s.path("primary"), "");
    seed(&pg);
    // A table the WAL after the backup never touches: only queries read its pages.
    pg.sql("create table c (id int, pad text)");
    pg.sql("insert into c select g, md5(g::text) || md5((g * 7)::text) from generate_series(1, 20000) g");
    let file = pg.sql("select pg_relation_filepath('c')");
    let mut streamer = Streamer::start(&s, &pg, "db", &[]);
    s.ok(&["pg", "base-backup", "--source", "db", "--dsn", &pg.dsn()]);
    let commits = commit_rows(&pg, 100, 110, Duration::from_millis(20));
    wait_slot_caught_up(&pg, "ebb_db", &streamer);
    streamer.kill9();

    let (pack, offset, length) = first_chunk_of(&s, "db", &file);
    let mut bytes = s.repo.read_object(&pack);
    bytes[(offset + length / 2) as usize] ^= 0x40;
    s.repo.write_object(&pack, &bytes);

    let at = commits.last().unwrap().1;
    // The default scratch, which the server's user can reach though ebb runs as root.
    let served = Served::start_default(&s, at);
    assert_eq!(served.ids(), (0..10).chain(expected(&commits, at)).collect::<Vec<u32>>(), "{}", served.said());
    let read = served.psql("select count(*), sum(length(pad)) from c");
    let err = String::from_utf8_lossy(&read.stderr);
    assert!(!read.status.success() && read.stdout.is_empty(), "no rows from a damaged chunk: {err}");
    assert!(err.contains("could not read") && err.contains("Input/output error"), "{err}");
    assert_eq!(served.sql("select count(*) from t"), (10 + expected(&commits, at).len()).to_string());
    served.stop();
}

/// A moment after every stored commit: recovery replays all the stored WAL, and
/// none stored after the restore or the serve began, which holds commits after T.
#[test]
fn a_t_after_every_stored_commit_never_replays_what_came_later() {
    let _serial = serial();
    let s = Setup::new(Backend::File);
    let pg = Pg::init(&s.path("primary"), "");
    seed(&pg);
    let streamer = Streamer::start(&s, &pg, "db", &[]);
    s.ok(&["pg", "base-backup", "--source", "db", "--dsn", &pg.dsn()]);
    let commits = commit_rows(&pg, 100, 110, Duration::from_millis(20));
    wait_slot_caught_up(&pg, "ebb_db", &streamer);
    let at = micro(commits.last().unwrap().1, 200_000);
    while Timestamp::now() <= at {
        std::thread::sleep(Duration::from_millis(20));
    }
    let want: Vec<u32> = (0..10).chain(100..110).collect();
    // Restored, and served, before the commits after T are stored.
    let dir = s.path("restored");
    let data = dir.join("data");
    s.ok(&["pg", "restore", "--source", "db", "--at", &at.to_string(), data.to_str().unwrap()]);
    let scratch = s.path("serve");
    let served = Served::start(&s, at, &["--writable"], &scratch);
    let standby = Served::start(&s, at, &[], &s.path("serve-ro"));
    commit_rows(&pg, 200, 210, Duration::from_millis(20));
    wait_slot_caught_up(&pg, "ebb_db", &streamer);
    pg.sql("select pg_switch_wal()");
    commit_rows(&pg, 210, 212, Duration::from_millis(20));
    wait_slot_caught_up(&pg, "ebb_db", &streamer);
    let restored = Pg::restored(&dir, &data, Vec::new());
    restored.wait_promoted();
    assert_eq!(ids(&restored), want, "restored: nothing after T\n{}", restored.log());
    assert_eq!(served.ids(), want, "served writable: nothing after T");
    served.sql("insert into t values (100000, 'branch')");
    // The standby reads the WAL stored since and stops at T all the same: it
    // pauses at the first transaction after T (no earlier: it was waiting for WAL).
    let deadline = Instant::now() + Duration::from_secs(120);
    while standby.sql("select pg_get_wal_replay_pause_state()") != "paused" {
        assert!(Instant::now() < deadline, "the standby did not reach T\n{}", standby.said());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(standby.ids(), want, "served read-only: nothing after T\n{}", standby.said());
    served.stop();
    standby.stop();
}

/// Nobody reads what `pg serve` prints any more (a closed pipe, a terminal
/// gone): it serves all the same, and SIGTERM stops it cleanly.
#[test]
fn pg_serve_whose_output_is_closed_serves_and_stops_cleanly() {
    let _serial = serial();
    let s = Setup::new(Backend::File);
    let pg = Pg::init(&s.path("primary"), "");
    seed(&pg);
    let mut streamer = Streamer::start(&s, &pg, "db", &[]);
    s.ok(&["pg", "base-backup", "--source", "db", "--dsn", &pg.dsn()]);
    let commits = commit_rows(&pg, 100, 105, Duration::from_millis(20));
    wait_slot_caught_up(&pg, "ebb_db", &streamer);
    streamer.kill9();
    let at = commits[2].1;
    let scratch = s.path("serve");
    let port = common::pg::free_port();
    let mut child = s
        .cmd()
        .args(["pg", "serve", "--source", "db", "--at", &at.to_string(), "--port", &port.to_string(), "--scratch"])
        .arg(&scratch)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The plan's line, then both pipes closed before the server answers.
    let mut plan = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut plan).unwrap();
    assert!(plan.contains("replaying WAL"), "{plan}");
    drop(child.stderr.take());
    let served = Served { child, scratch: scratch.clone(), port, out: s.path("closed.out") };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ids = served.psql("select id from t order by id");
        if ids.status.success() {
            let ids: Vec<u32> = String::from_utf8_lossy(&ids.stdout).lines().map(|l| l.parse().unwrap()).collect();
            if ids == (0..10).chain(expected(&commits, at)).collect::<Vec<u32>>() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "no answer at T: {}", served.said());
        std::thread::sleep(Duration::from_millis(100));
    }
    // ebb is past its wait for T, and so past what it says then on the closed
    // pipes (a panic would end it there; SIGTERM is acted on only after): paused
    // at T, with ebb's own connection, which it drops on leaving that wait, gone.
    let said = "select pg_get_wal_replay_pause_state() = 'paused' and not exists (select 1 from pg_stat_activity \
                where backend_type = 'client backend' and pid <> pg_backend_pid())";
    while served.sql(said) != "t" {
        assert!(Instant::now() < deadline, "ebb did not leave its wait for T: {}", served.said());
        std::thread::sleep(Duration::from_millis(50));
    }
    served.stopped();
}
