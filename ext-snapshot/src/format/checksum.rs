//! CRC-32C of snapshot data, fast.
//!
//! The `crc32c` crate computes the right value but its SSE 4.2 helpers are separate
//! `target_feature` functions that cannot be inlined into its loops (about 4.7 GB/s here, and
//! its `crc32c_combine` is slow enough to dominate on 64 KiB buffers). This module runs three
//! independent `crc32` instruction streams over 3 × 256-byte blocks inside one
//! `target_feature` function (the instruction has a latency of 3 and a throughput of 1) and
//! joins them with precomputed "advance by 256 / 512 bytes" tables. Results are bit-identical
//! to `crc32c::crc32c_append` (checked by the tests below).

use std::sync::OnceLock;

/// Bytes per lane of one three-lane block.
const LANE: usize = 256;
/// CRC-32C polynomial, reflected.
const POLY: u32 = 0x82f6_3b78;

/// CRC-32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c_append(0, data)
}

/// CRC-32C of the concatenation of the bytes that gave `crc` and `data`.
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        if data.len() >= 3 * LANE && std::arch::is_x86_feature_detected!("sse4.2") {
            let tables = shift_tables();
            // SAFETY: the CPU supports SSE 4.2 (checked just above), the only requirement of
            // the function's `target_feature`.
            return unsafe { crc32c_sse42_3way(crc, data, tables) };
        }
    }
    crc32c::crc32c_append(crc, data)
}

/// `tables[0]` advances a raw CRC register over `LANE` zero bytes, `tables[1]` over
/// `2 * LANE`; each is four byte-indexed tables (the operation is linear over GF(2)).
type ShiftTables = [[[u32; 256]; 4]; 2];

fn shift_tables() -> &'static ShiftTables {
    static TABLES: OnceLock<Box<ShiftTables>> = OnceLock::new();
    TABLES.get_or_init(|| {
        let mut t = Box::new([[[0u32; 256]; 4]; 2]);
        for (which, bytes) in [LANE, 2 * LANE].into_iter().enumerate() {
            // Images of the 32 basis vectors, then every byte value by linearity.
            let basis: Vec<u32> = (0..32).map(|bit| advance_zeros(1 << bit, bytes)).collect();
            for k in 0..4 {
                for b in 0..256usize {
                    t[which][k][b] = (0..8)
                        .filter(|bit| b & (1 << bit) != 0)
                        .fold(0, |acc, bit| acc ^ basis[8 * k + bit]);
                }
            }
        }
        t
    })
}

/// The raw register after feeding `bytes` zero bytes, bit by bit.
fn advance_zeros(mut reg: u32, bytes: usize) -> u32 {
    for _ in 0..bytes * 8 {
        reg = if reg & 1 != 0 {
            (reg >> 1) ^ POLY
        } else {
            reg >> 1
        };
    }
    reg
}

fn shift(table: &[[u32; 256]; 4], reg: u32) -> u32 {
    let b = reg.to_le_bytes();
    table[0][usize::from(b[0])]
        ^ table[1][usize::from(b[1])]
        ^ table[2][usize::from(b[2])]
        ^ table[3][usize::from(b[3])]
}

/// CRC-32C of `data` continuing from `crc`, three lanes of the SSE 4.2 `crc32` instruction
/// combined with `tables`.
///
/// # Safety
/// The CPU must support SSE 4.2; callers check `is_x86_feature_detected!("sse4.2")` first.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn crc32c_sse42_3way(crc: u32, data: &[u8], tables: &ShiftTables) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};

    let word = |w: &[u8]| {
        let mut x = [0u8; 8];
        x.copy_from_slice(w);
        u64::from_le_bytes(x)
    };
    let mut reg = !crc;
    let mut blocks = data.chunks_exact(3 * LANE);
    for block in &mut blocks {
        let (a, rest) = block.split_at(LANE);
        let (b, c) = rest.split_at(LANE);
        let (mut sa, mut sb, mut sc) = (u64::from(reg), 0u64, 0u64);
        for ((wa, wb), wc) in a
            .chunks_exact(8)
            .zip(b.chunks_exact(8))
            .zip(c.chunks_exact(8))
        {
            sa = _mm_crc32_u64(sa, word(wa));
            sb = _mm_crc32_u64(sb, word(wb));
            sc = _mm_crc32_u64(sc, word(wc));
        }
        // Register after a||b||c = advance(sa, 2 lanes) ^ advance(sb, 1 lane) ^ sc.
        reg = shift(&tables[1], sa as u32) ^ shift(&tables[0], sb as u32) ^ sc as u32;
    }
    let mut words = blocks.remainder().chunks_exact(8);
    let mut r = u64::from(reg);
    for w in &mut words {
        r = _mm_crc32_u64(r, word(w));
    }
    let mut reg = r as u32;
    for &byte in words.remainder() {
        reg = _mm_crc32_u8(reg, byte);
    }
    !reg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_crc32c_crate() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let data: Vec<u8> = (0..70_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        for len in [
            0,
            1,
            7,
            767,
            768,
            769,
            1023,
            1024,
            1025,
            1543,
            4096,
            4096 * 3 + 5,
            65536,
            70_000,
        ] {
            for start in [0, 1, 3] {
                let d = &data[start..len.max(start)];
                assert_eq!(crc32c(d), crc32c::crc32c(d), "len {len} start {start}");
                assert_eq!(
                    crc32c_append(0xdead_beef, d),
                    crc32c::crc32c_append(0xdead_beef, d)
                );
            }
        }
    }
}
