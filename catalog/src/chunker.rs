//! Content-defined chunking (FastCDC 2020): boundaries follow the content, so an
//! insertion shifts only the chunks around it. The gear table is seeded from the
//! repository key, so chunk sizes reveal nothing a stranger could match.

use std::io::Read;

use fastcdc::v2020::{Normalization, StreamCDC};

pub const MIN_SIZE: usize = 256 * 1024;
pub const AVG_SIZE: usize = 1024 * 1024;
pub const MAX_SIZE: usize = 4 * 1024 * 1024;

/// Splits what `reader` yields into chunks of 256 KiB to 4 MiB, about 1 MiB on average.
pub fn chunks<R: Read>(reader: R, seed: u64) -> impl Iterator<Item = std::io::Result<Vec<u8>>> {
    StreamCDC::with_level_and_seed(reader, MIN_SIZE, AVG_SIZE, MAX_SIZE, Normalization::Level1, seed).map(|c| {
        c.map(|c| c.data).map_err(|e| match e {
            fastcdc::v2020::Error::IoError(e) => e,
            other => std::io::Error::other(format!("chunker: {other:?}")),
        })
    })
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

    #[test]
    fn sizes_and_locality() {
        let data = noise(16 << 20, 1);
        let a: Vec<Vec<u8>> = chunks(&data[..], 42).map(Result::unwrap).collect();
        assert_eq!(a.concat(), data);
        assert!(a.iter().all(|c| c.len() <= MAX_SIZE));
        assert!(a[..a.len() - 1].iter().all(|c| c.len() >= MIN_SIZE));
        let avg = data.len() / a.len();
        assert!((AVG_SIZE / 2..AVG_SIZE * 2).contains(&avg), "average chunk {avg}");

        let mut changed = data.clone();
        changed[8 << 20] ^= 0xff;
        let b: Vec<Vec<u8>> = chunks(&changed[..], 42).map(Result::unwrap).collect();
        let differing = b.iter().filter(|c| !a.contains(c)).count();
        assert!(differing <= 2, "one changed byte changed {differing} chunks");

        // Pins the boundaries: a change would cost every repository its dedup.
        let lens: Vec<usize> = a.iter().map(Vec::len).take(6).collect();
        assert_eq!(lens, vec![980463, 1809280, 1916344, 1081786, 339926, 1326470]);

        let other_seed: Vec<Vec<u8>> = chunks(&data[..], 43).map(Result::unwrap).collect();
        assert_ne!(other_seed.iter().map(Vec::len).collect::<Vec<_>>(), a.iter().map(Vec::len).collect::<Vec<_>>());
    }
}
