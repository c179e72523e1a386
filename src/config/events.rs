//! `[events]` and `[events.labels."<label>"]` of config.toml: the raw serde structs (their doc
//! comments are the user documentation) and their one-time validation into the event
//! engine's [`EventSettings`]. Label names are checked against the model once it is loaded.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::FieldError;
use super::units::{RawDuration, duration};
use crate::events::{EventSettings, LabelSettings, Require};

/// `[events]`: when scores become events. Every key is optional.
///
/// ```toml
/// [events]
/// threshold = 0.6      # a window counts as "on" at or above this score
/// off_threshold = 0.5  # an event stays open until the score falls below this
/// min_windows = 2      # consecutive "on" windows before `start`
/// cooldown = "3s"      # time below off_threshold before `end` (seconds or "500ms", "3s", "1m")
/// require = "fused"    # fused | both (audio and video must each pass) | either (one is enough)
/// [events.labels."dog bark"]
/// threshold = 0.8      # per-label overrides of any key above, plus `enabled = false`
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEvents {
    /// Default on-threshold for every label, in 0..=1. Default 0.6.
    #[serde(default)]
    pub threshold: Option<Spanned<f32>>,
    /// Default off-threshold, in 0..=threshold. Default: threshold - 0.1 (at least 0).
    #[serde(default)]
    pub off_threshold: Option<Spanned<f32>>,
    /// Consecutive windows at or above the threshold before `start`, at least 1. Default 2.
    #[serde(default)]
    pub min_windows: Option<Spanned<u32>>,
    /// How long the score must stay below off_threshold before `end`. Default 3 s.
    #[serde(default)]
    pub cooldown: Option<Spanned<RawDuration>>,
    /// fused | both | either. Default fused.
    #[serde(default)]
    pub require: Option<Spanned<String>>,
    /// Per-label overrides, keyed by the model's label names.
    #[serde(default)]
    pub labels: BTreeMap<Spanned<String>, RawLabel>,
}

/// `[events.labels."<label>"]`: overrides for one label; a missing key uses `[events]`'s.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLabel {
    #[serde(default)]
    pub threshold: Option<Spanned<f32>>,
    #[serde(default)]
    pub off_threshold: Option<Spanned<f32>>,
    #[serde(default)]
    pub min_windows: Option<Spanned<u32>>,
    #[serde(default)]
    pub cooldown: Option<Spanned<RawDuration>>,
    #[serde(default)]
    pub require: Option<Spanned<String>>,
    /// false: never produce events (nor a Home Assistant binary_sensor) for this label.
    #[serde(default)]
    pub enabled: Option<Spanned<bool>>,
}

pub fn default_threshold() -> f32 {
    LabelSettings::default().threshold
}
pub fn default_min_windows() -> u32 {
    LabelSettings::default().min_windows
}
pub fn default_cooldown() -> Duration {
    LabelSettings::default().cooldown
}

impl RawEvents {
    /// Merges defaults and overrides into typed settings. Label names are checked against
    /// the model separately, by [`RawEvents::check_labels`], once the model is loaded.
    pub fn validate(self) -> Result<EventSettings, FieldError> {
        let default_threshold =
            probability("events.threshold", self.threshold.as_ref())?.unwrap_or_else(default_threshold);
        let default = LabelSettings {
            threshold: default_threshold,
            off_threshold: off_threshold("events.off_threshold", self.off_threshold.as_ref(), default_threshold)?,
            min_windows: min_windows("events.min_windows", self.min_windows.as_ref())?
                .unwrap_or_else(default_min_windows),
            cooldown: duration("events.cooldown", self.cooldown.as_ref())?.unwrap_or_else(default_cooldown),
            require: require("events.require", self.require.as_ref())?.unwrap_or_default(),
            enabled: true,
        };
        let mut per_label = HashMap::new();
        for (label, raw) in self.labels {
            let prefix = format!("events.labels.{}", quote_key(label.get_ref()));
            let key = |field: &str| format!("{prefix}.{field}");
            let threshold = probability(&key("threshold"), raw.threshold.as_ref())?;
            let label_threshold = threshold.unwrap_or(default.threshold);
            // An overridden threshold without an off_threshold gets its own default gap,
            // unless the inherited off_threshold still fits below it.
            let off = match (&raw.off_threshold, threshold) {
                (Some(_), _) | (None, Some(_)) => {
                    off_threshold(&key("off_threshold"), raw.off_threshold.as_ref(), label_threshold)?
                }
                (None, None) => default.off_threshold,
            };
            let settings = LabelSettings {
                threshold: label_threshold,
                off_threshold: off,
                min_windows: min_windows(&key("min_windows"), raw.min_windows.as_ref())?.unwrap_or(default.min_windows),
                cooldown: duration(&key("cooldown"), raw.cooldown.as_ref())?.unwrap_or(default.cooldown),
                require: require(&key("require"), raw.require.as_ref())?.unwrap_or(default.require),
                enabled: raw.enabled.map(|e| e.into_inner()).unwrap_or(true),
            };
            per_label.insert(label.into_inner(), settings);
        }
        Ok(EventSettings { default, per_label })
    }

    /// Every `[events.labels."<label>"]` must name one of the model's labels.
    pub fn check_labels(&self, model_labels: &[String]) -> Result<(), FieldError> {
        for label in self.labels.keys() {
            if !model_labels.iter().any(|l| l == label.get_ref()) {
                return Err(FieldError::new(
                    format!("events.labels.{}", quote_key(label.get_ref())),
                    Some(label.span()),
                    format!(
                        "the model has no label {:?}; its labels are: {}",
                        label.get_ref(),
                        model_labels.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn quote_key(label: &str) -> String {
    if !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        label.to_owned()
    } else {
        format!("{label:?}")
    }
}

fn probability(key: &str, value: Option<&Spanned<f32>>) -> Result<Option<f32>, FieldError> {
    match value {
        Some(v) if !(0.0..=1.0).contains(v.get_ref()) => {
            Err(FieldError::new(key, Some(v.span()), format!("must be a score in 0..=1, got {}", v.get_ref())))
        }
        Some(v) => Ok(Some(*v.get_ref())),
        None => Ok(None),
    }
}

fn off_threshold(key: &str, value: Option<&Spanned<f32>>, threshold: f32) -> Result<f32, FieldError> {
    match value {
        Some(v) if !(0.0..=threshold).contains(v.get_ref()) => Err(FieldError::new(
            key,
            Some(v.span()),
            format!("must be in 0..=threshold ({threshold}), got {}", v.get_ref()),
        )),
        Some(v) => Ok(*v.get_ref()),
        // Rounded so that 0.9 gives 0.8, not 0.79999995.
        None => Ok(((threshold - 0.1).max(0.0) * 10_000.0).round() / 10_000.0),
    }
}

fn min_windows(key: &str, value: Option<&Spanned<u32>>) -> Result<Option<u32>, FieldError> {
    match value {
        Some(v) if *v.get_ref() == 0 => Err(FieldError::new(key, Some(v.span()), "must be at least 1")),
        Some(v) => Ok(Some(*v.get_ref())),
        None => Ok(None),
    }
}

fn require(key: &str, value: Option<&Spanned<String>>) -> Result<Option<Require>, FieldError> {
    let Some(v) = value else { return Ok(None) };
    match v.get_ref().as_str() {
        "fused" => Ok(Some(Require::Fused)),
        "both" => Ok(Some(Require::Both)),
        "either" => Ok(Some(Require::Either)),
        other => Err(FieldError::new(key, Some(v.span()), format!("must be fused, both or either, got {other:?}"))),
    }
}
