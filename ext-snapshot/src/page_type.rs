//! The type of a guest page, the heart of a sparse snapshot.

use crate::error::{Error, Result};

/// What a snapshot knows about one guest page.
///
/// The numeric values are the on-disk encoding (see `FORMAT.md`) and never change; new types
/// get new numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum PageType {
    /// The host never populated the page (a pagemap entry neither present nor swapped, or a
    /// hole in the backing file). Reads as zero; restore leaves it unallocated.
    NotPopulated = 0,
    /// The guest declared the page unused (balloon-inflated or free-page-reported). Its content
    /// is irrelevant; restore leaves it unallocated, so it reads as zero.
    Invalid = 1,
    /// The page was populated and holds only zero bytes. Restore leaves it unallocated.
    Zero = 2,
    /// The page holds data, stored in the snapshot.
    Data = 3,
    /// Only in a diff snapshot: the page did not change since the parent snapshot.
    SameAsParent = 4,
}

impl PageType {
    /// All types, in encoding order.
    pub const ALL: [PageType; 5] = [
        PageType::NotPopulated,
        PageType::Invalid,
        PageType::Zero,
        PageType::Data,
        PageType::SameAsParent,
    ];

    /// Decodes the on-disk value; `Err(Inconsistent)` for a value this version does not know.
    pub fn from_u8(value: u8) -> Result<Self> {
        PageType::ALL
            .get(usize::from(value))
            .copied()
            .ok_or_else(|| Error::Inconsistent(format!("unknown page type {value}")))
    }

    /// The on-disk value.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// Whether the snapshot stores the page's bytes.
    pub fn has_data(self) -> bool {
        self == PageType::Data
    }

    /// A short lowercase name, for reports and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            PageType::NotPopulated => "not-populated",
            PageType::Invalid => "invalid",
            PageType::Zero => "zero",
            PageType::Data => "data",
            PageType::SameAsParent => "same-as-parent",
        }
    }
}

impl std::fmt::Display for PageType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether a page (or any buffer) is all zero bytes.
///
/// Works on 256-byte blocks of `u64` words ORed together without early exit inside a block,
/// a shape the compiler turns into wide vector loads; returns at the first non-zero block.
pub fn is_zero_page(bytes: &[u8]) -> bool {
    let mut blocks = bytes.chunks_exact(256);
    for block in &mut blocks {
        let mut acc = 0u64;
        for word in block.chunks_exact(8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            acc |= u64::from_ne_bytes(w);
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips_and_rejects_unknown() {
        for t in PageType::ALL {
            assert_eq!(PageType::from_u8(t.as_u8()).ok(), Some(t));
        }
        assert!(matches!(PageType::from_u8(5), Err(Error::Inconsistent(_))));
    }
}
