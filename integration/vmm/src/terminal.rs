//! Raw mode for an interactive stdin, so keystrokes (Ctrl-C included) reach the guest's
//! serial console unbuffered, as Cloud Hypervisor does (with the same vmm-sys-util
//! [`Terminal`] calls); canonical mode comes back on drop.

use std::io::{self, IsTerminal};

use vmm_sys_util::terminal::Terminal;

/// Puts stdin back into canonical mode when dropped.
pub struct RawTerminal(());

impl RawTerminal {
    /// Switches stdin to raw mode if it is a terminal; `Ok(None)` when it is not.
    pub fn enable() -> io::Result<Option<Self>> {
        let stdin = io::stdin();
        if !stdin.is_terminal() {
            return Ok(None);
        }
        stdin
            .lock()
            .set_raw_mode()
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        Ok(Some(RawTerminal(())))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Err(e) = io::stdin().lock().set_canon_mode() {
            tracing::warn!("cannot restore the terminal mode: {e}");
        }
    }
}
