//! What an inode stands for: a stored entry (as of a moment, with the appends
//! after its point), or a directory or link the mount makes up to show points.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use catalog::tree::{Entry, EntryKind, Tree};
use catalog::Overlay;
use tokio::sync::OnceCell;

use super::read::extent_starts;
use crate::error::FsError;

/// The directories and link the mount makes up.
pub(crate) enum Synth {
    /// The top of a mount of several sources, or of every point.
    Root,
    /// `<source>/`: `latest`, `points/`, `at/`.
    Source(String),
    /// `<source>/points/`: one directory per point.
    Points(String),
    /// `<source>/at/`: any moment, looked up by name.
    At(String),
    /// `<source>/latest`: a link to the newest readable point.
    Latest(String),
    /// A point whose manifest or root cannot be read: listed, so that the others
    /// are, and EIO inside.
    Damaged(String),
}

pub(crate) enum NodeKind {
    Synthetic(Synth),
    Entry {
        entry: Arc<Entry>,
        /// The appends after the point, up to the moment shown (none for a point
        /// shown as it is).
        overlay: Option<Arc<Overlay>>,
        /// The tree of a directory, fetched on first use.
        tree: OnceCell<Arc<Tree>>,
        /// Where each extent of a file starts.
        starts: OnceLock<Vec<u64>>,
        /// Whether listing this directory already prefetched its small files.
        prefetched: AtomicBool,
    },
}

pub(crate) struct Node {
    pub kind: NodeKind,
}

impl Node {
    /// The node of a tree entry, as of the overlay's moment.
    pub fn entry(e: &Entry, overlay: &Option<Arc<Overlay>>) -> Node {
        let entry = match overlay {
            Some(o) => o.applied(e).into_owned(),
            None => e.clone(),
        };
        Node {
            kind: NodeKind::Entry {
                entry: Arc::new(entry),
                overlay: overlay.clone(),
                tree: OnceCell::new(),
                starts: OnceLock::new(),
                prefetched: Default::default(),
            },
        }
    }

    pub fn synthetic(s: Synth) -> Node {
        Node { kind: NodeKind::Synthetic(s) }
    }

    /// The entry of a regular file, and where each of its extents starts.
    pub fn file(&self) -> Result<(&Entry, &[u64]), FsError> {
        let NodeKind::Entry { entry, starts, .. } = &self.kind else { return Err(FsError::IsDir) };
        if entry.kind != EntryKind::File {
            return Err(FsError::IsDir);
        }
        Ok((entry, starts.get_or_init(|| extent_starts(entry))))
    }

    /// The stored entry, if this is one.
    pub fn stored(&self) -> Option<&Entry> {
        match &self.kind {
            NodeKind::Entry { entry, .. } => Some(entry),
            NodeKind::Synthetic(_) => None,
        }
    }

    /// The link group of a file with several names, else 0.
    pub fn link_group(&self) -> u64 {
        match self.stored() {
            Some(e) if e.kind == EntryKind::File => e.link_group,
            _ => 0,
        }
    }
}
