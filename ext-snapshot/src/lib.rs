//! Sparse VM memory snapshots (patent EP2755132).
//!
//! `ext-snapshot` records the type of every guest page — never populated, balloon or
//! free-page-reported, all-zero, or data — and stores data only for data pages. It works on
//! guest memory through the `vm-memory` traits, so a VMM (Cloud Hypervisor, the reference
//! `ext-vmm`, the `vhost-user-mem` daemon) hands it its `GuestMemoryMmap` and gets back a
//! snapshot that is smaller and faster to write and restore than a full dump. The on-disk and
//! on-wire encodings are specified in `FORMAT.md` next to this crate.
