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
mod tests {
    use super::*;

    fn noise(n: usize, mut x: u64) -> Vec<u8> {
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
