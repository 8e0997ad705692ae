//! A deliberately small x86-64 interpreter for running one instruction in software: the
//! "grant by emulation" path, used where single-stepping is not available (CPL3 code on
//! PVM) or not wanted.
//!
//! It implements the instructions that do not touch flags and are common at a straddle
//! point: `mov` in every register/memory/immediate form, `lea`, near `jmp` and `nop`. Anything else is
//! refused with [`Error::UnsupportedInstruction`], and the caller falls back to
//! single-stepping or denies: an emulator that guesses is worse than none.

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use crate::error::{Error, Result};
use crate::hypervisor::Registers;

/// Data accesses of the emulated instruction, by guest-virtual address. The implementation
/// translates, checks permissions and touches memory; an `Err` aborts the instruction with
/// no architectural effect.
pub trait DataAccess {
    /// Reads `buf.len()` bytes at `gva`.
    fn read(&mut self, gva: u64, buf: &mut [u8]) -> Result<()>;
    /// Writes `data` at `gva`.
    fn write(&mut self, gva: u64, data: &[u8]) -> Result<()>;
}

fn unsupported(instruction: &Instruction) -> Error {
    Error::UnsupportedInstruction(format!("{instruction}"))
}

fn read_register(regs: &Registers, reg: Register) -> Option<u64> {
    if !reg.is_gpr() {
        return None;
    }
    let full = regs.gprs[reg.full_register().number()];
    Some(match reg.size() {
        8 => full,
        4 => full & 0xffff_ffff,
        2 => full & 0xffff,
        _ if is_high_byte(reg) => (full >> 8) & 0xff,
        _ => full & 0xff,
    })
}

fn is_high_byte(reg: Register) -> bool {
    matches!(
        reg,
        Register::AH | Register::CH | Register::DH | Register::BH
    )
}

/// Writes with x86 semantics: 32-bit writes zero-extend, 8/16-bit writes merge.
fn write_register(regs: &mut Registers, reg: Register, value: u64) -> Option<()> {
    if !reg.is_gpr() {
        return None;
    }
    let slot = &mut regs.gprs[reg.full_register().number()];
    *slot = match reg.size() {
        8 => value,
        4 => value & 0xffff_ffff,
        2 => (*slot & !0xffff) | (value & 0xffff),
        _ if is_high_byte(reg) => (*slot & !0xff00) | ((value & 0xff) << 8),
        _ => (*slot & !0xff) | (value & 0xff),
    };
    Some(())
}

/// The effective address of memory operand `operand` (0 or 1).
fn memory_address(instruction: &Instruction, operand: u32, regs: &Registers) -> Option<u64> {
    instruction.virtual_address(operand, 0, |reg, _, _| match reg {
        Register::ES | Register::CS | Register::SS | Register::DS => Some(0),
        // FS/GS bases live in MSRs the trait does not expose: refuse rather than guess.
        Register::FS | Register::GS => None,
        reg => read_register(regs, reg),
    })
}

/// Executes `instruction` on `regs` (RIP advanced on success). On `Err`, `regs` is
/// unchanged and no memory was written.
pub fn execute(
    instruction: &Instruction,
    regs: &mut Registers,
    memory: &mut dyn DataAccess,
) -> Result<()> {
    let mut next = *regs;
    match instruction.mnemonic() {
        Mnemonic::Nop => {}
        Mnemonic::Jmp => {
            next.rip = match instruction.op0_kind() {
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                    instruction.near_branch_target()
                }
                OpKind::Register => read_register(regs, instruction.op0_register())
                    .ok_or_else(|| unsupported(instruction))?,
                _ => return Err(unsupported(instruction)),
            };
            *regs = next;
            return Ok(());
        }
        Mnemonic::Lea => {
            let address =
                memory_address(instruction, 1, regs).ok_or_else(|| unsupported(instruction))?;
            write_register(&mut next, instruction.op0_register(), address)
                .ok_or_else(|| unsupported(instruction))?;
        }
        Mnemonic::Mov => {
            let value = match instruction.op1_kind() {
                OpKind::Register => read_register(regs, instruction.op1_register()),
                OpKind::Memory => {
                    let size = instruction.memory_size().size();
                    let gva = memory_address(instruction, 1, regs);
                    match (gva, size) {
                        (Some(gva), 1 | 2 | 4 | 8) => {
                            let mut buf = [0u8; 8];
                            memory.read(gva, &mut buf[..size])?;
                            Some(u64::from_le_bytes(buf))
                        }
                        _ => None,
                    }
                }
                OpKind::Immediate8
                | OpKind::Immediate16
                | OpKind::Immediate32
                | OpKind::Immediate64
                | OpKind::Immediate8to64
                | OpKind::Immediate32to64 => Some(instruction.immediate(1)),
                _ => None,
            }
            .ok_or_else(|| unsupported(instruction))?;
            match instruction.op0_kind() {
                OpKind::Register => write_register(&mut next, instruction.op0_register(), value)
                    .ok_or_else(|| unsupported(instruction))?,
                OpKind::Memory => {
                    let size = instruction.memory_size().size();
                    let gva = memory_address(instruction, 0, regs)
                        .filter(|_| matches!(size, 1 | 2 | 4 | 8))
                        .ok_or_else(|| unsupported(instruction))?;
                    memory.write(gva, &value.to_le_bytes()[..size])?;
                }
                _ => return Err(unsupported(instruction)),
            }
        }
        _ => return Err(unsupported(instruction)),
    }
    next.rip = instruction.next_ip();
    *regs = next;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions};
    use std::collections::BTreeMap;

    #[derive(Default)]
    struct Flat(BTreeMap<u64, u8>);

    impl DataAccess for Flat {
        fn read(&mut self, gva: u64, buf: &mut [u8]) -> Result<()> {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = *self.0.get(&(gva.wrapping_add(i as u64))).unwrap_or(&0);
            }
            Ok(())
        }
        fn write(&mut self, gva: u64, data: &[u8]) -> Result<()> {
            for (i, b) in data.iter().enumerate() {
                self.0.insert(gva.wrapping_add(i as u64), *b);
            }
            Ok(())
        }
    }

    fn run(bytes: &[u8], regs: &mut Registers, mem: &mut Flat) -> Result<()> {
        let insn = Decoder::with_ip(64, bytes, regs.rip, DecoderOptions::NONE).decode();
        execute(&insn, regs, mem)
    }

    #[test]
    fn mov_forms() {
        let mut regs = Registers {
            rip: 0x1000,
            ..Default::default()
        };
        let mut mem = Flat::default();
        regs.gprs[0] = u64::MAX;
        // mov rax, 0x1122334455667788
        run(
            &[0x48, 0xb8, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11],
            &mut regs,
            &mut mem,
        )
        .unwrap();
        assert_eq!(regs.gprs[0], 0x1122_3344_5566_7788);
        assert_eq!(regs.rip, 0x100a);
        // mov eax, 5 zero-extends
        run(&[0xb8, 5, 0, 0, 0], &mut regs, &mut mem).unwrap();
        assert_eq!(regs.gprs[0], 5);
        // mov ah, 0x7f merges
        run(&[0xb4, 0x7f], &mut regs, &mut mem).unwrap();
        assert_eq!(regs.gprs[0], 0x7f05);
        // mov [rbx], rax ; mov rcx, [rbx]
        regs.gprs[3] = 0x5000;
        run(&[0x48, 0x89, 0x03], &mut regs, &mut mem).unwrap();
        run(&[0x48, 0x8b, 0x0b], &mut regs, &mut mem).unwrap();
        assert_eq!(regs.gprs[1], 0x7f05);
        // lea rdx, [rbx+rcx*2+8]
        run(&[0x48, 0x8d, 0x54, 0x4b, 0x08], &mut regs, &mut mem).unwrap();
        assert_eq!(regs.gprs[2], 0x5000 + 0x7f05 * 2 + 8);
    }

    proptest::proptest! {
        /// Guest bytes are untrusted: any instruction is either executed or refused, never a
        /// panic, and a refusal leaves the registers as they were.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..16), rax: u64, rbx: u64) {
            let mut regs = Registers { rip: 0x1000, ..Default::default() };
            regs.gprs[0] = rax;
            regs.gprs[3] = rbx;
            let before = regs;
            let mut mem = Flat::default();
            let insn = Decoder::with_ip(64, &bytes, regs.rip, DecoderOptions::NONE).decode();
            if execute(&insn, &mut regs, &mut mem).is_err() {
                proptest::prop_assert_eq!(regs, before);
            }
        }
    }

    #[test]
    fn refuses_flag_writers_without_side_effects() {
        let mut regs = Registers::default();
        let before = regs;
        let mut mem = Flat::default();
        // add rax, 1
        assert!(run(&[0x48, 0x83, 0xc0, 0x01], &mut regs, &mut mem).is_err());
        assert_eq!(regs, before);
    }
}
