//! Wiring of the stages for the commands: load and cross-check config and model, start the
//! sources, run the window stage, hand windows on. No stage logic lives here.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded};
use time::OffsetDateTime;

use crate::capture::{self, CaptureFormat, CaptureOptions, SinkMode, SourceHandle};
use crate::config::{self, FieldError, Settings, SourceSettings};
use crate::model::ModelInfo;
use crate::stage::{StageOutput, WindowStage};
use crate::window::WindowSettings;

/// sysexits codes the commands end with.
pub mod exit {
    pub const OK: u8 = 0;
    /// EX_DATAERR: bad command-line usage is clap's 2; a failure inside a run is this.
    pub const FAILURE: u8 = 1;
    /// EX_NOINPUT: an input file cannot be read.
    pub const NO_INPUT: u8 = 66;
    /// EX_CANTCREAT: an output (the spool) cannot be created.
    pub const CANT_CREATE: u8 = 73;
    /// EX_SOFTWARE: an internal error.
    pub const SOFTWARE: u8 = 70;
    /// EX_CONFIG: the configuration or the model is invalid.
    pub const CONFIG: u8 = 78;
}

/// An error with the exit code it ends the process with.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl Failure {
    pub fn config(error: impl Into<anyhow::Error>) -> Self {
        Failure { code: exit::CONFIG, error: error.into() }
    }
    pub fn other(error: impl Into<anyhow::Error>) -> Self {
        Failure { code: exit::FAILURE, error: error.into() }
    }
}

/// Configuration and model, checked against each other.
pub struct Prepared {
    pub settings: Settings,
    pub model: ModelInfo,
    pub window_length: Duration,
}

/// Loads config and model and checks that they fit together (exit 78 otherwise).
pub fn prepare(config_path: &Path) -> Result<Prepared, Failure> {
    let text = config::read_text(config_path).map_err(Failure::config)?;
    let settings = Settings::from_toml_str(config_path, &text).map_err(Failure::config)?;
    // Errors found from here on are about a key of the file as written.
    let located = |key: &str, message: String| {
        Failure::config(config::place(config_path, &text, FieldError::new(key, config::span_of(&text, key), message)))
    };
    let model = ModelInfo::read(&settings.model.path).map_err(|err| located("model.path", err.to_string()))?;
    if let Err(err) = settings.events_raw.check_labels(&model.metadata.labels) {
        return Err(Failure::config(config::place(config_path, &text, err)));
    }
    let model_length = model.metadata.window_length();
    let window_length = match settings.window.seconds {
        Some(seconds) if seconds.abs_diff(model_length) > Duration::from_micros(1) => {
            return Err(located(
                "window.seconds",
                format!(
                    "{seconds:?} differs from the model's window of {model_length:?}; remove the key or set it to the model's"
                ),
            ));
        }
        _ => model_length,
    };
    for (idx, source) in settings.sources.iter().enumerate() {
        if source.video && model.metadata.video.is_none() && !source.audio {
            return Err(located(
                &format!("source[{idx}].video"),
                format!("source {:?} gives only video but model {} takes only audio", source.name, model.name()),
            ));
        }
        if source.audio && model.metadata.audio.is_none() && !source.video {
            return Err(located(
                &format!("source[{idx}].audio"),
                format!("source {:?} gives only audio but model {} takes only video", source.name, model.name()),
            ));
        }
    }
    Ok(Prepared { settings, model, window_length })
}

impl Prepared {
    /// The formats capture must deliver for `source`.
    pub fn capture_format(&self, source: &SourceSettings) -> CaptureFormat {
        CaptureFormat {
            video: self.model.metadata.video.as_ref().filter(|_| source.video).map(|video| (video.width, video.height)),
            audio: self.model.metadata.audio.as_ref().filter(|_| source.audio).map(|audio| audio.sample_rate),
        }
    }

    /// Window settings for `source`.
    pub fn window_settings(&self, source: &SourceSettings) -> WindowSettings {
        let format = self.capture_format(source);
        WindowSettings {
            length: self.window_length,
            hop: self.settings.window.hop,
            n_frames: self.model.metadata.video.as_ref().map_or(0, |video| video.frames),
            sample_rate: self.model.metadata.audio.as_ref().map_or(16_000, |audio| audio.sample_rate),
            video: format.video.is_some(),
            audio: format.audio.is_some(),
            max_lead: self.settings.window.max_lead,
            max_wait: self.settings.window.max_wait,
            video_span: self.model.metadata.video_span(),
        }
    }
}

/// Sources started for one command, with the window stage running on the caller's thread.
pub struct Sources {
    /// One per source ever started, indexed by `source_idx`; a removed source keeps its slot
    /// (without a handle) so indexes stay stable.
    slots: Vec<Slot>,
    sender: Sender<capture::CaptureEvent>,
    events: Receiver<capture::CaptureEvent>,
    stage: WindowStage,
    realtime: bool,
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
    /// run as fast as possible and nothing is dropped (classify, record).
    pub fn start(prepared: &Prepared, sources: &[SourceSettings], realtime: bool) -> anyhow::Result<Sources> {
        let (sender, events) = bounded(1024);
        let mut started = Sources { slots: Vec::new(), sender, events, stage: WindowStage::new(Vec::new()), realtime };
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
        let options = CaptureOptions {
            format: prepared.capture_format(source),
            mode: SinkMode { sync: self.realtime && !live },
            lossless: !live,
        };
        capture::spawn(idx, source.clone(), options, self.sender.clone())
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
