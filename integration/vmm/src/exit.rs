//! How a VM tells its VMM to stop: devices and vCPUs record why, then wake the main loop.

use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::error::{Error, Result};

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (i8042, ACPI reset register, triple fault); `ext-vmm` has no
    /// reboot, so a reset ends the VM like a power-off.
    Reset,
    /// Shut down from the API.
    Requested,
    /// The VMM hit an error it cannot recover from.
    Error(String),
}

/// A one-shot stop request: the first reason wins; the eventfd wakes the main loop.
pub struct ExitEvent {
    event: EventFd,
    reason: Mutex<Option<ExitReason>>,
}

impl ExitEvent {
    /// A fresh, unsignalled exit event.
    pub fn new() -> Result<Self> {
        Ok(ExitEvent {
            event: EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Sys("eventfd", e))?,
            reason: Mutex::new(None),
        })
    }

    /// Records `reason` (unless one is recorded already) and wakes whoever polls [`Self::fd`].
    pub fn request(&self, reason: ExitReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            tracing::info!("VM exit requested: {reason:?}");
            *slot = Some(reason);
        }
        drop(slot);
        // The counter cannot overflow from a handful of writes; a failure would only mean the
        // main loop learns of the exit on its next timeout.
        let _ = self.event.write(1);
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The eventfd to poll.
    pub fn fd(&self) -> &EventFd {
        &self.event
    }
}
