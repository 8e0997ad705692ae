//! Read/write/execute permission bits and the kinds of access they govern.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::Error;

/// Size of a guest frame in bytes (x86-64 base page).
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;

/// The guest frame number holding a guest-physical address.
pub fn gfn_of(gpa: u64) -> u64 {
    gpa >> PAGE_SHIFT
}

/// A set of read/write/execute permissions for a guest frame.
///
/// Serialized as the familiar three-character string (`"rwx"`, `"r-x"`, `"---"`), which is
/// what the REST layer shows and accepts.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Permissions(u8);

impl Permissions {
    /// No access at all.
    pub const NONE: Self = Self(0);
    /// Data reads.
    pub const READ: Self = Self(1);
    /// Data writes.
    pub const WRITE: Self = Self(2);
    /// Instruction fetches.
    pub const EXECUTE: Self = Self(4);
    /// Read and write.
    pub const READ_WRITE: Self = Self(3);
    /// Read and execute.
    pub const READ_EXECUTE: Self = Self(5);
    /// Everything: the default of a fresh view.
    pub const ALL: Self = Self(7);

    /// Builds a permission set from individual flags.
    pub const fn new(read: bool, write: bool, execute: bool) -> Self {
        Self(read as u8 | (write as u8) << 1 | (execute as u8) << 2)
    }

    /// Whether every permission in `other` is also in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether `access` is permitted.
    pub const fn allows(self, access: AccessKind) -> bool {
        self.contains(access.permission())
    }

    /// Permissions present in both sets.
    pub const fn intersection(self, other: Self) -> Self {
        Self(self.0 & other.0)
    }

    /// Permissions present in either set.
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// Whether reads are allowed.
    pub const fn read(self) -> bool {
        self.contains(Self::READ)
    }

    /// Whether writes are allowed.
    pub const fn write(self) -> bool {
        self.contains(Self::WRITE)
    }

    /// Whether instruction fetches are allowed.
    pub const fn execute(self) -> bool {
        self.contains(Self::EXECUTE)
    }
}

impl fmt::Display for Permissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let flag = |on: bool, c: char| if on { c } else { '-' };
        write!(
            f,
            "{}{}{}",
            flag(self.read(), 'r'),
            flag(self.write(), 'w'),
            flag(self.execute(), 'x')
        )
    }
}

impl fmt::Debug for Permissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Permissions({self})")
    }
}

impl FromStr for Permissions {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::InvalidPermissions(s.to_string());
        let b = s.as_bytes();
        if b.len() != 3 {
            return Err(bad());
        }
        let flag = |c: u8, on: u8| match c {
            b'-' => Ok(false),
            c if c == on => Ok(true),
            _ => Err(bad()),
        };
        Ok(Self::new(
            flag(b[0], b'r')?,
            flag(b[1], b'w')?,
            flag(b[2], b'x')?,
        ))
    }
}

impl Serialize for Permissions {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Permissions {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The kind of guest access that hit a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessKind {
    /// A data read.
    Read,
    /// A data write.
    Write,
    /// An instruction fetch.
    Execute,
}

impl AccessKind {
    /// The permission this access needs.
    pub const fn permission(self) -> Permissions {
        match self {
            AccessKind::Read => Permissions::READ,
            AccessKind::Write => Permissions::WRITE,
            AccessKind::Execute => Permissions::EXECUTE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_round_trip() {
        for bits in 0..8u8 {
            let p = Permissions(bits);
            let s = p.to_string();
            assert_eq!(s.parse::<Permissions>().unwrap(), p);
        }
        assert!("rw".parse::<Permissions>().is_err());
        assert!("wrx".parse::<Permissions>().is_err());
        let json = serde_json::to_string(&Permissions::READ_EXECUTE).unwrap();
        assert_eq!(json, "\"r-x\"");
    }

    #[test]
    fn allows_matches_bits() {
        assert!(Permissions::READ_WRITE.allows(AccessKind::Write));
        assert!(!Permissions::READ_WRITE.allows(AccessKind::Execute));
        assert!(Permissions::EXECUTE.allows(AccessKind::Execute));
        assert!(!Permissions::EXECUTE.allows(AccessKind::Read));
    }
}
