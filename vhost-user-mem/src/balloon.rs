//! The virtio-balloon device (virtio 1.2 §5.5, device type 5), without any vhost-user types:
//! queue processing over a `virtio_queue::Queue` and guest memory, the config space, and the
//! state the daemon keeps across frontend reconnects.
//!
//! Queues are numbered densely by the negotiated features, as Linux numbers them: inflate 0,
//! deflate 1, then the stats queue if `VIRTIO_BALLOON_F_STATS_VQ`, then free page hinting if
//! `VIRTIO_BALLOON_F_FREE_PAGE_HINT` (never offered here), then free page reporting if
//! `VIRTIO_BALLOON_F_REPORTING`. See [`queue_kind`].
//!
//! A request the guest gets wrong (a PFN or range outside memory, an unaligned or overflowing
//! range, a buffer outside memory, a short stats buffer) is refused whole: it is logged,
//! counted in [`Counters::refused_requests`], nothing of it is punched, and its chain still goes
//! back to the used ring so the guest does not wait for it.

use std::collections::BTreeMap;
use std::time::SystemTime;

use tracing::{debug, warn};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestMemory, GuestMemoryMmap};

use crate::error::{Error, Result};
use crate::invalid_pages::InvalidPages;
use crate::memory::{self, PAGE_SHIFT, PAGE_SIZE};

/// Feature bit: the host must be told before pages are reused (not offered).
pub const VIRTIO_BALLOON_F_MUST_TELL_HOST: u32 = 0;
/// Feature bit: the guest sends memory statistics on the stats queue.
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
/// Feature bit: the guest deflates the balloon when it runs out of memory.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
/// Feature bit: free page hinting (not offered).
pub const VIRTIO_BALLOON_F_FREE_PAGE_HINT: u32 = 3;
/// Feature bit: page poisoning (not offered).
pub const VIRTIO_BALLOON_F_PAGE_POISON: u32 = 4;
/// Feature bit: free page reporting.
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;

/// The device features this balloon offers (besides the transport's bits).
pub const DEVICE_FEATURES: u64 = (1 << VIRTIO_BALLOON_F_STATS_VQ)
    | (1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
    | (1 << VIRTIO_BALLOON_F_REPORTING);

/// Largest number of queues the device uses (inflate, deflate, stats, reporting).
pub const MAX_QUEUES: usize = 4;

/// Size of the config space: `num_pages`, `actual`, `free_page_hint_cmd_id`, `poison_val`
/// (the last two read as zero: their features are not offered).
pub const CONFIG_SIZE: usize = 16;

/// Largest request (bytes of one chain) read from inflate, deflate or stats queues. Linux sends
/// at most 256 PFNs (1 KiB) per inflate or deflate request and 16 stats entries.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Size of one PFN in an inflate or deflate request (`le32`).
pub const PFN_ENTRY_SIZE: usize = 4;

/// Size of one `struct virtio_balloon_stat` (`le16 tag; le64 val;`, packed).
pub const STAT_ENTRY_SIZE: usize = 10;

/// What a queue carries, by index under the negotiated features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueKind {
    /// PFNs the guest gives to the balloon.
    Inflate,
    /// PFNs the guest takes back.
    Deflate,
    /// Memory statistics.
    Stats,
    /// Free page hinting (never negotiated here; chains are returned unread).
    FreePageHint,
    /// Free page reporting: ranges the guest reports free.
    Reporting,
}

/// The kind of queue `index` under `acked_features`, `None` past the last queue.
pub fn queue_kind(acked_features: u64, index: usize) -> Option<QueueKind> {
    let has = |bit: u32| acked_features & (1 << bit) != 0;
    let mut kinds = vec![QueueKind::Inflate, QueueKind::Deflate];
    if has(VIRTIO_BALLOON_F_STATS_VQ) {
        kinds.push(QueueKind::Stats);
    }
    if has(VIRTIO_BALLOON_F_FREE_PAGE_HINT) {
        kinds.push(QueueKind::FreePageHint);
    }
    if has(VIRTIO_BALLOON_F_REPORTING) {
        kinds.push(QueueKind::Reporting);
    }
    kinds.get(index).copied()
}

/// Counters the daemon reports (all since the daemon started, across reconnects).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Pages that entered the invalid map by inflation.
    pub inflated_pages: u64,
    /// Pages that left it by deflation.
    pub deflated_pages: u64,
    /// Bytes the guest reported free (and were punched, or tried).
    pub reported_bytes: u64,
    /// Bytes punched out of guest memory files (inflate and reporting).
    pub punched_bytes: u64,
    /// Requests refused for bad input.
    pub refused_requests: u64,
    /// Holes the system refused to punch (the file does not support it, for example).
    pub punch_errors: u64,
    /// Stats buffers parsed.
    pub stats_updates: u64,
}

/// What processing a queue did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueOutcome {
    /// Chains put in the used ring (the caller signals the guest if it wants to be).
    pub used: u16,
    /// Of those, chains refused for bad input.
    pub refused: u16,
}

/// The balloon device state. It outlives frontend connections: the target, `actual`, the
/// invalid-page map, the counters and the latest stats stay when a frontend disconnects.
#[derive(Debug, Default)]
pub struct Balloon {
    num_pages: u32,
    actual: u32,
    acked_features: u64,
    invalid: InvalidPages,
    counters: Counters,
    stats: BTreeMap<u16, u64>,
    /// Head of the stats buffer the device holds until it wants fresh stats (virtio 1.2
    /// §5.5.6.3: the device returns it to ask the guest for an update).
    held_stats_head: Option<u16>,
    /// When the latest stats buffer was parsed.
    stats_received_at: Option<SystemTime>,
}

impl Balloon {
    /// A balloon with a target of zero pages.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the features the driver acknowledged (they decide queue numbering).
    pub fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    /// The features the driver acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Target size of the balloon in 4 KiB pages (`num_pages`).
    pub fn target_pages(&self) -> u32 {
        self.num_pages
    }

    /// Pages the guest says the balloon holds (`actual`, written by the guest).
    pub fn actual_pages(&self) -> u32 {
        self.actual
    }

    /// Sets the target. The caller tells the frontend the config changed (see
    /// `BalloonBackend::resize`).
    pub fn set_target_pages(&mut self, pages: u32) {
        self.num_pages = pages;
    }

    /// The invalid-page map.
    pub fn invalid_pages(&self) -> &InvalidPages {
        &self.invalid
    }

    /// The counters.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The latest value of each statistic the guest sent, by tag (`VIRTIO_BALLOON_S_*`).
    pub fn stats(&self) -> &BTreeMap<u16, u64> {
        &self.stats
    }

    /// When the guest's latest stats buffer arrived, `None` before the first one.
    pub fn stats_received_at(&self) -> Option<SystemTime> {
        self.stats_received_at
    }

    /// Whether the device holds a stats buffer it can return to ask for fresh stats.
    pub fn holds_stats_buffer(&self) -> bool {
        self.held_stats_head.is_some()
    }

    /// Forgets what belonged to the connection that ended: the held stats buffer lives in the
    /// old connection's queue.
    pub fn connection_closed(&mut self) {
        self.held_stats_head = None;
    }

    /// Reads `size` bytes of the config space at `offset`. `None` if the access leaves it.
    pub fn read_config(&self, offset: u32, size: u32) -> Option<Vec<u8>> {
        let config = self.config_bytes();
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(usize::try_from(size).ok()?)?;
        config.get(start..end).map(<[u8]>::to_vec)
    }

    /// Writes the config space: only `actual` (bytes 4..8) is driver-writable.
    pub fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<()> {
        let start = offset as usize;
        let end = start.saturating_add(data.len());
        if start < 4 || end > 8 || data.is_empty() {
            return Err(Error::ConfigAccess {
                offset,
                size: data.len(),
            });
        }
        let mut actual = self.actual.to_le_bytes();
        actual[start - 4..end - 4].copy_from_slice(data);
        self.actual = u32::from_le_bytes(actual);
        debug!(actual = self.actual, "guest wrote actual");
        Ok(())
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut config = [0u8; CONFIG_SIZE];
        config[0..4].copy_from_slice(&self.num_pages.to_le_bytes());
        config[4..8].copy_from_slice(&self.actual.to_le_bytes());
        config
    }

    /// Processes every available chain of `queue`, a queue of kind `kind`, over `mem`.
    /// Bad requests are refused and returned (see the module doc); `Err` only if the queue
    /// itself is unusable (its rings outside memory).
    pub fn process_queue<B: Bitmap + 'static>(
        &mut self,
        kind: QueueKind,
        queue: &mut Queue,
        mem: &GuestMemoryMmap<B>,
    ) -> Result<QueueOutcome> {
        let mut outcome = QueueOutcome::default();
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let result = match kind {
                QueueKind::Inflate => self.inflate(chain, mem),
                QueueKind::Deflate => self.deflate(chain, mem),
                QueueKind::Reporting => self.report(chain, mem),
                QueueKind::Stats => self.receive_stats(chain, mem),
                QueueKind::FreePageHint => Ok(Disposition::Return),
            };
            let disposition = match result {
                Ok(disposition) => disposition,
                Err(e) => {
                    warn!(?kind, head, error = %e, "refused a balloon request");
                    self.counters.refused_requests += 1;
                    outcome.refused += 1;
                    Disposition::Return
                }
            };
            match disposition {
                Disposition::Return => {
                    queue.add_used(mem, head, 0)?;
                    outcome.used += 1;
                }
                Disposition::Hold => {
                    // A guest that sends a second stats buffer gets the first one back.
                    if let Some(old) = self.held_stats_head.replace(head) {
                        queue.add_used(mem, old, 0)?;
                        outcome.used += 1;
                    }
                }
            }
        }
        Ok(outcome)
    }

    /// Returns the held stats buffer to the guest, asking it for fresh statistics. `Ok(true)`
    /// if a buffer was returned (signal the guest), `Ok(false)` if none was held.
    pub fn request_stats<B: Bitmap + 'static>(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap<B>,
    ) -> Result<bool> {
        match self.held_stats_head.take() {
            Some(head) => {
                queue.add_used(mem, head, 0)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn inflate<B: Bitmap + 'static>(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap<B>>,
        mem: &GuestMemoryMmap<B>,
    ) -> Result<Disposition> {
        let pfns = parse_pfns(&read_request(chain, mem)?, mem)?;
        for (first, count) in page_runs(&pfns) {
            let (addr, len) = (first << PAGE_SHIFT, count << PAGE_SHIFT);
            match memory::punch_range(mem, addr, len) {
                Ok(()) => self.counters.punched_bytes += len,
                Err(e) => {
                    // The guest gave the pages up all the same: they stay invalid.
                    warn!(addr, len, error = %e, "could not punch inflated pages");
                    self.counters.punch_errors += 1;
                }
            }
            for pfn in first..first + count {
                if self.invalid.insert(pfn) {
                    self.counters.inflated_pages += 1;
                }
            }
        }
        Ok(Disposition::Return)
    }

    fn deflate<B: Bitmap + 'static>(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap<B>>,
        mem: &GuestMemoryMmap<B>,
    ) -> Result<Disposition> {
        let pfns = parse_pfns(&read_request(chain, mem)?, mem)?;
        // The pages stay holes: the guest faults them in as zero pages when it reuses them.
        for pfn in pfns {
            if self.invalid.remove(pfn) {
                self.counters.deflated_pages += 1;
            }
        }
        Ok(Disposition::Return)
    }

    fn report<B: Bitmap + 'static>(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap<B>>,
        mem: &GuestMemoryMmap<B>,
    ) -> Result<Disposition> {
        // Each descriptor *is* a free range (Linux adds them as device-writable buffers; the
        // device writes nothing). Check them all before punching any.
        let ranges: Vec<(u64, u64)> = chain
            .map(|desc| (desc.addr().0, u64::from(desc.len())))
            .collect();
        check_reported_ranges(&ranges, mem)?;
        for (addr, len) in ranges {
            self.counters.reported_bytes += len;
            match memory::punch_range(mem, addr, len) {
                Ok(()) => self.counters.punched_bytes += len,
                Err(e) => {
                    warn!(addr, len, error = %e, "could not punch a reported range");
                    self.counters.punch_errors += 1;
                }
            }
        }
        Ok(Disposition::Return)
    }

    fn receive_stats<B: Bitmap + 'static>(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap<B>>,
        mem: &GuestMemoryMmap<B>,
    ) -> Result<Disposition> {
        let entries = parse_stats(&read_request(chain, mem)?)?;
        self.stats.extend(entries);
        self.counters.stats_updates += 1;
        self.stats_received_at = Some(SystemTime::now());
        Ok(Disposition::Hold)
    }
}

/// What happens to a processed chain.
enum Disposition {
    /// Into the used ring now.
    Return,
    /// Held by the device (the stats buffer).
    Hold,
}

/// The device-readable bytes of a chain, at most [`MAX_REQUEST_BYTES`].
fn read_request<B: Bitmap + 'static>(
    chain: DescriptorChain<&GuestMemoryMmap<B>>,
    mem: &GuestMemoryMmap<B>,
) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    for desc in chain {
        let (addr, len) = (desc.addr(), desc.len());
        if desc.is_write_only() {
            return Err(Error::WriteOnlyDescriptor { addr: addr.0 });
        }
        let start = bytes.len();
        let total = start.saturating_add(len as usize);
        if total > MAX_REQUEST_BYTES {
            return Err(Error::TooLarge {
                len: total,
                max: MAX_REQUEST_BYTES,
            });
        }
        bytes.resize(total, 0);
        mem.read_slice(&mut bytes[start..], addr)
            .map_err(|_| Error::DescriptorOutsideMemory { addr: addr.0, len })?;
    }
    Ok(bytes)
}

/// The PFNs of an inflate or deflate request (one function for both queues), from the bytes
/// the guest put in the chain: little-endian `u32` page frame numbers of 4 KiB pages.
///
/// `Ok` holds them in the guest's order, duplicates kept; every one is a page inside `mem`.
/// `Err(Error::Malformed)` if `bytes` is not a whole, non-zero number of
/// [`PFN_ENTRY_SIZE`]-byte entries; `Err(Error::OutsideMemory)` if any page is not entirely
/// inside guest memory (the request is then refused whole). Pure: reads nothing but its
/// arguments.
pub fn parse_pfns<M: GuestMemory>(bytes: &[u8], mem: &M) -> Result<Vec<u64>> {
    let pfns = parse_entries(bytes, |entry: [u8; PFN_ENTRY_SIZE]| {
        u64::from(u32::from_le_bytes(entry))
    })?;
    for &pfn in &pfns {
        memory::check_range(mem, pfn << PAGE_SHIFT, PAGE_SIZE)?;
    }
    Ok(pfns)
}

/// The statistics of a stats buffer (`struct virtio_balloon_stat { le16 tag; le64 val; }`,
/// packed), in the guest's order. `Err(Error::Malformed)` if `bytes` is not a whole, non-zero
/// number of [`STAT_ENTRY_SIZE`]-byte entries. Unknown tags are kept: the guest may know
/// statistics this device does not name.
pub fn parse_stats(bytes: &[u8]) -> Result<Vec<(u16, u64)>> {
    parse_entries(bytes, |entry: [u8; STAT_ENTRY_SIZE]| {
        let [t0, t1, v @ ..] = entry;
        (u16::from_le_bytes([t0, t1]), u64::from_le_bytes(v))
    })
}

/// Checks the ranges of one free page reporting chain, `(guest address, length in bytes)`, one
/// per descriptor: `Ok(())` if every range is non-empty, 4 KiB aligned and entirely inside
/// `mem` (only then may any of them be punched); otherwise the error of the first bad range
/// (`Error::BadLength`, `Error::Unaligned`, `Error::OutsideMemory`), and the whole chain is
/// refused. An empty chain is accepted: it reports nothing.
pub fn check_reported_ranges<M: GuestMemory>(ranges: &[(u64, u64)], mem: &M) -> Result<()> {
    ranges
        .iter()
        .try_for_each(|&(addr, len)| memory::check_range(mem, addr, len))
}

/// The holes an inflate punches for `pfns` (any order, duplicates allowed): the distinct
/// PFNs, sorted, with consecutive ones merged, as `(first PFN, page count)`. One hole per run.
pub fn page_runs(pfns: &[u64]) -> Vec<(u64, u64)> {
    let mut sorted = pfns.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for pfn in sorted {
        match runs.last_mut() {
            Some((first, count)) if *first + *count == pfn => *count += 1,
            _ => runs.push((pfn, 1)),
        }
    }
    runs
}

/// Splits a request into `N`-byte entries decoded by `decode`; a request that is empty or not
/// a whole number of entries is malformed.
fn parse_entries<const N: usize, T>(bytes: &[u8], decode: impl Fn([u8; N]) -> T) -> Result<Vec<T>> {
    if bytes.is_empty() || bytes.len() % N != 0 {
        return Err(Error::Malformed {
            len: bytes.len(),
            entry: N,
        });
    }
    Ok(bytes
        .chunks_exact(N)
        .map(|chunk| {
            let mut entry = [0u8; N];
            entry.copy_from_slice(chunk);
            decode(entry)
        })
        .collect())
}

#[cfg(test)]
mod tests;
