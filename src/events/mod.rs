//! The `events` stage: turns per-window label scores into `start` / `update` / `end` events.
//!
//! Pure code: no I/O, no threads, no clocks of its own. Time comes from the window
//! timestamps and cooldowns are measured in window time, so a recorded clip replays into
//! exactly the same events as the live stream did. It must not know MQTT or JSON: the
//! `publish` stage turns [`Event`] into payloads and adds `seq`, `replayed`, `latency_ms`,
//! `model` and `device`.

mod engine;

use std::collections::HashMap;
use std::time::Duration;

use time::OffsetDateTime;

pub use crate::window::Degraded;
pub use engine::{EventEngine, EventIdGenerator};

/// Scores of one classified window from one source; probabilities in `0..=1`.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowScores {
    pub source: String,
    /// UTC.
    pub window_start: OffsetDateTime,
    /// UTC.
    pub window_end: OffsetDateTime,
    /// One per label, after sigmoid (multi-label) or softmax (single-label).
    pub fused: Vec<f32>,
    /// `None` for a model without an audio head.
    pub audio: Option<Vec<f32>>,
    /// `None` for a model without a video head.
    pub video: Option<Vec<f32>>,
    pub degraded: Option<Degraded>,
}

/// Which scores must pass a threshold for a label to count as present in a window.
///
/// The engine reduces the label's scores to one *decision score* per window and applies both
/// thresholds to it, so hysteresis works the same way for every mode:
/// - `Fused`: the fused score.
/// - `Both`: the smallest of fused, audio and video (the label must pass on each head alone).
/// - `Either`: the largest of fused, audio and video (passing on one head is enough).
///
/// A head the model lacks, or a modality the window marks as lost, is left out; with
/// nothing but fused left every mode falls back to `Fused`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Require {
    #[default]
    Fused,
    Both,
    Either,
}

impl Require {
    pub fn as_str(self) -> &'static str {
        match self {
            Require::Fused => "fused",
            Require::Both => "both",
            Require::Either => "either",
        }
    }
}

/// Detection settings of one label.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelSettings {
    /// A window counts as "on" when its decision score is at least this.
    pub threshold: f32,
    /// A window counts as "off" when its decision score is below this; `<= threshold`.
    pub off_threshold: f32,
    /// Consecutive "on" windows before `start` is emitted; at least 1.
    pub min_windows: u32,
    /// How long (window time) the score must stay below `off_threshold` before `end`.
    pub cooldown: Duration,
    pub require: Require,
    pub enabled: bool,
}

impl Default for LabelSettings {
    fn default() -> Self {
        LabelSettings {
            threshold: 0.6,
            off_threshold: 0.5,
            min_windows: 2,
            cooldown: Duration::from_secs(3),
            require: Require::Fused,
            enabled: true,
        }
    }
}

/// Settings of the whole engine: defaults plus per-label overrides (already merged).
/// A change made at run time (from Home Assistant or MQTT) to one label of one source, on top
/// of the config's settings; `None` keeps the config's value.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LabelOverride {
    pub enabled: Option<bool>,
    pub threshold: Option<f32>,
}

impl LabelOverride {
    pub fn is_empty(&self) -> bool {
        self.enabled.is_none() && self.threshold.is_none()
    }
}

impl LabelSettings {
    /// These settings with `over` applied. A new threshold keeps the configured gap to the
    /// off threshold (never below 0), so hysteresis behaves as configured. A label the config
    /// disables stays disabled: overrides act on the labels the config enables.
    pub fn with_override(&self, over: &LabelOverride) -> LabelSettings {
        let mut settings = self.clone();
        if let Some(enabled) = over.enabled {
            settings.enabled = self.enabled && enabled;
        }
        if let Some(threshold) = over.threshold {
            let gap = (self.threshold - self.off_threshold).max(0.0);
            settings.threshold = threshold;
            // Rounded as the config's default gap is, so 0.9 - 0.2 gives 0.7, not 0.6999999.
            settings.off_threshold = ((threshold - gap).max(0.0) * 10_000.0).round() / 10_000.0;
        }
        settings
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct EventSettings {
    pub default: LabelSettings,
    /// Keyed by label name; a label missing here uses `default`.
    pub per_label: HashMap<String, LabelSettings>,
}

impl EventSettings {
    pub fn for_label(&self, label: &str) -> &LabelSettings {
        self.per_label.get(label).unwrap_or(&self.default)
    }

    /// The labels, of `labels`, that can produce events (for Home Assistant's binary sensors).
    pub fn enabled_labels(&self, labels: &[String]) -> Vec<String> {
        labels.iter().filter(|label| self.for_label(label).enabled).cloned().collect()
    }
}

/// `start`, `update` or `end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Start,
    Update,
    End,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Start => "start",
            EventKind::Update => "update",
            EventKind::End => "end",
        }
    }
}

/// The label's scores in the window that caused an event message.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LabelScores {
    pub fused: f32,
    pub audio: Option<f32>,
    pub video: Option<f32>,
}

/// One event message, as the engine knows it. `publish` adds `seq`, `replayed`,
/// `latency_ms`, `model` and `device`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: EventKind,
    /// Shared by the `start`, `update`s and `end` of one event: a UUID v4 string.
    pub id: String,
    pub source: String,
    pub label: String,
    /// The decision score of the window that caused this message.
    pub score: f32,
    /// Highest decision score since `start`.
    pub peak_score: f32,
    pub scores: LabelScores,
    /// End of the first window of the run of "on" windows that started the event.
    pub start_time: OffsetDateTime,
    /// `Some` only for `end`: end of the last window at or above `off_threshold`.
    pub end_time: Option<OffsetDateTime>,
    pub window_start: OffsetDateTime,
    pub window_end: OffsetDateTime,
    pub degraded: Option<Degraded>,
}
