//! Running Cloud Hypervisor v53.0 binaries (built by `ci/build-cloud-hypervisor`) from tests:
//! one VMM process per [`ChProcess`], driven with its own `ch-remote`, ended when dropped.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use ext_vmm_api::ApiClient;

use crate::common::{skip, wait_for};

/// Overrides where the patched binaries are (a folder holding `cloud-hypervisor` and
/// `ch-remote`).
pub const PATCHED_BIN_ENV: &str = "EXT_CH_PATCHED_BIN";

/// The folder of the patched `cloud-hypervisor` and `ch-remote`: `$EXT_CH_PATCHED_BIN`, or
/// where `ci/build-cloud-hypervisor` puts them. `None` (after [`skip`]ping `test`) when they
/// are not built.
pub fn patched_bin(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os(PATCHED_BIN_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/cloud-hypervisor/patched/bin")
        });
    if dir.join("cloud-hypervisor").is_file() && dir.join("ch-remote").is_file() {
        Some(dir)
    } else {
        skip(
            test,
            &format!(
                "no patched Cloud Hypervisor in {} (run ci/build-cloud-hypervisor)",
                dir.display()
            ),
        );
        None
    }
}

/// A `cloud-hypervisor` process with its API socket, its serial output (stdout) and its log
/// (stderr) in files of `dir`. Killed and reaped on drop.
pub struct ChProcess {
    child: Child,
    bin: PathBuf,
    api_socket: PathBuf,
    serial: PathBuf,
    log: PathBuf,
}

impl ChProcess {
    /// Starts `bin/cloud-hypervisor --api-socket path=<dir>/<name>.sock <args>`.
    pub fn start(bin: &Path, dir: &Path, name: &str, args: &[&str]) -> ChProcess {
        let api_socket = dir.join(format!("{name}.sock"));
        let serial = dir.join(format!("{name}.serial"));
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(bin.join("cloud-hypervisor"))
            .arg("--api-socket")
            .arg(format!("path={}", api_socket.display()))
            .args(args)
            .stdin(Stdio::null())
            .stdout(File::create(&serial).unwrap_or_else(|e| panic!("serial file: {e}")))
            .stderr(File::create(&log).unwrap_or_else(|e| panic!("log file: {e}")))
            .spawn()
            .unwrap_or_else(|e| panic!("start cloud-hypervisor: {e}"));
        let mut process = ChProcess {
            child,
            bin: bin.to_owned(),
            api_socket,
            serial,
            log,
        };
        let socket = process.api_socket.clone();
        assert!(
            wait_for(Duration::from_secs(20), || socket.exists()
                || !process.running()),
            "cloud-hypervisor made no API socket"
        );
        process
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `limit` for the process to exit by itself; its exit status.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        wait_for(limit, || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        status
    }

    /// Runs `ch-remote --api-socket <socket> <args>`.
    pub fn remote(&self, args: &[&str]) -> Output {
        Command::new(self.bin.join("ch-remote"))
            .arg("--api-socket")
            .arg(&self.api_socket)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run ch-remote: {e}"))
    }

    /// Runs `ch-remote`, panicking with its output unless it succeeds.
    pub fn remote_ok(&self, args: &[&str]) -> String {
        let out = self.remote(args);
        assert!(
            out.status.success(),
            "ch-remote {args:?} failed: {}{}\nVMM log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `GET` of API endpoint `endpoint` (e.g. `ext/vm.snapshot-figures`, one ch-remote has no
    /// command for), through ext-vmm-api's client: the status and the body.
    pub fn get(&self, endpoint: &str) -> (u16, String) {
        let response = ApiClient::connect(&self.api_socket)
            .and_then(|mut client| client.request("GET", endpoint, None))
            .unwrap_or_else(|e| panic!("GET {endpoint}: {e}"));
        (response.status, response.body_text())
    }

    /// Everything the guest wrote on its serial port so far.
    pub fn serial(&self) -> Vec<u8> {
        std::fs::read(&self.serial).unwrap_or_default()
    }

    /// The VMM's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process's resident anonymous and shared-memory pages (`RssAnon + RssShmem` of
    /// `/proc/<pid>/status`), in KiB: guest memory it populated, whatever backs it.
    pub fn resident_guest_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .filter(|l| l.starts_with("RssAnon:") || l.starts_with("RssShmem:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for ChProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
