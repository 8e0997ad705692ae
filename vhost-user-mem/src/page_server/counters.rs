//! What a page server has done, over all its sessions: read by whoever runs it (the daemon's
//! control API shows it). The protocol is not involved: the counts stay in the server.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use ext_snapshot::restore::lazy::LazyCounters;
use serde::{Deserialize, Serialize};

/// A page server's figures since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerCounters {
    /// Connections accepted.
    pub connections: u64,
    /// Sessions whose hello was accepted (restoring VMs served).
    pub sessions: u64,
    /// Of those, the sessions serving now.
    pub active_sessions: u64,
    /// Hellos refused and sessions that failed while serving.
    pub failed_sessions: u64,
    /// Page faults served, every session.
    pub faults: u64,
    /// Pages copied from the snapshot (`UFFDIO_COPY`), every session.
    pub data_pages_copied: u64,
    /// Pages resolved with the zero page, every session.
    pub zero_pages_mapped: u64,
}

/// The running tally: totals of ended sessions plus the live counters of serving ones.
#[derive(Default)]
pub(crate) struct Tally {
    inner: Mutex<TallyState>,
}

#[derive(Default)]
struct TallyState {
    /// Session counts, and the fault figures of sessions that ended.
    totals: ServerCounters,
    /// Sessions serving now, by id.
    live: Vec<(u64, Arc<LazyCounters>)>,
}

/// The figures of one session's fault loop.
fn figures(counters: &LazyCounters) -> [u64; 3] {
    [
        counters.faults.load(Ordering::Relaxed),
        counters.data_pages_copied.load(Ordering::Relaxed),
        counters.zero_pages_mapped.load(Ordering::Relaxed),
    ]
}

impl Tally {
    fn state(&self) -> std::sync::MutexGuard<'_, TallyState> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn connection_accepted(&self) {
        self.state().totals.connections += 1;
    }

    pub(crate) fn hello_refused(&self) {
        self.state().totals.failed_sessions += 1;
    }

    pub(crate) fn session_started(&self, id: u64, counters: Arc<LazyCounters>) {
        let mut state = self.state();
        state.totals.sessions += 1;
        state.live.push((id, counters));
    }

    pub(crate) fn session_ended(&self, id: u64, failed: bool) {
        let mut state = self.state();
        let Some(at) = state.live.iter().position(|(live, _)| *live == id) else {
            return;
        };
        let (_, counters) = state.live.swap_remove(at);
        let [faults, copied, zero] = figures(&counters);
        let totals = &mut state.totals;
        totals.faults += faults;
        totals.data_pages_copied += copied;
        totals.zero_pages_mapped += zero;
        totals.failed_sessions += u64::from(failed);
    }

    /// The figures now.
    pub(crate) fn counters(&self) -> ServerCounters {
        let state = self.state();
        let mut now = state.totals;
        now.active_sessions = state.live.len() as u64;
        for (_, counters) in &state.live {
            let [faults, copied, zero] = figures(counters);
            now.faults += faults;
            now.data_pages_copied += copied;
            now.zero_pages_mapped += zero;
        }
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_and_ended_sessions_add_up() {
        let tally = Tally::default();
        tally.connection_accepted();
        tally.connection_accepted();
        tally.hello_refused();
        let live = Arc::new(LazyCounters::default());
        tally.session_started(7, live.clone());
        live.faults.store(3, Ordering::Relaxed);
        live.data_pages_copied.store(10, Ordering::Relaxed);
        let now = tally.counters();
        assert_eq!(now.connections, 2);
        assert_eq!(now.sessions, 1);
        assert_eq!(now.active_sessions, 1);
        assert_eq!(now.failed_sessions, 1);
        assert_eq!((now.faults, now.data_pages_copied), (3, 10));
        live.zero_pages_mapped.store(4, Ordering::Relaxed);
        tally.session_ended(7, true);
        // Ending twice, or a session never started, changes nothing.
        tally.session_ended(7, true);
        let end = tally.counters();
        assert_eq!(end.active_sessions, 0);
        assert_eq!(end.failed_sessions, 2);
        assert_eq!(
            (end.faults, end.data_pages_copied, end.zero_pages_mapped),
            (3, 10, 4)
        );
    }
}
