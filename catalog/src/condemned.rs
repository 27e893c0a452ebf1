//! The objects of deletion in two phases, and its clock. `ebb prune` first writes a
//! condemned set (`condemned/<K>-<R>`): the packs and other objects nothing kept
//! needs any more. It deletes them only in a later run, once the set is older than
//! the grace period, and never a pack a writer rescued meanwhile (`rescued/<K>-<R>`):
//! a writer that finds a pack it uses condemned names it there at once. Writers
//! never wait for prune and never need to delete anything.
//!
//! The clock (`Timing`): a writer sees what is condemned at most `view_ttl` late
//! (it looks again every `refresh`), commits nothing with an older view, and the
//! grace is longer than both plus a margin for clocks that disagree and puts in
//! flight. `EBB_GRACE` shortens all three together, for tests: every process that
//! writes to or prunes a repository must see the same value.

use std::collections::BTreeSet;
use std::time::Duration;

use jiff::Timestamp;

use crate::codec::{DecodeError, Decoder, Encoder};
use crate::id::Id;
use crate::point::parse_key_leaf;

pub const CONDEMNED_DIR: &str = "condemned";
pub const RESCUED_DIR: &str = "rescued";
const VERSION: u8 = 1;
/// The longest object name a condemned set may hold.
const MAX_NAME: usize = 1024;
/// The directories whose objects a condemned set may name (packs go by id).
const NAMED_DIRS: [&str; 7] = ["index/", "frags/", "wal/", "forgotten/", "policies/", "leases/", "rescued/"];

/// How long deletion waits, and how fresh a writer's view must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// A condemned set is swept no sooner than this after it was written.
    pub grace: Duration,
    /// A writer commits nothing with a view of condemned sets older than this.
    pub view_ttl: Duration,
    /// A running writer looks at condemned sets again this often.
    pub refresh: Duration,
}

impl Timing {
    pub const DEFAULT_GRACE: Duration = Duration::from_secs(15 * 60);

    /// The grace and what follows from it: the view lives a third of it, and is
    /// refreshed five times as often.
    pub fn with_grace(grace: Duration) -> Timing {
        Timing { grace, view_ttl: grace / 3, refresh: grace / 15 }
    }

    /// `EBB_GRACE` (a duration such as `30s`, for tests) or the default.
    pub fn from_env() -> Timing {
        let grace = std::env::var("EBB_GRACE")
            .ok()
            .and_then(|s| s.trim().parse::<jiff::SignedDuration>().ok())
            .and_then(|d| Duration::try_from(d).ok())
            .filter(|d| *d >= Duration::from_secs(3))
            .unwrap_or(Timing::DEFAULT_GRACE);
        Timing::with_grace(grace)
    }
}

/// What one prune run condemned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Condemned {
    pub packs: BTreeSet<Id>,
    /// Other objects, by name: index files, fragments, WAL pieces, records.
    pub names: BTreeSet<String>,
}

impl Condemned {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        e.u8(VERSION);
        e.u32(u32::try_from(self.packs.len()).expect("fewer than 2^32 packs"));
        for p in &self.packs {
            e.id(p);
        }
        encode_names(&mut e, &self.names);
        e.buf
    }

    pub fn decode(bytes: &[u8]) -> Result<Condemned, DecodeError> {
        let mut d = Decoder::new("condemned set", bytes);
        version(&mut d)?;
        let packs = ids(&mut d)?;
        let names = names(&mut d)?;
        d.finish()?;
        Ok(Condemned { packs, names })
    }

    pub fn is_empty(&self) -> bool {
        self.packs.is_empty() && self.names.is_empty()
    }
}

/// What a writer uses that a condemned set names: not to be deleted. Packs, and
/// objects by name: the WAL a base backup being taken needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rescued {
    pub packs: BTreeSet<Id>,
    pub names: BTreeSet<String>,
}

/// A rescue naming objects is version 2; one of packs alone is written as version
/// 1, as before.
const RESCUED_WITH_NAMES: u8 = 2;

impl Rescued {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        e.u8(if self.names.is_empty() { VERSION } else { RESCUED_WITH_NAMES });
        e.u32(u32::try_from(self.packs.len()).expect("fewer than 2^32 packs"));
        for p in &self.packs {
            e.id(p);
        }
        if !self.names.is_empty() {
            encode_names(&mut e, &self.names);
        }
        e.buf
    }

    pub fn decode(bytes: &[u8]) -> Result<Rescued, DecodeError> {
        let mut d = Decoder::new("rescue", bytes);
        let with_names = match d.u8()? {
            VERSION => false,
            RESCUED_WITH_NAMES => true,
            v => return Err(d.error(format!("unknown version {v}"))),
        };
        let packs = ids(&mut d)?;
        let names = if with_names { names(&mut d)? } else { BTreeSet::new() };
        if with_names && names.is_empty() {
            return Err(d.error("a rescue of version 2 names no object"));
        }
        d.finish()?;
        Ok(Rescued { packs, names })
    }

    pub fn is_empty(&self) -> bool {
        self.packs.is_empty() && self.names.is_empty()
    }
}

fn encode_names(e: &mut Encoder, names: &BTreeSet<String>) {
    e.u32(u32::try_from(names.len()).expect("fewer than 2^32 names"));
    for n in names {
        e.bytes(n.as_bytes());
    }
}

/// A count, then that many object names (`valid_name`) in strictly increasing order.
fn names(d: &mut Decoder) -> Result<BTreeSet<String>, DecodeError> {
    let count = d.count(4)?;
    let mut names = BTreeSet::new();
    let mut last: Option<String> = None;
    for _ in 0..count {
        let raw = d.bytes()?;
        let name = std::str::from_utf8(raw).map_err(|_| d.error("an object name is not UTF-8"))?;
        if !valid_name(name) {
            return Err(d.error(format!("{name:?} is not an object a condemned set may name")));
        }
        if last.as_deref().is_some_and(|l| l >= name) {
            return Err(d.error("object names are not sorted and unique"));
        }
        last = Some(name.to_string());
        names.insert(name.to_string());
    }
    Ok(names)
}

fn version(d: &mut Decoder) -> Result<(), DecodeError> {
    match d.u8()? {
        VERSION => Ok(()),
        v => Err(d.error(format!("unknown version {v}"))),
    }
}

/// A count, then that many pack ids in strictly increasing order.
fn ids(d: &mut Decoder) -> Result<BTreeSet<Id>, DecodeError> {
    let count = d.count(32)?;
    let mut out = BTreeSet::new();
    let mut last: Option<Id> = None;
    for _ in 0..count {
        let id = d.id()?;
        if last.is_some_and(|l| l >= id) {
            return Err(d.error("pack ids are not sorted and unique"));
        }
        last = Some(id);
        out.insert(id);
    }
    Ok(out)
}

/// A relative object name under one of `NAMED_DIRS`, in the names' alphabet,
/// without empty or dot-only components.
fn valid_name(name: &str) -> bool {
    name.len() <= MAX_NAME
        && NAMED_DIRS.iter().any(|d| name.starts_with(d))
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
        && name.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// `<dir>/<K>-<R>`: a condemned set or a rescue, named by when it was written.
pub fn object_name(dir: &str, time: Timestamp) -> Option<String> {
    Some(format!("{dir}/{}-{}", crate::point::time_key(time)?, hex::encode(crate::id::random_bytes::<8>())))
}

/// The time in a name made by `object_name`.
pub fn parse_object_name(dir: &str, name: &str) -> Option<Timestamp> {
    let leaf = name.strip_prefix(dir)?.strip_prefix('/')?;
    parse_key_leaf(leaf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Condemned {
        Condemned {
            packs: [Id([2; 32]), Id([1; 32])].into_iter().collect(),
            names: ["index/ab", "frags/s/e78601e9e44897ff-0123456789abcdef"].into_iter().map(String::from).collect(),
        }
    }

    #[test]
    fn golden_condemned_and_rescued() {
        let bytes = sample().encode();
        let mut want = vec![1u8, 2, 0, 0, 0];
        want.extend([1u8; 32]);
        want.extend([2u8; 32]);
        want.extend([2, 0, 0, 0]);
        want.extend([41, 0, 0, 0]);
        want.extend(b"frags/s/e78601e9e44897ff-0123456789abcdef");
        want.extend([8, 0, 0, 0]);
        want.extend(b"index/ab");
        assert_eq!(bytes, want);
        assert_eq!(Condemned::decode(&bytes).unwrap(), sample());
        let r = Rescued { packs: sample().packs, names: BTreeSet::new() };
        assert_eq!(r.encode(), want[..69]);
        assert_eq!(Rescued::decode(&r.encode()).unwrap(), r);
        // With names: version 2, the names after the packs as in a set.
        let r = Rescued { packs: sample().packs, names: sample().names };
        assert_eq!(r.encode(), [&[2u8][..], &want[1..]].concat());
        assert_eq!(Rescued::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn a_decoder_refuses_what_no_writer_writes() {
        let good = sample().encode();
        assert!(Condemned::decode(&good[..good.len() - 1]).is_err(), "cut short");
        assert!(Condemned::decode(&[good.clone(), vec![0]].concat()).is_err(), "bytes after the end");
        let mut v2 = good.clone();
        v2[0] = 2;
        assert!(Condemned::decode(&v2).unwrap_err().to_string().contains("version 2"));
        let mut unsorted = good.clone();
        unsorted[5..37].copy_from_slice(&[3; 32]);
        assert!(Condemned::decode(&unsorted).unwrap_err().to_string().contains("sorted"));
        for bad in ["config", "keys/0011223344556677", "index/../config", "index//x", "packs/ab/cd", "index/a b"] {
            let c = Condemned { packs: BTreeSet::new(), names: [bad.to_string()].into_iter().collect() };
            assert!(Condemned::decode(&c.encode()).is_err(), "{bad}");
        }
        assert!(Rescued::decode(&[1, 0xff, 0xff, 0xff, 0xff]).is_err(), "a count beyond the bytes");
        assert!(Rescued::decode(&[3, 0, 0, 0, 0]).unwrap_err().to_string().contains("version 3"));
        assert!(Rescued::decode(&[2, 0, 0, 0, 0]).is_err(), "version 2 without its names");
        assert!(Rescued::decode(&[2, 0, 0, 0, 0, 0, 0, 0, 0]).is_err(), "version 2 naming nothing (fuzzer's find)");
    }

    #[test]
    fn names_carry_their_time() {
        let t: Timestamp = "2026-11-26T10:00:00.5Z".parse().unwrap();
        let name = object_name(CONDEMNED_DIR, t).unwrap();
        assert_eq!(parse_object_name(CONDEMNED_DIR, &name), Some(t));
        assert_eq!(parse_object_name(RESCUED_DIR, &name), None);
        assert_eq!(parse_object_name(CONDEMNED_DIR, "condemned/x-y"), None);
    }

    #[test]
    fn the_grace_sets_the_clock() {
        let t = Timing::with_grace(Duration::from_secs(900));
        assert_eq!((t.view_ttl, t.refresh), (Duration::from_secs(300), Duration::from_secs(60)));
        assert!(t.grace > t.view_ttl + t.refresh);
    }
}
