//! Sparse VM memory snapshots (patent EP2755132).
//!
//! `ext-snapshot` records the type of every guest page — never populated, balloon or
//! free-page-reported, all-zero, or data — and stores data only for data pages. It works on
//! guest memory through the `vm-memory` traits, so a VMM (Cloud Hypervisor, the reference
//! `ext-vmm`, the `vhost-user-mem` daemon) hands it its `GuestMemoryMmap` and gets back a
//! snapshot that is smaller and faster to write and restore than a full dump. The on-disk and
//! on-wire encodings are specified in `FORMAT.md` next to this crate.
//!
//! Entry points:
//! - write: [`SnapshotWriter`] (file or stream; standalone or diff);
//! - read: [`SnapshotFile`] (validated file), [`StreamReader`] (validated record by record);
//! - restore: [`restore_eager`], [`restore_stream`], [`restore_stream_staged`],
//!   [`restore_to_raw_file`] (the mapped and lazy modes build on [`SnapshotFile`]);
//! - diffs: [`SnapshotChain`] (validate, resolve, restore, merge);
//! - conversion: [`stream_to_file`], [`file_to_stream`];
//! - sparse files: [`sparse`] (`SEEK_DATA`/`SEEK_HOLE` extents, with a dense fallback).
//!
//! The default build is only what a VMM links: no command line, no benchmark code (those are
//! the `ext-snapshot` binary's, behind the `cli` feature; see the README's "Features").

pub mod cloud_hypervisor;
pub mod convert;
pub mod diff;
pub mod error;
pub mod file_io;
pub mod format;
pub mod page_type;
pub mod reader;
pub mod residency;
pub mod restore;
pub mod sparse;
pub mod writer;

pub use convert::{file_to_stream, stream_to_file};
pub use diff::{restore_chain_eager, Segment, SnapshotChain};
pub use error::{Error, Result};
pub use format::{Extent, FileLayout, Header, ParentRef, Region, Run, SnapshotId, PAGE_SIZE};
pub use page_type::{is_zero_page, PageType};
pub use reader::{SnapshotFile, StreamReader, StreamRecord};
pub use restore::{
    fresh_memory, restore_eager, restore_stream, restore_stream_staged, restore_to_raw_file,
    EagerOptions, RawLayout, RestoreMode, RestoreReport,
};
pub use writer::{
    GfnBitmap, GfnSet, MemoryDirtyBitmap, PageSet, RegionBitmaps, SnapshotReport, SnapshotWriter,
    WriteOptions,
};
