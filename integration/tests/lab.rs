//! Lab scenarios as Rust tests: each test runs `ci/lab run <scenario>`, which boots the L1 lab
//! machine under QEMU TCG and runs the scenario inside it (see `ci/README.md`).
//!
//! A lab run takes minutes and needs QEMU and the Debian images, so the tests run only when
//! `EXT_LAB=1` is set (`ci/test` sets it); otherwise each prints a SKIPPED line.

// Test fixtures unwrap: a panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root: this crate lives in `integration/tests/`.
fn repo_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest_dir.to_path_buf())
}

/// Runs one scenario through the lab runner and fails the test unless the runner reports PASS
/// (its exit status is 0 only when its last line is `lab <scenario>: PASS`).
fn run_scenario(name: &str) {
    run_scenario_with(name, &[]);
}

/// Like [`run_scenario`], with extra `ci/lab run` options (e.g. a larger L1).
fn run_scenario_with(name: &str, options: &[&str]) {
    if std::env::var("EXT_LAB").as_deref() != Ok("1") {
        println!("SKIPPED: lab scenario {name} (set EXT_LAB=1 to run it)");
        return;
    }
    let runner = repo_root().join("ci").join("lab");
    // The runner streams the lab console to our stdout; --nocapture shows it live.
    let status = match Command::new(&runner)
        .args(["run", name])
        .args(options)
        .status()
    {
        Ok(status) => status,
        Err(error) => panic!("cannot start {}: {error}", runner.display()),
    };
    assert!(
        status.success(),
        "lab scenario {name} failed ({status}); its console log is .cache/lab-logs/{name}-latest.log"
    );
}

#[test]
fn lab_boot() {
    run_scenario("boot");
}

#[test]
fn lab_api() {
    run_scenario("api");
}

#[test]
fn lab_perm() {
    run_scenario("perm");
}

#[test]
fn lab_snapshot_restore() {
    run_scenario("snapshot-restore");
}

#[test]
fn lab_snapshot_size() {
    // Two 1 GiB guests and Cloud Hypervisor's dense memory file live in L1's RAM.
    // Four guests (ext-vmm and stock Cloud Hypervisor, shared=off and on), one at a time.
    run_scenario_with("snapshot-size", &["--memory", "4096", "--timeout", "1200"]);
}

#[test]
fn lab_ch_remote() {
    // Cloud Hypervisor's own ch-remote drives ext-vmm (ci/lab ships the stock v53.0 client).
    run_scenario("ch-remote");
}
