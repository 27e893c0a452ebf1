//! WAL made up for unit tests and benches, laid out as PostgreSQL 15 lays it out: 8 KiB
//! pages, a long header at each segment's start, a short one on every other page,
//! each saying how much of a record continues onto it; records aligned to 8 bytes,
//! spanning pages and segments. Commits carry their time; other records are of
//! the heap.

const PAGE: u64 = 8192;

/// WAL from position 0, record by record.
pub struct MadeUp {
    pub segment_size: u64,
    /// The WAL from `base` on (`take_segment` moves it).
    pub wal: Vec<u8>,
    pub base: u64,
    /// Where each record starts, and the commit time of those that are commits.
    pub records: Vec<(u64, Option<i64>)>,
}

impl MadeUp {
    pub fn new(segment_size: u64) -> MadeUp {
        MadeUp { segment_size, wal: Vec::new(), base: 0, records: Vec::new() }
    }

    /// Where the next byte goes.
    pub fn pos(&self) -> u64 {
        self.base + self.wal.len() as u64
    }

    /// The oldest whole segment made so far, handed over (and forgotten, with the
    /// records in it), or `None` until there is one: for WAL too long to hold.
    pub fn take_segment(&mut self) -> Option<(u64, Vec<u8>)> {
        let size = self.segment_size as usize;
        if self.wal.len() < size {
            return None;
        }
        let start = self.base;
        let rest = self.wal.split_off(size);
        let segment = std::mem::replace(&mut self.wal, rest);
        self.base += self.segment_size;
        self.records.retain(|(at, _)| *at >= self.base);
        Some((start, segment))
    }

    /// A page header at the current position, which is a page's start.
    fn header(&mut self, rem_len: u64) {
        let page = self.pos();
        let long = page.is_multiple_of(self.segment_size);
        let info: u16 = u16::from(long) * 2 + u16::from(rem_len > 0);
        self.wal.extend(0xD110u16.to_le_bytes());
        self.wal.extend(info.to_le_bytes());
        self.wal.extend(1u32.to_le_bytes());
        self.wal.extend(page.to_le_bytes());
        self.wal.extend((rem_len as u32).to_le_bytes());
        self.wal.extend([0; 4]);
        if long {
            self.wal.extend(7u64.to_le_bytes());
            self.wal.extend((self.segment_size as u32).to_le_bytes());
            self.wal.extend((PAGE as u32).to_le_bytes());
        }
    }

    /// Appends a record whose main data is `data`, of resource manager `rmid`.
    fn record(&mut self, rmid: u8, info: u8, data: &[u8], time: Option<i64>) {
        let mut rec = Vec::new();
        let block: Vec<u8> = if data.len() < 256 {
            [255, data.len() as u8].to_vec()
        } else {
            [[254].as_slice(), &(data.len() as u32).to_le_bytes()].concat()
        };
        let total = 24 + block.len() + data.len();
        rec.extend((total as u32).to_le_bytes());
        rec.extend(1000u32.to_le_bytes());
        rec.extend(0u64.to_le_bytes());
        rec.extend([info, rmid, 0, 0]);
        rec.extend(0u32.to_le_bytes());
        rec.extend(block);
        rec.extend(data);
        // Aligned; a record never starts in a page's header.
        while !self.pos().is_multiple_of(8) {
            self.wal.push(0);
        }
        if self.pos().is_multiple_of(PAGE) {
            self.header(0);
        }
        self.records.push((self.pos(), time));
        let mut rest = &rec[..];
        while !rest.is_empty() {
            if self.pos().is_multiple_of(PAGE) {
                self.header(rest.len() as u64);
            }
            let room = (PAGE - self.pos() % PAGE) as usize;
            let n = room.min(rest.len());
            self.wal.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
        }
    }

    /// A heap record with `len` bytes of data.
    pub fn other(&mut self, len: usize) {
        self.record(10, 0, &vec![0x5a; len], None);
    }

    /// A commit at `time` (microseconds since 2000-01-01).
    pub fn commit(&mut self, time: i64) {
        self.record(1, 0, &time.to_le_bytes(), Some(time));
    }
}
