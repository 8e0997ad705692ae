//! On-demand restore through a `vhost-user-mem serve` page server, with the real binaries on
//! this host's `/dev/kvm`: an `ext-vmm` process runs the counting guest, is paused and
//! snapshotted over its API; a page server process serves the snapshot; a new `ext-vmm`
//! process restores it with `memory_restore_mode=ondemand,page_server=<socket>` and the guest
//! continues exactly (the output before the pause and after the restore is the whole expected
//! output). When the page server dies under a restored VM, the VM ends with a clear error;
//! `page_server=` with another mode is refused. Without `/dev/kvm` every test prints a
//! `SKIPPED:` line and returns.
//!
//! The binaries are built (`cargo build -p ext-vmm -p vhost-user-mem --bins`, a no-op when
//! fresh) into this test's own target directory before the first test uses them.

// Test fixtures unwrap: a panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ext_vmm::slot::VmmSlot;
use ext_vmm_api::{ApiClient, ClientResponse, VmRestoreConfig};
use ext_vmm_tests::common::{kvm_available, wait_for, Calls};
use ext_vmm_tests::counting_guest::{counting_guest, expected_output, STEPS};

/// A child process of this test, killed (by its own handle) if the test ends before it does.
struct Process {
    name: &'static str,
    child: Child,
    stderr: PathBuf,
}

impl Process {
    fn start(name: &'static str, binary: &str, args: &[String], dir: &Path) -> Self {
        let stderr = dir.join(format!("{name}.stderr"));
        let child = Command::new(built(binary))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Process {
            name,
            child,
            stderr,
        }
    }

    /// Waits for the process to exit (at most `limit`); returns its status and stderr.
    fn wait(&mut self, limit: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, std::fs::read_to_string(&self.stderr).unwrap());
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit in {limit:?}; stderr:\n{}",
                self.name,
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

/// The path of `binary` in this test's target directory, built once per test process.
fn built(binary: &str) -> PathBuf {
    static PROFILE_DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = PROFILE_DIR.get_or_init(|| {
        // This test runs as <target>/<profile>/deps/page_server_host-<hash>.
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
        let target = profile_dir.parent().unwrap();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
        let mut build = Command::new(cargo);
        build
            .args(["build", "-p", "ext-vmm", "-p", "vhost-user-mem", "--bins"])
            .env("CARGO_TARGET_DIR", target)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            build.arg("--release");
        }
        let status = build.status().unwrap();
        assert!(
            status.success(),
            "building ext-vmm and vhost-user-mem failed"
        );
        profile_dir
    });
    dir.join(binary)
}

fn url(path: &Path) -> String {
    format!("file://{}", path.display())
}

fn api(socket: &Path, method: &str, endpoint: &str, body: Option<&str>) -> ClientResponse {
    ApiClient::connect(socket)
        .unwrap()
        .request(method, endpoint, body.map(str::as_bytes))
        .unwrap()
}

fn serial_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Boots the counting guest in an `ext-vmm` process, pauses it mid-run, snapshots it into
/// `dir/snap` and shuts the process down. Returns the snapshot and the serial output so far.
fn snapshot_a_running_guest(dir: &Path) -> (PathBuf, Vec<u8>) {
    let kernel = dir.join("vmlinux");
    std::fs::write(
        &kernel,
        ext_vmm_tests::test_kernel::pvh_elf(&counting_guest()),
    )
    .unwrap();
    let serial = dir.join("serial.out");
    let api_socket = dir.join("api1.sock");
    let mut vmm = Process::start(
        "ext-vmm (original)",
        "ext-vmm",
        &[
            format!("--kernel={}", kernel.display()),
            "--memory=size=64M".into(),
            format!("--serial=file={}", serial.display()),
            format!("--api-socket=path={}", api_socket.display()),
        ],
        dir,
    );
    assert!(
        wait_for(Duration::from_secs(120), || serial_len(&serial) > 2000),
        "the guest did not run"
    );
    assert_eq!(api(&api_socket, "PUT", "vm.pause", None).status, 204);
    let snapshot = dir.join("snap");
    let body = format!(r#"{{"destination_url":"{}"}}"#, url(&snapshot));
    let answer = api(&api_socket, "PUT", "vm.snapshot", Some(&body));
    assert_eq!(answer.status, 204, "{}", answer.body_text());
    let prefix = std::fs::read(&serial).unwrap();
    assert!(
        (prefix.len() as u32) < STEPS,
        "the guest finished before the pause"
    );
    assert_eq!(api(&api_socket, "PUT", "vmm.shutdown", None).status, 204);
    let (status, stderr) = vmm.wait(Duration::from_secs(60));
    assert!(status.success(), "{stderr}");
    (snapshot, prefix)
}

fn start_page_server(dir: &Path, snapshot: &Path) -> (Process, PathBuf) {
    let socket = dir.join("pages.sock");
    let mut server = Process::start(
        "vhost-user-mem serve",
        "vhost-user-mem",
        &[
            "serve".into(),
            "--snapshot".into(),
            snapshot.join("memory.ext-snapshot").display().to_string(),
            "--socket".into(),
            socket.display().to_string(),
        ],
        dir,
    );
    let listening = wait_for(Duration::from_secs(60), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
            || !matches!(server.child.try_wait(), Ok(None))
    });
    assert!(
        listening && matches!(server.child.try_wait(), Ok(None)),
        "the page server did not start: {}",
        std::fs::read_to_string(&server.stderr).unwrap_or_default()
    );
    (server, socket)
}

#[test]
fn a_guest_restored_through_a_page_server_process_continues_exactly() {
    if !kvm_available("a_guest_restored_through_a_page_server_process_continues_exactly") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (snapshot, prefix) = snapshot_a_running_guest(dir.path());
    let (mut server, socket) = start_page_server(dir.path(), &snapshot);

    let serial = dir.path().join("serial.out");
    std::fs::write(&serial, &prefix).unwrap();
    let mut restored = Process::start(
        "ext-vmm (restored)",
        "ext-vmm",
        &[format!(
            "--restore=source_url={},memory_restore_mode=ondemand,page_server={},resume=true",
            url(&snapshot),
            socket.display()
        )],
        dir.path(),
    );
    let (status, stderr) = restored.wait(Duration::from_secs(120));
    assert!(status.success(), "the restored VM failed: {stderr}");
    let output = std::fs::read(&serial).unwrap();
    assert_eq!(output.len(), expected_output().len(), "output length");
    assert!(
        output == expected_output(),
        "the guest did not continue exactly"
    );
    // The server outlives its VMs: it serves the next restore too.
    assert!(matches!(server.child.try_wait(), Ok(None)));
    server.kill();
}

#[test]
fn the_vm_ends_with_a_clear_error_when_the_page_server_dies() {
    if !kvm_available("the_vm_ends_with_a_clear_error_when_the_page_server_dies") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (snapshot, _prefix) = snapshot_a_running_guest(dir.path());

    // page_server= goes with ondemand only: the command line and the API refuse the rest.
    let mut copy = Process::start(
        "ext-vmm (copy with page_server)",
        "ext-vmm",
        &[format!(
            "--restore=source_url={},memory_restore_mode=copy,page_server=/nonexistent.sock",
            url(&snapshot)
        )],
        dir.path(),
    );
    let (status, stderr) = copy.wait(Duration::from_secs(60));
    assert!(!status.success());
    assert!(
        stderr.contains("page_server") && stderr.contains("ondemand"),
        "{stderr}"
    );
    let body = |mode: &str| VmRestoreConfig {
        source_url: url(&snapshot),
        memory_restore_mode: Some(mode.into()),
        resume: None,
        page_server: Some(dir.path().join("none.sock").display().to_string()),
    };
    let refused = VmmSlot::default().vm_restore(&body("mapped")).unwrap_err();
    assert_eq!(refused.status(), 400, "{refused:?}");
    // No server at that socket: the restore fails before a VM exists.
    let unreachable = VmmSlot::default()
        .vm_restore(&body("ondemand"))
        .unwrap_err();
    assert_eq!(unreachable.status(), 400, "{unreachable:?}");
    assert!(
        unreachable.messages.join(" ").contains("page server"),
        "{unreachable:?}"
    );

    let (mut server, socket) = start_page_server(dir.path(), &snapshot);
    let api_socket = dir.path().join("api2.sock");
    let mut restored = Process::start(
        "ext-vmm (restored, paused)",
        "ext-vmm",
        &[
            format!(
                "--restore=source_url={},memory_restore_mode=ondemand,page_server={}",
                url(&snapshot),
                socket.display()
            ),
            format!("--api-socket=path={}", api_socket.display()),
        ],
        dir.path(),
    );
    // The API answers once the restore (and the hand-over to the server) is done.
    assert!(
        wait_for(Duration::from_secs(60), || {
            ApiClient::connect(&api_socket).is_ok()
        }),
        "the restored VMM does not answer"
    );
    assert_eq!(api(&api_socket, "GET", "vm.info", None).status, 200);
    server.kill();
    // Resuming runs into faults nobody serves any more (if the VM has not ended already).
    let _ = ApiClient::connect(&api_socket)
        .and_then(|mut client| client.request("PUT", "vm.resume", None));
    // The VM ends with the error; the VMM keeps serving its API until told to exit.
    assert!(
        wait_for(Duration::from_secs(60), || {
            api(&api_socket, "GET", "vm.info", None)
                .body_text()
                .contains(r#""state":"Shutdown""#)
        }),
        "the VM went on without its page server"
    );
    assert_eq!(api(&api_socket, "PUT", "vmm.shutdown", None).status, 204);
    let (status, stderr) = restored.wait(Duration::from_secs(60));
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("VM failed: on-demand restore failed")
            && stderr.contains("the page server closed the connection"),
        "{stderr}"
    );
}
