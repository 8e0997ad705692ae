//! Helpers shared by the host-level test crates that run guests on `/dev/kvm`.
// Each test crate uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

/// True when `/dev/kvm` exists; otherwise prints the loud SKIPPED line for `test`.
pub fn kvm_available(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    println!("SKIPPED: {test}: /dev/kvm not available");
    false
}

/// Polls `condition` until it holds or `limit` passes; returns whether it held. The limit is
/// generous, only so that a broken build fails instead of hanging: no speed is asserted.
pub fn wait_for(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}
