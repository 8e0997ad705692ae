//! The `ext-snapshot` binary, run as a user would: every subcommand on real files, exit
//! status 0 on success, non-zero with one line on stderr otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};

const PAGE: u64 = 4096;
const PAGES: u64 = 512;

fn ext_snapshot(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ext-snapshot"))
        .args(args)
        .output()
        .expect("running ext-snapshot")
}

fn ok(args: &[&str]) -> String {
    let output = ext_snapshot(args);
    assert!(
        output.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let output = ext_snapshot(args);
    assert!(!output.status.success(), "{args:?} succeeded");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr:?}"
    );
    stderr
}

fn page(seed: u64) -> Vec<u8> {
    (0..PAGE)
        .map(|i| ((i * 31 + seed * 17) % 251) as u8 + 1)
        .collect()
}

/// A sparse raw memory file: pages 0..64 data, 64..96 written zeros, 96..128 data (invalid
/// in the bitmap), 128.. holes except a data page every 50 pages.
fn raw_memory(path: &Path) -> Vec<u8> {
    let file = File::create(path).unwrap();
    file.set_len(PAGES * PAGE).unwrap();
    let mut expected = vec![0u8; (PAGES * PAGE) as usize];
    for p in 0..PAGES {
        let bytes = match p {
            0..64 | 96..128 => page(p),
            64..96 => vec![0u8; PAGE as usize],
            _ if p % 50 == 0 => page(p),
            _ => continue,
        };
        file.write_all_at(&bytes, p * PAGE).unwrap();
        if !(96..128).contains(&p) {
            expected[(p * PAGE) as usize..((p + 1) * PAGE) as usize].copy_from_slice(&bytes);
        }
    }
    expected
}

fn bitmap(path: &Path, pages: std::ops::Range<u64>) {
    let mut words = vec![0u64; PAGES.div_ceil(64) as usize];
    for p in pages {
        words[(p / 64) as usize] |= 1 << (p % 64);
    }
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

fn allocated_pages(path: &Path) -> u64 {
    let file = File::open(path).unwrap();
    let len = file.metadata().unwrap().len();
    ext_snapshot::sparse::data_extents(&file, 0, len)
        .unwrap()
        .iter()
        .map(|r| (r.end - r.start) / PAGE)
        .sum()
}

#[test]
fn create_inspect_verify_restore_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let expected = raw_memory(Path::new(&p("mem.raw")));
    bitmap(Path::new(&p("invalid.bin")), 96..128);
    ok(&[
        "create",
        "--from",
        &p("mem.raw"),
        "--out",
        &p("s.snap"),
        "--invalid-pages",
        &p("invalid.bin"),
        "--fsync",
    ]);

    let json: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", &p("s.snap"), "--json"])).unwrap();
    let data_pages = 64 + (128..PAGES).filter(|p| p % 50 == 0).count() as u64;
    assert_eq!(json["pages"]["data"], data_pages);
    assert_eq!(json["pages"]["zero"], 32);
    assert_eq!(json["pages"]["invalid"], 32);
    assert_eq!(json["pages"]["not-populated"], PAGES - data_pages - 64);
    assert_eq!(json["guest_bytes"], PAGES * PAGE);
    assert_eq!(json["data_bytes"], data_pages * PAGE);
    assert!(json["parent"].is_null());
    let text = ok(&["inspect", &p("s.snap")]);
    assert!(
        text.contains("not-populated") && text.contains("regions"),
        "{text}"
    );

    assert!(ok(&["verify", &p("s.snap")]).contains("ok"));
    ok(&["restore", &p("s.snap"), "--to", &p("back.raw")]);
    assert!(std::fs::read(p("back.raw")).unwrap() == expected);
    assert_eq!(
        allocated_pages(Path::new(&p("back.raw"))),
        data_pages,
        "restore is not sparse"
    );
}

#[test]
fn create_with_the_guest_offset_layout_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let expected = raw_memory(Path::new(&p("mem.raw")));
    bitmap(Path::new(&p("invalid.bin")), 96..128);
    ok(&[
        "create",
        "--from",
        &p("mem.raw"),
        "--out",
        &p("s.snap"),
        "--invalid-pages",
        &p("invalid.bin"),
        "--guest-offset-layout",
    ]);
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", &p("s.snap"), "--json"])).unwrap();
    assert_eq!(json["layout"], "guest-offset");
    let data_pages = 64 + (128..PAGES).filter(|p| p % 50 == 0).count() as u64;
    // Header block and data pages at their offsets, nothing else (the tail, shorter than a
    // page, is rounded away by `allocated_pages`).
    assert_eq!(allocated_pages(Path::new(&p("s.snap"))), data_pages + 1);
    assert!(ok(&["inspect", &p("s.snap")]).contains("guest-offset layout"));
    assert!(ok(&["verify", &p("s.snap")]).contains("ok"));
    ok(&["restore", &p("s.snap"), "--to", &p("back.raw")]);
    assert!(std::fs::read(p("back.raw")).unwrap() == expected);
}

#[test]
fn diff_merge_and_chain_restore() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    raw_memory(Path::new(&p("mem.raw")));
    ok(&["create", "--from", &p("mem.raw"), "--out", &p("base.snap")]);
    // The guest writes zeros over a data page and data into a hole.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(p("mem.raw"))
        .unwrap();
    file.write_all_at(&[0u8; PAGE as usize], 3 * PAGE).unwrap();
    file.write_all_at(&page(999), 300 * PAGE).unwrap();
    drop(file);
    let expected = std::fs::read(p("mem.raw")).unwrap();
    bitmap(Path::new(&p("dirty.bin")), 3..4);
    let mut words = std::fs::read(p("dirty.bin")).unwrap();
    words[300 / 8] |= 1 << (300 % 8);
    std::fs::write(p("dirty.bin"), words).unwrap();
    ok(&[
        "diff",
        "--parent",
        &p("base.snap"),
        "--from",
        &p("mem.raw"),
        "--dirty",
        &p("dirty.bin"),
        "--out",
        &p("d1.snap"),
    ]);
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", &p("d1.snap"), "--json"])).unwrap();
    assert_eq!(json["pages"]["same-as-parent"], PAGES - 2);
    assert!(!json["parent"].is_null());

    ok(&[
        "restore",
        &p("base.snap"),
        &p("d1.snap"),
        "--to",
        &p("chain.raw"),
    ]);
    assert!(std::fs::read(p("chain.raw")).unwrap() == expected);
    ok(&[
        "merge",
        &p("base.snap"),
        &p("d1.snap"),
        "--out",
        &p("merged.snap"),
    ]);
    ok(&["verify", &p("merged.snap")]);
    ok(&["restore", &p("merged.snap"), "--to", &p("merged.raw")]);
    assert!(std::fs::read(p("merged.raw")).unwrap() == expected);
    // A diff alone cannot be restored.
    fails(&["restore", &p("d1.snap"), "--to", &p("x.raw")]);
}

#[test]
fn errors_exit_non_zero_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    raw_memory(Path::new(&p("mem.raw")));
    ok(&["create", "--from", &p("mem.raw"), "--out", &p("s.snap")]);
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", &p("s.snap"), "--json"])).unwrap();
    assert!(json["extents"].as_u64().unwrap() > 0);
    // Flip one byte of the first data extent (right after the 4 KiB header block).
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p("s.snap"))
        .unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, PAGE + 10).unwrap();
    file.write_all_at(&[byte[0] ^ 0xff], PAGE + 10).unwrap();
    assert!(fails(&["verify", &p("s.snap")]).contains("checksum"));
    fails(&["restore", &p("s.snap"), "--to", &p("out.raw")]);
    fails(&["inspect", &p("mem.raw")]);
    fails(&["verify", &p("missing.snap")]);
    std::fs::write(p("odd.raw"), [1u8; 100]).unwrap();
    fails(&["create", "--from", &p("odd.raw"), "--out", &p("o.snap")]);
    fails(&["export-ch", &p("s.snap"), "--to", &p("ch")]);
    let usage = ext_snapshot(&["frobnicate"]);
    assert!(!usage.status.success());
}

#[test]
fn import_ch_and_export_ch() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    std::fs::create_dir(p("ch")).unwrap();
    let inner = r#"{"memory_ranges":{"data":[{"gpa":0,"length":1048576}]},"guest_ram_mappings":[{"slot":0,"gpa":0,"size":2097152,"zone_id":"mem0","virtio_mem":false,"file_offset":0}]}"#;
    let state = serde_json::json!({"snapshots": {"memory-manager": {"snapshots": {}, "snapshot_data": {"state": inner}}}, "snapshot_data": null});
    std::fs::write(p("ch/state.json"), state.to_string()).unwrap();
    std::fs::write(p("ch/config.json"), r#"{"memory":{"size":2097152}}"#).unwrap();
    let memory = File::create(p("ch/memory-ranges")).unwrap();
    memory.set_len(1 << 20).unwrap();
    memory.write_all_at(&page(1), 8 * PAGE).unwrap();
    memory
        .write_all_at(&[0u8; PAGE as usize], 9 * PAGE)
        .unwrap();
    drop(memory);
    assert!(ok(&["import-ch", &p("ch"), "--out", &p("vm.snap")]).contains("sidecar"));
    ok(&["verify", &p("vm.snap")]);
    ok(&["export-ch", &p("vm.snap"), "--to", &p("back")]);
    for name in ["state.json", "config.json", "memory-ranges"] {
        assert!(
            std::fs::read(p(&format!("ch/{name}"))).unwrap()
                == std::fs::read(p(&format!("back/{name}"))).unwrap()
        );
    }
    assert_eq!(allocated_pages(Path::new(&p("back/memory-ranges"))), 2);
    fails(&["import-ch", &p("back/config.json"), "--out", &p("x.snap")]);
}

#[test]
fn bench_runs_at_a_tiny_scale_and_reports_targets() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(&[
        "bench",
        "--scale",
        "0.001",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(out.contains("targets (issue 3, item 8)"), "{out}");
    assert!(out.contains("1 GiB fully random"), "{out}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "bench left files behind"
    );
    fails(&["bench", "--scale", "0"]);
}
