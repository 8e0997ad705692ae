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

use crate::GfnSet;

static HELD: Mutex<GfnSet> = Mutex::new(GfnSet::new());

fn held_set() -> MutexGuard<'static, GfnSet> {
    // A panic while holding the lock leaves a consistent set: every update is one bit.
    HELD.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The guest inflated the page at frame `gfn` into the balloon.
pub fn inflate(gfn: u64) {
    held_set().insert(gfn);
}

/// The guest took the page at frame `gfn` back from the balloon.
pub fn deflate(gfn: u64) {
    held_set().remove(gfn);
}

/// The pages held now (a copy).
pub fn held() -> GfnSet {
    held_set().clone()
}

/// The pages held now as `(first frame, frames)` ranges, for the balloon's snapshot state.
pub fn ranges() -> Vec<(u64, u64)> {
    held_set().ranges()
}

/// Replaces the held set with `ranges` (a restored balloon's state).
pub fn restore(ranges: &[(u64, u64)]) {
    let mut set = GfnSet::new();
    for &(first, count) in ranges {
        set.insert_range(first, count);
    }
    *held_set() = set;
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
        assert_eq!(now.len(), 5);
        assert!(now.contains(65) && !now.contains(6));
        restore(&[(10, 3)]);
        assert_eq!(ranges(), vec![(10, 3)]);
        assert!(!held().contains(5));
        restore(&[]);
        assert!(held().is_empty());
    }
}
