//! Diff snapshots: chains of a base and diffs, their resolution, restore and merge.
//!
//! A diff is written by [`SnapshotWriter::diff_against`](crate::SnapshotWriter::diff_against)
//! with a dirty page set; clean pages are recorded as `SameAsParent`. A [`SnapshotChain`] is a
//! base followed by diffs, each naming the previous one by id and content digest. Resolving a
//! chain gives, for every page, the newest layer that does not say `SameAsParent` — so a page
//! that was never populated in the base and written with zeros later stays `Zero`, distinct
//! from `NotPopulated`, through restore and [`SnapshotChain::merge`].

mod chain;
mod merge;

pub use chain::SnapshotChain;
pub use merge::restore_chain_eager;
// Defined by `restore`, which consumes segments; a chain produces them.
pub use crate::restore::Segment;
