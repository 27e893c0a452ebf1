//! Little-endian binary encoding helpers shared by the stored formats (trees, packs, index).
//! Decoding never panics on malformed input: every read is bounds-checked.

use crate::id::Id;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed {what}: {problem}")]
pub struct DecodeError {
    pub what: &'static str,
    pub problem: String,
}

impl DecodeError {
    pub fn new(what: &'static str, problem: impl Into<String>) -> DecodeError {
        DecodeError { what, problem: problem.into() }
    }
}

#[derive(Default)]
pub struct Encoder {
    pub buf: Vec<u8>,
}

impl Encoder {
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn id(&mut self, id: &Id) {
        self.buf.extend_from_slice(&id.0);
    }
    /// A byte string, prefixed by its u32 length.
    pub fn bytes(&mut self, b: &[u8]) {
        self.u32(u32::try_from(b.len()).expect("byte string over 4 GiB"));
        self.buf.extend_from_slice(b);
    }
}

pub struct Decoder<'a> {
    what: &'static str,
    rest: &'a [u8],
}

impl<'a> Decoder<'a> {
    pub fn new(what: &'static str, data: &'a [u8]) -> Decoder<'a> {
        Decoder { what, rest: data }
    }

    pub fn error(&self, problem: impl Into<String>) -> DecodeError {
        DecodeError::new(self.what, problem)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(self.error(format!("truncated: wanted {n} more bytes, {} left", self.rest.len())));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    pub fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    pub fn id(&mut self) -> Result<Id, DecodeError> {
        Ok(Id(self.take(32)?.try_into().expect("32 bytes")))
    }
    pub fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    /// A count of items that each take at least `min_item` bytes; rejects counts the
    /// remaining input cannot hold, so a corrupt count cannot make us allocate wildly.
    pub fn count(&mut self, min_item: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item.max(1)) > self.rest.len() {
            return Err(self.error(format!("count {n} exceeds the remaining {} bytes", self.rest.len())));
        }
        Ok(n)
    }
    /// The bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::new(self.what, format!("{} trailing bytes", self.rest.len())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation() {
        let mut e = Encoder::default();
        e.u8(7);
        e.u32(0xdead_beef);
        e.i64(-5);
        e.bytes(b"name\n\xff");
        let mut d = Decoder::new("test", &e.buf);
        assert_eq!(d.u8().unwrap(), 7);
        assert_eq!(d.u32().unwrap(), 0xdead_beef);
        assert_eq!(d.i64().unwrap(), -5);
        assert_eq!(d.bytes().unwrap(), b"name\n\xff");
        d.finish().unwrap();

        let mut short = Decoder::new("test", &e.buf[..3]);
        short.u8().unwrap();
        assert!(short.u32().is_err());
    }

    #[test]
    fn absurd_counts_are_rejected() {
        let mut e = Encoder::default();
        e.u32(u32::MAX);
        assert!(Decoder::new("test", &e.buf).count(1).is_err());
    }
}
