//! Raw memory files and gfn bitmap files, the CLI's inputs.

use std::fs::File;
use std::path::Path;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use super::commands::CliError;
use ext_snapshot::PAGE_SIZE;

/// Maps a raw memory file read-only as one guest region at address 0.
///
/// The mapping is shared and file-backed, so the snapshot writer finds never-populated pages
/// as holes of the file (`SEEK_DATA`/`SEEK_HOLE`) without reading them.
pub fn map_raw_memory(path: &Path) -> Result<GuestMemoryMmap, CliError> {
    let file =
        File::open(path).map_err(|e| CliError::io(format!("opening {}", path.display()), e))?;
    let len = file
        .metadata()
        .map_err(|e| CliError::io(format!("stat of {}", path.display()), e))?
        .len();
    if len == 0 || len % PAGE_SIZE != 0 {
        return Err(CliError::Usage(format!(
            "{}: raw memory must be a non-empty multiple of {PAGE_SIZE} bytes, it is {len}",
            path.display()
        )));
    }
    let size = usize::try_from(len)
        .map_err(|_| CliError::Usage(format!("{}: too large to map", path.display())))?;
    let region = MmapRegionBuilder::new(size)
        .with_file_offset(FileOffset::new(file, 0))
        .with_mmap_prot(libc::PROT_READ)
        .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| CliError::Usage(format!("mapping {}: {e}", path.display())))?;
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| CliError::Usage(format!("{}: too large to map", path.display())))?;
    GuestMemoryMmap::from_regions(vec![region])
        .map_err(|e| CliError::Usage(format!("mapping {}: {e}", path.display())))
}

/// Reads a gfn bitmap file: little-endian u64 words, bit i of word w is gfn 64*w+i. A file
/// whose length is not a multiple of 8 is padded with zero bits.
pub fn read_bitmap(path: &Path) -> Result<Vec<u64>, CliError> {
    let bytes =
        std::fs::read(path).map_err(|e| CliError::io(format!("reading {}", path.display()), e))?;
    Ok(bytes
        .chunks(8)
        .map(|chunk| {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            u64::from_le_bytes(word)
        })
        .collect())
}
