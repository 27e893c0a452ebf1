//! Self-check of the test harness (no `ebb` binary involved): the fidelity tree is
//! built as specified, `compare_trees` finds a tree equal to itself and to a `cp -a`
//! copy, and it reports each kind of change — so a passing end-to-end test means
//! something.

mod common;

use std::fs;
use std::os::unix::fs::{lchown, symlink, FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::compare::{compare_trees, compare_trees_with, data_bytes, data_regions, show, CompareOptions};
use common::tree::*;

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("ebb-harness-").tempdir().expect("temp dir")
}

fn cp_a(src: &Path, dst: &Path) {
    let out = Command::new("cp").arg("-a").arg("--sparse=always").arg(src).arg(dst).output().expect("running cp");
    assert!(out.status.success(), "cp -a failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn lstat(p: &Path) -> fs::Metadata {
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
}

/// Runs `f`, then puts back the mtime of `path`'s parent (which `f` may change by
/// adding, removing or renaming entries).
fn keeping_parent_mtime(path: &Path, f: impl FnOnce()) {
    let parent = path.parent().unwrap();
    let t = get_mtime(parent).unwrap();
    f();
    set_mtime(parent, t).unwrap();
}

#[test]
fn fidelity_tree_is_built_as_specified() {
    let tmp = tempdir();
    let root = tmp.path().join("tree");
    let info = build_fidelity_tree(&root);
    let a = |rel: &Path| info.abs(rel);

    eprintln!(
        "fidelity tree environment: xattrs_supported={} ({:?}), mknod_ok={} ({:?}), socket={:?} ({:?})",
        info.xattrs_supported, info.xattr_error, info.mknod_ok, info.mknod_error, info.socket, info.socket_error
    );

    // Regular files.
    assert_eq!(lstat(&a(&info.empty_file)).len(), 0);
    assert_eq!(fs::read(a(&info.tiny_file)).unwrap(), info.tiny_content);
    let random = fs::read(a(&info.random_file)).unwrap();
    assert_eq!(random.len() as u64, RANDOM_LEN);
    assert_eq!(random, pseudo_random_bytes(RANDOM_SEED, RANDOM_LEN as usize));
    assert_eq!(fs::read(a(&info.random_copy)).unwrap(), random);
    assert_ne!(lstat(&a(&info.random_file)).ino(), lstat(&a(&info.random_copy)).ino());
    assert_eq!(fs::read_dir(a(&info.wide_dir)).unwrap().count(), WIDE_ENTRIES);

    // Sparse files really are sparse, with data exactly where it was written.
    let sparse = a(&info.sparse_file);
    assert_eq!(lstat(&sparse).len(), info.sparse_len);
    let written: u64 = info.sparse_data.iter().map(|(s, e)| e - s).sum();
    let regions = data_regions(&sparse).unwrap();
    let data = data_bytes(&sparse).unwrap();
    assert!(data >= written && data <= written + (64 << 10), "sparse file data regions {regions:?}");
    for &(s, e) in &info.sparse_data {
        assert!(regions.iter().any(|&(rs, re)| rs <= s && e <= re), "{s}..{e} not in data regions {regions:?}");
    }
    assert!(lstat(&sparse).blocks() * 512 <= written + (1 << 20));
    assert_eq!(data_bytes(&a(&info.hole_only_file)).unwrap(), 0);
    assert_eq!(lstat(&a(&info.hole_only_file)).len(), HOLE_ONLY_LEN);

    // Deep nesting.
    assert_eq!(info.deep_leaf.components().count(), DEEP_LEVELS + 2);
    assert!(lstat(&a(&info.deep_leaf)).is_file());

    // Symlinks (targets as raw bytes; none followed).
    for (link, target) in [
        (&info.symlink_relative, b"../files/tiny.txt".as_slice()),
        (&info.symlink_absolute, b"/etc/passwd"),
        (&info.symlink_dangling, b"does/not/exist"),
        (&info.symlink_to_dir, b"../deep"),
        (&info.symlink_loop, b"loop"),
        (&info.symlink_raw_target, b"target-\xff\xfe-raw"),
    ] {
        assert!(lstat(&a(link)).file_type().is_symlink());
        assert_eq!(fs::read_link(a(link)).unwrap().as_os_str(), os(target));
    }

    // Hard links.
    assert_eq!(info.hardlinks.len(), 3);
    let first = lstat(&a(&info.hardlinks[0]));
    assert_eq!(first.nlink(), 3);
    for h in &info.hardlinks {
        assert_eq!(lstat(&a(h)).ino(), first.ino());
    }
    assert_ne!(info.hardlinks[0].parent(), info.hardlinks[2].parent());

    // Modes, exactly, whatever the umask.
    for (f, mode) in [
        (&info.setuid_file, 0o4755),
        (&info.setgid_file, 0o2755),
        (&info.all_bits_file, 0o7777),
        (&info.sticky_dir, 0o1777),
        (&info.setgid_dir, 0o2775),
        (&info.mode_0000_file, 0o000),
        (&info.mode_0600_file, 0o600),
        (&info.mode_0777_file, 0o777),
        (&info.locked_dir, 0o000),
        (&info.foreign_setuid_file, 0o4750),
        (&info.fifo, 0o640),
    ] {
        assert_eq!(lstat(&a(f)).mode() & 0o7777, mode, "mode of {}", f.display());
    }
    assert!(lstat(&a(&info.sticky_dir)).is_dir());

    // Owners without passwd entries, also on a symlink.
    for f in [&info.foreign_owner_file, &info.foreign_owner_dir, &info.foreign_owner_symlink, &info.foreign_setuid_file]
    {
        let m = lstat(&a(f));
        assert_eq!((m.uid(), m.gid()), (FOREIGN_UID, FOREIGN_GID), "owner of {}", f.display());
    }
    assert!(lstat(&a(&info.foreign_owner_symlink)).file_type().is_symlink());

    // Times with nanoseconds, including a directory and a symlink.
    for (f, t) in [
        (&info.exact_mtime_file, EXACT_MTIME),
        (&info.exact_mtime_dir, DIR_MTIME),
        (&info.exact_mtime_symlink, SYMLINK_MTIME),
        (&info.whole_second_file, WHOLE_SECOND_MTIME),
        (&info.pre_epoch_file, PRE_EPOCH_MTIME),
        (&info.future_file, FUTURE_MTIME),
    ] {
        assert_eq!(get_mtime(&a(f)).unwrap(), t, "mtime of {}", f.display());
    }
    // Every other entry has a distinct mtime with a non-zero nanosecond part.
    assert_ne!(get_mtime(&root).unwrap().1, 0);
    assert_ne!(get_mtime(&a(Path::new("deep/level-01"))).unwrap().1, 0);

    // Extended attributes.
    if info.xattrs_supported {
        assert!(info.xattrs.len() >= 8);
        assert!(info.xattrs.iter().any(|(_, _, v)| v.is_empty()));
        for (f, name, value) in &info.xattrs {
            assert_eq!(xattr::get(a(f), name).unwrap().as_ref(), Some(value), "xattr {name:?} of {}", f.display());
        }
        assert!(xattr::list(a(&info.xattr_dir)).unwrap().count() >= 2);
    } else {
        eprintln!("NOTE: user xattrs are not supported here: {:?}", info.xattr_error);
    }

    // Names of any bytes.
    for n in [&info.non_utf8_name, &info.newline_name, &info.backslash_name, &info.long_name, &info.unicode_name] {
        assert!(info.odd_names.contains(n));
    }
    assert_eq!(info.long_name.file_name().unwrap().len(), 255);
    assert!(info.non_utf8_name.to_str().is_none());
    for n in &info.odd_names {
        lstat(&a(n));
    }

    // Special files.
    assert!(lstat(&a(&info.fifo)).file_type().is_fifo());
    if let Some(s) = &info.socket {
        assert!(lstat(&a(s)).file_type().is_socket());
    } else {
        eprintln!("NOTE: no unix socket: {:?}", info.socket_error);
    }
    if let Some(d) = &info.char_device {
        let m = lstat(&a(d));
        assert!(m.file_type().is_char_device());
        assert_eq!(m.rdev(), libc::makedev(1, 3));
    } else {
        eprintln!("NOTE: mknod failed: {:?}", info.mknod_error);
    }
    if let Some(d) = &info.block_device {
        assert!(lstat(&a(d)).file_type().is_block_device());
    }
}

#[test]
fn identical_trees_compare_equal() {
    let tmp = tempdir();
    let src = tmp.path().join("src");
    build_fidelity_tree(&src);
    let diffs = compare_trees(&src, &src);
    assert!(diffs.is_empty(), "tree differs from itself: {diffs:#?}");

    let copy = tmp.path().join("copy");
    cp_a(&src, &copy);
    let diffs = compare_trees(&src, &copy);
    assert!(diffs.is_empty(), "cp -a copy differs: {diffs:#?}");
    let diffs = compare_trees(&copy, &src);
    assert!(diffs.is_empty(), "cp -a copy differs (reversed): {diffs:#?}");
}

struct Cases {
    src: PathBuf,
    scratch: PathBuf,
    info: FidelityInfo,
    n: usize,
}

impl Cases {
    /// On a fresh `cp -a` copy of the tree: apply `mutate`, then assert compare_trees
    /// reports a difference containing `needle`, and that every reported difference
    /// mentions `mentions` (so the change is attributed to the right entry).
    fn case(&mut self, label: &str, needle: &str, mentions: &str, mutate: impl FnOnce(&Path)) {
        self.n += 1;
        let copy = self.scratch.join(format!("case-{}", self.n));
        cp_a(&self.src, &copy);
        mutate(&copy);
        let diffs = compare_trees(&self.src, &copy);
        assert!(!diffs.is_empty(), "case {label}: compare_trees reported nothing");
        assert!(
            diffs.iter().any(|d| d.contains(needle)),
            "case {label}: no difference mentions {needle:?}: {diffs:#?}"
        );
        for d in &diffs {
            assert!(d.contains(mentions), "case {label}: difference not about {mentions}: {d}\nall: {diffs:#?}");
        }
        eprintln!("case {label}: {diffs:?}");
        fs::remove_dir_all(&copy).unwrap();
    }
}

fn m(rel: &Path) -> String {
    show(rel)
}

#[test]
fn comparer_reports_each_kind_of_change() {
    let tmp = tempdir();
    let src = tmp.path().join("src");
    let info = build_fidelity_tree(&src);
    let mut cases = Cases { src: src.clone(), scratch: tmp.path().to_path_buf(), info: info.clone(), n: 0 };

    let f = info.random_file.clone();
    cases.case("content byte", "content differs, first at byte offset 1000000", &m(&f), |c| {
        let p = c.join(&f);
        let t = get_mtime(&p).unwrap();
        let file = fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, 1_000_000).unwrap();
        file.write_all_at(&[b[0] ^ 0x01], 1_000_000).unwrap();
        drop(file);
        set_mtime(&p, t).unwrap();
    });

    let f = info.text_file.clone();
    cases.case("size", "size differs", &m(&f), |c| {
        let p = c.join(&f);
        let t = get_mtime(&p).unwrap();
        let file = fs::OpenOptions::new().write(true).open(&p).unwrap();
        file.set_len(file.metadata().unwrap().len() - 1).unwrap();
        drop(file);
        set_mtime(&p, t).unwrap();
    });

    let f = info.exact_mtime_file.clone();
    cases.case(
        "mtime nanosecond",
        "mtime differs: expected 1700000000.123456789, actual 1700000000.123456790",
        &m(&f),
        |c| {
            set_mtime(&c.join(&f), (EXACT_MTIME.0, EXACT_MTIME.1 + 1)).unwrap();
        },
    );

    let f = info.exact_mtime_dir.clone();
    cases.case("directory mtime", "mtime differs", &m(&f), |c| {
        set_mtime(&c.join(&f), (DIR_MTIME.0 + 1, DIR_MTIME.1)).unwrap();
    });

    let f = info.exact_mtime_symlink.clone();
    cases.case("symlink mtime", "mtime differs", &m(&f), |c| {
        set_mtime(&c.join(&f), (SYMLINK_MTIME.0, SYMLINK_MTIME.1 - 1)).unwrap();
    });

    let f = info.setuid_file.clone();
    cases.case("mode bit (setuid dropped)", "mode differs: expected 4755, actual 0755", &m(&f), |c| {
        chmod(&c.join(&f), 0o755).unwrap();
    });

    let f = info.sticky_dir.clone();
    cases.case("mode bit (sticky dir)", "mode differs: expected 1777, actual 0777", &m(&f), |c| {
        chmod(&c.join(&f), 0o777).unwrap();
    });

    let f = info.foreign_owner_file.clone();
    cases.case("uid", "uid differs: expected 12345, actual 12346", &m(&f), |c| {
        lchown(c.join(&f), Some(FOREIGN_UID + 1), None).unwrap();
    });

    let f = info.foreign_owner_symlink.clone();
    cases.case("gid of a symlink", "gid differs: expected 54321, actual 1", &m(&f), |c| {
        lchown(c.join(&f), None, Some(1)).unwrap();
    });

    if info.xattrs_supported {
        let f = info.xattr_file.clone();
        cases.case("xattr value", "xattr user.binary value differs", &m(&f), |c| {
            xattr::set(c.join(&f), "user.binary", b"changed").unwrap();
        });
        let f = info.xattr_dir.clone();
        cases.case("xattr removed from a directory", "xattr user.empty missing in actual", &m(&f), |c| {
            xattr::remove(c.join(&f), "user.empty").unwrap();
        });
        let f = info.tiny_file.clone();
        cases.case("xattr added", "xattr user.new only in actual", &m(&f), |c| {
            xattr::set(c.join(&f), "user.new", b"").unwrap();
        });
    }

    let f = info.symlink_relative.clone();
    cases.case("symlink target", "symlink target differs", &m(&f), |c| {
        let p = c.join(&f);
        let old = fs::read_link(&p).unwrap();
        let new_target = "../files/tiny.txX"; // same length as "../files/tiny.txt"
        assert_eq!(old.as_os_str().len(), new_target.len());
        let t = get_mtime(&p).unwrap();
        keeping_parent_mtime(&p, || {
            fs::remove_file(&p).unwrap();
            symlink(new_target, &p).unwrap();
        });
        set_mtime(&p, t).unwrap();
    });

    let f = info.hardlinks[1].clone();
    cases.case("hard link broken", "hard links differ", &m(&f), |c| {
        let p = c.join(&f);
        let tmp = p.with_file_name("two.tmp");
        keeping_parent_mtime(&p, || {
            let st = Command::new("cp").arg("--preserve=all").arg(&p).arg(&tmp).status().unwrap();
            assert!(st.success());
            fs::rename(&tmp, &p).unwrap();
        });
        assert_eq!(lstat(&p).nlink(), 1);
    });

    // The other direction: two separate inodes in expected became one.
    let (orig, copy_name) = (info.random_file.clone(), info.random_copy.clone());
    cases.case("hard link added", "hard links differ", &m(&copy_name), |c| {
        let p = c.join(&copy_name);
        keeping_parent_mtime(&p, || {
            fs::remove_file(&p).unwrap();
            fs::hard_link(c.join(&orig), &p).unwrap();
        });
    });

    let f = info.sparse_file.clone();
    cases.case("holes filled", "sparseness lost", &m(&f), |c| {
        let p = c.join(&f);
        let tmp = p.with_file_name("dense.tmp");
        keeping_parent_mtime(&p, || {
            let st = Command::new("cp").arg("--preserve=all").arg("--sparse=never").arg(&p).arg(&tmp).status().unwrap();
            assert!(st.success());
            fs::rename(&tmp, &p).unwrap();
        });
        assert!(data_bytes(&p).unwrap() >= SPARSE_LEN);
    });

    let f = PathBuf::from("names/extra");
    cases.case("extra entry", "only in actual", &m(&f), |c| {
        let p = c.join(&f);
        keeping_parent_mtime(&p, || fs::write(&p, b"extra").unwrap());
    });

    let f = info.non_utf8_name.clone();
    assert_eq!(m(&f), r#""names/\xff\xfe""#);
    cases.case("missing entry with a non-UTF-8 name", "only in expected", &m(&f), |c| {
        let p = c.join(&f);
        keeping_parent_mtime(&p, || fs::remove_file(&p).unwrap());
    });

    let f = info.fifo.clone();
    cases.case("type", "type differs: expected fifo, actual regular file", &m(&f), |c| {
        let p = c.join(&f);
        let t = get_mtime(&p).unwrap();
        keeping_parent_mtime(&p, || {
            fs::remove_file(&p).unwrap();
            fs::write(&p, b"").unwrap();
            chmod(&p, 0o640).unwrap();
        });
        set_mtime(&p, t).unwrap();
    });

    if let Some(dev) = info.char_device.clone() {
        cases.case("device number", "device number (rdev) differs: expected 1:3, actual 1:5", &m(&dev), |c| {
            let p = c.join(&dev);
            let t = get_mtime(&p).unwrap();
            keeping_parent_mtime(&p, || {
                fs::remove_file(&p).unwrap();
                let cp = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
                let r = unsafe { libc::mknod(cp.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 5)) };
                assert_eq!(r, 0, "mknod: {}", std::io::Error::last_os_error());
                chmod(&p, 0o666).unwrap();
            });
            set_mtime(&p, t).unwrap();
        });
    }

    cases.case("root directory mode", "mode differs", "\".\"", |c| {
        chmod(c, 0o701).unwrap();
    });

    // Everything in wide/ changed: 500 differences, 50 listed and the rest counted.
    {
        let copy = tmp.path().join("many");
        cp_a(&src, &copy);
        for i in 0..WIDE_ENTRIES {
            let p = copy.join(&info.wide_dir).join(format!("f{i:04}"));
            let (s, ns) = get_mtime(&p).unwrap();
            set_mtime(&p, (s + 1, ns)).unwrap();
        }
        let diffs = compare_trees(&src, &copy);
        assert_eq!(diffs.len(), 51, "{diffs:#?}");
        assert_eq!(diffs[50], format!("... and {} more differences", WIDE_ENTRIES - 50));
        let few = compare_trees_with(&src, &copy, &CompareOptions { max_reported: 3, ..Default::default() });
        assert_eq!(few.len(), 4);
    }

    // Options turn checks off.
    {
        let copy = tmp.path().join("options");
        cp_a(&src, &copy);
        chmod(&copy, 0o701).unwrap();
        let p = copy.join(&info.hardlinks[1]);
        keeping_parent_mtime(&p, || {
            let tmpf = p.with_file_name("x.tmp");
            assert!(Command::new("cp").arg("--preserve=all").arg(&p).arg(&tmpf).status().unwrap().success());
            fs::rename(&tmpf, &p).unwrap();
        });
        let p = copy.join(&info.sparse_file);
        keeping_parent_mtime(&p, || {
            let tmpf = p.with_file_name("x.tmp");
            let st = Command::new("cp").args(["--preserve=all", "--sparse=never"]).arg(&p).arg(&tmpf).status().unwrap();
            assert!(st.success());
            fs::rename(&tmpf, &p).unwrap();
        });
        let strict = compare_trees(&src, &copy);
        assert!(strict.iter().any(|d| d.contains("hard links differ")), "{strict:#?}");
        assert!(strict.iter().any(|d| d.contains("sparseness lost")), "{strict:#?}");
        assert!(strict.iter().any(|d| d.starts_with("\".\": mode differs")), "{strict:#?}");
        let relaxed =
            CompareOptions { root_metadata: false, hard_links: false, sparseness: false, ..Default::default() };
        let diffs = compare_trees_with(&src, &copy, &relaxed);
        assert!(diffs.is_empty(), "{diffs:#?}");
    }
    assert!(cases.n >= 15);
    let _ = &cases.info;
}
