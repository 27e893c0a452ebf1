//! A base backup's `pg` record (`catalog::PgInfo`): made from what the server said,
//! and read back. The catalog keeps its positions as PostgreSQL's text; this is
//! where they become positions.

use catalog::wal::Lsn;
use catalog::PgInfo;

use super::lsn;

/// The record of a base backup of cluster `system_id` on timeline `tli`, whose
/// recovery starts at `start` and is consistent at `stop`.
pub fn record(system_id: u64, tli: u32, start: Lsn, stop: Lsn, server_version: String, segment_size: u64) -> PgInfo {
    PgInfo {
        system_id,
        timeline: tli,
        start_lsn: lsn::text(start).to_string(),
        stop_lsn: lsn::text(stop).to_string(),
        server_version,
        segment_size,
    }
}

/// Where recovery from the backup starts.
pub fn start(pg: &PgInfo) -> Result<Lsn, String> {
    lsn::parse(&pg.start_lsn)
}

/// Where recovery from the backup starts, and where it is consistent.
pub fn wal_range(pg: &PgInfo) -> Result<(Lsn, Lsn), String> {
    Ok((start(pg)?, lsn::parse(&pg.stop_lsn)?))
}

/// `wal_range`, for `catalog::PruneOptions::wal_positions`.
pub fn wal_positions(pg: &PgInfo) -> Option<(Lsn, Lsn)> {
    wal_range(pg).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back() {
        let pg = record(7, 2, Lsn(0x2000028), Lsn(0x1_0200_0100), "15.18".into(), 16 << 20);
        assert_eq!((pg.start_lsn.as_str(), pg.stop_lsn.as_str()), ("0/2000028", "1/2000100"));
        assert_eq!(wal_range(&pg), Ok((Lsn(0x2000028), Lsn(0x1_0200_0100))));
        let bad = PgInfo { stop_lsn: "x".into(), ..pg.clone() };
        assert_eq!(start(&bad), Ok(Lsn(0x2000028)));
        assert!(wal_range(&bad).is_err());
    }
}
