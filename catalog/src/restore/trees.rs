//! The trees the walk lists, fetched with few requests. A writer stores a
//! directory's tree after the trees below it, so the trees of sibling directories
//! lie near each other in a pack, with their descendants' trees between them: one
//! ranged GET for the siblings brings most of what lies below them too. Spans
//! fetched lately are kept, within a budget, for the directories below.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::runtime::Handle;
use tokio::sync::OnceCell;
use tokio::task::JoinHandle;

use crate::id::Id;
use crate::pack::{pack_name, BlobKind, BlobRef};
use crate::repo::Repository;
use crate::tree::Tree;

/// Trees of siblings further apart than this are fetched apart: more than this
/// between them is unlikely to be the trees below them.
const SPAN_GAP: u64 = 1 << 20;
/// A span of trees is at most this long (one tree may make a longer one).
const SPAN_BYTES: u64 = 8 << 20;
/// A span also reads this far before its first tree, where the trees below that
/// directory lie.
const BEFORE_FIRST: u64 = 256 << 10;

/// One ranged GET, shared by the trees it covers; filled once.
struct Span {
    pack: Id,
    start: u64,
    end: u64,
    sealed: OnceCell<Result<Bytes, String>>,
}

impl Span {
    fn covers(&self, blob: &BlobRef) -> bool {
        let (start, end) = (u64::from(blob.offset), u64::from(blob.offset) + u64::from(blob.length));
        blob.pack == self.pack && self.start <= start && end <= self.end
    }
}

/// A directory's tree, and the span it comes from.
pub(super) struct Planned {
    blob: Option<BlobRef>,
    span: Option<Arc<Span>>,
}

pub(super) struct Trees {
    repo: Repository,
    handle: Handle,
    recent: Mutex<Recent>,
}

/// Spans fetched lately, oldest first, within `limit` bytes.
struct Recent {
    spans: VecDeque<Arc<Span>>,
    bytes: usize,
    limit: usize,
}

impl Trees {
    /// `keep` bytes of fetched spans are kept for the directories below.
    pub fn new(repo: Repository, handle: Handle, keep: usize) -> Self {
        Trees { repo, handle, recent: Mutex::new(Recent { spans: VecDeque::new(), bytes: 0, limit: keep }) }
    }

    /// Where each of `blobs` (the trees of a directory's subdirectories, in order)
    /// will come from: a span kept, or GETs each shared by neighbours. Fetches
    /// nothing yet.
    pub fn plan(&self, blobs: Vec<Option<BlobRef>>) -> Vec<Planned> {
        let mut planned: Vec<Planned> = Vec::with_capacity(blobs.len());
        let mut missing = Vec::new();
        {
            let recent = self.recent.lock().expect("recent trees lock");
            for (i, blob) in blobs.into_iter().enumerate() {
                let span = blob.and_then(|b| recent.spans.iter().rev().find(|s| s.covers(&b)).cloned());
                if span.is_none() && blob.is_some() {
                    missing.push(i);
                }
                planned.push(Planned { blob, span });
            }
        }
        let blobs: Vec<Option<BlobRef>> = planned.iter().map(|p| p.blob).collect();
        let blob = |i: &usize| blobs[*i].expect("only trees with a blob are missing");
        missing.sort_by_key(|i| (blob(i).pack, blob(i).offset));
        let mut group: Vec<usize> = Vec::new();
        let mut groups = Vec::new();
        for i in missing {
            let b = blob(&i);
            if let (Some(head), Some(last)) = (group.first(), group.last()) {
                // Identical directories share a tree: one span holds it for all.
                if blob(last) != b && !b.joins_span(&blob(head), &blob(last), SPAN_GAP, SPAN_BYTES) {
                    groups.push(std::mem::take(&mut group));
                }
            }
            group.push(i);
        }
        if !group.is_empty() {
            groups.push(group);
        }
        for group in groups {
            let head = blob(group.first().expect("a group has trees"));
            let end = group.iter().map(|i| u64::from(blob(i).offset) + u64::from(blob(i).length)).max();
            let span = Arc::new(Span {
                pack: head.pack,
                start: u64::from(head.offset).saturating_sub(BEFORE_FIRST),
                end: end.expect("a group has trees"),
                sealed: OnceCell::new(),
            });
            for i in group {
                planned[i].span = Some(span.clone());
            }
        }
        planned
    }

    /// Fetches (with its span, unless a neighbour did) and decodes a planned tree.
    pub fn fetch(self: &Arc<Self>, planned: Planned) -> JoinHandle<Result<Tree, String>> {
        let trees = self.clone();
        self.handle.spawn(async move { trees.tree(planned).await })
    }

    async fn tree(&self, planned: Planned) -> Result<Tree, String> {
        let blob = planned.blob.ok_or("the directory has no tree")?;
        let from_span = match &planned.span {
            Some(span) => match span.sealed.get_or_init(|| self.get(span)).await {
                Ok(sealed) => {
                    let at = (u64::from(blob.offset) - span.start) as usize;
                    let tree = self
                        .repo
                        .open_blob(BlobKind::Tree, &blob, &sealed[at..at + blob.length as usize])
                        .map_err(|e| e.to_string())
                        .and_then(|plain| Tree::decode(&plain).map_err(|e| e.to_string()));
                    Some(tree)
                }
                Err(_) => None,
            },
            None => None,
        };
        match from_span {
            Some(Ok(tree)) => Ok(tree),
            // A span that could not be read, or a tree in it that is bad, is read
            // again alone: damage elsewhere in the span costs this tree nothing, and
            // a bad read once is not taken for damage.
            _ => self.repo.read_tree(&blob).await.map_err(|e| e.to_string()),
        }
    }

    /// One span's GET; kept for the directories below when it succeeds.
    async fn get(&self, span: &Arc<Span>) -> Result<Bytes, String> {
        let sealed = self.repo.store().get_range(&pack_name(&span.pack), span.start..span.end).await;
        let sealed = sealed.map_err(|e| e.to_string())?;
        let mut recent = self.recent.lock().expect("recent trees lock");
        recent.bytes += sealed.len();
        recent.spans.push_back(span.clone());
        while recent.bytes > recent.limit {
            let Some(old) = recent.spans.pop_front() else { break };
            recent.bytes -= (old.end - old.start) as usize;
        }
        Ok(sealed)
    }
}
