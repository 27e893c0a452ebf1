//! The fragment overlay against a byte-array model of a growing file: a point
//! holds the file's first bytes, then fragments ship what was appended, chunked at
//! random, with some fragments lost and some shippers restarting from an earlier
//! offset. At every fragment's moment the overlay must show a prefix of the file's
//! bytes, never a wrong byte, never shrinking as time goes on, and all of what was
//! shipped when every fragment continued the one before. Failing seeds are kept in
//! `proptest-regressions/overlay.txt`.

use std::collections::HashMap;

use catalog::tree::{Entry, EntryKind, Extent, Timestamp as TreeTime};
use catalog::{Fragment, FragmentBuilder, Growth, Id, PointRef, Repository, Secret, Store};
use jiff::{SignedDuration, Timestamp};
use proptest::prelude::*;
use proptest::sample::Index;

fn noise(n: usize, mut x: u64) -> Vec<u8> {
    x |= 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// How one fragment came to be.
#[derive(Debug, Clone)]
struct Ship {
    /// Where the shipped bytes end, within what the file has beyond the last end.
    end: Index,
    /// Chunk lengths, used in turn.
    chunks: Vec<u32>,
    /// 0: the fragment is lost; 1: the shipper restarted and ships from `from`;
    /// otherwise it ships on from where the last one ended.
    how: u8,
    from: Index,
    /// Whether another file grew in the same fragment.
    other: bool,
}

fn ship() -> impl Strategy<Value = Ship> {
    (any::<Index>(), prop::collection::vec(1u32..40_000, 1..5), 0u8..8, any::<Index>(), any::<bool>())
        .prop_map(|(end, chunks, how, from, other)| Ship { end, chunks, how, from, other })
}

/// `data[from..to]` chunked by `lens` in turn, each chunk stored through `b`.
fn chunked(
    b: &mut FragmentBuilder,
    data: &[u8],
    lens: &[u32],
    held: &mut HashMap<Id, Vec<u8>>,
) -> Vec<catalog::BlobRef> {
    let mut out = Vec::new();
    let mut at = 0;
    for &len in lens.iter().cycle() {
        if at >= data.len() {
            break;
        }
        let piece = &data[at..(at + len as usize).min(data.len())];
        let blob = b.store(piece);
        held.insert(blob.id, piece.to_vec());
        out.push(blob);
        at += piece.len();
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 200,
        failure_persistence: Some(Box::new(prop::test_runner::FileFailurePersistence::Direct(
            "proptest-regressions/overlay.txt",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_overlay_shows_a_prefix_of_the_file(
        total in 0usize..300_000,
        seed in any::<u64>(),
        point_end in any::<Index>(),
        point_chunk in 1u32..70_000,
        ships in prop::collection::vec(ship(), 0..8),
    ) {
        let data = noise(total, seed);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let repo = Repository::init(Store::memory(), &Secret::KeyFile([5; 32]), catalog::DEFAULT_KDF, "h".into())
                .await
                .unwrap()
                .0;
            let mut held = HashMap::new();
            let start = Timestamp::from_second(1_780_000_000).unwrap();
            let point = PointRef { name: "points/s/made-up".into(), source: "s".into(), time: start };
            // The point holds the file's first `l0` bytes.
            let l0 = point_end.index(total + 1);
            let mut builder = FragmentBuilder::new(&repo);
            let mut file = Entry::new(b"log".to_vec(), EntryKind::File);
            (file.device, file.inode, file.size) = (1, 7, l0 as u64);
            file.content =
                chunked(&mut builder, &data[..l0], &[point_chunk], &mut held).into_iter().map(Extent::Data).collect();

            let (mut shipped, mut last_size, mut whole) = (l0, l0 as u64, true);
            for (i, s) in ships.iter().enumerate() {
                let end = shipped + s.end.index(total - shipped + 1);
                let from = if s.how == 1 { s.from.index(shipped + 1) } else { shipped };
                let mut growths = Vec::new();
                let mut b = FragmentBuilder::new(&repo);
                if end > from {
                    let chunks = chunked(&mut b, &data[from..end], &s.chunks, &mut held);
                    growths.push(Growth { device: 1, inode: 7, from: from as u64, mtime: TreeTime { sec: i as i64, nsec: 0 }, chunks });
                }
                if s.other {
                    let chunks = chunked(&mut b, b"another file", &[5], &mut held);
                    growths.push(Growth { device: 1, inode: 8, from: 0, mtime: TreeTime::default(), chunks });
                }
                let t = start.checked_add(SignedDuration::from_secs(i as i64 + 1)).unwrap();
                if s.how != 0 {
                    b.commit(&repo, "s", t, &Fragment { growths }).await.unwrap();
                }
                whole &= s.how > 1 || (s.how == 1 && from == shipped);
                shipped = end;

                let overlay = repo.overlay(&point, t).await.unwrap();
                let mut e = file.clone();
                overlay.apply(&mut e);
                let mut shown = Vec::new();
                for x in &e.content {
                    match x {
                        Extent::Data(b) => shown.extend_from_slice(&held[&b.id]),
                        Extent::Hole(n) => shown.resize(shown.len() + *n as usize, 0),
                    }
                }
                prop_assert_eq!(shown.len() as u64, e.size, "size and extents disagree after fragment {}", i);
                prop_assert!(shown == data[..shown.len()], "wrong bytes after fragment {}", i);
                prop_assert!(e.size >= last_size, "the file shrank from {} to {} at fragment {}", last_size, e.size, i);
                if whole {
                    prop_assert_eq!(e.size, shipped as u64, "fragment {} continued the others, yet is not shown", i);
                }
                last_size = e.size;
            }
            Ok(())
        })?;
    }
}
