//! Snapshots of the memory of a real booted Linux guest, not of generated patterns.
//!
//! The image is taken once by `ci/guest-memory-image` (lab scenario `guest-memory`: the lab's
//! L2 Debian kernel + crun container under QEMU/KVM on 512 MiB of file-backed shared memory,
//! frozen after it has ticked for ten seconds) and cached, sparse, at
//! `.cache/guest-memory/l2-512M.raw` (`$EXT_LAB_CACHE/guest-memory/` when that is set;
//! `EXT_GUEST_MEMORY_IMAGE` overrides the path). Holes in it are the guest pages the host never
//! populated. Each test loads it into real guest memory — a memfd (holes kept: only `SEEK_DATA`
//! extents are copied) or anonymous memory (only those extents written) — and checks: the
//! writer types every page exactly as an independent scan of the image does, the histogram
//! looks like a booted Linux, file and stream snapshots restore bit-exactly in every mode
//! (eager, mapped, lazy, stream), and a diff after the guest "runs a bit more" restores and
//! merges correctly. Without the image every test prints a SKIPPED line.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{page_bytes, resident_pages};
use ext_snapshot::restore::lazy::restore_lazy;
use ext_snapshot::restore::mapped::{restore_mapped, MappedOptions};
use ext_snapshot::{
    fresh_memory, is_zero_page, restore_eager, restore_stream, EagerOptions, PageType,
    RegionBitmaps, SnapshotChain, SnapshotFile, SnapshotReport, SnapshotWriter, WriteOptions,
    PAGE_SIZE,
};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

const PAGE: usize = PAGE_SIZE as usize;
/// Comparisons and copies go this many bytes at a time (bounded test memory).
const CHUNK: usize = 4 << 20;

/// The image's path, or `None` (after a SKIPPED line naming the test) when it was not taken.
fn image(test: &str) -> Option<PathBuf> {
    // Where ci/guest-memory-image puts it: the lab cache (EXT_LAB_CACHE, as ci/lab reads it).
    let cache = std::env::var_os("EXT_LAB_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache"));
    let path = std::env::var_os("EXT_GUEST_MEMORY_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache.join("guest-memory/l2-512M.raw"));
    if path.is_file() {
        Some(path)
    } else {
        // .ci/run sets EXT_REQUIRE_ALL=1: there a missing environment is a failure.
        assert!(
            std::env::var("EXT_REQUIRE_ALL").as_deref() != Ok("1"),
            "EXT_REQUIRE_ALL=1, but this test would be skipped: {}",
            format_args!(
                "SKIPPED: real guest memory tests ({test}): run ci/guest-memory-image first"
            )
        );
        println!("SKIPPED: real guest memory tests ({test}): run ci/guest-memory-image first");
        None
    }
}

/// The `[start, end)` byte ranges of `file` that hold data (`SEEK_DATA`/`SEEK_HOLE`).
fn data_extents(file: &File) -> Vec<(u64, u64)> {
    let len = file.metadata().expect("stat image").len();
    ext_snapshot::sparse::data_extents(file, 0, len)
        .expect("SEEK_DATA/SEEK_HOLE on the image")
        .into_iter()
        .map(|r| (r.start, r.end))
        .collect()
}

/// The guest image: its file, length and data extents, and the page types an independent
/// scan gives (hole: not populated; data extent: zero or data by content).
struct Image {
    file: File,
    len: u64,
    extents: Vec<(u64, u64)>,
    expected: [u64; 5],
}

impl Image {
    fn open(path: &Path) -> Image {
        let file = File::open(path).expect("open guest memory image");
        let len = file.metadata().expect("stat image").len();
        assert!(
            len > 0 && len % PAGE_SIZE == 0,
            "image size {len} is not whole pages"
        );
        let extents = data_extents(&file);
        let mut expected = [0u64; 5];
        let mut populated = 0;
        let mut buf = vec![0u8; CHUNK];
        for &(start, end) in &extents {
            // Hole boundaries are block-aligned on the filesystems the cache lives on.
            assert!(
                start % PAGE_SIZE == 0 && end % PAGE_SIZE == 0,
                "extent {start:#x}..{end:#x}"
            );
            populated += (end - start) / PAGE_SIZE;
            for_each_chunk(&file, start, end, &mut buf, |_, bytes| {
                for page in bytes.chunks(PAGE) {
                    let t = if is_zero_page(page) {
                        PageType::Zero
                    } else {
                        PageType::Data
                    };
                    expected[t as usize] += 1;
                }
            });
        }
        expected[PageType::NotPopulated as usize] = len / PAGE_SIZE - populated;
        Image {
            file,
            len,
            extents,
            expected,
        }
    }

    /// One region at guest address 0, as the lab's q35 guest with 512 MiB has.
    fn layout(&self) -> [(u64, u64); 1] {
        [(0, self.len)]
    }

    /// The image in a memfd mapped shared as guest memory, holes kept. Returns the memfd too.
    fn memfd_memory(&self) -> (GuestMemoryMmap, Arc<File>) {
        // SAFETY: the name is a NUL-terminated literal; the result is checked below.
        let fd = unsafe { libc::memfd_create(c"real-guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let memfd = Arc::new(unsafe { File::from_raw_fd(fd) });
        memfd.set_len(self.len).expect("size memfd");
        let mut buf = vec![0u8; CHUNK];
        for &(start, end) in &self.extents {
            for_each_chunk(&self.file, start, end, &mut buf, |at, bytes| {
                memfd.write_all_at(bytes, at).expect("fill memfd");
            });
        }
        let region = (
            GuestAddress(0),
            self.len as usize,
            Some(FileOffset::from_arc(memfd.clone(), 0)),
        );
        let memory = GuestMemoryMmap::from_ranges_with_files(&[region]).expect("map memfd");
        (memory, memfd)
    }

    /// The image in private anonymous guest memory: only its data extents are written.
    fn anonymous_memory(&self) -> GuestMemoryMmap {
        let memory =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), self.len as usize)]).expect("map");
        let mut buf = vec![0u8; CHUNK];
        for &(start, end) in &self.extents {
            for_each_chunk(&self.file, start, end, &mut buf, |at, bytes| {
                memory
                    .write_slice(bytes, GuestAddress(at))
                    .expect("fill memory");
            });
        }
        memory
    }
}

/// Calls `f(offset, bytes)` for `[start, end)` of `file`, read `buf.len()` bytes at a time.
fn for_each_chunk(
    file: &File,
    start: u64,
    end: u64,
    buf: &mut [u8],
    mut f: impl FnMut(u64, &[u8]),
) {
    let mut at = start;
    while at < end {
        let n = (end - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], at).expect("read image");
        f(at, &buf[..n]);
        at += n as u64;
    }
}

/// Asserts that region 0 of `memory` reads exactly as `reference` (a file; holes read as zero,
/// and reading them allocates nothing), naming the first differing page.
fn assert_same(memory: &GuestMemoryMmap, reference: &File, len: u64, what: &str) {
    let mut expected = vec![0u8; CHUNK];
    let mut actual = vec![0u8; CHUNK];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(CHUNK as u64) as usize;
        reference
            .read_exact_at(&mut expected[..n], at)
            .expect("read reference");
        memory
            .read_slice(&mut actual[..n], GuestAddress(at))
            .expect("read restored memory");
        if expected[..n] != actual[..n] {
            let page = (0..n / PAGE)
                .find(|p| expected[p * PAGE..(p + 1) * PAGE] != actual[p * PAGE..(p + 1) * PAGE])
                .unwrap_or(0);
            panic!(
                "{what}: guest page {:#x} differs",
                at / PAGE_SIZE + page as u64
            );
        }
        at += n as u64;
    }
}

fn histogram(pages: &[u64; 5]) -> String {
    PageType::ALL
        .iter()
        .map(|&t| {
            format!(
                "{t:?} {} ({} MiB)",
                pages[t as usize],
                (pages[t as usize] * PAGE_SIZE) >> 20
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a booted Linux's memory looks like: mostly never touched or zero, some MiB of data.
fn assert_plausible_linux(image: &Image) {
    let pages = image.len / PAGE_SIZE;
    let data = image.expected[PageType::Data as usize];
    let empty =
        image.expected[PageType::NotPopulated as usize] + image.expected[PageType::Zero as usize];
    println!(
        "real guest image: {} MiB; {}",
        image.len >> 20,
        histogram(&image.expected)
    );
    assert!(empty * 2 > pages, "fewer than half the pages are empty");
    assert!(
        data * PAGE_SIZE >= 4 << 20,
        "less than 4 MiB of data: not a booted kernel"
    );
    assert!(data * 4 < pages * 3, "more than 3/4 of the pages hold data");
}

fn write_file(memory: &GuestMemoryMmap, path: &Path) -> SnapshotReport {
    SnapshotWriter::new(WriteOptions::default())
        .write_file(memory, path)
        .expect("write snapshot file")
}

#[test]
fn writer_types_every_page_of_a_real_guest_like_an_independent_scan() {
    let Some(path) = image("typing") else { return };
    let image = Image::open(&path);
    assert_plausible_linux(&image);
    let dir = tempfile::tempdir().expect("tempdir");

    // Shared memfd memory: SEEK_DATA residency, so the histogram must match exactly.
    let (memory, _memfd) = image.memfd_memory();
    let report = write_file(&memory, &dir.path().join("memfd.snap"));
    assert_eq!(
        report.pages_by_type, image.expected,
        "memfd typing differs from the scan"
    );
    let data_bytes = report.bytes(PageType::Data);
    // The size target: data bytes + 1 % + 64 KiB per GiB of guest memory.
    let bound = data_bytes + data_bytes / 100 + (64 << 10) * image.len.div_ceil(1 << 30);
    assert!(
        report.output_bytes <= bound,
        "file {} > {bound}",
        report.output_bytes
    );
    println!(
        "real guest memfd snapshot: {} bytes for {} data bytes, typed in {:.3} s, written in {:.3} s",
        report.output_bytes, data_bytes, report.scan_seconds, report.write_seconds
    );

    // Anonymous memory: pagemap residency. The data pages are exact; a populated page next to
    // a hole can only ever turn a hole into a zero page (never the other way round).
    let memory = image.anonymous_memory();
    let report = write_file(&memory, &dir.path().join("anon.snap"));
    let got = report.pages_by_type;
    let want = image.expected;
    assert_eq!(got[PageType::Data as usize], want[PageType::Data as usize]);
    assert_eq!(got[PageType::Invalid as usize], 0);
    assert!(got[PageType::NotPopulated as usize] <= want[PageType::NotPopulated as usize]);
    assert_eq!(
        got[PageType::NotPopulated as usize] + got[PageType::Zero as usize],
        want[PageType::NotPopulated as usize] + want[PageType::Zero as usize]
    );
    println!("real guest anonymous snapshot: {}", histogram(&got));
}

#[test]
fn real_guest_restores_bit_exactly_in_every_mode() {
    let Some(path) = image("restore") else { return };
    let image = Image::open(&path);
    let dir = tempfile::tempdir().expect("tempdir");
    let snap = dir.path().join("guest.snap");
    let (memory, _memfd) = image.memfd_memory();
    write_file(&memory, &snap);
    let snapshot = SnapshotFile::open(&snap).expect("open snapshot");
    snapshot.verify_data().expect("verify snapshot");
    let data_pages = image.expected[PageType::Data as usize];

    // Eager: only data pages are written, so only they are resident before we read back.
    let restored = fresh_memory(&snapshot.layout()).expect("fresh memory");
    let report = restore_eager(&snapshot, &restored, EagerOptions::default()).expect("eager");
    assert_eq!(report.data_pages, data_pages);
    let resident = resident_pages(&restored)[0].iter().filter(|&&r| r).count() as u64;
    assert_eq!(
        resident, data_pages,
        "eager restore populated pages without data"
    );
    assert_same(&restored, &image.file, image.len, "eager restore");
    drop(restored);

    let (restored, report) =
        restore_mapped(&snap, MappedOptions { verify_data: true }).expect("mapped restore");
    assert!(
        report.mapped_bytes + report.copied_bytes == data_pages * PAGE_SIZE,
        "{report:?}"
    );
    assert_same(&restored, &image.file, image.len, "mapped restore");
    drop(restored);

    let lazy = restore_lazy(&snap).expect("lazy restore");
    assert_same(lazy.memory(), &image.file, image.len, "lazy restore");
    let stats = lazy.finish().expect("lazy handler");
    assert_eq!(stats.data_pages_copied, data_pages, "{stats:?}");
    println!("real guest lazy restore: {stats:?}");

    // The stream encoding of the same memory, restored record by record.
    let mut stream = Vec::new();
    let report = SnapshotWriter::new(WriteOptions::default())
        .write_stream(&memory, &mut stream)
        .expect("write stream");
    assert_eq!(report.pages_by_type, image.expected);
    let restored = fresh_memory(&image.layout()).expect("fresh memory");
    restore_stream(stream.as_slice(), &restored, EagerOptions::default()).expect("stream restore");
    assert_same(&restored, &image.file, image.len, "stream restore");
}

#[test]
fn real_guest_diff_holds_only_the_changed_pages_and_merges() {
    let Some(path) = image("diff") else { return };
    let image = Image::open(&path);
    let dir = tempfile::tempdir().expect("tempdir");
    let (memory, memfd) = image.memfd_memory();
    let base = dir.path().join("base.snap");
    write_file(&memory, &base);

    // The guest "runs on": new data in never-touched pages, zeroed data pages, rewritten data
    // pages — spread over the whole of memory, as a dirty log would report them.
    let pages = image.len / PAGE_SIZE;
    let data_page = |n: u64| -> Option<u64> {
        let mut seen = 0;
        for &(start, end) in &image.extents {
            for gfn in start / PAGE_SIZE..end / PAGE_SIZE {
                let mut page = vec![0u8; PAGE];
                image.file.read_exact_at(&mut page, gfn * PAGE_SIZE).ok()?;
                if !is_zero_page(&page) {
                    if seen == n {
                        return Some(gfn);
                    }
                    seen += 1;
                }
            }
        }
        None
    };
    let holes: Vec<u64> = (0..pages)
        .step_by(4099)
        .filter(|&gfn| {
            image
                .extents
                .iter()
                .all(|&(s, e)| gfn * PAGE_SIZE < s || gfn * PAGE_SIZE >= e)
        })
        .take(32)
        .collect();
    assert!(!holes.is_empty(), "the image has no holes to write into");
    let zeroed = data_page(7).expect("a data page to zero");
    let rewritten = data_page(1000).expect("a data page to rewrite");
    let mut dirty = vec![0u64; pages.div_ceil(64) as usize];
    let mut write = |gfn: u64, bytes: &[u8]| {
        memory
            .write_slice(bytes, GuestAddress(gfn * PAGE_SIZE))
            .expect("modify guest page");
        dirty[(gfn / 64) as usize] |= 1 << (gfn % 64);
    };
    for &gfn in &holes {
        write(gfn, &page_bytes(5, gfn));
    }
    write(zeroed, &[0u8; PAGE]);
    write(rewritten, &page_bytes(6, rewritten));

    let parent = SnapshotFile::open(&base).expect("open base");
    let diff = dir.path().join("diff.snap");
    let dirty_set = RegionBitmaps::new(vec![dirty.as_slice()]);
    let report = SnapshotWriter::new(WriteOptions::default())
        .diff_against(&parent, &dirty_set)
        .write_file(&memory, &diff)
        .expect("write diff");
    let changed = holes.len() as u64 + 2;
    assert_eq!(
        report.pages(PageType::Data),
        holes.len() as u64 + 1,
        "{report:?}"
    );
    assert_eq!(report.pages(PageType::Zero), 1, "{report:?}");
    assert_eq!(
        report.pages(PageType::SameAsParent),
        pages - changed,
        "{report:?}"
    );
    println!(
        "real guest diff: {} changed pages, {} bytes (base {} bytes)",
        changed,
        report.output_bytes,
        parent.file_len().expect("base length")
    );

    let chain = SnapshotChain::open(&[&base, &diff]).expect("open chain");
    let restored = fresh_memory(&chain.layout()).expect("fresh memory");
    chain
        .restore_eager(&restored, EagerOptions::default())
        .expect("restore chain");
    // The memfd now holds what the guest holds; reading it through the file allocates nothing.
    assert_same(&restored, &memfd, image.len, "chain restore");
    drop(restored);

    let merged = dir.path().join("merged.snap");
    let report = chain
        .merge(&merged, WriteOptions::default())
        .expect("merge chain");
    let mut expected = image.expected;
    expected[PageType::NotPopulated as usize] -= holes.len() as u64;
    expected[PageType::Data as usize] += holes.len() as u64 - 1;
    expected[PageType::Zero as usize] += 1;
    assert_eq!(report.pages_by_type, expected, "merged histogram");
    let (restored, _) =
        restore_mapped(&merged, MappedOptions { verify_data: true }).expect("mapped merged");
    assert_same(&restored, &memfd, image.len, "merged snapshot");
}
