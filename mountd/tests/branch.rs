//! A branch against a reference model, without FUSE.
//!
//! Each case stores one point of a small data directory in a `memory://`
//! repository (files of several blocks, a file with two names, a link, an empty
//! directory), opens a branch of it, and applies random operations to the branch
//! and to a model (plain maps and byte vectors): writes at any offset and length,
//! truncates, files and directories made, unlinked, removed, renamed (replacing,
//! not replacing, exchanging) and linked, and reads. Every answer, an error's errno
//! included, must be the model's; at the end the whole tree is compared, contents,
//! sizes, link counts and which names share an inode. The point itself is read
//! back unchanged: the branch never writes to the repository.
//!
//! A failure is shrunk to a small case and its seed written to
//! `proptest-regressions/branch.txt`, kept in git and replayed first on every run.
//! `PROPTEST_CASES=N` runs N cases instead of the default.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use catalog::tree::{Entry, EntryKind, Extent, Tree};
use catalog::{BlobKind, Manifest, Packer, Repository, Secret, Store, Writer};
use jiff::Timestamp;
use mountd::branch::{Branch, New, Replace, SetAttr};
use mountd::{Fs, FsError, Kind, Scope, ROOT};
use proptest::prelude::*;

// ---------------------------------------------------------------------------
// The model.

#[derive(Debug, Clone, PartialEq)]
enum M {
    Dir(BTreeMap<Vec<u8>, usize>),
    File(Vec<u8>),
    Link(Vec<u8>),
}

#[derive(Debug, Clone)]
struct Model {
    nodes: Vec<M>,
}

const TOP: usize = 0;

impl Model {
    /// The data directory the point holds, its files' bytes drawn from `seed`.
    fn initial(seed: u64) -> Model {
        let mut x = seed | 1;
        let mut bytes = |n: usize| {
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect::<Vec<u8>>()
        };
        let mut m = Model { nodes: vec![M::Dir(BTreeMap::new())] };
        let base = m.add(TOP, b"base", M::Dir(BTreeMap::new()));
        let one = m.add(base, b"1", M::Dir(BTreeMap::new()));
        let rel = m.add(one, b"16384", M::File(bytes(10_000)));
        m.add(one, b"16385", M::File(bytes(40_960)));
        m.add(one, b"empty", M::File(Vec::new()));
        let global = m.add(TOP, b"global", M::Dir(BTreeMap::new()));
        m.add(global, b"pg_control", M::File(bytes(8192)));
        m.add(TOP, b"PG_VERSION", M::File(b"15\n".to_vec()));
        m.add(TOP, b"pg_wal", M::Dir(BTreeMap::new()));
        m.add(TOP, b"tblspc", M::Link(b"base/1".to_vec()));
        let M::Dir(top) = &mut m.nodes[TOP] else { unreachable!() };
        top.insert(b"linked".to_vec(), rel);
        m
    }

    fn add(&mut self, dir: usize, name: &[u8], node: M) -> usize {
        self.nodes.push(node);
        let ino = self.nodes.len() - 1;
        self.dir_mut(dir).insert(name.to_vec(), ino);
        ino
    }

    fn dir(&self, ino: usize) -> &BTreeMap<Vec<u8>, usize> {
        match &self.nodes[ino] {
            M::Dir(d) => d,
            other => panic!("{ino} is not a directory: {other:?}"),
        }
    }

    fn dir_mut(&mut self, ino: usize) -> &mut BTreeMap<Vec<u8>, usize> {
        match &mut self.nodes[ino] {
            M::Dir(d) => d,
            other => panic!("{ino} is not a directory: {other:?}"),
        }
    }

    /// Every path (a list of names) and its node, the top first.
    fn paths(&self) -> Vec<(Vec<Vec<u8>>, usize)> {
        let mut out = vec![(Vec::new(), TOP)];
        let mut i = 0;
        while i < out.len() {
            let (path, ino) = out[i].clone();
            if let M::Dir(d) = &self.nodes[ino] {
                for (name, &child) in d {
                    let mut p = path.clone();
                    p.push(name.clone());
                    out.push((p, child));
                }
            }
            i += 1;
        }
        out
    }

    fn parent_of(&self, dir: usize) -> usize {
        self.paths()
            .iter()
            .find_map(|(_, d)| matches!(&self.nodes[*d], M::Dir(e) if e.values().any(|&c| c == dir)).then_some(*d))
            .unwrap_or(TOP)
    }

    fn is_within(&self, mut dir: usize, ancestor: usize) -> bool {
        loop {
            if dir == ancestor {
                return true;
            }
            if dir == TOP {
                return false;
            }
            dir = self.parent_of(dir);
        }
    }

    fn nlink(&self, ino: usize) -> u32 {
        self.paths().iter().filter(|(p, i)| *i == ino && !p.is_empty()).count() as u32
    }
}

// ---------------------------------------------------------------------------
// Operations.

const NAMES: &[&[u8]] = &[b"a", b"b", b"16384", b"base", b"pg_wal", b"x.tmp"];

#[derive(Debug, Clone)]
enum Op {
    Write { file: u16, offset: u32, len: u16, byte: u8 },
    Truncate { file: u16, size: u32 },
    Make { dir: u16, name: u8, is_dir: bool },
    Unlink { path: u16 },
    Rmdir { path: u16 },
    Rename { from: u16, dir: u16, name: u8, how: u8 },
    Link { file: u16, dir: u16, name: u8 },
    Read { file: u16, offset: u32, len: u32 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<u16>(), 0..60_000u32, 0..20_000u16, any::<u8>())
            .prop_map(|(file, offset, len, byte)| Op::Write { file, offset, len, byte }),
        2 => (any::<u16>(), 0..60_000u32).prop_map(|(file, size)| Op::Truncate { file, size }),
        2 => (any::<u16>(), any::<u8>(), any::<bool>()).prop_map(|(dir, name, is_dir)| Op::Make { dir, name, is_dir }),
        1 => any::<u16>().prop_map(|path| Op::Unlink { path }),
        1 => any::<u16>().prop_map(|path| Op::Rmdir { path }),
        2 => (any::<u16>(), any::<u16>(), any::<u8>(), any::<u8>())
            .prop_map(|(from, dir, name, how)| Op::Rename { from, dir, name, how }),
        1 => (any::<u16>(), any::<u16>(), any::<u8>()).prop_map(|(file, dir, name)| Op::Link { file, dir, name }),
        3 => (any::<u16>(), 0..70_000u32, 0..30_000u32).prop_map(|(file, offset, len)| Op::Read { file, offset, len }),
    ]
}

fn pick(all: &[(Vec<Vec<u8>>, usize)], n: u16, want: impl Fn(usize) -> bool) -> Option<&(Vec<Vec<u8>>, usize)> {
    let some: Vec<_> = all.iter().filter(|(_, i)| want(*i)).collect();
    (!some.is_empty()).then(|| some[n as usize % some.len()])
}

/// The inode of `path` in the branch.
async fn resolve(b: &Branch, path: &[Vec<u8>]) -> u64 {
    let mut ino = ROOT;
    for name in path {
        ino = b.lookup(ino, name).await.unwrap_or_else(|e| panic!("{path:?}: {e}")).ino;
    }
    ino
}

fn errno<T>(r: Result<T, FsError>) -> Result<T, i32> {
    r.map_err(|e| e.errno())
}

/// Applies `op` to the model and the branch; their answers must agree.
async fn apply(m: &mut Model, b: &Branch, op: &Op) {
    let all = m.paths();
    let is_file = |i: usize| matches!(m.nodes[i], M::File(_));
    let is_dir = |i: usize| matches!(m.nodes[i], M::Dir(_));
    match *op {
        Op::Write { file, offset, len, byte } => {
            let Some((path, ino)) = pick(&all, file, is_file).cloned() else { return };
            let data = vec![byte; len as usize];
            let got = b.write(resolve(b, &path).await, offset as u64, &data).await.unwrap();
            assert_eq!(got, len as u32);
            let M::File(f) = &mut m.nodes[ino] else { unreachable!() };
            if len > 0 {
                let end = offset as usize + len as usize;
                if f.len() < end {
                    f.resize(end, 0);
                }
                f[offset as usize..end].copy_from_slice(&data);
            }
        }
        Op::Truncate { file, size } => {
            let Some((path, ino)) = pick(&all, file, is_file).cloned() else { return };
            let set = SetAttr { size: Some(size as u64), ..Default::default() };
            let a = b.setattr(resolve(b, &path).await, set).await.unwrap();
            assert_eq!(a.size, size as u64);
            let M::File(f) = &mut m.nodes[ino] else { unreachable!() };
            f.resize(size as usize, 0);
        }
        Op::Make { dir, name, is_dir: make_dir } => {
            let Some((path, d)) = pick(&all, dir, is_dir).cloned() else { return };
            let name = NAMES[name as usize % NAMES.len()];
            let new = if make_dir { New::Dir { perm: 0o700 } } else { New::File { perm: 0o600 } };
            let got = errno(b.make(resolve(b, &path).await, name, new, 0, 0).await.map(|a| a.kind));
            let want = if m.dir(d).contains_key(name) {
                Err(libc::EEXIST)
            } else {
                m.add(d, name, if make_dir { M::Dir(BTreeMap::new()) } else { M::File(Vec::new()) });
                Ok(if make_dir { Kind::Dir } else { Kind::File })
            };
            assert_eq!(got, want, "{op:?} in {path:?}");
        }
        Op::Unlink { path } => {
            let Some((path, ino)) = pick(&all[1..], path, |_| true).cloned() else { return };
            let (parent, name) = (&path[..path.len() - 1], &path[path.len() - 1]);
            let got = errno(b.unlink(resolve(b, parent).await, name).await);
            let want = if is_dir(ino) { Err(libc::EISDIR) } else { Ok(()) };
            if want.is_ok() {
                let d = m.paths().into_iter().find(|(p, _)| p == parent).unwrap().1;
                m.dir_mut(d).remove(name);
            }
            assert_eq!(got, want, "{op:?}: {path:?}");
        }
        Op::Rmdir { path } => {
            let Some((path, ino)) = pick(&all[1..], path, |_| true).cloned() else { return };
            let (parent, name) = (&path[..path.len() - 1], &path[path.len() - 1]);
            let got = errno(b.rmdir(resolve(b, parent).await, name).await);
            let want = match &m.nodes[ino] {
                M::Dir(d) if !d.is_empty() => Err(libc::ENOTEMPTY),
                M::Dir(_) => Ok(()),
                _ => Err(libc::ENOTDIR),
            };
            if want.is_ok() {
                let d = m.paths().into_iter().find(|(p, _)| p == parent).unwrap().1;
                m.dir_mut(d).remove(name);
            }
            assert_eq!(got, want, "{op:?}: {path:?}");
        }
        Op::Rename { from, dir, name, how } => {
            let Some((from_path, ino)) = pick(&all[1..], from, |_| true).cloned() else { return };
            let Some((to_path, to)) = pick(&all, dir, is_dir).cloned() else { return };
            let to_name = NAMES[name as usize % NAMES.len()];
            let replace = [Replace::Yes, Replace::No, Replace::Exchange][how as usize % 3];
            let (parent_path, name) = (&from_path[..from_path.len() - 1], &from_path[from_path.len() - 1]);
            let parent = all.iter().find(|(p, _)| p == parent_path).unwrap().1;
            let got = errno(
                b.rename(resolve(b, parent_path).await, name, resolve(b, &to_path).await, to_name, replace).await,
            );
            let existing = m.dir(to).get(to_name).copied();
            let want = model_rename(m, (parent, name), (to, to_name), ino, existing, replace);
            assert_eq!(got, want, "{op:?}: {from_path:?} to {to_path:?}/{:?}", String::from_utf8_lossy(to_name));
        }
        Op::Link { file, dir, name } => {
            let Some((path, ino)) = pick(&all[1..], file, |_| true).cloned() else { return };
            let Some((to_path, to)) = pick(&all, dir, is_dir).cloned() else { return };
            let to_name = NAMES[name as usize % NAMES.len()];
            let got = errno(b.link(resolve(b, &path).await, resolve(b, &to_path).await, to_name).await.map(|_| ()));
            let want = if is_dir(ino) {
                Err(libc::EPERM)
            } else if m.dir(to).contains_key(to_name) {
                Err(libc::EEXIST)
            } else {
                m.dir_mut(to).insert(to_name.to_vec(), ino);
                Ok(())
            };
            assert_eq!(got, want, "{op:?}");
        }
        Op::Read { file, offset, len } => {
            let Some((path, ino)) = pick(&all, file, is_file).cloned() else { return };
            let got = b.read(resolve(b, &path).await, offset as u64, len).await.unwrap();
            let M::File(f) = &m.nodes[ino] else { unreachable!() };
            let (start, end) = ((offset as usize).min(f.len()), (offset as usize + len as usize).min(f.len()));
            assert!(got == f[start..end], "{op:?} of {path:?}: {} bytes, want {}", got.len(), end - start);
        }
    }
}

/// What rename should answer, and the model after it.
fn model_rename(
    m: &mut Model,
    (parent, name): (usize, &Vec<u8>),
    (to, to_name): (usize, &[u8]),
    ino: usize,
    existing: Option<usize>,
    replace: Replace,
) -> Result<(), i32> {
    if existing.is_some() && replace == Replace::No {
        return Err(libc::EEXIST);
    }
    if existing == Some(ino) {
        return Ok(());
    }
    let is_dir = |m: &Model, i: usize| matches!(m.nodes[i], M::Dir(_));
    if is_dir(m, ino) && m.is_within(to, ino) {
        return Err(libc::EINVAL);
    }
    match (existing, replace) {
        (None, Replace::Exchange) => return Err(libc::ENOENT),
        (Some(_), Replace::No) => return Err(libc::EEXIST),
        (Some(other), Replace::Exchange) => {
            if is_dir(m, other) && m.is_within(parent, other) {
                return Err(libc::EINVAL);
            }
            m.dir_mut(parent).insert(name.clone(), other);
            m.dir_mut(to).insert(to_name.to_vec(), ino);
            return Ok(());
        }
        (Some(other), Replace::Yes) => match (is_dir(m, ino), &m.nodes[other]) {
            (false, M::Dir(_)) => return Err(libc::EISDIR),
            (true, M::File(_) | M::Link(_)) => return Err(libc::ENOTDIR),
            (true, M::Dir(d)) if !d.is_empty() => return Err(libc::ENOTEMPTY),
            _ => {}
        },
        (None, _) => {}
    }
    m.dir_mut(parent).remove(name);
    m.dir_mut(to).insert(to_name.to_vec(), ino);
    Ok(())
}

/// The whole tree of the branch equals the model's.
async fn compare(m: &Model, b: &Branch) {
    let (mut model_of, mut branch_of) = (HashMap::new(), HashMap::new());
    for (path, ino) in m.paths() {
        let at = resolve(b, &path).await;
        let a = b.getattr(at).unwrap();
        let same = (*model_of.entry(at).or_insert(ino), *branch_of.entry(ino).or_insert(at));
        assert_eq!(same, (ino, at), "{path:?}: names share an inode exactly when they are one file");
        match &m.nodes[ino] {
            M::Dir(d) => {
                assert_eq!(a.kind, Kind::Dir, "{path:?}");
                let (_, listed) = b.readdir(at).await.unwrap();
                let names: Vec<&Vec<u8>> = listed.iter().map(|(_, _, n)| n).collect();
                assert_eq!(names, d.keys().collect::<Vec<_>>(), "{path:?}");
            }
            M::File(f) => {
                assert_eq!((a.kind, a.size), (Kind::File, f.len() as u64), "{path:?}");
                assert_eq!(a.nlink, m.nlink(ino), "{path:?}");
                let got = b.read(at, 0, f.len() as u32 + 10).await.unwrap();
                assert!(got == *f, "{path:?}: contents differ");
            }
            M::Link(t) => assert_eq!(b.readlink(at).unwrap(), *t, "{path:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Storing the model's first state as a point.

fn store_dir(m: &Model, dir: usize, packer: &mut Packer, groups: &mut HashMap<usize, u64>) -> Tree {
    let mut tree = Tree::default();
    for (name, &ino) in m.dir(dir) {
        let mut e = match &m.nodes[ino] {
            M::File(f) => {
                let mut e = Entry::new(name.clone(), EntryKind::File);
                e.mode = 0o600;
                e.size = f.len() as u64;
                e.nlink = m.nlink(ino);
                if e.nlink > 1 {
                    let next = groups.len() as u64 + 1;
                    e.link_group = *groups.entry(ino).or_insert(next);
                }
                // Chunks of 3,000 bytes: reads and copies span several.
                e.content = f.chunks(3000).map(|c| Extent::Data(packer.store(BlobKind::Data, c).unwrap())).collect();
                e
            }
            M::Dir(_) => {
                let sub = store_dir(m, ino, packer, groups);
                let mut e = Entry::new(name.clone(), EntryKind::Dir);
                e.mode = 0o700;
                e.size = 4096;
                e.subtree = Some(packer.store(BlobKind::Tree, &sub.encode()).unwrap());
                e
            }
            M::Link(t) => {
                let mut e = Entry::new(name.clone(), EntryKind::Symlink);
                e.mode = 0o777;
                e.target = t.clone();
                e
            }
        };
        e.inode = ino as u64;
        tree.entries.push(e);
    }
    tree.sort();
    tree
}

async fn store_point(repo: &Repository, time: Timestamp, m: &Model) -> catalog::PointRef {
    let writer = Writer::new(repo.clone()).await.unwrap();
    let (w, m) = (writer.clone(), m.clone());
    let root = tokio::task::spawn_blocking(move || {
        let mut packer = w.packer();
        let top = store_dir(&m, TOP, &mut packer, &mut HashMap::new());
        let mut e = Entry::new(b"data".to_vec(), EntryKind::Dir);
        e.mode = 0o700;
        e.size = 4096;
        e.subtree = Some(packer.store(BlobKind::Tree, &top.encode()).unwrap());
        let root = packer.store(BlobKind::Tree, &Tree { entries: vec![e] }.encode()).unwrap();
        packer.flush().unwrap();
        root
    })
    .await
    .unwrap();
    let durable = writer.finish().await.unwrap();
    let mut manifest = Manifest::new("db", time, "host".into(), "dir", "/data".into(), root);
    manifest.index = durable.summary.index.clone();
    durable.commit(&manifest, time).await.unwrap()
}

async fn run(seed: u64, ops: Vec<Op>) {
    let repo = Repository::init(Store::memory(), &Secret::KeyFile([7; 32]), catalog::DEFAULT_KDF, "host".into())
        .await
        .unwrap()
        .0;
    let time = Timestamp::from_second(1_780_000_000).unwrap();
    let mut model = Model::initial(seed);
    let point = store_point(&repo, time, &model).await;
    let objects = |repo: &Repository| {
        let store = repo.store().clone();
        async move {
            let mut all = Vec::new();
            for name in store.list_names("").await.unwrap() {
                all.push((name.clone(), store.get(&name).await.unwrap()));
            }
            all.sort();
            all
        }
    };
    let before = objects(&repo).await;
    let lower = Fs::new(repo.clone(), Scope::Moment(vec![point.clone()], time), 1 << 20, None).await.unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let branch = Branch::new(lower, scratch.path().to_path_buf(), None).await.unwrap();
    let first = model.clone();
    for op in &ops {
        apply(&mut model, &branch, op).await;
    }
    compare(&model, &branch).await;
    assert_eq!(objects(&repo).await, before, "the repository is unchanged");
    assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0, "scratch files are anonymous");
    // A second branch of the same point starts from the point again.
    let lower = Fs::new(repo, Scope::Moment(vec![point], time), 1 << 20, None).await.unwrap();
    let again = Branch::new(lower, scratch.path().to_path_buf(), None).await.unwrap();
    compare(&first, &again).await;
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 200,
        // Integration tests live outside `src/`, where proptest's default does not look.
        failure_persistence: Some(Box::new(prop::test_runner::FileFailurePersistence::Direct(
            "proptest-regressions/branch.txt",
        ))),
        ..ProptestConfig::default()
    })]

    /// Every answer of the branch matches the model's.
    #[test]
    fn a_branch_answers_as_the_model_does(seed in any::<u64>(), ops in prop::collection::vec(op(), 1..40)) {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap().block_on(run(seed, ops));
    }
}

/// Writes of whole PostgreSQL pages over a file of the point: only the pages
/// written are the branch's, the others still read as the point has them, and a
/// file cut short and grown again reads zeros where it was cut.
#[tokio::test(flavor = "multi_thread")]
async fn pages_written_and_cut_read_back_as_a_disk_would() {
    let repo = Repository::init(Store::memory(), &Secret::KeyFile([7; 32]), catalog::DEFAULT_KDF, "host".into())
        .await
        .unwrap()
        .0;
    let time = Timestamp::from_second(1_780_000_000).unwrap();
    let model = Model::initial(7);
    let point = store_point(&repo, time, &model).await;
    let lower = Fs::new(repo, Scope::Moment(vec![point], time), 1 << 20, None).await.unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let b = Branch::new(lower, scratch.path().to_path_buf(), None).await.unwrap();
    let rel = resolve(&b, &[b"base".to_vec(), b"1".to_vec(), b"16385".to_vec()]).await;
    let M::File(old) =
        &model.nodes[model.paths().iter().find(|(p, _)| p.last().is_some_and(|n| n == b"16385")).unwrap().1]
    else {
        unreachable!()
    };
    let page = vec![0xab; 8192];
    b.write(rel, 8192, &page).await.unwrap();
    let got = b.read(rel, 0, 40_960).await.unwrap();
    assert_eq!(got[..8192], old[..8192], "the page before is the point's");
    assert_eq!(got[8192..16384], page[..]);
    assert_eq!(got[16384..], old[16384..], "the pages after are the point's");
    // Cut in the middle of a page, then grown: zeros from the cut on.
    b.setattr(rel, SetAttr { size: Some(20_000), ..Default::default() }).await.unwrap();
    b.setattr(rel, SetAttr { size: Some(40_960), ..Default::default() }).await.unwrap();
    let got = b.read(rel, 0, 40_960).await.unwrap();
    assert_eq!(got[16384..20_000], old[16384..20_000]);
    assert!(got[20_000..].iter().all(|&x| x == 0), "nothing past the cut comes back");
    // Past the largest file a branch writes: EFBIG, and nothing changes.
    let far = b.write(rel, mountd::branch::MAX_FILE, b"x").await.unwrap_err();
    assert_eq!(far.errno(), libc::EFBIG);
    assert_eq!(b.getattr(rel).unwrap().size, 40_960);
    // The other name of a file with two sees the write.
    let one = resolve(&b, &[b"linked".to_vec()]).await;
    b.write(one, 3, b"xyz").await.unwrap();
    let other = resolve(&b, &[b"base".to_vec(), b"1".to_vec(), b"16384".to_vec()]).await;
    assert_eq!(one, other);
    assert_eq!(&b.read(other, 0, 6).await.unwrap()[3..], b"xyz");
}

/// A branch mounted through FUSE takes what programs do to files: writes in
/// place and past the end, renames over a file, a file unlinked while open and
/// still read, hard and symbolic links, directories made and removed, a cut; and
/// the point's own bytes stay as they were.
#[test]
fn a_mounted_branch_takes_what_programs_do() {
    use std::fs;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::{FileExt, MetadataExt};

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let time = Timestamp::from_second(1_780_000_000).unwrap();
    let model = Model::initial(11);
    let (repo, point) = rt.block_on(async {
        let repo = Repository::init(Store::memory(), &Secret::KeyFile([7; 32]), catalog::DEFAULT_KDF, "host".into())
            .await
            .unwrap()
            .0;
        let point = store_point(&repo, time, &model).await;
        (repo, point)
    });
    let file_of = |name: &[u8]| {
        let (_, ino) = model.paths().into_iter().find(|(p, _)| p.last().is_some_and(|n| n == name)).unwrap();
        let M::File(f) = &model.nodes[ino] else { unreachable!() };
        f.clone()
    };
    let scratch = tempfile::tempdir().unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let lower = rt.block_on(Fs::new(repo.clone(), Scope::Moment(vec![point.clone()], time), 1 << 20, None)).unwrap();
    let branch = Arc::new(rt.block_on(Branch::new(lower, scratch.path().to_path_buf(), None)).unwrap());
    let mounted =
        mountd::mount_branch(branch.clone(), rt.handle().clone(), mnt.path(), "ebb-branch-test", false).unwrap();
    let at = |p: &str| mnt.path().join(p);
    // What the branch itself holds at `path`, not the kernel's cache of it: the
    // mount caches writes (its writeback cache) until a sync sends them.
    let held = |path: &str| {
        rt.block_on(async {
            let names: Vec<Vec<u8>> = path.split('/').map(|n| n.as_bytes().to_vec()).collect();
            let ino = resolve(&branch, &names).await;
            let size = branch.getattr(ino).unwrap().size;
            (size, branch.read(ino, 0, size as u32 + 10).await.unwrap())
        })
    };

    // A page written in place, then the file grown past its end.
    let rel = fs::OpenOptions::new().read(true).write(true).open(at("base/1/16385")).unwrap();
    rel.write_all_at(&[7u8; 8192], 16384).unwrap();
    rel.write_all_at(b"tail", 50_000).unwrap();
    rel.sync_all().unwrap();
    let mut want = file_of(b"16385");
    want[16384..24576].fill(7);
    want.resize(50_000, 0);
    want.extend_from_slice(b"tail");
    assert_eq!(fs::read(at("base/1/16385")).unwrap(), want);
    assert_eq!(fs::metadata(at("base/1/16385")).unwrap().len(), 50_004);
    assert!(held("base/1/16385") == (50_004, want), "synced: the branch holds it");

    // Written to a new name, then renamed over an old file (as PostgreSQL
    // replaces its control and state files).
    let mut tmp = fs::File::create(at("global/pg_control.tmp")).unwrap();
    tmp.write_all(b"new control").unwrap();
    tmp.sync_all().unwrap();
    fs::rename(at("global/pg_control.tmp"), at("global/pg_control")).unwrap();
    assert_eq!(fs::read(at("global/pg_control")).unwrap(), b"new control");
    assert_eq!(held("global/pg_control"), (11, b"new control".to_vec()));
    assert_eq!(fs::read_dir(at("global")).unwrap().count(), 1);

    // Unlinked while open: still read through the open handle.
    let mut open = fs::File::open(at("base/1/16384")).unwrap();
    fs::remove_file(at("base/1/16384")).unwrap();
    let mut first = vec![0; 100];
    open.read_exact(&mut first).unwrap();
    assert_eq!(first, file_of(b"16384")[..100]);
    assert_eq!(fs::read(at("linked")).unwrap(), file_of(b"16384"), "its other name stays");
    assert_eq!(fs::metadata(at("linked")).unwrap().nlink(), 1);

    // Links, directories, a cut.
    fs::hard_link(at("PG_VERSION"), at("pg_wal/version")).unwrap();
    assert_eq!(fs::metadata(at("PG_VERSION")).unwrap().ino(), fs::metadata(at("pg_wal/version")).unwrap().ino());
    std::os::unix::fs::symlink("../PG_VERSION", at("pg_wal/link")).unwrap();
    assert_eq!(fs::read(at("pg_wal/link")).unwrap(), b"15\n");
    fs::create_dir_all(at("pg_wal/archive_status/x")).unwrap();
    assert!(fs::remove_dir(at("pg_wal/archive_status")).is_err(), "not empty");
    fs::remove_dir(at("pg_wal/archive_status/x")).unwrap();
    let mut f = fs::OpenOptions::new().write(true).open(at("linked")).unwrap();
    f.set_len(10).unwrap();
    f.seek(SeekFrom::End(0)).unwrap();
    f.write_all(b"!").unwrap();
    drop(f);
    let mut want = file_of(b"16384")[..10].to_vec();
    want.push(b'!');
    assert_eq!(fs::read(at("linked")).unwrap(), want);
    assert_eq!(fs::read_link(at("tblspc")).unwrap(), std::path::PathBuf::from("base/1"));
    // A directory listed while its entries are removed, as PostgreSQL clears
    // pg_wal and its temporary files: every entry is seen once.
    fs::create_dir(at("many")).unwrap();
    // More than one read of the directory takes (glibc asks for st_blksize, 128 KiB).
    for i in 0..5000 {
        fs::write(at(&format!("many/000000010000000000000000-segment-{i:04}")), b"x").unwrap();
    }
    let mut seen = 0;
    for e in fs::read_dir(at("many")).unwrap() {
        fs::remove_file(e.unwrap().path()).unwrap();
        seen += 1;
    }
    assert_eq!(seen, 5000, "each entry once, none skipped");
    fs::remove_dir(at("many")).unwrap();
    let mut names: Vec<_> = fs::read_dir(mnt.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["PG_VERSION", "base", "global", "linked", "pg_wal", "tblspc"]);

    drop((open, rel, tmp));
    mounted.unmount().unwrap();
    assert_eq!(fs::read_dir(scratch.path()).unwrap().count(), 0, "scratch files are anonymous");
    // The point reads as it was.
    rt.block_on(async {
        let lower = Fs::new(repo, Scope::Moment(vec![point], time), 1 << 20, None).await.unwrap();
        compare(&model, &Branch::new(lower, scratch.path().to_path_buf(), None).await.unwrap()).await;
    });
}
