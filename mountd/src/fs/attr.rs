//! What `stat` shows of an inode: the attributes of a stored entry, and of the
//! directories and links the mount makes up.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use catalog::tree::{Entry, EntryKind, Extent, Timestamp as TreeTime};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

/// The attributes of an inode, as `stat` shows them.
#[derive(Debug, Clone)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    /// 512-byte blocks that hold data (holes take none).
    pub blocks: u64,
    /// Permission bits, setuid, setgid and sticky included.
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub mtime: SystemTime,
    /// Whether the attributes can change while mounted (made-up entries).
    pub volatile: bool,
}

pub(crate) fn kind_of(k: EntryKind) -> Kind {
    match k {
        EntryKind::File => Kind::File,
        EntryKind::Dir => Kind::Dir,
        EntryKind::Symlink => Kind::Symlink,
        EntryKind::Fifo => Kind::Fifo,
        EntryKind::Socket => Kind::Socket,
        EntryKind::CharDevice => Kind::CharDevice,
        EntryKind::BlockDevice => Kind::BlockDevice,
    }
}

fn to_system(t: TreeTime) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs()) + Duration::from_nanos(t.nsec as u64)
    }
}

/// The attributes of stored entry `e` shown as inode `ino`.
pub(crate) fn of_entry(ino: u64, e: &Entry) -> Attr {
    let data: u64 = e.content.iter().map(|x| if let Extent::Data(b) = x { b.raw_len as u64 } else { 0 }).sum();
    let (size, blocks) = match e.kind {
        EntryKind::File => (e.size, data.div_ceil(512)),
        EntryKind::Dir => {
            let size = if e.size == 0 { 4096 } else { e.size };
            (size, size.div_ceil(512))
        }
        EntryKind::Symlink => (e.target.len() as u64, 0),
        _ => (0, 0),
    };
    Attr {
        ino,
        kind: kind_of(e.kind),
        size,
        blocks,
        perm: (e.mode & 0o7777) as u16,
        nlink: e.nlink.max(1),
        uid: e.uid,
        gid: e.gid,
        rdev: e.rdev as u32,
        mtime: to_system(e.mtime),
        volatile: false,
    }
}

/// Who owns the made-up entries, and the time they show: the mount's.
pub(crate) struct Owner {
    pub uid: u32,
    pub gid: u32,
    pub since: SystemTime,
}

impl Owner {
    /// The attributes of a made-up directory or link of `size` bytes.
    pub fn synthetic(&self, ino: u64, kind: Kind, size: u64) -> Attr {
        Attr {
            ino,
            kind,
            size,
            blocks: 0,
            perm: if kind == Kind::Dir { 0o555 } else { 0o777 },
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            mtime: self.since,
            volatile: true,
        }
    }
}
