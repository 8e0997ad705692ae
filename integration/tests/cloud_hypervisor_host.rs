//! The patched Cloud Hypervisor v53.0 (`ci/build-cloud-hypervisor`, series in
//! `integration/cloud-hypervisor/`) on this host's `/dev/kvm`, with seccomp on (its default),
//! driven by its own `ch-remote`: `vm.snapshot` writes an ext-snapshot, copy and ondemand
//! restores continue the guest exactly where it was paused without populating pages that
//! hold no data, a corrupt or truncated snapshot never yields a VM, and a stock v53.0 binary
//! refuses a patched snapshot with a sentence saying why.
//!
//! The guest is `paced_guest`: 1 MiB of data pages, then a counter printing one letter per
//! step, so the serial output before the pause and after the restore must join up.

// Test helpers outside #[test] functions unwrap too: a panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ext_vmm_tests::cloud_hypervisor::{patched_bin, ChProcess};
use ext_vmm_tests::common::{kvm_available, skip, wait_for};
use ext_vmm_tests::counting_guest::{is_paced_output, paced_guest};
use ext_vmm_tests::test_kernel::pvh_elf;

const GUEST_MIB: u64 = 128;
const FILL: u32 = 1 << 20;

fn kernel(dir: &Path) -> PathBuf {
    let path = dir.join("paced.elf");
    std::fs::write(&path, pvh_elf(&paced_guest(FILL, 20_000))).unwrap();
    path
}

fn boot_args(kernel: &Path) -> Vec<String> {
    [
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        &format!("size={GUEST_MIB}M"),
        "--cpus",
        "boot=1",
        "--serial",
        "tty",
        "--console",
        "off",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn wait_serial(vm: &ChProcess, at_least: usize) {
    assert!(
        wait_for(Duration::from_secs(90), || vm.serial().len() >= at_least),
        "the guest printed {} of {at_least} letters; VMM log:\n{}",
        vm.serial().len(),
        vm.log()
    );
}

/// Boots the guest, lets it count, pauses it and snapshots it into `<dir>/snap`; the serial
/// output up to the pause.
fn snapshot(bin: &Path, dir: &Path) -> (PathBuf, Vec<u8>) {
    let vm = ChProcess::start(bin, dir, "source", &strs(&boot_args(&kernel(dir))));
    wait_serial(&vm, 10);
    vm.remote_ok(&["pause"]);
    let snap = dir.join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    vm.remote_ok(&["snapshot", &format!("file://{}", snap.display())]);
    let before = vm.serial();
    assert!(
        is_paced_output(&before),
        "{}",
        String::from_utf8_lossy(&before)
    );
    (snap, before)
}

fn restore(bin: &Path, dir: &Path, name: &str, snap: &Path, mode: &str) -> ChProcess {
    let source = format!(
        "source_url=file://{},memory_restore_mode={mode}",
        snap.display()
    );
    // -v: info-level log, where the ondemand handler reports its prefault.
    ChProcess::start(bin, dir, name, &["-v", "--restore", &source])
}

/// Resumes a restored VM and checks that its output continues `before` exactly.
fn resume_and_check(vm: &ChProcess, before: &[u8]) {
    vm.remote_ok(&["resume"]);
    wait_serial(vm, 10);
    let mut whole = before.to_vec();
    whole.extend(vm.serial());
    assert!(
        is_paced_output(&whole),
        "output does not continue across the restore: {} | {}",
        String::from_utf8_lossy(before),
        String::from_utf8_lossy(&vm.serial())
    );
}

fn setup(test: &str) -> Option<(PathBuf, tempfile::TempDir)> {
    if !kvm_available(test) {
        return None;
    }
    let bin = patched_bin(test)?;
    Some((bin, tempfile::tempdir().unwrap()))
}

#[test]
fn a_snapshot_is_an_ext_snapshot_and_a_copy_restore_continues() {
    let Some((bin, dir)) = setup("ch_copy_restore") else {
        return;
    };
    let (snap, before) = snapshot(&bin, dir.path());

    // Cloud Hypervisor's own files, and guest memory as an ext-snapshot instead of
    // memory-ranges; the state says so.
    for file in ["config.json", "state.json", ext_ch::MEMORY_FILE] {
        assert!(snap.join(file).is_file(), "{file} missing");
    }
    assert!(!snap.join("memory-ranges").exists());
    let state = std::fs::read_to_string(snap.join("state.json")).unwrap();
    assert!(
        state.contains(ext_ch::MEMORY_FORMAT),
        "no memory_format in state.json"
    );

    let figures = ext_ch::MemorySnapshot::open(&snap)
        .unwrap()
        .figures()
        .unwrap();
    println!("patched snapshot of a {GUEST_MIB} MiB guest: {figures:?}");
    assert!(
        figures.data_bytes >= u64::from(FILL),
        "the guest's data pages are stored"
    );
    assert!(
        figures.data_bytes < GUEST_MIB << 20 >> 3,
        "pages without data are not"
    );
    // The size target: data bytes × 1.01 + 64 KiB per GiB of guest memory.
    let allowance = figures.data_bytes / 100 + (64 << 10) * GUEST_MIB / 1024;
    assert!(
        figures.file_bytes <= figures.data_bytes + allowance,
        "{} bytes for {} data bytes",
        figures.file_bytes,
        figures.data_bytes
    );

    let vm = restore(&bin, dir.path(), "copy", &snap, "copy");
    resume_and_check(&vm, &before);
    // The extension endpoint reports the restore, by page type.
    let (status, answer) = vm.get("ext/vm.snapshot-figures");
    assert_eq!(status, 200, "{answer}");
    let body: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(body["restore"]["mode"], "copy");
    assert_eq!(body["restore"]["figures"]["data_pages"], figures.data_pages);
    assert_eq!(body["restore"]["pages_copied"], figures.data_pages);
    assert!(body["snapshot"].is_null());
    // A copy restore writes only data pages: the restored VMM holds far less than the
    // guest's memory (no speed asserted, only what is resident).
    let resident = vm.resident_guest_kib();
    assert!(resident < (GUEST_MIB << 10) / 2, "{resident} KiB resident");

    // The restored VM snapshots again, and that snapshot restores too.
    vm.remote_ok(&["pause"]);
    let again = dir.path().join("again");
    std::fs::create_dir_all(&again).unwrap();
    vm.remote_ok(&["snapshot", &format!("file://{}", again.display())]);
    let (status, answer) = vm.get("ext/vm.snapshot-figures");
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("\"mode\":\"snapshot\""), "{answer}");
    let mut upto = before.clone();
    upto.extend(vm.serial());
    drop(vm);
    let vm = restore(&bin, dir.path(), "again", &again, "copy");
    resume_and_check(&vm, &upto);
}

#[test]
fn an_ondemand_restore_continues_and_populates_only_data() {
    let Some((bin, dir)) = setup("ch_ondemand_restore") else {
        return;
    };
    let (snap, before) = snapshot(&bin, dir.path());
    let data_kib = ext_ch::MemorySnapshot::open(&snap)
        .unwrap()
        .figures()
        .unwrap()
        .data_bytes
        >> 10;
    let vm = restore(&bin, dir.path(), "ondemand", &snap, "ondemand");
    resume_and_check(&vm, &before);
    // The background prefault installs data pages only, then keeps serving faults.
    assert!(
        wait_for(Duration::from_secs(60), || vm
            .log()
            .contains("without data left to fault")),
        "prefault did not finish; log:\n{}",
        vm.log()
    );
    let resident = vm.resident_guest_kib();
    println!("ondemand restore: {resident} KiB resident for {data_kib} KiB of data");
    assert!(resident < (GUEST_MIB << 10) / 2, "{resident} KiB resident");
    assert!(vm.serial().len() >= 10);
}

#[test]
fn corrupt_or_truncated_snapshots_never_yield_a_vm() {
    let Some((bin, dir)) = setup("ch_corrupt_snapshot") else {
        return;
    };
    let (snap, _) = snapshot(&bin, dir.path());
    let memory = snap.join(ext_ch::MEMORY_FILE);
    let len = std::fs::metadata(&memory).unwrap().len();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&memory)
        .unwrap();
    // A byte of the tail (indexes, region table: refused when the file is opened, before
    // guest memory exists), then a byte of the first data extent (the structure is intact:
    // refused by the restore's checksum of the data, copied or served on demand).
    let first_data = 4096 + 100;
    for (at, what) in [(len - 2048, "tail"), (first_data, "data")] {
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, at).unwrap();
        file.write_all_at(&[byte[0] ^ 1], at).unwrap();
        for mode in ["copy", "ondemand"] {
            let case = format!("corrupt-{what}-{mode}");
            let mut vm = restore(&bin, dir.path(), &case, &snap, mode);
            let status = vm.wait_exit(Duration::from_secs(30));
            assert!(
                status.is_some_and(|s| !s.success()),
                "{case}: the VMM did not refuse the snapshot"
            );
            let log = vm.log();
            assert!(
                log.contains("ext-snapshot") && log.contains("checksum"),
                "{case}: {log}"
            );
        }
        file.write_all_at(&byte, at).unwrap();
    }
    file.set_len(len - 8192).unwrap();
    let mut vm = restore(&bin, dir.path(), "truncated", &snap, "copy");
    let status = vm.wait_exit(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| !s.success()),
        "truncated: not refused"
    );
    assert!(vm.log().contains("ext-snapshot"), "{}", vm.log());
}

#[test]
fn a_stock_binary_refuses_a_patched_snapshot_and_says_why() {
    let Some((bin, dir)) = setup("ch_stock_refusal") else {
        return;
    };
    let stock =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/cloud-hypervisor/stock/bin");
    if !stock.join("cloud-hypervisor").is_file() {
        skip(
            "ch_stock_refusal",
            "no stock Cloud Hypervisor (ci/build-cloud-hypervisor --stock)",
        );
        return;
    }
    let (snap, _) = snapshot(&bin, dir.path());
    let mut vm = restore(&stock, dir.path(), "stock", &snap, "copy");
    let status = vm.wait_exit(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| !s.success()),
        "stock restored a patched snapshot"
    );
    assert!(
        vm.log().contains("restore it with the patched"),
        "stock's error does not say why: {}",
        vm.log()
    );
}

#[test]
fn a_snapshot_asks_the_vhost_user_balloon_backend_for_its_invalid_pages() {
    let Some((bin, dir)) = setup("ch_vhost_user_control_socket") else {
        return;
    };
    let Some(daemon_bin) = ext_vmm_tests::daemon::daemon_binary() else {
        skip(
            "ch_vhost_user_control_socket",
            "the vhost-user-mem binary (cargo build -p vhost-user-mem)",
        );
        return;
    };
    let socket = dir.path().join("vu.sock");
    let api = dir.path().join("vu-api.sock");
    let _daemon = ext_vmm_tests::daemon::Daemon::start(&daemon_bin, &socket, &api);
    let kernel = kernel(dir.path());
    // The tiny guest has no balloon driver: the device is never activated, but the backend's
    // control API answers (an empty map), from the VMM thread under seccomp.
    for (name, control) in [
        ("answers", api.clone()),
        ("absent", dir.path().join("none.sock")),
    ] {
        let mut args = boot_args(&kernel);
        args[3] = format!("size={GUEST_MIB}M,shared=on");
        args.extend([
            "--generic-vhost-user".to_string(),
            format!(
                "device_type=balloon,socket={},queue_sizes=[256,256,256],control_socket={}",
                socket.display(),
                control.display()
            ),
        ]);
        let vm = ChProcess::start(&bin, dir.path(), name, &strs(&args));
        wait_serial(&vm, 10);
        vm.remote_ok(&["pause"]);
        let snap = dir.path().join(format!("snap-{name}"));
        std::fs::create_dir_all(&snap).unwrap();
        vm.remote_ok(&["snapshot", &format!("file://{}", snap.display())]);
        assert!(snap.join(ext_ch::MEMORY_FILE).is_file());
        let warned = vm.log().contains("invalid pages from");
        assert_eq!(warned, name == "absent", "{name}: log:\n{}", vm.log());
    }
}

#[test]
fn shared_memory_snapshots_and_restores_in_both_modes() {
    let Some((bin, dir)) = setup("ch_shared_memory") else {
        return;
    };
    let mut args = boot_args(&kernel(dir.path()));
    args[3] = format!("size={GUEST_MIB}M,shared=on");
    let vm = ChProcess::start(&bin, dir.path(), "shared", &strs(&args));
    wait_serial(&vm, 10);
    vm.remote_ok(&["pause"]);
    let snap = dir.path().join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    vm.remote_ok(&["snapshot", &format!("file://{}", snap.display())]);
    let before = vm.serial();
    drop(vm);
    let figures = ext_ch::MemorySnapshot::open(&snap)
        .unwrap()
        .figures()
        .unwrap();
    // The memfd's holes are never-populated pages: only what the guest wrote is data.
    assert!(figures.data_bytes < GUEST_MIB << 20 >> 3, "{figures:?}");
    for mode in ["copy", "ondemand"] {
        let vm = restore(&bin, dir.path(), &format!("shared-{mode}"), &snap, mode);
        resume_and_check(&vm, &before);
        let resident = vm.resident_guest_kib();
        assert!(
            resident < (GUEST_MIB << 10) / 2,
            "{mode}: {resident} KiB resident"
        );
    }
}
