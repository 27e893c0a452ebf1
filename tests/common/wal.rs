//! PostgreSQL WAL made up for tests that need no server. Shared by the tests of the
//! `ebb` binary and streamer's fault tests (which include this file by path).

/// A WAL segment as archive_command hands it over, made up: a first page header
/// that names the timeline, the position, a cluster and 16 MiB segments, and
/// `fill` after it. No server needed.
pub fn fake_segment(tli: u32, segno: u64, fill: u8) -> Vec<u8> {
    let size: u64 = 16 << 20;
    let mut seg = vec![fill; size as usize];
    seg[..40].fill(0);
    seg[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
    seg[2..4].copy_from_slice(&2u16.to_le_bytes());
    seg[4..8].copy_from_slice(&tli.to_le_bytes());
    seg[8..16].copy_from_slice(&(segno * size).to_le_bytes());
    seg[24..32].copy_from_slice(&7_300_000_000_000_000_001u64.to_le_bytes());
    seg[32..36].copy_from_slice(&(size as u32).to_le_bytes());
    seg
}
