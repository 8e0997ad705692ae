//! Corruption tests: every single-byte change and every truncation of a small snapshot is
//! rejected, in both encodings, and the target memory is untouched after each rejection.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::{
    anon_memory, expected_bytes, fill_memory, memfd_memory, read_memory, resident_pages, Fill,
};
use ext_snapshot::{
    restore_eager, restore_stream, restore_stream_staged, EagerOptions, Error, FileLayout,
    GfnBitmap, SnapshotFile, SnapshotWriter, StreamReader, WriteOptions, PAGE_SIZE,
};
use vm_memory::{Bytes, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

const LAYOUT: [(u64, u64); 2] = [(0, 6 * PAGE_SIZE), (0x10_0000, 3 * PAGE_SIZE)];

/// A small snapshot with every page type and two data extents, in both encodings.
fn small_snapshot(dir: &Path) -> (Vec<u8>, Vec<u8>, Vec<Vec<u8>>) {
    small_snapshot_in(dir, FileLayout::Packed)
}

/// [`small_snapshot`] with the file in `layout`.
fn small_snapshot_in(dir: &Path, layout: FileLayout) -> (Vec<u8>, Vec<u8>, Vec<Vec<u8>>) {
    let fills = vec![
        vec![
            Fill::Data(1),
            Fill::Zeros,
            Fill::Untouched,
            Fill::Invalid(2),
            Fill::Data(3),
            Fill::Data(4),
        ],
        vec![Fill::Untouched, Fill::Zeros, Fill::Data(5)],
    ];
    let mem = anon_memory(&LAYOUT);
    let invalid = fill_memory(&mem, &LAYOUT, &fills);
    let bitmap = GfnBitmap::new(&invalid);
    let writer = SnapshotWriter::new(WriteOptions::default())
        .invalid_pages(&bitmap)
        .file_layout(layout);
    let path = dir.join("small");
    writer.write_file(&mem, &path).expect("write file");
    let mut stream = Vec::new();
    writer
        .write_stream(&mem, &mut stream)
        .expect("write stream");
    let file = std::fs::read(&path).expect("read file");
    (file, stream, expected_bytes(&LAYOUT, &fills))
}

/// Memory with the snapshot's layout holding a pattern no restore would produce.
fn junk_memory() -> (GuestMemoryMmap, Vec<Vec<u8>>) {
    let mem = anon_memory(&LAYOUT);
    for r in mem.iter() {
        mem.write_slice(&vec![0x5au8; r.len() as usize], r.start_addr())
            .expect("junk");
    }
    let before = read_memory(&mem);
    (mem, before)
}

fn used_target() -> EagerOptions {
    EagerOptions {
        target_is_fresh: false,
        ..Default::default()
    }
}

/// Opens, verifies and restores the file at `path`; must fail without touching `mem`.
fn file_must_be_rejected(path: &Path, mem: &GuestMemoryMmap, before: &[Vec<u8>], what: &str) {
    let result = SnapshotFile::open(path)
        .and_then(|s| s.verify_data().map(|()| s))
        .and_then(|s| restore_eager(&s, mem, used_target()));
    assert!(result.is_err(), "{what}: accepted");
    // A second path through the API: restore without an explicit verify must reject too.
    if let Ok(s) = SnapshotFile::open(path) {
        assert!(
            restore_eager(&s, mem, used_target()).is_err(),
            "{what}: restored"
        );
    }
    assert!(read_memory(mem) == before, "{what}: memory touched");
    fresh_target_must_stay_fresh(path, what);
}

/// Restores the file at `path` into fresh memory (checksums verified while copying); must fail
/// and leave that memory as it was: nothing resident, every byte zero.
fn fresh_target_must_stay_fresh(path: &Path, what: &str) {
    let Ok(s) = SnapshotFile::open(path) else {
        return;
    };
    let fresh = anon_memory(&LAYOUT);
    assert!(
        restore_eager(&s, &fresh, EagerOptions::default()).is_err(),
        "{what}: restored into fresh memory"
    );
    // Private anonymous memory with no page resident reads as zero.
    assert!(
        resident_pages(&fresh).iter().flatten().all(|&r| !r),
        "{what}: fresh memory still holds pages after the failed restore"
    );
    assert!(!s.is_data_verified(), "{what}: marked verified");
}

#[test]
fn the_untouched_snapshot_is_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (file, stream, expected) = small_snapshot(dir.path());
    let path = dir.path().join("copy");
    std::fs::write(&path, &file).expect("write copy");
    let (mem, _) = junk_memory();
    let s = SnapshotFile::open(&path).expect("open");
    restore_eager(&s, &mem, used_target()).expect("restore");
    assert!(read_memory(&mem) == expected);
    let (mem, _) = junk_memory();
    restore_stream(&stream[..], &mem, used_target()).expect("stream restore");
    assert!(read_memory(&mem) == expected);
}

#[test]
fn every_byte_flip_of_the_file_is_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (file, _, _) = small_snapshot(dir.path());
    let path = dir.path().join("corrupt");
    std::fs::write(&path, &file).expect("write copy");
    let f = OpenOptions::new().write(true).open(&path).expect("open rw");
    let (mem, before) = junk_memory();
    // The file covers header, 4 data pages in 2 extents, 2 indexes and the region table.
    assert!(file.len() as u64 > 4096 + 4 * PAGE_SIZE);
    // Extents hold no structure: one flip per byte there, three elsewhere.
    let data_end = u64::from_le_bytes(file[72..80].try_into().expect("8")) as usize;
    for at in 0..file.len() {
        let masks: &[u8] = if (4096..data_end).contains(&at) {
            &[0x01]
        } else {
            &[0x01, 0x80, 0xff]
        };
        for &mask in masks {
            f.write_all_at(&[file[at] ^ mask], at as u64).expect("flip");
            file_must_be_rejected(&path, &mem, &before, &format!("byte {at} ^ {mask:#x}"));
        }
        f.write_all_at(&file[at..at + 1], at as u64)
            .expect("restore byte");
    }
}

#[test]
fn every_truncation_of_the_file_is_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (file, _, _) = small_snapshot(dir.path());
    let path = dir.path().join("short");
    let (mem, before) = junk_memory();
    for len in 0..file.len() {
        std::fs::write(&path, &file[..len]).expect("write prefix");
        file_must_be_rejected(&path, &mem, &before, &format!("length {len}"));
    }
    // Appended bytes are rejected too.
    let mut longer = file.clone();
    longer.push(0);
    std::fs::write(&path, &longer).expect("write longer");
    file_must_be_rejected(&path, &mem, &before, "one byte appended");
}

/// A corrupt stream: the reader rejects it, the staged restore leaves memory untouched, and
/// the direct restore never writes an unverified byte. Returns whether the direct restore
/// had written pages before it failed.
fn stream_must_be_rejected(stream: &[u8], expected: &[Vec<u8>], spool: &Path, what: &str) -> bool {
    let mut reader_result = StreamReader::new(stream).map(|_| ());
    if let Ok(mut reader) = StreamReader::new(stream) {
        reader_result = loop {
            match reader.next_record() {
                Ok(Some(_)) => {}
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
    }
    assert!(reader_result.is_err(), "{what}: reader accepted");

    let (mem, before) = junk_memory();
    assert!(
        restore_stream_staged(stream, &mem, spool, used_target()).is_err(),
        "{what}: staged accepted"
    );
    assert!(read_memory(&mem) == before, "{what}: staged touched memory");
    assert!(!spool.exists(), "{what}: spool left behind");

    let (mem, before) = junk_memory();
    match restore_stream(stream, &mem, used_target()) {
        Ok(_) => panic!("{what}: direct restore accepted"),
        Err(Error::PartialRestore { .. }) => {
            // Pages hold either their old bytes or the snapshot's, never anything else.
            let after = read_memory(&mem);
            for ((a, b), e) in after.iter().zip(&before).zip(expected) {
                for p in 0..a.len() / PAGE_SIZE as usize {
                    let page = p * PAGE_SIZE as usize..(p + 1) * PAGE_SIZE as usize;
                    assert!(
                        a[page.clone()] == b[page.clone()] || a[page.clone()] == e[page],
                        "{what}: direct restore wrote unverified bytes"
                    );
                }
            }
            true
        }
        Err(_) => {
            assert!(read_memory(&mem) == before, "{what}: direct touched memory");
            false
        }
    }
}

#[test]
fn every_byte_flip_of_the_stream_is_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, stream, expected) = small_snapshot(dir.path());
    let spool = dir.path().join("spool");
    let mut corrupt = stream.clone();
    let mut partial = 0;
    for at in 0..stream.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            corrupt[at] = stream[at] ^ mask;
            let what = format!("byte {at} ^ {mask:#x}");
            partial += usize::from(stream_must_be_rejected(&corrupt, &expected, &spool, &what));
        }
        corrupt[at] = stream[at];
    }
    // Flips in late records must have exercised the partial-restore path.
    assert!(partial > 0);
}

#[test]
fn every_truncation_of_the_stream_is_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, stream, expected) = small_snapshot(dir.path());
    let spool = dir.path().join("spool");
    let mut partial = 0;
    for len in 0..stream.len() {
        let what = format!("length {len}");
        partial += usize::from(stream_must_be_rejected(
            &stream[..len],
            &expected,
            &spool,
            &what,
        ));
    }
    assert!(partial > 0);
}

/// Rewrites header and region table checksums of a file image after an edit.
fn reseal(file: &mut [u8]) {
    let table_at = u64::from_le_bytes(file[64..72].try_into().expect("8")) as usize;
    let table_crc = crc32c::crc32c(&file[table_at..]);
    file[88..92].copy_from_slice(&table_crc.to_le_bytes());
    let crc = crc32c::crc32c(&file[..4092]);
    file[4092..4096].copy_from_slice(&crc.to_le_bytes());
}

fn open_image(dir: &Path, image: &[u8]) -> Result<SnapshotFile, Error> {
    let path = dir.join("image");
    std::fs::write(&path, image).expect("write image");
    SnapshotFile::open(&path)
}

#[test]
fn resealed_edits_get_the_specific_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (file, stream, _) = small_snapshot(dir.path());

    let mut image = file.clone();
    image[8] = 2;
    reseal(&mut image);
    assert!(matches!(
        open_image(dir.path(), &image),
        Err(Error::UnsupportedVersion(2))
    ));

    let mut image = file.clone();
    image[12..16].copy_from_slice(&65536u32.to_le_bytes());
    reseal(&mut image);
    assert!(matches!(
        open_image(dir.path(), &image),
        Err(Error::UnsupportedPageSize(65536))
    ));

    let mut image = file.clone();
    image[16] = 0x4;
    reseal(&mut image);
    assert!(matches!(
        open_image(dir.path(), &image),
        Err(Error::UnknownFlags(4))
    ));

    // The guest-offset flag on a packed file: its extents are not where that layout puts them.
    let mut image = file.clone();
    image[16] = 0x2;
    reseal(&mut image);
    assert!(matches!(
        open_image(dir.path(), &image),
        Err(Error::Inconsistent(_))
    ));

    let mut image = file.clone();
    image[0] = b'X';
    assert!(matches!(
        open_image(dir.path(), &image),
        Err(Error::BadMagic { .. })
    ));

    // Second region moved onto the first: overlapping regions.
    let mut image = file.clone();
    let table_at = u64::from_le_bytes(image[64..72].try_into().expect("8")) as usize;
    image[table_at + 40..table_at + 48].copy_from_slice(&PAGE_SIZE.to_le_bytes());
    reseal(&mut image);
    assert!(matches!(
        open_image(dir.path(), &image),
        Err(Error::Inconsistent(_))
    ));

    // A corrupted extent passes open (structure intact) but not verification.
    let mut image = file.clone();
    image[4096 + 100] ^= 1;
    let s = open_image(dir.path(), &image).expect("structure is intact");
    assert!(matches!(s.verify_data(), Err(Error::BadChecksum { .. })));

    let mut image = stream.clone();
    image[8] = 9;
    let crc = crc32c::crc32c(&image[..96]);
    image[96..100].copy_from_slice(&crc.to_le_bytes());
    assert!(matches!(
        StreamReader::new(&image[..]),
        Err(Error::UnsupportedVersion(9))
    ));
    assert!(matches!(
        StreamReader::new(&file[..]),
        Err(Error::BadMagic { encoding: "stream" })
    ));
    assert!(matches!(
        StreamReader::new(&stream[..50]),
        Err(Error::Truncated(_))
    ));
}

#[test]
fn every_byte_flip_of_a_guest_offset_file_is_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (file, _, expected) = small_snapshot_in(dir.path(), FileLayout::GuestOffset);
    let path = dir.path().join("corrupt");
    std::fs::write(&path, &file).expect("write copy");
    let (mem, _) = junk_memory();
    let s = SnapshotFile::open(&path).expect("open the intact file");
    assert_eq!(s.file_layout(), FileLayout::GuestOffset);
    restore_eager(&s, &mem, used_target()).expect("restore the intact file");
    assert!(read_memory(&mem) == expected);
    let (mem, before) = junk_memory();
    // The data area holds every page of both regions at its guest offset: data pages, and
    // zeros (written out densely by this copy) where the pages have no data.
    let data_end = u64::from_le_bytes(file[72..80].try_into().expect("8")) as usize;
    let region_pages: u64 = LAYOUT.iter().map(|&(_, s)| s / PAGE_SIZE).sum();
    assert_eq!(data_end as u64, 4096 + region_pages * PAGE_SIZE);
    let f = OpenOptions::new().write(true).open(&path).expect("open rw");
    for at in 0..file.len() {
        let masks: &[u8] = if (4096..data_end).contains(&at) {
            &[0x01]
        } else {
            &[0x01, 0x80, 0xff]
        };
        for &mask in masks {
            f.write_all_at(&[file[at] ^ mask], at as u64).expect("flip");
            file_must_be_rejected(&path, &mem, &before, &format!("byte {at} ^ {mask:#x}"));
        }
        f.write_all_at(&file[at..at + 1], at as u64)
            .expect("restore byte");
    }
}

#[test]
fn every_truncation_of_a_guest_offset_file_is_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (file, _, _) = small_snapshot_in(dir.path(), FileLayout::GuestOffset);
    let path = dir.path().join("short");
    let (mem, before) = junk_memory();
    // Every length in the header and the tail; inside the (mostly zero) data area every page
    // boundary and its neighbours plus every 61st byte, which the length check treats alike.
    let data_end = u64::from_le_bytes(file[72..80].try_into().expect("8")) as usize;
    let lengths = (0..file.len()).filter(|&len| {
        let in_page = len % PAGE_SIZE as usize;
        len < 4096 + 64 || len >= data_end - 64 || in_page <= 1 || in_page == 4095 || len % 61 == 0
    });
    for len in lengths {
        std::fs::write(&path, &file[..len]).expect("write prefix");
        file_must_be_rejected(&path, &mem, &before, &format!("length {len}"));
    }
    let mut longer = file.clone();
    longer.push(0);
    std::fs::write(&path, &longer).expect("write longer");
    file_must_be_rejected(&path, &mem, &before, "one byte appended");
}

#[test]
fn resealed_guest_offset_edits_get_the_specific_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (file, _, _) = small_snapshot_in(dir.path(), FileLayout::GuestOffset);

    // Without its flag the file reads as packed, and its extents do not tile the data area.
    let mut image = file.clone();
    image[16] = 0;
    reseal(&mut image);
    assert!(matches!(
        open_image(dir.path(), &image),
        Err(Error::Inconsistent(_))
    ));

    // A data area that ends before the regions do.
    let mut image = file.clone();
    let data_end = u64::from_le_bytes(image[72..80].try_into().expect("8"));
    image[72..80].copy_from_slice(&(data_end - PAGE_SIZE).to_le_bytes());
    reseal(&mut image);
    assert!(open_image(dir.path(), &image).is_err());

    // A byte in a hole passes open (no structure there) but not verification.
    let mut image = file.clone();
    let hole = 4096 + PAGE_SIZE as usize + 7; // region 0, page 1: a zero page
    assert_eq!(image[hole], 0);
    image[hole] = 1;
    let s = open_image(dir.path(), &image).expect("structure is intact");
    assert!(matches!(s.verify_data(), Err(Error::Inconsistent(_))));

    // A corrupted data page: the extent checksum.
    let mut image = file.clone();
    image[4096 + 100] ^= 1; // region 0, page 0: data
    let s = open_image(dir.path(), &image).expect("structure is intact");
    assert!(matches!(s.verify_data(), Err(Error::BadChecksum { .. })));
}

/// A bad extent late in a snapshot large enough for two restore threads: the fresh-target
/// restore copies the extents before it, finds the bad checksum while copying, and gives every
/// page back (anonymous memory: nothing resident; memfd memory: nothing allocated).
#[test]
fn a_bad_extent_found_while_copying_releases_the_fresh_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 48 MiB, every other 4 MiB block data: a dozen extents of 1024 pages (data never merges
    // across the zero blocks), more than the threshold for two threads.
    let size = 48u64 << 20;
    let layout = [(0, size)];
    let mem = anon_memory(&layout);
    let block = 4u64 << 20;
    for b in (0..size / block).step_by(2) {
        let bytes: Vec<u8> = (0..block).map(|i| (i % 251) as u8 | 1).collect();
        mem.write_slice(&bytes, vm_memory::GuestAddress(b * block))
            .expect("fill");
    }
    let path = dir.path().join("big");
    SnapshotWriter::new(WriteOptions::default())
        .write_file(&mem, &path)
        .expect("write");
    let intact = SnapshotFile::open(&path).expect("open");
    let extents: Vec<_> = intact.regions()[0]
        .runs
        .iter()
        .filter_map(|r| r.extent)
        .collect();
    assert!(extents.len() >= 6, "{} extents", extents.len());
    // The intact file restores, and the success is remembered.
    let fresh = anon_memory(&layout);
    restore_eager(&intact, &fresh, EagerOptions::default()).expect("intact restore");
    assert!(intact.is_data_verified());
    assert!(read_memory(&fresh) == read_memory(&mem));
    drop(intact);

    let last = extents[extents.len() - 1];
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open rw");
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, last.offset + last.len / 2)
        .expect("read");
    f.write_all_at(&[byte[0] ^ 0x40], last.offset + last.len / 2)
        .expect("flip");
    for memfd in [false, true] {
        let s = SnapshotFile::open(&path).expect("structure intact");
        let fresh = if memfd {
            memfd_memory(&layout)
        } else {
            anon_memory(&layout)
        };
        let result = restore_eager(&s, &fresh, EagerOptions::default());
        assert!(
            matches!(result, Err(Error::BadChecksum { .. })),
            "memfd {memfd}: {result:?}"
        );
        assert!(!s.is_data_verified());
        if memfd {
            let region = fresh.iter().next().expect("region");
            let file = region.file_offset().expect("memfd").file();
            let blocks = std::os::unix::fs::MetadataExt::blocks(&file.metadata().expect("stat"));
            assert_eq!(blocks, 0, "the memfd still holds {blocks} blocks");
        } else {
            assert!(resident_pages(&fresh).iter().flatten().all(|&r| !r));
        }
        assert!(read_memory(&fresh).iter().flatten().all(|&b| b == 0));
    }
}
