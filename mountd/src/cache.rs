//! The optional on-disk cache of sealed chunks. (The in-memory cache of plaintext
//! chunks is `catalog::ChunkCache`, which restore shares.)

use std::sync::Mutex;

use lru::LruCache;

/// The optional on-disk cache: sealed blob bytes exactly as the store holds them, so
/// nothing decrypted ever reaches the local disk, and every hit is authenticated
/// again when read. Bounded in bytes; the least recently used files go first.
pub struct DiskCache {
    dir: std::path::PathBuf,
    limit: u64,
    state: Mutex<DiskState>,
}

struct DiskState {
    lru: LruCache<String, u64>,
    bytes: u64,
}

impl DiskCache {
    /// Opens (creating, mode 0700) a cache directory and adopts what an earlier mount
    /// left there, oldest first.
    pub fn open(dir: &std::path::Path, limit: u64) -> std::io::Result<DiskCache> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        let mut found = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let m = e.metadata()?;
            if name.ends_with(".tmp") || !m.is_file() {
                let _ = std::fs::remove_file(e.path());
                continue;
            }
            found.push((m.modified().ok(), name, m.len()));
        }
        found.sort();
        let cache = DiskCache {
            dir: dir.to_path_buf(),
            limit,
            state: Mutex::new(DiskState { lru: LruCache::unbounded(), bytes: 0 }),
        };
        for (_, name, len) in found {
            cache.admit(name, len);
        }
        Ok(cache)
    }

    fn key(blob: &catalog::BlobRef) -> String {
        format!("{}-{}-{}", blob.pack.to_hex(), blob.offset, blob.length)
    }

    pub fn get(&self, blob: &catalog::BlobRef) -> Option<Vec<u8>> {
        let key = Self::key(blob);
        self.state.lock().expect("disk cache lock").lru.get(&key)?;
        match std::fs::read(self.dir.join(&key)) {
            Ok(b) if b.len() == blob.length as usize => Some(b),
            _ => {
                self.remove(blob);
                None
            }
        }
    }

    pub fn contains(&self, blob: &catalog::BlobRef) -> bool {
        self.state.lock().expect("disk cache lock").lru.contains(&Self::key(blob))
    }

    pub fn remove(&self, blob: &catalog::BlobRef) {
        let key = Self::key(blob);
        let mut g = self.state.lock().expect("disk cache lock");
        if let Some(len) = g.lru.pop(&key) {
            g.bytes -= len;
        }
        let _ = std::fs::remove_file(self.dir.join(key));
    }

    /// Stores a blob's sealed bytes (written aside, then renamed into place).
    pub fn put(&self, blob: &catalog::BlobRef, sealed: &[u8]) {
        let key = Self::key(blob);
        let tmp = self.dir.join(format!("{key}.tmp"));
        if std::fs::write(&tmp, sealed).and_then(|()| std::fs::rename(&tmp, self.dir.join(&key))).is_err() {
            let _ = std::fs::remove_file(&tmp);
            return; // a full or broken cache disk only costs speed
        }
        self.admit(key, sealed.len() as u64);
    }

    fn admit(&self, key: String, len: u64) {
        let mut g = self.state.lock().expect("disk cache lock");
        g.bytes += len;
        if let Some(old) = g.lru.put(key, len) {
            g.bytes -= old;
        }
        while g.bytes > self.limit {
            match g.lru.pop_lru() {
                Some((old, len)) => {
                    g.bytes -= len;
                    let _ = std::fs::remove_file(self.dir.join(old));
                }
                None => break,
            }
        }
    }

    pub fn bytes(&self) -> u64 {
        self.state.lock().expect("disk cache lock").bytes
    }
}
