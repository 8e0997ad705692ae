//! ext-vmm's vCPU setup and exit loop on this host's `/dev/kvm`, with tiny hand-built guests.
//!
//! Each guest is a few 32-bit instructions entered exactly like a PVH kernel (the same GDT,
//! segment and register setup `ext-vmm` uses), run by the VMM's own exit loop against its own
//! buses and devices. No in-kernel irqchip is created, so a guest `hlt` ends the run.
//! Where `/dev/kvm` is missing every test prints a `SKIPPED:` line and returns.

// Test fixtures unwrap: a panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ext_snapshot::{
    restore_chain_eager, EagerOptions, PageType, RegionBitmaps, SnapshotChain, SnapshotFile,
    SnapshotWriter, WriteOptions,
};
use ext_vmm::bus::{Bus, BusDevice};
use ext_vmm::config::{DiskConfig, SerialOutput, VmConfig};
use ext_vmm::cpu;
use ext_vmm::devices::legacy::AcpiPm;
use ext_vmm::devices::serial::SerialDevice;
use ext_vmm::devices::IrqTrigger;
use ext_vmm::exit::{ExitEvent, ExitReason};
use ext_vmm::memory::{
    create_guest_memory, enable_dirty_logging, register_memory, take_dirty_logs, GuestRam,
};
use ext_vmm::vcpu::{self, Vcpu, VcpuControl, VcpuCounters, VcpuStop};
use ext_vmm::virtio::block::Block;
use ext_vmm::virtio::console::Console;
use ext_vmm::virtio::mmio::{MmioTransport, MMIO_MAGIC_VALUE, MMIO_VERSION};
use ext_vmm::virtio::VirtioInterrupt;
use ext_vmm::Vmm;
use ext_vmm_api::{RequestHandler, VmState};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use ext_vmm_tests::common::{kvm_available, wait_for, Calls};

const CODE_START: u64 = 0x1000;
const TEST_PORT: u16 = 0x500;
const TEST_MMIO: u64 = 0xd000_0000;

/// Records every write and answers reads with a fixed pattern per offset.
#[derive(Default)]
struct Recorder {
    writes: Vec<(u64, Vec<u8>)>,
    reads: usize,
}

impl BusDevice for Recorder {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.reads += 1;
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = 0x30 + offset as u8 + i as u8;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.writes.push((offset, data.to_vec()));
    }
}

/// A `Write` whose bytes the test can read back.
#[derive(Clone, Default)]
struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct TestGuest {
    _vm: VmFd,
    _memory: GuestRam,
    vcpu: Vcpu,
    exit: Arc<ExitEvent>,
}

/// A one-vCPU VM whose boot vCPU starts at `code` in flat 32-bit protected mode.
fn guest(code: &[u8], pio: Bus, mmio: Bus) -> TestGuest {
    guest_on(
        create_guest_memory(64 << 20, false).unwrap(),
        code,
        pio,
        mmio,
    )
}

/// [`guest`] on `memory`, which devices on `mmio` may share.
fn guest_on(memory: GuestRam, code: &[u8], pio: Bus, mmio: Bus) -> TestGuest {
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    register_memory(&vm, &memory).unwrap();
    memory.write_slice(code, GuestAddress(CODE_START)).unwrap();
    let fd = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let cpuid = cpu::vcpu_cpuid(&kvm, 0, 1).unwrap();
    fd.set_cpuid2(&cpuid).unwrap();
    cpu::setup_msrs(&fd).unwrap();
    cpu::setup_fpu(&fd).unwrap();
    cpu::setup_pvh_registers(&fd, &memory, GuestAddress(CODE_START), GuestAddress(0x6000)).unwrap();
    let exit = Arc::new(ExitEvent::new().unwrap());
    let vcpu = Vcpu {
        fd,
        id: 0,
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        exit: exit.clone(),
        counters: Arc::new(VcpuCounters::default()),
        interceptor: None,
    };
    TestGuest {
        _vm: vm,
        _memory: memory,
        vcpu,
        exit,
    }
}

fn run_to_halt(guest: &mut TestGuest) {
    let control = VcpuControl::default();
    assert_eq!(guest.vcpu.run(&control).unwrap(), VcpuStop::Halted);
}

// Encoders for the few 32-bit instructions the guests use.
fn mov_dx(port: u16) -> Vec<u8> {
    let [lo, hi] = port.to_le_bytes();
    vec![0x66, 0xba, lo, hi]
}
fn mov_al(value: u8) -> Vec<u8> {
    vec![0xb0, value]
}
fn mov_eax_from(addr: u32) -> Vec<u8> {
    let mut v = vec![0xa1];
    v.extend_from_slice(&addr.to_le_bytes());
    v
}
fn mov_eax_to(addr: u32) -> Vec<u8> {
    let mut v = vec![0xa3];
    v.extend_from_slice(&addr.to_le_bytes());
    v
}
const OUT_DX_AL: u8 = 0xee;
const OUT_DX_EAX: u8 = 0xef;
const IN_AL_DX: u8 = 0xec;
const HLT: u8 = 0xf4;

#[test]
fn port_io_reaches_the_device_on_the_bus() {
    if !kvm_available("port_io_reaches_the_device_on_the_bus") {
        return;
    }
    let recorder = Arc::new(Mutex::new(Recorder::default()));
    let mut pio = Bus::new();
    pio.insert(recorder.clone(), u64::from(TEST_PORT), 4)
        .unwrap();
    // out 0x500, 0x42; in al, 0x500; out 0x501, al; hlt
    let mut code = mov_al(0x42);
    code.extend(mov_dx(TEST_PORT));
    code.push(OUT_DX_AL);
    code.push(IN_AL_DX);
    code.extend(mov_dx(TEST_PORT + 1));
    code.push(OUT_DX_AL);
    code.push(HLT);
    let mut guest = guest(&code, pio, Bus::new());
    run_to_halt(&mut guest);
    let recorder = recorder.lock().unwrap();
    // The value read at offset 0 (0x30) came back through the guest's register.
    assert_eq!(recorder.writes, vec![(0, vec![0x42]), (1, vec![0x30])]);
    assert_eq!(recorder.reads, 1);
    assert_eq!(guest.vcpu.counters.io_out.load(Ordering::Relaxed), 2);
    assert_eq!(guest.vcpu.counters.io_in.load(Ordering::Relaxed), 1);
}

#[test]
fn mmio_reaches_the_device_on_the_bus() {
    if !kvm_available("mmio_reaches_the_device_on_the_bus") {
        return;
    }
    let recorder = Arc::new(Mutex::new(Recorder::default()));
    let mut mmio = Bus::new();
    mmio.insert(recorder.clone(), TEST_MMIO, 0x1000).unwrap();
    // mov eax, [base+0x10]; mov [base+0x20], eax; hlt
    let mut code = mov_eax_from(TEST_MMIO as u32 + 0x10);
    code.extend(mov_eax_to(TEST_MMIO as u32 + 0x20));
    code.push(HLT);
    let mut guest = guest(&code, Bus::new(), mmio);
    run_to_halt(&mut guest);
    let recorder = recorder.lock().unwrap();
    assert_eq!(recorder.writes, vec![(0x20, vec![0x40, 0x41, 0x42, 0x43])]);
    assert_eq!(guest.vcpu.counters.mmio_read.load(Ordering::Relaxed), 1);
    assert_eq!(guest.vcpu.counters.mmio_write.load(Ordering::Relaxed), 1);
}

#[test]
fn guest_output_on_com1_comes_out_of_the_serial_device() {
    if !kvm_available("guest_output_on_com1_comes_out_of_the_serial_device") {
        return;
    }
    let output = SharedBuffer::default();
    let irq = IrqTrigger(EventFd::new(0).unwrap());
    let serial = Arc::new(Mutex::new(
        SerialDevice::new(irq, Box::new(output.clone())).unwrap(),
    ));
    let mut pio = Bus::new();
    pio.insert(serial.clone(), 0x3f8, 8).unwrap();
    let mut code = mov_dx(0x3f8);
    for byte in b"ext-vmm\n" {
        code.extend(mov_al(*byte));
        code.push(OUT_DX_AL);
    }
    code.push(HLT);
    let mut guest = guest(&code, pio, Bus::new());
    run_to_halt(&mut guest);
    assert_eq!(output.0.lock().unwrap().as_slice(), b"ext-vmm\n");
    let counters = serial.lock().unwrap().counters();
    assert_eq!(counters.tx_bytes.load(Ordering::Relaxed), 8);
}

#[test]
fn guest_reads_virtio_mmio_identity_registers() {
    if !kvm_available("guest_reads_virtio_mmio_identity_registers") {
        return;
    }
    let memory_for_device = create_guest_memory(64 << 20, false).unwrap();
    let interrupt = Arc::new(VirtioInterrupt::new(EventFd::new(0).unwrap()));
    let console = Console::new(Box::new(io::sink()));
    let transport = Arc::new(Mutex::new(MmioTransport::new(
        Box::new(console),
        memory_for_device,
        interrupt,
    )));
    let mut mmio = Bus::new();
    mmio.insert(transport, TEST_MMIO, 0x1000).unwrap();
    let recorder = Arc::new(Mutex::new(Recorder::default()));
    let mut pio = Bus::new();
    pio.insert(recorder.clone(), u64::from(TEST_PORT), 4)
        .unwrap();
    // For each of magic, version, device id: mov eax, [reg]; out 0x500, eax.
    let mut code = mov_dx(TEST_PORT);
    for reg in [0x0u32, 0x4, 0x8] {
        code.extend(mov_eax_from(TEST_MMIO as u32 + reg));
        code.push(OUT_DX_EAX);
    }
    code.push(HLT);
    let mut guest = guest(&code, pio, mmio);
    run_to_halt(&mut guest);
    let values: Vec<u32> = recorder
        .lock()
        .unwrap()
        .writes
        .iter()
        .map(|(_, bytes)| u32::from_le_bytes(bytes.as_slice().try_into().unwrap()))
        .collect();
    assert_eq!(values, vec![MMIO_MAGIC_VALUE, MMIO_VERSION, 3]);
}

#[test]
fn acpi_sleep_register_s5_requests_power_off() {
    if !kvm_available("acpi_sleep_register_s5_requests_power_off") {
        return;
    }
    let exit = Arc::new(ExitEvent::new().unwrap());
    let mut pio = Bus::new();
    pio.insert(Arc::new(Mutex::new(AcpiPm::new(exit.clone()))), 0x3c0, 3)
        .unwrap();
    // SLP_TYP = 5, SLP_EN: 0x34 to the sleep control register.
    let mut code = mov_dx(0x3c0);
    code.extend(mov_al(0x34));
    code.push(OUT_DX_AL);
    code.push(HLT);
    let mut guest = guest(&code, pio, Bus::new());
    run_to_halt(&mut guest);
    assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
    assert_eq!(guest.exit.reason(), None);
}

/// Counts port writes; shared with the test thread while the vCPU runs on its own thread.
struct Counter(Arc<AtomicU64>);

impl BusDevice for Counter {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn pause_parks_a_busy_vcpu_and_resume_restarts_it() {
    if !kvm_available("pause_parks_a_busy_vcpu_and_resume_restarts_it") {
        return;
    }
    vcpu::register_kick_handler().unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let mut pio = Bus::new();
    pio.insert(
        Arc::new(Mutex::new(Counter(count.clone()))),
        u64::from(TEST_PORT),
        1,
    )
    .unwrap();
    // loop: out 0x500, al; jmp loop
    let mut code = mov_dx(TEST_PORT);
    code.push(OUT_DX_AL);
    code.extend([0xeb, 0xfd]);
    let guest = guest(&code, pio, Bus::new());
    let TestGuest {
        _vm, _memory, vcpu, ..
    } = guest;
    let control = Arc::new(VcpuControl::default());
    let handle = vcpu::spawn_vcpu(vcpu, control.clone()).unwrap();
    let handles = vec![handle];
    assert!(
        wait_for(Duration::from_secs(60), || count.load(Ordering::SeqCst)
            > 10),
        "guest never ran"
    );

    vcpu::pause_all(&control, &handles);
    let paused_at = count.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(count.load(Ordering::SeqCst), paused_at, "a paused vCPU ran");

    vcpu::resume_all(&control);
    assert!(wait_for(Duration::from_secs(60), || count
        .load(Ordering::SeqCst)
        > paused_at + 10));

    vcpu::stop_all(&control, handles);
    let stopped_at = count.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        count.load(Ordering::SeqCst),
        stopped_at,
        "a stopped vCPU ran"
    );
}

fn write_temp(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Guest: checks the PVH start-info magic at `rbx`, prints "OK" and the first byte of the
/// command line on COM1, then `tail` (which must not return).
fn pvh_probe_code(tail: &[u8]) -> Vec<u8> {
    let mut code = vec![0x81, 0x3b]; // cmp dword [ebx], imm32
    code.extend_from_slice(&0x336e_c578u32.to_le_bytes());
    code.extend(mov_dx(0x3f8));
    code.extend([0x75, 0x0d]); // jne bad (skips the 13 bytes below)
    code.extend(mov_al(b'O'));
    code.push(OUT_DX_AL);
    code.extend(mov_al(b'K'));
    code.push(OUT_DX_AL);
    code.extend([0x8b, 0x73, 0x18]); // mov esi, [ebx + 24]  (cmdline_paddr)
    code.extend([0x8a, 0x06]); // mov al, [esi]
    code.extend([0xeb, 0x02]); // jmp out
    code.extend(mov_al(b'!')); // bad:
    code.push(OUT_DX_AL); // out:
    code.extend(mov_al(b'\n'));
    code.push(OUT_DX_AL);
    code.extend_from_slice(tail);
    code
}

fn vmm_config(dir: &tempfile::TempDir, code: &[u8]) -> VmConfig {
    let mut config = VmConfig::new(write_temp(
        dir,
        "vmlinux",
        &ext_vmm_tests::test_kernel::pvh_elf(code),
    ));
    config.initramfs = Some(write_temp(dir, "initramfs", &[0x5a; 8192]));
    config.cmdline = "e2e console=ttyS0".into();
    config.memory_size = 64 << 20;
    config.memory_shared = true;
    config.serial = SerialOutput::File(dir.path().join("serial.out"));
    config
}

#[test]
fn vmm_boots_a_pvh_kernel_and_exits_on_acpi_power_off() {
    if !kvm_available("vmm_boots_a_pvh_kernel_and_exits_on_acpi_power_off") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // After the probe: S5 through the ACPI sleep control register, then halt.
    let mut tail = mov_dx(0x3c0);
    tail.extend(mov_al(0x34));
    tail.push(OUT_DX_AL);
    tail.extend([HLT, 0xeb, 0xfd]);
    let config = vmm_config(&dir, &pvh_probe_code(&tail));
    let vmm = Vmm::new(config).unwrap();
    assert_eq!(vmm.state(), VmState::Created);
    vmm.boot().unwrap();
    assert_eq!(vmm.run_until_exit().unwrap(), ExitReason::PowerOff);
    assert_eq!(vmm.state(), VmState::Shutdown);
    let serial = std::fs::read(dir.path().join("serial.out")).unwrap();
    assert_eq!(serial, b"OKe\n");
    let counters = vmm.vm_counters().unwrap();
    assert_eq!(counters["serial"]["tx_bytes"], 4);
    assert!(counters["vcpu0"]["io_out"] >= 5);
    assert!(counters.contains_key("virtio-console0"));
}

#[test]
fn vmm_backend_pauses_resumes_and_shuts_down_a_running_guest() {
    if !kvm_available("vmm_backend_pauses_resumes_and_shuts_down_a_running_guest") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // After the probe: write to an unclaimed port forever, so vCPU exits keep coming.
    let mut tail = mov_dx(0x510);
    tail.push(OUT_DX_AL);
    tail.extend([0xeb, 0xfd]);
    let config = vmm_config(&dir, &pvh_probe_code(&tail));
    let vmm = Arc::new(Vmm::new(config).unwrap());
    vmm.boot().unwrap();
    let main_loop = {
        let vmm = vmm.clone();
        std::thread::spawn(move || vmm.run_until_exit())
    };
    let backend: Arc<dyn RequestHandler> = vmm.clone();
    let io_out =
        |backend: &Arc<dyn RequestHandler>| backend.vm_counters().unwrap()["vcpu0"]["io_out"];
    assert!(
        wait_for(Duration::from_secs(60), || io_out(&backend) > 100),
        "guest never ran"
    );
    assert!(
        backend.vm_resume().is_err(),
        "resume of a running VM must fail"
    );

    backend.vm_pause().unwrap();
    assert_eq!(backend.vm_info().unwrap().state, VmState::Paused);
    let paused_at = io_out(&backend);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(io_out(&backend), paused_at, "a paused guest made exits");
    assert_eq!(backend.vm_pause().unwrap_err().status(), 405);

    backend.vm_resume().unwrap();
    assert_eq!(backend.vm_info().unwrap().state, VmState::Running);
    assert!(wait_for(Duration::from_secs(60), || io_out(&backend)
        > paused_at + 100));

    backend.vm_shutdown().unwrap();
    assert_eq!(backend.vm_info().unwrap().state, VmState::Shutdown);
    assert_eq!(main_loop.join().unwrap().unwrap(), ExitReason::Requested);
    let info = backend.vm_info().unwrap();
    assert_eq!(info.memory_actual_size, 64 << 20);
    assert_eq!(info.config["memory"]["shared"], true);
    assert!(backend.vm_shutdown().is_err());

    assert_eq!(
        std::fs::read(dir.path().join("serial.out")).unwrap(),
        b"OKe\n"
    );
}

#[test]
fn executing_unbacked_memory_ends_the_run_with_the_guest_position() {
    if !kvm_available("executing_unbacked_memory_ends_the_run_with_the_guest_position") {
        return;
    }
    // mov eax, 0xd0000000; jmp eax: no memslot and no device there.
    let mut code = vec![0xb8];
    code.extend_from_slice(&(TEST_MMIO as u32).to_le_bytes());
    code.extend([0xff, 0xe0]);
    let mut guest = guest(&code, Bus::new(), Bus::new());
    let control = VcpuControl::default();
    let error = guest.vcpu.run(&control).unwrap_err().to_string();
    assert!(error.contains("internal error"), "{error}");
    assert!(error.contains("rip 0xd0000000"), "{error}");
}

/// The page type `file` records for page `page` of its first region.
fn page_type(file: &SnapshotFile, page: u64) -> PageType {
    file.regions()[0]
        .runs
        .iter()
        .find(|run| run.first_page <= page && page < run.first_page + run.pages)
        .unwrap()
        .page_type
}

#[test]
fn pages_a_virtio_device_writes_after_a_snapshot_are_in_the_next_diff() {
    if !kvm_available("pages_a_virtio_device_writes_after_a_snapshot_are_in_the_next_diff") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8 + 1).collect();
    let disk_path = write_temp(&dir, "disk.img", &disk);
    // Guest pages: descriptor table, avail ring, used ring, request header, one data page,
    // status byte (virtio 1.x split queue of 8 entries).
    const DESC: u64 = 0x10_0000;
    const AVAIL: u64 = 0x10_1000;
    const USED: u64 = 0x10_2000;
    const HEADER: u64 = 0x10_3000;
    const DATA: u64 = 0x10_4000;
    const STATUS: u64 = 0x10_5000;
    let memory = create_guest_memory(64 << 20, false).unwrap();
    let block = Block::new(&DiskConfig {
        path: disk_path,
        readonly: false,
    })
    .unwrap();
    let interrupt = Arc::new(VirtioInterrupt::new(EventFd::new(0).unwrap()));
    let transport = Arc::new(Mutex::new(MmioTransport::new(
        Box::new(block),
        memory.clone(),
        interrupt,
    )));
    // The driver's side, before the snapshot: one IN request of sector 0 into DATA made
    // available, not yet notified.
    let descriptor = |index: u64, addr: u64, len: u32, flags: u16, next: u16| {
        let at = DESC + 16 * index;
        memory.write_obj(addr, GuestAddress(at)).unwrap();
        memory.write_obj(len, GuestAddress(at + 8)).unwrap();
        memory.write_obj(flags, GuestAddress(at + 12)).unwrap();
        memory.write_obj(next, GuestAddress(at + 14)).unwrap();
    };
    // VIRTQ_DESC_F_NEXT = 1, VIRTQ_DESC_F_WRITE = 2.
    descriptor(0, HEADER, 16, 1, 1);
    descriptor(1, DATA, 4096, 1 | 2, 2);
    descriptor(2, STATUS, 1, 2, 0);
    memory.write_obj(0u32, GuestAddress(HEADER)).unwrap(); // VIRTIO_BLK_T_IN
    memory.write_obj(0u64, GuestAddress(HEADER + 8)).unwrap(); // sector 0
    memory.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    memory.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap(); // idx 1, ring[0] = head 0
    {
        // Register offsets of virtio-mmio (virtio 1.x §4.2.2), written as the driver would.
        let mut t = transport.lock().unwrap();
        let mut reg = |offset: u64, value: u32| t.write(offset, &value.to_le_bytes());
        reg(0x70, 1 | 2); // Status: ACKNOWLEDGE | DRIVER
        reg(0x24, 1); // DriverFeaturesSel: bits 32..63
        reg(0x20, 1); // DriverFeatures: VIRTIO_F_VERSION_1 (bit 32)
        reg(0x70, 1 | 2 | 8); // FEATURES_OK
        reg(0x30, 0); // QueueSel
        reg(0x38, 8); // QueueNum
        for (low, addr) in [(0x80, DESC), (0x90, AVAIL), (0xa0, USED)] {
            reg(low, addr as u32);
            reg(low + 4, (addr >> 32) as u32);
        }
        reg(0x44, 1); // QueueReady
        reg(0x70, 1 | 2 | 8 | 4); // DRIVER_OK
    }
    // The guest's only act: QueueNotify(0), then hlt.
    let mut code = vec![0x31, 0xc0]; // xor eax, eax
    code.extend(mov_eax_to(TEST_MMIO as u32 + 0x50));
    code.push(HLT);
    let mut mmio = Bus::new();
    mmio.insert(transport.clone(), TEST_MMIO, 0x1000).unwrap();
    let mut guest = guest_on(memory.clone(), &code, Bus::new(), mmio);

    // The snapshot: a full one, with dirty tracking counting from it (as `vm.snapshot`).
    let (full, diff) = (dir.path().join("full"), dir.path().join("diff"));
    SnapshotWriter::new(WriteOptions::default())
        .write_file(&memory, &full)
        .unwrap();
    enable_dirty_logging(&guest._vm, &memory).unwrap();

    run_to_halt(&mut guest);
    let counters = transport.lock().unwrap().device().counters();
    assert!(counters.contains(&("read_ops", 1)), "{counters:?}");
    let data: Vec<u8> = memory
        .read_obj::<[u8; 16]>(GuestAddress(DATA))
        .unwrap()
        .to_vec();
    assert_eq!(data, disk[..16]);

    // The device wrote DATA, STATUS and the used ring: vm-memory's bitmap saw it, KVM's dirty
    // log (vCPU writes) did not; the merged log has exactly those pages.
    let pages = |words: &[u64]| -> Vec<u64> {
        (0..words.len() as u64 * 64)
            .filter(|&p| words[(p / 64) as usize] & (1 << (p % 64)) != 0)
            .collect()
    };
    let logs = take_dirty_logs(&guest._vm, &memory).unwrap();
    assert_eq!(logs.len(), 1);
    assert_eq!(
        pages(&logs[0]),
        vec![USED / 4096, DATA / 4096, STATUS / 4096]
    );
    let parent = SnapshotFile::open(&full).unwrap();
    SnapshotWriter::new(WriteOptions::default())
        .diff_against(&parent, &RegionBitmaps::new(vec![logs[0].as_slice()]))
        .write_file(&memory, &diff)
        .unwrap();
    let written = SnapshotFile::open(&diff).unwrap();
    for page in [USED, DATA] {
        assert_eq!(
            page_type(&written, page / 4096),
            PageType::Data,
            "{page:#x}"
        );
    }
    // The status byte is VIRTIO_BLK_S_OK = 0: a page of zeros, but in the diff.
    assert_ne!(page_type(&written, STATUS / 4096), PageType::SameAsParent);
    for page in [DESC, AVAIL, HEADER, CODE_START] {
        let kind = page_type(&written, page / 4096);
        assert_eq!(kind, PageType::SameAsParent, "{page:#x}");
    }
    // The chain restores the device's writes.
    let chain = SnapshotChain::open(&[full, diff]).unwrap();
    let restored = create_guest_memory(64 << 20, false).unwrap();
    restore_chain_eager(&chain, &restored, EagerOptions::default()).unwrap();
    let mut page = vec![0u8; 4096];
    restored.read_slice(&mut page, GuestAddress(DATA)).unwrap();
    assert_eq!(page, disk);
    assert_eq!(restored.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    assert_eq!(restored.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 1);
}
