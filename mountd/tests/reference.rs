//! The filesystem core against a reference model, without FUSE.
//!
//! Each case makes a few sources in a `memory://` repository, each a sequence of
//! points that random edits lead from one to the next: files written, rewritten in
//! place or replaced, hard-linked, renamed and removed, with holes and extended
//! attributes, directories and symlinks. The model is the sources' trees, kept as
//! plain maps. The case mounts one scope of the repository (every point, one source's
//! points, or one moment of several sources or of one) and asks the core, in random
//! order, to look up, stat, read, list, readlink, seek and read attributes of paths
//! that exist and paths that do not, and compares every answer with what the model
//! says. Inode numbers are checked too: two names share one exactly when they are
//! one file of one point as shown in one place, never across points or sources.
//!
//! A failure is shrunk to a small case and its seed written to
//! `proptest-regressions/reference.txt`, which is kept in git and replayed first on
//! every run. `PROPTEST_CASES=N` runs N cases instead of the default.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use catalog::tree::{Entry, EntryKind, Extent, Timestamp as TreeTime, Tree};
use catalog::{BlobKind, Manifest, Packer, Repository, Secret, Store, Writer};
use jiff::Timestamp;
use mountd::{Fs, FsError, Kind, Scope, ROOT};
use proptest::prelude::*;

// ---------------------------------------------------------------------------
// The model: one source's files, as edits leave them.

#[derive(Debug, Clone)]
enum Piece {
    /// These bytes.
    Bytes(Vec<u8>),
    /// `len` copies of one byte: a long stretch of data in few bytes of input.
    Fill(u8, u32),
    /// A hole of `len` bytes.
    Hole(u32),
}

#[derive(Debug, Clone, PartialEq)]
enum Ext {
    Data(Vec<u8>),
    Hole(u64),
}

#[derive(Debug, Clone)]
struct MFile {
    extents: Vec<Ext>,
    mode: u32,
    uid: u32,
    mtime: i64,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl MFile {
    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for e in &self.extents {
            match e {
                Ext::Data(d) => out.extend_from_slice(d),
                Ext::Hole(n) => out.resize(out.len() + *n as usize, 0),
            }
        }
        out
    }

    fn size(&self) -> u64 {
        self.extents
            .iter()
            .map(|e| match e {
                Ext::Data(d) => d.len() as u64,
                Ext::Hole(n) => *n,
            })
            .sum()
    }
}

#[derive(Debug, Clone)]
enum MNode {
    File(MFile),
    Dir(BTreeMap<Vec<u8>, usize>),
    Symlink(Vec<u8>),
    Fifo,
}

/// One source's filesystem: inodes by number, the top directory being inode 0. A
/// file with several names is one inode named by several directories.
#[derive(Debug, Clone)]
struct MFs {
    inodes: Vec<MNode>,
}

/// Names come from a small set, so that edits meet names used before.
const NAMES: &[&[u8]] = &[b"a", b"b", b"c.txt", b"d\xffe", b"log", b"x y", b".hidden", b"z"];
const XATTR_KEYS: &[&[u8]] = &[b"user.one", b"user.two", b"trusted.three"];

#[derive(Debug, Clone)]
enum Op {
    /// A new file (replacing a file of that name, if any: a rename over it).
    Create {
        dir: u8,
        name: u8,
        content: Vec<Piece>,
        mode: u16,
    },
    /// An existing file's bytes rewritten in place: every name of it sees them.
    Rewrite {
        file: u8,
        content: Vec<Piece>,
    },
    Link {
        file: u8,
        dir: u8,
        name: u8,
    },
    Rename {
        entry: u8,
        dir: u8,
        name: u8,
    },
    Remove {
        entry: u8,
    },
    Mkdir {
        dir: u8,
        name: u8,
    },
    Symlink {
        dir: u8,
        name: u8,
        target: Vec<u8>,
    },
    Fifo {
        dir: u8,
        name: u8,
    },
    Xattr {
        file: u8,
        key: u8,
        value: Option<Vec<u8>>,
    },
}

impl MFs {
    fn new() -> MFs {
        MFs { inodes: vec![MNode::Dir(BTreeMap::new())] }
    }

    /// Every directory reachable from the top, the top first.
    fn dirs(&self) -> Vec<usize> {
        let mut out = vec![0];
        let mut i = 0;
        while i < out.len() {
            if let MNode::Dir(children) = &self.inodes[out[i]] {
                for &c in children.values() {
                    if matches!(self.inodes[c], MNode::Dir(_)) {
                        out.push(c);
                    }
                }
            }
            i += 1;
        }
        out
    }

    /// Every (directory, name) reachable from the top.
    fn entries(&self) -> Vec<(usize, Vec<u8>)> {
        let mut out = Vec::new();
        for d in self.dirs() {
            if let MNode::Dir(children) = &self.inodes[d] {
                out.extend(children.keys().map(|n| (d, n.clone())));
            }
        }
        out
    }

    fn files(&self) -> Vec<usize> {
        let mut out: Vec<usize> = self
            .entries()
            .iter()
            .map(|(d, n)| self.child(*d, n).unwrap())
            .filter(|&i| matches!(self.inodes[i], MNode::File(_)))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    fn child(&self, dir: usize, name: &[u8]) -> Option<usize> {
        match &self.inodes[dir] {
            MNode::Dir(c) => c.get(name).copied(),
            _ => None,
        }
    }

    fn children(&mut self, dir: usize) -> &mut BTreeMap<Vec<u8>, usize> {
        match &mut self.inodes[dir] {
            MNode::Dir(c) => c,
            _ => unreachable!("dirs() lists directories only"),
        }
    }

    fn is_within(&self, inner: usize, outer: usize) -> bool {
        if inner == outer {
            return true;
        }
        match &self.inodes[outer] {
            MNode::Dir(c) => c.values().any(|&x| self.is_within(inner, x)),
            _ => false,
        }
    }

    fn add(&mut self, node: MNode) -> usize {
        self.inodes.push(node);
        self.inodes.len() - 1
    }

    /// Applies `op`, or nothing when it does not apply to the tree as it is.
    fn apply(&mut self, op: &Op, clock: i64) {
        let dirs = self.dirs();
        let pick_dir = |d: u8| dirs[d as usize % dirs.len()];
        let name = |n: u8| NAMES[n as usize % NAMES.len()].to_vec();
        match op {
            Op::Create { dir, name: n, content, mode } => {
                let (d, n) = (pick_dir(*dir), name(*n));
                if self.child(d, &n).is_some_and(|c| !matches!(self.inodes[c], MNode::File(_))) {
                    return;
                }
                let file = MFile {
                    extents: extents(content),
                    mode: (*mode as u32) & 0o7777,
                    uid: 1000 + *mode as u32 % 3,
                    mtime: clock,
                    xattrs: BTreeMap::new(),
                };
                let ino = self.add(MNode::File(file));
                self.children(d).insert(n, ino);
            }
            Op::Rewrite { file, content } => {
                let files = self.files();
                if let Some(&f) = files.get(*file as usize % files.len().max(1)) {
                    if let MNode::File(m) = &mut self.inodes[f] {
                        m.extents = extents(content);
                        m.mtime = clock;
                    }
                }
            }
            Op::Link { file, dir, name: n } => {
                let files = self.files();
                let Some(&f) = files.get(*file as usize % files.len().max(1)) else { return };
                let (d, n) = (pick_dir(*dir), name(*n));
                if self.child(d, &n).is_some() {
                    return;
                }
                self.children(d).insert(n, f);
            }
            Op::Rename { entry, dir, name: n } => {
                let entries = self.entries();
                let Some((from, old)) = entries.get(*entry as usize % entries.len().max(1)).cloned() else { return };
                let (to, n) = (pick_dir(*dir), name(*n));
                let ino = self.child(from, &old).unwrap();
                if self.child(to, &n).is_some() || self.is_within(to, ino) {
                    return;
                }
                self.children(from).remove(&old);
                self.children(to).insert(n, ino);
            }
            Op::Remove { entry } => {
                let entries = self.entries();
                if let Some((d, n)) = entries.get(*entry as usize % entries.len().max(1)).cloned() {
                    self.children(d).remove(&n);
                }
            }
            Op::Mkdir { dir, name: n } => {
                let (d, n) = (pick_dir(*dir), name(*n));
                if self.child(d, &n).is_none() {
                    let ino = self.add(MNode::Dir(BTreeMap::new()));
                    self.children(d).insert(n, ino);
                }
            }
            Op::Symlink { dir, name: n, target } => {
                let (d, n) = (pick_dir(*dir), name(*n));
                if self.child(d, &n).is_none() && !target.is_empty() {
                    let ino = self.add(MNode::Symlink(target.clone()));
                    self.children(d).insert(n, ino);
                }
            }
            Op::Fifo { dir, name: n } => {
                let (d, n) = (pick_dir(*dir), name(*n));
                if self.child(d, &n).is_none() {
                    let ino = self.add(MNode::Fifo);
                    self.children(d).insert(n, ino);
                }
            }
            Op::Xattr { file, key, value } => {
                let files = self.files();
                let Some(&f) = files.get(*file as usize % files.len().max(1)) else { return };
                let key = XATTR_KEYS[*key as usize % XATTR_KEYS.len()].to_vec();
                if let MNode::File(m) = &mut self.inodes[f] {
                    match value {
                        Some(v) => m.xattrs.insert(key, v.clone()),
                        None => m.xattrs.remove(&key),
                    };
                }
            }
        }
    }
}

/// A file's extents as a backup stores them: adjacent data joined, empty pieces
/// dropped, holes kept.
fn extents(pieces: &[Piece]) -> Vec<Ext> {
    let mut out: Vec<Ext> = Vec::new();
    for p in pieces {
        let next = match p {
            Piece::Bytes(b) if !b.is_empty() => Ext::Data(b.clone()),
            Piece::Fill(b, n) if *n > 0 => Ext::Data(vec![*b; *n as usize]),
            Piece::Hole(n) if *n > 0 => Ext::Hole(*n as u64),
            _ => continue,
        };
        match (out.last_mut(), next) {
            (Some(Ext::Hole(a)), Ext::Hole(b)) => *a += b,
            (_, next) => out.push(next),
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Generating cases.

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        3 => prop::collection::vec(any::<u8>(), 0..3000).prop_map(Piece::Bytes),
        2 => (any::<u8>(), 0u32..150_000).prop_map(|(b, n)| Piece::Fill(b, n)),
        2 => (1u32..200_000).prop_map(Piece::Hole),
    ]
}

fn content() -> impl Strategy<Value = Vec<Piece>> {
    prop::collection::vec(piece(), 0..4)
}

fn op() -> impl Strategy<Value = Op> {
    let small = any::<u8>();
    prop_oneof![
        6 => (small, small, content(), 0u16..0o10000).prop_map(|(dir, name, content, mode)| Op::Create { dir, name, content, mode }),
        2 => (small, content()).prop_map(|(file, content)| Op::Rewrite { file, content }),
        3 => (small, small, small).prop_map(|(file, dir, name)| Op::Link { file, dir, name }),
        2 => (small, small, small).prop_map(|(entry, dir, name)| Op::Rename { entry, dir, name }),
        1 => small.prop_map(|entry| Op::Remove { entry }),
        3 => (small, small).prop_map(|(dir, name)| Op::Mkdir { dir, name }),
        1 => (small, small, prop::collection::vec(any::<u8>().prop_filter("no NUL", |b| *b != 0), 1..40))
            .prop_map(|(dir, name, target)| Op::Symlink { dir, name, target }),
        1 => (small, small).prop_map(|(dir, name)| Op::Fifo { dir, name }),
        2 => (small, small, prop::option::of(prop::collection::vec(any::<u8>(), 0..64)))
            .prop_map(|(file, key, value)| Op::Xattr { file, key, value }),
    ]
}

/// Which scope of the repository a case mounts.
#[derive(Debug, Clone)]
enum ScopeChoice {
    /// Every point of every source.
    EveryPoint,
    /// Every point of one source.
    EveryPointOf(u8),
    /// The state at a moment: this many seconds into the points' times.
    At(u8),
    /// One source at a moment.
    AtOf(u8, u8),
}

#[derive(Debug, Clone)]
struct Case {
    /// Each source: the edits before each of its points.
    sources: Vec<Vec<Vec<Op>>>,
    scope: ScopeChoice,
    cache_bytes: usize,
    /// What to ask, in order: (which path, what to do, a number for offsets).
    probes: Vec<(u16, u8, u32, u32)>,
}

fn case() -> impl Strategy<Value = Case> {
    let point = prop::collection::vec(op(), 0..12);
    let source = prop::collection::vec(point, 1..4);
    let scope = prop_oneof![
        Just(ScopeChoice::EveryPoint),
        any::<u8>().prop_map(ScopeChoice::EveryPointOf),
        any::<u8>().prop_map(ScopeChoice::At),
        (any::<u8>(), any::<u8>()).prop_map(|(s, t)| ScopeChoice::AtOf(s, t)),
    ];
    let cache = prop_oneof![Just(64 << 10), Just(64 << 20)];
    let probes = prop::collection::vec((any::<u16>(), any::<u8>(), any::<u32>(), any::<u32>()), 20..80);
    (prop::collection::vec(source, 1..4), scope, cache, probes).prop_map(|(sources, scope, cache_bytes, probes)| Case {
        sources,
        scope,
        cache_bytes,
        probes,
    })
}

// ---------------------------------------------------------------------------
// Storing the model as points.

const SOURCES: &[&str] = &["alpha", "beta", "gamma"];

/// When point `k` of source `s` is taken: sources interleave, and times carry
/// nanoseconds, as real ones do.
fn point_time(s: usize, k: usize) -> Timestamp {
    let base = Timestamp::from_second(1_780_000_000).unwrap();
    let nanos = (k as i64 * 10 + s as i64 * 3) * 1_000_000_000 + 123_456_789 * (s as i64 + 1) % 1_000_000_000;
    base.checked_add(jiff::SignedDuration::from_nanos(nanos)).unwrap()
}

/// The tree entries of directory `dir`, blobs stored through `packer`. Files with
/// several names get link groups numbered from 1 in each point, as a backup does:
/// the same numbers mean other files in other points and sources.
fn store_dir(
    m: &MFs,
    dir: usize,
    packer: &mut Packer,
    groups: &mut HashMap<usize, u64>,
    nlinks: &HashMap<usize, u32>,
) -> Tree {
    let MNode::Dir(children) = &m.inodes[dir] else { unreachable!() };
    let mut tree = Tree::default();
    for (name, &ino) in children {
        let mut e = match &m.inodes[ino] {
            MNode::File(f) => {
                let mut e = Entry::new(name.clone(), EntryKind::File);
                e.mode = f.mode;
                e.uid = f.uid;
                e.gid = f.uid + 1;
                e.size = f.size();
                e.mtime = TreeTime { sec: f.mtime, nsec: 7 };
                e.nlink = nlinks[&ino];
                if e.nlink > 1 {
                    let next = groups.len() as u64 + 1;
                    e.link_group = *groups.entry(ino).or_insert(next);
                }
                e.xattrs = f.xattrs.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                e.content = f
                    .extents
                    .iter()
                    .map(|x| match x {
                        Ext::Data(d) => Extent::Data(packer.store(BlobKind::Data, d).unwrap()),
                        Ext::Hole(n) => Extent::Hole(*n),
                    })
                    .collect();
                e
            }
            MNode::Dir(_) => {
                let sub = store_dir(m, ino, packer, groups, nlinks);
                let mut e = Entry::new(name.clone(), EntryKind::Dir);
                e.mode = 0o750;
                e.size = 4096;
                e.subtree = Some(packer.store(BlobKind::Tree, &sub.encode()).unwrap());
                e
            }
            MNode::Symlink(t) => {
                let mut e = Entry::new(name.clone(), EntryKind::Symlink);
                e.mode = 0o777;
                e.target = t.clone();
                e
            }
            MNode::Fifo => {
                let mut e = Entry::new(name.clone(), EntryKind::Fifo);
                e.mode = 0o600;
                e
            }
        };
        e.inode = ino as u64;
        tree.entries.push(e);
    }
    tree.sort();
    tree
}

/// How many names each inode has in `m`.
fn nlinks(m: &MFs) -> HashMap<usize, u32> {
    let mut out = HashMap::new();
    for (d, n) in m.entries() {
        *out.entry(m.child(d, &n).unwrap()).or_insert(0) += 1;
    }
    out
}

async fn store_point(repo: &Repository, source: &str, time: Timestamp, m: &MFs) -> catalog::PointRef {
    let writer = Writer::new(repo.clone()).await.unwrap();
    let (w, m) = (writer.clone(), m.clone());
    let root = tokio::task::spawn_blocking(move || {
        let mut packer = w.packer();
        let top = store_dir(&m, 0, &mut packer, &mut HashMap::new(), &nlinks(&m));
        let mut e = Entry::new(b"data".to_vec(), EntryKind::Dir);
        e.mode = 0o700;
        e.size = 4096;
        e.subtree = Some(packer.store(BlobKind::Tree, &top.encode()).unwrap());
        let root = Tree { entries: vec![e] };
        let root = packer.store(BlobKind::Tree, &root.encode()).unwrap();
        packer.flush().unwrap();
        root
    })
    .await
    .unwrap();
    let durable = writer.finish().await.unwrap();
    let mut manifest = Manifest::new(source, time, "host".into(), "dir", "/data".into(), root);
    manifest.index = durable.summary.index.clone();
    durable.commit(&manifest, time).await.unwrap()
}

// ---------------------------------------------------------------------------
// What the mount should show.

/// A path of the mount and what is there.
#[derive(Debug, Clone)]
enum Want {
    /// A directory the mount makes up (`points/`, a source, the root of several).
    Synthetic { children: Option<Vec<(Vec<u8>, Kind)>> },
    /// `latest`: a symlink to this.
    Latest(Vec<u8>),
    /// Inode `ino` of source `source`'s model after point `point`, shown under
    /// the point root at mount path `shown`.
    Node { snapshot: Arc<MFs>, ino: usize, shown: Vec<Vec<u8>>, nlink: u32, top: bool },
}

struct Expected {
    paths: BTreeMap<Vec<Vec<u8>>, Want>,
}

fn kind_of(n: &MNode) -> Kind {
    match n {
        MNode::File(_) => Kind::File,
        MNode::Dir(_) => Kind::Dir,
        MNode::Symlink(_) => Kind::Symlink,
        MNode::Fifo => Kind::Fifo,
    }
}

impl Expected {
    /// Adds the point whose model is `m`, shown at `at`, and everything under it.
    fn add_point(&mut self, at: Vec<Vec<u8>>, m: &Arc<MFs>) {
        let links = nlinks(m);
        let mut stack = vec![(at.clone(), 0usize)];
        self.paths
            .insert(at.clone(), Want::Node { snapshot: m.clone(), ino: 0, shown: at.clone(), nlink: 1, top: true });
        while let Some((path, dir)) = stack.pop() {
            let MNode::Dir(children) = &m.inodes[dir] else { continue };
            for (name, &ino) in children {
                let mut p = path.clone();
                p.push(name.clone());
                let nlink = links[&ino];
                self.paths
                    .insert(p.clone(), Want::Node { snapshot: m.clone(), ino, shown: at.clone(), nlink, top: false });
                if matches!(m.inodes[ino], MNode::Dir(_)) {
                    stack.push((p, ino));
                }
            }
        }
    }

    fn synthetic(&mut self, path: Vec<Vec<u8>>, children: Option<Vec<(Vec<u8>, Kind)>>) {
        self.paths.insert(path, Want::Synthetic { children });
    }
}

/// `name` as a path component.
fn c(name: &str) -> Vec<u8> {
    name.as_bytes().to_vec()
}

/// Builds the expected mount of `case` over `models` (each source's model after
/// each point) and returns the scope to mount.
fn expected(case: &Case, models: &[Vec<Arc<MFs>>], points: &[Vec<catalog::PointRef>]) -> (Scope, Expected) {
    let mut want = Expected { paths: BTreeMap::new() };
    let n = models.len();
    // Moments: a little after each point's time, before the next; and one before all.
    let moment = |i: u8| {
        let (s, k) = (i as usize % n, (i as usize / n) % (models[i as usize % n].len() + 1));
        if k == 0 {
            point_time(0, 0).checked_sub(jiff::SignedDuration::from_secs(1)).unwrap()
        } else {
            point_time(s, k - 1).checked_add(jiff::SignedDuration::from_millis(1500)).unwrap()
        }
    };
    let at_point = |s: usize, t: Timestamp| (0..models[s].len()).rev().find(|&k| point_time(s, k) <= t);
    let timeline = |want: &mut Expected, root: Vec<Vec<u8>>, s: usize| {
        let newest = points[s].last().unwrap().time;
        want.synthetic(
            root.clone(),
            Some(vec![(c("at"), Kind::Dir), (c("latest"), Kind::Symlink), (c("points"), Kind::Dir)]),
        );
        let mut latest = root.clone();
        latest.push(c("latest"));
        want.paths.insert(latest, Want::Latest(format!("points/{newest}").into_bytes()));
        let mut at_dir = root.clone();
        at_dir.push(c("at"));
        want.synthetic(at_dir.clone(), Some(Vec::new()));
        let mut points_dir = root.clone();
        points_dir.push(c("points"));
        let listed = points[s].iter().map(|p| (p.time.to_string().into_bytes(), Kind::Dir)).collect();
        want.synthetic(points_dir.clone(), Some(listed));
        for (k, p) in points[s].iter().enumerate() {
            let mut shown = points_dir.clone();
            shown.push(p.time.to_string().into_bytes());
            want.add_point(shown, &models[s][k]);
            // The same point by a moment after it: shown on its own.
            let mut by_moment = at_dir.clone();
            let later = p.time.checked_add(jiff::SignedDuration::from_millis(500)).unwrap();
            by_moment.push(later.to_string().into_bytes());
            want.add_point(by_moment, &models[s][k]);
        }
    };
    let scope = match case.scope {
        ScopeChoice::EveryPoint => {
            let names = (0..n).map(|s| (c(SOURCES[s]), Kind::Dir)).collect();
            want.synthetic(Vec::new(), Some(names));
            for (s, source) in SOURCES.iter().enumerate().take(n) {
                timeline(&mut want, vec![c(source)], s);
            }
            Scope::EveryPoint(None)
        }
        ScopeChoice::EveryPointOf(i) => {
            let s = i as usize % n;
            want.synthetic(Vec::new(), Some(vec![(c(SOURCES[s]), Kind::Dir)]));
            timeline(&mut want, vec![c(SOURCES[s])], s);
            Scope::EveryPoint(Some(SOURCES[s].to_string()))
        }
        ScopeChoice::At(i) => {
            let t = moment(i);
            let shown: Vec<usize> = (0..n).filter(|&s| at_point(s, t).is_some()).collect();
            if shown.len() == 1 {
                let s = shown[0];
                want.add_point(Vec::new(), &models[s][at_point(s, t).unwrap()]);
            } else {
                want.synthetic(Vec::new(), Some(shown.iter().map(|&s| (c(SOURCES[s]), Kind::Dir)).collect()));
                for &s in &shown {
                    want.add_point(vec![c(SOURCES[s])], &models[s][at_point(s, t).unwrap()]);
                }
            }
            Scope::Moment(shown.iter().map(|&s| points[s][at_point(s, t).unwrap()].clone()).collect(), t)
        }
        ScopeChoice::AtOf(i, j) => {
            let s = i as usize % n;
            let k = j as usize % models[s].len();
            let t = point_time(s, k).checked_add(jiff::SignedDuration::from_millis(700)).unwrap();
            want.add_point(Vec::new(), &models[s][k]);
            Scope::Moment(vec![points[s][k].clone()], t)
        }
    };
    (scope, want)
}

// ---------------------------------------------------------------------------
// Asking the core.

/// What the core said about each path: its inode, and who it should be.
struct Seen {
    /// inode -> identity of the file it should be
    by_ino: HashMap<u64, String>,
    /// identity -> inode
    by_identity: HashMap<String, u64>,
}

impl Seen {
    /// Records that `path` has inode `ino`, and checks that no other file has it.
    fn record(&mut self, path: &[Vec<u8>], want: &Want, ino: u64) -> Result<(), TestCaseError> {
        let identity = match want {
            // A file of a point shown at one place: its names share one inode.
            Want::Node { ino: i, shown, top: false, snapshot, .. } if matches!(snapshot.inodes[*i], MNode::File(_)) => {
                format!("{shown:?} file {i}")
            }
            _ => format!("{path:?}"),
        };
        if let Some(other) = self.by_ino.insert(ino, identity.clone()) {
            prop_assert_eq!(&other, &identity, "inode {} is two files", ino);
        }
        if let Some(other) = self.by_identity.insert(identity.clone(), ino) {
            prop_assert_eq!(other, ino, "{} has two inodes", identity);
        }
        Ok(())
    }
}

fn show(p: &[Vec<u8>]) -> String {
    p.iter().map(|c| String::from_utf8_lossy(c).into_owned()).collect::<Vec<_>>().join("/")
}

async fn resolve(fs: &Fs, path: &[Vec<u8>]) -> Result<mountd::Attr, FsError> {
    let mut attr = fs.getattr(ROOT).await?;
    for name in path {
        attr = fs.lookup(attr.ino, name).await?;
    }
    Ok(attr)
}

fn check_attr(path: &[Vec<u8>], want: &Want, attr: &mountd::Attr) -> Result<(), TestCaseError> {
    let p = show(path);
    match want {
        Want::Synthetic { .. } => {
            prop_assert_eq!(attr.kind, Kind::Dir, "{}", p);
            prop_assert_eq!(attr.perm, 0o555, "{}", p);
        }
        Want::Latest(target) => {
            prop_assert_eq!(attr.kind, Kind::Symlink, "{}", p);
            prop_assert_eq!(attr.size, target.len() as u64, "{}", p);
        }
        Want::Node { snapshot, ino, nlink, top, .. } => {
            let node = &snapshot.inodes[*ino];
            prop_assert_eq!(attr.kind, kind_of(node), "{}", p);
            match node {
                MNode::File(f) => {
                    prop_assert_eq!(attr.size, f.size(), "{}", p);
                    prop_assert_eq!(attr.perm as u32, f.mode, "{}", p);
                    prop_assert_eq!((attr.uid, attr.gid), (f.uid, f.uid + 1), "{}", p);
                    prop_assert_eq!(attr.nlink, *nlink, "{}", p);
                    let data: u64 =
                        f.extents.iter().map(|e| if let Ext::Data(d) = e { d.len() as u64 } else { 0 }).sum();
                    prop_assert_eq!(attr.blocks, data.div_ceil(512), "{}", p);
                    let mtime = std::time::UNIX_EPOCH + std::time::Duration::new(f.mtime as u64, 7);
                    prop_assert_eq!(attr.mtime, mtime, "{}", p);
                }
                MNode::Dir(_) => prop_assert_eq!(attr.perm, if *top { 0o700 } else { 0o750 }, "{}", p),
                MNode::Symlink(t) => prop_assert_eq!(attr.size, t.len() as u64, "{}", p),
                MNode::Fifo => prop_assert_eq!(attr.perm, 0o600, "{}", p),
            }
        }
    }
    Ok(())
}

/// The entries the model has in the directory at `want`.
fn listing(want: &Want) -> Option<Vec<(Vec<u8>, Kind)>> {
    match want {
        Want::Synthetic { children } => children.clone(),
        Want::Node { snapshot, ino, .. } => match &snapshot.inodes[*ino] {
            MNode::Dir(c) => Some(c.iter().map(|(n, &i)| (n.clone(), kind_of(&snapshot.inodes[i]))).collect()),
            _ => None,
        },
        Want::Latest(_) => None,
    }
}

/// Where SEEK_DATA / SEEK_HOLE at `offset` lands in `f`, as any filesystem says.
fn model_seek(f: &MFile, offset: u64, data: bool) -> Result<u64, ()> {
    if offset >= f.size() {
        return Err(());
    }
    let mut start = 0;
    for e in &f.extents {
        let (len, is_data) = match e {
            Ext::Data(d) => (d.len() as u64, true),
            Ext::Hole(n) => (*n, false),
        };
        if start + len > offset && is_data == data {
            return Ok(start.max(offset));
        }
        start += len;
    }
    if data {
        Err(())
    } else {
        Ok(f.size())
    }
}

async fn probe(
    fs: &Arc<Fs>,
    want: &Expected,
    seen: &mut Seen,
    which: (u16, u8, u32, u32),
) -> Result<(), TestCaseError> {
    let paths: Vec<(&Vec<Vec<u8>>, &Want)> = want.paths.iter().collect();
    let (i, action, a, b) = which;
    let (path, w) = paths[i as usize % paths.len()];
    let p = show(path);
    // A name the model does not have, next to this path.
    if action % 8 == 0 {
        let mut missing = path.clone();
        missing.push(b"no-such-name".to_vec());
        let got = resolve(fs, &missing).await;
        let is_dir = listing(w).is_some();
        match got {
            Err(FsError::NotFound) if is_dir => {}
            Err(FsError::NotDir) if !is_dir => {}
            // A symlink, `latest` included, is not a directory: lookups in it fail.
            Err(_) if !is_dir => {}
            other => prop_assert!(false, "{}/no-such-name: {:?}", p, other.map(|a| a.kind)),
        }
        return Ok(());
    }
    let attr = match resolve(fs, path).await {
        Ok(a) => a,
        Err(e) => return Err(TestCaseError::fail(format!("{p}: lookup failed: {e}"))),
    };
    check_attr(path, w, &attr)?;
    seen.record(path, w, attr.ino)?;
    let again = fs.getattr(attr.ino).await.map_err(|e| TestCaseError::fail(format!("{p}: getattr: {e}")))?;
    check_attr(path, w, &again)?;
    match (action / 8) % 5 {
        // List it, and look at every entry listed.
        0 => {
            let Some(mut children) = listing(w) else {
                prop_assert!(fs.readdir(attr.ino).await.is_err(), "{} listed as a directory", p);
                return Ok(());
            };
            children.sort_by(|a, b| a.0.cmp(&b.0));
            let got = fs.readdir(attr.ino).await.map_err(|e| TestCaseError::fail(format!("{p}: readdir: {e}")))?;
            let mut names: Vec<(Vec<u8>, Kind)> = got.iter().map(|(_, k, n)| (n.clone(), *k)).collect();
            names.sort_by(|a, b| a.0.cmp(&b.0));
            prop_assert_eq!(&names, &children, "{}: listing", p);
            for (ino, _, name) in got {
                let mut child = path.clone();
                child.push(name);
                seen.record(&child, &want.paths[&child], ino)?;
            }
            let plus =
                fs.readdir_plus(attr.ino).await.map_err(|e| TestCaseError::fail(format!("{p}: readdir+: {e}")))?;
            prop_assert_eq!(plus.len(), children.len() + 2, "{}: readdir_plus", p);
            for (a, name) in plus.iter().skip(2) {
                let mut child = path.clone();
                child.push(name.clone());
                check_attr(&child, &want.paths[&child], a)?;
                seen.record(&child, &want.paths[&child], a.ino)?;
            }
        }
        // Read a range of it.
        1 | 2 => {
            let Want::Node { snapshot, ino, .. } = w else {
                prop_assert!(fs.read(attr.ino, 0, 10).await.is_err(), "{} read as a file", p);
                return Ok(());
            };
            let MNode::File(f) = &snapshot.inodes[*ino] else {
                prop_assert!(fs.read(attr.ino, 0, 10).await.is_err(), "{} read as a file", p);
                return Ok(());
            };
            let bytes = f.bytes();
            // Offsets within the file most of the time, at or past its end at times.
            let offset = if bytes.is_empty() { a as u64 % 100 } else { a as u64 % (bytes.len() as u64 + 50) };
            let size = b % 300_000;
            let want_bytes = if offset as usize >= bytes.len() {
                &[][..]
            } else {
                &bytes[offset as usize..(offset as usize + size as usize).min(bytes.len())]
            };
            let got = match fs.read_now(attr.ino, offset, size) {
                Some(r) => r,
                None => fs.read(attr.ino, offset, size).await,
            }
            .map_err(|e| TestCaseError::fail(format!("{p}: read: {e}")))?;
            let got = got.with_slice(|s| s.to_vec());
            prop_assert!(
                got == want_bytes,
                "{}: read {} at {}: {} bytes, want {}",
                p,
                size,
                offset,
                got.len(),
                want_bytes.len()
            );
            if action % 2 == 0 {
                fs.forget_position(attr.ino);
            }
        }
        // Its symlink target.
        3 => {
            let target = match w {
                Want::Latest(t) => Some(t.clone()),
                Want::Node { snapshot, ino, .. } => match &snapshot.inodes[*ino] {
                    MNode::Symlink(t) => Some(t.clone()),
                    _ => None,
                },
                Want::Synthetic { .. } => None,
            };
            match (fs.readlink(attr.ino).await, target) {
                (Ok(got), Some(t)) => prop_assert_eq!(got, t, "{}: readlink", p),
                (Err(FsError::NotSymlink), None) => {}
                (got, t) => prop_assert!(false, "{}: readlink {:?}, want {:?}", p, got, t),
            }
        }
        // Its extended attributes, and where its data and holes are.
        _ => {
            let (xattrs, file) = match w {
                Want::Node { snapshot, ino, .. } => match &snapshot.inodes[*ino] {
                    MNode::File(f) => (f.xattrs.clone(), Some(f.clone())),
                    _ => (BTreeMap::new(), None),
                },
                _ => (BTreeMap::new(), None),
            };
            let list = fs.listxattr(attr.ino).await.map_err(|e| TestCaseError::fail(format!("{p}: listxattr: {e}")))?;
            let want_list: Vec<u8> = xattrs.keys().flat_map(|k| k.iter().copied().chain([0])).collect();
            prop_assert_eq!(list, want_list, "{}: listxattr", p);
            for key in XATTR_KEYS {
                match (fs.getxattr(attr.ino, key).await, xattrs.get(*key)) {
                    (Ok(v), Some(want)) => prop_assert_eq!(&v, want, "{}: getxattr", p),
                    (Err(FsError::NoAttr), None) => {}
                    (got, want) => prop_assert!(false, "{}: getxattr {:?}: {:?}, want {:?}", p, key, got, want),
                }
            }
            if let Some(f) = file {
                let offset = a as u64 % (f.size() + 10);
                for data in [true, false] {
                    let got = fs.seek(attr.ino, offset, data).map_err(|_| ());
                    prop_assert_eq!(got, model_seek(&f, offset, data), "{}: seek {} data={}", p, offset, data);
                }
            }
        }
    }
    Ok(())
}

fn run(case: Case) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let repo = Repository::init(Store::memory(), &Secret::KeyFile([7; 32]), catalog::DEFAULT_KDF, "host".into())
            .await
            .unwrap()
            .0;
        let mut models = Vec::new();
        let mut points = Vec::new();
        for (s, script) in case.sources.iter().enumerate() {
            let mut m = MFs::new();
            let (mut ms, mut ps) = (Vec::new(), Vec::new());
            for (k, ops) in script.iter().enumerate() {
                for op in ops {
                    m.apply(op, point_time(s, k).as_second() - 5);
                }
                ps.push(store_point(&repo, SOURCES[s], point_time(s, k), &m).await);
                ms.push(Arc::new(m.clone()));
            }
            models.push(ms);
            points.push(ps);
        }
        let (scope, want) = expected(&case, &models, &points);
        let fs = Fs::new(repo, scope, case.cache_bytes, None).await.map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut seen = Seen { by_ino: HashMap::new(), by_identity: HashMap::new() };
        for &which in &case.probes {
            probe(&fs, &want, &mut seen, which).await?;
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 500,
        // Integration tests live outside `src/`, where proptest's default does not look.
        failure_persistence: Some(Box::new(prop::test_runner::FileFailurePersistence::Direct(
            "proptest-regressions/reference.txt",
        ))),
        ..ProptestConfig::default()
    })]

    /// Every answer of the core matches the model.
    #[test]
    fn the_core_shows_what_the_sources_held(case in case()) {
        run(case)?;
    }
}
