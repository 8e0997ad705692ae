//! A minimal Linux-like kernel image for host tests and benchmarks: raw x86 code wrapped in an
//! ELF64 executable with a Xen PVH entry note, which ext-vmm loads through its normal PVH boot
//! path. The code is entered at 1 MiB in flat 32-bit protected mode with paging off and `rbx`
//! pointing at the `hvm_start_info`, as Linux would be.

/// A minimal ELF64 executable with a Xen PVH entry note; `code` is loaded and entered at 1 MiB.
pub fn pvh_elf(code: &[u8]) -> Vec<u8> {
    const LOAD_ADDR: u64 = 0x10_0000;
    const HEADER: u64 = 64;
    const PROGRAM_HEADER: u64 = 56;
    const NOTE_OFFSET: u64 = HEADER + 2 * PROGRAM_HEADER;
    const NOTE_SIZE: u64 = 12 + 4 + 4; // header, "Xen\0", 32-bit entry
    const CODE_OFFSET: u64 = NOTE_OFFSET + NOTE_SIZE;
    let mut elf = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    for quad in [LOAD_ADDR, HEADER, 0] {
        elf.extend_from_slice(&quad.to_le_bytes()); // entry, phoff, shoff
    }
    elf.extend_from_slice(&0u32.to_le_bytes()); // flags
    for half in [HEADER as u16, PROGRAM_HEADER as u16, 2, 64, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes()); // ehsize, phentsize, phnum, shentsize...
    }
    let mut program_header = |kind: u32, offset: u64, addr: u64, size: u64| {
        elf.extend_from_slice(&kind.to_le_bytes());
        // Flags PF_R | PF_X, then offset, vaddr, paddr, file size, memory size, alignment.
        elf.extend_from_slice(&5u32.to_le_bytes());
        for field in [offset, addr, addr, size, size, 4] {
            elf.extend_from_slice(&field.to_le_bytes());
        }
    };
    program_header(1, CODE_OFFSET, LOAD_ADDR, code.len() as u64); // PT_LOAD
    program_header(4, NOTE_OFFSET, 0, NOTE_SIZE); // PT_NOTE
    for word in [4u32, 4, 18] {
        elf.extend_from_slice(&word.to_le_bytes()); // namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY
    }
    elf.extend_from_slice(b"Xen\0");
    elf.extend_from_slice(&(LOAD_ADDR as u32).to_le_bytes());
    elf.extend_from_slice(code);
    elf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvh_elf_note_and_code_are_where_the_headers_say() {
        let elf = pvh_elf(&[0xf4]);
        let note_offset = u64::from_le_bytes(elf[64 + 56 + 8..64 + 56 + 16].try_into().unwrap());
        assert_eq!(
            &elf[note_offset as usize + 12..note_offset as usize + 16],
            b"Xen\0"
        );
        let code_offset = u64::from_le_bytes(elf[64 + 8..64 + 16].try_into().unwrap());
        assert_eq!(elf[code_offset as usize], 0xf4);
    }
}
