//! The pool of threads that read, chunk, compress and encrypt file contents while
//! the walk goes on: a bounded queue of files in, one reply per file out. A worker
//! that hits a repository error stops, and once all have stopped the walk is told.

use std::fs;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use catalog::chunker::Chunker;
use catalog::{Packer, WriteError, Writer};

use super::progress::Counters;
use super::read::{read_consistent, FileError, FileRead, Grown, Seen};
use crate::appends::{Tail, Tails};

/// Files queued for the workers beyond those being read.
const QUEUED_FILES: usize = 256;

/// A file for a worker to read.
pub(super) struct Job {
    pub(super) path: PathBuf,
    /// Device and inode.
    pub(super) ident: (u64, u64),
    /// What the walk saw: what the content read must still match.
    pub(super) seen: Seen,
    /// An append-only file (`SnapshotOptions::appends`).
    pub(super) append: bool,
    /// The previous point's content, if the file may only have grown since.
    pub(super) grown: Option<Grown>,
}

type Reply = Result<FileRead, FileError>;

/// A file queued or being read: its content, once a worker has read it.
pub(super) struct Reading(Receiver<Reply>);

impl Reading {
    /// Waits for the worker's result; `None` if no worker will read the file (they
    /// all stopped after a repository error).
    pub(super) fn wait(self) -> Option<Reply> {
        self.0.recv().ok()
    }
}

/// The reading threads and their queue.
pub(super) struct Workers {
    queue: Option<SyncSender<(Job, SyncSender<Reply>)>>,
    threads: Vec<JoinHandle<Result<(), WriteError>>>,
}

impl Workers {
    /// Starts `count` threads (at least one) that store what they read through
    /// packers of `writer`.
    pub(super) fn start(
        writer: &Arc<Writer>,
        count: usize,
        tails: Option<Arc<Tails>>,
        counters: &Arc<Counters>,
    ) -> Workers {
        let (tx, rx) = mpsc::sync_channel::<(Job, SyncSender<Reply>)>(QUEUED_FILES);
        let rx = Arc::new(Mutex::new(rx));
        let seed = writer.repo().keys().chunker_seed;
        let threads = (0..count.max(1))
            .map(|_| {
                let rx = rx.clone();
                let mut packer = writer.packer();
                let mut chunker = Chunker::new(seed);
                let counters = counters.clone();
                let tails = tails.clone();
                std::thread::spawn(move || -> Result<(), WriteError> {
                    loop {
                        let (job, reply) = match rx.lock().expect("job queue lock").recv() {
                            Ok(queued) => queued,
                            Err(_) => break,
                        };
                        let r = read_job(&job, tails.as_deref(), &mut chunker, &mut packer, &counters);
                        let fatal = matches!(r, Err(FileError::Write(_)));
                        let _ = reply.send(r);
                        if fatal {
                            break;
                        }
                    }
                    packer.flush()
                })
            })
            .collect();
        // Only the workers hold the queue: once they have all stopped (after a
        // repository error), the walk's next send fails, and the files left in the
        // queue drop their reply channels, so the walk never waits on a file that no
        // worker will read.
        drop(rx);
        Workers { queue: Some(tx), threads }
    }

    /// Queues a file for reading; `None` if every worker stopped (one of them hit a
    /// repository error).
    pub(super) fn read(&self, job: Job) -> Option<Reading> {
        let (reply, rx) = mpsc::sync_channel(1);
        let queue = self.queue.as_ref().expect("jobs open while walking");
        queue.send((job, reply)).ok()?;
        Some(Reading(rx))
    }

    /// Closes the queue, waits for every worker to finish, and returns the first
    /// repository error any of them hit.
    pub(super) fn finish(&mut self) -> Result<(), WriteError> {
        self.queue = None; // lets the workers finish
        let mut worker_error = None;
        for w in self.threads.drain(..) {
            if let Err(e) = w.join().expect("file worker panicked") {
                worker_error.get_or_insert(e);
            }
        }
        worker_error.map_or(Ok(()), Err)
    }
}

/// Reads a job's file. In a stream, the file is claimed from the fragments first, and
/// stored at least up to where they have it (see `appends`).
fn read_job(
    job: &Job,
    tails: Option<&Tails>,
    chunker: &mut Chunker,
    packer: &mut Packer,
    counters: &Counters,
) -> Result<FileRead, FileError> {
    let Some(tails) = tails.filter(|_| job.append) else {
        return read_consistent(&job.path, job.seen, job.grown.as_ref(), chunker, packer, counters);
    };
    let tail = tails.claim(job.ident);
    let mut seen = job.seen;
    // Fragments shipped since the walk looked: the point must have those bytes too.
    if let Some(t) = tail.filter(|t| t.size > seen.size) {
        if fs::symlink_metadata(&job.path).is_ok_and(|m| t.size <= m.len()) {
            seen.size = t.size;
        }
    }
    let r = read_consistent(&job.path, seen, job.grown.as_ref(), chunker, packer, counters);
    let after = match &r {
        Ok(read) if !read.changed => Tail::of(&read.extents),
        Ok(_) => None,
        Err(_) => tail,
    };
    tails.release(job.ident, after);
    r
}
