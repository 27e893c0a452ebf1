//! `ebb umount`: unmounting what `ebb mount` mounted, and nothing else.

use std::path::Path;
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use mountd::mounts::{mounted_at, Mounted};

use crate::cli::UsageError;

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
    // A mount whose daemon is gone answers nothing: detached at once (lazily),
    // whatever still holds it (processes that used it, such as a PostgreSQL
    // server's children, see errors and end).
    // (A listing asks the daemon: attributes may still be cached for a moment.)
    let gone = std::fs::read_dir(&abs).is_err_and(|e| mountd::mounts::daemon_gone(&e));
    let status = Command::new("fusermount3")
        .arg("-u")
        .args(gone.then_some("-z"))
        .arg(&abs)
        .status()
        .or_else(|_| Command::new("umount").arg(&abs).status())
        .context("run fusermount3 -u (install the fuse3 package)")?;
    if !status.success() {
        bail!("could not unmount {} (is a process still using it? see `fuser -vm {}`)", abs.display(), abs.display());
    }
    Ok(ExitCode::SUCCESS)
}
