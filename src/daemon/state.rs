//! What the daemon's threads share: each source's last window and status, the publisher's
//! gauges, the last health verdict and the page's live feed. Written by the window stage and the events thread,
//! read by the health thread and the metrics endpoint.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::capture::SourceStatus;
use crate::web::Live;

/// What the health thread and the metrics endpoint read: each source's last window and
/// status (in config order), the publisher's gauges and the last health verdict.
pub(super) struct DaemonState {
    pub(super) sources: Mutex<Vec<SourceState>>,
    /// Since when the current sources run (start or last reload): a first window is not
    /// expected before this.
    pub(super) ready_since: Mutex<Instant>,
    pub(super) publisher: Mutex<PublisherGauges>,
    pub(super) health: Mutex<Result<(), String>>,
    /// What the page shows as it happens: fed by the events thread, read by the HTTP server.
    pub(super) live: Arc<Live>,
}

#[derive(Debug, Clone)]
pub(super) struct SourceState {
    pub(super) name: String,
    pub(super) last_window: Option<Instant>,
    pub(super) status: SourceStatus,
    /// A first status came from capture: playing, or failed and in backoff.
    pub(super) reported: bool,
}

/// The longest wait for every source's first status before READY=1.
pub(super) const READY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Default)]
pub(super) struct PublisherGauges {
    pub(super) connected: bool,
    pub(super) spool_events: u64,
    pub(super) spool_bytes: u64,
    /// Events held in memory because the spool's disk refused them, and why it does.
    pub(super) spool_unwritten: u64,
    pub(super) spool_unwritable: Option<String>,
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl DaemonState {
    pub(super) fn new(names: impl Iterator<Item = String>) -> DaemonState {
        let state = DaemonState {
            sources: Mutex::new(Vec::new()),
            ready_since: Mutex::new(Instant::now()),
            publisher: Mutex::new(PublisherGauges::default()),
            health: Mutex::new(Ok(())),
            live: Live::new(),
        };
        state.set_sources(names);
        state
    }

    /// The sources now configured; those already known keep their state.
    pub(super) fn set_sources(&self, names: impl Iterator<Item = String>) {
        let mut sources = lock(&self.sources);
        let old = std::mem::take(&mut *sources);
        *sources = names
            .map(|name| match old.iter().find(|source| source.name == name) {
                Some(known) => known.clone(),
                None => SourceState { name, last_window: None, status: SourceStatus::Offline, reported: false },
            })
            .collect();
        *lock(&self.ready_since) = Instant::now();
    }

    pub(super) fn window(&self, source: &str) {
        if let Some(entry) = lock(&self.sources).iter_mut().find(|entry| entry.name == source) {
            entry.last_window = Some(Instant::now());
        }
    }

    pub(super) fn status(&self, source: &str, status: SourceStatus) {
        if let Some(entry) = lock(&self.sources).iter_mut().find(|entry| entry.name == source) {
            entry.status = status;
            entry.reported = true;
        }
    }

    pub(super) fn all_reported(&self) -> bool {
        lock(&self.sources).iter().all(|source| source.reported)
    }

    /// `name status, ...` for `STATUS=` lines.
    pub(super) fn describe(&self) -> String {
        describe_sources(&lock(&self.sources))
    }
}

pub(super) fn describe_sources(sources: &[SourceState]) -> String {
    sources.iter().map(|source| format!("{} {}", source.name, source.status.as_str())).collect::<Vec<_>>().join(", ")
}
