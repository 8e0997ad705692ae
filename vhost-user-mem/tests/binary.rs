//! The `vhost-user-mem` binary: it refuses bad arguments and answers a real frontend.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vhost::vhost_user::Frontend;
use vhost::vhost_user::VhostUserVirtioFeatures;
use vhost::VhostBackend;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-mem");

#[test]
fn bad_arguments_exit_with_status_2() {
    let status = Command::new(BIN)
        .args(["--socket", "/nonexistent-vum-dir/b.sock"])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2));
    let status = Command::new(BIN)
        .args(["--socket", "/tmp/b.sock", "--log-level", "loud"])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2));
}

#[test]
fn the_binary_serves_one_frontend_after_another() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("balloon.sock");
    let mut child = Command::new(BIN)
        .arg("--socket")
        .arg(&socket)
        .args(["--log-level", "debug"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    for _ in 0..2 {
        let frontend = Frontend::connect(&socket, 4).unwrap();
        frontend.set_owner().unwrap();
        let features = frontend.get_features().unwrap();
        assert_ne!(
            features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0
        );
        assert_ne!(features & (1 << 32), 0, "VIRTIO_F_VERSION_1");
    }
    assert!(child.try_wait().unwrap().is_none(), "the daemon exited");
    child.kill().unwrap();
    child.wait().unwrap();
}
