//! `compare_trees`: an entry-by-entry comparison of two directory trees that never
//! follows symlinks (lstat only) and reports every difference a backup tool could
//! introduce, as human-readable lines.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs::{self, File, Metadata};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

/// What to compare. `Default` compares everything.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// Compare mode, owner, mtime and xattrs of the two roots themselves (their names
    /// and contents are always compared). Off for e.g. a mount point's root.
    pub root_metadata: bool,
    /// Files sharing an inode on one side must share one on the other, and vice versa.
    pub hard_links: bool,
    /// Holes stay holes: SEEK_DATA/SEEK_HOLE data and st_blocks of `actual` must not
    /// exceed those of `expected` by more than 1 MiB (plus 1/8 for st_blocks).
    pub sparseness: bool,
    pub xattrs: bool,
    /// How many differences are listed before the rest are only counted.
    pub max_reported: usize,
}

impl Default for CompareOptions {
    fn default() -> Self {
        CompareOptions { root_metadata: true, hard_links: true, sparseness: true, xattrs: true, max_reported: 50 }
    }
}

/// Differences between `expected` and `actual` with every check on; empty means
/// identical. At most 50 are listed, followed by a line with the count of the rest.
pub fn compare_trees(expected: &Path, actual: &Path) -> Vec<String> {
    compare_trees_with(expected, actual, &CompareOptions::default())
}

/// Panics with the list of differences unless the trees are identical.
pub fn assert_trees_equal(expected: &Path, actual: &Path) {
    assert_trees_equal_with(expected, actual, &CompareOptions::default())
}

pub fn assert_trees_equal_with(expected: &Path, actual: &Path, opts: &CompareOptions) {
    let diffs = compare_trees_with(expected, actual, opts);
    if !diffs.is_empty() {
        panic!(
            "trees differ\n  expected: {}\n  actual:   {}\n{}",
            expected.display(),
            actual.display(),
            diffs.iter().map(|d| format!("  - {d}")).collect::<Vec<_>>().join("\n")
        );
    }
}

pub fn compare_trees_with(expected: &Path, actual: &Path, opts: &CompareOptions) -> Vec<String> {
    let mut c = Comparer {
        expected,
        actual,
        opts,
        diffs: Vec::new(),
        total: 0,
        inodes_e: HashMap::new(),
        inodes_a: HashMap::new(),
    };
    c.entry(Path::new(""), true);
    if opts.hard_links {
        c.hard_links();
    }
    let mut out = c.diffs;
    if c.total > out.len() {
        out.push(format!("... and {} more differences", c.total - out.len()));
    }
    out
}

/// A relative path for messages: quoted, "." for the root, with non-UTF-8 bytes as
/// `\xNN`, control characters escaped and backslashes doubled.
pub fn show(rel: &Path) -> String {
    if rel.as_os_str().is_empty() {
        return "\".\"".to_string();
    }
    format!("\"{}\"", escape_bytes(rel.as_os_str().as_bytes()))
}

pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut s = String::new();
    for chunk in bytes.utf8_chunks() {
        for ch in chunk.valid().chars() {
            match ch {
                '\\' => s.push_str("\\\\"),
                '"' => s.push_str("\\\""),
                '\n' => s.push_str("\\n"),
                '\t' => s.push_str("\\t"),
                c if c.is_control() => s.push_str(&format!("\\u{{{:x}}}", c as u32)),
                c => s.push(c),
            }
        }
        for b in chunk.invalid() {
            s.push_str(&format!("\\x{b:02x}"));
        }
    }
    s
}

fn show_value(v: &[u8]) -> String {
    const MAX: usize = 48;
    let (head, more) = if v.len() <= MAX { (v, "") } else { (&v[..MAX], "...") };
    let texty = std::str::from_utf8(head).is_ok_and(|s| s.chars().all(|c| !c.is_control() || c == '\n' || c == '\t'));
    if texty {
        format!("{} bytes \"{}\"{more}", v.len(), escape_bytes(head))
    } else {
        format!("{} bytes 0x{}{more}", v.len(), head.iter().map(|b| format!("{b:02x}")).collect::<String>())
    }
}

fn type_name(m: &Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_file() {
        "regular file"
    } else if t.is_dir() {
        "directory"
    } else if t.is_symlink() {
        "symlink"
    } else if t.is_fifo() {
        "fifo"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() {
        "char device"
    } else if t.is_block_device() {
        "block device"
    } else {
        "unknown type"
    }
}

struct Comparer<'a> {
    expected: &'a Path,
    actual: &'a Path,
    opts: &'a CompareOptions,
    diffs: Vec<String>,
    total: usize,
    /// (dev, ino) -> relative paths, for non-directories found on both sides.
    inodes_e: HashMap<(u64, u64), Vec<PathBuf>>,
    inodes_a: HashMap<(u64, u64), Vec<PathBuf>>,
}

impl Comparer<'_> {
    fn diff(&mut self, rel: &Path, what: String) {
        self.total += 1;
        if self.diffs.len() < self.opts.max_reported {
            self.diffs.push(format!("{}: {what}", show(rel)));
        }
    }

    fn entry(&mut self, rel: &Path, is_root: bool) {
        let (ep, ap) = (self.expected.join(rel), self.actual.join(rel));
        let (e, a) = match (fs::symlink_metadata(&ep), fs::symlink_metadata(&ap)) {
            (Ok(e), Ok(a)) => (e, a),
            (e, a) => {
                if let Err(err) = e {
                    self.diff(rel, format!("cannot lstat in expected ({}): {err}", ep.display()));
                }
                if let Err(err) = a {
                    self.diff(rel, format!("cannot lstat in actual ({}): {err}", ap.display()));
                }
                return;
            }
        };
        if (e.mode() & libc::S_IFMT) != (a.mode() & libc::S_IFMT) {
            self.diff(rel, format!("type differs: expected {}, actual {}", type_name(&e), type_name(&a)));
            return;
        }

        if !is_root || self.opts.root_metadata {
            self.metadata(rel, &ep, &ap, &e, &a);
        }

        let t = e.file_type();
        if t.is_dir() {
            self.directory(rel, &ep, &ap);
            return;
        }
        self.inodes_e.entry((e.dev(), e.ino())).or_default().push(rel.to_path_buf());
        self.inodes_a.entry((a.dev(), a.ino())).or_default().push(rel.to_path_buf());
        if t.is_file() {
            self.regular(rel, &ep, &ap, &e, &a);
        } else if t.is_symlink() {
            match (fs::read_link(&ep), fs::read_link(&ap)) {
                (Ok(te), Ok(ta)) => {
                    if te != ta {
                        self.diff(rel, format!("symlink target differs: expected {}, actual {}", show(&te), show(&ta)));
                    }
                }
                (te, ta) => self.diff(rel, format!("cannot readlink: expected {te:?}, actual {ta:?}")),
            }
        } else if (t.is_char_device() || t.is_block_device()) && e.rdev() != a.rdev() {
            let (re, ra) = (e.rdev(), a.rdev());
            self.diff(
                rel,
                format!(
                    "device number (rdev) differs: expected {}:{}, actual {}:{}",
                    libc::major(re),
                    libc::minor(re),
                    libc::major(ra),
                    libc::minor(ra)
                ),
            );
        }
    }

    fn metadata(&mut self, rel: &Path, ep: &Path, ap: &Path, e: &Metadata, a: &Metadata) {
        let (me, ma) = (e.mode() & 0o7777, a.mode() & 0o7777);
        if me != ma {
            self.diff(rel, format!("mode differs: expected {me:04o}, actual {ma:04o}"));
        }
        if e.uid() != a.uid() {
            self.diff(rel, format!("uid differs: expected {}, actual {}", e.uid(), a.uid()));
        }
        if e.gid() != a.gid() {
            self.diff(rel, format!("gid differs: expected {}, actual {}", e.gid(), a.gid()));
        }
        if (e.mtime(), e.mtime_nsec()) != (a.mtime(), a.mtime_nsec()) {
            self.diff(
                rel,
                format!(
                    "mtime differs: expected {}.{:09}, actual {}.{:09}",
                    e.mtime(),
                    e.mtime_nsec(),
                    a.mtime(),
                    a.mtime_nsec()
                ),
            );
        }
        if self.opts.xattrs {
            self.xattrs(rel, ep, ap, e.file_type().is_symlink());
        }
    }

    fn xattrs(&mut self, rel: &Path, ep: &Path, ap: &Path, is_symlink: bool) {
        let (xe, xa) = match (xattr_map(ep), xattr_map(ap)) {
            (Ok(xe), Ok(xa)) => (xe, xa),
            (xe, xa) => {
                // Some filesystems refuse xattr calls on symlinks; that is not a difference.
                if !is_symlink {
                    if let Err(err) = xe {
                        self.diff(rel, format!("cannot read xattrs in expected: {err}"));
                    }
                    if let Err(err) = xa {
                        self.diff(rel, format!("cannot read xattrs in actual: {err}"));
                    }
                }
                return;
            }
        };
        let names: BTreeSet<&OsString> = xe.keys().chain(xa.keys()).collect();
        for name in names {
            let n = escape_bytes(name.as_bytes());
            match (xe.get(name), xa.get(name)) {
                (Some(_), None) => self.diff(rel, format!("xattr {n} missing in actual")),
                (None, Some(v)) => self.diff(rel, format!("xattr {n} only in actual ({})", show_value(v))),
                (Some(ve), Some(va)) if ve != va => self.diff(
                    rel,
                    format!("xattr {n} value differs: expected {}, actual {}", show_value(ve), show_value(va)),
                ),
                _ => {}
            }
        }
    }

    fn directory(&mut self, rel: &Path, ep: &Path, ap: &Path) {
        let (ne, na) = match (dir_names(ep), dir_names(ap)) {
            (Ok(ne), Ok(na)) => (ne, na),
            (ne, na) => {
                if let Err(err) = ne {
                    self.diff(rel, format!("cannot list directory in expected: {err}"));
                }
                if let Err(err) = na {
                    self.diff(rel, format!("cannot list directory in actual: {err}"));
                }
                return;
            }
        };
        for name in ne.difference(&na) {
            self.diff(&rel.join(name), "only in expected (missing in actual)".to_string());
        }
        for name in na.difference(&ne) {
            self.diff(&rel.join(name), "only in actual (not in expected)".to_string());
        }
        for name in ne.intersection(&na) {
            self.entry(&rel.join(name), false);
        }
    }

    fn regular(&mut self, rel: &Path, ep: &Path, ap: &Path, e: &Metadata, a: &Metadata) {
        if e.size() != a.size() {
            self.diff(rel, format!("size differs: expected {}, actual {}", e.size(), a.size()));
        } else {
            match first_difference(ep, ap) {
                Ok(None) => {}
                Ok(Some(off)) => self.diff(rel, format!("content differs, first at byte offset {off}")),
                Err(err) => self.diff(rel, format!("cannot compare content: {err}")),
            }
        }
        if !self.opts.sparseness {
            return;
        }
        match (data_bytes(ep), data_bytes(ap)) {
            (Ok(de), Ok(da)) => {
                if da > de + MIB {
                    self.diff(
                        rel,
                        format!(
                            "sparseness lost (holes filled): expected {de} bytes in data regions \
                             (SEEK_DATA/SEEK_HOLE), actual {da}"
                        ),
                    );
                }
            }
            (de, da) => self.diff(rel, format!("cannot map data regions: expected {de:?}, actual {da:?}")),
        }
        let (be, ba) = (e.blocks() * 512, a.blocks() * 512);
        if ba > be + MIB + be / 8 {
            self.diff(rel, format!("sparseness lost: allocated (st_blocks*512) expected {be} bytes, actual {ba}"));
        }
    }

    /// Compares the partition of paths by inode: for each group of paths sharing an
    /// inode in `expected` (singletons included), their inodes in `actual` must be one
    /// and shared with no other path; and the same the other way round.
    fn hard_links(&mut self) {
        let groups = |m: &HashMap<(u64, u64), Vec<PathBuf>>| -> HashMap<PathBuf, Vec<PathBuf>> {
            let mut out = HashMap::new();
            for paths in m.values() {
                let mut g = paths.clone();
                g.sort();
                for p in &g {
                    out.insert(p.clone(), g.clone());
                }
            }
            out
        };
        let (ge, ga) = (groups(&self.inodes_e), groups(&self.inodes_a));
        let fmt = |g: &[PathBuf]| g.iter().map(|p| show(p)).collect::<Vec<_>>().join(", ");
        let mut reported = BTreeSet::new();
        let mut paths: Vec<&PathBuf> = ge.keys().collect();
        paths.sort();
        for p in paths {
            let (e, a) = (&ge[p], &ga[p]);
            if e == a || !reported.insert((e.clone(), a.clone())) {
                continue;
            }
            let what = if e.len() > 1 {
                format!("hard links differ: expected one inode for [{}], actual one inode for [{}]", fmt(e), fmt(a))
            } else {
                format!("hard links differ: expected its own inode, actual one inode for [{}]", fmt(a))
            };
            self.diff(p, what);
        }
    }
}

fn xattr_map(path: &Path) -> io::Result<BTreeMap<OsString, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for name in xattr::list(path)? {
        // A value can vanish between list and get; report it as missing.
        if let Some(v) = xattr::get(path, &name)? {
            out.insert(name, v);
        }
    }
    Ok(out)
}

fn dir_names(path: &Path) -> io::Result<BTreeSet<OsString>> {
    fs::read_dir(path)?.map(|e| e.map(|e| e.file_name())).collect()
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The offset of the first differing byte (or where one file ends early), streamed.
pub fn first_difference(a: &Path, b: &Path) -> io::Result<Option<u64>> {
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 256 << 10], vec![0u8; 256 << 10]);
    let mut off = 0u64;
    loop {
        let (na, nb) = (read_full(&mut fa, &mut ba)?, read_full(&mut fb, &mut bb)?);
        let n = na.min(nb);
        if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
            return Ok(Some(off + i as u64));
        }
        if na != nb {
            return Ok(Some(off + n as u64));
        }
        if na == 0 {
            return Ok(None);
        }
        off += na as u64;
    }
}

/// The [start, end) data regions of a file per SEEK_DATA/SEEK_HOLE (the whole file
/// if the filesystem does not support them).
pub fn data_regions(path: &Path) -> io::Result<Vec<(u64, u64)>> {
    let f = File::open(path)?;
    let size = f.metadata()?.len();
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < size {
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::ENXIO) => break,
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => return Ok(vec![(0, size)]),
                _ => return Err(err),
            }
        }
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        out.push((data as u64, hole as u64));
        if hole <= data {
            break;
        }
        pos = hole;
    }
    Ok(out)
}

/// Bytes covered by data regions (see `data_regions`).
pub fn data_bytes(path: &Path) -> io::Result<u64> {
    Ok(data_regions(path)?.iter().map(|(s, e)| e - s).sum())
}
