//! `ebb mount` and `ebb umount`: checks on the mountpoint, running in the foreground
//! or as a detached daemon, and clean unmounting on SIGINT, SIGTERM or `ebb umount`.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use catalog::time::TimeSpec;
use jiff::Timestamp;
use mountd::mounts::{daemon_gone, is_mounted, mounted_at, Mounted};
use mountd::{Fs, View};

use crate::cli::Global;
use crate::UsageError;

/// How long `ebb mount` waits for its daemon to have the mount ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Checks the mountpoint and returns it absolute.
fn check_mountpoint(mountpoint: &Path) -> Result<PathBuf> {
    let abs = match std::fs::canonicalize(mountpoint) {
        Ok(p) => p,
        Err(e) if daemon_gone(&e) => {
            return Err(UsageError(format!(
                "{} is left over from a mount whose daemon is gone; clear it with `ebb umount {}`",
                mountpoint.display(),
                mountpoint.display()
            ))
            .into())
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(
                UsageError(format!("mountpoint {} does not exist; create it with mkdir", mountpoint.display())).into()
            )
        }
        Err(e) => return Err(UsageError(format!("mountpoint {}: {e}", mountpoint.display())).into()),
    };
    if is_mounted(&abs) {
        return Err(UsageError(format!(
            "{} is already a mountpoint; unmount it first with `ebb umount {}`",
            abs.display(),
            abs.display()
        ))
        .into());
    }
    let meta = std::fs::metadata(&abs).with_context(|| format!("stat {}", abs.display()))?;
    if !meta.is_dir() {
        return Err(UsageError(format!("mountpoint {} is not a directory", abs.display())).into());
    }
    if std::fs::read_dir(&abs).with_context(|| format!("read {}", abs.display()))?.next().is_some() {
        return Err(UsageError(format!(
            "mountpoint {} is not empty; mount on an empty directory so nothing is hidden",
            abs.display()
        ))
        .into());
    }
    Ok(abs)
}

/// Where fetched chunks are kept.
pub struct Caches {
    /// Bytes of decrypted chunks in memory.
    pub memory: u64,
    /// An optional directory for sealed chunks, and its bound.
    pub dir: Option<PathBuf>,
    pub dir_size: u64,
}

/// Serves the mount in this process until it is unmounted or signalled.
pub async fn mount(
    g: &Global,
    at: Option<TimeSpec>,
    source: Option<String>,
    caches: Caches,
    mountpoint: &Path,
    handoff: bool,
) -> Result<ExitCode> {
    let handoff = handoff.then(Handoff::begin);
    let abs = check_mountpoint(mountpoint)?;
    // The key is still on its way (being derived by `ebb mount`, or asked for) while
    // the header is read and the moment resolved: those need object names only.
    let key = handoff.as_ref().map(Handoff::key);
    let found = crate::context::find(g).await?;
    let view = match at {
        None => View::Timeline(source.clone()),
        Some(spec) => {
            let now = Timestamp::now();
            View::At(found.timeline().points_at(spec, source.as_deref(), now).await?, spec.instant(now))
        }
    };
    let repo = match key {
        Some(key) => found.unlock_handed(&key.await?)?,
        None => found.unlock(&crate::secret::secret(g, false)?).await?,
    };
    // A point that cannot be read is passed over for the one before it, with a
    // warning (to `ebb mount`, through the daemon's stdout, as well).
    let view = match view {
        View::At(points, at) => {
            let mut readable = Vec::new();
            for p in points {
                match repo.readable_point_at(&p.source, p.time).await? {
                    Some(r) => {
                        for (d, why) in &r.damaged {
                            let said = format!(
                                "point {} of {} cannot be read ({why}); showing the one before it, {}",
                                d.time, d.source, r.point.time
                            );
                            eprintln!("warning: {said}");
                            if let Some(h) = &handoff {
                                h.warn(&said);
                            }
                        }
                        readable.push(r.point);
                    }
                    None => bail!(
                        "no point of source {} at or before {at} can be read (`ebb verify` says what is damaged)",
                        p.source
                    ),
                }
            }
            View::At(readable, at)
        }
        v => v,
    };
    // Chunk buffers (0.25 to 4 MiB, and 8 MiB runs read ahead) come and go with the
    // cache. glibc would serve them from its arenas once the first is freed, and keep
    // what is freed there, fragmented: RSS grew to the cache size and as much again.
    // Mapped one by one, each goes back to the system when the cache drops it; few
    // arenas and a periodic trim do the same for the small allocations. The daemon
    // stays at the cache size plus a small constant.
    // SAFETY: mallopt only tunes the allocator; any value is safe to pass.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    tokio::spawn(async {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            // SAFETY: malloc_trim only returns free memory to the system.
            unsafe { libc::malloc_trim(0) };
        }
    });
    let what = match &view {
        View::At(points, at) => {
            let of = points.iter().map(|p| format!("{} (point {})", p.source, p.time)).collect::<Vec<_>>().join(", ");
            format!("{of} as of {at}")
        }
        View::Timeline(Some(s)) => format!("every point of {s}"),
        View::Timeline(None) => "every point of every source".to_string(),
    };
    let disk = match &caches.dir {
        Some(dir) => Some(
            mountd::DiskCache::open(dir, caches.dir_size)
                .with_context(|| format!("open the cache directory {}", dir.display()))?,
        ),
        None => None,
    };
    let fs = Fs::new(repo.clone(), view, caches.memory as usize, disk).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let handle =
        mountd::mount(fs, tokio::runtime::Handle::current(), &abs, &mountd::mounts::fs_name(repo.store().url()))
            .with_context(|| format!("mount {} (is fuse3 installed and /dev/fuse available?)", abs.display()))?;
    eprintln!("mounted {what} at {} (read-only); `ebb umount {}` to unmount", abs.display(), abs.display());
    if let Some(h) = handoff {
        h.ready();
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if handle.finished() || !is_mounted(&abs) {
                    break;
                }
            }
        }
    }
    handle.unmount().with_context(|| format!("unmount {}", abs.display()))?;
    eprintln!("unmounted {}", abs.display());
    Ok(ExitCode::SUCCESS)
}

/// The glibc tunable that backs large allocations with transparent huge pages
/// (where the kernel grants them on request, the usual `madvise` setting). Every
/// chunk the daemon caches is fresh memory, and faulting it in 4 KiB at a time
/// costs about as much CPU as decrypting it: a cold 1 GiB read takes half the
/// system time with it. glibc reads tunables only at start, so the daemon gets it
/// through its environment.
const HUGE_PAGES: &str = "glibc.malloc.hugetlb=1";

/// `GLIBC_TUNABLES` with `HUGE_PAGES` added; `None` when it already says something
/// about huge pages (a setting of the user's own is kept).
fn tunables_with_huge_pages() -> Option<String> {
    let current = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    if current.contains("glibc.malloc.hugetlb") {
        return None;
    }
    Some(if current.is_empty() { HUGE_PAGES.to_string() } else { format!("{current}:{HUGE_PAGES}") })
}

/// Runs this same command again with `HUGE_PAGES` in effect, before anything is
/// read or opened. If that cannot be done the mount goes on without it.
pub fn reexec_with_huge_pages() {
    let Some(tunables) = tunables_with_huge_pages() else { return };
    let Ok(exe) = std::env::current_exe() else { return };
    let err = Command::new(exe).args(std::env::args_os().skip(1)).env("GLIBC_TUNABLES", tunables).exec();
    tracing::debug!("running without huge pages: cannot execute ebb again: {err}");
}

/// What the daemon says on its stdout once the mount serves: this line, after
/// warnings for the user, each a line that starts with `WARNING`.
const READY: &str = "ready";
const WARNING: &str = "warning: ";

/// Starts `ebb ... mount --foreground --handoff` detached, and returns once its mount
/// is ready. The daemon starts while this process derives the key, and gets it on its
/// stdin: the derivation, a deliberate cost, overlaps the daemon's start-up, and no
/// secret is left in the daemon's environment. The daemon says "ready" on its stdout.
pub async fn start_daemon(g: &Global, mountpoint: &Path) -> Result<ExitCode> {
    let abs = check_mountpoint(mountpoint)?;
    let found = crate::context::find(g).await?;
    let secret = crate::secret::secret(g, false)?;
    // The derivation starts first; the daemon is started while it runs.
    let unlock = tokio::spawn(async move { found.unlock(&secret).await });
    let mut daemon = Daemon::spawn(&abs)?;
    let repo = match unlock.await.expect("unlocking panicked") {
        Ok(repo) => repo,
        Err(e) => {
            // The daemon sees its stdin close and exits without mounting.
            daemon.abandon();
            return Err(e.into());
        }
    };
    daemon.hand_over(&repo.handoff());
    daemon.wait_ready(&abs)
}

/// A mount daemon being started.
struct Daemon {
    child: std::process::Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(abs: &Path) -> Result<Daemon> {
        let exe = std::env::current_exe().context("find the ebb executable")?;
        // One log per mountpoint, replaced by the next mount there, so logs do not pile
        // up; in a directory only this user can write to, so no one can plant a link
        // that has the daemon write elsewhere.
        let tag: String =
            abs.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        let dir = streamer::state::default_state_dir()
            .context("no directory for the mount daemon's log: set EBB_STATE_DIR or HOME")?
            .join("mounts");
        let dir = streamer::state::private_dir(&dir).with_context(|| format!("the log directory {}", dir.display()))?;
        let log = dir.join(format!("mount{tag}.log"));
        let log_file = streamer::state::create_private(&log).with_context(|| format!("create {}", log.display()))?;
        let mut cmd = Command::new(exe);
        cmd.args(std::env::args_os().skip(1)).args(["--foreground", "--handoff"]);
        if let Some(tunables) = tunables_with_huge_pages() {
            cmd.env("GLIBC_TUNABLES", tunables);
        }
        cmd.env_remove("EBB_PASSWORD");
        // Without a pre-exec hook the child is spawned without copying this process's
        // page tables, which hold the key derivation's 64 MiB by now.
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(log_file);
        let child = cmd.spawn().context("start the mount daemon")?;
        Ok(Daemon { child, log })
    }

    fn hand_over(&mut self, handoff: &[u8]) {
        if let Some(mut key) = self.child.stdin.take() {
            // A daemon that died already is reported by wait_ready, with its log.
            let _ = key.write_all(handoff);
        }
    }

    /// Lets the daemon go without a key: it exits, mounting nothing.
    fn abandon(mut self) {
        drop(self.child.stdin.take());
        if self.child.wait().is_ok() {
            let _ = std::fs::remove_file(&self.log);
        }
    }

    fn wait_ready(self, abs: &Path) -> Result<ExitCode> {
        let Daemon { mut child, log } = self;
        let said = child.stdout.take().context("the mount daemon's stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(said)) {
                let Ok(line) = line else { break };
                let ready = line == READY;
                let _ = tx.send(line);
                if ready {
                    return;
                }
            }
        });
        let deadline = std::time::Instant::now() + READY_TIMEOUT;
        let outcome = loop {
            match rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
                Ok(line) if line == READY => break Ok(true),
                Ok(line) => {
                    if let Some(w) = line.strip_prefix(WARNING) {
                        eprintln!("warning: {w}");
                    }
                }
                // Its stdout closed without "ready": the daemon failed, and said why in its log.
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break Ok(false),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break Err(()),
            }
        };
        match outcome {
            Ok(true) => {
                eprintln!(
                    "mounted at {} by daemon pid {} (log: {}); `ebb umount {}` to unmount",
                    abs.display(),
                    child.id(),
                    log.display(),
                    abs.display()
                );
                Ok(ExitCode::SUCCESS)
            }
            Ok(false) => {
                let status = child.wait().context("wait for the mount daemon")?;
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let _ = std::fs::remove_file(&log);
                eprint!("{text}");
                Ok(ExitCode::from(status.code().unwrap_or(1).clamp(1, 255) as u8))
            }
            Err(_) => {
                let _ = child.kill();
                bail!("the mount daemon did not get ready in {READY_TIMEOUT:?}; see {}", log.display());
            }
        }
    }
}

/// The daemon's side of `Daemon::spawn`: the key comes in on stdin, and "ready" goes
/// out on stdout.
struct Handoff;

impl Handoff {
    /// Leaves the session of `ebb mount`, so that its terminal's signals do not reach
    /// the daemon.
    fn begin() -> Handoff {
        // It fails only for a process group leader, which a spawned child is not.
        let _ = nix::unistd::setsid();
        Handoff
    }

    /// The key `ebb mount` sends once it has derived it, read in the background from
    /// the moment this is called.
    fn key(&self) -> impl std::future::Future<Output = Result<Vec<u8>>> {
        let read = tokio::task::spawn_blocking(|| {
            let mut buf = Vec::new();
            std::io::stdin().lock().read_to_end(&mut buf).map(|_| buf)
        });
        async {
            let key = read.await.expect("reading the key panicked").context("read the key from ebb mount")?;
            if key.is_empty() {
                bail!("ebb mount did not unlock the repository; nothing mounted");
            }
            Ok(key)
        }
    }

    /// Passes a warning to `ebb mount`, which shows it.
    fn warn(&self, text: &str) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{WARNING}{}", text.replace('\n', " ")).and_then(|()| out.flush());
    }

    /// Tells `ebb mount` the mount is ready, and sends stdout to the log from then on.
    fn ready(self) {
        let mut out = std::io::stdout().lock();
        // Nobody to tell if it has gone; the mount serves all the same.
        let _ = writeln!(out, "{READY}").and_then(|()| out.flush());
        let _ = nix::unistd::dup2_stdout(std::io::stderr());
        if let Ok(null) = std::fs::File::open("/dev/null") {
            let _ = nix::unistd::dup2_stdin(null);
        }
    }
}

pub fn umount(mountpoint: &Path) -> Result<ExitCode> {
    let abs = std::path::absolute(mountpoint).with_context(|| format!("resolve {}", mountpoint.display()))?;
    match mounted_at(&abs) {
        None => return Err(UsageError(format!("{} is not mounted", abs.display())).into()),
        Some(m) if !m.is_ebb() => {
            let Mounted { fstype, source } = m;
            return Err(UsageError(format!(
                "{} is not an ebb mount (it is {fstype} from {source}); `ebb umount` only unmounts what \
                 `ebb mount` mounted",
                abs.display()
            ))
            .into());
        }
        Some(_) => {}
    }
    let status = Command::new("fusermount3")
        .arg("-u")
        .arg(&abs)
        .status()
        .or_else(|_| Command::new("umount").arg(&abs).status())
        .context("run fusermount3 -u (install the fuse3 package)")?;
    if !status.success() {
        bail!("could not unmount {} (is a process still using it? see `fuser -vm {}`)", abs.display(), abs.display());
    }
    Ok(ExitCode::SUCCESS)
}
