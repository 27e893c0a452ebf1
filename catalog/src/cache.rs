//! The decrypted-chunk cache: an LRU of plaintext chunks by content id, bounded in
//! bytes, shared by every reader (the mount's reads, restore's writers).

use std::sync::Mutex;

use bytes::Bytes;
use lru::LruCache;

use crate::id::Id;

/// What an entry costs beyond its bytes (its id, the LRU's links, the handle):
/// counted, so that a cache of many small chunks stays within its limit too.
const ENTRY_OVERHEAD: usize = 128;

pub struct ChunkCache {
    inner: Mutex<Inner>,
    limit: usize,
}

struct Inner {
    lru: LruCache<Id, Bytes>,
    bytes: usize,
}

impl ChunkCache {
    pub fn new(limit: usize) -> ChunkCache {
        ChunkCache { inner: Mutex::new(Inner { lru: LruCache::unbounded(), bytes: 0 }), limit }
    }

    pub fn get(&self, id: &Id) -> Option<Bytes> {
        self.inner.lock().expect("cache lock").lru.get(id).cloned()
    }

    /// Whether the chunk is cached, without making it more recent.
    pub fn contains(&self, id: &Id) -> bool {
        self.inner.lock().expect("cache lock").lru.contains(id)
    }

    pub fn insert(&self, id: Id, data: Bytes) {
        let mut g = self.inner.lock().expect("cache lock");
        g.bytes += data.len() + ENTRY_OVERHEAD;
        if let Some(old) = g.lru.put(id, data) {
            g.bytes -= old.len() + ENTRY_OVERHEAD;
        }
        while g.bytes > self.limit {
            match g.lru.pop_lru() {
                Some((_, old)) => g.bytes -= old.len() + ENTRY_OVERHEAD,
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recent_beyond_the_limit() {
        let c = ChunkCache::new(250 + 2 * ENTRY_OVERHEAD);
        for i in 0..3u8 {
            c.insert(Id([i; 32]), Bytes::from(vec![0; 100]));
        }
        assert!(c.get(&Id([0; 32])).is_none());
        assert!(c.get(&Id([1; 32])).is_some());
        c.insert(Id([3; 32]), Bytes::from(vec![0; 100]));
        assert!(c.get(&Id([2; 32])).is_none(), "2 was least recently used");
        assert!(c.get(&Id([1; 32])).is_some());
    }
}
