//! A store that misbehaves on purpose, for tests of the failure paths a process kill
//! cannot reach deterministically: the Nth request of a kind, on names under a
//! prefix, fails, waits, comes back truncated or corrupted, or (for a put) is
//! acknowledged and then lost; or every read of one byte of an object does (damage
//! that stays, as a bad sector of a store would).
//!
//! `Store::with_faults` wraps any store in one. The wrapper sits under `Store`, so
//! everything above it (the writer, restore, verify, the streams) meets the fault
//! exactly as it would meet a misbehaving backend. A wrapped `file://` store goes
//! through object_store's local backend, without `Store`'s local fast paths.

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

/// A kind of request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A whole or ranged read.
    Get,
    /// The size of an object.
    Head,
    Put,
    Delete,
    List,
}

/// What happens to a request a rule picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The request fails, as a backend that cannot be reached fails.
    Fail,
    /// The request waits this long, then goes through.
    Delay(Duration),
    /// A read returns only its first N bytes; a put stores only its first N bytes.
    Truncate(usize),
    /// A read returns, or a put stores, its bytes with one bit flipped in the middle.
    Corrupt,
    /// A put is acknowledged and nothing is stored.
    Lose,
}

struct Rule {
    op: Op,
    prefix: String,
    /// The matching request this rule picks, from 1; 0 picks every one.
    nth: usize,
    /// Only reads whose range holds this byte match; a corruption flips it.
    at: Option<u64>,
    fault: Fault,
    seen: AtomicUsize,
}

/// The faults to inject: rules, and how many requests they picked so far.
#[derive(Clone, Default)]
pub struct Faults {
    rules: Arc<Mutex<Vec<Arc<Rule>>>>,
    fired: Arc<AtomicUsize>,
}

impl Faults {
    pub fn new() -> Faults {
        Faults::default()
    }

    /// The `nth` request (counting from 1) of `op` on a name under `prefix` meets
    /// `fault`; an empty prefix matches every name.
    pub fn nth(&self, op: Op, prefix: &str, nth: usize, fault: Fault) -> &Faults {
        assert!(nth > 0, "requests are counted from 1");
        self.push(op, prefix, nth, fault)
    }

    /// Every request of `op` on a name under `prefix` meets `fault`, until `clear`.
    pub fn always(&self, op: Op, prefix: &str, fault: Fault) -> &Faults {
        self.push(op, prefix, 0, fault)
    }

    /// Every read of the object `name` whose range holds byte `offset` meets
    /// `fault` (a corruption flips that byte), until `clear`.
    pub fn reading(&self, name: &str, offset: u64, fault: Fault) -> &Faults {
        self.add(Rule {
            op: Op::Get,
            prefix: name.to_string(),
            nth: 0,
            at: Some(offset),
            fault,
            seen: AtomicUsize::new(0),
        })
    }

    /// Removes every rule: the store behaves from now on.
    pub fn clear(&self) {
        self.rules.lock().expect("faults lock").clear();
    }

    /// How many requests met a fault so far: a test asserts its fault was reached.
    pub fn fired(&self) -> usize {
        self.fired.load(Ordering::SeqCst)
    }

    fn push(&self, op: Op, prefix: &str, nth: usize, fault: Fault) -> &Faults {
        self.add(Rule { op, prefix: prefix.to_string(), nth, at: None, fault, seen: AtomicUsize::new(0) })
    }

    fn add(&self, rule: Rule) -> &Faults {
        self.rules.lock().expect("faults lock").push(Arc::new(rule));
        self
    }

    /// The fault for this request, if a rule picks it. Every matching rule counts
    /// the request; the first that picks it decides.
    /// Also says which byte a rule with a position picked, for a read of `range`
    /// (the whole object when none).
    fn pick(&self, op: Op, name: &str, range: Option<Range<u64>>) -> Option<(Fault, Option<u64>)> {
        let rules: Vec<Arc<Rule>> = self.rules.lock().expect("faults lock").clone();
        let mut picked = None;
        let holds = |at: Option<u64>| match (at, &range) {
            (None, _) | (Some(_), None) => true,
            (Some(at), Some(r)) => r.contains(&at),
        };
        for r in rules.iter().filter(|r| r.op == op && name.starts_with(&r.prefix) && holds(r.at)) {
            let n = r.seen.fetch_add(1, Ordering::SeqCst) + 1;
            if picked.is_none() && (r.nth == 0 || r.nth == n) {
                picked = Some((r.fault, r.at));
            }
        }
        if picked.is_some() {
            self.fired.fetch_add(1, Ordering::SeqCst);
        }
        picked
    }
}

/// The `ObjectStore` that applies `Faults` to another.
pub(crate) struct Faulty {
    inner: Arc<dyn ObjectStore>,
    /// The store's prefix: rules name objects as `Store` does, without it.
    prefix: String,
    faults: Faults,
}

impl Faulty {
    pub(crate) fn new(inner: Arc<dyn ObjectStore>, prefix: &str, faults: Faults) -> Faulty {
        Faulty { inner, prefix: prefix.to_string(), faults }
    }

    fn pick(&self, op: Op, location: &Path) -> Option<Fault> {
        self.pick_in(op, location, None).map(|(f, _)| f)
    }

    fn pick_in(&self, op: Op, location: &Path, range: Option<Range<u64>>) -> Option<(Fault, Option<u64>)> {
        let full = location.as_ref();
        let name = if self.prefix.is_empty() {
            full
        } else {
            full.strip_prefix(self.prefix.as_str()).map_or(full, |r| r.trim_start_matches('/'))
        };
        self.faults.pick(op, name, range)
    }
}

fn injected(what: &str) -> object_store::Error {
    object_store::Error::Generic { store: "faults", source: format!("injected failure of {what}").into() }
}

/// `data` as the fault leaves it; a corruption flips the byte at `at` if given
/// (counted within `data`), in the middle otherwise.
fn damage(data: Bytes, fault: Fault, at: Option<usize>) -> Bytes {
    match fault {
        Fault::Truncate(n) => data.slice(..n.min(data.len())),
        Fault::Corrupt if !data.is_empty() => {
            let mut v = data.to_vec();
            let i = at.filter(|&i| i < v.len()).unwrap_or(v.len() / 2);
            v[i] ^= 0x10;
            Bytes::from(v)
        }
        _ => data,
    }
}

impl fmt::Display for Faulty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "faults over {}", self.inner)
    }
}

impl fmt::Debug for Faulty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Faulty({:?})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for Faulty {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        match self.pick(Op::Put, location) {
            None => self.inner.put_opts(location, payload, opts).await,
            Some(Fault::Fail) => Err(injected("a put")),
            Some(Fault::Lose) => Ok(PutResult { e_tag: None, version: None, extensions: Default::default() }),
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                self.inner.put_opts(location, payload, opts).await
            }
            Some(f) => {
                let data = damage(Bytes::from(payload), f, None);
                self.inner.put_opts(location, PutPayload::from(data), opts).await
            }
        }
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        match self.pick(Op::Put, location) {
            Some(Fault::Fail) => Err(injected("a multipart put")),
            _ => self.inner.put_multipart_opts(location, opts).await,
        }
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        let op = if options.head { Op::Head } else { Op::Get };
        let asked = match &options.range {
            Some(object_store::GetRange::Bounded(r)) => Some(r.clone()),
            _ => None,
        };
        let (fault, at) = match self.pick_in(op, location, asked) {
            Some((f, at)) => (Some(f), at),
            None => (None, None),
        };
        let fault = match fault {
            Some(Fault::Fail) => return Err(injected("a read")),
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                return self.inner.get_opts(location, options).await;
            }
            // Only bytes can be damaged: a head, or a lost read, goes through.
            Some(f @ (Fault::Truncate(_) | Fault::Corrupt)) if op == Op::Get => f,
            _ => return self.inner.get_opts(location, options).await,
        };
        let got = self.inner.get_opts(location, options).await?;
        let (meta, range, attributes) = (got.meta.clone(), got.range.clone(), got.attributes.clone());
        let at = at.and_then(|at| at.checked_sub(range.start)).map(|i| i as usize);
        let data = damage(got.bytes().await?, fault, at);
        let range: Range<u64> = range.start..range.start + data.len() as u64;
        Ok(GetResult {
            payload: GetResultPayload::Stream(stream::once(async move { Ok(data) }).boxed()),
            meta,
            range,
            attributes,
            extensions: Default::default(),
        })
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let (inner, faults, prefix) = (self.inner.clone(), self.faults.clone(), self.prefix.clone());
        locations
            .then(move |location| {
                let me = Faulty { inner: inner.clone(), prefix: prefix.clone(), faults: faults.clone() };
                async move {
                    let location = location?;
                    match me.pick(Op::Delete, &location) {
                        Some(Fault::Fail) => return Err(injected("a delete")),
                        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
                        _ => {}
                    }
                    me.inner.delete_stream(stream::once(async { Ok(location) }).boxed()).next().await.unwrap_or_else(
                        || {
                            Err(object_store::Error::Generic {
                                store: "faults",
                                source: "no answer to a delete".into(),
                            })
                        },
                    )
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let at = prefix.cloned().unwrap_or_default();
        match self.pick(Op::List, &at) {
            Some(Fault::Fail) => stream::once(async { Err(injected("a listing")) }).boxed(),
            Some(Fault::Delay(d)) => {
                let inner = self.inner.list(prefix);
                stream::once(tokio::time::sleep(d)).flat_map(move |()| stream::empty()).chain(inner).boxed()
            }
            _ => self.inner.list(prefix),
        }
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let at = prefix.cloned().unwrap_or_default();
        match self.pick(Op::List, &at) {
            Some(Fault::Fail) => stream::once(async { Err(injected("a listing")) }).boxed(),
            Some(Fault::Delay(d)) => {
                let inner = self.inner.list_with_offset(prefix, offset);
                stream::once(tokio::time::sleep(d)).flat_map(move |()| stream::empty()).chain(inner).boxed()
            }
            _ => self.inner.list_with_offset(prefix, offset),
        }
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let at = prefix.cloned().unwrap_or_default();
        match self.pick(Op::List, &at) {
            Some(Fault::Fail) => Err(injected("a listing")),
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                self.inner.list_with_delimiter(prefix).await
            }
            _ => self.inner.list_with_delimiter(prefix).await,
        }
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}
