//! `config`: the repository's small plaintext header (format version and id), and the
//! checksummed-JSON framing it shares with key slots.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::id::Id;

pub const CONFIG_NAME: &str = "config";
pub const FORMAT_VERSION: u32 = 1;
const MAGIC: &str = "ebb-repository";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Config {
    pub magic: String,
    pub version: u32,
    /// Hex of the repository id: the HKDF salt and part of every key slot's AAD.
    pub id: String,
    pub created: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name} is corrupted: {problem}")]
    Corrupt { name: String, problem: String },
    #[error("{name} is format version {found}; this ebb reads version {FORMAT_VERSION}. Upgrade ebb.")]
    Version { name: String, found: u32 },
}

impl Config {
    pub fn new(id: Id, created: String) -> Config {
        Config { magic: MAGIC.to_string(), version: FORMAT_VERSION, id: id.to_hex(), created }
    }

    pub fn repo_id(&self) -> Id {
        Id::from_hex(&self.id).expect("checked when parsed")
    }

    pub fn encode(&self) -> Vec<u8> {
        checksummed(&serde_json::to_vec(self).expect("config serializes"))
    }

    pub fn decode(bytes: &[u8]) -> Result<Config, ConfigError> {
        let corrupt = |problem: String| ConfigError::Corrupt { name: CONFIG_NAME.into(), problem };
        let body = verify_checksummed(bytes).map_err(|p| corrupt(p.to_string()))?;
        let c: Config = serde_json::from_slice(body).map_err(|e| corrupt(e.to_string()))?;
        if c.magic != MAGIC {
            return Err(corrupt(format!("magic is {:?}, not {MAGIC:?}", c.magic)));
        }
        if c.version != FORMAT_VERSION {
            return Err(ConfigError::Version { name: CONFIG_NAME.into(), found: c.version });
        }
        if Id::from_hex(&c.id).is_none() {
            return Err(corrupt("id is not 64 hex digits".into()));
        }
        Ok(c)
    }
}

/// Frames a JSON body for a plaintext object: the body, a newline, then
/// `sha256:<hex of the body>` and a newline, so that any flipped byte is noticed.
pub fn checksummed(body: &[u8]) -> Vec<u8> {
    let mut out = body.to_vec();
    out.extend_from_slice(b"\nsha256:");
    out.extend_from_slice(hex::encode(Sha256::digest(body)).as_bytes());
    out.push(b'\n');
    out
}

/// Checks what `checksummed` framed and returns the body.
pub fn verify_checksummed(bytes: &[u8]) -> Result<&[u8], &'static str> {
    let text = bytes.strip_suffix(b"\n").ok_or("missing final newline")?;
    let split = text.iter().rposition(|&b| b == b'\n').ok_or("missing checksum line")?;
    let (body, sum) = (&text[..split], &text[split + 1..]);
    let sum = sum.strip_prefix(b"sha256:").ok_or("checksum line does not start with sha256:")?;
    if hex::encode(Sha256::digest(body)).as_bytes() != sum {
        return Err("checksum mismatch");
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_config() {
        let c = Config::new(Id([0xab; 32]), "2026-11-22T00:00:00Z".into());
        let bytes = c.encode();
        assert_eq!(
            String::from_utf8(bytes.clone()).unwrap(),
            "{\"magic\":\"ebb-repository\",\"version\":1,\"id\":\"abababababababababababababababababababababababababababababababab\",\"created\":\"2026-11-22T00:00:00Z\"}\nsha256:b1f5726c31c221d6e659b6e8706a850206b2e3762d11ba78a712d435324b48ee\n"
        );
        assert_eq!(Config::decode(&bytes).unwrap(), c);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x04;
            assert!(Config::decode(&bad).is_err(), "flip at {i} went unnoticed");
        }
    }
}
