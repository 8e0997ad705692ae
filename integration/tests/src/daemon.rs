//! The real `vhost-user-mem` daemon in tests: found next to the test binaries, one process per
//! [`Daemon`], killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::wait_for;

/// The daemon binary Cargo built next to the running test's directory (`target/<profile>/`).
pub fn daemon_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let profile_dir = exe.parent()?.parent()?;
    let binary = profile_dir.join("vhost-user-mem");
    binary.is_file().then_some(binary)
}

/// A daemon process serving vhost-user on `socket` and its control API on `api`.
pub struct Daemon {
    child: Child,
}

impl Daemon {
    /// Starts `binary --socket <socket> --api-socket <api>` and waits for both sockets.
    pub fn start(binary: &Path, socket: &Path, api: &Path) -> Daemon {
        let _ = std::fs::remove_file(api);
        let child = Command::new(binary)
            .arg("--socket")
            .arg(socket)
            .arg("--api-socket")
            .arg(api)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        assert!(
            wait_for(Duration::from_secs(20), || api.exists() && socket.exists()),
            "the daemon did not open its sockets"
        );
        Daemon { child }
    }

    /// Kills the daemon and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}
