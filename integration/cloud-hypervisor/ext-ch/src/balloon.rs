//! The guest frames an in-process balloon holds, for the snapshot writer.
//!
//! Cloud Hypervisor's virtio-balloon device reports every page the guest inflates and every
//! page it deflates ([`inflate`], [`deflate`]); `vm.snapshot` types the pages held at that
//! moment `Invalid` ([`held`]). The set is process-wide: a Cloud Hypervisor process runs one
//! VM. The balloon's own snapshot state carries the set as frame ranges ([`ranges`]), and a
//! restored balloon puts it back ([`restore`]), since the restored guest still considers
//! those pages given away.
//!
//! Free page reporting does not go through here: a reported page is the guest's again as
//! soon as it allocates it, without telling the device, so it cannot be typed `Invalid`; its
//! host memory is discarded, so the writer finds it never populated instead.

use std::sync::{Mutex, MutexGuard, PoisonError};

use ext_snapshot::PageSet;

/// One bit per guest frame number, grown on demand.
static HELD: Mutex<Vec<u64>> = Mutex::new(Vec::new());

fn held_words() -> MutexGuard<'static, Vec<u64>> {
    // A panic while holding the lock leaves a consistent bitmap: every update is one bit.
    HELD.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The guest inflated the page at frame `gfn` into the balloon.
pub fn inflate(gfn: u64) {
    let word = (gfn / 64) as usize;
    let mut words = held_words();
    if words.len() <= word {
        words.resize(word + 1, 0);
    }
    words[word] |= 1 << (gfn % 64);
}

/// The guest took the page at frame `gfn` back from the balloon.
pub fn deflate(gfn: u64) {
    if let Some(word) = held_words().get_mut((gfn / 64) as usize) {
        *word &= !(1 << (gfn % 64));
    }
}

/// The pages held now, as a set the snapshot writer types `Invalid`.
pub fn held() -> HeldPages {
    HeldPages {
        words: held_words().clone(),
    }
}

/// The pages held now as `(first frame, frames)` ranges, for the balloon's snapshot state.
pub fn ranges() -> Vec<(u64, u64)> {
    let words = held_words();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (w, &bits) in words.iter().enumerate() {
        let mut bits = bits;
        while bits != 0 {
            let gfn = w as u64 * 64 + u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            match out.last_mut() {
                Some((first, count)) if *first + *count == gfn => *count += 1,
                _ => out.push((gfn, 1)),
            }
        }
    }
    out
}

/// Replaces the held set with `ranges` (a restored balloon's state).
pub fn restore(ranges: &[(u64, u64)]) {
    let mut words = held_words();
    words.clear();
    drop(words);
    for &(first, count) in ranges {
        for gfn in first..first.saturating_add(count) {
            inflate(gfn);
        }
    }
}

/// A copy of the held set.
#[derive(Debug, Clone, Default)]
pub struct HeldPages {
    words: Vec<u64>,
}

impl HeldPages {
    /// Number of pages held.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

impl PageSet for HeldPages {
    fn contains(&self, _region: usize, _page: u64, gfn: u64) -> bool {
        self.words
            .get((gfn / 64) as usize)
            .is_some_and(|w| w & (1 << (gfn % 64)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test: the set is process-wide, and tests run in parallel threads.
    #[test]
    fn inflate_deflate_ranges_and_restore() {
        restore(&[]);
        for gfn in [5, 6, 7, 64, 65, 1000] {
            inflate(gfn);
        }
        deflate(6);
        deflate(4096); // never held, past the end
        assert_eq!(ranges(), vec![(5, 1), (7, 1), (64, 2), (1000, 1)]);
        let now = held();
        assert_eq!(now.count(), 5);
        assert!(now.contains(0, 0, 65) && !now.contains(0, 0, 6));
        restore(&[(10, 3)]);
        assert_eq!(ranges(), vec![(10, 3)]);
        assert!(!held().contains(0, 0, 5));
        restore(&[]);
        assert_eq!(held().count(), 0);
    }
}
