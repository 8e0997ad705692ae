//! The i8042 reset line and the ACPI sleep/reset registers: the two ways a guest stops.

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use crate::bus::BusDevice;
use crate::exit::{ExitEvent, ExitReason};
use crate::layout::ACPI_RESET_VALUE;

/// Turns the i8042 "pulse reset line" command into a VM reset request.
pub struct ResetTrigger(pub Arc<ExitEvent>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(ExitReason::Reset);
        Ok(())
    }
}

/// The i8042 controller at ports 0x60–0x64 (only the reset command does anything).
pub struct I8042(pub I8042Device<ResetTrigger>);

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(first) = data.first_mut() {
            *first = self.0.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(value) = data.first() {
            // The only error is from the reset trigger, which is infallible.
            let _ = self.0.write(offset as u8, *value);
        }
    }
}

/// The sleep-type value the DSDT's `\_S5` package advertises.
pub const S5_SLEEP_TYPE: u8 = 5;
const SLEEP_ENABLE: u8 = 1 << 5;

/// Hardware-reduced ACPI registers: offset 0 sleep control, 1 sleep status, 2 reset.
pub struct AcpiPm {
    exit: Arc<ExitEvent>,
}

impl AcpiPm {
    /// Registers that report power-off and reset through `exit`.
    pub fn new(exit: Arc<ExitEvent>) -> Self {
        AcpiPm { exit }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: WAK_STS is never set because the guest never resumes from S5.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            0 if value & SLEEP_ENABLE != 0 && (value >> 2) & 0x7 == S5_SLEEP_TYPE => {
                self.exit.request(ExitReason::PowerOff);
            }
            2 if value == ACPI_RESET_VALUE => self.exit.request(ExitReason::Reset),
            _ => tracing::debug!("ACPI PM write offset {offset} value {value:#x} ignored"),
        }
    }
}
