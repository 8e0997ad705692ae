//! The authoritative permission table: gfn intervals → permissions, per view.
//!
//! A view is an ordered map of non-overlapping gfn intervals, each with its permissions;
//! gfns outside every interval have the view's default. Updates split and merge intervals, so
//! the table's size grows with the number of distinct ranges, not with guest size (a 1 TiB
//! guest with one protected page is three entries at most). Lookups are one `BTreeMap` range
//! query: O(log n) in the number of intervals.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::permissions::Permissions;

/// Identifier of a permission view (an altp2m-style alternate table).
pub type ViewId = u16;

/// The view every vCPU starts in; it always exists.
pub const DEFAULT_VIEW: ViewId = 0;

/// One maximal run of gfns with the same permissions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PermissionRun {
    /// First gfn of the run.
    pub start_gfn: u64,
    /// One past the last gfn of the run.
    pub end_gfn: u64,
    /// Permissions of every gfn in the run.
    pub permissions: Permissions,
}

/// Permissions of one view: sparse intervals over a default.
#[derive(Clone, Debug)]
pub struct View {
    default: Permissions,
    /// start gfn → (end gfn exclusive, permissions). Invariants: intervals do not overlap,
    /// none is empty, none carries the default, and adjacent intervals differ.
    intervals: BTreeMap<u64, (u64, Permissions)>,
}

impl View {
    /// A view where every gfn has `default`.
    pub fn new(default: Permissions) -> Self {
        Self {
            default,
            intervals: BTreeMap::new(),
        }
    }

    /// Permissions of gfns no range was set for.
    pub fn default_permissions(&self) -> Permissions {
        self.default
    }

    /// Number of stored intervals (the table's memory footprint).
    pub fn interval_count(&self) -> usize {
        self.intervals.len()
    }

    /// Permissions of `gfn`.
    pub fn get(&self, gfn: u64) -> Permissions {
        match self.intervals.range(..=gfn).next_back() {
            Some((_, &(end, perms))) if gfn < end => perms,
            _ => self.default,
        }
    }

    /// Splits the interval containing `gfn` (if any) so that an interval starts at `gfn`.
    fn split_at(&mut self, gfn: u64) {
        let found = self
            .intervals
            .range(..gfn)
            .next_back()
            .map(|(&start, &(end, perms))| (start, end, perms));
        if let Some((start, end, perms)) = found {
            if gfn < end {
                self.intervals.insert(start, (gfn, perms));
                self.intervals.insert(gfn, (end, perms));
            }
        }
    }

    /// Sets `perms` on every gfn in `gfns`.
    pub fn set(&mut self, gfns: Range<u64>, perms: Permissions) -> Result<()> {
        if gfns.start >= gfns.end {
            return Err(Error::InvalidRange {
                start: gfns.start,
                end: gfns.end,
            });
        }
        self.split_at(gfns.start);
        self.split_at(gfns.end);
        let inside: Vec<u64> = self
            .intervals
            .range(gfns.clone())
            .map(|(&s, _)| s)
            .collect();
        for start in inside {
            self.intervals.remove(&start);
        }
        if perms != self.default {
            self.intervals.insert(gfns.start, (gfns.end, perms));
        }
        self.merge_around(gfns.start);
        self.merge_around(gfns.end);
        Ok(())
    }

    /// Merges the interval ending at `boundary` with the one starting there when equal.
    fn merge_around(&mut self, boundary: u64) {
        let left = self
            .intervals
            .range(..boundary)
            .next_back()
            .map(|(&s, &(e, p))| (s, e, p));
        let right = self.intervals.get(&boundary).copied();
        if let (Some((ls, le, lp)), Some((re, rp))) = (left, right) {
            if le == boundary && lp == rp {
                self.intervals.remove(&boundary);
                self.intervals.insert(ls, (re, lp));
            }
        }
    }

    /// The maximal runs covering `gfns` exactly, default gaps included, in order.
    pub fn runs(&self, gfns: Range<u64>) -> Vec<PermissionRun> {
        let mut out = Vec::new();
        let mut cursor = gfns.start;
        let first = self
            .intervals
            .range(..=gfns.start)
            .next_back()
            .map(|(&s, _)| s)
            .unwrap_or(gfns.start);
        for (&start, &(end, perms)) in self.intervals.range(first..gfns.end) {
            if end <= cursor {
                continue;
            }
            if start > cursor {
                out.push(PermissionRun {
                    start_gfn: cursor,
                    end_gfn: start,
                    permissions: self.default,
                });
            }
            let run_start = start.max(cursor);
            let run_end = end.min(gfns.end);
            out.push(PermissionRun {
                start_gfn: run_start,
                end_gfn: run_end,
                permissions: perms,
            });
            cursor = run_end;
        }
        if cursor < gfns.end {
            out.push(PermissionRun {
                start_gfn: cursor,
                end_gfn: gfns.end,
                permissions: self.default,
            });
        }
        out
    }
}

/// All views and the vCPU → view assignment.
#[derive(Clone, Debug)]
pub struct PermissionTable {
    views: BTreeMap<ViewId, View>,
    vcpu_views: BTreeMap<u32, ViewId>,
}

impl Default for PermissionTable {
    fn default() -> Self {
        Self::new()
    }
}

impl PermissionTable {
    /// A table with only [`DEFAULT_VIEW`], which allows everything.
    pub fn new() -> Self {
        let mut views = BTreeMap::new();
        views.insert(DEFAULT_VIEW, View::new(Permissions::ALL));
        Self {
            views,
            vcpu_views: BTreeMap::new(),
        }
    }

    /// Creates view `id` whose unlisted gfns have `default`.
    pub fn create_view(&mut self, id: ViewId, default: Permissions) -> Result<()> {
        if self.views.contains_key(&id) {
            return Err(Error::ViewExists(id));
        }
        self.views.insert(id, View::new(default));
        Ok(())
    }

    /// The view `id`.
    pub fn view(&self, id: ViewId) -> Result<&View> {
        self.views.get(&id).ok_or(Error::NoSuchView(id))
    }

    /// Identifiers of all views.
    pub fn view_ids(&self) -> impl Iterator<Item = ViewId> + '_ {
        self.views.keys().copied()
    }

    /// Sets `perms` on `gfns` in view `id`.
    pub fn set_range(&mut self, id: ViewId, gfns: Range<u64>, perms: Permissions) -> Result<()> {
        self.views
            .get_mut(&id)
            .ok_or(Error::NoSuchView(id))?
            .set(gfns, perms)
    }

    /// Puts `vcpu` in view `id`.
    pub fn assign_vcpu(&mut self, vcpu: u32, id: ViewId) -> Result<()> {
        if !self.views.contains_key(&id) {
            return Err(Error::NoSuchView(id));
        }
        self.vcpu_views.insert(vcpu, id);
        Ok(())
    }

    /// The view of `vcpu` ([`DEFAULT_VIEW`] unless assigned).
    pub fn view_of(&self, vcpu: u32) -> ViewId {
        self.vcpu_views.get(&vcpu).copied().unwrap_or(DEFAULT_VIEW)
    }

    /// Permissions of `gfn` as seen by `vcpu`.
    pub fn permissions_for(&self, vcpu: u32, gfn: u64) -> Permissions {
        self.views
            .get(&self.view_of(vcpu))
            .map_or(Permissions::ALL, |v| v.get(gfn))
    }

    /// Views that at least one vCPU runs in; [`DEFAULT_VIEW`] counts while any vCPU is
    /// unassigned, so it is always included (a vCPU the VMM never assigned runs in it).
    pub fn active_views(&self) -> Vec<ViewId> {
        let mut ids: Vec<ViewId> = self.vcpu_views.values().copied().collect();
        ids.push(DEFAULT_VIEW);
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Permissions every active view grants on each run of `gfns`: what a VM-wide mechanism
    /// (KVM memslots) may install without letting any vCPU exceed its own view.
    pub fn common_runs(&self, gfns: Range<u64>) -> Vec<PermissionRun> {
        let mut boundaries = vec![gfns.start, gfns.end];
        let active = self.active_views();
        for id in &active {
            if let Some(view) = self.views.get(id) {
                boundaries.extend(view.runs(gfns.clone()).iter().map(|r| r.start_gfn));
            }
        }
        boundaries.sort_unstable();
        boundaries.dedup();
        let mut out: Vec<PermissionRun> = Vec::new();
        for pair in boundaries.windows(2) {
            let perms = active
                .iter()
                .filter_map(|id| self.views.get(id))
                .fold(Permissions::ALL, |acc, v| acc.intersection(v.get(pair[0])));
            match out.last_mut() {
                Some(last) if last.permissions == perms && last.end_gfn == pair[0] => {
                    last.end_gfn = pair[1]
                }
                _ => out.push(PermissionRun {
                    start_gfn: pair[0],
                    end_gfn: pair[1],
                    permissions: perms,
                }),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const R: Permissions = Permissions::READ;
    const RW: Permissions = Permissions::READ_WRITE;

    #[test]
    fn split_and_merge() {
        let mut v = View::new(Permissions::ALL);
        v.set(10..20, R).unwrap();
        v.set(12..14, RW).unwrap();
        assert_eq!(v.interval_count(), 3);
        v.set(12..14, R).unwrap();
        assert_eq!(v.interval_count(), 1);
        v.set(0..100, Permissions::ALL).unwrap();
        assert_eq!(v.interval_count(), 0);
        assert!(v.set(5..5, R).is_err());
    }

    #[test]
    fn huge_guest_is_cheap() {
        let mut v = View::new(Permissions::ALL);
        // 1 TiB guest = 2^28 gfns; one protected page in the middle.
        v.set(1 << 27..(1 << 27) + 1, R).unwrap();
        assert_eq!(v.interval_count(), 1);
        assert_eq!(v.runs(0..1 << 28).len(), 3);
    }

    #[test]
    fn common_runs_intersect_active_views() {
        let mut t = PermissionTable::new();
        t.create_view(1, Permissions::ALL).unwrap();
        t.set_range(1, 4..8, R).unwrap();
        // View 1 has no vCPU: it does not restrict the VM-wide mapping.
        assert_eq!(t.common_runs(0..16).len(), 1);
        t.assign_vcpu(1, 1).unwrap();
        let runs = t.common_runs(0..16);
        assert_eq!(runs.len(), 3);
        assert_eq!(runs[1].permissions, R);
        assert_eq!(t.permissions_for(0, 5), Permissions::ALL);
        assert_eq!(t.permissions_for(1, 5), R);
    }

    proptest! {
        #[test]
        fn matches_per_page_oracle(
            default in 0u8..8,
            ops in proptest::collection::vec((0u64..64, 1u64..16, 0u8..8), 1..40)
        ) {
            let default = Permissions::new(default & 1 != 0, default & 2 != 0, default & 4 != 0);
            let mut view = View::new(default);
            let mut oracle = [default; 96];
            for (start, len, bits) in ops {
                let p = Permissions::new(bits & 1 != 0, bits & 2 != 0, bits & 4 != 0);
                view.set(start..start + len, p).unwrap();
                for slot in &mut oracle[start as usize..(start + len) as usize] {
                    *slot = p;
                }
            }
            for (gfn, expected) in oracle.iter().enumerate() {
                prop_assert_eq!(view.get(gfn as u64), *expected);
            }
            let runs = view.runs(0..96);
            prop_assert_eq!(runs.first().map(|r| r.start_gfn), Some(0));
            prop_assert_eq!(runs.last().map(|r| r.end_gfn), Some(96));
            for pair in runs.windows(2) {
                prop_assert_eq!(pair[0].end_gfn, pair[1].start_gfn);
            }
            for run in &runs {
                for gfn in run.start_gfn..run.end_gfn {
                    prop_assert_eq!(oracle[gfn as usize], run.permissions);
                }
            }
            // Canonical form: no stored default, no equal neighbours.
            let stored: Vec<_> = view.intervals.iter().map(|(&s, &(e, p))| (s, e, p)).collect();
            for (s, e, p) in &stored {
                prop_assert!(s < e);
                prop_assert!(*p != default);
            }
            for pair in stored.windows(2) {
                prop_assert!(pair[0].1 <= pair[1].0);
                prop_assert!(!(pair[0].1 == pair[1].0 && pair[0].2 == pair[1].2));
            }
        }
    }
}
