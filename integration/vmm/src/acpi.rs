//! ACPI tables for a hardware-reduced platform: RSDP → XSDT → {FADT → DSDT, MADT}.
//!
//! The DSDT describes COM1 and every virtio-mmio device (`LNRO0005`, the ID Linux's
//! `virtio_mmio` driver matches through ACPI) and offers `\_S5`; the FADT points the sleep
//! control/status and reset registers at I/O ports the VMM traps, so `poweroff` ends the VM.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress};

use super::devices::legacy::S5_SLEEP_TYPE;
use super::error::{Error, Result};
use super::layout::*;
use super::memory::GuestRam;

const OEM_ID: [u8; 6] = *b"EXTVMM";
const OEM_TABLE_ID: [u8; 8] = *b"EXTVMM  ";
const OEM_REVISION: u32 = 1;

/// IA-PC boot architecture flags: no VGA, no CMOS RTC (neither is emulated), so Linux does not
/// probe them.
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// One virtio-mmio device as the DSDT describes it.
#[derive(Clone, Copy, Debug)]
pub struct VirtioMmioResource {
    /// Base of the register window.
    pub base: u64,
    /// Size of the register window.
    pub size: u64,
    /// IOAPIC GSI (edge-triggered, active high).
    pub gsi: u32,
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// The DSDT body: `\_S5` and the `\_SB` devices.
fn dsdt(virtio: &[VirtioMmioResource]) -> Result<Sdt> {
    let s5 = aml::Name::new("_S5_".into(), &aml::Package::new(vec![&S5_SLEEP_TYPE]));

    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_GSI);
    let com1_io = aml::IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_irq, &com1_io]);
    let com1_hid = aml::EISAName::new("PNP0501");
    let com1_hid_name = aml::Name::new("_HID".into(), &com1_hid);
    let com1_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let com1_crs_name = aml::Name::new("_CRS".into(), &com1_crs);
    let com1 = aml::Device::new(
        "COM1".into(),
        vec![&com1_hid_name, &com1_uid, &com1_crs_name],
    );

    // The power button of a hardware-reduced platform: a Generic Event Device whose
    // interrupt runs `_EVT`, which notifies the PNP0C0C button with 0x80 ("pressed"); Linux's
    // GED and button drivers turn that into a KEY_POWER event for the guest's userspace.
    let pwrb_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C"));
    let pwrb_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let pwrb = aml::Device::new("PWRB".into(), vec![&pwrb_hid, &pwrb_uid]);
    let ged_hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let ged_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    // Its second interrupt announces a new VM generation ID: `_EVT` gets the GSI that fired
    // and notifies `VGEN` with 0x80, as the VMGenID specification asks.
    let ged_irq = aml::Interrupt::new(true, true, false, false, GED_GSI);
    let genid_irq = aml::Interrupt::new(true, true, false, false, VMGENID_GSI);
    let ged_crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![&ged_irq, &genid_irq]),
    );
    let pwrb_path = aml::Path::new("\\_SB_.PWRB");
    let vgen_path = aml::Path::new("\\_SB_.VGEN");
    let notification = 0x80u8;
    let (power_gsi, genid_gsi) = (GED_GSI, VMGENID_GSI);
    let is_power = aml::Equal::new(&aml::Arg(0), &power_gsi);
    let is_genid = aml::Equal::new(&aml::Arg(0), &genid_gsi);
    let notify_power = aml::Notify::new(&pwrb_path, &notification);
    let notify_genid = aml::Notify::new(&vgen_path, &notification);
    let on_power = aml::If::new(&is_power, vec![&notify_power]);
    let on_genid = aml::If::new(&is_genid, vec![&notify_genid]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&on_power, &on_genid]);
    let ged = aml::Device::new("GED_".into(), vec![&ged_hid, &ged_uid, &ged_crs, &evt]);

    // The VM generation ID device: Linux's vmgenid driver matches `_CID "VM_GEN_COUNTER"`
    // and reads the ID's guest-physical address from `ADDR` (low, high dwords).
    let vgen_hid = aml::Name::new("_HID".into(), &"EXTV0001");
    let vgen_cid = aml::Name::new("_CID".into(), &"VM_GEN_COUNTER");
    let vgen_ddn = aml::Name::new("_DDN".into(), &"VM_Gen_Counter");
    let (addr_low, addr_high) = (VMGENID_ADDR as u32, (VMGENID_ADDR >> 32) as u32);
    let vgen_addr = aml::Name::new(
        "ADDR".into(),
        &aml::Package::new(vec![&addr_low, &addr_high]),
    );
    let vgen = aml::Device::new(
        "VGEN".into(),
        vec![&vgen_hid, &vgen_cid, &vgen_ddn, &vgen_addr],
    );

    let mut device_bytes = to_bytes(&pwrb);
    ged.to_aml_bytes(&mut device_bytes);
    vgen.to_aml_bytes(&mut device_bytes);
    for (index, dev) in virtio.iter().enumerate() {
        let base = u32::try_from(dev.base)
            .map_err(|_| Error::Boot(format!("virtio-mmio window {:#x} above 4 GiB", dev.base)))?;
        let memory = aml::Memory32Fixed::new(true, base, dev.size as u32);
        let irq = aml::Interrupt::new(true, true, false, false, dev.gsi);
        let crs = aml::ResourceTemplate::new(vec![&memory, &irq]);
        let hid = aml::Name::new("_HID".into(), &"LNRO0005");
        let uid = aml::Name::new("_UID".into(), &index);
        let cca = aml::Name::new("_CCA".into(), &aml::ONE);
        let crs_name = aml::Name::new("_CRS".into(), &crs);
        let name = format!("V{index:03X}");
        let device = aml::Device::new(name.as_str().into(), vec![&hid, &uid, &cca, &crs_name]);
        device.to_aml_bytes(&mut device_bytes);
    }
    let mut scope_body = to_bytes(&com1);
    scope_body.extend_from_slice(&device_bytes);
    let raw = RawAml(scope_body);
    let sb = aml::Scope::new("_SB_".into(), vec![&raw]);

    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    table.append_slice(&to_bytes(&s5));
    table.append_slice(&to_bytes(&sb));
    Ok(table)
}

/// Pre-serialized AML spliced into a parent object.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut builder = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    builder.sleep_control_reg = io_register(ACPI_SLEEP_CONTROL_PORT);
    builder.sleep_status_reg = io_register(ACPI_SLEEP_STATUS_PORT);
    builder.reset_reg = io_register(ACPI_RESET_PORT);
    builder.reset_value = ACPI_RESET_VALUE;
    builder.iapc_boot_arch =
        (IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT).into();
    builder.hypervisor_vendor_identity = u64::from_le_bytes(*b"EXTVMM\0\0").into();
    to_bytes(&builder.finalize())
}

/// MADT flag: the platform also has dual 8259 PICs (KVM's in-kernel irqchip does).
const MADT_PCAT_COMPAT: u32 = 1;

/// The MADT: one LAPIC per vCPU, the IOAPIC, and the PC's interrupt source override of ISA
/// IRQ 0 (the PIT) onto GSI 2, matching the GSI routing `vm.rs` installs. Built on the generic
/// `Sdt` because acpi_tables 0.2 has no override structure.
fn madt(cpus: u8) -> Vec<u8> {
    let mut madt = Sdt::new(*b"APIC", 44, 4, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, LAPIC_START as u32);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    for id in 0..cpus {
        // Processor Local APIC: type 0, length 8, UID, APIC ID, flags (enabled).
        let mut lapic = vec![0u8, 8, id, id];
        lapic.extend_from_slice(&1u32.to_le_bytes());
        madt.append_slice(&lapic);
    }
    // I/O APIC: type 1, length 12, id 0, reserved, address, GSI base 0.
    let mut ioapic = vec![1u8, 12, 0, 0];
    ioapic.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    madt.append_slice(&ioapic);
    // Interrupt Source Override: type 2, length 10, bus 0 (ISA), source IRQ, GSI, flags 0
    // (bus-conforming polarity and trigger).
    let mut iso = vec![2u8, 10, 0, ISA_TIMER_IRQ];
    iso.extend_from_slice(&ISA_TIMER_GSI.to_le_bytes());
    iso.extend_from_slice(&0u16.to_le_bytes());
    madt.append_slice(&iso);
    madt.as_slice().to_vec()
}

/// Writes all tables at [`ACPI_START`]; returns the RSDP address for `hvm_start_info`.
pub fn write_acpi_tables(
    memory: &GuestRam,
    cpus: u8,
    virtio: &[VirtioMmioResource],
) -> Result<GuestAddress> {
    let align = |addr: u64| (addr + 15) & !15;
    let rsdp_addr = ACPI_START;
    let dsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    let dsdt = dsdt(virtio)?;
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let madt = madt(cpus);
    let xsdt_addr = align(madt_addr + madt.len() as u64);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = to_bytes(&xsdt);
    if xsdt_addr + xsdt.len() as u64 > VMGENID_ADDR {
        return Err(Error::Boot("ACPI tables overflow the legacy area".into()));
    }
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    for (addr, bytes) in [
        (rsdp_addr, rsdp.as_slice()),
        (dsdt_addr, dsdt.as_slice()),
        (fadt_addr, fadt.as_slice()),
        (madt_addr, madt.as_slice()),
        (xsdt_addr, xsdt.as_slice()),
    ] {
        memory
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|e| Error::Memory(e.to_string()))?;
    }
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let virtio = [VirtioMmioResource {
            base: VIRTIO_MMIO_START,
            size: VIRTIO_MMIO_SIZE,
            gsi: VIRTIO_GSI_START,
        }];
        let rsdp = write_acpi_tables(&mem, 2, &virtio).unwrap();
        let mut rsdp_bytes = [0u8; 36];
        mem.read_slice(&mut rsdp_bytes, rsdp).unwrap();
        assert_eq!(&rsdp_bytes[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp_bytes));
        let xsdt_addr = u64::from_le_bytes(rsdp_bytes[24..32].try_into().unwrap());
        let mut header = [0u8; 36];
        mem.read_slice(&mut header, GuestAddress(xsdt_addr))
            .unwrap();
        assert_eq!(&header[..4], b"XSDT");
        let len = u32::from_le_bytes(header[4..8].try_into().unwrap()) as usize;
        let mut xsdt = vec![0u8; len];
        mem.read_slice(&mut xsdt, GuestAddress(xsdt_addr)).unwrap();
        assert!(checksum_ok(&xsdt));
        let mut signatures = Vec::new();
        for entry in xsdt[36..].chunks(8) {
            let addr = u64::from_le_bytes(entry.try_into().unwrap());
            let mut sig = [0u8; 8];
            mem.read_slice(&mut sig, GuestAddress(addr)).unwrap();
            let len = u32::from_le_bytes(sig[4..8].try_into().unwrap()) as usize;
            let mut table = vec![0u8; len];
            mem.read_slice(&mut table, GuestAddress(addr)).unwrap();
            assert!(checksum_ok(&table), "{:?}", &sig[..4]);
            signatures.push(sig[..4].to_vec());
            if &sig[..4] == b"APIC" {
                // Two LAPICs (8 bytes each), the IOAPIC (12), the IRQ0 -> GSI 2 override (10).
                assert_eq!(table.len(), 44 + 2 * 8 + 12 + 10);
                assert_eq!(&table[72..76], &[2, 10, 0, 0]);
                assert_eq!(u32::from_le_bytes(table[76..80].try_into().unwrap()), 2);
            }
            if &sig[..4] == b"FACP" {
                let dsdt = u64::from_le_bytes(table[140..148].try_into().unwrap());
                let mut dsdt_header = [0u8; 36];
                mem.read_slice(&mut dsdt_header, GuestAddress(dsdt))
                    .unwrap();
                let dsdt_len = u32::from_le_bytes(dsdt_header[4..8].try_into().unwrap());
                let mut body = vec![0u8; dsdt_len as usize];
                mem.read_slice(&mut body, GuestAddress(dsdt)).unwrap();
                assert!(checksum_ok(&body));
                assert!(body.windows(8).any(|w| w == b"LNRO0005"));
                assert!(body.windows(4).any(|w| w == b"_S5_"));
                assert!(body.windows(14).any(|w| w == b"VM_GEN_COUNTER"));
                assert!(body.windows(4).any(|w| w == b"ADDR"));
            }
        }
        assert_eq!(signatures, vec![b"FACP".to_vec(), b"APIC".to_vec()]);
    }
}
