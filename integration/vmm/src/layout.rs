//! The guest-physical address map of an `ext-vmm` VM (x86-64).
//!
//! Low memory holds the boot structures; RAM runs from 0 up to the 32-bit MMIO gap and
//! continues above 4 GiB. The gap holds the virtio-mmio windows, the IOAPIC, the LAPIC and
//! the KVM TSS/identity-map pages.

/// GDT used while entering the kernel (flat 32-bit segments).
pub const BOOT_GDT_START: u64 = 0x500;
/// `hvm_start_info` handed to the PVH entry in `rbx`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map (E820-style entries).
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Longest command line accepted (the Linux x86 limit).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the EBDA / legacy hole not offered as RAM.
pub const EBDA_START: u64 = 0x9_fc00;
/// ACPI tables (RSDP first); inside the reserved legacy BIOS area.
pub const ACPI_START: u64 = 0xe_0000;
/// The 16-byte VM generation ID ([`crate::identity`]): the last page of the reserved legacy
/// area, above the ACPI tables.
pub const VMGENID_ADDR: u64 = 0xf_f000;
/// End of the legacy area; RAM resumes here.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window; each device gets [`VIRTIO_MMIO_SIZE`] bytes.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio window (registers plus config space).
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// LAPIC registers.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM's TSS (three pages) for real-mode emulation on Intel.
pub const KVM_TSS_START: u64 = 0xfffb_d000;
/// KVM's identity-map page, just below the TSS.
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;

/// COM1 I/O base.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 interrupt line.
pub const COM1_GSI: u32 = 4;
/// i8042 controller command port (reset line via 0xfe).
pub const I8042_PORT: u16 = 0x60;
/// ACPI sleep control / status registers (hardware-reduced ACPI, FADT `SLEEP_CONTROL_REG`).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x3c0;
/// ACPI sleep status register.
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x3c1;
/// ACPI reset register (FADT `RESET_REG`).
pub const ACPI_RESET_PORT: u16 = 0x3c2;
/// Value the guest writes to [`ACPI_RESET_PORT`] to reset.
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// First GSI for virtio-mmio devices (after the legacy ISA lines in use).
pub const VIRTIO_GSI_START: u32 = 5;
/// Number of IOAPIC pins KVM's in-kernel IOAPIC provides.
pub const IOAPIC_PINS: u32 = 24;
/// GSI of the ACPI Generic Event Device (the power button): the last IOAPIC pin, so virtio
/// devices take the pins below it.
pub const GED_GSI: u32 = IOAPIC_PINS - 1;
/// The GED's second interrupt: the VM generation ID changed (`_EVT` notifies `VGEN`).
pub const VMGENID_GSI: u32 = GED_GSI - 1;
/// ISA IRQ of the PIT.
pub const ISA_TIMER_IRQ: u8 = 0;
/// GSI the PIT's IRQ 0 arrives on at the IOAPIC, as on a PC (MADT interrupt source override).
pub const ISA_TIMER_GSI: u32 = 2;
