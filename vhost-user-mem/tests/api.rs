//! The control API over a real unix socket, with raw HTTP requests, while the `vhost` crate's
//! real frontend drives the daemon: every endpoint, the socket's mode, bad requests, slow
//! clients, a snapshot read back with ext-snapshot, and a page server started over the API
//! that serves that snapshot to a real userfaultfd client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{
    connect, send_pfns, stats_bytes, userfaultfd_available, Guest, BASE_FEATURES, LEN, PAGE,
};
use ext_snapshot::{fresh_memory, restore_eager, EagerOptions, PageType, SnapshotFile};
use serde_json::Value;
use vhost::vhost_user::Frontend;
use vhost_user_mem::api::{ApiLimits, ApiServer};
use vhost_user_mem::backend::lock;
use vhost_user_mem::balloon::{VIRTIO_BALLOON_F_REPORTING, VIRTIO_BALLOON_F_STATS_VQ};
use vhost_user_mem::page_server::client::connect_memory;
use vhost_user_mem::{BalloonBackend, Daemon, SharedBackend};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryRegion};

/// One HTTP response as read off the socket.
#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{}: {e}: {:?}", self.head, self.body))
    }

    /// Asserts an error in the API's shape: this status, a JSON array of strings.
    fn assert_error(&self, status: u16) {
        let body = String::from_utf8_lossy(&self.body);
        assert_eq!(self.status, status, "{}{body}", self.head);
        let messages = self.json();
        let list = messages.as_array().expect("an array");
        assert!(
            !list.is_empty() && list.iter().all(Value::is_string),
            "{messages}"
        );
    }

    fn closes(&self) -> bool {
        self.head.contains("\r\nConnection: close\r\n")
    }
}

/// A raw HTTP/1.1 client on one connection.
struct Client {
    stream: UnixStream,
    unread: Vec<u8>,
}

impl Client {
    fn new(socket: &Path) -> Self {
        let stream = UnixStream::connect(socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Client {
            stream,
            unread: Vec::new(),
        }
    }

    fn request(&mut self, method: &str, path: &str, body: Option<&str>) -> Reply {
        let mut text = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
        if let Some(body) = body {
            text += &format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        } else {
            text += "\r\n";
        }
        self.send_raw(text.as_bytes());
        self.reply()
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Reads one response: head, then `Content-Length` bytes of body.
    fn reply(&mut self) -> Reply {
        let head_end = loop {
            if let Some(at) = self.unread.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            self.fill();
        };
        let head = String::from_utf8(self.unread[..head_end].to_vec()).unwrap();
        let status_line = head.lines().next().unwrap();
        assert!(status_line.starts_with("HTTP/1.1 ") && status_line.ends_with(' '));
        let status = status_line[9..12].parse().unwrap();
        assert_eq!(status_line.len(), 13, "no reason phrase: {status_line:?}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .map_or(0, |n| n.parse().unwrap());
        while self.unread.len() < head_end + length {
            self.fill();
        }
        let body = self.unread[head_end..head_end + length].to_vec();
        self.unread.drain(..head_end + length);
        Reply { status, head, body }
    }

    fn fill(&mut self) {
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk).unwrap();
        assert_ne!(n, 0, "the server closed the connection");
        self.unread.extend_from_slice(&chunk[..n]);
    }

    /// Whether the server closed the connection (end of stream or reset).
    fn closed_by_server(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.stream.read(&mut byte), Ok(0) | Err(_))
    }
}

fn get(socket: &Path, path: &str) -> Reply {
    Client::new(socket).request("GET", path, None)
}

fn put(socket: &Path, path: &str, body: &str) -> Reply {
    Client::new(socket).request("PUT", path, Some(body))
}

fn delete(socket: &Path, path: &str) -> Reply {
    Client::new(socket).request("DELETE", path, None)
}

fn status(socket: &Path) -> Value {
    let reply = get(socket, "/api/v1/status");
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.json()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The daemon in a thread with its control API; the API stops when the server is dropped.
fn start(dir: &Path) -> (SharedBackend, PathBuf, PathBuf, ApiServer) {
    let socket = dir.join("balloon.sock");
    let api_socket = dir.join("api.sock");
    let backend = BalloonBackend::shared();
    let mut daemon = Daemon::bind(&socket, backend.clone()).unwrap();
    let api = daemon.start_api(&api_socket).unwrap();
    std::thread::spawn(move || daemon.run());
    (backend, socket, api_socket, api)
}

fn page_pattern(page: u64) -> Vec<u8> {
    (0..PAGE).map(|i| (i as u8) ^ (page as u8) ^ 0xc3).collect()
}

/// Guest memory with every page 0x5a (as `Guest::new` fills it) but pages 100..110, which
/// hold [`page_pattern`].
fn patterned_guest() -> Guest {
    let guest = Guest::new();
    for page in 100..110 {
        guest
            .mem
            .write_slice(&page_pattern(page), GuestAddress(page * PAGE))
            .unwrap();
    }
    guest
}

#[test]
fn every_endpoint_over_a_private_socket_while_a_frontend_drives_the_balloon() {
    let dir = tempfile::tempdir().unwrap();
    let (_backend, socket, api_socket, api) = start(dir.path());

    let meta = std::fs::metadata(&api_socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    let stat = Command::new("stat")
        .args(["-c", "%a %F"])
        .arg(&api_socket)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&stat.stdout).trim(), "600 socket");
    // Nothing but the socket is left of how it was made.
    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries.len(), 2, "{entries:?}");

    // Before any frontend.
    let before = status(&api_socket);
    assert_eq!(before["connected"], false);
    assert_eq!(before["allocated_bytes"], Value::Null);
    assert_eq!(before["guest_memory_bytes"], Value::Null);
    assert_ne!(before["features"]["offered"].as_u64().unwrap(), 0);
    put(&api_socket, "/api/v1/snapshot", r#"{"path":"/tmp/never"}"#).assert_error(409);
    let none = get(&api_socket, "/api/v1/invalid-pages").json();
    assert_eq!(
        none,
        serde_json::json!({"page_size": 4096, "pages": 0, "ranges": []})
    );

    // A frontend with stats (queue 2) and reporting (queue 3).
    let guest = patterned_guest();
    let mut frontend = Frontend::connect(&socket, 4).unwrap();
    let features =
        BASE_FEATURES | (1 << VIRTIO_BALLOON_F_STATS_VQ) | (1 << VIRTIO_BALLOON_F_REPORTING);
    let mut queues = connect(&mut frontend, &guest, features, 4, 0);
    wait_for("connected", || status(&api_socket)["connected"] == true);

    // Inflate four pages, report 64 KiB at 2 MiB, send stats.
    send_pfns(&guest, &mut queues[0], &[600, 601, 602, 700], 16 * PAGE, 1);
    queues[3].add_chain(&[(2 << 20, 0x10000, VRING_DESC_F_WRITE as u16)]);
    queues[3].wait_used(1);
    let stats = stats_bytes(&[(4, 1 << 20), (5, 4 << 20), (40, 7)]);
    guest
        .mem
        .write_slice(&stats, GuestAddress(17 * PAGE))
        .unwrap();
    queues[2].add_chain(&[(17 * PAGE, stats.len() as u32, 0)]);
    wait_for("stats", || status(&api_socket)["stats_updates"] == 1);

    let now = status(&api_socket);
    assert_eq!(now["connected"], true);
    assert_eq!(now["features"]["acked"], features);
    assert_eq!(now["features"]["stats"], true);
    assert_eq!(now["features"]["reporting"], true);
    assert_eq!(now["features"]["deflate_on_oom"], false);
    assert_eq!(now["invalid_pages"], 4);
    assert_eq!(now["bytes_inflated"], 4 * PAGE);
    assert_eq!(now["bytes_reported"], 0x10000);
    assert_eq!(now["bytes_punched"], 4 * PAGE + 0x10000);
    assert_eq!(now["refused_requests"], 0);
    assert_eq!(now["punch_errors"], 0);
    assert_eq!(now["allocated_bytes"], guest.allocated());
    assert_eq!(now["guest_memory_bytes"], LEN);

    // Stats: the values with their names, and the held buffer goes back to the guest.
    let reply = get(&api_socket, "/api/v1/stats").json();
    assert_eq!(reply["updates"], 1);
    assert_eq!(reply["refresh_requested"], true);
    assert!(reply["received_at_unix_ms"].as_u64().unwrap() > 1_600_000_000_000);
    assert_eq!(
        reply["stats"],
        serde_json::json!([
            {"tag": 4, "name": "free-memory", "value": 1u64 << 20},
            {"tag": 5, "name": "total-memory", "value": 4u64 << 20},
            {"tag": 40, "name": null, "value": 7},
        ])
    );
    assert_eq!(queues[2].wait_used(1), vec![0]);
    let again = get(&api_socket, "/api/v1/stats").json();
    assert_eq!(again["refresh_requested"], false, "no buffer held now");

    // Resize: the config space the frontend reads has the new target.
    let reply = put(&api_socket, "/api/v1/resize", r#"{"target_bytes":1048576}"#);
    assert_eq!(reply.status, 204, "{reply:?}");
    assert!(reply.body.is_empty() && !reply.head.contains("Content-Length"));
    assert_eq!(common::read_config(&mut frontend), (256, 0));
    assert_eq!(status(&api_socket)["target_pages"], 256);
    put(&api_socket, "/api/v1/resize", r#"{"target_bytes":8388608}"#).assert_error(400);

    // The invalid-page map as runs.
    let map = get(&api_socket, "/api/v1/invalid-pages").json();
    assert_eq!(
        map,
        serde_json::json!({
            "page_size": 4096,
            "pages": 4,
            "ranges": [{"gfn": 600, "count": 3}, {"gfn": 700, "count": 1}],
        })
    );

    // A snapshot (the caller would have paused the VM), read back by ext-snapshot.
    let path = dir.path().join("guest.snap");
    let body = format!(r#"{{"destination_url":"file://{}"}}"#, path.display());
    let reply = put(&api_socket, "/api/v1/snapshot", &body);
    assert_eq!(reply.status, 200, "{reply:?}");
    let figures = reply.json();
    let snapshot = SnapshotFile::open(&path).unwrap();
    snapshot.verify_data().unwrap();
    assert_eq!(figures["bytes_written"], snapshot.file_len().unwrap());
    assert_eq!(figures["id"], snapshot.header().id.to_string());
    let counts = snapshot.pages_by_type();
    assert_eq!(
        figures["pages"]["invalid"],
        counts[PageType::Invalid as usize]
    );
    assert_eq!(figures["pages"]["data"], counts[PageType::Data as usize]);
    assert_eq!(
        figures["pages"]["not_populated"],
        counts[PageType::NotPopulated as usize]
    );
    assert_eq!(counts.iter().sum::<u64>(), LEN / PAGE);
    let type_of = |page: u64| {
        let region = &snapshot.regions()[0];
        region
            .runs
            .iter()
            .find(|r| (r.first_page..r.first_page + r.pages).contains(&page))
            .map(|r| r.page_type)
            .unwrap()
    };
    for page in [600, 601, 602, 700] {
        assert_eq!(type_of(page), PageType::Invalid, "page {page}");
    }
    assert_eq!(counts[PageType::Invalid as usize], 4);
    for page in 512..528 {
        assert_eq!(
            type_of(page),
            PageType::NotPopulated,
            "reported page {page}"
        );
    }
    for page in (100..110).chain([0, 599, 603, 1023]) {
        assert_eq!(type_of(page), PageType::Data, "page {page}");
    }
    // Restored, every byte is the guest's (holes and invalid pages read as zero in both).
    let restored = fresh_memory(&snapshot.layout()).unwrap();
    restore_eager(&snapshot, &restored, EagerOptions::default()).unwrap();
    let mut ours = vec![0u8; LEN as usize];
    let mut theirs = vec![0u8; LEN as usize];
    restored.read_slice(&mut ours, GuestAddress(0)).unwrap();
    guest.mem.read_slice(&mut theirs, GuestAddress(0)).unwrap();
    assert!(ours == theirs, "restored memory differs from the guest's");
    assert_eq!(
        &ours[(100 * PAGE) as usize..][..PAGE as usize],
        &page_pattern(100)[..]
    );
    assert_eq!(restored.iter().map(|r| r.len()).sum::<u64>(), LEN);

    // The API goes away with its socket; the vhost-user side does not notice.
    api.shutdown();
    assert!(!api_socket.exists());
    assert_eq!(common::read_config(&mut frontend), (256, 0));
}

#[test]
fn bad_requests_get_4xx_with_json_errors_and_the_daemon_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, socket, api_socket, _api) = start(dir.path());

    // Errors that leave the framing intact keep the connection open.
    let mut client = Client::new(&api_socket);
    let cases: &[(&str, &str, Option<&str>, u16)] = &[
        ("PUT", "/api/v1/resize", Some("{not json"), 400),
        (
            "PUT",
            "/api/v1/resize",
            Some(r#"{"target_bytes":4096,"more":1}"#),
            400,
        ),
        ("PUT", "/api/v1/resize", Some(r#"{"target":4096}"#), 400),
        (
            "PUT",
            "/api/v1/resize",
            Some(r#"{"target_bytes":4097}"#),
            400,
        ),
        (
            "PUT",
            "/api/v1/resize",
            Some(r#"{"target_bytes":-4096}"#),
            400,
        ),
        ("PUT", "/api/v1/resize", None, 400),
        ("GET", "/api/v1/status", Some("{}"), 400),
        ("GET", "/api/v1/nothing-here", None, 404),
        ("GET", "/elsewhere", None, 404),
        (
            "PUT",
            "/api/v1/snapshot",
            Some(r#"{"path":"relative.snap"}"#),
            400,
        ),
        (
            "PUT",
            "/api/v1/snapshot",
            Some(r#"{"destination_url":"http://x/y"}"#),
            400,
        ),
        ("PUT", "/api/v1/snapshot", Some("{}"), 400),
        (
            "PUT",
            "/api/v1/snapshot",
            Some(r#"{"path":"/a","destination_url":"file:///a"}"#),
            400,
        ),
    ];
    for &(method, path, body, expected) in cases {
        let reply = client.request(method, path, body);
        reply.assert_error(expected);
        assert!(!reply.closes(), "{method} {path}: {}", reply.head);
    }
    let reply = client.request("PUT", "/api/v1/status", None);
    reply.assert_error(405);
    assert!(reply.head.contains("\r\nAllow: GET\r\n"), "{}", reply.head);
    let reply = client.request("POST", "/api/v1/snapshot", Some("{}"));
    reply.assert_error(405);
    assert!(reply.head.contains("\r\nAllow: PUT\r\n"));
    assert_eq!(client.request("GET", "/api/v1/status", None).status, 200);
    assert_eq!(
        lock(&backend).balloon().target_pages(),
        0,
        "nothing was resized"
    );

    // Errors in the framing are answered, then the connection closes.
    let framing: &[(&[u8], u16)] = &[
        (b"GARBAGE\0\r\n\r\n", 400),
        (
            b"PUT /api/v1/resize HTTP/1.1\r\nContent-Length: 1048576\r\n\r\n",
            413,
        ),
        (
            b"PUT /api/v1/resize HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            501,
        ),
        (
            b"PUT /api/v1/resize HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            400,
        ),
        (b"PUT /api/v1/resize HTTP/1.1\r\nExpect: tea\r\n\r\n", 417),
    ];
    for &(bytes, expected) in framing {
        let mut client = Client::new(&api_socket);
        client.send_raw(bytes);
        let reply = client.reply();
        reply.assert_error(expected);
        assert!(reply.closes(), "{}", reply.head);
        assert!(client.closed_by_server());
    }
    // An oversized body actually sent: the answer still arrives.
    let mut client = Client::new(&api_socket);
    let big = format!(
        "PUT /api/v1/resize HTTP/1.1\r\nContent-Length: 100000\r\n\r\n{}",
        " ".repeat(100_000)
    );
    client.send_raw(big.as_bytes());
    client.reply().assert_error(413);
    let long_head = format!(
        "GET /api/v1/status HTTP/1.1\r\nX: {}\r\n\r\n",
        "a".repeat(9000)
    );
    let mut client = Client::new(&api_socket);
    client.send_raw(long_head.as_bytes());
    client.reply().assert_error(431);

    // Pipelined requests on one connection, and `Expect: 100-continue`.
    let mut client = Client::new(&api_socket);
    client.send_raw(
        b"GET /api/v1/status HTTP/1.1\r\n\r\n\
          PUT /api/v1/resize HTTP/1.1\r\nContent-Length: 21\r\n\r\n{\"target_bytes\":8192}\
          GET /api/v1/invalid-pages HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(client.reply().status, 200);
    assert_eq!(client.reply().status, 204);
    let last = client.reply();
    assert_eq!(last.status, 200);
    assert!(last.closes());
    let mut client = Client::new(&api_socket);
    client.send_raw(
        b"PUT /api/v1/resize HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 21\r\n\r\n",
    );
    assert_eq!(client.reply().status, 100);
    client.send_raw(b"{\"target_bytes\":4096}");
    assert_eq!(client.reply().status, 204);
    assert_eq!(lock(&backend).balloon().target_pages(), 1);

    // A snapshot that cannot be written leaves nothing behind.
    let guest = Guest::new();
    let mut frontend = Frontend::connect(&socket, 4).unwrap();
    let mut queues = connect(&mut frontend, &guest, BASE_FEATURES, 2, 0);
    // `connected` is set on accept; SET_MEM_TABLE is not acknowledged, so wait for it too.
    wait_for("the memory table", || {
        status(&api_socket)["guest_memory_bytes"] == LEN
    });
    let target = dir.path().join("blocked.snap");
    std::fs::create_dir(dir.path().join("blocked.snap.tmp")).unwrap();
    let body = format!(r#"{{"path":"{}"}}"#, target.display());
    put(&api_socket, "/api/v1/snapshot", &body).assert_error(500);
    assert!(!target.exists());
    let body = format!(r#"{{"path":"{}"}}"#, dir.path().display());
    put(&api_socket, "/api/v1/snapshot", &body).assert_error(400);
    let body = format!(r#"{{"path":"{}/no/such/dir/s"}}"#, dir.path().display());
    put(&api_socket, "/api/v1/snapshot", &body).assert_error(400);

    // After all that, both sides still work.
    send_pfns(&guest, &mut queues[0], &[900], 16 * PAGE, 1);
    assert_eq!(status(&api_socket)["invalid_pages"], 1);
}

#[test]
fn slow_and_surplus_clients_do_not_hold_up_anyone() {
    let dir = tempfile::tempdir().unwrap();
    let api_socket = dir.path().join("api.sock");
    let socket = dir.path().join("balloon.sock");
    let backend = BalloonBackend::shared();
    let mut daemon = Daemon::bind(&socket, backend.clone()).unwrap();
    let limits = ApiLimits {
        idle_timeout: Duration::from_millis(1200),
        request_timeout: Duration::from_millis(1000),
        ..ApiLimits::default()
    };
    let api = ApiServer::start(&api_socket, backend.clone(), None, limits).unwrap();
    std::thread::spawn(move || daemon.run());

    // Half a request holds its own connection only, and only until the request timeout.
    let mut slow = Client::new(&api_socket);
    slow.send_raw(b"GET /api/v1/sta");
    let idle = Client::new(&api_socket);
    let started = Instant::now();
    assert_eq!(status(&api_socket)["connected"], false);
    assert!(started.elapsed() < Duration::from_millis(500));
    // The vhost-user side answers meanwhile.
    let guest = Guest::new();
    let mut frontend = Frontend::connect(&socket, 4).unwrap();
    let _queues = connect(&mut frontend, &guest, BASE_FEATURES, 2, 0);
    // Without the serve loop's flag, a memory table means connected (SET_MEM_TABLE is not
    // acknowledged: wait for the daemon to have handled it).
    wait_for("connected", || status(&api_socket)["connected"] == true);

    slow.reply().assert_error(408);
    assert!(slow.closed_by_server());
    // The idle connection is closed quietly.
    let mut idle = idle;
    assert!(idle.closed_by_server());

    api.shutdown();
    assert!(!api_socket.exists());

    // Over the connection limit (a second server, so no earlier connection counts): 503, and
    // the connections being served are unaffected.
    let limits = ApiLimits {
        max_connections: 2,
        ..ApiLimits::default()
    };
    let api = ApiServer::start(&api_socket, backend, None, limits).unwrap();
    let mut held: Vec<Client> = (0..2).map(|_| Client::new(&api_socket)).collect();
    let mut surplus = Client::new(&api_socket);
    surplus.reply().assert_error(503);
    assert!(surplus.closed_by_server());
    let reply = held[0].request("GET", "/api/v1/status", None);
    assert_eq!(reply.status, 200);
    drop(held);
    drop(api);
    assert!(!api_socket.exists());
}

/// Kills the child when the test ends, pass or fail.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_binary_serves_its_api_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("balloon.sock");
    let api_socket = dir.path().join("api.sock");
    // A stale socket at the path is replaced.
    drop(std::os::unix::net::UnixListener::bind(&api_socket).unwrap());
    let child = Command::new(env!("CARGO_BIN_EXE_vhost-user-mem"))
        .arg("--socket")
        .arg(&socket)
        .arg("--api-socket")
        .arg(&api_socket)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Reaper(child);
    wait_for("the API socket", || {
        UnixStream::connect(&api_socket).is_ok()
    });
    let mode = std::fs::metadata(&api_socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let now = status(&api_socket);
    assert_eq!(now["connected"], false);
    assert_eq!(now["target_pages"], 0);

    let guest = Guest::new();
    let mut frontend = Frontend::connect(&socket, 4).unwrap();
    let _queues = connect(&mut frontend, &guest, BASE_FEATURES, 2, 0);
    wait_for("connected", || status(&api_socket)["connected"] == true);
    let reply = put(&api_socket, "/api/v1/resize", r#"{"target_bytes":65536}"#);
    assert_eq!(reply.status, 204);
    assert_eq!(common::read_config(&mut frontend), (16, 0));
    assert!(child.0.try_wait().unwrap().is_none(), "the daemon exited");

    let status_code = Command::new(env!("CARGO_BIN_EXE_vhost-user-mem"))
        .args([
            "--socket",
            "/tmp/vum-a.sock",
            "--api-socket",
            "/tmp/vum-a.sock",
        ])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status_code.code(), Some(2));
}

const PAGE_SERVER: &str = "/api/v1/page-server";

/// Whether nothing at all is at `path` (not even a dangling socket file).
fn absent(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_err()
}

/// The body of a `PUT /api/v1/page-server`.
fn serve_body(snapshot: &Path, socket: &Path) -> String {
    serde_json::json!({"snapshot": snapshot, "socket": socket, "prefault": false}).to_string()
}

#[test]
fn a_page_server_started_over_the_api_serves_the_daemons_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let (_backend, socket, api_socket, api) = start(dir.path());

    // The guest: every page 0x5a (Guest::new), pages 100..110 a pattern, 600 and 601 inflated.
    let guest = patterned_guest();
    let mut frontend = Frontend::connect(&socket, 4).unwrap();
    let mut queues = connect(&mut frontend, &guest, BASE_FEATURES, 2, 0);
    wait_for("connected", || status(&api_socket)["connected"] == true);
    send_pfns(&guest, &mut queues[0], &[600, 601], 16 * PAGE, 1);
    let snapshot_path = dir.path().join("guest.snap");
    let body = format!(r#"{{"path":"{}"}}"#, snapshot_path.display());
    let reply = put(&api_socket, "/api/v1/snapshot", &body);
    assert_eq!(reply.status, 200, "{reply:?}");
    let snapshot = SnapshotFile::open(&snapshot_path).unwrap();
    let id = snapshot.header().id.to_string();

    // None runs yet.
    let none = get(&api_socket, PAGE_SERVER).json();
    assert_eq!(none["running"], false);
    assert_eq!(none["socket"], Value::Null);
    assert_eq!(none["counters"], Value::Null);
    delete(&api_socket, PAGE_SERVER).assert_error(409);

    // Snapshots that cannot be served: 400 with the page server's error, nothing running,
    // no socket.
    let pages_socket = dir.path().join("pages.sock");
    let bytes = std::fs::read(&snapshot_path).unwrap();
    let extent = snapshot.regions()[0]
        .runs
        .iter()
        .find_map(|run| run.extent)
        .unwrap();
    let corrupt = dir.path().join("corrupt.snap");
    let mut damaged = bytes.clone();
    damaged[extent.offset as usize + 77] ^= 0x10;
    std::fs::write(&corrupt, &damaged).unwrap();
    let truncated = dir.path().join("truncated.snap");
    std::fs::write(&truncated, &bytes[..bytes.len() - 4096]).unwrap();
    let missing = dir.path().join("missing.snap");
    for (file, expected) in [
        (&corrupt, "checksum"),
        (&truncated, "truncated.snap"),
        (&missing, "missing.snap"),
    ] {
        let reply = put(&api_socket, PAGE_SERVER, &serve_body(file, &pages_socket));
        reply.assert_error(400);
        let text = reply.json().to_string();
        assert!(text.contains(expected), "{}: {text}", file.display());
        assert!(absent(&pages_socket), "{}", file.display());
        assert_eq!(get(&api_socket, PAGE_SERVER).json()["running"], false);
    }
    // A path someone listens on (the API's own socket) is not taken over.
    let reply = put(
        &api_socket,
        PAGE_SERVER,
        &serve_body(&snapshot_path, &api_socket),
    );
    reply.assert_error(409);
    assert_eq!(get(&api_socket, PAGE_SERVER).json()["running"], false);
    assert_eq!(status(&api_socket)["connected"], true);
    let reply = Client::new(&api_socket).request("POST", PAGE_SERVER, Some("{}"));
    reply.assert_error(405);
    assert!(
        reply.head.contains("\r\nAllow: GET, PUT, DELETE\r\n"),
        "{}",
        reply.head
    );

    // Started, the snapshot named as a URL.
    let body = serde_json::json!({
        "snapshot_url": format!("file://{}", snapshot_path.display()),
        "socket": pages_socket,
    });
    let reply = put(&api_socket, PAGE_SERVER, &body.to_string());
    assert_eq!(reply.status, 200, "{reply:?}");
    let started = reply.json();
    assert_eq!(started["running"], true);
    assert_eq!(started["snapshot"], snapshot_path.to_str().unwrap());
    assert_eq!(started["socket"], pages_socket.to_str().unwrap());
    assert_eq!(started["prefault"], false);
    assert_eq!(started["snapshot_id"], id);
    assert_eq!(
        started["data_pages"],
        snapshot.pages_by_type()[PageType::Data as usize]
    );
    assert_eq!(started["counters"]["connections"], 0);
    let mode = std::fs::metadata(&pages_socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // One at a time.
    let other_socket = dir.path().join("other.sock");
    let reply = put(
        &api_socket,
        PAGE_SERVER,
        &serve_body(&snapshot_path, &other_socket),
    );
    reply.assert_error(409);
    assert!(absent(&other_socket));
    let now = get(&api_socket, PAGE_SERVER).json();
    assert_eq!(now["running"], true);
    assert_eq!(now["socket"], pages_socket.to_str().unwrap());
    assert_eq!(now["snapshot_id"], id);

    // A restoring VMM: fresh memory registered with a real userfaultfd, faults served by the
    // daemon's page server.
    let test = "a_page_server_started_over_the_api_serves_the_daemons_snapshot (restore)";
    let restored = userfaultfd_available(test).then(|| {
        let memory = Arc::new(fresh_memory(&snapshot.layout()).unwrap());
        let (failed, failures) = mpsc::channel();
        let hook = Box::new(move |error: &str| {
            let _ = failed.send(error.to_string());
        });
        let connection = connect_memory(&pages_socket, &memory, Some(&id), hook).unwrap();
        assert_eq!(connection.accepted().snapshot_id, id);
        // Read on another thread: the faults must be served by the server, not by us.
        let reader = memory.clone();
        let pages = std::thread::spawn(move || {
            [100, 101, 109, 50, 600, 601, 1023].map(|page| {
                let mut bytes = vec![0u8; PAGE as usize];
                reader
                    .read_slice(&mut bytes, GuestAddress(page * PAGE))
                    .unwrap();
                bytes
            })
        })
        .join()
        .unwrap();
        for (at, page) in [100, 101, 109].into_iter().enumerate() {
            assert!(pages[at] == page_pattern(page), "data page {page} differs");
        }
        assert!(pages[3].iter().all(|&b| b == 0x5a), "data page 50 differs");
        assert!(
            pages[6].iter().all(|&b| b == 0x5a),
            "data page 1023 differs"
        );
        for at in [4, 5] {
            assert!(
                pages[at].iter().all(|&b| b == 0),
                "an inflated page is not zero"
            );
        }
        let counters = get(&api_socket, PAGE_SERVER).json()["counters"].clone();
        assert_eq!(counters["connections"], 1);
        assert_eq!(counters["sessions"], 1);
        assert_eq!(counters["active_sessions"], 1);
        assert_eq!(counters["failed_sessions"], 0);
        assert!(counters["faults"].as_u64().unwrap() >= 2, "{counters}");
        assert!(
            counters["data_pages_copied"].as_u64().unwrap() >= 5,
            "{counters}"
        );
        assert!(
            counters["zero_pages_mapped"].as_u64().unwrap() >= 1,
            "{counters}"
        );
        assert!(failures.try_recv().is_err() && connection.failure().is_none());
        drop(connection);
        wait_for("the session to end", || {
            get(&api_socket, PAGE_SERVER).json()["counters"]["active_sessions"] == 0
        });
        memory
    });

    // DELETE stops it: the socket is gone and a new VMM cannot connect.
    let reply = delete(&api_socket, PAGE_SERVER);
    assert_eq!(reply.status, 204, "{reply:?}");
    assert!(absent(&pages_socket));
    assert!(UnixStream::connect(&pages_socket).is_err());
    if let Some(memory) = restored {
        let fresh = fresh_memory(&snapshot.layout()).unwrap();
        let refused = connect_memory(&pages_socket, &fresh, None, Box::new(|_| {}));
        assert!(refused.is_err(), "a VMM connected after DELETE");
        drop(memory);
    }
    let after = get(&api_socket, PAGE_SERVER).json();
    assert_eq!(after["running"], false);
    assert_eq!(after["snapshot"], Value::Null);
    delete(&api_socket, PAGE_SERVER).assert_error(409);

    // It can be started again, with prefault; it ends with the API (and so the daemon).
    let body =
        serde_json::json!({"snapshot": snapshot_path, "socket": pages_socket, "prefault": true});
    let reply = put(&api_socket, PAGE_SERVER, &body.to_string());
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json()["prefault"], true);
    assert!(UnixStream::connect(&pages_socket).is_ok());
    api.shutdown();
    assert!(absent(&pages_socket));
    assert!(UnixStream::connect(&pages_socket).is_err());
}
