//! Fetching and decoding the instruction at a vCPU's RIP, and finding which guest frames it
//! occupies.
//!
//! The bytes are read from guest memory through the guest's own page tables (translated by
//! the hypervisor, `KVM_TRANSLATE`), page by page, because an instruction that straddles a
//! page boundary may live in two unrelated guest-physical frames.

use iced_x86::{Decoder, DecoderOptions, Instruction};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::error::{Error, Result};
use crate::hypervisor::{CpuMode, VcpuControl};
use crate::permissions::{gfn_of, PAGE_SIZE};

/// The longest x86 instruction.
pub const MAX_INSTRUCTION_LENGTH: usize = 15;

/// An instruction fetched from guest memory.
#[derive(Clone, Debug)]
pub struct FetchedInstruction {
    /// Guest-virtual address of its first byte.
    pub rip: u64,
    /// The decoded instruction (its `next_ip` is valid for RIP-relative operands).
    pub instruction: Instruction,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// The guest frames its bytes occupy, in order (one, or two for a straddle).
    pub gfns: Vec<u64>,
}

impl FetchedInstruction {
    /// Whether its bytes span two guest pages.
    pub fn straddles(&self) -> bool {
        self.gfns.len() > 1
    }
}

/// Translates `gva` for `vcpu`: identity when paging is off, a walk of the guest's 4-level
/// tables in `memory` in long mode, the hypervisor's translation otherwise.
pub fn translate<M: GuestMemory>(
    vcpu: &dyn VcpuControl,
    memory: &M,
    mode: CpuMode,
    gva: u64,
) -> Result<u64> {
    if !mode.paging {
        return Ok(gva);
    }
    if let Some(cr3) = mode.long_mode_cr3 {
        return walk_long_mode(memory, cr3, gva).ok_or(Error::Untranslated(gva));
    }
    vcpu.translate(gva)?.ok_or(Error::Untranslated(gva))
}

/// Physical-address bits of a page-table entry.
const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Page-size bit of PDPT and PD entries (1 GiB and 2 MiB pages).
const PAGE_SIZE_BIT: u64 = 1 << 7;

/// Walks 4-level long-mode page tables rooted at `cr3`, as the CPU would for an access that
/// ignores protection bits (the guest's own U/S, R/W and NX are the guest's business; only
/// presence decides whether there is a translation). `None` when a level is not present or
/// a table is outside guest memory.
pub fn walk_long_mode<M: GuestMemory>(memory: &M, cr3: u64, gva: u64) -> Option<u64> {
    let mut table = cr3 & ADDRESS_MASK;
    for level in (0..4u32).rev() {
        let shift = 12 + 9 * level;
        let index = (gva >> shift) & 0x1ff;
        let entry: u64 = memory.read_obj(GuestAddress(table + 8 * index)).ok()?;
        if entry & 1 == 0 {
            return None;
        }
        let address = entry & ADDRESS_MASK;
        let large = (level == 1 || level == 2) && entry & PAGE_SIZE_BIT != 0;
        if level == 0 || large {
            let offset_mask = (1u64 << shift) - 1;
            return Some((address & !offset_mask) | (gva & offset_mask));
        }
        table = address;
    }
    None
}

/// Reads up to 15 bytes at `rip`, stopping early at a page that does not translate or read,
/// and decodes one instruction from them.
pub fn fetch_instruction<M: GuestMemory>(
    vcpu: &dyn VcpuControl,
    memory: &M,
    mode: CpuMode,
    rip: u64,
) -> Result<FetchedInstruction> {
    let mut bytes = Vec::with_capacity(MAX_INSTRUCTION_LENGTH);
    let mut frames = Vec::with_capacity(2);
    let mut gva = rip;
    while bytes.len() < MAX_INSTRUCTION_LENGTH {
        let in_page = (PAGE_SIZE - gva % PAGE_SIZE) as usize;
        let chunk = in_page.min(MAX_INSTRUCTION_LENGTH - bytes.len());
        let Ok(gpa) = translate(vcpu, memory, mode, gva) else {
            break;
        };
        let mut buf = vec![0u8; chunk];
        if memory.read_slice(&mut buf, GuestAddress(gpa)).is_err() {
            break;
        }
        frames.push((bytes.len(), gfn_of(gpa)));
        bytes.extend_from_slice(&buf);
        gva = gva.wrapping_add(chunk as u64);
    }
    if bytes.is_empty() {
        return Err(Error::Untranslated(rip));
    }
    let mut decoder = Decoder::with_ip(mode.bitness, &bytes, rip, DecoderOptions::NONE);
    let instruction = decoder.decode();
    if instruction.is_invalid() {
        return Err(Error::Decode { rip });
    }
    let len = instruction.len();
    bytes.truncate(len);
    let gfns = frames
        .into_iter()
        .filter(|(offset, _)| *offset < len)
        .map(|(_, gfn)| gfn)
        .collect();
    Ok(FetchedInstruction {
        rip,
        instruction,
        bytes,
        gfns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn walks_4k_2m_and_1g_pages() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let w = |gpa: u64, v: u64| mem.write_obj(v, GuestAddress(gpa)).unwrap();
        // PML4[0] -> PDPT at 0x2000; PDPT[0] -> PD at 0x3000; PDPT[1] is a 1 GiB page.
        w(0x1000, 0x2000 | 3);
        w(0x2000, 0x3000 | 3);
        w(0x2008, 0x8000_0000 | 0x83);
        // PD[0] -> PT at 0x4000; PD[1] is a 2 MiB page at 0x0060_0000.
        w(0x3000, 0x4000 | 3);
        w(0x3008, 0x0060_0000 | 0x83);
        // PT[5] -> 0x7000; PT[6] not present.
        w(0x4000 + 8 * 5, 0x7000 | 3 | (1 << 63));
        assert_eq!(walk_long_mode(&mem, 0x1000, 0x5123), Some(0x7123));
        assert_eq!(walk_long_mode(&mem, 0x1000, 0x6000), None);
        assert_eq!(walk_long_mode(&mem, 0x1000, 0x0020_1234), Some(0x0060_1234));
        assert_eq!(
            walk_long_mode(&mem, 0x1000, 0x4000_0000 + 0x12_3456),
            Some(0x8012_3456)
        );
        // PML4[1] is zero: not present.
        assert_eq!(walk_long_mode(&mem, 0x1000, 1 << 39), None);
    }
}
