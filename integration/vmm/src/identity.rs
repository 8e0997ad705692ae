//! The VM's generation ID: the ACPI VM Generation ID device (Microsoft's "Virtual Machine
//! Generation ID" specification, as QEMU and Firecracker offer it).
//!
//! The ID is 16 bytes of guest memory at [`VMGENID_ADDR`], inside the reserved legacy area;
//! the DSDT's `VGEN` device (`_CID "VM_GEN_COUNTER"`) names that address in its `ADDR`
//! package, which Linux's `vmgenid` driver reads at probe. A booted VM gets a random ID. A VM
//! restored from a snapshot carries its source's ID in memory; a clone is given a new one
//! before its vCPUs run ([`GenerationId::set`]), which also raises the GED interrupt whose
//! `_EVT` notifies `VGEN`: the guest's driver reads the new ID and reseeds its RNG
//! (`add_vmfork_randomness`), so two clones of one snapshot stop drawing the same random
//! numbers.

use std::fmt;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};
use vm_superio::Trigger;

use super::devices::IrqTrigger;
use super::error::{Error, Result};
use super::layout::VMGENID_ADDR;
use super::memory::GuestRam;

/// A 128-bit VM generation ID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmGenId(pub [u8; 16]);

impl VmGenId {
    /// A fresh random ID from the kernel's RNG (`getrandom(2)`).
    pub fn random() -> Result<Self> {
        let mut bytes = [0u8; 16];
        let mut filled = 0;
        while filled < bytes.len() {
            let rest = &mut bytes[filled..];
            // SAFETY: `rest` is a writable buffer of `rest.len()` bytes that getrandom fills
            // at most up to its length.
            let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Sys("getrandom", e));
            }
            filled += n as usize;
        }
        Ok(VmGenId(bytes))
    }

    /// Parses 32 hex digits, dashes anywhere ignored (so a GUID's usual
    /// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` form is accepted too).
    pub fn parse(text: &str) -> Option<Self> {
        let digits: Vec<u8> = text.bytes().filter(|b| *b != b'-').collect();
        if digits.len() != 32 {
            return None;
        }
        let mut bytes = [0u8; 16];
        for (byte, pair) in bytes.iter_mut().zip(digits.chunks(2)) {
            let pair = std::str::from_utf8(pair).ok()?;
            *byte = u8::from_str_radix(pair, 16).ok()?;
        }
        Some(VmGenId(bytes))
    }
}

impl fmt::Display for VmGenId {
    /// 32 lower-case hex digits, the bytes in guest-memory order.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// The generation ID of one VM: its place in guest memory and the interrupt that tells the
/// guest it changed.
pub struct GenerationId {
    memory: GuestRam,
    notify: Arc<IrqTrigger>,
}

impl GenerationId {
    /// The ID at [`VMGENID_ADDR`] of `memory`, changes announced on `notify` (the GED's
    /// VMGenID interrupt).
    pub fn new(memory: GuestRam, notify: Arc<IrqTrigger>) -> Self {
        GenerationId { memory, notify }
    }

    /// The current ID, as the guest sees it.
    pub fn get(&self) -> Result<VmGenId> {
        let mut bytes = [0u8; 16];
        self.memory
            .read_slice(&mut bytes, GuestAddress(VMGENID_ADDR))
            .map_err(|e| Error::Memory(format!("reading the VM generation ID: {e}")))?;
        Ok(VmGenId(bytes))
    }

    /// Writes `id` without telling the guest (a VM about to boot reads it at probe).
    pub fn write(&self, id: VmGenId) -> Result<()> {
        self.memory
            .write_slice(&id.0, GuestAddress(VMGENID_ADDR))
            .map_err(|e| Error::Memory(format!("writing the VM generation ID: {e}")))
    }

    /// Gives the VM the new ID `id` and raises the notification. On a paused VM the
    /// interrupt waits in the IOAPIC and the guest takes it as soon as its vCPUs run.
    pub fn set(&self, id: VmGenId) -> Result<()> {
        self.write(id)?;
        self.notify
            .trigger()
            .map_err(|e| Error::Sys("VM generation ID interrupt", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_print_and_differ() {
        let id = VmGenId::parse("00112233-4455-6677-8899-aabbccddeeff").unwrap();
        assert_eq!(id.to_string(), "00112233445566778899aabbccddeeff");
        assert_eq!(VmGenId::parse(&id.to_string()), Some(id));
        assert_eq!(VmGenId::parse("0011"), None);
        assert_eq!(VmGenId::parse("zz112233445566778899aabbccddeeff"), None);
        assert_ne!(VmGenId::random().unwrap(), VmGenId::random().unwrap());
    }

    #[test]
    fn set_writes_guest_memory_and_notifies() {
        let memory = GuestRam::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let fd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let notify = Arc::new(IrqTrigger(fd.try_clone().unwrap()));
        let genid = GenerationId::new(memory.clone(), notify);
        let id = VmGenId::random().unwrap();
        genid.set(id).unwrap();
        assert_eq!(genid.get().unwrap(), id);
        let mut raw = [0u8; 16];
        memory
            .read_slice(&mut raw, GuestAddress(VMGENID_ADDR))
            .unwrap();
        assert_eq!(raw, id.0);
        assert_eq!(fd.read().unwrap(), 1);
    }
}
