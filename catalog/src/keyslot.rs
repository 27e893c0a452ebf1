//! Key slots (`keys/<16 hex>`): the master key wrapped under a passphrase (Argon2id)
//! or a key file. Adding or removing a slot never rewrites data.

use std::mem::MaybeUninit;
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;

use aes_gcm::aead::KeyInit;
use aes_gcm::Aes256Gcm;
use hkdf::Hkdf;
use rayon::iter::{IntoParallelIterator, ParallelExtend, ParallelIterator};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::config::{checksummed, verify_checksummed};
use crate::crypto::{open, seal, MasterKey};
use crate::id::{random_bytes, Id};

pub const KEYS_DIR: &str = "keys";

/// Argon2id cost for new passphrase slots: 64 MiB, 3 passes, 4 lanes, the second
/// recommended option of RFC 9106 (section 4). The lanes are computed in parallel:
/// about 55 ms on two cores, once its memory is mapped (`prepare_kdf_memory`). Slots made with other parameters keep theirs.
pub const DEFAULT_KDF: KdfParams = KdfParams { memory_kib: 64 * 1024, iterations: 3, parallelism: 4 };

/// The largest Argon2id cost a slot may ask for: 4 GiB and 64 passes.
const MAX_KDF_MEMORY_KIB: u32 = 4 * 1024 * 1024;
const MAX_KDF_ITERATIONS: u32 = 64;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SlotKind {
    Password,
    Keyfile,
}

/// The secret that opens a slot.
pub enum Secret {
    Password(Vec<u8>),
    /// The 32 bytes of a key file.
    KeyFile([u8; 32]),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Secret::Password(_) => "Secret::Password(..)",
            Secret::KeyFile(_) => "Secret::KeyFile(..)",
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeySlot {
    pub version: u32,
    pub repo: String,
    pub slot: String,
    pub kind: SlotKind,
    pub created: String,
    pub host: String,
    pub kdf: Option<KdfParams>,
    pub salt: String,
    pub wrapped: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("key slot {name} is corrupted: {problem}")]
    Corrupt { name: String, problem: String },
    #[error("key derivation failed: {0}")]
    Kdf(String),
}

pub fn slot_name(slot: &str) -> String {
    format!("{KEYS_DIR}/{slot}")
}

impl KeySlot {
    /// Wraps `master` under `secret` in a new slot with a fresh random id.
    pub fn create(
        master: &MasterKey,
        repo: &Id,
        secret: &Secret,
        kdf: KdfParams,
        created: String,
        host: String,
    ) -> Result<KeySlot, SlotError> {
        let slot = hex::encode(random_bytes::<8>());
        let salt: [u8; 16] = random_bytes();
        let (kind, kdf) = match secret {
            Secret::Password(_) => (SlotKind::Password, Some(kdf)),
            Secret::KeyFile(_) => (SlotKind::Keyfile, None),
        };
        let kek = derive_kek(secret, kdf.unwrap_or(DEFAULT_KDF), &salt)?;
        let nonce_counter = u64::from_le_bytes(random_bytes());
        let wrapped = seal(&kek, nonce_counter, &aad(repo, &slot), &master.0);
        Ok(KeySlot {
            version: 1,
            repo: repo.to_hex(),
            slot,
            kind,
            created,
            host,
            kdf,
            salt: hex::encode(salt),
            wrapped: hex::encode(wrapped),
        })
    }

    pub fn name(&self) -> String {
        slot_name(&self.slot)
    }

    pub fn encode(&self) -> Vec<u8> {
        checksummed(&serde_json::to_vec(self).expect("key slot serializes"))
    }

    /// The repository a slot's bytes say it belongs to, unchecked: where the
    /// repository id must be learnt from the slots themselves (a lost `config`).
    pub fn claimed_repo(bytes: &[u8]) -> Option<Id> {
        #[derive(Deserialize)]
        struct Claim {
            repo: String,
        }
        let body = verify_checksummed(bytes).ok()?;
        Id::from_hex(&serde_json::from_slice::<Claim>(body).ok()?.repo)
    }

    /// Parses a slot stored under `name`, checking it belongs there and to `repo`.
    pub fn decode(name: &str, repo: &Id, bytes: &[u8]) -> Result<KeySlot, SlotError> {
        let corrupt = |problem: String| SlotError::Corrupt { name: name.to_string(), problem };
        let body = verify_checksummed(bytes).map_err(|p| corrupt(p.to_string()))?;
        let s: KeySlot = serde_json::from_slice(body).map_err(|e| corrupt(e.to_string()))?;
        if s.version != 1 {
            return Err(corrupt(format!("unknown key slot version {}", s.version)));
        }
        if s.name() != name {
            return Err(corrupt(format!("it names itself {}", s.name())));
        }
        if s.repo != repo.to_hex() {
            return Err(corrupt("it belongs to another repository".into()));
        }
        match (s.kind, s.kdf) {
            (SlotKind::Password, None) => return Err(corrupt("a password slot without KDF parameters".into())),
            // Bounds keep a tampered slot from making every unlock allocate terabytes or spin forever.
            (_, Some(k))
                if !(8..=MAX_KDF_MEMORY_KIB).contains(&k.memory_kib)
                    || !(1..=MAX_KDF_ITERATIONS).contains(&k.iterations)
                    || !(1..=16).contains(&k.parallelism) =>
            {
                return Err(corrupt(format!("KDF parameters out of bounds: {k:?}")))
            }
            _ => {}
        }
        Ok(s)
    }

    /// Unwraps the master key if `secret` opens this slot.
    pub fn unwrap_key(&self, repo: &Id, secret: &Secret) -> Result<Option<MasterKey>, SlotError> {
        let matches_kind = matches!(
            (self.kind, secret),
            (SlotKind::Password, Secret::Password(_)) | (SlotKind::Keyfile, Secret::KeyFile(_))
        );
        if !matches_kind {
            return Ok(None);
        }
        let corrupt = |problem: &str| SlotError::Corrupt { name: self.name(), problem: problem.to_string() };
        let salt = hex::decode(&self.salt).map_err(|_| corrupt("salt is not hex"))?;
        let wrapped = hex::decode(&self.wrapped).map_err(|_| corrupt("wrapped key is not hex"))?;
        let kek = derive_kek(secret, self.kdf.unwrap_or(DEFAULT_KDF), &salt)?;
        match open(&kek, &aad(repo, &self.slot), &wrapped) {
            Ok(key) => {
                let key: [u8; 32] = key.try_into().map_err(|_| corrupt("wrapped key is not 32 bytes"))?;
                Ok(Some(MasterKey(key)))
            }
            Err(_) => Ok(None),
        }
    }
}

fn aad(repo: &Id, slot: &str) -> Vec<u8> {
    let mut a = b"ebb v1 key slot\0".to_vec();
    a.extend_from_slice(&repo.0);
    a.extend_from_slice(slot.as_bytes());
    a
}

/// Memory for one Argon2id derivation, of so many blocks, being written by a thread of
/// its own (see `prepare_kdf_memory`).
static PREPARED: Mutex<Option<(usize, JoinHandle<Vec<argon2::Block>>)>> = Mutex::new(None);

/// Starts faulting in the memory of one Argon2id derivation at `DEFAULT_KDF`, on a
/// thread of its own, for a process about to unlock with a password. Mapping 64 MiB
/// is a sizeable part of a derivation's time on small machines; done while the process
/// starts, it is off the derivation's path, and it is the same memory the derivation
/// would have mapped anyway. The next derivation at that cost uses it; one at another
/// cost, or one that never comes, leaves it unused.
pub fn prepare_kdf_memory() {
    prepare_memory(DEFAULT_KDF);
}

fn prepare_memory(kdf: KdfParams) {
    let Ok(params) = argon2_params(kdf) else { return };
    let blocks = params.block_count();
    let prepared = std::thread::Builder::new().name("kdf-memory".into()).spawn(move || kdf_memory(blocks));
    if let Ok(handle) = prepared {
        *PREPARED.lock().unwrap_or_else(PoisonError::into_inner) = Some((blocks, handle));
    }
}

/// The prepared memory if it holds `blocks` blocks, or else new memory.
fn memory_for(blocks: usize) -> Vec<argon2::Block> {
    let prepared = {
        let mut slot = PREPARED.lock().unwrap_or_else(PoisonError::into_inner);
        match slot.take() {
            Some((size, handle)) if size == blocks => Some(handle),
            other => {
                *slot = other;
                None
            }
        }
    };
    prepared.and_then(|handle| handle.join().ok()).unwrap_or_else(|| kdf_memory(blocks))
}

/// `blocks` zeroed Argon2 blocks, written by every core at once (faulting the pages in
/// is most of the work), on huge pages where the kernel has them.
fn kdf_memory(blocks: usize) -> Vec<argon2::Block> {
    let mut memory = Vec::with_capacity(blocks);
    advise_huge_pages(memory.spare_capacity_mut());
    memory.par_extend((0..blocks).into_par_iter().map(|_| argon2::Block::default()));
    memory
}

/// Asks the kernel to back `memory` with transparent huge pages. Argon2id reads its
/// memory at random: on 2 MiB pages, 64 MiB is faulted in 32 times instead of 16,384,
/// and misses the TLB far less often. Both halve the mapping time and make the whole
/// derivation about a fifth faster. Where huge pages are off or unavailable, the
/// kernel ignores the advice or refuses it, and nothing else changes.
fn advise_huge_pages<T>(memory: &mut [MaybeUninit<T>]) {
    const PAGE: usize = 4096;
    let first = memory.as_mut_ptr() as usize;
    let start = first.next_multiple_of(PAGE);
    let end = (first + std::mem::size_of_val(memory)) / PAGE * PAGE;
    if end > start {
        // SAFETY: the range lies inside `memory`, which this function borrows mutably.
        // MADV_HUGEPAGE changes how the kernel backs the range, never its contents.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
}

fn argon2_params(kdf: KdfParams) -> Result<argon2::Params, SlotError> {
    argon2::Params::new(kdf.memory_kib, kdf.iterations, kdf.parallelism, Some(32))
        .map_err(|e| SlotError::Kdf(e.to_string()))
}

fn derive_kek(secret: &Secret, kdf: KdfParams, salt: &[u8]) -> Result<Aes256Gcm, SlotError> {
    let mut kek = [0u8; 32];
    match secret {
        Secret::Password(pw) => {
            let params = argon2_params(kdf)?;
            let blocks = params.block_count();
            let argon2 = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
            argon2
                .hash_password_into_with_memory(pw, salt, &mut kek, memory_for(blocks))
                .map_err(|e| SlotError::Kdf(e.to_string()))?;
        }
        Secret::KeyFile(bytes) => {
            Hkdf::<Sha256>::new(Some(salt), bytes)
                .expand(b"ebb v1 key file", &mut kek)
                .expect("32 bytes is a valid HKDF length");
        }
    }
    Ok(Aes256Gcm::new(&kek.into()))
}

/// The text of a key file: `ebb-key-v1 <64 hex>` and a newline.
pub fn encode_key_file(secret: &[u8; 32]) -> String {
    format!("ebb-key-v1 {}\n", hex::encode(secret))
}

pub fn decode_key_file(text: &str) -> Option<[u8; 32]> {
    let hexpart = text.trim().strip_prefix("ebb-key-v1 ")?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hexpart.trim(), &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEAK: KdfParams = KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 };

    #[test]
    fn wrap_unwrap_and_refuse() {
        let master = MasterKey([5u8; 32]);
        let repo = Id([1u8; 32]);
        let pw = Secret::Password(b"correct horse".to_vec());
        let slot = KeySlot::create(&master, &repo, &pw, WEAK, "t".into(), "h".into()).unwrap();
        let bytes = slot.encode();
        let back = KeySlot::decode(&slot.name(), &repo, &bytes).unwrap();
        assert_eq!(back.unwrap_key(&repo, &pw).unwrap().unwrap().0, master.0);
        assert!(back.unwrap_key(&repo, &Secret::Password(b"wrong".to_vec())).unwrap().is_none());
        assert!(back.unwrap_key(&repo, &Secret::KeyFile([0; 32])).unwrap().is_none());
        assert!(KeySlot::decode("keys/0000000000000000", &repo, &bytes).is_err());
        assert!(KeySlot::decode(&slot.name(), &Id([2u8; 32]), &bytes).is_err());
        let mut bad = bytes.clone();
        bad[40] ^= 1;
        assert!(KeySlot::decode(&slot.name(), &repo, &bad).is_err());
    }

    #[test]
    fn golden_wrapping() {
        // Pins the Argon2id setup, the key-file derivation and the slot AAD.
        let repo = Id([1u8; 32]);
        let pw = derive_kek(&Secret::Password(b"pw".to_vec()), WEAK, &[7u8; 16]).unwrap();
        let kf = derive_kek(&Secret::KeyFile([3u8; 32]), WEAK, &[7u8; 16]).unwrap();
        let a = seal(&pw, 0, &aad(&repo, "0011223344556677"), &[5u8; 32]);
        let b = seal(&kf, 0, &aad(&repo, "0011223344556677"), &[5u8; 32]);
        assert_eq!(
            hex::encode(&a[12..]),
            "babe98fc8a5120a443255566603e7b1f35d4de4c321d84b414880f074a7db4116e62c5d693fd22d01581ddb423bbec96"
        );
        // Cross-checked against an independent HKDF + AES-GCM implementation.
        assert_eq!(
            hex::encode(&b[12..]),
            "f2a910e791498cb03b0b1ca8f126bb5087332dd2448f3d70e1a3bd68c1fb6cdaab575f4157655d6a674898589ce480cd"
        );
    }

    #[test]
    fn prepared_memory_derives_the_same_key() {
        // A cost of its own, so that no other test's derivation takes the memory.
        let kdf = KdfParams { memory_kib: 72, iterations: 2, parallelism: 2 };
        let pw = Secret::Password(b"pw".to_vec());
        let plain = derive_kek(&pw, kdf, &[7u8; 16]).unwrap();
        prepare_memory(kdf);
        let prepared = derive_kek(&pw, kdf, &[7u8; 16]).unwrap();
        assert!(PREPARED.lock().unwrap().is_none(), "the derivation took the prepared memory");
        assert_eq!(seal(&plain, 0, b"", b"x"), seal(&prepared, 0, b"", b"x"));
    }

    #[test]
    fn tampered_kdf_parameters_are_refused() {
        let master = MasterKey([5u8; 32]);
        let repo = Id([1u8; 32]);
        let mut slot =
            KeySlot::create(&master, &repo, &Secret::Password(b"x".to_vec()), WEAK, "t".into(), "h".into()).unwrap();
        slot.kdf = Some(KdfParams { memory_kib: u32::MAX, iterations: 1, parallelism: 1 });
        assert!(KeySlot::decode(&slot.name(), &repo, &slot.encode()).is_err());
        slot.kdf = Some(KdfParams { memory_kib: 64, iterations: 1_000_000, parallelism: 1 });
        assert!(KeySlot::decode(&slot.name(), &repo, &slot.encode()).is_err());
    }

    #[test]
    fn key_file_slot() {
        let master = MasterKey([5u8; 32]);
        let repo = Id([1u8; 32]);
        let secret = [3u8; 32];
        let text = encode_key_file(&secret);
        assert_eq!(decode_key_file(&text), Some(secret));
        assert_eq!(decode_key_file("nonsense"), None);
        let slot = KeySlot::create(&master, &repo, &Secret::KeyFile(secret), WEAK, "t".into(), "h".into()).unwrap();
        assert!(slot.unwrap_key(&repo, &Secret::KeyFile(secret)).unwrap().is_some());
        assert!(slot.unwrap_key(&repo, &Secret::KeyFile([4u8; 32])).unwrap().is_none());
    }
}
