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
