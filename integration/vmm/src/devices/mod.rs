//! Legacy platform devices on the port-I/O bus: the COM1 16550 serial port, the i8042 reset
//! line and the hardware-reduced ACPI sleep/reset registers.

pub mod legacy;
pub mod persist;
pub mod serial;

use std::io;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// Raises a guest interrupt by writing an irqfd registered with KVM.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}
