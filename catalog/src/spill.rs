//! Fixed-size records, sorted and each kept once, in bounded memory: held in
//! memory up to a budget, then written to local disk as sorted runs, merged as
//! they are read back. Prune's survey gives a record for each blob a point uses,
//! and a long history of a large tree gives more of them than memory should hold.
//!
//! A run is an anonymous file (`tempfile_in`: unlinked as soon as it is made), so
//! that nothing is left behind whichever way the process ends. Runs hold what this
//! process wrote and only it reads them back; a run whose length is not a whole
//! number of records is an error, never a short record.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Bytes read from a run at once, while merging.
const READ_BUF: usize = 64 << 10;
/// Records held before they are first made unique in place.
const COMPACT_ABOVE: usize = 1024;

/// Records being gathered.
pub struct Spill<const N: usize> {
    /// Records held before they are written as a run.
    budget: usize,
    held: Vec<[u8; N]>,
    dir: PathBuf,
    runs: Vec<Run>,
    spilled: u64,
}

/// A sorted run on disk: its file and its length in records.
pub struct Run {
    file: File,
    records: u64,
}

impl<const N: usize> Spill<N> {
    /// Records that hold at most `budget` bytes in memory; past that, runs in `dir`.
    pub fn new(budget: u64, dir: &Path) -> Spill<N> {
        let budget = usize::try_from(budget / N as u64).unwrap_or(usize::MAX).max(1);
        Spill { budget, held: Vec::new(), dir: dir.to_path_buf(), runs: Vec::new(), spilled: 0 }
    }

    pub fn push(&mut self, record: [u8; N]) -> io::Result<()> {
        // Full: before it grows (or spills), the records held are made unique. The
        // same record comes again and again (a file in every point that has it),
        // so this often makes room enough. It grows unless three quarters are
        // free: each time it is made unique sorts all it holds, so that a little
        // room would sort the same records again and again.
        if self.held.len() == self.held.capacity() && self.held.len() >= COMPACT_ABOVE {
            sort_unique(&mut self.held);
            if self.held.len() > self.held.capacity() / 4 {
                // Doubled, but never past the budget.
                let room = self.budget.saturating_sub(self.held.len()).max(1);
                self.held.reserve_exact(self.held.len().min(room));
            }
        }
        self.held.push(record);
        if self.held.len() >= self.budget {
            sort_unique(&mut self.held);
            if self.held.len() > self.budget / 2 {
                self.write_run()?;
            }
        }
        Ok(())
    }

    /// Bytes written to disk so far.
    pub fn spilled(&self) -> u64 {
        self.spilled
    }

    /// Writes the records held, sorted and each once, as a run.
    fn write_run(&mut self) -> io::Result<()> {
        self.runs.push(Run::write(&self.held, &self.dir)?);
        self.spilled += (self.held.len() * N) as u64;
        // Let the memory go: the next run is gathered from nothing.
        self.held = Vec::new();
        Ok(())
    }

    /// Every record pushed, sorted, each once. Held in memory if it all fitted,
    /// else every record is on disk.
    pub fn finish(mut self) -> io::Result<Sorted<N>> {
        if self.runs.is_empty() {
            sort_unique(&mut self.held);
            self.held.shrink_to_fit();
            return Ok(Sorted::Held(self.held));
        }
        if !self.held.is_empty() {
            sort_unique(&mut self.held);
            self.write_run()?;
        }
        Ok(Sorted::Runs(self.runs))
    }
}

/// Sorts `records` (as their bytes do) and keeps each once.
pub fn sort_unique<const N: usize>(records: &mut Vec<[u8; N]>) {
    records.sort_unstable_by(cmp_records);
    records.dedup();
}

/// The order of the records' bytes, compared eight at a time: sorting hundreds of
/// thousands of them by `memcmp` calls took a tenth of a prune run.
fn cmp_records<const N: usize>(a: &[u8; N], b: &[u8; N]) -> std::cmp::Ordering {
    let (mut words_a, mut words_b) = (a.chunks_exact(8), b.chunks_exact(8));
    for (x, y) in (&mut words_a).zip(&mut words_b) {
        let word = |w: &[u8]| u64::from_be_bytes(w.try_into().expect("chunks of 8"));
        let (x, y) = (word(x), word(y));
        if x != y {
            return x.cmp(&y);
        }
    }
    words_a.remainder().cmp(words_b.remainder())
}

impl Run {
    /// A run of `records` (sorted, each once) in a file of its own in `dir`.
    fn write<const N: usize>(records: &[[u8; N]], dir: &Path) -> io::Result<Run> {
        std::fs::create_dir_all(dir)?;
        let file = tempfile::tempfile_in(dir)?;
        let mut out = BufWriter::with_capacity(READ_BUF, file);
        for r in records {
            out.write_all(r)?;
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        Ok(Run { file, records: records.len() as u64 })
    }
}

/// Records sorted, each once: read as many times as needed.
pub enum Sorted<const N: usize> {
    Held(Vec<[u8; N]>),
    Runs(Vec<Run>),
}

impl<const N: usize> Sorted<N> {
    /// The same records, none of them in memory: those held are written to a run
    /// in `dir`, for a phase that needs the memory and reads them only after.
    pub fn onto_disk(self, dir: &Path) -> io::Result<Sorted<N>> {
        match self {
            Sorted::Held(held) if !held.is_empty() => Ok(Sorted::Runs(vec![Run::write(&held, dir)?])),
            sorted => Ok(sorted),
        }
    }

    /// The records in order.
    pub fn iter(&self) -> Records<'_, N> {
        match self {
            Sorted::Held(held) => Records::Held(held.iter()),
            Sorted::Runs(runs) => {
                let mut readers: Vec<RunReader<'_, N>> = runs.iter().map(RunReader::new).collect();
                let mut heap = BinaryHeap::new();
                let mut failed = None;
                for (i, r) in readers.iter_mut().enumerate() {
                    match r.next() {
                        Ok(Some(rec)) => heap.push(Reverse((rec, i))),
                        Ok(None) => {}
                        Err(e) => failed = failed.or(Some(e)),
                    }
                }
                Records::Merged { readers, heap, last: None, failed }
            }
        }
    }
}

/// Records of a `Sorted`, in order; an I/O error (a run that cannot be read back)
/// ends them.
pub enum Records<'a, const N: usize> {
    Held(std::slice::Iter<'a, [u8; N]>),
    Merged {
        readers: Vec<RunReader<'a, N>>,
        heap: BinaryHeap<Reverse<([u8; N], usize)>>,
        last: Option<[u8; N]>,
        failed: Option<io::Error>,
    },
}

impl<const N: usize> Iterator for Records<'_, N> {
    type Item = io::Result<[u8; N]>;

    fn next(&mut self) -> Option<io::Result<[u8; N]>> {
        match self {
            Records::Held(it) => it.next().map(|r| Ok(*r)),
            Records::Merged { readers, heap, last, failed } => loop {
                if let Some(e) = failed.take() {
                    heap.clear();
                    return Some(Err(e));
                }
                let Reverse((rec, i)) = heap.pop()?;
                match readers[i].next() {
                    Ok(Some(next)) => heap.push(Reverse((next, i))),
                    Ok(None) => {}
                    Err(e) => *failed = Some(e),
                }
                // The same record in two runs is given once.
                if *last != Some(rec) {
                    *last = Some(rec);
                    return Some(Ok(rec));
                }
            },
        }
    }
}

/// One run read in order, by positioned reads: several readers of one run never
/// disturb each other.
pub struct RunReader<'a, const N: usize> {
    run: &'a Run,
    /// Records read from the file so far.
    read: u64,
    buf: Vec<u8>,
    at: usize,
}

impl<'a, const N: usize> RunReader<'a, N> {
    fn new(run: &'a Run) -> RunReader<'a, N> {
        RunReader { run, read: 0, buf: Vec::new(), at: 0 }
    }

    fn next(&mut self) -> io::Result<Option<[u8; N]>> {
        if self.at == self.buf.len() {
            let left = self.run.records - self.read;
            if left == 0 {
                return Ok(None);
            }
            let n = left.min((READ_BUF / N).max(1) as u64);
            self.buf.resize(n as usize * N, 0);
            self.run.file.read_exact_at(&mut self.buf, self.read * N as u64)?;
            self.read += n;
            self.at = 0;
        }
        let mut rec = [0u8; N];
        rec.copy_from_slice(&self.buf[self.at..self.at + N]);
        self.at += N;
        Ok(Some(rec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn collect<const N: usize>(s: &Sorted<N>) -> Vec<[u8; N]> {
        s.iter().collect::<io::Result<_>>().unwrap()
    }

    #[test]
    fn what_fits_stays_in_memory_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spill::<2>::new(100, dir.path());
        for r in [[3, 1], [1, 2], [3, 1], [0, 9]] {
            s.push(r).unwrap();
        }
        assert_eq!(s.spilled(), 0);
        let sorted = s.finish().unwrap();
        assert!(matches!(sorted, Sorted::Held(_)));
        assert_eq!(collect(&sorted), vec![[0, 9], [1, 2], [3, 1]]);
    }

    #[test]
    fn runs_leave_no_file_behind_and_read_back_twice_alike() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spill::<4>::new(8, dir.path());
        for n in (0u32..1000).rev() {
            s.push((n % 300).to_be_bytes()).unwrap();
        }
        assert!(s.spilled() > 0);
        let sorted = s.finish().unwrap();
        assert!(matches!(&sorted, Sorted::Runs(r) if r.len() > 100));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "runs are anonymous files");
        let want: Vec<[u8; 4]> = (0u32..300).map(u32::to_be_bytes).collect();
        assert_eq!(collect(&sorted), want);
        assert_eq!(collect(&sorted), want, "a second reading gives the same");
    }

    /// Records moved out of memory read back as they were, from an anonymous file.
    #[test]
    fn records_held_moved_onto_disk_read_back_alike() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spill::<2>::new(100, dir.path());
        for r in [[3, 1], [1, 2], [0, 9]] {
            s.push(r).unwrap();
        }
        let held = s.finish().unwrap();
        let want = collect(&held);
        let moved = held.onto_disk(dir.path()).unwrap();
        assert!(matches!(&moved, Sorted::Runs(r) if r.len() == 1));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "runs are anonymous files");
        assert_eq!(collect(&moved), want);
        let none = Spill::<2>::new(100, dir.path()).finish().unwrap().onto_disk(dir.path()).unwrap();
        assert!(matches!(&none, Sorted::Held(h) if h.is_empty()), "nothing to move writes nothing");
    }

    #[test]
    fn a_run_cut_short_is_an_error_not_a_short_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spill::<4>::new(4, dir.path());
        for n in 0u32..5 {
            s.push(n.to_be_bytes()).unwrap();
        }
        let sorted = s.finish().unwrap();
        let Sorted::Runs(runs) = &sorted else { panic!("spilled") };
        runs[0].file.set_len(2).unwrap();
        let got: Vec<io::Result<[u8; 4]>> = sorted.iter().collect();
        assert!(got.iter().any(|r| r.is_err()), "{got:?}");
    }

    proptest! {
        /// Compared eight bytes at a time, records order as their bytes do.
        #[test]
        fn records_compare_as_their_bytes(a in any::<[u8; 13]>(), b in any::<[u8; 13]>(), same in 0usize..13) {
            prop_assert_eq!(cmp_records(&a, &b), a.cmp(&b));
            let mut c = a;
            c[same..].copy_from_slice(&b[same..]);
            prop_assert_eq!(cmp_records(&a, &c), a.cmp(&c));
        }

        /// Whatever the budget, the records come back as a sort and a dedup of
        /// those pushed.
        #[test]
        fn records_come_back_sorted_and_once(
            records in proptest::collection::vec(any::<[u8; 3]>(), 0..400),
            budget in 1u64..64,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut s = Spill::<3>::new(budget, dir.path());
            for r in &records {
                s.push(*r).unwrap();
            }
            let mut want = records.clone();
            want.sort_unstable();
            want.dedup();
            prop_assert_eq!(collect(&s.finish().unwrap()), want);
        }
    }
}
