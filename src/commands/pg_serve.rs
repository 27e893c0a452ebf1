//! `ebb pg serve --at T`: the base backup's files mounted as a branch (mountd),
//! configured to recover to T (streamer), PostgreSQL started on them as the
//! server's user, and everything stopped, unmounted and deleted on SIGINT or
//! SIGTERM. What a killed run leaves (a mount whose daemon is gone, its scratch
//! directory) the next run in the same scratch directory clears first; the server
//! dies with ebb.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use jiff::Timestamp;
use mountd::branch::Branch;
use mountd::mounts::{daemon_gone, is_mounted};
use mountd::{Fs, Scope};
use streamer::pg::lsn;
use streamer::pg::serve::{ReadyError, ServeOptions};

use crate::cli::{Global, PgDumpArgs, PgServeArgs, UsageError};
use crate::context::{archive_get_command, open, source_or_host};

/// Chunks of the base backup kept in memory while the server runs.
const CACHE_BYTES: usize = 256 << 20;
/// How long recovery to T may take before ebb gives up.
const READY_TIMEOUT: Duration = Duration::from_secs(3600);

/// How the server is run: its programs, the user it runs as, and the role ebb
/// (and pg_dump) connect as.
struct Server {
    bin: PathBuf,
    user: ServerUser,
    role: String,
}

/// The user the server runs as: postgres when ebb runs as root, else ebb's own.
struct ServerUser {
    name: String,
    uid: u32,
    gid: u32,
}

fn server_user() -> Result<ServerUser> {
    if nix::unistd::geteuid().is_root() {
        let u = nix::unistd::User::from_name("postgres")
            .context("look up the postgres user")?
            .ok_or_else(|| anyhow!("PostgreSQL refuses to run as root, and there is no postgres user to run it as"))?;
        return Ok(ServerUser { name: u.name, uid: u.uid.as_raw(), gid: u.gid.as_raw() });
    }
    let uid = nix::unistd::geteuid();
    let name = nix::unistd::User::from_uid(uid).ok().flatten().map_or_else(|| uid.to_string(), |u| u.name);
    Ok(ServerUser { name, uid: uid.as_raw(), gid: nix::unistd::getegid().as_raw() })
}

/// The scratch directory's parts.
struct Scratch {
    root: PathBuf,
    /// The branch's mountpoint: the server's data directory.
    data: PathBuf,
    /// The blocks the server writes (anonymous files).
    blocks: PathBuf,
    /// The server's socket and authentication file: its user's alone.
    run: PathBuf,
    /// The server's pg_wal, on local disk: what restore_command fetches and the
    /// server reads never goes through the branch.
    wal: PathBuf,
    log: PathBuf,
}

impl Scratch {
    fn at(root: PathBuf) -> Scratch {
        Scratch {
            data: root.join("data"),
            blocks: root.join("blocks"),
            run: root.join("run"),
            wal: root.join("wal"),
            log: root.join("postgres.log"),
            root,
        }
    }

    /// Takes the scratch directory for this run: made if missing, refused if it
    /// holds anything but an earlier run's scratch, or if another run holds it (its
    /// lock, kept open in the returned file until this run ends). Clears what a
    /// run killed before its end left, and makes the directories.
    fn prepare(&self, user: &ServerUser) -> Result<std::fs::File> {
        let marker = self.root.join(MARKER);
        let taken = std::fs::read_dir(&self.root).map(|mut d| d.next().is_some()).unwrap_or(false);
        if taken && !marker.exists() {
            return Err(UsageError(format!(
                "{} holds files that are not an `ebb pg serve` scratch: give an empty or new directory as --scratch",
                self.root.display()
            ))
            .into());
        }
        std::fs::create_dir_all(&self.root).with_context(|| format!("create {}", self.root.display()))?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&marker)
            .with_context(|| format!("create {}", marker.display()))?;
        // SAFETY: flock only locks the open file.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(UsageError(format!(
                "another `ebb pg serve` uses {}: give this one another --scratch",
                self.root.display()
            ))
            .into());
        }
        // Whatever is mounted here now was left by a run that ended without
        // unmounting (it held the lock while it ran).
        let stale = match std::fs::read_dir(&self.data) {
            Err(e) if daemon_gone(&e) => true,
            _ => is_mounted(&self.data),
        };
        if stale {
            note(&format!("clearing what an earlier `ebb pg serve` left at {}", self.data.display()));
            let st = Command::new("fusermount3").arg("-u").arg("-z").arg(&self.data).status();
            if !st.is_ok_and(|s| s.success()) {
                let _ = Command::new("umount").arg("-l").arg(&self.data).status();
            }
            if is_mounted(&self.data) {
                bail!("cannot unmount {}, left by an earlier `ebb pg serve`", self.data.display());
            }
        }
        self.clear()?;
        for dir in [&self.data, &self.blocks, &self.run, &self.wal] {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        // The server reaches its data directory and socket through the scratch.
        std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o711))?;
        for own in [&self.run, &self.wal] {
            std::fs::set_permissions(own, std::fs::Permissions::from_mode(0o700))?;
            chown(own, user)?;
        }
        Ok(lock)
    }

    /// Removes everything in the scratch but its marker; never what is still
    /// mounted (the branch would be listed from the repository to be deleted).
    fn clear(&self) -> Result<()> {
        for e in std::fs::read_dir(&self.root).with_context(|| format!("read {}", self.root.display()))? {
            let path = e?.path();
            if path.file_name() == Some(std::ffi::OsStr::new(MARKER)) || is_mounted(&path) {
                continue;
            }
            let gone = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            gone.with_context(|| format!("clear {}", path.display()))?;
        }
        Ok(())
    }

    /// Removes the scratch, unless the branch is still mounted in it.
    fn remove(&self) {
        if is_mounted(&self.data) {
            note(&format!(
                "warning: {} is still mounted; `ebb umount {}` clears it",
                self.data.display(),
                self.data.display()
            ));
            return;
        }
        if let Err(e) = self.clear().and_then(|()| {
            std::fs::remove_file(self.root.join(MARKER))?;
            std::fs::remove_dir(&self.root)?;
            Ok(())
        }) {
            note(&format!("warning: removing the scratch {}: {e:#}", self.root.display()));
        }
    }
}

/// The file that marks a directory as a scratch of `ebb pg serve`, and that a
/// run holds locked.
const MARKER: &str = ".ebb-pg-serve";

fn chown(path: &Path, user: &ServerUser) -> Result<()> {
    std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
        .with_context(|| format!("give {} to {}", path.display(), user.name))
}

/// Where a run keeps its scratch unless told: in ebb's cache directory when the
/// server runs as ebb's user; else (ebb as root, the server as postgres, who may not
/// enter root's home) in /var/tmp/ebb-pg-serve, which every user may pass through.
fn default_scratch(source: &str, user: &ServerUser) -> Result<PathBuf> {
    if user.uid == nix::unistd::geteuid().as_raw() {
        let cache = catalog::cache_dir()
            .ok_or_else(|| UsageError("no cache directory for the scratch: give one with --scratch".into()))?;
        return Ok(cache.join("serve").join(source));
    }
    let shared = PathBuf::from("/var/tmp/ebb-pg-serve");
    std::fs::create_dir_all(&shared).with_context(|| format!("create {}", shared.display()))?;
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o711))?;
    Ok(shared.join(source))
}

/// The directory of PostgreSQL's programs for a server of `version` (as
/// `server_version` says it: 15.4).
fn pg_bin(given: Option<PathBuf>, version: &str) -> PathBuf {
    if let Some(dir) = given {
        return dir;
    }
    let major = version.split(['.', ' ']).next().unwrap_or(version);
    let debian = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
    if debian.join("postgres").exists() {
        return debian;
    }
    PathBuf::new()
}

/// The first port from 5433 that nothing listens on.
fn free_port(listen: &str) -> Result<u16> {
    let host = if listen.is_empty() || listen == "*" {
        "127.0.0.1"
    } else {
        listen.split(',').next().unwrap_or(listen).trim()
    };
    (5433..6000)
        .find(|p| std::net::TcpListener::bind((host, *p)).is_ok())
        .ok_or_else(|| anyhow!("no free port from 5433 to 5999 on {host}: give one with --port"))
}

/// Starts the server as `user`; it is killed if ebb dies (its parent-death signal,
/// set after the change of user, which would clear it).
fn start_server(bin: &Path, scratch: &Scratch, user: &ServerUser, archive_env: &[(String, String)]) -> Result<Child> {
    let log = std::fs::File::create(&scratch.log).with_context(|| format!("create {}", scratch.log.display()))?;
    chown(&scratch.log, user)?;
    let mut cmd = Command::new(bin.join("postgres"));
    cmd.arg("-D").arg(&scratch.data).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    cmd.envs(archive_env.iter().map(|(k, v)| (k, v)));
    if nix::unistd::geteuid().is_root() {
        cmd.uid(user.uid).gid(user.gid);
    }
    let parent = std::process::id() as i32;
    // SAFETY: prctl and getppid are async-signal-safe and touch only this process.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // ebb died before the signal was set: no server without it.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("ebb is gone"));
            }
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("start {} (is PostgreSQL installed? see --pg-bin)", bin.join("postgres").display()))
}

/// The last lines of the server's log, for an error.
fn log_tail(scratch: &Scratch) -> String {
    let text = std::fs::read_to_string(&scratch.log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Stops the server with an immediate shutdown, and kills it if it has not
/// stopped within a minute. Its data directory is thrown away: a fast shutdown
/// would first write every page recovery left dirty in shared_buffers through
/// the branch (a restartpoint), seconds of work for nothing.
fn stop_server(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    // SAFETY: kill only sends a signal to the server's process.
    unsafe { libc::kill(child.id() as i32, libc::SIGQUIT) };
    for _ in 0..600 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A line on standard output. The server goes on serving, and stops cleanly,
/// when nobody reads ebb's output any more (a closed pipe, a terminal gone):
/// `println!` would panic there and leave the server, the mount and the scratch
/// behind.
fn tell(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}").and_then(|()| out.flush());
}

/// A line on standard error, as `tell`.
fn note(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// What to do with the server once it answers at T.
enum Then {
    /// Say how to connect, and wait for SIGINT or SIGTERM.
    Serve,
    /// Run pg_dump with these arguments, its output on ebb's.
    Dump(Vec<std::ffi::OsString>),
}

pub async fn serve(g: &Global, args: PgServeArgs) -> Result<ExitCode> {
    session(g, args, Then::Serve).await
}

/// `ebb pg dump`: serves T read-only on its socket alone, runs pg_dump on it, and stops.
pub async fn dump(g: &Global, args: PgDumpArgs) -> Result<ExitCode> {
    let serve = PgServeArgs {
        at: args.at,
        source: args.source,
        port: None,
        listen: String::new(),
        scratch: args.scratch,
        writable: false,
        shared_buffers: args.shared_buffers,
        prefetch: args.prefetch,
        user: args.user,
        pg_bin: args.pg_bin,
    };
    session(g, serve, Then::Dump(args.pg_dump_args)).await
}

async fn session(g: &Global, args: PgServeArgs, then: Then) -> Result<ExitCode> {
    let source = source_or_host(args.source)?;
    let archive_get = archive_get_command(g, &source, args.prefetch)?;
    let now = Timestamp::now();
    let at = args.at.instant(now);
    if at > now {
        return Err(UsageError(format!("{at} is in the future (it is now {now})")).into());
    }
    let user = server_user()?;
    let scratch_root = match args.scratch {
        Some(dir) => std::path::absolute(dir)?,
        None => default_scratch(&source, &user)?,
    };
    let scratch = Scratch::at(scratch_root);
    let repo = open(g).await?;
    let plan = streamer::pg::restore::recovery_plan(&repo, &source, at).await?;
    // What the plan read (the manifest, and the WAL up to where T ends), told apart
    // from what the server reads of the base backup.
    let planned = repo.store().fetched();
    let pg = plan.manifest.pg.clone().ok_or_else(|| anyhow!("point {} is not a base backup", plan.point.name))?;
    let replay = plan.replay_to.0.saturating_sub(plan.start.0);
    // A dump's output is the dump: what ebb says goes to stderr.
    let say = |text: String| match then {
        Then::Serve => tell(&text),
        Then::Dump(_) => note(&text),
    };
    say(format!(
        "source {source} as of {at}: base backup {} ({} files, {}), timeline {}; replaying WAL {} to {} ({}, {})",
        plan.point.time,
        plan.manifest.stats.files,
        crate::output::bytes(plan.manifest.stats.bytes),
        plan.timeline,
        lsn::text(plan.start),
        lsn::text(plan.replay_to),
        crate::output::bytes(replay),
        if plan.target_time {
            "to the first transaction that ended after T"
        } else {
            "all there is: none ended after T"
        }
    ));
    let bin = pg_bin(args.pg_bin, &pg.server_version);
    let port = match args.port {
        Some(p) => p,
        None => free_port(&args.listen)?,
    };
    let _lock = scratch.prepare(&user)?;
    more_open_files();
    let opts = ServeOptions {
        source: source.clone(),
        at,
        archive_get,
        listen: args.listen.clone(),
        port,
        run_dir: scratch.run.clone(),
        writable: args.writable,
        shared_buffers: args.shared_buffers.clone(),
    };

    let fs = Fs::new(repo.clone(), Scope::Moment(vec![plan.point.clone()], plan.point.time), CACHE_BYTES, None)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let branch =
        Branch::new(fs, scratch.blocks.clone(), Some((user.uid, user.gid))).await.map_err(|e| anyhow!("{e}"))?;
    let other = user.uid != nix::unistd::geteuid().as_raw();
    let fsname = mountd::mounts::fs_name(repo.store().url());
    let handle =
        mountd::mount_branch(Arc::new(branch), tokio::runtime::Handle::current(), &scratch.data, &fsname, other)
            .with_context(|| {
                format!("mount {} (is fuse3 installed and /dev/fuse available?)", scratch.data.display())
            })?;
    let server = Server { bin, user, role: args.user };
    let result = run(&scratch, &plan, &opts, &server, then, &repo, planned).await;
    note(&format!(
        "fetched {} of the base backup from the repository in all (it holds {}), and {} for the plan",
        crate::output::bytes(repo.store().fetched().saturating_sub(planned)),
        crate::output::bytes(plan.manifest.stats.bytes),
        crate::output::bytes(planned)
    ));
    // The WAL fetcher restore_command started may still hold the mount for a
    // moment: its spool gone, it ends.
    let _ = std::fs::remove_dir_all(scratch.data.join("pg_wal/ebb-spool"));
    for _ in 0..150 {
        if handle.finished() || !is_mounted(&scratch.data) {
            break;
        }
        if Command::new("fusermount3")
            .arg("-u")
            .arg(&scratch.data)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Err(e) = handle.unmount() {
        note(&format!("warning: unmount {}: {e}", scratch.data.display()));
    }
    scratch.remove();
    result
}

/// The branch keeps a file open for each file the server has written to: the
/// soft limit on open files raised to the hard one (often 1,024 against far more).
fn more_open_files() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write `lim`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Configures the branch, runs the server until a signal or its end, and stops it.
async fn run(
    scratch: &Scratch,
    plan: &streamer::pg::restore::RecoveryPlan,
    opts: &ServeOptions,
    server: &Server,
    then: Then,
    repo: &catalog::Repository,
    planned: u64,
) -> Result<ExitCode> {
    // pg_wal: a link to the scratch's own (WAL written and read at disk speed, and
    // the spool of segments fetched ahead beside it, renamed into place).
    let pg_wal = scratch.data.join("pg_wal");
    match std::fs::symlink_metadata(&pg_wal) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(&pg_wal),
        Ok(_) => std::fs::remove_file(&pg_wal),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
    .with_context(|| format!("replace {}", pg_wal.display()))?;
    std::os::unix::fs::symlink(&scratch.wal, &pg_wal).with_context(|| format!("link {}", pg_wal.display()))?;
    streamer::pg::serve::configure(&scratch.data, plan, opts)?;
    // What configure made or changed as this user belongs to the server's.
    let signal = if opts.writable && !plan.target_time { "recovery.signal" } else { "standby.signal" };
    for made in ["postgresql.auto.conf", signal, "pg_wal"].map(|f| scratch.data.join(f)).into_iter().chain([opts.hba()])
    {
        chown(&made, &server.user)?;
    }
    // Signals are ours from before the server starts: a stop asked for during
    // recovery stops it as cleanly as one asked for later.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut child = start_server(&server.bin, scratch, &server.user, &[])?;
    let ready = {
        let running = || matches!(child.try_wait(), Ok(None));
        tokio::select! {
            r = streamer::pg::serve::wait_at_target(plan, opts, &server.role, READY_TIMEOUT, running) => Some(r),
            _ = tokio::signal::ctrl_c() => None,
            _ = term.recv() => None,
        }
    };
    match ready {
        Some(Ok(_)) => {}
        None => {
            tokio::task::block_in_place(|| stop_server(&mut child));
            note(&format!("stopped before PostgreSQL answered at {}", opts.at));
            return Ok(ExitCode::FAILURE);
        }
        Some(Err(e)) => {
            let tail = log_tail(scratch);
            tokio::task::block_in_place(|| stop_server(&mut child));
            return Err(match e {
                ReadyError::Exited => anyhow!("PostgreSQL stopped before it answered at {}:\n{tail}", opts.at),
                e => anyhow!("{e}:\n{tail}"),
            });
        }
    }
    note(&format!(
        "answering at T after fetching {} of the base backup from the repository ({} for the plan: its manifest, \
         and the WAL read to find where T ends)",
        crate::output::bytes(repo.store().fetched().saturating_sub(planned)),
        crate::output::bytes(planned)
    ));
    if let Then::Dump(args) = then {
        let dumped = dump_from(&server.bin, opts, &server.role, args, &mut term).await;
        tokio::task::block_in_place(|| stop_server(&mut child));
        return dumped;
    }
    let how = if opts.writable {
        "promoted at T, taking writes (thrown away when it stops)"
    } else {
        "read-only, paused at T"
    };
    tell(&format!(
        "PostgreSQL answers as of {} ({how}):\n  psql 'host={} port={} dbname=postgres'{}",
        opts.at,
        opts.run_dir.display(),
        opts.port,
        if opts.listen.is_empty() {
            String::new()
        } else {
            format!("\n  postgresql://{}:{}/postgres", opts.listen, opts.port)
        }
    ));
    tell("stop with Ctrl-C or SIGTERM: the server stops, the branch is unmounted and its scratch deleted");
    let exited = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break false,
            _ = term.recv() => break false,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if !matches!(child.try_wait(), Ok(None)) {
                    break true;
                }
            }
        }
    };
    if exited {
        let tail = log_tail(scratch);
        bail!("PostgreSQL stopped on its own:\n{tail}");
    }
    tokio::task::block_in_place(|| stop_server(&mut child));
    note("PostgreSQL stopped; the branch is unmounted and its scratch deleted");
    Ok(ExitCode::SUCCESS)
}

/// Runs pg_dump on the served server's socket, its output on ebb's; its exit
/// status is ebb's. SIGINT or SIGTERM stops it.
async fn dump_from(
    bin: &Path,
    opts: &ServeOptions,
    role: &str,
    args: Vec<std::ffi::OsString>,
    term: &mut tokio::signal::unix::Signal,
) -> Result<ExitCode> {
    let program = bin.join("pg_dump");
    let mut dump = Command::new(&program)
        .arg("--host")
        .arg(&opts.run_dir)
        .arg("--port")
        .arg(opts.port.to_string())
        .arg("--username")
        .arg(role)
        .args(&args)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("run {}", program.display()))?;
    let status = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break None,
            _ = term.recv() => break None,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                if let Some(status) = dump.try_wait()? {
                    break Some(status);
                }
            }
        }
    };
    let Some(status) = status else {
        let _ = dump.kill();
        let _ = dump.wait();
        note("ebb: stopped before pg_dump finished");
        return Ok(ExitCode::FAILURE);
    };
    if status.success() {
        note(&format!("dumped source {} as of {}", opts.source, opts.at));
        return Ok(ExitCode::SUCCESS);
    }
    note(&format!("ebb: pg_dump failed ({status})"));
    Ok(status.code().and_then(|c| u8::try_from(c).ok()).filter(|c| *c != 0).map_or(ExitCode::FAILURE, ExitCode::from))
}
