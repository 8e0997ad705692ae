//! `ext-vmm-bench` runs end to end: with a tiny iteration count on `/dev/kvm` every row of its
//! table is printed; without `/dev/kvm` it prints its `SKIPPED:` line and exits 0. It also
//! summarises a lab log given with `--lab-log`. `vhost-user-mem-bench` runs at a tiny scale
//! against the real daemon binary and prints every figure. No timing is checked (issues 2, 9).

// Test fixtures unwrap: a panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROWS: [&str; 8] = [
    "pio-noop",
    "pio-serial",
    "mmio-virtio-magic",
    "mmio-unclaimed",
    "no-exit-floor",
    "pause",
    "resume-to-running",
    "pause+resume",
];

/// Runs `ext-vmm-bench` with `args`; see [`run_program`].
fn run_bench(args: &[&str]) -> (bool, String, String) {
    run_program(env!("CARGO_BIN_EXE_ext-vmm-bench"), args)
}

/// Runs `program` with `args`; returns (success, stdout, stderr). The child is killed if it
/// outlives a generous bound, so a hang fails the test instead of leaving a process behind.
fn run_program(program: &str, args: &[&str]) -> (bool, String, String) {
    let mut child = Command::new(program)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the bench");
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the bench") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{program} {args:?} did not finish in 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (mut stdout, mut stderr) = (String::new(), String::new());
    if let Some(mut out) = child.stdout.take() {
        out.read_to_string(&mut stdout).expect("read stdout");
    }
    if let Some(mut err) = child.stderr.take() {
        err.read_to_string(&mut stderr).expect("read stderr");
    }
    (status.success(), stdout, stderr)
}

#[test]
fn bench_prints_every_row_or_skips() {
    let (ok, stdout, stderr) = run_bench(&[
        "--iterations",
        "50",
        "--repetitions",
        "2",
        "--pause-rounds",
        "3",
    ]);
    assert!(ok, "ext-vmm-bench failed:\n{stdout}\n{stderr}");
    if !Path::new("/dev/kvm").exists() {
        // .ci/run sets EXT_REQUIRE_ALL=1: there a missing environment is a failure.
        assert!(
            std::env::var("EXT_REQUIRE_ALL").as_deref() != Ok("1"),
            "EXT_REQUIRE_ALL=1, but this test would be skipped: {}",
            format_args!("SKIPPED: bench_prints_every_row_or_skips: /dev/kvm not available")
        );
        println!("SKIPPED: bench_prints_every_row_or_skips: /dev/kvm not available");
        assert!(
            stdout.contains("SKIPPED: ext-vmm-bench: /dev/kvm not available"),
            "{stdout}"
        );
        return;
    }
    for row in ROWS {
        let line = stdout
            .lines()
            .find(|line| line.split_whitespace().next() == Some(row))
            .unwrap_or_else(|| panic!("no row {row} in:\n{stdout}"));
        // name, samples, median, p99, host/iter, ratio: counts and numbers, not their values.
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells.len(), 6, "{line}");
        let samples: usize = cells[1].parse().expect("sample count");
        let expected = if row.starts_with("pause") || row.starts_with("resume") {
            3
        } else {
            100
        };
        assert_eq!(samples, expected, "{line}");
        for cell in [cells[2], cells[3], cells[5]] {
            cell.parse::<f64>()
                .unwrap_or_else(|_| panic!("not a number: {cell} in {line}"));
        }
    }
}

#[test]
fn bench_refuses_a_zero_iteration_count() {
    if !Path::new("/dev/kvm").exists() {
        // .ci/run sets EXT_REQUIRE_ALL=1: there a missing environment is a failure.
        assert!(
            std::env::var("EXT_REQUIRE_ALL").as_deref() != Ok("1"),
            "EXT_REQUIRE_ALL=1, but this test would be skipped: {}",
            format_args!("SKIPPED: bench_refuses_a_zero_iteration_count: /dev/kvm not available")
        );
        println!("SKIPPED: bench_refuses_a_zero_iteration_count: /dev/kvm not available");
        return;
    }
    let (ok, stdout, stderr) = run_bench(&["--iterations", "0", "--pause-rounds", "1"]);
    assert!(!ok, "zero iterations accepted:\n{stdout}");
    assert!(stderr.contains("iterations must be"), "{stderr}");
}

#[test]
fn bench_summarises_an_l2_qemu_lab_log() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("l2-qemu.log");
    std::fs::write(
        &log,
        "Booting from ROM..EXT-L1-READY uptime=4.50 kvm=ok\n\
         EXT-METRIC l2_boot_s=10.00 vmm=qemu round=1 (start to EXT-L2-INIT, L1 clock)\n\
         EXT-METRIC l2_boot_s=8.00 vmm=ext-vmm round=2 (start to EXT-L2-INIT, L1 clock)\n\
         EXT-METRIC l2_boot_s=7.00 vmm=ext-vmm round=3 (start to EXT-L2-INIT, L1 clock)\n\
         EXT-METRIC l2_boot_s=10.00 vmm=qemu round=4 (start to EXT-L2-INIT, L1 clock)\n\
         EXT-METRIC l2_boot_ratio=0.75 (ext-vmm / qemu)\n\
         EXT-SCENARIO-RESULT: PASS\n",
    )
    .expect("write log");
    let log = log.to_str().expect("utf-8 temp path");
    let (ok, stdout, stderr) = run_bench(&[
        "--iterations",
        "10",
        "--repetitions",
        "1",
        "--pause-rounds",
        "1",
        "--lab-log",
        log,
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("L1 ready (kvm loaded) at L1 uptime 4.50 s"),
        "{stdout}"
    );
    assert!(stdout.contains("10.00  10.00 10.00"), "{stdout}");
    assert!(stdout.contains("7.50  8.00 7.00"), "{stdout}");
    assert!(
        stdout.contains("L2 boot ratio ext-vmm / qemu: 0.75 (scenario reported 0.75)"),
        "{stdout}"
    );
    assert!(stdout.contains("scenario result: PASS"), "{stdout}");

    std::fs::write(dir.path().join("empty.log"), "no metrics\n").expect("write log");
    let empty = dir.path().join("empty.log");
    let (ok, _, stderr) = run_bench(&[
        "--pause-rounds",
        "1",
        "--iterations",
        "10",
        "--lab-log",
        empty.to_str().expect("utf-8 temp path"),
    ]);
    assert!(!ok, "a log without metrics must fail");
    assert!(stderr.contains("no l2_boot_s metrics"), "{stderr}");
}

/// The `vhost-user-mem` binary next to the bench, or `None` after printing why the test skips
/// (it is built with the workspace: `cargo build -p vhost-user-mem`).
fn vhost_user_mem_daemon(test: &str) -> Option<std::path::PathBuf> {
    let daemon =
        Path::new(env!("CARGO_BIN_EXE_vhost-user-mem-bench")).with_file_name("vhost-user-mem");
    if daemon.is_file() {
        return Some(daemon);
    }
    ext_vmm_tests::common::skip(
        test,
        &format!(
            "no {} (build it: cargo build -p vhost-user-mem)",
            daemon.display()
        ),
    );
    None
}

#[test]
fn vhost_user_mem_bench_prints_every_figure() {
    let Some(daemon) = vhost_user_mem_daemon("vhost_user_mem_bench_prints_every_figure") else {
        return;
    };
    let daemon = daemon.to_str().expect("utf-8 target path");
    let (ok, stdout, stderr) = run_program(
        env!("CARGO_BIN_EXE_vhost-user-mem-bench"),
        &["--scale", "0.01", "--rounds", "1", "--daemon", daemon],
    );
    assert!(ok, "vhost-user-mem-bench failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("st_blocks dropped by exactly the reported and the inflated bytes"),
        "{stdout}"
    );
    let line = |prefix: &str| -> &str {
        stdout
            .lines()
            .find(|line| line.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?} in:\n{stdout}"))
    };
    // Numbers, not their values: the ratio after "ratio " parses.
    for prefix in [
        "reporting throughput:",
        "inflate cost:",
        "daemon snapshot time vs ext-vmm's in-process writer:",
        "page-server fault latency, ascending pass:",
        "page-server fault latency vs ext-snapshot's in-process lazy restore:",
    ] {
        let figure = line(prefix);
        let ratio = figure
            .split("ratio ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no ratio in {figure}"));
        ratio
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("not a number: {ratio} in {figure}"));
    }
    for prefix in [
        "daemon resident memory: VmRSS",
        "daemon resident memory after its snapshot: VmRSS",
    ] {
        let resident = line(prefix);
        assert!(
            resident.ends_with(": MET") || resident.ends_with(": NOT MET"),
            "{resident}"
        );
        assert!(
            resident.contains("bitmap 0.3 KiB"),
            "10 MiB of guest pages: {resident}"
        );
    }
    // Both snapshots of every round held the same pages, and the ballooned ones are invalid.
    let mix = line("snapshot memory:");
    assert!(
        mix.contains("the same counts and length in every round"),
        "{mix}"
    );
    assert!(!mix.contains(" 0 invalid pages"), "{mix}");
    for prefix in [
        "daemon snapshot time vs ext-vmm's in-process writer:",
        "page-server fault latency vs ext-snapshot's in-process lazy restore:",
    ] {
        let figure = line(prefix);
        assert!(figure.contains("target <="), "{figure}");
        assert!(
            figure.ends_with(": MET") || figure.ends_with(": NOT MET"),
            "{figure}"
        );
    }
    // The daemon went away with the bench.
    let pid = stdout
        .split("(pid ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .expect("the daemon's pid");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "daemon {pid} left running"
    );
}

#[test]
fn vhost_user_mem_bench_refuses_bad_arguments() {
    for (args, message) in [
        (&["--scale", "0"][..], "--scale must be in (0, 64]"),
        (&["--rounds", "0"], "--rounds must be at least 1"),
        (
            &["--scale", "0.01", "--daemon", "/nonexistent/vhost-user-mem"],
            "starting /nonexistent/vhost-user-mem",
        ),
    ] {
        let (ok, stdout, stderr) = run_program(env!("CARGO_BIN_EXE_vhost-user-mem-bench"), args);
        assert!(!ok, "{args:?} accepted:\n{stdout}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}
