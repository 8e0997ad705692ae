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

/// Translates `gva` for `vcpu` (identity when paging is off).
pub fn translate(vcpu: &dyn VcpuControl, mode: CpuMode, gva: u64) -> Result<u64> {
    if !mode.paging {
        return Ok(gva);
    }
    vcpu.translate(gva)?.ok_or(Error::Untranslated(gva))
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
        let Ok(gpa) = translate(vcpu, mode, gva) else {
            break;
        };
        let mut buf = vec![0u8; chunk];
        if memory.read_slice(&mut buf, GuestAddress(gpa)).is_err() {
            break;
        }
        frames.push((bytes.len(), gfn_of(gpa)));
        bytes.extend_from_slice(&buf);
        gva += chunk as u64;
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
