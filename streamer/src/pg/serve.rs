//! `ebb pg serve --at T`: PostgreSQL on a branch of a base backup (its files,
//! writable, nothing written back to the repository), recovered to exactly T: a
//! hot standby paused there, read-only, or, when asked, promoted into a throwaway
//! copy that takes writes. This module writes the server's configuration into the
//! branch and says when the server answers at T; the branch itself is mountd's,
//! and starting the process is the caller's.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::Timestamp;

use super::lsn;
use super::restore::{pg_time, until, PgRestoreError, RecoveryPlan};

/// How the server is to run.
pub struct ServeOptions {
    pub source: String,
    pub at: Timestamp,
    /// The command PostgreSQL runs to fetch WAL, up to ` %f %p`.
    pub archive_get: String,
    /// `listen_addresses`, and the port (TCP and the socket's name).
    pub listen: String,
    pub port: u16,
    /// A directory only the server's user and ebb can enter: its socket, and the
    /// client authentication file ebb writes (`hba`).
    pub run_dir: PathBuf,
    /// Promoted at T, taking writes, instead of paused there read-only.
    pub writable: bool,
    /// The server's `shared_buffers`: what replay keeps in memory instead of
    /// writing it through the branch and reading it back.
    pub shared_buffers: String,
}

impl ServeOptions {
    /// The client authentication file the server reads.
    pub fn hba(&self) -> PathBuf {
        self.run_dir.join("pg_hba.conf")
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PgRestoreError {
    let path = path.display().to_string();
    move |cause| PgRestoreError::Io { path, cause }
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Configures the data directory `dir` (a branch of the plan's base backup) and
/// writes the authentication file: recovery to T along the plan's timeline, WAL
/// through `restore_command` only (never from a primary the source followed),
/// nothing archived, no fsync (the branch is thrown away). Connections on the
/// socket in `run_dir` are trusted (the directory is the server's user's alone);
/// over TCP they authenticate as the source's own `pg_hba.conf` says.
pub fn configure(dir: &Path, plan: &RecoveryPlan, opts: &ServeOptions) -> Result<(), PgRestoreError> {
    // A standby, which never ends recovery on its own, stops at T: paused, or
    // promoted when writable. When every transaction in the stored WAL ended by
    // T, a read-only one replays it all and waits (and stops at T should more
    // arrive); a writable one replays it all, none stored later (`--until`), and
    // is promoted at its end: PostgreSQL refuses to promote short of a target.
    let to_the_end = opts.writable && !plan.target_time;
    let target = if to_the_end {
        String::new()
    } else {
        format!(
            "recovery_target_time = {}\nrecovery_target_inclusive = on\nrecovery_target_action = '{}'\n",
            quote(&pg_time(opts.at)),
            if opts.writable { "promote" } else { "pause" }
        )
    };
    let text = format!(
        "\n# Added by `ebb pg serve`: source {} as of {}, on a branch of base backup {}\n\
         # (nothing the server writes reaches the repository).\n\
         restore_command = {}\nrecovery_target_timeline = '{}'\n\
         primary_conninfo = ''\nprimary_slot_name = ''\narchive_mode = 'off'\narchive_cleanup_command = ''\n\
         recovery_end_command = ''\nhot_standby = on\nfsync = off\nrecovery_init_sync_method = 'syncfs'\n\
         # Prefetching during recovery asks for pages ahead of records that bring their\n\
         # full image: on a branch each such read fetches a chunk from the repository.\n\
         recovery_prefetch = off\n\
         # Pages replay keeps in memory are never written through the branch and read back.\n\
         shared_buffers = {}\n\
         listen_addresses = {}\nport = {}\nunix_socket_directories = {}\nhba_file = {}\n\
         # Its log on stderr (ebb keeps it), never in the branch or the source's log directory;\n\
         # no subscription of the source's connects to its publishers.\n\
         logging_collector = off\nlog_destination = 'stderr'\nmax_logical_replication_workers = 0\n\
         # T is the only recovery target: none the source's configuration set is left.\n\
         recovery_target = ''\nrecovery_target_lsn = ''\nrecovery_target_xid = ''\nrecovery_target_name = ''\n\
         recovery_target_time = ''\n{target}",
        opts.source,
        opts.at,
        plan.point.time,
        quote(&format!("{}{} %f %p", opts.archive_get, if to_the_end { until(plan) } else { String::new() })),
        plan.timeline,
        quote(&opts.shared_buffers),
        quote(&opts.listen),
        opts.port,
        quote(&opts.run_dir.display().to_string()),
        quote(&opts.hba().display().to_string()),
    );
    let conf = dir.join("postgresql.auto.conf");
    let mut f = std::fs::OpenOptions::new().append(true).create(true).open(&conf).map_err(io(&conf))?;
    f.write_all(text.as_bytes()).map_err(io(&conf))?;
    let (signal, other) =
        if to_the_end { ("recovery.signal", "standby.signal") } else { ("standby.signal", "recovery.signal") };
    std::fs::write(dir.join(signal), b"").map_err(io(&dir.join(signal)))?;
    match std::fs::remove_file(dir.join(other)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&dir.join(other))(e)),
        _ => {}
    }
    let wal = dir.join("pg_wal");
    if !wal.exists() {
        std::fs::create_dir(&wal).map_err(io(&wal))?;
    }
    let own = match std::fs::read_to_string(dir.join("pg_hba.conf")) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io(&dir.join("pg_hba.conf"))(e)),
    };
    let hba = opts.hba();
    let text = format!(
        "# Written by `ebb pg serve`: the socket directory is the server's user's alone.\n\
         local all all trust\n# The source's own rules, for everything else:\n{own}"
    );
    std::fs::write(&hba, text).map_err(io(&hba))?;
    Ok(())
}

/// Why the server does not answer at T.
#[derive(Debug, thiserror::Error)]
pub enum ReadyError {
    #[error("the server stopped before answering at T")]
    Exited,
    #[error("the server did not answer at T within {0:?}")]
    Timeout(Duration),
    #[error("the server answered, but {0}")]
    Unexpected(String),
    /// The server refuses the role ebb connects as (`--user`): no such role or
    /// database, or authentication failed.
    #[error("{0} (give a role of the served database with --user)")]
    Refused(String),
}

/// Where recovery stands, as the server says.
#[derive(Debug, Clone)]
pub struct Recovery {
    pub in_recovery: bool,
    pub paused: bool,
    /// The startup process waits for WAL the repository does not have yet.
    pub waiting_for_wal: bool,
    pub replayed: Option<String>,
}

impl Recovery {
    /// Whether queries now see exactly the state at T.
    pub fn at_target(&self, plan: &RecoveryPlan, writable: bool) -> bool {
        if writable {
            return !self.in_recovery;
        }
        // Paused before the first transaction that ended after T; or, with none in
        // the WAL, past all of it (the backup's end included) and waiting for more.
        let past_stop = self.replayed.as_deref().and_then(|t| lsn::parse(t).ok()).is_some_and(|l| l >= plan.stop);
        self.in_recovery && (self.paused || (!plan.target_time && self.waiting_for_wal && past_stop))
    }
}

/// A connection to the server on the socket in `run_dir`: `Ok(None)` while it
/// does not take connections yet, an error when it refuses `user` for good (no
/// such role or database, authentication).
async fn connect(run_dir: &Path, port: u16, user: &str) -> Result<Option<tokio_postgres::Client>, String> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host_path(run_dir).port(port).user(user).dbname("postgres").connect_timeout(Duration::from_secs(2));
    match cfg.connect(tokio_postgres::NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(conn);
            Ok(Some(client))
        }
        Err(e) => {
            use tokio_postgres::error::SqlState;
            let fatal = [
                SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
                SqlState::INVALID_PASSWORD,
                SqlState::INVALID_CATALOG_NAME,
            ];
            match e.code() {
                Some(code) if fatal.contains(code) => Err(format!("the server refuses role {user}: {e}")),
                _ => Ok(None),
            }
        }
    }
}

/// What `wait_at_target` asks, every time.
const WHERE_RECOVERY_STANDS: &str = "select pg_is_in_recovery(), \
     case when pg_is_in_recovery() then pg_get_wal_replay_pause_state() else 'not paused' end, \
     exists (select 1 from pg_stat_activity where backend_type = 'startup' \
             and wait_event = 'RecoveryRetrieveRetryInterval'), \
     pg_last_wal_replay_lsn()::text";

/// Where recovery stands, as the server on `client` says (`asked`: the statement
/// prepared once for the connection); `None` when the connection is gone or the
/// server does not say within 2 s.
async fn recovery(client: &tokio_postgres::Client, asked: &tokio_postgres::Statement) -> Option<Recovery> {
    let row = tokio::time::timeout(Duration::from_secs(2), client.query_one(asked, &[])).await.ok()?.ok()?;
    Some(Recovery {
        in_recovery: row.get(0),
        paused: row.get::<_, &str>(1) == "paused",
        waiting_for_wal: row.get(2),
        replayed: row.get(3),
    })
}

/// Waits until the server answers at T, checking `running` between tries.
pub async fn wait_at_target(
    plan: &RecoveryPlan,
    opts: &ServeOptions,
    user: &str,
    timeout: Duration,
    mut running: impl FnMut() -> bool,
) -> Result<Recovery, ReadyError> {
    let began = std::time::Instant::now();
    // One connection, asked every 20 ms (a new one for each question would cost
    // a backend's start, through the branch); a new one when it breaks.
    let mut client = None;
    loop {
        if !running() {
            return Err(ReadyError::Exited);
        }
        if client.as_ref().is_none_or(|(c, _): &(tokio_postgres::Client, _)| c.is_closed()) {
            client = match connect(&opts.run_dir, opts.port, user).await.map_err(ReadyError::Refused)? {
                Some(c) => c.prepare(WHERE_RECOVERY_STANDS).await.ok().map(|asked| (c, asked)),
                None => None,
            };
        }
        if let Some((c, asked)) = &client {
            match recovery(c, asked).await {
                Some(r) if r.at_target(plan, opts.writable) => return Ok(r),
                Some(r) if !opts.writable && !r.in_recovery => {
                    return Err(ReadyError::Unexpected("it ended recovery instead of pausing at T".into()))
                }
                Some(_) => {}
                None => client = None,
            }
        }
        if began.elapsed() > timeout {
            return Err(ReadyError::Timeout(timeout));
        }
        tokio::time::sleep(Duration::from_millis(if client.is_some() { 20 } else { 50 })).await;
    }
}
