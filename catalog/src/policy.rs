//! Retention policies as the repository stores them, one series per source
//! (`policies/<source>/<K>-<R>`, named like points): setting a policy writes a new
//! object, and the newest one is in force, so every host that reads the repository
//! applies the same rules. Old ones are kept until `ebb prune` removes them.

use bytes::Bytes;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::error::RepoError;
use crate::object::{open_object, seal_object, ObjectError};
use crate::point::{parse_timed, timed_name, validate_source};
use crate::repo::Repository;
use crate::retention::Policy;

pub const POLICIES_DIR: &str = "policies";
const VERSION: u32 = 1;

/// A policy as set: by whom and when.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredPolicy {
    pub version: u32,
    pub source: String,
    /// RFC 3339: when it was set (also the time in its name).
    pub set: String,
    pub host: String,
    pub policy: Policy,
}

impl StoredPolicy {
    pub fn open(keys: &crate::Keys, name: &str, bytes: &[u8]) -> Result<StoredPolicy, ObjectError> {
        StoredPolicy::decode(name, &open_object(keys, name, bytes)?)
    }

    pub fn decode(name: &str, plain: &[u8]) -> Result<StoredPolicy, ObjectError> {
        let bad = |problem: String| ObjectError::Decode {
            name: name.to_string(),
            cause: crate::codec::DecodeError::new("retention policy", problem),
        };
        let p: StoredPolicy = serde_json::from_slice(plain).map_err(|e| bad(e.to_string()))?;
        if p.version != VERSION {
            return Err(bad(format!("unknown policy version {}", p.version)));
        }
        match parse_timed(POLICIES_DIR, name) {
            Some((source, _)) if source == p.source => {}
            _ => return Err(bad(format!("it names source {:?}, its object name another", p.source))),
        }
        p.policy.validate().map_err(|e| bad(e.to_string()))?;
        Ok(p)
    }
}

impl Repository {
    /// The policy in force for `source`: the newest set. `None` when none was set.
    pub async fn policy(&self, source: &str) -> Result<Option<StoredPolicy>, RepoError> {
        let dir = format!("{POLICIES_DIR}/{source}");
        // A few names, in case a stray object sorts first.
        let listed = self.store().list_after(&dir, &format!("{dir}/"), 16).await?;
        let Some(name) = listed.into_iter().find(|n| parse_timed(POLICIES_DIR, n).is_some()) else {
            return Ok(None);
        };
        let bytes = self.store().get(&name).await?;
        Ok(Some(StoredPolicy::open(self.keys(), &name, &bytes)?))
    }

    /// The sources that have a policy.
    pub async fn policy_sources(&self) -> Result<Vec<String>, RepoError> {
        Ok(self.store().list_dirs(POLICIES_DIR).await?)
    }

    /// Makes `policy` the one in force for `source`; returns the object's name.
    pub async fn set_policy(&self, source: &str, policy: Policy, host: String) -> Result<String, RepoError> {
        validate_source(source).map_err(|problem| RepoError::InvalidSource { problem })?;
        policy.validate()?;
        let now = Timestamp::now();
        let name = timed_name(POLICIES_DIR, source, now).ok_or(RepoError::BadTime { time: now.to_string() })?;
        let stored = StoredPolicy { version: VERSION, source: source.to_string(), set: now.to_string(), host, policy };
        let sealed = seal_object(self.keys(), &name, &serde_json::to_vec(&stored).expect("policy serializes"));
        self.store().put_new(&name, Bytes::from(sealed)).await?;
        Ok(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "policies/db/e78601e9e44897ff-0123456789abcdef";

    #[test]
    fn golden_policy() {
        let policy = Policy {
            keep_last: 3,
            keep_within: Some(jiff::Span::new().days(7)),
            keep_daily: 7,
            pitr_within: Some(jiff::Span::new().hours(36)),
            time_zone: "Europe/Paris".into(),
            ..Policy::default()
        };
        let stored = StoredPolicy {
            version: 1,
            source: "db".into(),
            set: "2025-11-21T10:15:00Z".into(),
            host: "h".into(),
            policy,
        };
        let json = String::from_utf8(serde_json::to_vec(&stored).unwrap()).unwrap();
        assert_eq!(
            json,
            r#"{"version":1,"source":"db","set":"2025-11-21T10:15:00Z","host":"h","policy":{"keep_last":3,"keep_within":"P7D","keep_hourly":0,"keep_daily":7,"keep_weekly":0,"keep_monthly":0,"keep_yearly":0,"pitr_within":"PT36H","time_zone":"Europe/Paris"}}"#
        );
        let back = StoredPolicy::decode(NAME, json.as_bytes()).unwrap();
        assert_eq!(back.policy.describe(), ["keep-last 3", "keep-daily 7", "keep-within 7d", "pitr-within 36h"]);
        // Rules absent from the JSON are off.
        let sparse = r#"{"version":1,"source":"db","set":"x","host":"h","policy":{"keep_daily":2}}"#;
        assert_eq!(StoredPolicy::decode(NAME, sparse.as_bytes()).unwrap().policy.describe(), ["keep-daily 2"]);
    }

    #[test]
    fn a_policy_under_another_source_or_version_is_refused() {
        let other = r#"{"version":1,"source":"web","set":"x","host":"h","policy":{}}"#;
        assert!(StoredPolicy::decode(NAME, other.as_bytes()).unwrap_err().to_string().contains("names source"));
        let newer = r#"{"version":2,"source":"db","set":"x","host":"h","policy":{}}"#;
        assert!(StoredPolicy::decode(NAME, newer.as_bytes()).unwrap_err().to_string().contains("version 2"));
        let bad_span = r#"{"version":1,"source":"db","set":"x","host":"h","policy":{"keep_within":"-P1D"}}"#;
        assert!(StoredPolicy::decode(NAME, bad_span.as_bytes()).is_err());
    }
}
