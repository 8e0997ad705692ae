//! The guest memory the snapshot and fault figures run on: a mix of page kinds laid out page by
//! page at random, as a guest that has run for a while leaves its memory, and ballooned pages
//! the daemon knows as invalid.
//!
//! Above the reserved block every 4 KiB page is, independently: data (random bytes) with
//! probability [`DATA_PERCENT`], written zeros with [`ZERO_PERCENT`], ballooned with
//! [`INFLATED_PERCENT`] (written with data first, then inflated through the daemon's inflate
//! queue, so the daemon punches it and types it `Invalid`), and never touched otherwise. The
//! layout is random page by page on purpose: data runs are short (1.3 pages on average), so a
//! lazy restore serves nearly one fault per data page instead of batching long runs.

use ext_snapshot::PAGE_SIZE;
use vhost_user_mem::api::types::StatusResponse;
use vhost_user_mem::memory::PAGE_SHIFT;
use vm_memory::{Bytes, GuestAddress};

use crate::driver::{
    BenchError, Connection, Guest, Result, DEFLATE_QUEUE, INFLATE_QUEUE, RESERVED,
};
use crate::{pfn_requests, punch_directly, send_pfns};

/// Percentage of pages holding random data.
pub const DATA_PERCENT: u64 = 25;
/// Percentage of pages written with zeros.
pub const ZERO_PERCENT: u64 = 25;
/// Percentage of pages inflated into the balloon (typed `Invalid`).
pub const INFLATED_PERCENT: u64 = 10;

/// A small deterministic generator (splitmix64): the same layout and bytes in every run.
pub struct SplitMix(u64);

impl SplitMix {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..bound` (`bound` > 0; the modulo bias is irrelevant here).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }

    /// Shuffles `items` (Fisher–Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// What [`fill`] laid out above the reserved block.
pub struct Mix {
    /// Pages written with random bytes (and still holding them).
    pub data_pages: u64,
    /// Pages written with zeros.
    pub zero_pages: u64,
    /// Pages never touched (holes of the memfd).
    pub untouched_pages: u64,
    /// Guest frame numbers inflated through the daemon, ascending.
    pub inflated: Vec<u32>,
    /// The same frames as a gfn bitmap (bit `gfn % 64` of word `gfn / 64`), for
    /// `ext_snapshot::GfnBitmap`: what ext-vmm's in-process writer gets from the balloon.
    pub invalid_words: Vec<u64>,
}

/// The daemon's `GET /api/v1/status`.
pub fn daemon_status(api: &mut ext_vmm_api::ApiClient) -> Result<StatusResponse> {
    let response = api
        .request("GET", "status", None)
        .map_err(|e| BenchError::Other(format!("GET /api/v1/status: {e}")))?;
    if !response.is_success() {
        return Err(BenchError::Other(format!(
            "GET /api/v1/status: {} {:?}",
            response.status,
            response.error_messages()
        )));
    }
    serde_json::from_slice(&response.body)
        .map_err(|e| BenchError::Other(format!("GET /api/v1/status answer: {e}")))
}

/// Empties the balloon the inflate figure left full (every page above the reserved block, as
/// deflate requests), makes every such page a hole again, writes the mix and inflates its
/// ballooned pages through the daemon. Checks with the daemon's status that its invalid-page
/// map holds exactly those pages.
pub fn fill(
    guest: &Guest,
    connection: &mut Connection,
    api: &mut ext_vmm_api::ApiClient,
) -> Result<Mix> {
    let all = pfn_requests(RESERVED >> PAGE_SHIFT..guest.size >> PAGE_SHIFT)?;
    for request in &all {
        send_pfns(guest, &mut connection.queues[DEFLATE_QUEUE], request)?;
    }
    let left = daemon_status(api)?.invalid_pages;
    if left != 0 {
        return Err(BenchError::Other(format!(
            "{left} pages still invalid after deflating everything"
        )));
    }
    punch_directly(guest, RESERVED, guest.size - RESERVED)?;

    let mut random = SplitMix::new(0x5eed_0f6a_1100_e5e5);
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let zeros = vec![0u8; PAGE_SIZE as usize];
    let (mut data_pages, mut zero_pages, mut untouched_pages) = (0, 0, 0);
    let mut inflated = Vec::new();
    let mut invalid_words = vec![0u64; (guest.size / PAGE_SIZE).div_ceil(64) as usize];
    for gfn in RESERVED / PAGE_SIZE..guest.size / PAGE_SIZE {
        let address = GuestAddress(gfn * PAGE_SIZE);
        let pick = random.below(100);
        let bytes = if pick < DATA_PERCENT + INFLATED_PERCENT {
            for chunk in page.chunks_mut(8) {
                chunk.copy_from_slice(&random.next_u64().to_le_bytes());
            }
            Some(&page)
        } else if pick < DATA_PERCENT + INFLATED_PERCENT + ZERO_PERCENT {
            Some(&zeros)
        } else {
            None
        };
        match bytes {
            Some(bytes) => guest
                .mem
                .write_slice(bytes, address)
                .map_err(|e| BenchError::Other(format!("writing the mix: {e}")))?,
            None => untouched_pages += 1,
        }
        if pick < DATA_PERCENT {
            data_pages += 1;
        } else if pick < DATA_PERCENT + INFLATED_PERCENT {
            inflated.push(
                u32::try_from(gfn).map_err(|_| {
                    BenchError::Other("guest memory too large for 32-bit PFNs".into())
                })?,
            );
            invalid_words[(gfn / 64) as usize] |= 1 << (gfn % 64);
        } else if bytes.is_some() {
            zero_pages += 1;
        }
    }
    for request in inflated.chunks(crate::PFNS_PER_REQUEST) {
        send_pfns(guest, &mut connection.queues[INFLATE_QUEUE], request)?;
    }
    let invalid = daemon_status(api)?.invalid_pages;
    if invalid != inflated.len() as u64 {
        return Err(BenchError::Other(format!(
            "the daemon has {invalid} invalid pages, {} were inflated",
            inflated.len()
        )));
    }
    Ok(Mix {
        data_pages,
        zero_pages,
        untouched_pages,
        inflated,
        invalid_words,
    })
}
