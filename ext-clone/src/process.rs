//! A clone's VMM process: started restoring the snapshot paused, owned by ext-clone until the
//! clone is configured and running, then released to run on its own. Until then, any failure
//! (or dropping it) kills the process and removes its directory, so a failed clone leaves no
//! stray process, socket or directory.

use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::api::{file_url, VmmApi};
use crate::error::{CloneError, Result};
use crate::signals::unblock_all_in_child;

/// Which VMM the clones run, and so which command line restores a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmmKind {
    /// ext-vmm: `--restore ...` plus `--serial file=` (a console log per clone).
    ExtVmm,
    /// Cloud Hypervisor (stock or patched): `--restore ...`; the console is the snapshot's.
    CloudHypervisor,
}

/// The VMM binary clones run in.
#[derive(Clone, Debug)]
pub struct VmmCommand {
    /// Path of the binary.
    pub binary: PathBuf,
    /// Its command-line dialect.
    pub kind: VmmKind,
}

impl VmmCommand {
    /// `binary`, its kind guessed from its file name (`cloud-hypervisor*` is Cloud Hypervisor).
    pub fn guess(binary: PathBuf) -> Self {
        let kind = match binary.file_name().and_then(|n| n.to_str()) {
            Some(name) if name.starts_with("cloud-hypervisor") => VmmKind::CloudHypervisor,
            _ => VmmKind::ExtVmm,
        };
        VmmCommand { binary, kind }
    }

    fn restore_args(&self, dir: &Path, snapshot: &Path, mode: &str) -> Vec<String> {
        let mut args = vec![
            "--api-socket".to_string(),
            format!("path={}", api_socket(dir).display()),
            "--restore".to_string(),
            format!(
                "source_url={},memory_restore_mode={mode}",
                file_url(snapshot)
            ),
        ];
        if self.kind == VmmKind::ExtVmm {
            args.push("--serial".into());
            args.push(format!("file={}", dir.join("serial.log").display()));
        }
        args
    }
}

/// The API socket of the clone whose directory is `dir`.
pub fn api_socket(dir: &Path) -> PathBuf {
    dir.join("api.sock")
}

/// The log (stdout and stderr) of the clone's VMM.
pub fn vmm_log(dir: &Path) -> PathBuf {
    dir.join("vmm.log")
}

/// Claims the first free `clone-<n>` directory under `out` (`mkdir` is the claim: two
/// ext-clone processes on one `out` never get the same one).
pub fn claim_clone_dir(out: &Path, first: u32) -> Result<(u32, PathBuf)> {
    for index in first..first.saturating_add(100_000) {
        let dir = out.join(format!("clone-{index}"));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok((index, dir)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(source) => {
                return Err(CloneError::Io {
                    what: "creating",
                    path: dir,
                    source,
                })
            }
        }
    }
    Err(CloneError::Internal(format!(
        "no free clone directory under {}",
        out.display()
    )))
}

/// A clone's VMM while ext-clone configures it.
pub struct CloneProcess {
    index: u32,
    dir: PathBuf,
    child: Option<Child>,
    api: VmmApi,
}

impl CloneProcess {
    /// Starts `vmm` restoring `snapshot` (paused) with its socket and logs in `dir`.
    pub fn start(
        vmm: &VmmCommand,
        index: u32,
        dir: PathBuf,
        snapshot: &Path,
        mode: &str,
        timeout: Duration,
    ) -> Result<Self> {
        let log_path = vmm_log(&dir);
        let log = File::create(&log_path).map_err(|source| CloneError::Io {
            what: "creating",
            path: log_path.clone(),
            source,
        })?;
        let log_err = log.try_clone().map_err(|source| CloneError::Io {
            what: "duplicating",
            path: log_path,
            source,
        })?;
        let mut command = Command::new(&vmm.binary);
        command
            .args(vmm.restore_args(&dir, snapshot, mode))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Its own process group: a ^C at ext-clone's terminal does not reach clones.
            .process_group(0);
        // SAFETY: the closure only calls async-signal-safe functions (sigprocmask).
        unsafe { command.pre_exec(unblock_all_in_child) };
        let api = VmmApi::new(api_socket(&dir), timeout);
        let mut process = CloneProcess {
            index,
            dir,
            child: None,
            api,
        };
        match command.spawn() {
            Ok(child) => process.child = Some(child),
            Err(e) => {
                return Err(process.failure(format!("cannot start {}: {e}", vmm.binary.display())))
            }
        }
        Ok(process)
    }

    /// The clone's index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The clone's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The clone's API.
    pub fn api(&self) -> &VmmApi {
        &self.api
    }

    /// The VMM's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// A clone error naming this clone, with the end of its VMM's log.
    pub fn failure(&self, reason: String) -> CloneError {
        let log = fs::read_to_string(vmm_log(&self.dir)).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        CloneError::Clone {
            index: self.index,
            reason: if tail.is_empty() {
                reason
            } else {
                format!("{reason}; its log ends: {}", tail.join(" | "))
            },
        }
    }

    /// Waits until the VMM answers on its API socket, at most until `deadline`; fails at once
    /// if the process exits.
    pub fn wait_ready(&mut self, deadline: Instant) -> Result<()> {
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(self.failure(format!("its VMM exited ({status}) while starting")));
                }
            }
            if self.api.socket().exists() && self.api.ping().is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.failure("its VMM did not answer on its API socket in time".into()));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The clone is configured and running: the process is left to run on its own (it
    /// outlives ext-clone). Returns its pid.
    pub fn release(mut self) -> u32 {
        let pid = self.pid();
        // Dropping a `Child` neither kills nor waits for it.
        self.child = None;
        self.dir = PathBuf::new();
        pid
    }
}

impl Drop for CloneProcess {
    /// An unreleased clone is undone: its VMM killed and reaped, its directory removed.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if !self.dir.as_os_str().is_empty() {
            if let Err(e) = fs::remove_dir_all(&self.dir) {
                tracing::warn!("cannot remove {}: {e}", self.dir.display());
            }
        }
    }
}
