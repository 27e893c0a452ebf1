//! Leases (`leases/<source>/<K>-<holder>`): which process writes a source, known to
//! every host through the repository itself, whatever URL spelling or state
//! directory each uses. `<K>` is the inverted time of the lease's last renewal (as
//! for points, so names sort newest first), `<holder>` 16 hex digits of the holding
//! process. The object (`EBO1`, named) says who holds it: host, pid, what runs.
//!
//! A writer takes a source by writing its lease, then listing the others: a lease
//! of another holder renewed within `TTL` wins, unless it was taken by a process
//! that is gone in this very pid namespace of this boot (a stream killed and
//! started again). Two that start at once may both see each other and both give
//! up; never do both go on. The holder renews every `RENEW` and removes its older
//! leases where it may delete (a writer without delete permission leaves them to
//! expire); one that could not renew for `TTL` looks again before going on, and
//! stops if another has taken the source meanwhile.

use std::time::Duration;

use bytes::Bytes;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::error::RepoError;
use crate::id::random_bytes;
use crate::object::{open_object, seal_object};
use crate::point::{parse_timed, timed_name_with};
use crate::repo::Repository;

pub(crate) const LEASES_DIR: &str = "leases";
/// A holder writes its lease again this often...
pub const RENEW: Duration = Duration::from_secs(60);
/// ...and a lease not renewed for this long is over.
pub const TTL: Duration = Duration::from_secs(300);

/// Who holds a source.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    /// What holds it: `stream dir`, `stream pg`.
    pub what: String,
    pub since: Timestamp,
    /// The boot and pid namespace the pid is of (`local_identity`): a pid says
    /// something only where these are the same. Empty when unknown.
    #[serde(default)]
    pub pids_of: String,
}

impl Holder {
    /// This process, holding for `what`.
    pub fn this_process(host: String, what: &str) -> Holder {
        Holder {
            host,
            pid: std::process::id(),
            what: what.to_string(),
            since: Timestamp::now(),
            pids_of: local_identity(),
        }
    }
}

/// This boot of the kernel and this process's pid namespace: where pids mean the
/// same processes. Hostnames do not say it (cloned machines, containers).
fn local_identity() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let ns = std::fs::read_link("/proc/self/ns/pid").map(|p| p.display().to_string()).unwrap_or_default();
    if boot.trim().is_empty() || ns.is_empty() {
        return String::new();
    }
    format!("{} {ns}", boot.trim())
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} on {} (pid {}) since {}", self.what, self.host, self.pid, self.since)
    }
}

/// Another writer took the source while its holder could not renew its lease.
#[derive(Debug, thiserror::Error)]
#[error("this stream lost its lease, and stops")]
pub struct LeaseLost(#[source] pub RepoError);

/// Runs `work` holding `source` for `holder` (`Lease::acquire`): no other writer
/// can take the source meanwhile, on any host, whatever URL or state directory it
/// uses. The lease is renewed every `RENEW` in the background and released at the
/// end. If another writer takes the source meanwhile, `work` is dropped and the
/// result is `LeaseLost`; a renewal that fails otherwise (the store unreachable) is
/// logged, and tried again.
pub async fn holding<T, E>(
    repo: &Repository,
    source: &str,
    holder: Holder,
    alive: impl Fn(u32) -> bool,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E>
where
    E: From<RepoError> + From<LeaseLost>,
{
    let mut lease = Lease::acquire(repo, source, holder, &alive).await?;
    let r = {
        let renewing = async {
            loop {
                tokio::time::sleep(RENEW).await;
                match lease.renew(&alive).await {
                    Ok(()) => {}
                    Err(e @ RepoError::SourceBusy { .. }) => return LeaseLost(e),
                    Err(e) => tracing::warn!("cannot renew this stream's lease: {e}"),
                }
            }
        };
        tokio::select! {
            r = work => r,
            lost = renewing => Err(lost.into()),
        }
    };
    lease.release().await;
    r
}

/// A source held by this process. Renew it with `renew`, give it up with `release`.
#[derive(Debug)]
pub struct Lease {
    repo: Repository,
    source: String,
    holder_id: String,
    holder: Holder,
    /// The name of the newest lease object written, and when it was.
    current: String,
    renewed: Timestamp,
}

/// What a scan of the leases found.
enum Scan {
    Held(Holder),
    Free,
    /// A lease went between the listing and its read.
    Vanished,
}

fn dir(source: &str) -> String {
    format!("{LEASES_DIR}/{source}")
}

impl Lease {
    /// Takes `source` for `holder`, or says who has it (`RepoError::SourceBusy`).
    /// `alive` tells whether a process of this host still runs.
    pub async fn acquire(
        repo: &Repository,
        source: &str,
        holder: Holder,
        alive: impl Fn(u32) -> bool,
    ) -> Result<Lease, RepoError> {
        crate::point::validate_source(source).map_err(|problem| RepoError::InvalidSource { problem })?;
        let holder_id = hex::encode(random_bytes::<8>());
        let now = Timestamp::now();
        let mut lease = Lease {
            repo: repo.clone(),
            source: source.to_string(),
            holder_id,
            holder,
            current: String::new(),
            renewed: now,
        };
        lease.current = lease.write(now).await?;
        match lease.other_holder(&alive).await {
            Ok(None) => Ok(lease),
            Ok(Some(other)) => {
                lease.release().await;
                Err(RepoError::SourceBusy { source_name: source.to_string(), holder: other.to_string() })
            }
            Err(e) => {
                lease.release().await;
                Err(e)
            }
        }
    }

    async fn write(&self, at: Timestamp) -> Result<String, RepoError> {
        let name = timed_name_with(LEASES_DIR, &self.source, at, &self.holder_id)
            .ok_or_else(|| RepoError::BadTime { time: at.to_string() })?;
        let body = serde_json::to_vec(&self.holder).expect("a holder serializes");
        self.repo.store().put_new(&name, Bytes::from(seal_object(self.repo.keys(), &name, &body))).await?;
        Ok(name)
    }

    /// The holder of another lease of the source that is still in force.
    async fn other_holder(&self, alive: &impl Fn(u32) -> bool) -> Result<Option<Holder>, RepoError> {
        // A lease that vanished between the listing and its read was renewed (a new
        // one was written before the old went) or released: list again to know.
        for _ in 0..5 {
            match self.scan(alive).await? {
                Scan::Held(h) => return Ok(Some(h)),
                Scan::Free => return Ok(None),
                Scan::Vanished => continue,
            }
        }
        Err(crate::store::StoreError::NotFound {
            name: format!("{}/… (leases keep vanishing as they are read)", dir(&self.source)),
        }
        .into())
    }

    async fn scan(&self, alive: &impl Fn(u32) -> bool) -> Result<Scan, RepoError> {
        let now = Timestamp::now();
        let ttl = jiff::SignedDuration::try_from(TTL).expect("a small duration");
        let mut vanished = false;
        for o in self.repo.store().list(&dir(&self.source)).await? {
            let Some((_, renewed)) = parse_timed(LEASES_DIR, &o.name) else { continue };
            if o.name.ends_with(&self.holder_id) || renewed.checked_add(ttl).is_ok_and(|until| until < now) {
                continue;
            }
            let holder = match self.repo.store().get(&o.name).await {
                Ok(bytes) => open_object(self.repo.keys(), &o.name, &bytes)
                    .ok()
                    .and_then(|plain| serde_json::from_slice::<Holder>(&plain).ok()),
                Err(e) if e.is_not_found() => {
                    vanished = true;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let Some(holder) = holder else {
                tracing::warn!("ignoring the unreadable lease {}", o.name);
                continue;
            };
            // Gone from this very boot and pid namespace (a stream killed and started
            // again): its lease is over. Our own pid can only be a dead one's.
            let here = !holder.pids_of.is_empty() && holder.pids_of == self.holder.pids_of;
            if here && (holder.pid == self.holder.pid || !alive(holder.pid)) {
                continue;
            }
            return Ok(Scan::Held(holder));
        }
        Ok(if vanished { Scan::Vanished } else { Scan::Free })
    }

    /// Writes the lease again, and removes the one before where it may. After a time
    /// without renewal longer than `TTL` (the store unreachable), another may have
    /// taken the source: then this holder has lost it (`RepoError::SourceBusy`), and
    /// must stop writing.
    pub async fn renew(&mut self, alive: impl Fn(u32) -> bool) -> Result<(), RepoError> {
        let now = Timestamp::now();
        let lapsed = Duration::try_from(now.duration_since(self.renewed)).unwrap_or_default() >= TTL;
        let name = self.write(now).await?;
        let old = std::mem::replace(&mut self.current, name);
        self.renewed = now;
        if let Err(e) = self.repo.store().delete(&old).await {
            tracing::debug!("keeping the old lease {old}: {e}");
        }
        if lapsed {
            if let Some(other) = self.other_holder(&alive).await? {
                return Err(RepoError::SourceBusy { source_name: self.source.clone(), holder: other.to_string() });
            }
        }
        Ok(())
    }

    /// Gives the source up: removes this holder's leases where it may (otherwise
    /// they expire).
    pub async fn release(self) {
        let Ok(all) = self.repo.store().list(&dir(&self.source)).await else { return };
        for o in all.iter().filter(|o| o.name.ends_with(&self.holder_id)) {
            if let Err(e) = self.repo.store().delete(&o.name).await {
                tracing::debug!("leaving the lease {} to expire: {e}", o.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyslot::{Secret, DEFAULT_KDF};
    use crate::store::Store;

    fn holder(host: &str, pid: u32) -> Holder {
        Holder { host: host.into(), pid, what: "stream dir".into(), since: Timestamp::now(), pids_of: host.into() }
    }

    #[tokio::test]
    async fn one_holder_per_source_and_a_dead_local_one_is_passed_over() {
        let repo =
            Repository::init(Store::memory(), &Secret::KeyFile([1; 32]), DEFAULT_KDF, "t".into()).await.unwrap().0;
        let mut first = Lease::acquire(&repo, "web", holder("a", 10), |_| true).await.unwrap();
        let busy = Lease::acquire(&repo, "web", holder("b", 20), |_| true).await.unwrap_err();
        assert!(busy.to_string().contains("on a (pid 10)"), "{busy}");
        // Another source is free.
        Lease::acquire(&repo, "db", holder("b", 20), |_| true).await.unwrap().release().await;
        first.renew(|_| true).await.unwrap();
        assert_eq!(repo.store().list("leases/web").await.unwrap().len(), 1, "the old lease went on renewal");
        // Host a again, with pid 10 gone: a stream killed and started again.
        let again = Lease::acquire(&repo, "web", holder("a", 11), |pid| pid != 10).await.unwrap();
        again.release().await;
        first.release().await;
        assert!(repo.store().list("leases/web").await.unwrap().is_empty());
        Lease::acquire(&repo, "web", holder("b", 20), |_| true).await.unwrap().release().await;
    }

    /// What work held by `holding` may fail with.
    #[derive(Debug)]
    enum Failed {
        Repo(RepoError),
        Lost,
    }
    impl From<RepoError> for Failed {
        fn from(e: RepoError) -> Failed {
            Failed::Repo(e)
        }
    }
    impl From<LeaseLost> for Failed {
        fn from(_: LeaseLost) -> Failed {
            Failed::Lost
        }
    }

    #[tokio::test]
    async fn work_runs_holding_the_source_and_lets_it_go_after() {
        let repo =
            Repository::init(Store::memory(), &Secret::KeyFile([1; 32]), DEFAULT_KDF, "t".into()).await.unwrap().0;
        let other = Lease::acquire(&repo, "db", holder("b", 20), |_| true).await.unwrap();
        let r: Result<u32, Failed> = holding(&repo, "web", holder("a", 10), |_| true, async {
            let meanwhile = Lease::acquire(&repo, "web", holder("b", 20), |_| true).await;
            assert!(meanwhile.is_err(), "held while the work runs");
            Ok(7)
        })
        .await;
        assert_eq!(r.unwrap(), 7);
        assert!(repo.store().list("leases/web").await.unwrap().is_empty(), "released after");
        let busy: Result<(), Failed> =
            holding(&repo, "db", holder("a", 10), |_| true, async { panic!("work runs only holding the source") })
                .await;
        assert!(matches!(busy, Err(Failed::Repo(RepoError::SourceBusy { .. }))), "{busy:?}");
        other.release().await;
    }

    /// Pids mean something only in one boot and pid namespace: the same host name
    /// elsewhere (a cloned machine, a container) is another host.
    #[tokio::test]
    async fn a_pid_of_another_boot_or_namespace_is_not_judged_here() {
        let repo =
            Repository::init(Store::memory(), &Secret::KeyFile([1; 32]), DEFAULT_KDF, "t".into()).await.unwrap().0;
        let there = Holder { pids_of: "other boot".into(), ..holder("a", 10) };
        let first = Lease::acquire(&repo, "web", there, |_| true).await.unwrap();
        // Host "a" too, pid 10 dead here: but that pid was of another boot.
        let err = Lease::acquire(&repo, "web", holder("a", 11), |pid| pid != 10).await.unwrap_err();
        assert!(matches!(err, RepoError::SourceBusy { .. }), "{err}");
        first.release().await;
    }

    /// A holder that could not renew for longer than the lease lasts finds, when it
    /// can again, that another took the source: it has lost it.
    #[tokio::test]
    async fn a_lapsed_holder_learns_it_lost_the_source() {
        let repo =
            Repository::init(Store::memory(), &Secret::KeyFile([1; 32]), DEFAULT_KDF, "t".into()).await.unwrap().0;
        let mut first = Lease::acquire(&repo, "web", holder("a", 10), |_| true).await.unwrap();
        // Its renewals failed for longer than the lease: it lapsed, and b took over.
        first.renewed = Timestamp::now() - jiff::SignedDuration::try_from(TTL * 2).unwrap();
        for o in repo.store().list("leases/web").await.unwrap() {
            repo.store().delete(&o.name).await.unwrap();
        }
        let second = Lease::acquire(&repo, "web", holder("b", 20), |_| true).await.unwrap();
        let lost = first.renew(|_| true).await.unwrap_err();
        assert!(lost.to_string().contains("on b (pid 20)"), "{lost}");
        second.release().await;
    }
}
