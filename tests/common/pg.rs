//! A real PostgreSQL 15 server for the tests, run as the `postgres` user (it refuses
//! to run as root): initdb in a temporary directory, SCRAM passwords, a free port on
//! loopback, commit timestamps on. Stopped (immediately) when dropped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const PASSWORD: &str = "pg-secret";

/// The directory of initdb, pg_ctl, psql: `EBB_TEST_PG_BIN`, else PostgreSQL 15's.
pub fn bin(name: &str) -> PathBuf {
    let dir =
        std::env::var_os("EBB_TEST_PG_BIN").map(PathBuf::from).unwrap_or_else(|| "/usr/lib/postgresql/15/bin".into());
    dir.join(name)
}

/// `cmd` run as the postgres user, keeping the environment.
pub fn as_postgres(program: &Path) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(program);
    c
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn chown_postgres(path: &Path) {
    let st = Command::new("chown").args(["-R", "postgres:postgres"]).arg(path).status().unwrap();
    assert!(st.success(), "chown postgres {}", path.display());
}

/// A directory postgres may enter and read (tests run as root, temp dirs are 0700).
pub fn open_up(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut p = path.to_path_buf();
    loop {
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        if mode & 0o005 != 0o005 {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode | 0o055)).unwrap();
        }
        if !p.pop() || p.as_os_str().is_empty() || p == Path::new("/") {
            break;
        }
    }
}

/// Shares a file:// repository with the postgres user, as a user of ebb would for
/// restore_command: group postgres, group-readable, directories setgid so that
/// what ebb adds keeps the group; ebb keeps it group-readable from then on.
pub fn share_with_postgres(dir: &Path) {
    open_up(dir);
    for args in [vec!["chgrp", "-R", "postgres"], vec!["chmod", "-R", "g+rX"]] {
        let st = std::process::Command::new(args[0]).args(&args[1..]).arg(dir).status().unwrap();
        assert!(st.success(), "{args:?}");
    }
    let st = std::process::Command::new("find")
        .arg(dir)
        .args(["-type", "d", "-exec", "chmod", "g+s", "{}", "+"])
        .status()
        .unwrap();
    assert!(st.success());
}

fn check(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct Pg {
    pub dir: PathBuf,
    pub data: PathBuf,
    pub port: u16,
    /// Extra environment for the server (restore_command sees it).
    pub env: Vec<(String, String)>,
    running: bool,
}

impl Pg {
    /// A new cluster in `dir` (created), with `conf` added to postgresql.conf, started.
    pub fn init(dir: &Path, conf: &str) -> Pg {
        std::fs::create_dir_all(dir).unwrap();
        let pw = dir.join("pwfile");
        std::fs::write(&pw, PASSWORD).unwrap();
        chown_postgres(dir);
        open_up(dir);
        let data = dir.join("data");
        let out = as_postgres(&bin("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"])
            .arg(format!("--pwfile={}", pw.display()))
            .output()
            .unwrap();
        check("initdb", &out);
        let mut pg = Pg { dir: dir.to_path_buf(), data, port: 0, env: Vec::new(), running: false };
        pg.configure(&format!(
            "wal_level = replica\nmax_wal_senders = 10\ntrack_commit_timestamp = on\nfsync = off\n{conf}\n"
        ));
        pg.start();
        pg
    }

    /// A server on a data directory that `ebb pg restore` wrote, on a port of its own.
    pub fn restored(dir: &Path, data: &Path, env: Vec<(String, String)>) -> Pg {
        chown_postgres(dir);
        open_up(dir);
        let mut pg = Pg { dir: dir.to_path_buf(), data: data.to_path_buf(), port: 0, env, running: false };
        pg.configure("");
        pg.start();
        pg
    }

    fn configure(&mut self, conf: &str) {
        self.port = free_port();
        let text = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n{conf}\n",
            self.port,
            self.dir.display()
        );
        let path = self.data.join("postgresql.conf");
        let mut all = std::fs::read_to_string(&path).unwrap();
        all.push_str(&text);
        std::fs::write(&path, all).unwrap();
    }

    pub fn start(&mut self) {
        let mut c = as_postgres(&bin("pg_ctl"));
        c.arg("-D").arg(&self.data).arg("-l").arg(self.dir.join("server.log")).args(["-w", "-t", "180", "start"]);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        let out = c.stdout(Stdio::null()).output().unwrap();
        if !out.status.success() {
            panic!("pg_ctl start failed: {}\n--- server log ---\n{}", out.status, self.log());
        }
        self.running = true;
    }

    pub fn stop(&mut self) {
        if self.running {
            let _ = as_postgres(&bin("pg_ctl")).arg("-D").arg(&self.data).args(["-m", "fast", "-w", "stop"]).output();
            self.running = false;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    pub fn dsn(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=postgres", self.port)
    }

    /// Runs SQL and returns its output (`psql -qAt`), asserting success.
    pub fn sql(&self, sql: &str) -> String {
        let out = self.try_sql(sql);
        check(&format!("psql -c {sql:?}"), &out);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn try_sql(&self, sql: &str) -> Output {
        Command::new(bin("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-qAt",
                "-c",
                sql,
            ])
            .env("PGPASSWORD", PASSWORD)
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .unwrap()
    }

    /// Waits until a query returns `t` (e.g. a slot caught up), or panics.
    pub fn wait_for(&self, what: &str, sql: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.try_sql(sql);
            if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "t" {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what} ({sql})\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until recovery has finished and the server accepts writes.
    pub fn wait_promoted(&self) {
        self.wait_for("the end of recovery", "select not pg_is_in_recovery()", Duration::from_secs(120));
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        if self.running {
            let _ =
                as_postgres(&bin("pg_ctl")).arg("-D").arg(&self.data).args(["-m", "immediate", "-w", "stop"]).output();
        }
    }
}
