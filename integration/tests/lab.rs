//! Lab scenarios as Rust tests: each test runs `ci/lab run <scenario>`, which boots the L1 lab
//! machine under QEMU TCG and runs the scenario inside it (see `ci/README.md`).
//!
//! A lab run takes minutes and needs QEMU and the Debian images, so the tests run only when
//! `EXT_LAB=1` is set (`ci/test` sets it); otherwise each prints a SKIPPED line.

// Test fixtures unwrap: a panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
    // The runner itself boots L1 again when it hangs (QEMU TCG now and then stops with no
    // output at all, see PLATFORM.md; L1's heartbeat tells a hang from a guest working
    // silently), so any failure it reports fails the test.
    let runner = repo_root().join("ci").join("lab");
    let (success, last_line) = run_once(&runner, name, options);
    assert!(
        success,
        "lab scenario {name} failed ({last_line}); its console logs are .cache/lab-logs/{name}-*.log"
    );
}

/// Runs the lab runner once, streaming its output to ours; returns whether it passed and its
/// last line.
fn run_once(runner: &Path, name: &str, options: &[&str]) -> (bool, String) {
    let mut child = match Command::new(runner)
        .args(["run", name])
        .args(options)
        .stdout(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(error) => panic!("cannot start {}: {error}", runner.display()),
    };
    let mut last_line = String::new();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // --nocapture shows the lab console live.
            println!("{line}");
            if !line.trim().is_empty() {
                last_line = line;
            }
        }
    }
    let status = child
        .wait()
        .unwrap_or_else(|e| panic!("waiting for the lab runner: {e}"));
    (status.success(), last_line)
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
    run_scenario_with("snapshot-size", &["--memory", "4096", "--timeout", "1500"]);
}

#[test]
fn lab_ch_remote() {
    // Cloud Hypervisor's own ch-remote drives ext-vmm (ci/lab ships the stock v53.0 client).
    run_scenario("ch-remote");
}

/// In CI since 2026-12-04: the silences that kept it out (L1 "hung" in four of five attempts
/// on 2026-12-03) were L1 working in its kernel with QEMU busy, which `ci/lab` now waits out
/// (`--busy-silence`); the first run with it passed in 257 s.
#[test]
fn lab_balloon() {
    // vhost-user-mem beside ext-vmm (reporting, inflate, snapshots, restore, daemon restart) and
    // beside stock Cloud Hypervisor; three 512 MiB shared guests, one at a time, and snapshots.
    run_scenario_with("balloon", &["--memory", "3072", "--timeout", "1500"]);
}

#[test]
fn lab_ch_snapshot() {
    // The patched Cloud Hypervisor: snapshot-restore's guest and workload, copy and ondemand
    // restores, a second-generation snapshot, balloon pages typed Invalid.
    run_scenario_with("ch-snapshot", &["--timeout", "1500"]);
}

#[test]
fn lab_ch_vs_stock_off() {
    // Stock and patched Cloud Hypervisor side by side, shared=off: 512 MiB guests one at a
    // time, stock's dense 512 MiB memory-ranges in L1's tmpfs.
    run_scenario_with(
        "ch-vs-stock-off",
        &["--memory", "3072", "--timeout", "1500"],
    );
}

#[test]
fn lab_ch_vs_stock_on() {
    // The same with shared=on, in an L1 of its own (see ci/scenarios/ch-vs-stock-lib.sh).
    run_scenario_with("ch-vs-stock-on", &["--memory", "3072", "--timeout", "1500"]);
}

#[test]
fn lab_ch_balloon() {
    // vhost-user-mem beside the patched Cloud Hypervisor: reporting and stats negotiated,
    // memory returned, inflated pages Invalid in its snapshot, the balloon across a restore.
    run_scenario_with("ch-balloon", &["--memory", "3072", "--timeout", "1500"]);
}
