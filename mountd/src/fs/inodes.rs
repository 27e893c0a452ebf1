//! Inode numbers, handed out on first sight and keyed by (parent, name), so that
//! they stay stable for the life of the mount. The names of one hard-linked file
//! share one inode within one point as shown at one place; link groups are
//! numbered afresh in every point, so they mean nothing across points or sources.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::node::Node;
use crate::error::FsError;

pub const ROOT: u64 = 1;

#[derive(Default)]
struct Table {
    nodes: HashMap<u64, Arc<Node>>,
    names: HashMap<(u64, Vec<u8>), u64>,
    /// (inode of the point's root, link group) -> inode
    links: HashMap<(u64, u64), u64>,
    /// inode of an entry -> inode of the root of the point it belongs to (each point
    /// shown, under `points/`, `at/` or a source, is a point of its own)
    point_of: HashMap<u64, u64>,
    next: u64,
}

pub(crate) struct Inodes {
    table: Mutex<Table>,
}

impl Inodes {
    /// The table with `root` as inode `ROOT`.
    pub fn new(root: Node) -> Inodes {
        let mut t = Table { next: ROOT + 1, ..Default::default() };
        if root.stored().is_some() {
            t.point_of.insert(ROOT, ROOT);
        }
        t.nodes.insert(ROOT, Arc::new(root));
        Inodes { table: Mutex::new(t) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().expect("inode table")
    }

    pub fn get(&self, ino: u64) -> Result<Arc<Node>, FsError> {
        self.lock().nodes.get(&ino).cloned().ok_or(FsError::BadInode(ino))
    }

    /// The inode of `name` in `parent`, if it was seen.
    pub fn known(&self, parent: u64, name: &[u8]) -> Option<u64> {
        self.lock().names.get(&(parent, name.to_vec())).copied()
    }

    /// The inode of `name` in `parent`, made with `make` on first sight.
    pub fn intern(&self, parent: u64, name: &[u8], make: impl FnOnce() -> Node) -> u64 {
        let mut t = self.lock();
        if let Some(&ino) = t.names.get(&(parent, name.to_vec())) {
            return ino;
        }
        let node = make();
        // The point an entry belongs to: its parent's, or, below a made-up
        // directory (`points/`, `at/`, the root of several sources), its own.
        let point = t.point_of.get(&parent).copied();
        let link = match (node.link_group(), point) {
            (0, _) | (_, None) => None,
            (group, Some(p)) => Some((p, group)),
        };
        if let Some(key) = link {
            if let Some(&ino) = t.links.get(&key) {
                t.names.insert((parent, name.to_vec()), ino);
                return ino;
            }
        }
        let ino = t.next;
        t.next += 1;
        if node.stored().is_some() {
            t.point_of.insert(ino, point.unwrap_or(ino));
        }
        t.nodes.insert(ino, Arc::new(node));
        t.names.insert((parent, name.to_vec()), ino);
        if let Some(key) = link {
            t.links.insert(key, ino);
        }
        ino
    }

    /// Inodes handed out so far.
    pub fn count(&self) -> u64 {
        self.lock().next - 1
    }
}
