//! The mount daemon: `ebb mount` starts it (`Daemon`) and hands it the key it
//! derived; the daemon (`Handoff`) reads the key and says when its mount is ready.
//! Both run with transparent huge pages for the chunk cache.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// How long `ebb mount` waits for its daemon to have the mount ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

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

/// A mount daemon being started.
pub struct Daemon {
    child: std::process::Child,
    log: PathBuf,
}

impl Daemon {
    pub fn spawn(abs: &Path) -> Result<Daemon> {
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

    pub fn hand_over(&mut self, handoff: &[u8]) {
        if let Some(mut key) = self.child.stdin.take() {
            // A daemon that died already is reported by wait_ready, with its log.
            let _ = key.write_all(handoff);
        }
    }

    /// Lets the daemon go without a key: it exits, mounting nothing.
    pub fn abandon(mut self) {
        drop(self.child.stdin.take());
        if self.child.wait().is_ok() {
            let _ = std::fs::remove_file(&self.log);
        }
    }

    pub fn wait_ready(self, abs: &Path) -> Result<ExitCode> {
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
pub struct Handoff;

impl Handoff {
    /// Leaves the session of `ebb mount`, so that its terminal's signals do not reach
    /// the daemon.
    pub fn begin() -> Handoff {
        // It fails only for a process group leader, which a spawned child is not.
        let _ = nix::unistd::setsid();
        Handoff
    }

    /// The key `ebb mount` sends once it has derived it, read in the background from
    /// the moment this is called.
    pub fn key(&self) -> impl std::future::Future<Output = Result<Vec<u8>>> {
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
    pub fn warn(&self, text: &str) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{WARNING}{}", text.replace('\n', " ")).and_then(|()| out.flush());
    }

    /// Tells `ebb mount` the mount is ready, and sends stdout to the log from then on.
    pub fn ready(self) {
        let mut out = std::io::stdout().lock();
        // Nobody to tell if it has gone; the mount serves all the same.
        let _ = writeln!(out, "{READY}").and_then(|()| out.flush());
        let _ = nix::unistd::dup2_stdout(std::io::stderr());
        if let Ok(null) = std::fs::File::open("/dev/null") {
            let _ = nix::unistd::dup2_stdin(null);
        }
    }
}
