//! `build_fidelity_tree`: a directory tree that holds every case a backup tool must
//! preserve, and a small seeded PRNG for reproducible test data.
//!
//! All paths in [`FidelityInfo`] are relative to the tree's root, so a test can join
//! them onto a restore target or a mount point as well as onto the original.

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, Permissions};
use std::io::{self, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{lchown, symlink, FileExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

pub const MIB: u64 = 1 << 20;

/// Owner ids that have no passwd/group entry on a test machine.
pub const FOREIGN_UID: u32 = 12345;
pub const FOREIGN_GID: u32 = 54321;

/// (seconds, nanoseconds) since the epoch.
pub type Timestamp = (i64, i64);
pub const EXACT_MTIME: Timestamp = (1_700_000_000, 123_456_789);
pub const SYMLINK_MTIME: Timestamp = (1_700_000_001, 987_654_321);
pub const DIR_MTIME: Timestamp = (1_700_000_002, 999_999_999);
pub const WHOLE_SECOND_MTIME: Timestamp = (1_700_000_003, 0);
/// 1960-01-01T00:00:00.25Z: before the epoch (negative seconds).
pub const PRE_EPOCH_MTIME: Timestamp = (-315_619_200, 250_000_000);
/// 2100-01-01T00:00:00.000000001Z: past 2038 (needs 64-bit times on disk).
pub const FUTURE_MTIME: Timestamp = (4_102_444_800, 1);

/// Levels of `deep/level-NN/...`.
pub const DEEP_LEVELS: usize = 40;
/// Entries in `wide/`.
pub const WIDE_ENTRIES: usize = 500;

pub const RANDOM_SEED: u64 = 0x00EB_B5EE_D000_0001;
pub const RANDOM_LEN: u64 = 3 * MIB + 12_345;
pub const SPARSE_LEN: u64 = 64 * MIB;
pub const HOLE_ONLY_LEN: u64 = 16 * MIB;

/// xorshift64* — a tiny, seeded, reproducible PRNG (not for cryptography).
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        let s = seed ^ 0x9E37_79B9_7F4A_7C15;
        XorShift(if s == 0 { 0x2545_F491_4F6C_DD1D } else { s })
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let v = self.next_u64().to_le_bytes();
            rest.copy_from_slice(&v[..rest.len()]);
        }
    }
}

/// `len` incompressible bytes, the same for the same seed.
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    XorShift::new(seed).fill(&mut v);
    v
}

/// What `build_fidelity_tree` made. Paths are relative to `root`.
#[derive(Debug, Clone)]
pub struct FidelityInfo {
    /// The root the tree was built in (absolute or as passed).
    pub root: PathBuf,

    // Regular files.
    pub empty_file: PathBuf,
    pub tiny_file: PathBuf,
    pub tiny_content: Vec<u8>,
    /// RANDOM_LEN bytes of `pseudo_random_bytes(RANDOM_SEED, ..)`.
    pub random_file: PathBuf,
    /// Same content as `random_file`, a separate inode (dedupe must not hard-link them).
    pub random_copy: PathBuf,
    /// About 1 MiB of highly compressible text.
    pub text_file: PathBuf,
    /// Files with the same content as each other in `wide/` etc. are not listed.
    pub wide_dir: PathBuf,

    // Sparse files.
    /// SPARSE_LEN logical bytes; data only in `sparse_data`, holes elsewhere.
    pub sparse_file: PathBuf,
    pub sparse_len: u64,
    /// [start, end) byte ranges written with data; everything else is a hole.
    pub sparse_data: Vec<(u64, u64)>,
    /// HOLE_ONLY_LEN bytes, no data at all.
    pub hole_only_file: PathBuf,

    // Directories.
    pub empty_dir: PathBuf,
    /// A file at the bottom of DEEP_LEVELS nested directories.
    pub deep_leaf: PathBuf,

    // Symlinks.
    pub symlink_relative: PathBuf,
    pub symlink_absolute: PathBuf,
    pub symlink_dangling: PathBuf,
    pub symlink_to_dir: PathBuf,
    pub symlink_loop: PathBuf,
    /// Its target is not UTF-8.
    pub symlink_raw_target: PathBuf,

    /// Three names of one inode, across two directories.
    pub hardlinks: Vec<PathBuf>,

    // Mode bits (set with chmod, independent of umask).
    pub setuid_file: PathBuf,    // 04755
    pub setgid_file: PathBuf,    // 02755
    pub all_bits_file: PathBuf,  // 07777
    pub sticky_dir: PathBuf,     // 01777
    pub setgid_dir: PathBuf,     // 02775
    pub mode_0000_file: PathBuf, // 0000
    pub mode_0600_file: PathBuf, // 0600
    pub mode_0777_file: PathBuf, // 0777
    pub locked_dir: PathBuf,     // 0000, with a file inside

    // Numeric owners without passwd entries (FOREIGN_UID:FOREIGN_GID).
    pub foreign_owner_file: PathBuf,
    pub foreign_owner_dir: PathBuf,
    pub foreign_owner_symlink: PathBuf,
    /// FOREIGN_UID:FOREIGN_GID and 04750 (chown clears setuid, so order matters).
    pub foreign_setuid_file: PathBuf,

    // Times (every entry has a distinct mtime with nanoseconds; these are exact).
    pub exact_mtime_file: PathBuf,    // EXACT_MTIME
    pub exact_mtime_dir: PathBuf,     // DIR_MTIME
    pub exact_mtime_symlink: PathBuf, // SYMLINK_MTIME
    pub whole_second_file: PathBuf,   // WHOLE_SECOND_MTIME
    pub pre_epoch_file: PathBuf,      // PRE_EPOCH_MTIME
    pub future_file: PathBuf,         // FUTURE_MTIME

    // Extended attributes.
    /// Whether `user.*` xattrs could be set at `root`; if not, none were set.
    pub xattrs_supported: bool,
    pub xattr_error: Option<String>,
    pub xattr_file: PathBuf,
    pub xattr_dir: PathBuf,
    /// Every (path, name, value) that was set.
    pub xattrs: Vec<(PathBuf, OsString, Vec<u8>)>,

    // Names.
    /// Every odd name made under `names/` (files, plus one directory).
    pub odd_names: Vec<PathBuf>,
    pub non_utf8_name: PathBuf,
    pub newline_name: PathBuf,
    pub backslash_name: PathBuf,
    pub long_name: PathBuf, // exactly 255 bytes
    pub unicode_name: PathBuf,

    // Special files.
    pub fifo: PathBuf,
    pub socket: Option<PathBuf>,
    pub socket_error: Option<String>,
    /// `special/null`, char 1:3, if mknod worked.
    pub char_device: Option<PathBuf>,
    /// `special/block`, block 7:200, if mknod worked.
    pub block_device: Option<PathBuf>,
    pub mknod_ok: bool,
    pub mknod_error: Option<String>,
}

impl FidelityInfo {
    pub fn abs(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.root.join(rel)
    }
}

fn p(s: &str) -> PathBuf {
    PathBuf::from(s)
}

fn pb(bytes: &[u8]) -> PathBuf {
    PathBuf::from(OsString::from_vec(bytes.to_vec()))
}

pub(crate) fn cpath(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("path contains a NUL byte")
}

fn ctx<T>(r: io::Result<T>, what: &str, path: &Path) -> T {
    r.unwrap_or_else(|e| panic!("build_fidelity_tree: {what} {}: {e}", path.display()))
}

/// Sets mtime (and atime to the same) without following a final symlink.
pub fn set_mtime(path: &Path, (sec, nsec): Timestamp) -> io::Result<()> {
    let ts = libc::timespec { tv_sec: sec as libc::time_t, tv_nsec: nsec as _ };
    let times = [ts, ts];
    let c = cpath(path);
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// lstat's mtime as (seconds, nanoseconds).
pub fn get_mtime(path: &Path) -> io::Result<Timestamp> {
    let m = fs::symlink_metadata(path)?;
    Ok((m.mtime(), m.mtime_nsec()))
}

pub fn chmod(path: &Path, mode: u32) -> io::Result<()> {
    fs::set_permissions(path, Permissions::from_mode(mode))
}

fn mknod(path: &Path, kind: libc::mode_t, mode: u32, major: u32, minor: u32) -> io::Result<()> {
    let c = cpath(path);
    let r = unsafe { libc::mknod(c.as_ptr(), kind | mode as libc::mode_t, libc::makedev(major, minor)) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn mkfifo(path: &Path, mode: u32) -> io::Result<()> {
    let c = cpath(path);
    let r = unsafe { libc::mkfifo(c.as_ptr(), mode as libc::mode_t) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Binds a unix socket at `path` and closes it (the socket file stays). Paths too
/// long for `sun_path` are bound through `/proc/self/fd/<dir fd>/<name>`.
fn make_socket(path: &Path) -> io::Result<()> {
    if path.as_os_str().len() < 100 {
        return UnixListener::bind(path).map(drop);
    }
    let dir = File::open(path.parent().expect("socket path has a parent"))?;
    let name = path.file_name().expect("socket path has a name");
    let mut via = OsString::from(format!("/proc/self/fd/{}/", dir.as_raw_fd()));
    via.push(name);
    UnixListener::bind(&via).map(drop)
}

fn write_file(path: &Path, content: &[u8], mode: u32) {
    ctx(fs::write(path, content), "write", path);
    ctx(chmod(path, mode), "chmod", path);
}

fn mkdir(path: &Path, mode: u32) {
    ctx(fs::create_dir(path), "mkdir", path);
    ctx(chmod(path, mode), "chmod", path);
}

fn compressible_text(approx_len: usize) -> Vec<u8> {
    let words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"];
    let mut out = Vec::with_capacity(approx_len + 128);
    let mut i = 0usize;
    while out.len() < approx_len {
        writeln!(
            out,
            "line {i:07}: the quick brown fox jumps over the lazy dog; {} {} {}",
            words[i % 8],
            words[(i / 8) % 8],
            words[(i / 64) % 8]
        )
        .unwrap();
        i += 1;
    }
    out
}

/// Builds the fidelity tree under `root` (created if missing; it should be empty).
/// Panics on any failure except the ones that depend on the environment and are
/// recorded in the returned info instead: user xattrs, mknod, unix sockets.
pub fn build_fidelity_tree(root: &Path) -> FidelityInfo {
    ctx(fs::create_dir_all(root), "create root", root);
    let r = |rel: &Path| root.join(rel);

    // Probe user xattr support on the root itself (only its ctime changes).
    let (xattrs_supported, xattr_error) = match xattr::set(root, "user.ebb.probe", b"1") {
        Ok(()) => {
            let _ = xattr::remove(root, "user.ebb.probe");
            (true, None)
        }
        Err(e) => (false, Some(format!("setting user.ebb.probe on {}: {e}", root.display()))),
    };

    for d in [
        "files", "sparse", "deep", "links", "hard", "hard/a", "hard/b", "modes", "owners", "times", "xattrs", "names",
        "special", "wide",
    ] {
        mkdir(&r(&p(d)), 0o755);
    }

    // --- Regular files.
    let empty_file = p("files/empty");
    write_file(&r(&empty_file), b"", 0o644);
    let tiny_file = p("files/tiny.txt");
    let tiny_content = b"hello, ebb\n".to_vec();
    write_file(&r(&tiny_file), &tiny_content, 0o644);
    let random_file = p("files/random.bin");
    let random = pseudo_random_bytes(RANDOM_SEED, RANDOM_LEN as usize);
    write_file(&r(&random_file), &random, 0o644);
    let random_copy = p("files/random-copy.bin");
    write_file(&r(&random_copy), &random, 0o640);
    drop(random);
    let text_file = p("files/text.txt");
    write_file(&r(&text_file), &compressible_text(MIB as usize), 0o644);
    write_file(&r(&p("files/one-byte")), b"x", 0o644);
    let empty_dir = p("empty_dir");
    mkdir(&r(&empty_dir), 0o755);

    let wide_dir = p("wide");
    for i in 0..WIDE_ENTRIES {
        let f = r(&wide_dir.join(format!("f{i:04}")));
        write_file(&f, format!("entry {i}\n").as_bytes(), 0o644);
    }

    // --- Sparse files: set_len makes the holes, positioned writes the data.
    let sparse_file = p("sparse/sparse.img");
    let sparse_data = vec![(32 * MIB, 33 * MIB), (SPARSE_LEN - MIB, SPARSE_LEN)];
    {
        let path = r(&sparse_file);
        let f = ctx(File::create(&path), "create", &path);
        ctx(f.set_len(SPARSE_LEN), "set_len", &path);
        for (i, &(start, end)) in sparse_data.iter().enumerate() {
            let data = pseudo_random_bytes(1000 + i as u64, (end - start) as usize);
            ctx(f.write_all_at(&data, start), "write", &path);
        }
        ctx(f.sync_all(), "fsync", &path);
        ctx(chmod(&path, 0o644), "chmod", &path);
    }
    let hole_only_file = p("sparse/holes-only.img");
    {
        let path = r(&hole_only_file);
        let f = ctx(File::create(&path), "create", &path);
        ctx(f.set_len(HOLE_ONLY_LEN), "set_len", &path);
        ctx(chmod(&path, 0o644), "chmod", &path);
    }

    // --- Deep nesting.
    let mut deep = p("deep");
    for level in 1..=DEEP_LEVELS {
        deep.push(format!("level-{level:02}"));
        mkdir(&r(&deep), 0o755);
    }
    let deep_leaf = deep.join("leaf.txt");
    write_file(&r(&deep_leaf), b"at the bottom\n", 0o644);

    // --- Symlinks.
    let symlink_relative = p("links/relative");
    let symlink_absolute = p("links/absolute");
    let symlink_dangling = p("links/dangling");
    let symlink_to_dir = p("links/to-dir");
    let symlink_loop = p("links/loop");
    let symlink_raw_target = p("links/raw-target");
    for (link, target) in [
        (&symlink_relative, p("../files/tiny.txt")),
        (&symlink_absolute, p("/etc/passwd")),
        (&symlink_dangling, p("does/not/exist")),
        (&symlink_to_dir, p("../deep")),
        (&symlink_loop, p("loop")),
        (&symlink_raw_target, pb(b"target-\xff\xfe-raw")),
    ] {
        ctx(symlink(&target, r(link)), "symlink", &r(link));
    }

    // --- Hard links: one inode, three names, two directories.
    let hardlinks = vec![p("hard/a/one"), p("hard/a/two"), p("hard/b/three")];
    write_file(&r(&hardlinks[0]), b"one inode, three names\n", 0o644);
    for other in &hardlinks[1..] {
        ctx(fs::hard_link(r(&hardlinks[0]), r(other)), "hard_link", &r(other));
    }

    // --- Mode bits, with chmod after creation (umask does not apply).
    let setuid_file = p("modes/setuid");
    let setgid_file = p("modes/setgid");
    let all_bits_file = p("modes/all-bits");
    let mode_0000_file = p("modes/none");
    let mode_0600_file = p("modes/private");
    let mode_0777_file = p("modes/open");
    for (f, mode) in [
        (&setuid_file, 0o4755),
        (&setgid_file, 0o2755),
        (&all_bits_file, 0o7777),
        (&mode_0000_file, 0o000),
        (&mode_0600_file, 0o600),
        (&mode_0777_file, 0o777),
    ] {
        write_file(&r(f), format!("mode {mode:04o}\n").as_bytes(), mode);
    }
    let sticky_dir = p("modes/sticky");
    mkdir(&r(&sticky_dir), 0o1777);
    write_file(&r(&sticky_dir.join("inside")), b"in a sticky dir\n", 0o666);
    let setgid_dir = p("modes/setgid-dir");
    mkdir(&r(&setgid_dir), 0o2775);
    write_file(&r(&setgid_dir.join("inside")), b"in a setgid dir\n", 0o644);
    let locked_dir = p("modes/locked");
    mkdir(&r(&locked_dir), 0o755);
    write_file(&r(&locked_dir.join("inside")), b"in a 0000 dir\n", 0o644);
    ctx(chmod(&r(&locked_dir), 0o000), "chmod", &r(&locked_dir));

    // --- Numeric owners without passwd entries (lchown before chmod: chown clears setuid).
    let foreign_owner_file = p("owners/file");
    write_file(&r(&foreign_owner_file), b"owned by 12345:54321\n", 0o644);
    let foreign_owner_dir = p("owners/dir");
    mkdir(&r(&foreign_owner_dir), 0o750);
    write_file(&r(&foreign_owner_dir.join("inside")), b"root-owned, in a foreign dir\n", 0o644);
    let foreign_owner_symlink = p("owners/symlink");
    ctx(symlink("file", r(&foreign_owner_symlink)), "symlink", &r(&foreign_owner_symlink));
    let foreign_setuid_file = p("owners/setuid");
    write_file(&r(&foreign_setuid_file), b"setuid to 12345\n", 0o644);
    let uid_only = p("owners/uid-only");
    write_file(&r(&uid_only), b"uid 12345, gid 0\n", 0o644);
    for f in [&foreign_owner_file, &foreign_owner_dir, &foreign_owner_symlink, &foreign_setuid_file] {
        ctx(lchown(r(f), Some(FOREIGN_UID), Some(FOREIGN_GID)), "lchown", &r(f));
    }
    ctx(lchown(r(&uid_only), Some(FOREIGN_UID), Some(0)), "lchown", &r(&uid_only));
    ctx(chmod(&r(&foreign_setuid_file), 0o4750), "chmod", &r(&foreign_setuid_file));

    // --- Times (applied at the end, after every child exists).
    let exact_mtime_file = p("times/exact");
    let whole_second_file = p("times/whole-second");
    let pre_epoch_file = p("times/pre-epoch");
    let future_file = p("times/future");
    for f in [&exact_mtime_file, &whole_second_file, &pre_epoch_file, &future_file] {
        write_file(&r(f), b"timed\n", 0o644);
    }
    let exact_mtime_dir = p("times/dir");
    mkdir(&r(&exact_mtime_dir), 0o755);
    write_file(&r(&exact_mtime_dir.join("inside")), b"in a timed dir\n", 0o644);
    let exact_mtime_symlink = p("times/symlink");
    ctx(symlink("exact", r(&exact_mtime_symlink)), "symlink", &r(&exact_mtime_symlink));

    // --- Extended attributes.
    let xattr_file = p("xattrs/file");
    write_file(&r(&xattr_file), b"has xattrs\n", 0o644);
    let xattr_dir = p("xattrs/dir");
    mkdir(&r(&xattr_dir), 0o755);
    write_file(&r(&xattr_dir.join("inside")), b"in a dir with xattrs\n", 0o644);
    let mut xattrs = Vec::new();
    if xattrs_supported {
        let all_bytes: Vec<u8> = (0..=255u8).collect();
        let wanted: Vec<(&PathBuf, &str, Vec<u8>)> = vec![
            (&xattr_file, "user.binary", all_bytes),
            (&xattr_file, "user.empty", Vec::new()),
            (&xattr_file, "user.text", b"hello xattr".to_vec()),
            (&xattr_file, "user.nul", b"\0\0\0".to_vec()),
            (&xattr_file, "user.large", pseudo_random_bytes(7, 1024)),
            (&xattr_file, "user.\u{fc}n\u{ef}c\u{f8}d\u{e9}", "unicode name".as_bytes().to_vec()),
            (&xattr_dir, "user.dir", b"\x00\x01\x02\xff".to_vec()),
            (&xattr_dir, "user.empty", Vec::new()),
            (&random_file, "user.on-a-big-file", b"1".to_vec()),
        ];
        for (f, name, value) in wanted {
            ctx(xattr::set(r(f), name, &value), &format!("set xattr {name} on"), &r(f));
            xattrs.push((f.clone(), OsString::from(name), value));
        }
    }

    // --- Names made of any bytes.
    let non_utf8_name = pb(b"names/\xff\xfe");
    let newline_name = pb(b"names/new\nline");
    let backslash_name = p("names/with spaces and a \\ backslash");
    let long_name = PathBuf::from("names").join("L".repeat(251) + ".txt");
    let unicode_name = p("names/\u{fc}n\u{ef}c\u{f8}d\u{e9}-\u{540d}\u{524d}-\u{1f389}");
    assert_eq!(long_name.file_name().unwrap().len(), 255);
    let mut odd_names = vec![
        non_utf8_name.clone(),
        newline_name.clone(),
        backslash_name.clone(),
        long_name.clone(),
        unicode_name.clone(),
        pb(b"names/latin1-caf\xe9"),
        PathBuf::from("names").join("\u{e9}".repeat(127) + "x"), // 255 bytes of UTF-8
        p("names/-leading-dash"),
        p("names/ leading space"),
        p("names/trailing space "),
        p("names/tab\there"),
        p("names/glob*?[chars]"),
        p("names/.hidden"),
        p("names/..."),
        p("names/quote'\"`$(x)"),
    ];
    for n in &odd_names {
        write_file(&r(n), n.as_os_str().as_bytes(), 0o644);
    }
    let odd_dir = pb(b"names/dir-\xff");
    mkdir(&r(&odd_dir), 0o755);
    write_file(&r(&odd_dir.join("inside")), b"in a non-UTF-8 directory\n", 0o644);
    odd_names.push(odd_dir);

    // --- Special files.
    let fifo = p("special/fifo");
    ctx(mkfifo(&r(&fifo), 0o600), "mkfifo", &r(&fifo));
    ctx(chmod(&r(&fifo), 0o640), "chmod", &r(&fifo));
    let (socket, socket_error) = match make_socket(&r(&p("special/socket"))) {
        Ok(()) => {
            let s = p("special/socket");
            ctx(chmod(&r(&s), 0o755), "chmod", &r(&s));
            (Some(s), None)
        }
        Err(e) => (None, Some(format!("binding a unix socket at {}: {e}", r(&p("special/socket")).display()))),
    };
    let char_path = p("special/null");
    let block_path = p("special/block");
    let (mut char_device, mut block_device, mut mknod_error) = (None, None, None);
    match mknod(&r(&char_path), libc::S_IFCHR, 0o666, 1, 3) {
        Ok(()) => {
            ctx(chmod(&r(&char_path), 0o666), "chmod", &r(&char_path));
            char_device = Some(char_path);
            match mknod(&r(&block_path), libc::S_IFBLK, 0o660, 7, 200) {
                Ok(()) => {
                    ctx(chmod(&r(&block_path), 0o660), "chmod", &r(&block_path));
                    block_device = Some(block_path);
                }
                Err(e) => mknod_error = Some(format!("mknod b 7 200 {}: {e}", r(&block_path).display())),
            }
        }
        Err(e) => mknod_error = Some(format!("mknod c 1 3 {}: {e}", r(&char_path).display())),
    }
    let mknod_ok = char_device.is_some() && block_device.is_some();

    // --- Times last: every entry gets a distinct mtime with nanoseconds, non-directories
    // first, then directories deepest first (creating children changes a dir's mtime).
    let explicit: HashMap<PathBuf, Timestamp> = [
        (&exact_mtime_file, EXACT_MTIME),
        (&whole_second_file, WHOLE_SECOND_MTIME),
        (&pre_epoch_file, PRE_EPOCH_MTIME),
        (&future_file, FUTURE_MTIME),
        (&exact_mtime_dir, DIR_MTIME),
        (&exact_mtime_symlink, SYMLINK_MTIME),
    ]
    .into_iter()
    .map(|(rel, t)| (r(rel), t))
    .collect();
    set_all_mtimes(root, &explicit);

    FidelityInfo {
        root: root.to_path_buf(),
        empty_file,
        tiny_file,
        tiny_content,
        random_file,
        random_copy,
        text_file,
        wide_dir,
        sparse_file,
        sparse_len: SPARSE_LEN,
        sparse_data,
        hole_only_file,
        empty_dir,
        deep_leaf,
        symlink_relative,
        symlink_absolute,
        symlink_dangling,
        symlink_to_dir,
        symlink_loop,
        symlink_raw_target,
        hardlinks,
        setuid_file,
        setgid_file,
        all_bits_file,
        sticky_dir,
        setgid_dir,
        mode_0000_file,
        mode_0600_file,
        mode_0777_file,
        locked_dir,
        foreign_owner_file,
        foreign_owner_dir,
        foreign_owner_symlink,
        foreign_setuid_file,
        exact_mtime_file,
        exact_mtime_dir,
        exact_mtime_symlink,
        whole_second_file,
        pre_epoch_file,
        future_file,
        xattrs_supported,
        xattr_error,
        xattr_file,
        xattr_dir,
        xattrs,
        odd_names,
        non_utf8_name,
        newline_name,
        backslash_name,
        long_name,
        unicode_name,
        fifo,
        socket,
        socket_error,
        char_device,
        block_device,
        mknod_ok,
        mknod_error,
    }
}

/// Gives every entry under `root` (and `root` itself) a distinct mtime with
/// nanoseconds, or the one in `explicit` (keyed by `root.join(rel)`): non-directories
/// first (each inode once), then directories deepest first.
fn set_all_mtimes(root: &Path, explicit: &HashMap<PathBuf, Timestamp>) {
    let mut others = Vec::new();
    let mut dirs = Vec::new();
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let mut names: Vec<OsString> =
            ctx(fs::read_dir(&dir), "read_dir", &dir).map(|e| e.expect("read_dir entry").file_name()).collect();
        names.sort();
        for name in names {
            let path = dir.join(&name);
            let m = ctx(fs::symlink_metadata(&path), "lstat", &path);
            if m.is_dir() {
                stack.push((path, depth + 1));
            } else {
                others.push((path, m.dev(), m.ino()));
            }
        }
        dirs.push((dir, depth));
    }
    let mut k: i64 = 0;
    let mut next_generic = || {
        k += 1;
        (1_600_000_000 + k * 3_607, (k * 7_919_731 + 1) % 1_000_000_000)
    };
    let mut seen = HashSet::new();
    for (path, dev, ino) in others {
        let generic = next_generic();
        if !seen.insert((dev, ino)) {
            continue;
        }
        let t = explicit.get(&path).copied().unwrap_or(generic);
        ctx(set_mtime(&path, t), "utimensat", &path);
    }
    dirs.sort_by_key(|d| std::cmp::Reverse(d.1));
    for (path, _) in dirs {
        let generic = next_generic();
        let t = explicit.get(&path).copied().unwrap_or(generic);
        ctx(set_mtime(&path, t), "utimensat", &path);
    }
}

/// Convenience for tests: `OsStr` of raw bytes.
pub fn os(bytes: &[u8]) -> &OsStr {
    OsStr::from_bytes(bytes)
}
