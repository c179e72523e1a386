//! The window stage: capture events of every source in, windows out. Owns one
//! [`WindowBuilder`] per running source incarnation and rebuilds it when capture restarts a
//! source (running time restarts at zero). Shared by `run`, `classify` and `record`.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use crate::capture::{CaptureEvent, Modality, SourceStatus};
use crate::media::RunningTime;
use crate::telemetry;
use crate::window::{Window, WindowBuilder, WindowSettings};

/// What the stage passes on.
#[derive(Debug)]
pub enum StageOutput {
    Window(Window),
    Status {
        source_idx: usize,
        status: SourceStatus,
        detail: String,
    },
    /// A file source played to its end after its last full window.
    Finished {
        source_idx: usize,
    },
    Failed {
        source_idx: usize,
        message: String,
    },
}

struct Incarnation {
    generation: u64,
    builder: WindowBuilder,
    utc_origin: OffsetDateTime,
}

/// Per-source window building.
pub struct WindowStage {
    names: Vec<Arc<str>>,
    settings: Vec<WindowSettings>,
    live: Vec<bool>,
    current: Vec<Option<Incarnation>>,
}

impl WindowStage {
    /// `sources[i]` = (name, window settings, live) of source i.
    pub fn new(sources: Vec<(String, WindowSettings, bool)>) -> Self {
        let mut stage = WindowStage { names: Vec::new(), settings: Vec::new(), live: Vec::new(), current: Vec::new() };
        for (name, settings, live) in sources {
            stage.names.push(Arc::from(name.as_str()));
            stage.settings.push(settings);
            stage.live.push(live);
            stage.current.push(None);
        }
        stage
    }

    /// Sets source `source_idx` (appended when it is the next index) and forgets any window
    /// it was building: for a source (re)started with new settings.
    pub fn set_source(&mut self, source_idx: usize, name: &str, settings: WindowSettings, live: bool) {
        if source_idx == self.names.len() {
            self.names.push(Arc::from(name));
            self.settings.push(settings);
            self.live.push(live);
            self.current.push(None);
        } else if source_idx < self.names.len() {
            self.names[source_idx] = Arc::from(name);
            self.settings[source_idx] = settings;
            self.live[source_idx] = live;
            self.current[source_idx] = None;
        }
    }

    pub fn handle(&mut self, event: CaptureEvent) -> Vec<StageOutput> {
        let mut out = Vec::new();
        match event {
            CaptureEvent::Started { source_idx, generation, utc_origin } => {
                if let Some(settings) = self.settings.get(source_idx) {
                    let builder = WindowBuilder::new(self.names[source_idx].clone(), settings.clone(), utc_origin);
                    self.current[source_idx] = Some(Incarnation { generation, builder, utc_origin });
                }
            }
            CaptureEvent::Frame { source_idx, generation, frame, arrival } => {
                if let Some(name) = self.names.get(source_idx) {
                    telemetry::video_arrived(name, 1);
                }
                if let Some(builder) = self.builder(source_idx, generation) {
                    out.extend(builder.push_frame(Arc::new(frame), arrival).into_iter().map(built));
                }
            }
            CaptureEvent::Audio { source_idx, generation, chunk, arrival } => {
                if let Some(name) = self.names.get(source_idx) {
                    telemetry::audio_arrived(name, chunk.samples.len() as u64);
                }
                if let Some(builder) = self.builder(source_idx, generation) {
                    out.extend(builder.push_audio(&chunk, arrival).into_iter().map(built));
                }
            }
            CaptureEvent::StreamEnded { source_idx, generation, modality } => {
                if let Some(builder) = self.builder(source_idx, generation) {
                    let windows = match modality {
                        Modality::Video => builder.end_video(),
                        Modality::Audio => builder.end_audio(),
                    };
                    out.extend(windows.into_iter().map(built));
                }
            }
            CaptureEvent::Stopped { source_idx, generation } => {
                if let Some(slot) = self.current.get_mut(source_idx)
                    && slot.as_ref().is_some_and(|incarnation| incarnation.generation == generation)
                {
                    *slot = None;
                }
            }
            CaptureEvent::Status { source_idx, status, detail } => {
                out.push(StageOutput::Status { source_idx, status, detail })
            }
            CaptureEvent::Finished { source_idx } => out.push(StageOutput::Finished { source_idx }),
            CaptureEvent::Failed { source_idx, message } => out.push(StageOutput::Failed { source_idx, message }),
        }
        out
    }

    /// Live sources: lets windows waiting on a stalled modality go out after `max_wait`.
    pub fn poll(&mut self, utc_now: OffsetDateTime) -> Vec<StageOutput> {
        let mut out = Vec::new();
        for (source_idx, slot) in self.current.iter_mut().enumerate() {
            if !self.live[source_idx] {
                continue;
            }
            if let Some(incarnation) = slot {
                let elapsed = (utc_now - incarnation.utc_origin).max(time::Duration::ZERO);
                let now = RunningTime(Duration::try_from(elapsed).unwrap_or_default());
                out.extend(incarnation.builder.poll(now).into_iter().map(built));
            }
        }
        out
    }

    pub fn source_name(&self, source_idx: usize) -> &str {
        &self.names[source_idx]
    }

    fn builder(&mut self, source_idx: usize, generation: u64) -> Option<&mut WindowBuilder> {
        self.current
            .get_mut(source_idx)?
            .as_mut()
            .filter(|incarnation| incarnation.generation == generation)
            .map(|incarnation| &mut incarnation.builder)
    }
}

fn built(window: Window) -> StageOutput {
    telemetry::window_built(
        &window.source,
        window.degraded.is_some(),
        window.stats.video_gap_frames,
        window.stats.audio_gap_samples,
        window.stats.av_skew,
    );
    StageOutput::Window(window)
}
