//! Shared helpers for the end-to-end tests of the `ebb` binary.
//!
//! - [`tree`]: `build_fidelity_tree`, a directory tree with every case a backup
//!   tool must preserve, and a seeded PRNG for test data.
//! - [`compare`]: `compare_trees`, an lstat-based, entry-by-entry comparison of two
//!   trees (metadata, xattrs, contents, hard-link structure, sparseness).
//! - [`repo`]: `TestRepo`, a fresh repository on the `file://` or `s3://` backend
//!   (moto on loopback, started by `scripts/test`), a `Command` for the `ebb`
//!   binary with the right environment, and raw access to the stored objects.
//! - [`wal`]: a made-up WAL segment, for archiving without a server.
//! - [`tmpfs`]: `SmallFs`, a tmpfs of a given size for one test (a full
//!   filesystem, or a million files that a disk would take minutes to hold).
//! - [`s3`]: the S3 test server spoken to in raw HTTP (also used by catalog's store
//!   conformance suite).
//!
//! Every test file uses `mod common;`; not every test uses every helper.
#![allow(dead_code, unused_imports)]

pub mod compare;
pub mod pg;
pub mod repo;
pub mod s3;
pub mod tmpfs;
pub mod tree;
pub mod wal;

pub use compare::{assert_trees_equal, assert_trees_equal_with, compare_trees, compare_trees_with, CompareOptions};
pub use repo::{backends, Backend, TestRepo, TEST_PASSWORD};
pub use tmpfs::SmallFs;
pub use tree::{build_fidelity_tree, pseudo_random_bytes, FidelityInfo, XorShift};
