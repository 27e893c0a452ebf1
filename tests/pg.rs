//! PostgreSQL with the real binary and a real PostgreSQL 15 server (run as the
//! postgres user): WAL through `ebb stream pg` and through `archive-push`, base
//! backups, and `ebb pg restore --at T` giving exactly the transactions committed
//! at or before T, checked by starting PostgreSQL on the restored directory.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::pg::{open_up, Pg, PASSWORD};
use common::repo::{check_exit, Backend, TestRepo};
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
        let work = tempfile::tempdir().unwrap();
        let repo = TestRepo::new(backend);
        repo.init();
        let key = work.path().join("ebb.key");
        repo.ok(&["key", "add", "--new-key-file", key.to_str().unwrap()]);
        let ebb = work.path().join("ebb");
        std::fs::copy(env!("CARGO_BIN_EXE_ebb"), &ebb).unwrap();
        let st = Command::new("chown").arg("postgres").arg(&key).status().unwrap();
        assert!(st.success());
        if let Some(dir) = repo.repo_dir() {
            open_up(dir);
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
    pg.sql("create table t (id int primary key, pad text)");
    pg.sql("insert into t select g, 'before' from generate_series(0, 9) g");
    let streamer = Streamer::start(&s, &pg, "db", &[]);
    let out = s.ok(&["pg", "base-backup", "--source", "db", "--dsn", &pg.dsn()]);
    assert!(out.contains("base backup"), "{out}");
    let commits = commit_rows(&pg, 100, 140, Duration::from_millis(30));
    wait_slot_caught_up(&pg, "ebb_db", &streamer);
    check_moments(&s, "db", &commits, &[]);

    // A second base backup of a mostly unchanged database stores little.
    let out = s.ok(&["pg", "base-backup", "--source", "db", "--dsn", &pg.dsn()]);
    let added = out.rsplit(", ").next().unwrap_or_default().to_string();
    assert!(added.contains("KiB") || added.ends_with(" B added\n"), "second base backup added too much: {out}");
}
