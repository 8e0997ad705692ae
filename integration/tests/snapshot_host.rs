//! `vm.snapshot` and restore on this host's `/dev/kvm` with a tiny PVH guest.
//!
//! The guest keeps a counter in memory, prints one letter per step on COM1 (`'a' + count % 16`)
//! and powers off after `STEPS` steps, so its whole serial output is known in advance. A VM is
//! paused mid-run, snapshotted, and restored into new VMs in every memory mode; the output of
//! the original before the pause followed by the restored VM's output must be exactly the
//! expected output (memory, registers and device state all continued). Without `/dev/kvm`
//! every test prints a `SKIPPED:` line and returns.

// Test fixtures unwrap: a panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ext_snapshot::RestoreMode;
use ext_vmm::config::{SerialOutput, VmConfig};
use ext_vmm::exit::ExitReason;
use ext_vmm::slot::{SlotEvent, VmmSlot};
use ext_vmm::snapshot::{RestoreConfig, STATE_FILE};
use ext_vmm::Vmm;
use ext_vmm_api::{VmRestoreConfig, VmSnapshotConfig, VmState};

use ext_vmm_tests::common::{kvm_available, wait_for, Calls};
use ext_vmm_tests::counting_guest::{counting_guest, expected_output, STEPS};

fn config(dir: &Path) -> VmConfig {
    let kernel = dir.join("vmlinux");
    std::fs::write(
        &kernel,
        ext_vmm_tests::test_kernel::pvh_elf(&counting_guest()),
    )
    .unwrap();
    let mut config = VmConfig::new(kernel);
    config.memory_size = 64 << 20;
    config.memory_shared = true;
    config.serial = SerialOutput::File(dir.join("serial.out"));
    config
}

fn url(path: &Path) -> String {
    format!("file://{}", path.display())
}

fn serial_bytes(vmm: &Vmm) -> u64 {
    vmm.vm_counters().unwrap()["serial"]["tx_bytes"]
}

/// Runs `vmm` (already booted or restored) on a main-loop thread until `serial` holds more
/// than `at_least` bytes, pauses it and snapshots it into `snapshot`; the VM is then shut
/// down. Returns the serial output written so far.
fn run_pause_snapshot(vmm: Arc<Vmm>, at_least: u64, serial: &Path, snapshot: &Path) -> Vec<u8> {
    let main_loop = {
        let vmm = vmm.clone();
        std::thread::spawn(move || vmm.run_until_exit())
    };
    if vmm.state() == VmState::Paused {
        vmm.resume().unwrap();
    }
    assert!(
        wait_for(Duration::from_secs(120), || serial_bytes(&vmm) > at_least),
        "the guest did not run"
    );
    vmm.vm_pause().unwrap();
    let running = VmSnapshotConfig {
        destination_url: url(snapshot),
        ..Default::default()
    };
    vmm.vm_snapshot(&running).unwrap();
    let prefix = std::fs::read(serial).unwrap();
    assert!(
        (prefix.len() as u32) < STEPS,
        "the guest finished before the pause"
    );
    vmm.vm_shutdown().unwrap();
    assert_eq!(main_loop.join().unwrap().unwrap(), ExitReason::Requested);
    prefix
}

/// Restores `snapshot` in `mode` with the serial file cut back to `prefix`, runs the guest to
/// its power-off and checks the whole output.
fn restore_and_finish(snapshot: &Path, mode: RestoreMode, serial: &Path, prefix: &[u8]) {
    std::fs::write(serial, prefix).unwrap();
    let vmm = Vmm::restore(&RestoreConfig {
        source_url: url(snapshot),
        memory_restore_mode: mode,
        resume: true,
        page_server: None,
        serial: None,
    })
    .unwrap_or_else(|e| panic!("restore ({mode:?}): {e}"));
    assert_eq!(vmm.state(), VmState::Running);
    assert_eq!(vmm.run_until_exit().unwrap(), ExitReason::PowerOff);
    let output = std::fs::read(serial).unwrap();
    assert_eq!(
        output.len(),
        expected_output().len(),
        "{mode:?}: output length"
    );
    assert!(
        output == expected_output(),
        "{mode:?}: the guest did not continue exactly"
    );
    let counters = vmm.vm_counters().unwrap();
    assert!(counters["restore"]["data_pages"] > 0, "{counters:?}");
}

#[test]
fn a_snapshotted_guest_continues_exactly_in_every_restore_mode() {
    if !kvm_available("a_snapshotted_guest_continues_exactly_in_every_restore_mode") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let serial = dir.path().join("serial.out");
    let snapshot = dir.path().join("snap1");
    let vmm = Arc::new(Vmm::new(config).unwrap());
    vmm.boot().unwrap();
    let prefix = run_pause_snapshot(vmm.clone(), 2000, &serial, &snapshot);
    let info = vmm.vm_info().unwrap();
    assert!(info.snapshot.unwrap()["last_snapshot"]["pages"]["data"].as_u64() > Some(0));
    for mode in [RestoreMode::Eager, RestoreMode::Mapped, RestoreMode::Lazy] {
        restore_and_finish(&snapshot, mode, &serial, &prefix);
    }

    // Snapshot a restored VM again, and restore that.
    std::fs::write(&serial, &prefix).unwrap();
    let restored = Arc::new(
        Vmm::restore(&RestoreConfig {
            source_url: url(&snapshot),
            memory_restore_mode: RestoreMode::Lazy,
            resume: false,
            page_server: None,
            serial: None,
        })
        .unwrap(),
    );
    assert_eq!(restored.state(), VmState::Paused);
    let snapshot2 = dir.path().join("snap2");
    let prefix2 = run_pause_snapshot(restored, prefix.len() as u64 + 2000, &serial, &snapshot2);
    assert!(prefix2.len() > prefix.len() + 2000);
    // Pages the restored guest never touched (ACPI tables, boot data) are still data in the
    // second snapshot: an on-demand restore must not make them look never populated.
    let data_pages = |dir: &Path| {
        ext_snapshot::SnapshotFile::open(&dir.join("memory.ext-snapshot"))
            .unwrap()
            .pages_by_type()[ext_snapshot::PageType::Data as usize]
    };
    assert!(
        data_pages(&snapshot2) >= data_pages(&snapshot),
        "{} data pages in the re-snapshot, {} in the first",
        data_pages(&snapshot2),
        data_pages(&snapshot)
    );
    restore_and_finish(&snapshot2, RestoreMode::Eager, &serial, &prefix2);
}

fn snapshot_of_a_paused_guest(dir: &Path) -> PathBuf {
    let vmm = Arc::new(Vmm::new(config(dir)).unwrap());
    vmm.boot().unwrap();
    let snapshot = dir.join("snap");
    run_pause_snapshot(vmm, 100, &dir.join("serial.out"), &snapshot);
    snapshot
}

#[test]
fn damaged_snapshots_are_refused_before_a_vm_exists() {
    if !kvm_available("damaged_snapshots_are_refused_before_a_vm_exists") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snapshot = snapshot_of_a_paused_guest(dir.path());
    let restore = |what: &str| {
        let slot = VmmSlot::default();
        let error = slot
            .vm_restore(&VmRestoreConfig {
                source_url: url(&snapshot),
                memory_restore_mode: None,
                resume: None,
                page_server: None,
            })
            .expect_err(what);
        assert_eq!(error.status(), 400, "{what}: {error:?}");
        assert_eq!(slot.vm_info().unwrap_err().status(), 404, "{what}");
        error.messages.join(" ")
    };
    let state_path = snapshot.join(STATE_FILE);
    let state = std::fs::read(&state_path).unwrap();

    // A flipped digit inside the state: still JSON, but the checksum no longer matches.
    let text = String::from_utf8(state.clone()).unwrap();
    let at = text.find("\"regs\":[").unwrap() + 8;
    let mut flipped = text.into_bytes();
    flipped[at] = if flipped[at] == b'1' { b'2' } else { b'1' };
    std::fs::write(&state_path, &flipped).unwrap();
    assert!(restore("corrupt state").contains("checksum"));
    // Damage that no longer fits the state's types (a u64 register far out of range) is still
    // reported as damage: the checksum is checked on the raw bytes before typed parsing.
    let mut overflowed = state[..at].to_vec();
    overflowed.extend_from_slice(b"99999999999999999999999");
    overflowed.extend_from_slice(&state[at..]);
    std::fs::write(&state_path, &overflowed).unwrap();
    assert!(restore("out-of-range state").contains("checksum"));

    std::fs::write(&state_path, &state[..state.len() / 2]).unwrap();
    assert!(restore("truncated state").contains("corrupt or truncated"));

    let other =
        String::from_utf8(state.clone())
            .unwrap()
            .replacen("{\"version\":1,", "{\"version\":2,", 1);
    std::fs::write(&state_path, other).unwrap();
    assert!(restore("other version").contains("version 2"));

    std::fs::write(&state_path, &state).unwrap();
    let memory_path = snapshot.join("memory.ext-snapshot");
    let memory = std::fs::read(&memory_path).unwrap();
    std::fs::write(&memory_path, &memory[..memory.len() - 4096]).unwrap();
    restore("truncated memory");
    let mut corrupt = memory.clone();
    corrupt[10] ^= 0xff;
    std::fs::write(&memory_path, &corrupt).unwrap();
    restore("corrupt memory header");

    // The intact snapshot restores through the same slot, which then has a VM.
    std::fs::write(&memory_path, &memory).unwrap();
    let slot = VmmSlot::default();
    let body = VmRestoreConfig {
        source_url: url(&snapshot),
        memory_restore_mode: Some("mapped".into()),
        resume: None,
        page_server: None,
    };
    slot.vm_restore(&body).unwrap();
    assert_eq!(slot.vm_info().unwrap().state, VmState::Paused);
    assert_eq!(slot.vm_restore(&body).unwrap_err().status(), 405);
    let bad_mode = VmRestoreConfig {
        memory_restore_mode: Some("lazy".into()),
        ..body
    };
    assert_eq!(
        VmmSlot::default()
            .vm_restore(&bad_mode)
            .unwrap_err()
            .status(),
        400
    );
    let SlotEvent::Vm(vmm) = slot.wait_next(None) else {
        panic!("the slot has no VM after a restore");
    };
    let main_loop = std::thread::spawn(move || vmm.run_until_exit());
    slot.vm_shutdown().unwrap();
    assert_eq!(main_loop.join().unwrap().unwrap(), ExitReason::Requested);
}

#[test]
fn a_running_vm_cannot_be_snapshotted() {
    if !kvm_available("a_running_vm_cannot_be_snapshotted") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vmm = Arc::new(Vmm::new(config(dir.path())).unwrap());
    vmm.boot().unwrap();
    let main_loop = {
        let vmm = vmm.clone();
        std::thread::spawn(move || vmm.run_until_exit())
    };
    let request = VmSnapshotConfig {
        destination_url: url(&dir.path().join("snap")),
        ..Default::default()
    };
    let error = vmm.vm_snapshot(&request).unwrap_err();
    assert_eq!(error.status(), 405, "{error:?}");
    assert!(error.messages[0].contains("Running"), "{error:?}");
    assert!(!dir.path().join("snap").exists());
    let bad_url = VmSnapshotConfig {
        destination_url: "http://host/snap".into(),
        ..Default::default()
    };
    vmm.vm_pause().unwrap();
    assert_eq!(vmm.vm_snapshot(&bad_url).unwrap_err().status(), 400);
    vmm.vm_shutdown().unwrap();
    main_loop.join().unwrap().unwrap();
}

#[test]
fn a_diff_snapshot_restores_through_its_chain() {
    if !kvm_available("a_diff_snapshot_restores_through_its_chain") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let serial = dir.path().join("serial.out");
    let (full, diff) = (dir.path().join("full"), dir.path().join("diff"));
    let vmm = Arc::new(Vmm::new(config(dir.path())).unwrap());
    vmm.boot().unwrap();
    let main_loop = {
        let vmm = vmm.clone();
        std::thread::spawn(move || vmm.run_until_exit())
    };
    let snapshot = |to: &Path, parent: Option<&Path>| {
        vmm.vm_snapshot(&VmSnapshotConfig {
            destination_url: url(to),
            parent: parent.map(url),
        })
    };
    assert!(
        wait_for(Duration::from_secs(120), || serial_bytes(&vmm) > 1000),
        "the guest did not run"
    );
    vmm.vm_pause().unwrap();
    // No snapshot yet: there is no dirty log to diff with.
    assert_eq!(snapshot(&diff, Some(&full)).unwrap_err().status(), 400);
    snapshot(&full, None).unwrap();
    vmm.vm_resume().unwrap();
    let at = serial_bytes(&vmm);
    assert!(wait_for(Duration::from_secs(120), || serial_bytes(&vmm) > at + 1000));
    vmm.vm_pause().unwrap();
    let elsewhere = dir.path().join("elsewhere");
    assert_eq!(snapshot(&diff, Some(&elsewhere)).unwrap_err().status(), 400);
    snapshot(&diff, Some(&full)).unwrap();
    let counters = vmm.vm_counters().unwrap();
    // Only pages written since the full snapshot (the guest's counter) hold data.
    assert!(
        counters["snapshot"]["same_as_parent_pages"] > 10_000,
        "{counters:?}"
    );
    assert!(counters["snapshot"]["data_pages"] < 64, "{counters:?}");
    let prefix = std::fs::read(&serial).unwrap();
    vmm.vm_shutdown().unwrap();
    main_loop.join().unwrap().unwrap();

    let mapped = Vmm::restore(&RestoreConfig {
        source_url: url(&diff),
        memory_restore_mode: RestoreMode::Mapped,
        resume: false,
        page_server: None,
        serial: None,
    });
    assert!(mapped.is_err(), "a diff chain restores with copy only");
    restore_and_finish(&diff, RestoreMode::Eager, &serial, &prefix);
}

#[test]
fn vcpu_and_vm_state_round_trip_into_a_new_vm() {
    use ext_vmm::persist::{MachineState, VcpuState};
    use ext_vmm::vm::{configure_vcpu, create_kvm_vm};
    if !kvm_available("vcpu_and_vm_state_round_trip_into_a_new_vm") {
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let (_, vm) = create_kvm_vm().unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    configure_vcpu(&kvm, &vcpu, 0, 1).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    (regs.rax, regs.rbx, regs.r15, regs.rip) = (0x1111, 0x2222, 0xfeed_f00d, 0x10_0000);
    vcpu.set_regs(&regs).unwrap();
    let saved = VcpuState::save(&kvm, &vcpu, 0).unwrap();
    let machine = MachineState::save(&vm).unwrap();
    assert!(!saved.msrs.is_empty(), "no MSR could be read back");
    // Through JSON, as state.json carries it.
    let saved: VcpuState = serde_json::from_slice(&serde_json::to_vec(&saved).unwrap()).unwrap();
    let machine: MachineState =
        serde_json::from_slice(&serde_json::to_vec(&machine).unwrap()).unwrap();

    let (_, vm2) = create_kvm_vm().unwrap();
    let vcpu2 = vm2.create_vcpu(0).unwrap();
    saved.restore(&vcpu2).unwrap();
    machine.restore(&vm2).unwrap();
    let again = VcpuState::save(&kvm, &vcpu2, 0).unwrap();
    let json = |value: &dyn erased::Json| value.to_json();
    assert_eq!(json(&again.regs), json(&saved.regs));
    assert_eq!(json(&again.sregs), json(&saved.sregs));
    assert_eq!(json(&again.xcrs), json(&saved.xcrs));
    assert_eq!(json(&again.debug_regs), json(&saved.debug_regs));
    assert_eq!(json(&again.mp_state), json(&saved.mp_state));
    assert_eq!(json(&again.xsave), json(&saved.xsave));
    assert_eq!(json(&again.lapic), json(&saved.lapic));
    assert_eq!(again.cpuid.len(), saved.cpuid.len());
    // Every MSR comes back, with its value, except the ones that count time.
    const TIME_MSRS: [u32; 3] = [0x10, 0x6e0, 0x3b];
    let values = |state: &VcpuState| {
        state
            .msrs
            .iter()
            .filter(|m| !TIME_MSRS.contains(&m.index))
            .map(|m| (m.index, m.data))
            .collect::<Vec<_>>()
    };
    assert_eq!(values(&again), values(&saved));
    let again_machine = MachineState::save(&vm2).unwrap();
    assert_eq!(
        serde_json::to_value(&again_machine.irqchips).unwrap(),
        serde_json::to_value(&machine.irqchips).unwrap()
    );
}

/// Serializes KVM structures for comparison (they implement neither `PartialEq` nor `Clone`).
mod erased {
    pub trait Json {
        fn to_json(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap()
        }
    }
}

#[test]
fn an_empty_vmm_answers_over_http_until_a_restore() {
    use ext_vmm_api::{start_api_server, ApiClient};
    // No KVM needed: every request is answered before a VM would be created.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let slot = Arc::new(VmmSlot::default());
    let server = start_api_server(&socket, slot.clone()).unwrap();
    let mut client = ApiClient::connect(&socket).unwrap();
    let mut request = |method: &str, endpoint: &str, body: Option<&str>| {
        client
            .request(method, endpoint, body.map(str::as_bytes))
            .unwrap()
    };
    assert_eq!(request("GET", "vm.info", None).status, 404);
    assert_eq!(request("PUT", "vm.pause", None).status, 404);
    let snapshot = request(
        "PUT",
        "vm.snapshot",
        Some(r#"{"destination_url":"file:///x"}"#),
    );
    assert_eq!(snapshot.status, 404);
    let missing = format!(
        r#"{{"source_url":"file://{}/none","memory_restore_mode":"ondemand"}}"#,
        dir.path().display()
    );
    let response = request("PUT", "vm.restore", Some(&missing));
    assert_eq!(response.status, 400, "{}", response.body_text());
    assert!(
        response.body_text().contains("config.json"),
        "{}",
        response.body_text()
    );
    let bad_url = request(
        "PUT",
        "vm.restore",
        Some(r#"{"source_url":"s3://bucket/x"}"#),
    );
    assert_eq!(bad_url.status, 400);
    let no_url = request("PUT", "vm.restore", Some(r#"{"resume":true}"#));
    assert_eq!(no_url.status, 400);
    assert_eq!(request("GET", "vmm.ping", None).status, 200);
    assert_eq!(request("PUT", "vmm.shutdown", None).status, 204);
    assert!(matches!(slot.wait_next(None), SlotEvent::Exit));
    server.shutdown();
}

#[test]
fn an_ondemand_restore_whose_data_goes_bad_ends_the_vm_with_the_error() {
    if !kvm_available("an_ondemand_restore_whose_data_goes_bad_ends_the_vm_with_the_error") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let serial = dir.path().join("serial.out");
    let snapshot = dir.path().join("snap");
    let vmm = Arc::new(Vmm::new(config(dir.path())).unwrap());
    vmm.boot().unwrap();
    run_pause_snapshot(vmm, 2000, &serial, &snapshot);

    // Restored paused: nothing has been served yet. Then every data extent is damaged, so
    // the first page the guest touches fails its checksum in the userfaultfd handler.
    let restored = Vmm::restore(&RestoreConfig {
        source_url: url(&snapshot),
        memory_restore_mode: RestoreMode::Lazy,
        resume: false,
        page_server: None,
        serial: None,
    })
    .unwrap();
    let memory = snapshot.join("memory.ext-snapshot");
    let extents: Vec<_> = ext_snapshot::SnapshotFile::open(&memory)
        .unwrap()
        .regions()
        .iter()
        .flat_map(|r| r.runs.iter().filter_map(|run| run.extent))
        .collect();
    assert!(!extents.is_empty());
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&memory)
        .unwrap();
    for extent in extents {
        std::os::unix::fs::FileExt::write_all_at(&file, &[0x5a; 8], extent.offset).unwrap();
    }
    drop(file);
    let restored = Arc::new(restored);
    let main_loop = {
        let vmm = restored.clone();
        std::thread::spawn(move || vmm.run_until_exit())
    };
    restored.resume().unwrap();
    let reason = main_loop.join().unwrap().unwrap();
    match reason {
        ExitReason::Error(message) => assert!(
            message.contains("on-demand restore failed") && message.contains("checksum"),
            "{message}"
        ),
        other => panic!("the VM ended with {other:?}, not the restore's error"),
    }
}
