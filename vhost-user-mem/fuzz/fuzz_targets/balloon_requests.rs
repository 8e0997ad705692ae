//! Fuzzes the balloon's request parsing with arbitrary guest bytes: inflate/deflate PFN arrays
//! (`parse_pfns`, then `page_runs`, the holes an inflate punches), stats buffers
//! (`parse_stats`) and the ranges of a free page reporting chain (`check_reported_ranges`).
//! Nothing may panic, and each answer is checked against an oracle written here from the
//! virtio spec: a request is accepted exactly when it is well formed and every page or range
//! lies inside guest memory, so nothing outside memory can ever reach a punch.
//!
//! Input: the first byte picks the parser, the rest is the request.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vhost_user_mem::balloon::{
    check_reported_ranges, page_runs, parse_pfns, parse_stats, PFN_ENTRY_SIZE, STAT_ENTRY_SIZE,
};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Guest memory: three regions with gaps between them, one above 4 GiB (PFNs past u32 pages
/// are not reachable by a le32 PFN, ranges are).
const REGIONS: [(u64, u64); 3] = [(0, 0x10000), (0x20000, 0x4000), (1 << 32, 0x2000)];

/// One reported range as this target encodes it: le64 address, le32 length.
const RANGE_ENTRY_SIZE: usize = 12;

fn memory() -> &'static GuestMemoryMmap<()> {
    static MEMORY: OnceLock<GuestMemoryMmap<()>> = OnceLock::new();
    MEMORY.get_or_init(|| {
        let ranges: Vec<(GuestAddress, usize)> = REGIONS
            .iter()
            .map(|&(start, len)| (GuestAddress(start), len as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).expect("anonymous guest memory")
    })
}

/// The oracle: `[addr, addr + len)` is a non-empty, 4 KiB aligned range inside one region
/// (the regions are not adjacent, so no valid range spans two).
fn valid_range(addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    len > 0
        && addr % 4096 == 0
        && len % 4096 == 0
        && REGIONS
            .iter()
            .any(|&(start, size)| addr >= start && end <= start + size)
}

fn le32(chunk: &[u8]) -> u32 {
    u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]])
}

fn fuzz_pfns(body: &[u8]) {
    let entries: Vec<u64> = body
        .chunks_exact(PFN_ENTRY_SIZE)
        .map(|chunk| u64::from(le32(chunk)))
        .collect();
    let well_formed = !body.is_empty() && body.len() % PFN_ENTRY_SIZE == 0;
    let all_inside = entries.iter().all(|&pfn| valid_range(pfn << 12, 4096));
    match parse_pfns(body, memory()) {
        Ok(pfns) => {
            assert!(well_formed && all_inside, "accepted a bad request");
            assert_eq!(pfns, entries);
            let runs = page_runs(&pfns);
            let mut distinct = pfns.clone();
            distinct.sort_unstable();
            distinct.dedup();
            let mut covered = Vec::new();
            for (i, &(first, count)) in runs.iter().enumerate() {
                assert!(count > 0);
                // Sorted, disjoint and never adjacent: one hole per run.
                if let Some(&(previous, previous_count)) = i.checked_sub(1).and_then(|p| runs.get(p)) {
                    assert!(previous + previous_count < first);
                }
                // A run of valid pages never crosses a gap: it is one range inside memory.
                assert!(valid_range(first << 12, count << 12), "run {first}+{count}");
                covered.extend(first..first + count);
            }
            assert_eq!(covered, distinct);
        }
        Err(_) => assert!(!(well_formed && all_inside), "refused a good request"),
    }
}

fn fuzz_stats(body: &[u8]) {
    let well_formed = !body.is_empty() && body.len() % STAT_ENTRY_SIZE == 0;
    match parse_stats(body) {
        Ok(stats) => {
            assert!(well_formed);
            assert_eq!(stats.len(), body.len() / STAT_ENTRY_SIZE);
            for (entry, (tag, value)) in body.chunks_exact(STAT_ENTRY_SIZE).zip(stats) {
                assert_eq!(tag, u16::from_le_bytes([entry[0], entry[1]]));
                let mut val = [0u8; 8];
                val.copy_from_slice(&entry[2..]);
                assert_eq!(value, u64::from_le_bytes(val));
            }
        }
        Err(_) => assert!(!well_formed),
    }
}

fn fuzz_ranges(body: &[u8]) {
    let ranges: Vec<(u64, u64)> = body
        .chunks_exact(RANGE_ENTRY_SIZE)
        .map(|chunk| {
            let mut addr = [0u8; 8];
            addr.copy_from_slice(&chunk[..8]);
            (u64::from_le_bytes(addr), u64::from(le32(&chunk[8..])))
        })
        .collect();
    let all_valid = ranges.iter().all(|&(addr, len)| valid_range(addr, len));
    let accepted = check_reported_ranges(&ranges, memory()).is_ok();
    assert_eq!(accepted, all_valid, "{ranges:x?}");
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    match selector % 3 {
        0 => fuzz_pfns(body),
        1 => fuzz_stats(body),
        _ => fuzz_ranges(body),
    }
});
