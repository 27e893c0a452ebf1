//! `ebb mount`: checks on the mountpoint, serving the mount in the foreground or
//! starting a daemon that does, and clean unmounting on SIGINT, SIGTERM or
//! `ebb umount`.

mod daemon;

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use catalog::time::TimeSpec;
use jiff::Timestamp;
use mountd::mounts::{daemon_gone, is_mounted};
use mountd::{Fs, Scope};

use crate::cli::{Global, UsageError};
use daemon::{Daemon, Handoff};

/// `ebb mount`: serves the mount in this process (`--foreground`), or starts a
/// daemon that does and returns once it is ready.
pub async fn mount(
    g: &Global,
    at: Option<TimeSpec>,
    source: Option<String>,
    caches: Caches,
    foreground: bool,
    handoff: bool,
    mountpoint: &Path,
) -> Result<ExitCode> {
    if foreground {
        daemon::reexec_with_huge_pages();
        serve(g, at, source, caches, mountpoint, handoff).await
    } else {
        start_daemon(g, mountpoint).await
    }
}

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
async fn serve(
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
        None => Scope::EveryPoint(source.clone()),
        Some(spec) => {
            let now = Timestamp::now();
            Scope::Moment(found.point_names().points_at(spec, source.as_deref(), now).await?, spec.instant(now))
        }
    };
    let repo = match key {
        Some(key) => found.unlock_handed(&key.await?)?,
        None => found.unlock(&crate::secret::secret(g, false)?).await?,
    };
    // A point that cannot be read is passed over for the one before it, with a
    // warning (to `ebb mount`, through the daemon's stdout, as well).
    let view = match view {
        Scope::Moment(points, at) => {
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
            Scope::Moment(readable, at)
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
        Scope::Moment(points, at) => {
            let of = points.iter().map(|p| format!("{} (point {})", p.source, p.time)).collect::<Vec<_>>().join(", ");
            format!("{of} as of {at}")
        }
        Scope::EveryPoint(Some(s)) => format!("every point of {s}"),
        Scope::EveryPoint(None) => "every point of every source".to_string(),
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
    // Whether the mount left its path without this daemon (`ebb umount`, a lazy
    // `fusermount3 -uz`): then it unmounts nothing, since a newer mount may be there.
    let gone = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break false,
            _ = term.recv() => break false,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if handle.finished() || !is_mounted(&abs) {
                    break true;
                }
            }
        }
    };
    if gone {
        handle.abandon();
    } else {
        handle.unmount().with_context(|| format!("unmount {}", abs.display()))?;
    }
    eprintln!("unmounted {}", abs.display());
    Ok(ExitCode::SUCCESS)
}

/// Starts `ebb ... mount --foreground --handoff` detached, and returns once its mount
/// is ready. The daemon starts while this process derives the key, and gets it on its
/// stdin: the derivation, a deliberate cost, overlaps the daemon's start-up, and no
/// secret is left in the daemon's environment. The daemon says "ready" on its stdout.
async fn start_daemon(g: &Global, mountpoint: &Path) -> Result<ExitCode> {
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
