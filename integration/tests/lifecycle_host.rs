//! A VM's whole life through the API requests a Cloud Hypervisor client sends, on this host's
//! `/dev/kvm` with a tiny guest: `vm.create` into an empty VMM, `vm.boot`, `vm.reboot` (a
//! fresh VM from the same configuration), `vm.delete`, a second `vm.create`, and
//! `vmm.shutdown` ending the process's main loop. Without `/dev/kvm` it prints SKIPPED (and
//! fails with `EXT_REQUIRE_ALL=1`).

// Test fixtures unwrap: a panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ext_vmm::slot::VmmSlot;
use ext_vmm_api::{ApiRequest, OutputMode, RequestHandler, VmCreateConfig, VmState};
use ext_vmm_tests::common::{kvm_available, wait_for, Calls};

/// `out 0x3f8, 'x'` forever: the serial file grows while the guest runs.
fn chatty_guest() -> Vec<u8> {
    vec![
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'x', // mov al, 'x'
        0xee, // out dx, al
        0xeb, 0xfd, // jmp back to the out
    ]
}

fn create_config(dir: &Path, serial: &Path) -> VmCreateConfig {
    let kernel = dir.join("vmlinux");
    std::fs::write(
        &kernel,
        ext_vmm_tests::test_kernel::pvh_elf(&chatty_guest()),
    )
    .unwrap();
    VmCreateConfig {
        kernel: kernel.display().to_string(),
        initramfs: None,
        cmdline: None,
        boot_vcpus: 1,
        memory_size: 64 << 20,
        memory_shared: false,
        serial: OutputMode::File(serial.display().to_string()),
        console: OutputMode::Off,
        disks: Vec::new(),
        generic_vhost_user: Vec::new(),
    }
}

fn state(slot: &VmmSlot) -> Option<VmState> {
    slot.vm_info().ok().map(|info| info.state)
}

fn serial_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

#[test]
fn create_boot_reboot_delete_create_and_shut_down() {
    if !kvm_available("create_boot_reboot_delete_create_and_shut_down") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let serial = dir.path().join("serial.out");
    let slot = Arc::new(VmmSlot::default());
    let main_loop = {
        let slot = slot.clone();
        std::thread::spawn(move || slot.run(false, true))
    };
    let limit = Duration::from_secs(60);

    assert_eq!(slot.vm_info().unwrap_err().status(), 404);
    let config = create_config(dir.path(), &serial);
    slot.empty(ApiRequest::VmCreate(Box::new(config.clone())))
        .unwrap();
    assert_eq!(state(&slot), Some(VmState::Created));
    // A second create is refused while the first VM exists.
    let twice = slot
        .empty(ApiRequest::VmCreate(Box::new(config.clone())))
        .unwrap_err();
    assert_eq!(twice.status(), 405, "{twice:?}");
    // Nothing runs before vm.boot.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(serial_len(&serial), 0);

    slot.empty(ApiRequest::VmBoot).unwrap();
    assert!(
        wait_for(limit, || serial_len(&serial) > 1000),
        "the guest did not run"
    );
    assert_eq!(state(&slot), Some(VmState::Running));

    // A reboot is a new VM from the same configuration: the running one stops, the new one
    // starts from the kernel's entry, and its counters start from zero.
    let before = slot.vm_counters().unwrap()["serial"]["tx_bytes"];
    slot.empty(ApiRequest::VmReboot).unwrap();
    assert_eq!(state(&slot), Some(VmState::Running));
    let after = slot.vm_counters().unwrap()["serial"]["tx_bytes"];
    assert!(
        after < before,
        "the rebooted VM kept the old counters ({before} -> {after})"
    );
    let length = serial_len(&serial);
    assert!(
        wait_for(limit, || serial_len(&serial) > length + 1000),
        "the rebooted guest does not run"
    );

    slot.empty(ApiRequest::VmDelete).unwrap();
    assert_eq!(slot.vm_info().unwrap_err().status(), 404);
    let length = serial_len(&serial);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(serial_len(&serial), length, "the deleted VM still runs");

    // The process serves on: another VM can be created, and deleted before it boots.
    slot.empty(ApiRequest::VmCreate(Box::new(config))).unwrap();
    assert_eq!(state(&slot), Some(VmState::Created));
    slot.empty(ApiRequest::VmDelete).unwrap();
    assert!(slot.handle(ApiRequest::VmBoot).is_err());

    slot.vmm_shutdown().unwrap();
    main_loop.join().unwrap().unwrap();
}
