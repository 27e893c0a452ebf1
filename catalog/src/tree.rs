//! Trees: one blob per directory, listing its entries sorted by name bytes. A file
//! entry lists its content as extents (data chunks and holes); a directory entry
//! points at its subtree blob. Unchanged directories encode to the same bytes and so
//! dedupe across points.

use crate::codec::{DecodeError, Decoder, Encoder};
use crate::pack::BlobRef;

/// Version 1 has no inode flags; version 2 adds them after `rdev`. A tree whose
/// entries all have no flags is written as version 1, so that what did not change
/// keeps its bytes, and its content id, across the change of format.
const VERSION_1: u8 = 1;
const VERSION_2: u8 = 2;

/// The inode flags (`FS_IOC_GETFLAGS`, as `lsattr` shows them) a user can set and
/// that are kept: s u c S i a d A m j t D T C x P F. Those the filesystem manages
/// itself (extents, indexes, inline data, encryption, verity) are not.
pub const KEPT_FLAGS: u32 = 0x1
    | 0x2
    | 0x4
    | 0x8
    | 0x10
    | 0x20
    | 0x40
    | 0x80
    | 0x400
    | 0x4000
    | 0x8000
    | 0x1_0000
    | 0x2_0000
    | 0x80_0000
    | 0x200_0000
    | 0x2000_0000
    | 0x4000_0000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File = 1,
    Dir = 2,
    Symlink = 3,
    Fifo = 4,
    Socket = 5,
    CharDevice = 6,
    BlockDevice = 7,
}

impl EntryKind {
    fn from_u8(v: u8) -> Option<EntryKind> {
        Some(match v {
            1 => EntryKind::File,
            2 => EntryKind::Dir,
            3 => EntryKind::Symlink,
            4 => EntryKind::Fifo,
            5 => EntryKind::Socket,
            6 => EntryKind::CharDevice,
            7 => EntryKind::BlockDevice,
            _ => return None,
        })
    }
}

/// A piece of a file's content, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    Data(BlobRef),
    /// A hole of this many bytes: reads as zeros, restored as a hole.
    Hole(u64),
}

impl Extent {
    pub fn len(&self) -> u64 {
        match self {
            Extent::Data(b) => b.raw_len as u64,
            Extent::Hole(n) => *n,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timestamp {
    pub sec: i64,
    pub nsec: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The name exactly as the filesystem has it: any bytes but `/` and NUL.
    pub name: Vec<u8>,
    pub kind: EntryKind,
    /// Permission bits including setuid, setgid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Files: the content length (the extents' total). Directories: the size the
    /// host's filesystem reported. Other kinds: 0.
    pub size: u64,
    pub mtime: Timestamp,
    /// Change time, inode and device: used only to tell whether a file changed since
    /// the previous point; never restored.
    pub ctime: Timestamp,
    pub inode: u64,
    pub device: u64,
    pub nlink: u32,
    /// Nonzero for files with several names: equal within one point for the names of
    /// one inode, so they are restored as hard links.
    pub link_group: u64,
    /// Device number of character and block devices.
    pub rdev: u64,
    /// Inode flags (`chattr`), within `KEPT_FLAGS`; 0 for most entries.
    pub flags: u32,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Symlink target.
    pub target: Vec<u8>,
    /// Directory contents.
    pub subtree: Option<BlobRef>,
    /// File contents.
    pub content: Vec<Extent>,
}

impl Entry {
    pub fn new(name: Vec<u8>, kind: EntryKind) -> Entry {
        Entry {
            name,
            kind,
            mode: 0,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: Timestamp::default(),
            ctime: Timestamp::default(),
            inode: 0,
            device: 0,
            nlink: 1,
            link_group: 0,
            rdev: 0,
            flags: 0,
            xattrs: Vec::new(),
            target: Vec::new(),
            subtree: None,
            content: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tree {
    pub entries: Vec<Entry>,
}

impl Tree {
    /// Sorts entries by name bytes, the order the format requires.
    pub fn sort(&mut self) {
        self.entries.sort_by(|a, b| a.name.cmp(&b.name));
    }

    pub fn find(&self, name: &[u8]) -> Option<&Entry> {
        self.entries.binary_search_by(|e| e.name.as_slice().cmp(name)).ok().map(|i| &self.entries[i])
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        let version = if self.entries.iter().any(|x| x.flags != 0) { VERSION_2 } else { VERSION_1 };
        e.u8(version);
        e.u32(self.entries.len() as u32);
        for entry in &self.entries {
            encode_entry(&mut e, entry, version);
        }
        e.buf
    }

    pub fn decode(bytes: &[u8]) -> Result<Tree, DecodeError> {
        let mut d = Decoder::new("tree", bytes);
        let v = d.u8()?;
        if v != VERSION_1 && v != VERSION_2 {
            return Err(d.error(format!("unknown tree version {v}")));
        }
        let n = d.count(MIN_ENTRY_LEN)?;
        let mut entries: Vec<Entry> = Vec::with_capacity(n);
        for _ in 0..n {
            let entry = decode_entry(&mut d, v)?;
            if entry.name.is_empty() || entry.name.contains(&b'/') || entry.name.contains(&0) {
                return Err(d.error("an entry name is empty or contains '/' or NUL"));
            }
            if entry.name == b"." || entry.name == b".." {
                return Err(d.error("an entry is named . or .."));
            }
            if let Some(prev) = entries.last() {
                if prev.name >= entry.name {
                    return Err(d.error("entries are not sorted and unique"));
                }
            }
            entries.push(entry);
        }
        d.finish()?;
        Ok(Tree { entries })
    }
}

/// Fixed-size part of an encoded entry (all fields but the variable-length ones).
const MIN_ENTRY_LEN: usize = 4 + 1 + 4 * 3 + 8 + 12 + 12 + 8 + 8 + 4 + 8 + 8 + 4;

fn encode_entry(e: &mut Encoder, x: &Entry, version: u8) {
    e.bytes(&x.name);
    e.u8(x.kind as u8);
    e.u32(x.mode);
    e.u32(x.uid);
    e.u32(x.gid);
    e.u64(x.size);
    e.i64(x.mtime.sec);
    e.u32(x.mtime.nsec);
    e.i64(x.ctime.sec);
    e.u32(x.ctime.nsec);
    e.u64(x.inode);
    e.u64(x.device);
    e.u32(x.nlink);
    e.u64(x.link_group);
    e.u64(x.rdev);
    if version >= VERSION_2 {
        e.u32(x.flags);
    }
    e.u32(x.xattrs.len() as u32);
    for (k, v) in &x.xattrs {
        e.bytes(k);
        e.bytes(v);
    }
    match x.kind {
        EntryKind::Symlink => e.bytes(&x.target),
        EntryKind::Dir => x.subtree.expect("a directory entry has a subtree").encode(e),
        EntryKind::File => {
            e.u32(x.content.len() as u32);
            for ext in &x.content {
                match ext {
                    Extent::Data(b) => {
                        e.u8(0);
                        b.encode(e);
                    }
                    Extent::Hole(n) => {
                        e.u8(1);
                        e.u64(*n);
                    }
                }
            }
        }
        _ => {}
    }
}

fn decode_entry(d: &mut Decoder, version: u8) -> Result<Entry, DecodeError> {
    let name = d.bytes()?.to_vec();
    let kind = EntryKind::from_u8(d.u8()?).ok_or_else(|| d.error("unknown entry kind"))?;
    let mut x = Entry::new(name, kind);
    x.mode = d.u32()?;
    if x.mode & !0o7777 != 0 {
        return Err(d.error("mode has bits beyond 0o7777"));
    }
    x.uid = d.u32()?;
    x.gid = d.u32()?;
    x.size = d.u64()?;
    x.mtime = Timestamp { sec: d.i64()?, nsec: d.u32()? };
    x.ctime = Timestamp { sec: d.i64()?, nsec: d.u32()? };
    if x.mtime.nsec >= 1_000_000_000 || x.ctime.nsec >= 1_000_000_000 {
        return Err(d.error("nanoseconds out of range"));
    }
    x.inode = d.u64()?;
    x.device = d.u64()?;
    x.nlink = d.u32()?;
    x.link_group = d.u64()?;
    x.rdev = d.u64()?;
    if version >= VERSION_2 {
        x.flags = d.u32()?;
        if x.flags & !KEPT_FLAGS != 0 {
            return Err(d.error("inode flags beyond those kept"));
        }
    }
    let nx = d.count(8)?;
    for _ in 0..nx {
        let k = d.bytes()?.to_vec();
        let v = d.bytes()?.to_vec();
        x.xattrs.push((k, v));
    }
    match kind {
        EntryKind::Symlink => x.target = d.bytes()?.to_vec(),
        EntryKind::Dir => x.subtree = Some(BlobRef::decode(d)?),
        EntryKind::File => {
            let n = d.count(9)?;
            let mut total = 0u64;
            for _ in 0..n {
                let ext = match d.u8()? {
                    0 => Extent::Data(BlobRef::decode(d)?),
                    1 => Extent::Hole(d.u64()?),
                    t => return Err(d.error(format!("unknown extent tag {t}"))),
                };
                total = total.checked_add(ext.len()).ok_or_else(|| d.error("extents overflow"))?;
                x.content.push(ext);
            }
            if total != x.size {
                return Err(d.error(format!("extents cover {total} bytes but the size is {}", x.size)));
            }
        }
        _ => {}
    }
    Ok(x)
}

/// A tree with one entry of each interesting shape: the golden test pins its
/// encoding, and the fuzzers start from it.
#[doc(hidden)]
pub fn sample() -> Tree {
    let blob =
        BlobRef { id: crate::id::Id([1; 32]), pack: crate::id::Id([2; 32]), offset: 10, length: 40, raw_len: 12 };
    let mut file = Entry::new(b"a\nfile\xff".to_vec(), EntryKind::File);
    file.mode = 0o4755;
    file.uid = 12345;
    file.gid = 54321;
    file.size = 112;
    file.mtime = Timestamp { sec: 1_700_000_000, nsec: 123_456_789 };
    file.xattrs = vec![(b"user.k".to_vec(), b"\x00v".to_vec())];
    file.content = vec![Extent::Data(blob), Extent::Hole(100)];
    let mut dir = Entry::new(b"d".to_vec(), EntryKind::Dir);
    dir.mode = 0o1777;
    dir.subtree = Some(blob);
    let mut link = Entry::new(b"l".to_vec(), EntryKind::Symlink);
    link.mode = 0o777;
    link.target = b"../nowhere".to_vec();
    let mut dev = Entry::new(b"null".to_vec(), EntryKind::CharDevice);
    dev.rdev = 0x103;
    let mut t = Tree { entries: vec![link, file, dir, dev] };
    t.sort();
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let t = sample();
        let bytes = t.encode();
        assert_eq!(Tree::decode(&bytes).unwrap(), t);
        for cut in 0..bytes.len() {
            assert!(Tree::decode(&bytes[..cut]).is_err());
        }
        assert_eq!(t.find(b"d").unwrap().kind, EntryKind::Dir);
        assert!(t.find(b"zz").is_none());
    }

    #[test]
    fn golden_tree() {
        // Pins the encoding: a change here must come with a new format version.
        let bytes = sample().encode();
        let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        assert_eq!(
            (bytes.len(), digest.as_str()),
            (570, "2916e8c7b252ed77d196e1618b763cab6b3a989e851fb0de5d6ebe5f629f94d9")
        );
    }

    #[test]
    fn golden_tree_v2() {
        // Version 2: the same tree with inode flags on two entries (immutable on the
        // file, append-only and no-dump on the directory), a u32 after rdev.
        let mut t = sample();
        t.entries.iter_mut().find(|e| e.kind == EntryKind::File).unwrap().flags = 0x10;
        t.entries.iter_mut().find(|e| e.kind == EntryKind::Dir).unwrap().flags = 0x20 | 0x40;
        let bytes = t.encode();
        assert_eq!(bytes[0], 2);
        // Four bytes more than version 1 per entry, nothing else.
        assert_eq!(bytes.len(), sample().encode().len() + 4 * t.entries.len());
        let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        assert_eq!(
            (bytes.len(), digest.as_str()),
            (586, "dfd47b44cedaa6407dd3ccc674cf8b09feb7e92650e10049a66483f8fe33f9d7")
        );
        assert_eq!(Tree::decode(&bytes).unwrap(), t);
        // Without flags, a tree is written as version 1, as before: the same bytes.
        assert_eq!(sample().encode()[0], 1);
        let mut beyond = t.clone();
        beyond.entries[0].flags = 0x80000; // extents: the filesystem's, not kept
        assert!(Tree::decode(&beyond.encode()).is_err());
    }

    #[test]
    fn unsorted_is_rejected() {
        let mut t = sample();
        t.entries.swap(0, 1);
        assert!(Tree::decode(&t.encode()).is_err());
    }
}
