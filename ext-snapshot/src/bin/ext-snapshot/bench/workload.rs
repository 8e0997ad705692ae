//! Guest memory shaped like the benchmark scenarios of issue 3, item 8.
//!
//! Memory is memfd-backed (`shared=on`, as vhost-user needs), so every writer — ours, the
//! holes-only copy and the dense dump — runs on exactly the same pages, and never-populated
//! pages are real holes of the memfd. Contents come from a small xorshift generator: fast,
//! incompressible, and reproducible from a seed.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

use super::error::{BenchError, Result};

/// Granularity of the data/zero/hole pattern: 64 KiB runs, like the clusters a guest kernel
/// touches, rather than isolated pages.
pub const RUN_BYTES: u64 = 64 << 10;

/// A benchmark scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Mostly never populated; `percent` of the 64 KiB runs hold random data.
    SparseData {
        /// Share of runs with data, 0–100.
        percent: u8,
    },
    /// Fully populated; `zero_percent` of the runs were written with zeros, the rest with
    /// random data.
    PopulatedZeros {
        /// Share of runs that are populated zeros, 0–100.
        zero_percent: u8,
    },
    /// Every byte random.
    Random,
}

/// Creates memfd-backed guest memory of `size` bytes at guest address 0, never populated.
pub fn memfd_memory(size: u64) -> Result<GuestMemoryMmap> {
    // SAFETY: memfd_create reads a NUL-terminated name from a static C string and returns a new
    // descriptor or -1; no memory of ours is written.
    let fd = unsafe { libc::memfd_create(c"ext-snapshot-bench".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(BenchError::io(
            "memfd_create",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|e| BenchError::io("sizing the memfd", e))?;
    let size = usize::try_from(size).map_err(|_| BenchError::Memory("size".into()))?;
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        size,
        Some(FileOffset::new(file, 0)),
    )])
    .map_err(|e| BenchError::Memory(e.to_string()))
}

/// Small, fast pseudo-random generator (xorshift64*), good enough for incompressible data.
pub struct Random(u64);

impl Random {
    /// A generator from `seed` (any value; zero is remapped).
    pub fn new(seed: u64) -> Self {
        Random(seed | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Fills `buffer` with random bytes.
    pub fn fill(&mut self, buffer: &mut [u8]) {
        for chunk in buffer.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// Writes `scenario` into `memory` (one region at 0 of `size` bytes).
pub fn fill(memory: &GuestMemoryMmap, size: u64, scenario: Scenario, seed: u64) -> Result<()> {
    let mut random = Random::new(seed);
    let mut pick = Random::new(seed ^ 0x9e37_79b9_7f4a_7c15);
    let mut data = vec![0u8; RUN_BYTES as usize];
    let zeros = vec![0u8; RUN_BYTES as usize];
    let mut offset = 0u64;
    while offset < size {
        let length = RUN_BYTES.min(size - offset);
        let roll = (pick.next_u64() % 100) as u8;
        let kind = match scenario {
            Scenario::SparseData { percent } if roll < percent => Some(true),
            Scenario::SparseData { .. } => None,
            Scenario::PopulatedZeros { zero_percent } => Some(roll >= zero_percent),
            Scenario::Random => Some(true),
        };
        match kind {
            Some(true) => {
                random.fill(&mut data[..length as usize]);
                memory
                    .write_slice(&data[..length as usize], GuestAddress(offset))
                    .map_err(|e| BenchError::Memory(e.to_string()))?;
            }
            Some(false) => {
                memory
                    .write_slice(&zeros[..length as usize], GuestAddress(offset))
                    .map_err(|e| BenchError::Memory(e.to_string()))?;
            }
            None => {}
        }
        offset += length;
    }
    Ok(())
}
