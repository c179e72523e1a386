//! The sources of one command: their capture pipelines started, reconfigured on reload and
//! stopped, with the window stage run on the caller's thread. No stage logic lives here.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded};
use time::OffsetDateTime;

use super::prepare::Prepared;
use super::stage::{StageOutput, WindowStage};
use crate::capture::{self, CaptureOptions, EvidenceFormat, SinkMode, SourceHandle};
use crate::config::SourceSettings;
use crate::media::EvidenceMedia;
use crate::window::WindowSettings;

/// Sources started for one command, with the window stage running on the caller's thread.
pub struct Sources {
    /// One per source ever started, indexed by `source_idx`; a removed source keeps its slot
    /// (without a handle) so indexes stay stable.
    slots: Vec<Slot>,
    sender: Sender<capture::CaptureEvent>,
    events: Receiver<capture::CaptureEvent>,
    stage: WindowStage,
    realtime: bool,
    /// Where sources that keep evidence send it (the daemon's evidence store).
    evidence: Option<Sender<EvidenceMedia>>,
}

struct Slot {
    settings: SourceSettings,
    window: WindowSettings,
    handle: Option<SourceHandle>,
    /// Finished (a file played to its end) or failed for good.
    done: bool,
}

/// What [`Sources::reconfigure`] did, by source name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceChanges {
    pub unchanged: Vec<String>,
    pub restarted: Vec<String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

impl Sources {
    /// Starts `sources`. `realtime` plays files at their own pace (the daemon); otherwise they
    /// run as fast as possible and nothing is dropped (classify, record). With `evidence`,
    /// sources whose evidence is enabled get an evidence branch feeding it.
    pub fn start(
        prepared: &Prepared,
        sources: &[SourceSettings],
        realtime: bool,
        evidence: Option<Sender<EvidenceMedia>>,
    ) -> anyhow::Result<Sources> {
        let (sender, events) = bounded(1024);
        let mut started =
            Sources { slots: Vec::new(), sender, events, stage: WindowStage::new(Vec::new()), realtime, evidence };
        for source in sources {
            started.add(prepared, source)?;
        }
        Ok(started)
    }

    /// Sources still running (not finished, failed for good or removed).
    pub fn remaining(&self) -> usize {
        self.slots.iter().filter(|slot| slot.handle.is_some() && !slot.done).count()
    }

    /// Runs the window stage until every source has finished or `stop` is set; each output
    /// goes to `sink`.
    pub fn run(&mut self, stop: &AtomicBool, sink: impl FnMut(&WindowStage, StageOutput)) {
        self.run_until(|| stop.load(Ordering::SeqCst), sink);
    }

    /// Like [`Sources::run`], returning as soon as `interrupt()` is true.
    pub fn run_until(&mut self, interrupt: impl Fn() -> bool, mut sink: impl FnMut(&WindowStage, StageOutput)) {
        while self.remaining() > 0 && !interrupt() {
            match self.events.recv_timeout(Duration::from_millis(100)) {
                Ok(event) => self.dispatch(event, &mut sink),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            for output in self.stage.poll(OffsetDateTime::now_utc()) {
                sink(&self.stage, output);
            }
        }
    }

    /// Applies a new list of sources: a source whose settings (or window settings) are
    /// unchanged keeps running untouched; a changed one is stopped and started again alone;
    /// new ones start; missing ones stop. Outputs produced meanwhile go to `sink`.
    pub fn reconfigure(
        &mut self,
        prepared: &Prepared,
        sources: &[SourceSettings],
        mut sink: impl FnMut(&WindowStage, StageOutput),
    ) -> anyhow::Result<SourceChanges> {
        let mut changes = SourceChanges::default();
        let mut restart = Vec::new();
        for idx in 0..self.slots.len() {
            if self.slots[idx].handle.is_none() {
                continue;
            }
            let name = self.slots[idx].settings.name.clone();
            match sources.iter().find(|source| source.name == name) {
                Some(source)
                    if *source == self.slots[idx].settings
                        && prepared.window_settings(source) == self.slots[idx].window =>
                {
                    changes.unchanged.push(name);
                }
                Some(source) => {
                    self.stop_slot(idx, &mut sink);
                    restart.push((idx, source.clone()));
                    changes.restarted.push(name);
                }
                None => {
                    self.stop_slot(idx, &mut sink);
                    changes.removed.push(name);
                }
            }
        }
        for (idx, source) in restart {
            let window = prepared.window_settings(&source);
            self.stage.set_source(idx, &source.name, window.clone(), source.kind.is_live());
            let handle = self.spawn(idx, prepared, &source)?;
            self.slots[idx] = Slot { settings: source, window, handle: Some(handle), done: false };
        }
        for source in sources {
            let running = self.slots.iter().any(|slot| slot.handle.is_some() && slot.settings.name == source.name);
            if !running {
                self.add(prepared, source)?;
                changes.added.push(source.name.clone());
            }
        }
        Ok(changes)
    }

    /// Stops every source and waits for its thread.
    pub fn stop(self) {
        for handle in self.slots.iter().filter_map(|slot| slot.handle.as_ref()) {
            handle.stop();
        }
        drop(self.events);
        for handle in self.slots.into_iter().filter_map(|slot| slot.handle) {
            handle.join();
        }
    }

    fn add(&mut self, prepared: &Prepared, source: &SourceSettings) -> anyhow::Result<()> {
        let idx = self.slots.len();
        let window = prepared.window_settings(source);
        self.stage.set_source(idx, &source.name, window.clone(), source.kind.is_live());
        let handle = self.spawn(idx, prepared, source)?;
        self.slots.push(Slot { settings: source.clone(), window, handle: Some(handle), done: false });
        Ok(())
    }

    fn spawn(&self, idx: usize, prepared: &Prepared, source: &SourceSettings) -> anyhow::Result<SourceHandle> {
        let live = source.kind.is_live();
        let evidence = self.evidence.clone().filter(|_| source.evidence.enabled);
        let options = CaptureOptions {
            format: prepared.capture_format(source),
            mode: SinkMode { sync: self.realtime && !live },
            lossless: !live,
            evidence: evidence.as_ref().map(|_| EvidenceFormat {
                width: source.evidence.snapshot_width,
                fps: source.evidence.fps,
                copy: source.evidence.copy,
            }),
        };
        capture::spawn(idx, source.clone(), options, self.sender.clone(), evidence)
    }

    /// Stops one source and waits for its thread, passing on what the others (and its last
    /// events) produce meanwhile, so a capture thread blocked on a full channel can finish.
    /// Every event of the stopped incarnation is handled before this returns.
    fn stop_slot(&mut self, idx: usize, sink: &mut impl FnMut(&WindowStage, StageOutput)) {
        let Some(handle) = self.slots[idx].handle.take() else { return };
        handle.stop();
        while !handle.is_finished() {
            if let Ok(event) = self.events.recv_timeout(Duration::from_millis(20)) {
                self.dispatch(event, sink);
            }
        }
        handle.join();
        while let Ok(event) = self.events.try_recv() {
            self.dispatch(event, sink);
        }
    }

    fn dispatch(&mut self, event: capture::CaptureEvent, sink: &mut impl FnMut(&WindowStage, StageOutput)) {
        for output in self.stage.handle(event) {
            if let StageOutput::Finished { source_idx } | StageOutput::Failed { source_idx, .. } = &output
                && let Some(slot) = self.slots.get_mut(*source_idx)
            {
                slot.done = true;
            }
            sink(&self.stage, output);
        }
    }
}

/// SIGTERM and SIGINT set the returned flag.
pub fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    Ok(stop)
}
