//! Metadata read-ahead for a tree walk. The snapshot walker visits entries one at a
//! time in name order; on a cold cache each `lstat` waits for the disk. A few threads
//! walk the same tree ahead of it, in parallel, so that its inodes and directory
//! blocks are already cached when the walker arrives. Purely an optimization: what
//! it reads is thrown away, and its errors are ignored (the walker reports them).

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::metadata::{open_dir, stat_at};

/// Directories waiting to be read ahead; beyond this the read-ahead stops growing.
const MAX_QUEUED: usize = 100_000;

struct Queue {
    dirs: Vec<PathBuf>,
    busy: usize,
}

pub struct Prefetch {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Prefetch {
    /// Starts `threads` read-ahead threads under `root`.
    pub fn start(root: PathBuf, threads: usize) -> Prefetch {
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new((Mutex::new(Queue { dirs: vec![root], busy: 0 }), Condvar::new()));
        let threads = (0..threads)
            .map(|_| {
                let (stop, state) = (stop.clone(), state.clone());
                std::thread::spawn(move || work(&stop, &state))
            })
            .collect();
        Prefetch { stop, threads }
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn work(stop: &AtomicBool, state: &(Mutex<Queue>, Condvar)) {
    let (lock, cv) = state;
    loop {
        let dir = {
            let mut q = lock.lock().expect("prefetch queue lock");
            loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                if let Some(d) = q.dirs.pop() {
                    q.busy += 1;
                    break d;
                }
                if q.busy == 0 {
                    cv.notify_all();
                    return; // the whole tree has been read ahead
                }
                q = cv.wait(q).expect("prefetch queue lock");
            }
        };
        let mut subdirs = Vec::new();
        if let (Ok(entries), Ok(fd)) = (fs::read_dir(&dir), open_dir(&dir)) {
            for e in entries.flatten() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let name = e.file_name();
                if stat_at(&fd, &name).is_ok_and(|st| st.is_dir()) {
                    subdirs.push(dir.join(name));
                }
            }
        }
        let mut q = lock.lock().expect("prefetch queue lock");
        q.busy -= 1;
        // Depth-first, like the walker: pushed in reverse so the first name pops first.
        subdirs.sort();
        for d in subdirs.into_iter().rev() {
            if q.dirs.len() < MAX_QUEUED {
                q.dirs.push(d);
            }
        }
        cv.notify_all();
    }
}
