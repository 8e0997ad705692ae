//! Building a VM: KVM VM with in-kernel irqchip and PIT, guest memory, platform and virtio
//! devices on their buses, ACPI tables, the PVH boot state and configured vCPUs.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_irqchip, kvm_pit_config, KvmIrqRouting,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_superio::I8042Device;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::acpi::{write_acpi_tables, VirtioMmioResource};
use super::boot::load_pvh;
use super::bus::Bus;
use super::config::{SerialOutput, VmConfig};
use super::cpu;
use super::devices::legacy::{AcpiPm, ResetTrigger, I8042};
use super::devices::serial::{SerialCounters, SerialDevice};
use super::devices::IrqTrigger;
use super::error::{Error, Result};
use super::exit::ExitEvent;
use super::identity::{GenerationId, VmGenId};
use super::layout::*;
use super::memory::{create_guest_memory, register_memory, GuestRam};
use super::perm::PermHook;
use super::snapshot::VmSnapshotState;
use super::vcpu::{ExitInterceptor, Vcpu, VcpuCounters};
use super::virtio::block::Block;
use super::virtio::console::Console;
use super::virtio::mmio::MmioTransport;
use super::virtio::vhost_user::VhostUserDevice;
use super::virtio::{VirtioDevice, VirtioInterrupt};

/// A virtio device as the VMM keeps it: name for counters, and its transport.
pub struct VirtioSlot {
    /// Counter/device id, e.g. `virtio-blk0`.
    pub name: String,
    /// The transport on the MMIO bus.
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// A configured VM whose vCPUs have not started yet.
pub struct Vm {
    /// The KVM VM.
    pub fd: VmFd,
    /// Guest RAM.
    pub memory: GuestRam,
    /// Port-I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Stop requests from devices and vCPUs.
    pub exit: Arc<ExitEvent>,
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// COM1 counters.
    pub serial_counters: Arc<SerialCounters>,
    /// virtio devices in DSDT order.
    pub virtio: Vec<VirtioSlot>,
    /// Configured vCPUs (boot vCPU first), ready to be started.
    pub vcpus: Vec<Vcpu>,
    /// Per-vCPU exit counters (same order).
    pub vcpu_counters: Vec<Arc<VcpuCounters>>,
    /// ext-perm's permission manager over the RAM memslots (`None` if it could not attach).
    pub perm: Option<Arc<PermHook>>,
    /// The ACPI power button's interrupt (the GED's GSI): a write presses the button.
    pub power_button: Arc<IrqTrigger>,
    /// The VM generation ID (ACPI VMGenID) and its change notification.
    pub generation_id: Arc<GenerationId>,
}

/// Opens `/dev/kvm` and creates a VM with the in-kernel LAPIC/IOAPIC/PIC and PIT.
pub fn create_kvm_vm() -> Result<(Kvm, VmFd)> {
    let kvm = Kvm::new().map_err(|e| Error::Kvm("open /dev/kvm", e))?;
    let vm = kvm
        .create_vm()
        .map_err(|e| Error::Kvm("KVM_CREATE_VM", e))?;
    vm.set_tss_address(KVM_TSS_START as usize)
        .map_err(|e| Error::Kvm("KVM_SET_TSS_ADDR", e))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_START)
        .map_err(|e| Error::Kvm("KVM_SET_IDENTITY_MAP_ADDR", e))?;
    vm.create_irq_chip()
        .map_err(|e| Error::Kvm("KVM_CREATE_IRQCHIP", e))?;
    set_pc_gsi_routing(&vm)?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| Error::Kvm("KVM_CREATE_PIT2", e))?;
    Ok((kvm, vm))
}

fn irqchip_route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    entry.u.irqchip = kvm_irq_routing_irqchip { irqchip, pin };
    entry
}

/// Routes GSIs as on a PC: ISA IRQs 0–15 to the 8259 pair (2 is the cascade), GSI *n* to IOAPIC
/// pin *n*, except that the PIT's GSI 0 arrives on IOAPIC pin 2 ([`ISA_TIMER_GSI`], announced
/// by the MADT's interrupt source override).
fn set_pc_gsi_routing(vm: &VmFd) -> Result<()> {
    let mut entries = Vec::new();
    for gsi in 0..16u32 {
        match gsi {
            2 => continue,
            0..=7 => entries.push(irqchip_route(gsi, KVM_IRQCHIP_PIC_MASTER, gsi)),
            _ => entries.push(irqchip_route(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8)),
        }
    }
    for gsi in 0..IOAPIC_PINS {
        match gsi {
            0 => entries.push(irqchip_route(0, KVM_IRQCHIP_IOAPIC, ISA_TIMER_GSI)),
            ISA_TIMER_GSI => {}
            _ => entries.push(irqchip_route(gsi, KVM_IRQCHIP_IOAPIC, gsi)),
        }
    }
    let routing = KvmIrqRouting::from_entries(&entries)
        .map_err(|e| Error::Boot(format!("building the GSI routing table: {e:?}")))?;
    vm.set_gsi_routing(&routing)
        .map_err(|e| Error::Kvm("KVM_SET_GSI_ROUTING", e))
}

/// An eventfd registered as an irqfd for `gsi`.
pub fn irqfd(vm: &VmFd, gsi: u32) -> Result<EventFd> {
    let fd = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Sys("eventfd", e))?;
    vm.register_irqfd(&fd, gsi)
        .map_err(|e| Error::Kvm("KVM_IRQFD", e))?;
    Ok(fd)
}

fn console_writer(serial: &SerialOutput) -> Result<Box<dyn Write + Send>> {
    Ok(match serial {
        SerialOutput::Tty => Box::new(io::stdout()),
        SerialOutput::Off => Box::new(io::sink()),
        SerialOutput::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| Error::File {
                    path: path.display().to_string(),
                    source,
                })?,
        ),
    })
}

/// Sets up one vCPU's architectural state; the boot vCPU also gets the PVH entry registers.
pub fn configure_vcpu(kvm: &Kvm, fd: &VcpuFd, id: u8, count: u8) -> Result<()> {
    let cpuid = cpu::vcpu_cpuid(kvm, id, count)?;
    fd.set_cpuid2(&cpuid)
        .map_err(|e| Error::Kvm("KVM_SET_CPUID2", e))?;
    cpu::setup_msrs(fd)?;
    cpu::setup_fpu(fd)?;
    cpu::setup_lapic(fd)
}

impl Vm {
    /// Builds the whole VM for `config`, ready to run from the kernel's PVH entry.
    pub fn new(config: &VmConfig) -> Result<Self> {
        if config.memory_size > (1 << 40) {
            return Err(Error::Unsupported("more than 1 TiB of memory".into()));
        }
        let memory = create_guest_memory(config.memory_size, config.memory_shared)?;
        Self::build(config, memory, None)
    }

    /// Builds the VM of a snapshot on `memory` (already restored): devices continue from
    /// their saved state, vCPUs and the in-kernel irqchip, PIT and clock are loaded from
    /// `state`; nothing is written into guest memory.
    pub fn restore(config: &VmConfig, memory: GuestRam, state: &VmSnapshotState) -> Result<Self> {
        Self::build(config, memory, Some(state))
    }

    fn build(config: &VmConfig, memory: GuestRam, saved: Option<&VmSnapshotState>) -> Result<Self> {
        let (kvm, fd) = create_kvm_vm()?;
        register_memory(&fd, &memory)?;
        let perm = match PermHook::attach(&kvm, &fd, &memory, config.cpus) {
            Ok(perm) => Some(Arc::new(perm)),
            Err(e) => {
                tracing::warn!("page permissions (ext-perm) unavailable: {e}");
                None
            }
        };
        let exit = Arc::new(ExitEvent::new()?);

        let mut pio = Bus::new();
        let serial_irq = IrqTrigger(irqfd(&fd, COM1_GSI)?);
        let power_button = Arc::new(IrqTrigger(irqfd(&fd, GED_GSI)?));
        let generation_id = GenerationId::new(
            memory.clone(),
            Arc::new(IrqTrigger(irqfd(&fd, VMGENID_GSI)?)),
        );
        let serial_out = console_writer(&config.serial)?;
        let serial = match saved {
            None => SerialDevice::new(serial_irq, serial_out),
            Some(saved) => SerialDevice::from_state(serial_irq, serial_out, &saved.serial),
        }
        .map_err(|e| Error::Sys("serial device", e))?;
        let serial = Arc::new(Mutex::new(serial));
        let serial_counters = serial.lock().unwrap_or_else(|p| p.into_inner()).counters();
        pio.insert(serial.clone(), u64::from(COM1_PORT), 8)?;
        let i8042 = I8042(I8042Device::new(ResetTrigger(exit.clone())));
        pio.insert(Arc::new(Mutex::new(i8042)), u64::from(I8042_PORT), 5)?;
        pio.insert(
            Arc::new(Mutex::new(AcpiPm::new(exit.clone()))),
            u64::from(ACPI_SLEEP_CONTROL_PORT),
            3,
        )?;

        let mut devices: Vec<(String, Box<dyn VirtioDevice>)> = vec![(
            "virtio-console0".to_string(),
            Box::new(Console::new(console_writer(&config.serial)?)),
        )];
        for (i, disk) in config.disks.iter().enumerate() {
            devices.push((format!("virtio-blk{i}"), Box::new(Block::new(disk)?)));
        }
        for (i, backend) in config.vhost_user.iter().enumerate() {
            devices.push((
                format!("vhost-user{i}"),
                Box::new(VhostUserDevice::new(backend)?),
            ));
        }
        if let Some(saved) = saved {
            let names: Vec<&str> = devices.iter().map(|(n, _)| n.as_str()).collect();
            let saved_names: Vec<&str> = saved.virtio.iter().map(|t| t.name.as_str()).collect();
            if names != saved_names {
                return Err(Error::Snapshot(format!(
                    "the config builds virtio devices {names:?}, the snapshot has {saved_names:?}"
                )));
            }
        }
        let mut mmio = Bus::new();
        let mut virtio = Vec::new();
        let mut resources = Vec::new();
        for (i, (name, device)) in devices.into_iter().enumerate() {
            let gsi = VIRTIO_GSI_START + i as u32;
            if gsi >= VMGENID_GSI {
                return Err(Error::Unsupported("too many virtio devices".into()));
            }
            let base = VIRTIO_MMIO_START + i as u64 * VIRTIO_MMIO_SIZE;
            let interrupt = Arc::new(VirtioInterrupt::new(irqfd(&fd, gsi)?));
            let transport = match saved {
                None => MmioTransport::new(device, memory.clone(), interrupt),
                Some(saved) => MmioTransport::restore(
                    device,
                    memory.clone(),
                    interrupt,
                    &saved.virtio[i].state,
                )?,
            };
            let transport = Arc::new(Mutex::new(transport));
            mmio.insert(transport.clone(), base, VIRTIO_MMIO_SIZE)?;
            resources.push(VirtioMmioResource {
                base,
                size: VIRTIO_MMIO_SIZE,
                gsi,
            });
            virtio.push(VirtioSlot { name, transport });
        }

        // A restored guest already has its tables and kernel in memory.
        let entry = match saved {
            None => {
                let rsdp = write_acpi_tables(&memory, config.cpus, &resources)?;
                generation_id.write(VmGenId::random()?)?;
                Some(load_pvh(&memory, config, rsdp)?)
            }
            Some(_) => None,
        };

        let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
        let mut vcpus = Vec::new();
        let mut vcpu_counters = Vec::new();
        for id in 0..config.cpus {
            let vcpu_fd = fd
                .create_vcpu(u64::from(id))
                .map_err(|e| Error::Kvm("KVM_CREATE_VCPU", e))?;
            match saved {
                Some(saved) => saved
                    .vcpus
                    .get(usize::from(id))
                    .ok_or_else(|| Error::Snapshot(format!("no state for vCPU {id}")))?
                    .restore(&vcpu_fd)?,
                None => {
                    configure_vcpu(&kvm, &vcpu_fd, id, config.cpus)?;
                    if let (0, Some(boot)) = (id, &entry) {
                        cpu::setup_pvh_registers(&vcpu_fd, &memory, boot.entry, boot.start_info)?;
                    }
                }
            }
            let counters = Arc::new(VcpuCounters::default());
            vcpu_counters.push(counters.clone());
            vcpus.push(Vcpu {
                fd: vcpu_fd,
                id,
                pio: pio.clone(),
                mmio: mmio.clone(),
                exit: exit.clone(),
                counters,
                interceptor: perm.clone().map(|p| p as Arc<dyn ExitInterceptor>),
            });
        }
        if let Some(saved) = saved {
            saved.machine.restore(&fd)?;
        }
        tracing::info!(
            "VM ready: {} vCPU(s), {} MiB, {}, {} virtio device(s)",
            config.cpus,
            config.memory_size >> 20,
            match &entry {
                Some(boot) => format!("PVH entry {:#x}", boot.entry.0),
                None => "restored from a snapshot".to_string(),
            },
            virtio.len()
        );
        Ok(Vm {
            fd,
            memory,
            pio,
            mmio,
            exit,
            serial,
            serial_counters,
            virtio,
            vcpus,
            vcpu_counters,
            perm,
            power_button,
            generation_id: Arc::new(generation_id),
        })
    }
}
