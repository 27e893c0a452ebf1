//! Content-defined chunking (FastCDC 2020): boundaries follow the content, so an
//! insertion shifts only the chunks around it. The gear table is seeded from the
//! repository key, so chunk sizes reveal nothing a stranger could match.

use std::io::Read;

use fastcdc::v2020::{FastCDC, Normalization};

pub const MIN_SIZE: usize = 256 * 1024;
pub const AVG_SIZE: usize = 1024 * 1024;
pub const MAX_SIZE: usize = 4 * 1024 * 1024;

/// How much is read ahead of the cut points: two maximal chunks.
const WINDOW: usize = 2 * MAX_SIZE;

/// A chunker that keeps its buffer across files, so that a tree of many small files
/// costs no allocation per file. Its cut points are FastCDC's on the whole stream.
pub struct Chunker {
    buf: Vec<u8>,
    seed: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ChunkError<E> {
    #[error("read: {0}")]
    Read(std::io::Error),
    #[error(transparent)]
    Emit(E),
}

impl Chunker {
    pub fn new(seed: u64) -> Chunker {
        Chunker { buf: Vec::new(), seed }
    }

    /// Calls `emit` with each chunk of what `reader` yields, in order, and returns the
    /// number of bytes read.
    pub fn run<R: Read, E>(
        &mut self,
        mut reader: R,
        mut emit: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<u64, ChunkError<E>> {
        let mut len = 0;
        let mut total = 0u64;
        let mut eof = false;
        loop {
            // Fill the window (growing the buffer only as far as the data goes).
            while !eof && len < WINDOW {
                if self.buf.len() < WINDOW && len == self.buf.len() {
                    self.buf.resize((self.buf.len() * 2).clamp(64 * 1024, WINDOW), 0);
                }
                match reader.read(&mut self.buf[len..]) {
                    Ok(0) => eof = true,
                    Ok(n) => {
                        len += n;
                        total += n as u64;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(ChunkError::Read(e)),
                }
            }
            if len == 0 {
                return Ok(total);
            }
            let mut consumed = 0;
            let cdc = FastCDC::with_level_and_seed(
                &self.buf[..len],
                MIN_SIZE,
                AVG_SIZE,
                MAX_SIZE,
                Normalization::Level1,
                self.seed,
            );
            for c in cdc {
                // A chunk that ends at the window's end may go on in data not read yet,
                // unless it is already as long as a chunk can be.
                if !eof && c.offset + c.length == len && c.length < MAX_SIZE {
                    break;
                }
                emit(&self.buf[c.offset..c.offset + c.length]).map_err(ChunkError::Emit)?;
                consumed = c.offset + c.length;
            }
            self.buf.copy_within(consumed..len, 0);
            len -= consumed;
            if eof && len == 0 {
                return Ok(total);
            }
        }
    }
}

/// Splits what `reader` yields into chunks of 256 KiB to 4 MiB, about 1 MiB on average.
pub fn chunks<R: Read>(reader: R, seed: u64) -> std::io::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    Chunker::new(seed)
        .run(reader, |c| {
            out.push(c.to_vec());
            Ok::<(), std::convert::Infallible>(())
        })
        .map_err(|e| match e {
            ChunkError::Read(e) => e,
            ChunkError::Emit(never) => match never {},
        })?;
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `n` bytes of xorshift noise from seed `x` (made odd, so never all zeros).
    pub(crate) fn noise(n: usize, mut x: u64) -> Vec<u8> {
        x |= 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Reads at most `step` bytes per call, like a pipe or a slow disk.
    struct Trickle<'a>(&'a [u8], usize);
    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = self.0.len().min(out.len()).min(self.1);
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn cut_points_do_not_depend_on_how_data_arrives() {
        let data = noise(11 << 20, 7);
        let whole = chunks(&data[..], 5).unwrap();
        let trickled = chunks(Trickle(&data, 100_003), 5).unwrap();
        assert_eq!(whole, trickled);
        assert!(chunks(&b""[..], 5).unwrap().is_empty());
        assert_eq!(chunks(&b"tiny"[..], 5).unwrap(), vec![b"tiny".to_vec()]);
    }

    #[test]
    fn sizes_and_locality() {
        let data = noise(16 << 20, 1);
        let a = chunks(&data[..], 42).unwrap();
        assert_eq!(a.concat(), data);
        assert!(a.iter().all(|c| c.len() <= MAX_SIZE));
        assert!(a[..a.len() - 1].iter().all(|c| c.len() >= MIN_SIZE));
        let avg = data.len() / a.len();
        assert!((AVG_SIZE / 2..AVG_SIZE * 2).contains(&avg), "average chunk {avg}");

        let mut changed = data.clone();
        changed[8 << 20] ^= 0xff;
        let b = chunks(&changed[..], 42).unwrap();
        let differing = b.iter().filter(|c| !a.contains(c)).count();
        assert!(differing <= 2, "one changed byte changed {differing} chunks");

        // Pins the boundaries: a change would cost every repository its dedup.
        let lens: Vec<usize> = a.iter().map(Vec::len).take(6).collect();
        assert_eq!(lens, vec![980463, 1809280, 1916344, 1081786, 339926, 1326470]);

        let other_seed = chunks(&data[..], 43).unwrap();
        assert_ne!(other_seed.iter().map(Vec::len).collect::<Vec<_>>(), a.iter().map(Vec::len).collect::<Vec<_>>());
    }
}

#[cfg(test)]
mod properties {
    use super::tests::noise;
    use super::*;
    use proptest::prelude::*;

    /// Reads `steps` bytes at a time, in turn: a pipe, a slow disk, a short read.
    struct Uneven<'a>(&'a [u8], Vec<usize>, usize);
    impl Read for Uneven<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let step = self.1[self.2 % self.1.len()];
            self.2 += 1;
            let n = self.0.len().min(out.len()).min(step);
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    /// Where the chunks of `data` end.
    fn cuts(data: &[u8], seed: u64) -> Vec<usize> {
        let mut end = 0;
        chunks(data, seed)
            .unwrap()
            .iter()
            .map(|c| {
                end += c.len();
                end
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// The reference: FastCDC run once over the whole stream, however the reader
        /// hands the bytes over.
        #[test]
        fn cut_points_are_fastcdc_on_the_whole_stream(
            len in 0usize..(3 * WINDOW),
            data_seed in any::<u64>(),
            seed in any::<u64>(),
            steps in prop::collection::vec(1usize..(3 << 20), 1..4),
        ) {
            let data = noise(len, data_seed);
            let reference: Vec<Vec<u8>> =
                FastCDC::with_level_and_seed(&data, MIN_SIZE, AVG_SIZE, MAX_SIZE, Normalization::Level1, seed)
                    .map(|c| data[c.offset..c.offset + c.length].to_vec())
                    .collect();
            let got = chunks(Uneven(&data, steps, 0), seed).unwrap();
            prop_assert!(got == reference, "{} chunks, want {}", got.len(), reference.len());
        }

        /// An edit moves no boundary before it, and once the boundaries after it meet
        /// the old ones again they stay together to the end.
        #[test]
        fn an_edit_moves_only_the_boundaries_near_it(
            len in (MAX_SIZE)..(3 * WINDOW),
            data_seed in any::<u64>(),
            at in any::<prop::sample::Index>(),
            removed in 0usize..(2 << 20),
            inserted in prop::collection::vec(any::<u8>(), 0..5000),
        ) {
            let data = noise(len, data_seed);
            let at = at.index(len);
            let removed = removed.min(len - at);
            let mut edited = data[..at].to_vec();
            edited.extend_from_slice(&inserted);
            edited.extend_from_slice(&data[at + removed..]);
            let (old, new) = (cuts(&data, 9), cuts(&edited, 9));
            let before = |c: &Vec<usize>| c.iter().copied().filter(|&e| e <= at).collect::<Vec<_>>();
            prop_assert_eq!(before(&old), before(&new), "a boundary before the edit at {} moved", at);
            // After the edit, boundaries measured from the end of the data.
            let tail = |c: &Vec<usize>, n: usize, skip: usize| {
                c.iter().filter(|&&e| e > skip).map(|&e| n - e).collect::<Vec<_>>()
            };
            let old_tail = tail(&old, data.len(), at + removed);
            let new_tail = tail(&new, edited.len(), at + inserted.len());
            if let Some(i) = old_tail.iter().position(|d| new_tail.contains(d)) {
                let j = new_tail.iter().position(|d| *d == old_tail[i]).unwrap();
                prop_assert_eq!(&old_tail[i..], &new_tail[j..], "boundaries parted again after meeting");
            }
        }
    }
}
