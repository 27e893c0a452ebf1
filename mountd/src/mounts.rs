//! What the kernel's mount table says about a path: whether something is mounted
//! there, and whether it is one of ebb's mounts (a FUSE filesystem whose source
//! `fs_name` named); and whether an error under a mount means its daemon is gone.

use std::path::Path;

/// The source an ebb mount of the repository at `url` shows in the mount table.
pub fn fs_name(url: &str) -> String {
    format!("ebb:{url}")
}

/// What is mounted at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mounted {
    pub fstype: String,
    pub source: String,
}

impl Mounted {
    /// Whether it is one of ebb's mounts: a FUSE filesystem that `fs_name` named.
    pub fn is_ebb(&self) -> bool {
        self.fstype.starts_with("fuse") && self.source.starts_with("ebb:")
    }
}

/// What is mounted at `path` (the last mount there), from /proc/self/mountinfo.
pub fn mounted_at(path: &Path) -> Option<Mounted> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounted_in(&info, &path.to_string_lossy())
}

/// Whether `path` is a mountpoint.
pub fn is_mounted(path: &Path) -> bool {
    mounted_at(path).is_some()
}

/// The last mount at `path` in the text of a mountinfo file.
fn mounted_in(info: &str, path: &str) -> Option<Mounted> {
    info.lines().rev().find_map(|l| {
        let mut fields = l.split(' ');
        if fields.clone().nth(4).is_none_or(|m| unescape(m) != path) {
            return None;
        }
        // After the optional fields, " - " then the type and the source.
        let mut after = fields.by_ref().skip_while(|f| *f != "-").skip(1);
        Some(Mounted { fstype: unescape(after.next()?), source: unescape(after.next()?) })
    })
}

/// Whether an error from a path under a FUSE mount means its daemon is gone. The
/// kernel answers ENOTCONN once it has aborted the connection; a request caught
/// while the daemon's device files are being closed gets ECONNABORTED.
pub fn daemon_gone(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED))
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:35 / /mnt/a\\040b rw,nosuid shared:20 master:3 - fuse.ebb ebb:file:///r\\040x ro,user_id=1000
41 22 0:36 / /mnt/other rw - fuse.sshfs host:/dir rw
42 40 0:37 / /mnt/a\\040b rw - tmpfs tmpfs rw
";

    #[test]
    fn the_last_mount_at_a_path_with_its_type_and_source() {
        let m = mounted_in(INFO, "/mnt/other").unwrap();
        assert_eq!((m.fstype.as_str(), m.source.as_str()), ("fuse.sshfs", "host:/dir"));
        assert!(!m.is_ebb(), "FUSE, but not ebb's");
        assert_eq!(mounted_in(INFO, "/mnt/a b").unwrap().fstype, "tmpfs", "the last mount there is what shows");
        let first = INFO.lines().take(2).collect::<Vec<_>>().join("\n");
        let ebb = mounted_in(&first, "/mnt/a b").unwrap();
        assert_eq!(ebb.source, "ebb:file:///r x");
        assert!(ebb.is_ebb());
        assert_eq!(ebb.source, fs_name("file:///r x"));
        assert!(mounted_in(INFO, "/mnt").is_none());
        assert!(mounted_in("garbage\n", "/mnt").is_none());
    }

    #[test]
    fn escapes_undone() {
        assert_eq!(unescape("a\\040b\\011c\\012d\\134e"), "a b\tc\nd\\e");
    }

    #[test]
    fn a_gone_daemon_is_told_apart() {
        assert!(daemon_gone(&std::io::Error::from_raw_os_error(libc::ENOTCONN)));
        assert!(daemon_gone(&std::io::Error::from_raw_os_error(libc::ECONNABORTED)));
        assert!(!daemon_gone(&std::io::Error::from_raw_os_error(libc::ENOENT)));
    }
}
