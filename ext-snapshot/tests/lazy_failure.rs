//! A lazy restore whose handler fails after setup (an extent damaged once the snapshot was
//! opened and validated): the faulting thread is held, not handed zeros, until the caller's
//! failure hook has run, and the failure is reported.

// Test fixtures unwrap: a panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use ext_snapshot::restore::lazy::{restore_lazy_with_hook, FAILURE_GRACE};
use ext_snapshot::{SnapshotFile, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress};

mod restore_fixture;
use restore_fixture::*;

fn userfaultfd_available(test: &str) -> bool {
    if userfaultfd::UffdBuilder::new()
        .close_on_exec(true)
        .create()
        .is_ok()
    {
        return true;
    }
    assert!(
        std::env::var("EXT_REQUIRE_ALL").as_deref() != Ok("1"),
        "{test}: userfaultfd not available, and EXT_REQUIRE_ALL=1 says it must be"
    );
    println!("SKIPPED: {test}: userfaultfd not available");
    false
}

#[test]
fn an_extent_damaged_after_open_stops_the_guest_instead_of_serving_zeros() {
    if !userfaultfd_available(
        "an_extent_damaged_after_open_stops_the_guest_instead_of_serving_zeros",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.snap");
    let fixture = fixture(41);
    snapshot(&fixture, &path);
    let run = SnapshotFile::open(&path).unwrap().regions()[0]
        .runs
        .iter()
        .find(|r| r.extent.is_some())
        .copied()
        .unwrap();
    let extent = run.extent.unwrap();

    let (failed, failures) = mpsc::channel();
    let restore = restore_lazy_with_hook::<()>(
        &path,
        Box::new(move |error| {
            let _ = failed.send(error.to_string());
        }),
    )
    .unwrap();
    // Damage the extent now: setup validated the structure, the data is checked on first use.
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&[0xa5; 16], extent.offset + 100).unwrap();
    drop(file);

    let memory = restore.memory().clone();
    let touched = Arc::new(AtomicBool::new(false));
    let guest = {
        let touched = touched.clone();
        std::thread::spawn(move || {
            let mut page = vec![0u8; PAGE_SIZE as usize];
            let result = memory.read_slice(&mut page, GuestAddress(run.first_page * PAGE_SIZE));
            touched.store(true, Ordering::SeqCst);
            (result.is_ok(), page)
        })
    };
    let error = failures
        .recv_timeout(Duration::from_secs(30))
        .expect("the failure hook was not called");
    assert!(error.contains("checksum"), "{error}");
    // The hook ran while the faulting thread was still held: it had read nothing yet.
    assert!(
        !touched.load(Ordering::SeqCst),
        "the faulting thread went on before the caller heard of the failure"
    );
    assert!(restore.failure().is_some_and(|f| f.contains("checksum")));
    // Letting go of the restore releases the held fault; the caller has stopped its guest by
    // then, so what the thread reads no longer matters — only that it does not hang.
    let started = std::time::Instant::now();
    drop(restore);
    let (_read, _page) = guest.join().unwrap();
    assert!(started.elapsed() < FAILURE_GRACE + Duration::from_secs(30));
}
