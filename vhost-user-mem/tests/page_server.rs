//! The lazy page server on real memory: the server (in a thread) and a "VMM" (this test) that
//! maps fresh memory, registers it with a real userfaultfd and hands it over a real unix
//! socket, then reads pages from other threads. Data pages equal the snapshot's data, other
//! pages read zero and are never prefaulted (unless asked), sequential faults are batched; a
//! damaged or truncated snapshot is refused at start; an extent damaged after start gives the
//! VMM the error while its fault stays blocked (never a zero page); bad hellos are refused and
//! the server keeps serving the next VMM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::userfaultfd_available;
use ext_snapshot::{fresh_memory, PageType, SnapshotFile, SnapshotWriter, WriteOptions, PAGE_SIZE};
use vhost_user_mem::page_server::client::{connect, connect_memory, region_table};
use vhost_user_mem::page_server::protocol::{Message, RegionMapping, PROTOCOL_VERSION};
use vhost_user_mem::page_server::{PageServer, RunningServer, ServeConfig};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

/// Two regions, as a VMM splits RAM around the MMIO gap.
const LAYOUT: [(u64, u64); 2] = [(0, 4 << 20), (0x1_0000_0000, 1 << 20)];

/// What a page of the fixture holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Data,
    Zero,
    Untouched,
}

/// Region 0: pages 0..300 data (one run), 300..310 written zeros, 400..420 data, the rest
/// untouched; region 1: every 7th page data.
fn kind(region: usize, page: u64) -> Kind {
    match (region, page) {
        (0, 0..300) | (0, 400..420) => Kind::Data,
        (0, 300..310) => Kind::Zero,
        (1, p) if p % 7 == 0 => Kind::Data,
        _ => Kind::Untouched,
    }
}

fn pattern(region: usize, page: u64) -> Vec<u8> {
    (0..PAGE_SIZE)
        .map(|i| (i as u8) ^ (page as u8).wrapping_mul(31) ^ (region as u8 + 1))
        .collect()
}

fn pages(region: usize) -> u64 {
    LAYOUT[region].1 / PAGE_SIZE
}

fn address(region: usize, page: u64) -> GuestAddress {
    GuestAddress(LAYOUT[region].0 + page * PAGE_SIZE)
}

/// Writes the fixture's memory as a snapshot at `path`.
fn write_snapshot(path: &Path) {
    let memory = fresh_memory(&LAYOUT).unwrap();
    for region in 0..LAYOUT.len() {
        for page in 0..pages(region) {
            match kind(region, page) {
                Kind::Data => memory
                    .write_slice(&pattern(region, page), address(region, page))
                    .unwrap(),
                Kind::Zero => memory
                    .write_slice(&vec![0; PAGE_SIZE as usize], address(region, page))
                    .unwrap(),
                Kind::Untouched => {}
            }
        }
    }
    SnapshotWriter::new(WriteOptions::default())
        .write_file(&memory, path)
        .unwrap();
    let counts = SnapshotFile::open(path).unwrap().pages_by_type();
    assert_eq!(counts[PageType::Data as usize], 320 + pages(1).div_ceil(7));
    assert_eq!(counts[PageType::Zero as usize], 10);
}

struct Fixture {
    _dir: tempfile::TempDir,
    snapshot: PathBuf,
    socket: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("memory.ext-snapshot");
    write_snapshot(&snapshot);
    let socket = dir.path().join("pages.sock");
    Fixture {
        _dir: dir,
        snapshot,
        socket,
    }
}

fn start(fixture: &Fixture, prefault: bool) -> RunningServer {
    PageServer::bind(&ServeConfig {
        snapshot: fixture.snapshot.clone(),
        socket: fixture.socket.clone(),
        prefault,
    })
    .unwrap()
    .spawn()
    .unwrap()
}

fn snapshot_id(fixture: &Fixture) -> String {
    SnapshotFile::open(&fixture.snapshot)
        .unwrap()
        .header()
        .id
        .to_string()
}

fn present(memory: &GuestMemoryMmap, region: usize, page: u64) -> bool {
    let host = memory.get_host_address(address(region, page)).unwrap() as u64;
    let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
    let mut entry = [0u8; 8];
    pagemap
        .read_exact_at(&mut entry, host / PAGE_SIZE * 8)
        .unwrap();
    u64::from_le_bytes(entry) & (1 << 63) != 0
}

fn read_page(memory: &GuestMemoryMmap, region: usize, page: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; PAGE_SIZE as usize];
    memory
        .read_slice(&mut bytes, address(region, page))
        .unwrap();
    bytes
}

/// Reads every page on another thread (faults must be served by the server, not by us) and
/// checks it against the fixture.
fn check_all_pages(memory: &Arc<GuestMemoryMmap>) {
    let memory = memory.clone();
    std::thread::spawn(move || {
        for region in 0..LAYOUT.len() {
            for page in 0..pages(region) {
                let bytes = read_page(&memory, region, page);
                match kind(region, page) {
                    Kind::Data => assert!(
                        bytes == pattern(region, page),
                        "data page {region}/{page} differs"
                    ),
                    _ => assert!(
                        bytes.iter().all(|&b| b == 0),
                        "page {region}/{page} without data is not zero"
                    ),
                }
            }
        }
    })
    .join()
    .unwrap();
}

fn no_failure() -> Box<dyn FnOnce(&str) + Send> {
    Box::new(|error| panic!("unexpected page server failure: {error}"))
}

#[test]
fn pages_are_served_on_fault_batched_and_nothing_is_prefaulted() {
    if !userfaultfd_available("pages_are_served_on_fault_batched_and_nothing_is_prefaulted") {
        return;
    }
    let fixture = fixture();
    let server = start(&fixture, false);
    let memory = Arc::new(fresh_memory(&LAYOUT).unwrap());
    let id = snapshot_id(&fixture);
    let connection = connect_memory(&fixture.socket, &memory, Some(&id), no_failure()).unwrap();
    assert_eq!(connection.accepted().snapshot_id, id);
    assert!(!connection.accepted().prefault);
    std::thread::sleep(Duration::from_millis(100));
    for region in 0..LAYOUT.len() {
        assert!(
            (0..pages(region)).all(|page| !present(&memory, region, page)),
            "region {region}: a page was populated before any fault"
        );
    }

    // One fault on the first page of a 300-page data run brings the run in with it.
    let reader = memory.clone();
    std::thread::spawn(move || read_page(&reader, 0, 0))
        .join()
        .unwrap();
    assert!(present(&memory, 0, 1) && present(&memory, 0, 299));
    assert!(!present(&memory, 0, 300), "a zero page was prefaulted");
    assert!(!present(&memory, 0, 400), "another run was prefaulted");

    check_all_pages(&memory);
    assert!(connection.failure().is_none());
    drop(connection);
    server.stop().unwrap();
}

#[test]
fn prefault_copies_data_pages_only_in_the_background() {
    if !userfaultfd_available("prefault_copies_data_pages_only_in_the_background") {
        return;
    }
    let fixture = fixture();
    let server = start(&fixture, true);
    let memory = Arc::new(fresh_memory(&LAYOUT).unwrap());
    let connection = connect_memory(&fixture.socket, &memory, None, no_failure()).unwrap();
    assert!(connection.accepted().prefault);
    let all_data_present = || {
        (0..LAYOUT.len()).all(|region| {
            (0..pages(region))
                .filter(|&page| kind(region, page) == Kind::Data)
                .all(|page| present(&memory, region, page))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !all_data_present() {
        assert!(
            Instant::now() < deadline,
            "the data pages were not prefaulted"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for region in 0..LAYOUT.len() {
        for page in (0..pages(region)).filter(|&p| kind(region, p) != Kind::Data) {
            assert!(
                !present(&memory, region, page),
                "page {region}/{page} without data was prefaulted"
            );
        }
    }
    check_all_pages(&memory);
    drop(connection);
    server.stop().unwrap();
}

#[test]
fn damaged_or_truncated_snapshots_are_refused_at_start() {
    let fixture = fixture();
    let config = |snapshot: &Path| ServeConfig {
        snapshot: snapshot.to_path_buf(),
        socket: fixture.socket.clone(),
        prefault: false,
    };
    let bytes = std::fs::read(&fixture.snapshot).unwrap();
    let extent = first_extent(&fixture.snapshot);
    let damaged = fixture.snapshot.with_extension("damaged");
    let mut copy = bytes.clone();
    copy[extent.offset as usize + 123] ^= 0x40;
    std::fs::write(&damaged, &copy).unwrap();
    let error = PageServer::bind(&config(&damaged))
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("checksum"), "{error}");

    let truncated = fixture.snapshot.with_extension("truncated");
    std::fs::write(&truncated, &bytes[..bytes.len() - 4096]).unwrap();
    assert!(PageServer::bind(&config(&truncated)).is_err());
    let missing = fixture.snapshot.with_extension("missing");
    let error = PageServer::bind(&config(&missing))
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("missing"), "{error}");
    assert!(
        !fixture.socket.exists(),
        "a refused snapshot must not listen"
    );
}

fn first_extent(snapshot: &Path) -> ext_snapshot::Extent {
    SnapshotFile::open(snapshot).unwrap().regions()[0]
        .runs
        .iter()
        .find_map(|run| run.extent)
        .unwrap()
}

#[test]
fn an_extent_damaged_after_start_fails_the_vm_and_its_fault_stays_blocked() {
    if !userfaultfd_available(
        "an_extent_damaged_after_start_fails_the_vm_and_its_fault_stays_blocked",
    ) {
        return;
    }
    let fixture = fixture();
    let server = start(&fixture, false);
    let extent = first_extent(&fixture.snapshot);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&fixture.snapshot)
        .unwrap();
    file.write_all_at(&[0xa5; 16], extent.offset + 100).unwrap();
    drop(file);

    let memory = Arc::new(fresh_memory(&LAYOUT).unwrap());
    let (failed, failures) = mpsc::channel();
    let connection = connect_memory(
        &fixture.socket,
        &memory,
        None,
        Box::new(move |error| {
            let _ = failed.send(error.to_string());
        }),
    )
    .unwrap();
    let touched = Arc::new(AtomicBool::new(false));
    let guest = {
        let (memory, touched) = (memory.clone(), touched.clone());
        std::thread::spawn(move || {
            let page = read_page(&memory, 0, 0);
            touched.store(true, Ordering::SeqCst);
            page
        })
    };
    let error = failures
        .recv_timeout(Duration::from_secs(30))
        .expect("the failure hook was not called");
    assert!(error.contains("checksum"), "{error}");
    assert!(connection.failure().is_some_and(|f| f.contains("checksum")));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !touched.load(Ordering::SeqCst),
        "the faulting thread went on after the server failed"
    );
    // The VMM has "stopped its guest": letting go releases the fault, it must not hang.
    drop(connection);
    let started = Instant::now();
    let page = guest.join().unwrap();
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(page != pattern(0, 0), "damaged data reached guest memory");
    server.stop().unwrap();
}

/// Sends raw bytes (and maybe a descriptor) and returns the server's answer line.
fn raw_hello(socket: &Path, bytes: &[u8], fd: Option<i32>) -> String {
    let stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    match fd {
        Some(fd) => {
            use vmm_sys_util::sock_ctrl_msg::ScmSocket;
            stream.send_with_fd(bytes, fd).unwrap();
        }
        None => (&stream).write_all(bytes).unwrap(),
    }
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    match Message::decode(line.trim_end().as_bytes()).unwrap() {
        Message::Error { error, .. } => error,
        other => panic!("a bad hello was answered with {other:?}"),
    }
}

fn hello(regions: Vec<RegionMapping>) -> Vec<u8> {
    Message::Hello {
        version: PROTOCOL_VERSION,
        snapshot_id: None,
        regions,
    }
    .encode()
    .unwrap()
}

#[test]
fn bad_hellos_are_refused_and_the_next_vm_is_served() {
    if !userfaultfd_available("bad_hellos_are_refused_and_the_next_vm_is_served") {
        return;
    }
    let fixture = fixture();
    let server = start(&fixture, false);
    let memory = Arc::new(fresh_memory(&LAYOUT).unwrap());
    let good = region_table(&memory);

    let error = raw_hello(&fixture.socket, b"{this is not json\n", None);
    assert!(error.contains("not JSON"), "{error}");
    let error = raw_hello(
        &fixture.socket,
        br#"{"type":"hello","version":7,"regions":[]}
"#,
        None,
    );
    assert!(error.contains("version 7"), "{error}");
    let error = raw_hello(&fixture.socket, &hello(good.clone()), None);
    assert!(error.contains("exactly one file descriptor"), "{error}");
    let null = std::fs::File::open("/dev/null").unwrap();
    let error = raw_hello(
        &fixture.socket,
        &hello(good.clone()),
        Some(null.as_raw_fd()),
    );
    assert!(error.contains("not a userfaultfd"), "{error}");

    let uffd = || {
        userfaultfd::UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .create()
            .unwrap()
    };
    let mut wrong_size = good.clone();
    wrong_size[1].size *= 2;
    let refused = connect(&fixture.socket, uffd(), &wrong_size, None, no_failure());
    let error = refused.err().unwrap().to_string();
    assert!(error.contains("does not match the snapshot"), "{error}");
    let mut wrong_address = good.clone();
    wrong_address[0].guest_phys_addr = 0x10_0000;
    let error = connect(&fixture.socket, uffd(), &wrong_address, None, no_failure())
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("does not match the snapshot"), "{error}");
    let error = connect(&fixture.socket, uffd(), &good[..1], None, no_failure())
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("1 regions given, the snapshot has 2"),
        "{error}"
    );
    let error = connect(&fixture.socket, uffd(), &good, Some("00ff"), no_failure())
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("restores snapshot 00ff"), "{error}");
    // A connection that hangs up without a hello costs nothing.
    drop(UnixStream::connect(&fixture.socket).unwrap());

    let connection = connect_memory(&fixture.socket, &memory, None, no_failure()).unwrap();
    check_all_pages(&memory);
    drop(connection);
    // And one more VM after that one.
    let memory = Arc::new(fresh_memory(&LAYOUT).unwrap());
    let connection = connect_memory(&fixture.socket, &memory, None, no_failure()).unwrap();
    check_all_pages(&memory);
    drop(connection);
    server.stop().unwrap();
}
