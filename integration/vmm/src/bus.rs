//! Port-I/O and MMIO buses: address ranges mapped to devices, which the vCPU exit loop
//! dispatches guest accesses to.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::error::{Error, Result};

/// A device reachable from guest port I/O or MMIO.
pub trait BusDevice: Send {
    /// Guest reads `data.len()` bytes at `offset` from the start of the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest writes `data` at `offset` from the start of the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and its owner.
pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedBusDevice,
}

/// Maps disjoint address ranges to devices. Filled before the vCPUs start, read-only after.
#[derive(Clone, Default)]
pub struct Bus {
    entries: BTreeMap<u64, Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`; refuses overlaps.
    pub fn insert(&mut self, device: SharedBusDevice, base: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Err(Error::BusOverlap(base, len));
        }
        let end = base.checked_add(len).ok_or(Error::BusOverlap(base, len))?;
        if let Some((prev_base, prev)) = self.entries.range(..end).next_back() {
            if prev_base + prev.len > base {
                return Err(Error::BusOverlap(base, len));
            }
        }
        self.entries.insert(base, Entry { len, device });
        Ok(())
    }

    fn resolve(&self, addr: u64, size: usize) -> Option<(&Entry, u64)> {
        let (base, entry) = self.entries.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset + size as u64 <= entry.len).then_some((entry, offset))
    }

    /// Dispatches a read; returns false (leaving `data` untouched) when no device covers it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((entry, offset)) => {
                // A poisoned lock means another vCPU panicked inside this device; keep
                // serving the guest with whatever state it left.
                let mut device = entry.device.lock().unwrap_or_else(|p| p.into_inner());
                device.read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device covers it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((entry, offset)) => {
                let mut device = entry.device.lock().unwrap_or_else(|p| p.into_inner());
                device.write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_and_overlap() {
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        assert!(bus.insert(dev.clone(), 0x108, 0x10).is_err());
        assert!(bus.insert(dev.clone(), 0xf8, 0x10).is_err());
        bus.insert(dev.clone(), 0x110, 0x10).unwrap();
        let mut buf = [0u8; 2];
        assert!(bus.read(0x104, &mut buf));
        assert_eq!(buf, [4, 4]);
        assert!(!bus.read(0x11f, &mut [0u8; 2]));
        assert!(bus.write(0x11e, &[1, 2]));
        assert!(!bus.write(0x200, &[1]));
        assert_eq!(dev.lock().unwrap().0, vec![(0xe, vec![1, 2])]);
    }
}
