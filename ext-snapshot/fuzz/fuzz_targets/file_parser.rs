//! Fuzzes the snapshot file parser: any bytes must give `Ok` or a clean `Err`, never a
//! panic, a hang or an allocation the input does not justify. Valid inputs are then
//! verified and restored to a raw file, so the extent code runs too.
#![no_main]

use std::io::Write;

use ext_snapshot::{restore_to_raw_file, RawLayout, SnapshotFile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // SAFETY: memfd_create reads a static NUL-terminated name and returns a new descriptor.
    let fd = unsafe { libc::memfd_create(c"fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: `fd` is a fresh descriptor owned by nothing else.
    let mut file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.write_all(data).expect("writing the memfd");
    let Ok(snapshot) = SnapshotFile::from_file(file, std::path::Path::new("fuzz")) else {
        return;
    };
    if snapshot.verify_data().is_err() || snapshot.is_diff() {
        return;
    }
    // Bounded: the parser already checked the regions against the file's own length.
    let guest_bytes: u64 = snapshot.regions().iter().map(|r| r.size).sum();
    if guest_bytes > 64 << 20 {
        return;
    }
    // SAFETY: as above.
    let out_fd = unsafe { libc::memfd_create(c"fuzz-out".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(out_fd >= 0, "memfd_create failed");
    // SAFETY: `out_fd` is a fresh descriptor owned by nothing else.
    let out = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(out_fd) };
    restore_to_raw_file(&snapshot, &out, RawLayout::Packed).expect("a verified snapshot restores");
});
