//! The event state machine: per source and label, hysteresis between an on and an off
//! threshold, `min_windows` consecutive "on" windows before `start`, `update` when the peak
//! rises, `end` once the score has stayed below the off threshold for `cooldown`.
//!
//! Single-label models (softmax): in each window only the top-1 label by fused score (ties go
//! to the lower label index) can be "on" or stay "above off"; every other label counts as
//! below its off threshold in that window. So at most one label per source can start or keep
//! an event alive in a window, and an event of the previous top label ends after its
//! cooldown once another label wins. Multi-label models (sigmoid) treat labels independently.
//!
//! Must stay pure: no clocks (window timestamps are the only time), no I/O. Ids come from a
//! seeded generator so tests are reproducible; the daemon seeds it from the OS.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use time::OffsetDateTime;

use super::{Event, EventKind, EventSettings, LabelOverride, LabelScores, LabelSettings, Require, WindowScores};

/// Makes event ids: UUID v4 strings from a seeded RNG.
#[derive(Debug, Clone)]
pub struct EventIdGenerator {
    rng: StdRng,
}

impl EventIdGenerator {
    /// Reproducible ids, for tests and replays.
    pub fn from_seed(seed: u64) -> Self {
        EventIdGenerator { rng: StdRng::seed_from_u64(seed) }
    }

    /// Ids seeded from the operating system, unique across restarts.
    pub fn from_os() -> Self {
        EventIdGenerator { rng: StdRng::from_os_rng() }
    }

    pub fn next_id(&mut self) -> String {
        let mut bytes: [u8; 16] = self.rng.random();
        bytes[6] = (bytes[6] & 0x0f) | 0x40; // version 4
        bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 4122 variant
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
    }
}

/// Turns [`WindowScores`] into [`Event`]s; one instance serves every source.
#[derive(Debug)]
pub struct EventEngine {
    settings: EventSettings,
    labels: Vec<String>,
    multi_label: bool,
    ids: EventIdGenerator,
    sources: HashMap<String, SourceState>,
    /// Run-time changes per (source, label), over `settings`.
    overrides: HashMap<(String, String), LabelOverride>,
}

impl EventEngine {
    /// An engine whose ids are seeded from the operating system.
    pub fn new(settings: EventSettings, labels: Vec<String>, multi_label: bool) -> Self {
        Self::with_id_generator(settings, labels, multi_label, EventIdGenerator::from_os())
    }

    pub fn with_id_generator(
        settings: EventSettings,
        labels: Vec<String>,
        multi_label: bool,
        ids: EventIdGenerator,
    ) -> Self {
        EventEngine { settings, labels, multi_label, ids, sources: HashMap::new(), overrides: HashMap::new() }
    }

    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// Feeds one window; returns the event messages it causes, in label order.
    ///
    /// A window whose fused scores do not have one entry per label, or that ends before the
    /// previous window of its source, is ignored with a warning (a daemon does not panic on
    /// bad input). Audio or video scores of the wrong length are treated as missing.
    pub fn process(&mut self, scores: &WindowScores) -> Vec<Event> {
        let n_labels = self.labels.len();
        if scores.fused.len() != n_labels {
            tracing::warn!(
                source = %scores.source,
                n_scores = scores.fused.len(),
                n_labels,
                "window ignored: score count does not match label count"
            );
            return Vec::new();
        }
        let source_state = self.sources.entry(scores.source.clone()).or_insert_with(|| SourceState::new(n_labels));
        if let Some(last_end) = source_state.last_window_end
            && scores.window_end < last_end
        {
            tracing::warn!(
                source = %scores.source,
                window_end = %scores.window_end,
                last_window_end = %last_end,
                "window ignored: it ends before the previous window of its source"
            );
            return Vec::new();
        }
        source_state.last_window_end = Some(scores.window_end);
        let effective: Vec<LabelSettings> = self
            .labels
            .iter()
            .map(|label| effective_settings(&self.settings, &self.overrides, &scores.source, label))
            .collect();
        source_state.last_window_start = Some(scores.window_start);

        let audio = heads_of_len(scores.audio.as_deref(), n_labels, scores.degraded, super::Degraded::AudioLost);
        let video = heads_of_len(scores.video.as_deref(), n_labels, scores.degraded, super::Degraded::VideoLost);
        let top_label_idx = top_label(&scores.fused);

        let mut events = Vec::new();
        for (label_idx, label) in self.labels.iter().enumerate() {
            let label_settings = &effective[label_idx];
            if !label_settings.enabled {
                continue;
            }
            let label_scores = LabelScores {
                fused: scores.fused[label_idx],
                audio: audio.map(|a| a[label_idx]),
                video: video.map(|v| v[label_idx]),
            };
            let decision = decision_score(label_settings.require, label_scores);
            let candidate = self.multi_label || Some(label_idx) == top_label_idx;
            let on = candidate && decision >= label_settings.threshold;
            let above_off = candidate && decision >= label_settings.off_threshold;

            let state = &mut source_state.labels[label_idx];
            let message = |kind, id: &str, start_time, end_time, peak_score| Event {
                kind,
                id: id.to_owned(),
                source: scores.source.clone(),
                label: label.clone(),
                score: decision,
                peak_score,
                scores: label_scores,
                start_time,
                end_time,
                window_start: scores.window_start,
                window_end: scores.window_end,
                degraded: scores.degraded,
            };
            match state {
                LabelState::Idle { run } => {
                    if !on {
                        *run = None;
                        continue;
                    }
                    let (n_on, first_end, run_peak) = match *run {
                        None => (1, scores.window_end, decision),
                        Some((n, first, peak)) => (n + 1, first, peak.max(decision)),
                    };
                    if n_on >= label_settings.min_windows.max(1) {
                        let id = self.ids.next_id();
                        events.push(message(EventKind::Start, &id, first_end, None, run_peak));
                        *state = LabelState::Active {
                            id,
                            start_time: first_end,
                            peak: run_peak,
                            last_above_off_end: scores.window_end,
                            last_scores: label_scores,
                            last_decision: decision,
                        };
                    } else {
                        *run = Some((n_on, first_end, run_peak));
                    }
                }
                LabelState::Active { id, start_time, peak, last_above_off_end, last_scores, last_decision } => {
                    *last_scores = label_scores;
                    *last_decision = decision;
                    if above_off {
                        *last_above_off_end = scores.window_end;
                        if decision > *peak {
                            *peak = decision;
                            events.push(message(EventKind::Update, id, *start_time, None, *peak));
                        }
                    } else if scores.window_end - *last_above_off_end >= label_settings.cooldown {
                        events.push(message(EventKind::End, id, *start_time, Some(*last_above_off_end), *peak));
                        *state = LabelState::Idle { run: None };
                    }
                }
            }
        }
        events
    }

    /// Ends every open event of `source`, e.g. when the source stops or the daemon shuts
    /// down. The `end` messages carry the source's last window.
    pub fn finish_source(&mut self, source: &str) -> Vec<Event> {
        self.end_open_events(source, |_| true)
    }

    /// Replaces the settings (a config reload). Open events stay open and go on under the new
    /// thresholds; those of labels that are now disabled end now. Run-time overrides stay.
    /// Returns those `end`s.
    pub fn set_settings(&mut self, settings: EventSettings) -> Vec<Event> {
        self.settings = settings;
        let mut sources: Vec<String> = self.sources.keys().cloned().collect();
        sources.sort();
        sources.into_iter().flat_map(|source| self.end_disabled(&source)).collect()
    }

    /// Sets (or, with an empty override, clears) the run-time override of `label` on
    /// `source`; an open event of a label it disables ends now, and that `end` is returned.
    /// Labels the model does not have are ignored.
    pub fn set_override(&mut self, source: &str, label: &str, over: LabelOverride) -> Vec<Event> {
        if !self.labels.iter().any(|known| known == label) {
            return Vec::new();
        }
        let key = (source.to_owned(), label.to_owned());
        if over.is_empty() {
            self.overrides.remove(&key);
        } else {
            self.overrides.insert(key, over);
        }
        self.end_disabled(source)
    }

    /// The settings `label` runs with on `source`: the config's, with its override applied.
    pub fn label_settings(&self, source: &str, label: &str) -> LabelSettings {
        effective_settings(&self.settings, &self.overrides, source, label)
    }

    /// Ends the open events of `source` whose label is disabled now.
    fn end_disabled(&mut self, source: &str) -> Vec<Event> {
        let disabled: Vec<bool> = self
            .labels
            .iter()
            .map(|label| !effective_settings(&self.settings, &self.overrides, source, label).enabled)
            .collect();
        self.end_open_events(source, |label_idx| disabled[label_idx])
    }

    /// Ends the open events of `source` whose label index passes `which`.
    fn end_open_events(&mut self, source: &str, which: impl Fn(usize) -> bool) -> Vec<Event> {
        let Some(source_state) = self.sources.get_mut(source) else {
            return Vec::new();
        };
        let (Some(window_start), Some(window_end)) = (source_state.last_window_start, source_state.last_window_end)
        else {
            return Vec::new();
        };
        let mut events = Vec::new();
        for (label_idx, state) in source_state.labels.iter_mut().enumerate() {
            if !which(label_idx) {
                continue;
            }
            if let LabelState::Active { id, start_time, peak, last_above_off_end, last_scores, last_decision } = state {
                events.push(Event {
                    kind: EventKind::End,
                    id: id.clone(),
                    source: source.to_owned(),
                    label: self.labels[label_idx].clone(),
                    score: *last_decision,
                    peak_score: *peak,
                    scores: *last_scores,
                    start_time: *start_time,
                    end_time: Some(*last_above_off_end),
                    window_start,
                    window_end,
                    degraded: None,
                });
            }
            *state = LabelState::Idle { run: None };
        }
        events
    }

    /// Sources with at least one open event.
    pub fn sources_with_open_events(&self) -> Vec<String> {
        let mut sources: Vec<String> = self
            .sources
            .iter()
            .filter(|(_, s)| s.labels.iter().any(|l| matches!(l, LabelState::Active { .. })))
            .map(|(name, _)| name.clone())
            .collect();
        sources.sort();
        sources
    }
}

fn effective_settings(
    settings: &EventSettings,
    overrides: &HashMap<(String, String), LabelOverride>,
    source: &str,
    label: &str,
) -> LabelSettings {
    let configured = settings.for_label(label);
    match overrides.get(&(source.to_owned(), label.to_owned())) {
        Some(over) => configured.with_override(over),
        None => configured.clone(),
    }
}

#[derive(Debug)]
struct SourceState {
    labels: Vec<LabelState>,
    last_window_start: Option<OffsetDateTime>,
    last_window_end: Option<OffsetDateTime>,
}

impl SourceState {
    fn new(n_labels: usize) -> Self {
        SourceState {
            labels: (0..n_labels).map(|_| LabelState::Idle { run: None }).collect(),
            last_window_start: None,
            last_window_end: None,
        }
    }
}

#[derive(Debug)]
enum LabelState {
    /// `run`: consecutive "on" windows so far, end of the first of them, their peak.
    Idle { run: Option<(u32, OffsetDateTime, f32)> },
    Active {
        id: String,
        start_time: OffsetDateTime,
        peak: f32,
        last_above_off_end: OffsetDateTime,
        last_scores: LabelScores,
        last_decision: f32,
    },
}

/// Per-head scores usable this window: right length and not marked lost.
fn heads_of_len(
    head: Option<&[f32]>,
    n_labels: usize,
    degraded: Option<super::Degraded>,
    lost: super::Degraded,
) -> Option<&[f32]> {
    head.filter(|h| h.len() == n_labels && degraded != Some(lost))
}

/// Index of the highest fused score; ties go to the lower index; NaN never wins.
fn top_label(fused: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (idx, &score) in fused.iter().enumerate() {
        if !score.is_finite() {
            continue;
        }
        if best.is_none_or(|(_, b)| score > b) {
            best = Some((idx, score));
        }
    }
    best.map(|(idx, _)| idx)
}

/// Reduces a label's scores to the one number both thresholds apply to (see [`Require`]).
/// Non-finite scores count as 0 so that NaN can never hold an event open.
fn decision_score(require: Require, scores: LabelScores) -> f32 {
    let clean = |s: f32| if s.is_finite() { s } else { 0.0 };
    let heads = [scores.audio, scores.video];
    let available = heads.iter().flatten().map(|&s| clean(s));
    let fused = clean(scores.fused);
    match require {
        Require::Fused => fused,
        Require::Both => available.fold(fused, f32::min),
        Require::Either => available.fold(fused, f32::max),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;
    use time::macros::datetime;

    use super::*;
    use crate::events::{Degraded, LabelOverride, LabelSettings};

    const T0: OffsetDateTime = datetime!(2026-11-28 12:00:00 UTC);

    fn window(source: &str, idx: usize, fused: Vec<f32>) -> WindowScores {
        let window_end = T0 + Duration::from_secs(idx as u64 + 8);
        WindowScores {
            source: source.to_owned(),
            window_start: window_end - Duration::from_secs(8),
            window_end,
            fused,
            audio: None,
            video: None,
            degraded: None,
        }
    }

    fn settings(threshold: f32, off: f32, min_windows: u32, cooldown_s: u64) -> LabelSettings {
        LabelSettings {
            threshold,
            off_threshold: off,
            min_windows,
            cooldown: Duration::from_secs(cooldown_s),
            require: Require::Fused,
            enabled: true,
        }
    }

    /// Feeds one window per entry of `windows` (hop 1 s) into an engine and compares the
    /// messages per window, written as `label:kind` letters (S, U, E; `-` for none), with
    /// `expected`, e.g. `"- - a:S a:U - a:E"`.
    fn check(label_settings: LabelSettings, multi_label: bool, windows: &[WindowScores], expected: &str) {
        let labels = vec!["a".to_owned(), "b".to_owned()];
        let event_settings = EventSettings { default: label_settings, per_label: HashMap::new() };
        let mut engine =
            EventEngine::with_id_generator(event_settings, labels, multi_label, EventIdGenerator::from_seed(7));
        let got: Vec<String> = windows
            .iter()
            .map(|w| {
                let events = engine.process(w);
                if events.is_empty() {
                    return "-".to_owned();
                }
                events
                    .iter()
                    .map(|e| {
                        let kind = match e.kind {
                            EventKind::Start => "S",
                            EventKind::Update => "U",
                            EventKind::End => "E",
                        };
                        format!("{}:{kind}", e.label)
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect();
        assert_eq!(got.join(" "), expected);
    }

    fn label_a(scores: &[f32]) -> Vec<WindowScores> {
        scores.iter().enumerate().map(|(idx, &s)| window("porch", idx, vec![s, 0.0])).collect()
    }

    #[test]
    fn set_settings_applies_new_thresholds_keeps_open_events_and_ends_disabled_ones() {
        let labels = vec!["a".to_owned(), "b".to_owned()];
        let old = EventSettings { default: settings(0.9, 0.4, 1, 0), per_label: HashMap::new() };
        let mut engine = EventEngine::with_id_generator(old, labels, true, EventIdGenerator::from_seed(7));
        let both = |idx| window("porch", idx, vec![0.7, 0.95]);
        // Threshold 0.9: only b starts.
        let kinds =
            |events: Vec<Event>| events.iter().map(|e| format!("{}:{}", e.label, e.kind.as_str())).collect::<Vec<_>>();
        assert_eq!(kinds(engine.process(&both(0))), ["b:start"]);
        // Threshold 0.6 and b disabled: b's open event ends now, a starts on the next window.
        let mut per_label = HashMap::new();
        per_label.insert("b".to_owned(), LabelSettings { enabled: false, ..settings(0.6, 0.4, 1, 0) });
        let ended = engine.set_settings(EventSettings { default: settings(0.6, 0.4, 1, 0), per_label });
        assert_eq!(kinds(ended), ["b:end"]);
        assert_eq!(kinds(engine.process(&both(1))), ["a:start"]);
        assert!(engine.process(&both(2)).is_empty());
    }

    #[test]
    fn overrides_apply_per_source_and_label_and_survive_a_reload() {
        let labels = vec!["a".to_owned(), "b".to_owned()];
        let config = EventSettings { default: settings(0.6, 0.4, 1, 0), per_label: HashMap::new() };
        let mut engine = EventEngine::with_id_generator(config.clone(), labels, true, EventIdGenerator::from_seed(7));
        let kinds =
            |events: Vec<Event>| events.iter().map(|e| format!("{}:{}", e.label, e.kind.as_str())).collect::<Vec<_>>();
        let at = |source: &str, idx| window(source, idx, vec![0.7, 0.7]);
        assert_eq!(kinds(engine.process(&at("porch", 0))), ["a:start", "b:start"]);
        // Disabling b on porch ends its open event there and only there.
        let off = LabelOverride { enabled: Some(false), threshold: None };
        assert_eq!(kinds(engine.set_override("porch", "b", off)), ["b:end"]);
        assert!(engine.process(&at("porch", 1)).is_empty());
        assert_eq!(kinds(engine.process(&at("yard", 1))), ["a:start", "b:start"]);
        // A higher threshold for a on yard keeps the configured gap of 0.2 to its off threshold.
        let strict = LabelOverride { enabled: None, threshold: Some(0.9) };
        assert!(engine.set_override("yard", "a", strict).is_empty());
        assert_eq!(engine.label_settings("yard", "a").off_threshold, 0.7);
        assert_eq!(engine.label_settings("porch", "a").threshold, 0.6);
        // A reload keeps the overrides: b stays off on porch.
        assert!(engine.set_settings(config).is_empty());
        assert!(!engine.label_settings("porch", "b").enabled);
        // Clearing the override gives the config's settings back.
        assert!(engine.set_override("porch", "b", LabelOverride::default()).is_empty());
        assert_eq!(kinds(engine.process(&at("porch", 2))), ["b:start"]);
        // Unknown labels are ignored.
        assert!(engine.set_override("porch", "unicorn", off).is_empty());
    }

    #[test]
    fn start_needs_min_windows_then_update_on_rising_peak_then_end_after_cooldown() {
        check(
            settings(0.6, 0.4, 2, 2),
            true,
            &label_a(&[0.1, 0.7, 0.8, 0.9, 0.85, 0.3, 0.3, 0.3, 0.3]),
            "- - a:S a:U - - a:E - -",
        );
    }

    #[test]
    fn hysteresis_keeps_event_open_between_thresholds() {
        check(settings(0.6, 0.4, 1, 0), true, &label_a(&[0.7, 0.5, 0.45, 0.5, 0.39, 0.5, 0.7]), "a:S - - - a:E - a:S");
    }

    #[test]
    fn a_dip_shorter_than_cooldown_does_not_end_the_event() {
        check(settings(0.6, 0.4, 1, 3), true, &label_a(&[0.7, 0.1, 0.1, 0.5, 0.1, 0.1, 0.1]), "a:S - - - - - a:E");
    }

    #[test]
    fn interrupted_run_restarts_min_windows() {
        check(settings(0.6, 0.4, 3, 0), true, &label_a(&[0.7, 0.7, 0.5, 0.7, 0.7, 0.7]), "- - - - - a:S");
    }

    #[test]
    fn single_label_only_top1_can_be_on() {
        let windows: Vec<WindowScores> = [[0.7, 0.65], [0.3, 0.7], [0.3, 0.7]]
            .iter()
            .enumerate()
            .map(|(idx, s)| window("porch", idx, s.to_vec()))
            .collect();
        // Multi-label: both labels are on in the first window.
        check(settings(0.6, 0.4, 1, 0), true, &windows, "a:S,b:S a:E,b:U -");
        // Single-label: b loses to a in window 0, then a is no longer top-1.
        check(settings(0.6, 0.4, 1, 0), false, &windows, "a:S a:E,b:S -");
    }

    #[test]
    fn require_both_needs_each_head_and_ignores_a_lost_one() {
        let mut windows = label_a(&[0.9, 0.9, 0.9]);
        windows[0].audio = Some(vec![0.9, 0.0]);
        windows[0].video = Some(vec![0.2, 0.0]);
        windows[1].audio = Some(vec![0.9, 0.0]);
        windows[1].video = Some(vec![0.2, 0.0]);
        windows[1].degraded = Some(Degraded::VideoLost);
        let mut both = settings(0.6, 0.4, 1, 0);
        both.require = Require::Both;
        check(both.clone(), true, &windows, "- a:S -");
        let mut either = both;
        either.require = Require::Either;
        windows[0].fused = vec![0.1, 0.0];
        check(either, true, &windows, "a:S - -");
    }

    #[test]
    fn bad_windows_are_ignored() {
        let mut windows = label_a(&[0.9, 0.9]);
        windows[1].fused = vec![0.9];
        let mut back_in_time = window("porch", 0, vec![0.9, 0.0]);
        back_in_time.window_end -= Duration::from_secs(5);
        windows.push(back_in_time);
        windows.push(window("porch", 3, vec![f32::NAN, 0.0]));
        check(settings(0.6, 0.4, 1, 0), true, &windows, "a:S - - a:E");
    }

    #[test]
    fn ids_are_uuid_v4_and_shared_by_one_event() {
        let mut engine = EventEngine::with_id_generator(
            EventSettings { default: settings(0.6, 0.4, 1, 0), per_label: HashMap::new() },
            vec!["a".to_owned()],
            true,
            EventIdGenerator::from_seed(1),
        );
        let mut events = Vec::new();
        for (idx, s) in [0.7, 0.8, 0.1].iter().enumerate() {
            events.extend(engine.process(&window("porch", idx, vec![*s])));
        }
        assert_eq!(events.len(), 3);
        assert!(events.iter().all(|e| e.id == events[0].id));
        let id = &events[0].id;
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_eq!(events[2].end_time, Some(events[1].window_end));
        assert_eq!(events[0].start_time, events[0].window_end);
    }

    #[test]
    fn finish_source_ends_open_events() {
        let mut engine = EventEngine::with_id_generator(
            EventSettings::default(),
            vec!["a".to_owned()],
            true,
            EventIdGenerator::from_seed(1),
        );
        engine.process(&window("porch", 0, vec![0.9]));
        engine.process(&window("porch", 1, vec![0.9]));
        assert_eq!(engine.sources_with_open_events(), vec!["porch".to_owned()]);
        let ends = engine.finish_source("porch");
        assert_eq!(ends.len(), 1);
        assert_eq!(ends[0].kind, EventKind::End);
        assert!(engine.finish_source("porch").is_empty());
    }

    fn arb_label_settings() -> impl Strategy<Value = LabelSettings> {
        (0.05f32..0.95, 0.0f32..1.0, 1u32..4, 0u64..4, 0usize..3, 0u8..5).prop_map(
            |(threshold, off_fraction, min_windows, cooldown_s, require, enabled_roll)| LabelSettings {
                threshold,
                off_threshold: threshold * off_fraction,
                min_windows,
                cooldown: Duration::from_secs(cooldown_s),
                require: [Require::Fused, Require::Both, Require::Either][require],
                enabled: enabled_roll != 0,
            },
        )
    }

    /// Scores near the thresholds most of the time, so events start and end often.
    /// (source index, fused, audio, video, hop in seconds).
    type RawWindow = (usize, Vec<f32>, Vec<f32>, Vec<f32>, u64);
    /// Per (source, label): (window end, decision score, may be on).
    type History = HashMap<(String, String), Vec<(OffsetDateTime, f32, bool)>>;

    fn arb_windows() -> impl Strategy<Value = Vec<RawWindow>> {
        prop::collection::vec(
            (
                0usize..2,
                prop::collection::vec(0.0f32..1.0, 3),
                prop::collection::vec(0.0f32..1.0, 3),
                prop::collection::vec(0.0f32..1.0, 3),
                1u64..3,
            ),
            1..80,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn event_state_machine_invariants(
            default in arb_label_settings(),
            override_b in arb_label_settings(),
            multi_label in any::<bool>(),
            seed in any::<u64>(),
            raw_windows in arb_windows(),
        ) {
            let labels: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
            let event_settings = EventSettings {
                default,
                per_label: HashMap::from([("b".to_owned(), override_b)]),
            };
            let mut engine = EventEngine::with_id_generator(
                event_settings.clone(), labels.clone(), multi_label, EventIdGenerator::from_seed(seed));

            let sources = ["porch", "yard"];
            let mut clock = [T0, T0];
            // Per (source, label): open event id, decision scores history (end, decision, candidate).
            let mut open: HashMap<(String, String), String> = HashMap::new();
            let mut seen_ids: HashMap<String, (String, String)> = HashMap::new();
            let mut history: History = HashMap::new();

            for (source_idx, fused, audio, video, hop_s) in raw_windows {
                clock[source_idx] += Duration::from_secs(hop_s);
                let w = WindowScores {
                    source: sources[source_idx].to_owned(),
                    window_start: clock[source_idx] - Duration::from_secs(8),
                    window_end: clock[source_idx],
                    fused: fused.clone(),
                    audio: Some(audio),
                    video: Some(video),
                    degraded: None,
                };
                let top = top_label(&w.fused);
                for (label_idx, label) in labels.iter().enumerate() {
                    let s = LabelScores {
                        fused: w.fused[label_idx],
                        audio: w.audio.as_ref().map(|a| a[label_idx]),
                        video: w.video.as_ref().map(|v| v[label_idx]),
                    };
                    let d = decision_score(event_settings.for_label(label).require, s);
                    history.entry((w.source.clone(), label.clone())).or_default()
                        .push((w.window_end, d, multi_label || top == Some(label_idx)));
                }
                let events = engine.process(&w);
                let mut starts_this_window = 0;
                for e in events {
                    let key = (e.source.clone(), e.label.clone());
                    let ls = event_settings.for_label(&e.label);
                    prop_assert!(ls.enabled, "disabled label produced an event");
                    let h = &history[&key];
                    match e.kind {
                        EventKind::Start => {
                            starts_this_window += 1;
                            prop_assert!(!open.contains_key(&key), "start while open");
                            prop_assert!(!seen_ids.contains_key(&e.id), "id reused");
                            seen_ids.insert(e.id.clone(), key.clone());
                            open.insert(key.clone(), e.id.clone());
                            // Hysteresis: the last min_windows windows were all on.
                            let n = ls.min_windows as usize;
                            prop_assert!(h.len() >= n);
                            for &(_, d, candidate) in &h[h.len() - n..] {
                                prop_assert!(candidate && d >= ls.threshold);
                            }
                            prop_assert!(e.peak_score >= ls.threshold);
                        }
                        EventKind::Update => {
                            prop_assert_eq!(open.get(&key), Some(&e.id), "update without start");
                            prop_assert!(e.score >= ls.off_threshold);
                        }
                        EventKind::End => {
                            prop_assert_eq!(open.remove(&key), Some(e.id.clone()), "end without start");
                            let end_time = e.end_time.unwrap();
                            prop_assert!(e.window_end - end_time >= ls.cooldown);
                            prop_assert!(end_time >= e.start_time);
                            // Every window after end_time up to now was below off.
                            for &(t, d, candidate) in h.iter().filter(|(t, _, _)| *t > end_time) {
                                prop_assert!(!candidate || d < ls.off_threshold, "ended while above off at {}", t);
                            }
                        }
                    }
                    prop_assert_eq!(seen_ids.get(&e.id), Some(&key));
                }
                if !multi_label {
                    prop_assert!(starts_this_window <= 1, "two starts in one window of a single-label model");
                }
                // While open, no window of the event may be above off without being inside it:
                // an open event's label saw no off-run of cooldown length.
                for (key, _) in open.iter() {
                    let ls = event_settings.for_label(&key.1);
                    let h = &history[key];
                    let last_above = h.iter().rev().find(|(_, d, c)| *c && *d >= ls.off_threshold);
                    if let Some(&(t, _, _)) = last_above {
                        prop_assert!(h.last().unwrap().0 - t < ls.cooldown || h.last().unwrap().0 == t,
                            "event still open after cooldown below off");
                    }
                }
            }
        }
    }
}
