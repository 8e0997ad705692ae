//! Cloud Hypervisor interop: a snapshot directory shaped like the one Cloud Hypervisor v53
//! writes (no Cloud Hypervisor binary is available here, so the fixture is generated) is
//! imported and exported back; `memory-ranges` must come back byte-identical and with holes
//! exactly where the original had them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use ext_snapshot::cloud_hypervisor::{export, import, sidecar_dir, ChError};
use ext_snapshot::{
    fresh_memory, restore_eager, EagerOptions, PageType, SnapshotFile, WriteOptions, PAGE_SIZE,
};
use vm_memory::{Bytes, GuestAddress};

/// RAM like Cloud Hypervisor lays it out on x86-64: below the 32-bit hole and above 4 GiB.
const RAM: [(u64, u64); 2] = [(0, 2 << 20), (4 << 30, 1 << 20)];

#[derive(Clone, Copy, PartialEq, Debug)]
enum Fill {
    /// Random bytes.
    Data,
    /// Written zeros (allocated blocks, as a dense anonymous-memory dump has).
    Zeros,
    /// Not written: a hole, as Cloud Hypervisor leaves for never-populated shared memory.
    Hole,
}

struct Range {
    gpa: u64,
    pages: u64,
    fills: Vec<Fill>,
}

/// The saved ranges in table order: not sorted (Cloud Hypervisor walks zones from a hash map),
/// several ranges per region (its sparse policy splits regions at holes), a gap that is not
/// saved at all.
fn ranges() -> Vec<Range> {
    let pattern = |pages: u64, seed: u64| -> Vec<Fill> {
        (0..pages)
            .map(|p| match (p * 7 + seed) % 11 {
                0..=4 => Fill::Data,
                5 | 6 => Fill::Zeros,
                _ => Fill::Hole,
            })
            .collect()
    };
    vec![
        Range {
            gpa: 4 << 30,
            pages: 200,
            fills: pattern(200, 3),
        },
        Range {
            gpa: 0,
            pages: 300,
            fills: pattern(300, 1),
        },
        Range {
            gpa: 320 * PAGE_SIZE,
            pages: 192,
            fills: pattern(192, 5),
        },
        // A range that is all hole, and a trailing hole at the end of the file.
        Range {
            gpa: (4 << 30) + 200 * PAGE_SIZE,
            pages: 16,
            fills: vec![Fill::Hole; 16],
        },
    ]
}

fn page_bytes(gpa: u64) -> Vec<u8> {
    let mut state = gpa | 1;
    let mut bytes = vec![0u8; PAGE_SIZE as usize];
    for chunk in bytes.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes());
    }
    bytes
}

/// Writes `config.json`, `state.json` and a sparse `memory-ranges` into `dir`.
fn write_fixture(dir: &Path) {
    let ranges = ranges();
    let table: Vec<serde_json::Value> = ranges
        .iter()
        .map(|r| serde_json::json!({"gpa": r.gpa, "length": r.pages * PAGE_SIZE}))
        .collect();
    let mappings: Vec<serde_json::Value> = RAM
        .iter()
        .enumerate()
        .map(|(slot, &(gpa, size))| {
            serde_json::json!({"slot": slot, "gpa": gpa, "size": size, "zone_id": "mem0",
                               "virtio_mem": false, "file_offset": 0})
        })
        .collect();
    let memory_manager = serde_json::json!({
        "memory_ranges": {"data": table},
        "guest_ram_mappings": mappings,
        "start_of_device_area": 0xc000_0000u64,
        "boot_ram": 3u64 << 20,
        "current_ram": 3u64 << 20,
        "arch_mem_regions": [{"base": 0, "size": 2 << 20, "r_type": "Ram"}],
        "hotplug_slots": [],
        "next_memory_slot": 2,
        "selected_slot": 0,
        "next_hotplug_slot": 0
    });
    let state = serde_json::json!({
        "snapshots": {
            "cpu-manager": {"snapshots": {}, "snapshot_data": {"state": "{\"vcpus\":[]}"}},
            "device-manager": {"snapshots": {}, "snapshot_data": {"state": "{\"devices\":{}}"}},
            "memory-manager": {"snapshots": {},
                               "snapshot_data": {"state": memory_manager.to_string()}}
        },
        "snapshot_data": {"state": "{\"clock\":null}"}
    });
    std::fs::write(dir.join("state.json"), serde_json::to_vec(&state).unwrap()).unwrap();
    std::fs::write(
        dir.join("config.json"),
        br#"{"cpus":{"boot_vcpus":1},"memory":{"size":3145728,"shared":true},"payload":{"kernel":"/k"}}"#,
    )
    .unwrap();
    let file = File::create(dir.join("memory-ranges")).unwrap();
    let total: u64 = ranges.iter().map(|r| r.pages * PAGE_SIZE).sum();
    file.set_len(total).unwrap();
    let mut offset = 0;
    for range in &ranges {
        for (page, fill) in range.fills.iter().enumerate() {
            let gpa = range.gpa + page as u64 * PAGE_SIZE;
            match fill {
                Fill::Data => file.write_all_at(&page_bytes(gpa), offset).unwrap(),
                Fill::Zeros => file
                    .write_all_at(&[0u8; PAGE_SIZE as usize], offset)
                    .unwrap(),
                Fill::Hole => {}
            }
            offset += PAGE_SIZE;
        }
    }
    file.sync_all().unwrap();
}

/// `(offset, length)` of every data extent of `path`, from SEEK_DATA/SEEK_HOLE.
fn data_map(path: &Path) -> Vec<(u64, u64)> {
    let file = File::open(path).unwrap();
    let len = file.metadata().unwrap().len();
    ext_snapshot::sparse::data_extents(&file, 0, len)
        .unwrap()
        .into_iter()
        .map(|r| (r.start, r.end - r.start))
        .collect()
}

#[test]
fn import_then_export_gives_back_identical_sparse_files() {
    let work = tempfile::tempdir().unwrap();
    let original = work.path().join("ch");
    std::fs::create_dir(&original).unwrap();
    write_fixture(&original);
    let snapshot = work.path().join("vm.snap");
    let report = import(&original, &snapshot, WriteOptions::default()).unwrap();

    let data_pages = ranges()
        .iter()
        .flat_map(|r| r.fills.clone())
        .filter(|f| *f == Fill::Data)
        .count() as u64;
    let zero_pages = ranges()
        .iter()
        .flat_map(|r| r.fills.clone())
        .filter(|f| *f == Fill::Zeros)
        .count() as u64;
    assert_eq!(report.snapshot.pages(PageType::Data), data_pages);
    assert_eq!(report.snapshot.pages(PageType::Zero), zero_pages);
    let ram_pages: u64 = RAM.iter().map(|&(_, s)| s / PAGE_SIZE).sum();
    assert_eq!(report.snapshot.total_pages(), ram_pages);
    assert!(sidecar_dir(&snapshot).join("state.json").exists());

    let exported = work.path().join("out");
    export(&snapshot, &exported).unwrap();
    for name in ["config.json", "state.json", "memory-ranges"] {
        assert!(
            std::fs::read(original.join(name)).unwrap()
                == std::fs::read(exported.join(name)).unwrap(),
            "{name} differs"
        );
    }
    let holes_before = data_map(&original.join("memory-ranges"));
    assert!(
        holes_before.len() > 10,
        "the fixture should be sparse: {holes_before:?}"
    );
    assert_eq!(
        holes_before,
        data_map(&exported.join("memory-ranges")),
        "holes moved"
    );
}

#[test]
fn imported_snapshot_restores_the_guest_memory() {
    let work = tempfile::tempdir().unwrap();
    let original = work.path().join("ch");
    std::fs::create_dir(&original).unwrap();
    write_fixture(&original);
    let path = work.path().join("vm.snap");
    import(&original, &path, WriteOptions::default()).unwrap();
    let snapshot = SnapshotFile::open(&path).unwrap();
    assert_eq!(snapshot.layout(), RAM.to_vec());
    let memory = fresh_memory(&snapshot.layout()).unwrap();
    restore_eager(&snapshot, &memory, EagerOptions::default()).unwrap();
    for range in ranges() {
        for (page, fill) in range.fills.iter().enumerate() {
            let gpa = range.gpa + page as u64 * PAGE_SIZE;
            let mut actual = vec![0u8; PAGE_SIZE as usize];
            memory.read_slice(&mut actual, GuestAddress(gpa)).unwrap();
            let expected = match fill {
                Fill::Data => page_bytes(gpa),
                _ => vec![0u8; PAGE_SIZE as usize],
            };
            assert!(actual == expected, "page {gpa:#x} ({fill:?}) differs");
        }
    }
}

#[test]
fn broken_directories_are_rejected() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("ch");
    std::fs::create_dir(&dir).unwrap();
    write_fixture(&dir);
    let out = work.path().join("x.snap");

    // memory-ranges shorter than the table says.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("memory-ranges"))
        .unwrap();
    let len = file.metadata().unwrap().len();
    file.set_len(len - PAGE_SIZE).unwrap();
    assert!(matches!(
        import(&dir, &out, WriteOptions::default()),
        Err(ChError::Inconsistent(_))
    ));
    file.set_len(len + PAGE_SIZE).unwrap();
    assert!(matches!(
        import(&dir, &out, WriteOptions::default()),
        Err(ChError::Inconsistent(_))
    ));
    file.set_len(len).unwrap();

    // No memory manager.
    let state = std::fs::read(dir.join("state.json")).unwrap();
    std::fs::write(
        dir.join("state.json"),
        br#"{"snapshots":{},"snapshot_data":null}"#,
    )
    .unwrap();
    assert!(matches!(
        import(&dir, &out, WriteOptions::default()),
        Err(ChError::NoMemoryManager)
    ));
    std::fs::write(dir.join("state.json"), &state).unwrap();

    // Missing config.json.
    std::fs::rename(dir.join("config.json"), dir.join("config.bak")).unwrap();
    assert!(matches!(
        import(&dir, &out, WriteOptions::default()),
        Err(ChError::Io(..))
    ));
    std::fs::rename(dir.join("config.bak"), dir.join("config.json")).unwrap();

    // Export needs the sidecar and refuses to overwrite.
    import(&dir, &out, WriteOptions::default()).unwrap();
    std::fs::remove_dir_all(sidecar_dir(&out)).unwrap();
    assert!(matches!(
        export(&out, &work.path().join("e")),
        Err(ChError::NoChMetadata)
    ));
    import(&dir, &out, WriteOptions::default()).unwrap();
    assert!(matches!(export(&out, &dir), Err(ChError::Io(..))));
}
