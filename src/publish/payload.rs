//! Every MQTT topic and JSON payload mbt-edge publishes, in one place, as the contract
//! (shared/CONTRACT.md) spells them: event messages, per-window scores, stats and Home
//! Assistant discovery configs. Pure functions of their inputs; the publisher threads only
//! move the bytes.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use crate::events::{Degraded, Event, EventKind, WindowScores};

/// The model the events come from, as the `model` field reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelInfo {
    pub name: String,
    pub sha256: String,
}

/// How many labels a scores message lists.
pub const SCORES_TOP_K: usize = 5;

/// The topics of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
    device: String,
    discovery_prefix: String,
}

impl Topics {
    pub fn new(prefix: &str, device: &str, discovery_prefix: &str) -> Self {
        Topics { prefix: prefix.to_owned(), device: device.to_owned(), discovery_prefix: discovery_prefix.to_owned() }
    }
    pub fn availability(&self) -> String {
        format!("{}/{}/availability", self.prefix, self.device)
    }
    pub fn events(&self, source: &str) -> String {
        format!("{}/{}/{source}/events", self.prefix, self.device)
    }
    pub fn status(&self, source: &str) -> String {
        format!("{}/{}/{source}/status", self.prefix, self.device)
    }
    pub fn scores(&self, source: &str) -> String {
        format!("{}/{}/{source}/scores", self.prefix, self.device)
    }
    pub fn stats(&self) -> String {
        format!("{}/{}/stats", self.prefix, self.device)
    }
    /// Where Home Assistant announces `online` after it starts.
    pub fn home_assistant_status(&self) -> String {
        format!("{}/status", self.discovery_prefix)
    }
    /// Retained `ON`/`OFF` state of `label` on `source` (JSON, [`label_state_message`]).
    pub fn label_state(&self, source: &str, label: &str) -> String {
        format!("{}/labels/{}/state", self.source_base(source), label_id(label))
    }
    /// Retained `ON`/`OFF`: whether events of `label` on `source` are on (a control's state).
    pub fn label_enabled(&self, source: &str, label: &str) -> String {
        format!("{}/labels/{}/enabled", self.source_base(source), label_id(label))
    }
    /// Retained threshold of `label` on `source` (a control's state).
    pub fn label_threshold(&self, source: &str, label: &str) -> String {
        format!("{}/labels/{}/threshold", self.source_base(source), label_id(label))
    }
    /// What the publisher subscribes to for control commands: `<state topic>/set`.
    pub fn control_filter(&self) -> String {
        format!("{}/{}/+/labels/+/+/set", self.prefix, self.device)
    }
    /// Retained JPEG of the source's latest event start (evidence).
    pub fn snapshot(&self, source: &str) -> String {
        format!("{}/snapshot", self.source_base(source))
    }
    /// A clip is written (or could not be): JSON, [`clip_message`].
    pub fn clip(&self, source: &str) -> String {
        format!("{}/clip", self.source_base(source))
    }
    /// The source's sound level in dBFS, per window.
    pub fn sound_level(&self, source: &str) -> String {
        format!("{}/sound_level", self.source_base(source))
    }
    /// `(source, label id, control)` of a control command topic.
    pub fn parse_control<'a>(&self, topic: &'a str) -> Option<(&'a str, &'a str, &'a str)> {
        let rest =
            topic.strip_prefix(&self.prefix)?.strip_prefix('/')?.strip_prefix(&self.device)?.strip_prefix('/')?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [source, "labels", label_id, control, "set"] => Some((source, label_id, control)),
            _ => None,
        }
    }
    fn source_base(&self, source: &str) -> String {
        format!("{}/{}/{source}", self.prefix, self.device)
    }
    /// Never subscribed: unsubscribing from it marks a point in the client's request queue.
    pub fn barrier(&self) -> String {
        format!("{}/{}/$barrier", self.prefix, self.device)
    }
}

/// The event JSON of the contract. Stored in the spool with `replayed: false` and
/// `latency_ms: 0`; both are set when the message goes out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventPayload {
    #[serde(rename = "type")]
    pub kind: String,
    pub id: String,
    pub seq: u64,
    pub device: String,
    pub source: String,
    pub label: String,
    pub score: f32,
    pub peak_score: f32,
    pub scores: ScoresPayload,
    pub start_time: String,
    pub end_time: Option<String>,
    pub window: WindowPayload,
    pub model: ModelPayload,
    pub degraded: Option<String>,
    pub replayed: bool,
    pub latency_ms: u64,
    /// The event's snapshot and clip; absent where the source keeps no evidence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<EvidencePayload>,
}

/// `evidence` of an event: paths relative to `[evidence] dir` and the URLs the HTTP server
/// serves them at. `start` carries the snapshot; `update` and `end` carry it on, and `end`
/// names the clip, which is written once the post-roll has passed (announced on the `clip`
/// topic). What could not be kept is `null`, with the reason in `error`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvidencePayload {
    pub snapshot: Option<String>,
    pub snapshot_url: Option<String>,
    pub clip: Option<String>,
    pub clip_url: Option<String>,
    pub error: Option<String>,
}

impl EvidencePayload {
    /// The URL of a file of event `id` (`snapshot.jpg`, `clip.webm`, `clip.mp4`).
    pub fn url(id: &str, path: &str) -> String {
        let file = match path.rsplit('.').next() {
            Some("jpg") => "snapshot.jpg",
            Some("mp4") => "clip.mp4",
            _ => "clip.webm",
        };
        format!("/api/events/{id}/{file}")
    }
}

/// The message of the `clip` topic: a clip finished (`clip`, `clip_url`, `bytes`,
/// `duration_s`) or failed (`error`).
pub fn clip_message(event_id: &str, path: &str, result: Result<(u64, f64), &str>) -> Vec<u8> {
    let message = match result {
        Ok((bytes, duration)) => json!({
            "event_id": event_id,
            "clip": path,
            "clip_url": EvidencePayload::url(event_id, path),
            "bytes": bytes,
            "duration_s": (duration * 1000.0).round() / 1000.0,
            "error": null,
        }),
        Err(reason) => json!({
            "event_id": event_id, "clip": null, "clip_url": null, "bytes": null, "duration_s": null, "error": reason,
        }),
    };
    serde_json::to_vec(&message).expect("json values serialize")
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoresPayload {
    pub fused: f32,
    pub audio: Option<f32>,
    pub video: Option<f32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowPayload {
    pub start: String,
    pub end: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelPayload {
    pub name: String,
    pub sha256: String,
}

impl EventPayload {
    pub fn new(event: &Event, seq: u64, device: &str, model: &ModelInfo) -> Self {
        EventPayload {
            kind: event.kind.as_str().to_owned(),
            id: event.id.clone(),
            seq,
            device: device.to_owned(),
            source: event.source.clone(),
            label: event.label.clone(),
            score: finite_or_zero(event.score),
            peak_score: finite_or_zero(event.peak_score),
            scores: ScoresPayload {
                fused: finite_or_zero(event.scores.fused),
                audio: event.scores.audio.filter(|s| s.is_finite()),
                video: event.scores.video.filter(|s| s.is_finite()),
            },
            start_time: rfc3339(event.start_time),
            end_time: event.end_time.map(rfc3339),
            window: WindowPayload { start: rfc3339(event.window_start), end: rfc3339(event.window_end) },
            model: ModelPayload { name: model.name.clone(), sha256: model.sha256.clone() },
            degraded: event.degraded.map(|d| degraded_str(d).to_owned()),
            replayed: false,
            latency_ms: 0,
            evidence: None,
        }
    }

    /// The bytes the spool keeps.
    pub fn to_spool_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an event payload always serializes")
    }

    pub fn from_spool_bytes(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The message as published: `replayed` and `latency_ms` (window end to `now`) set.
    pub fn to_message(&self, replayed: bool, now: OffsetDateTime) -> Vec<u8> {
        let mut message = self.clone();
        message.replayed = replayed;
        message.latency_ms = OffsetDateTime::parse(&self.window.end, &Rfc3339)
            .map(|end| (now - end).whole_milliseconds().clamp(0, u64::MAX as i128) as u64)
            .unwrap_or(0);
        serde_json::to_vec(&message).expect("an event payload always serializes")
    }
}

/// The retained state of one label on one source: `ON` from an event's `start` (and its
/// updates) to its `end`, with that event's id and score; `OFF` before any event.
pub fn label_state_message(event: Option<&Event>) -> Vec<u8> {
    let message = match event {
        Some(event) => json!({
            "state": if event.kind == EventKind::End { "OFF" } else { "ON" },
            "event_id": event.id,
            "score": finite_or_zero(event.score),
            "peak_score": finite_or_zero(event.peak_score),
            "since": rfc3339(event.end_time.unwrap_or(event.start_time)),
        }),
        None => json!({ "state": "OFF", "event_id": null, "score": null, "peak_score": null, "since": null }),
    };
    serde_json::to_vec(&message).expect("json values serialize")
}

/// A control command from Home Assistant or any MQTT client: `<label state topic>/set`.
#[derive(Debug, Clone, PartialEq)]
pub struct Control {
    pub source: String,
    pub label: String,
    pub change: ControlChange,
}

/// `None`: back to what config.toml says.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ControlChange {
    Enabled(Option<bool>),
    Threshold(Option<f32>),
}

/// Reads a control command; `Err` says why it is ignored. `enabled/set` takes `ON`/`OFF`
/// (or `true`/`false`, `1`/`0`), `threshold/set` a number in 0..=1; an empty payload goes
/// back to the config's value.
pub fn parse_control(topics: &Topics, info: &PublisherInfo, topic: &str, payload: &[u8]) -> Result<Control, String> {
    let (source, wanted_label_id, control) = topics.parse_control(topic).ok_or("not a control topic")?;
    if !info.sources.iter().any(|known| known == source) {
        return Err(format!("no source {source:?}"));
    }
    let label = info
        .enabled_labels
        .iter()
        .find(|label| label_id(label) == wanted_label_id)
        .ok_or_else(|| format!("no enabled label with id {wanted_label_id:?}"))?;
    let text = std::str::from_utf8(payload).map_err(|_| "payload is not UTF-8".to_string())?.trim();
    let change = match control {
        "enabled" => ControlChange::Enabled(match text.to_ascii_lowercase().as_str() {
            "" => None,
            "on" | "true" | "1" => Some(true),
            "off" | "false" | "0" => Some(false),
            other => return Err(format!("enabled takes ON or OFF, got {other:?}")),
        }),
        "threshold" if text.is_empty() => ControlChange::Threshold(None),
        "threshold" => match text.parse::<f32>() {
            Ok(threshold) if (0.0..=1.0).contains(&threshold) => ControlChange::Threshold(Some(threshold)),
            _ => return Err(format!("threshold takes a number in 0..=1, got {text:?}")),
        },
        other => return Err(format!("no control {other:?}; there are enabled and threshold")),
    };
    Ok(Control { source: source.to_owned(), label: label.clone(), change })
}

/// Top-k labels of one window, and the window's sound level, for
/// `{prefix}/{device}/{source}/scores`.
pub fn scores_message(scores: &WindowScores, labels: &[String], sound_dbfs: Option<f32>) -> Vec<u8> {
    let mut order: Vec<usize> = (0..scores.fused.len().min(labels.len())).collect();
    order.sort_by(|&a, &b| scores.fused[b].total_cmp(&scores.fused[a]));
    let head =
        |h: &Option<Vec<f32>>, idx: usize| h.as_ref().and_then(|v| v.get(idx).copied()).filter(|s| s.is_finite());
    let top: Vec<Value> = order
        .into_iter()
        .filter(|&idx| scores.fused[idx].is_finite())
        .take(SCORES_TOP_K)
        .map(|idx| {
            json!({
                "label": labels[idx],
                "fused": scores.fused[idx],
                "audio": head(&scores.audio, idx),
                "video": head(&scores.video, idx),
            })
        })
        .collect();
    let message = json!({
        "source": scores.source,
        "window": { "start": rfc3339(scores.window_start), "end": rfc3339(scores.window_end) },
        "top": top,
        "sound_dbfs": sound_dbfs.filter(|level| level.is_finite()),
        "degraded": scores.degraded.map(degraded_str),
    });
    serde_json::to_vec(&message).expect("json values serialize")
}

/// The periodic stats message: the publisher's own counters, plus whatever the rest of the
/// daemon last handed in under `runtime`.
pub fn stats_message(
    device: &str,
    now: OffsetDateTime,
    publisher: Value,
    spool: Value,
    runtime: &serde_json::Map<String, Value>,
) -> Vec<u8> {
    let message = json!({
        "device": device,
        "time": rfc3339(now),
        "mqtt": publisher,
        "spool": spool,
        "runtime": runtime,
    });
    serde_json::to_vec(&message).expect("json values serialize")
}

/// What the publisher needs to know about this daemon: the model for the `model` field,
/// the labels for scores messages, and sources and labels for Home Assistant discovery.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PublisherInfo {
    pub sources: Vec<String>,
    /// Every label of the model: the `event_types` of each source's event entity.
    pub labels: Vec<String>,
    /// Labels with events enabled in config.toml: per source and label a binary_sensor, a
    /// switch and a threshold number.
    pub enabled_labels: Vec<String>,
    /// Sources with audio: a sound-level sensor each.
    pub audio_sources: Vec<String>,
    /// Sources that keep snapshots: an `image` entity each.
    pub snapshot_sources: Vec<String>,
    pub model: ModelInfo,
}

/// Retained discovery configs: one device per daemon; per source an `event` entity (fired on
/// `start`) and a sound-level `sensor` (sources with audio); per source and enabled label a
/// `binary_sensor` reading the label's retained state, a `switch` that turns its events on
/// and off and a `number` for its threshold. Entity ids stay what they were when the configs
/// carried `object_id` (`<platform>.mbt_edge_<device>_<source>_...`): `default_entity_id`
/// names the same id, and Home Assistant keeps the id it registered under the unchanged
/// `unique_id` anyway.
pub fn discovery_messages(topics: &Topics, device: &str, info: &PublisherInfo) -> Vec<(String, Vec<u8>)> {
    let device_block = json!({
        "identifiers": [format!("mbt-edge_{}", object_id(device))],
        "name": format!("mbt-edge {device}"),
        "manufacturer": "mbt-edge",
        "model": info.model.name,
        "sw_version": env!("CARGO_PKG_VERSION"),
    });
    let origin = json!({ "name": "mbt-edge", "sw_version": env!("CARGO_PKG_VERSION") });
    let node = object_id(device);
    let mut messages = Vec::new();
    let mut entity = |platform: &str, node_path: String, unique_id: String, name: String, mut config: Value| {
        let fields = config.as_object_mut().expect("discovery configs are objects");
        fields.insert("name".into(), name.into());
        fields.insert("default_entity_id".into(), format!("{platform}.{}", object_id(&unique_id)).into());
        fields.insert("unique_id".into(), unique_id.into());
        fields.insert("availability_topic".into(), topics.availability().into());
        fields.insert("device".into(), device_block.clone());
        fields.insert("origin".into(), origin.clone());
        messages.push((
            format!("{}/{platform}/{node}/{node_path}/config", topics.discovery_prefix),
            serde_json::to_vec(&config).expect("json values serialize"),
        ));
    };
    for source in &info.sources {
        let source_id = object_id(source);
        entity(
            "event",
            format!("{source_id}_events"),
            format!("mbt-edge_{node}_{source_id}_events"),
            format!("{source} events"),
            json!({
                "state_topic": topics.events(source),
                "event_types": info.labels,
                // Only `start` fires an event; update/end render empty and are ignored.
                "value_template": "{% if value_json.type == 'start' %}{{ {'event_type': value_json.label, 'score': value_json.score, 'id': value_json.id} | tojson }}{% endif %}",
            }),
        );
        if info.audio_sources.contains(source) {
            entity(
                "sensor",
                format!("{source_id}_sound_level"),
                format!("mbt-edge_{node}_{source_id}_sound_level"),
                format!("{source} sound level"),
                json!({
                    "state_topic": topics.sound_level(source),
                    "unit_of_measurement": "dBFS",
                    "state_class": "measurement",
                    "suggested_display_precision": 1,
                    "icon": "mdi:volume-high",
                }),
            );
        }
        if info.snapshot_sources.contains(source) {
            entity(
                "image",
                format!("{source_id}_snapshot"),
                format!("mbt-edge_{node}_{source_id}_snapshot"),
                format!("{source} snapshot"),
                json!({ "image_topic": topics.snapshot(source), "content_type": "image/jpeg" }),
            );
        }
        for label in &info.enabled_labels {
            let label_id = label_id(label);
            let unique_id = format!("mbt-edge_{node}_{source_id}_{label_id}");
            entity(
                "binary_sensor",
                format!("{source_id}_{label_id}"),
                unique_id.clone(),
                format!("{source} {label}"),
                json!({
                    "state_topic": topics.label_state(source, label),
                    "value_template": "{{ value_json.state }}",
                    "json_attributes_topic": topics.label_state(source, label),
                    "payload_on": "ON",
                    "payload_off": "OFF",
                    "device_class": "sound",
                }),
            );
            entity(
                "switch",
                format!("{source_id}_{label_id}_enabled"),
                format!("{unique_id}_enabled"),
                format!("{source} {label} detection"),
                json!({
                    "command_topic": format!("{}/set", topics.label_enabled(source, label)),
                    "state_topic": topics.label_enabled(source, label),
                    "payload_on": "ON",
                    "payload_off": "OFF",
                    "entity_category": "config",
                    "icon": "mdi:ear-hearing",
                }),
            );
            entity(
                "number",
                format!("{source_id}_{label_id}_threshold"),
                format!("{unique_id}_threshold"),
                format!("{source} {label} threshold"),
                json!({
                    "command_topic": format!("{}/set", topics.label_threshold(source, label)),
                    "state_topic": topics.label_threshold(source, label),
                    "min": 0.0,
                    "max": 1.0,
                    "step": 0.01,
                    "mode": "box",
                    "entity_category": "config",
                }),
            );
        }
    }
    messages
}

/// A label as one topic level and Home Assistant object id: lowercase ASCII letters, digits
/// and `_` (`"dog bark"` -> `dog_bark`).
pub fn label_id(label: &str) -> String {
    object_id(label)
}

/// The contract's spelling of a lost modality.
pub fn degraded_str(degraded: Degraded) -> &'static str {
    degraded.as_str()
}

/// RFC 3339 in UTC, e.g. `2026-11-28T12:00:08Z`.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.to_offset(UtcOffset::UTC).format(&Rfc3339).unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

/// Home Assistant object ids: lowercase ASCII letters, digits and `_`.
fn object_id(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect()
}

fn finite_or_zero(score: f32) -> f32 {
    if score.is_finite() { score } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use time::macros::datetime;

    use super::*;
    use crate::events::{Degraded, EventKind, LabelScores};

    fn event() -> Event {
        let t = datetime!(2026-11-28 12:00:08 UTC);
        Event {
            kind: EventKind::Start,
            id: "6f1c0e0a-0000-4000-8000-000000000001".to_owned(),
            source: "porch".to_owned(),
            label: "dog bark".to_owned(),
            score: 0.75,
            peak_score: 0.75,
            scores: LabelScores { fused: 0.75, audio: Some(0.5), video: Some(f32::NAN) },
            start_time: t,
            end_time: None,
            window_start: t - Duration::from_secs(8),
            window_end: t,
            degraded: Some(Degraded::VideoLost),
        }
    }

    /// Compares a message with the expected JSON text.
    fn check(message: &[u8], expected: Value) {
        let got: Value = serde_json::from_slice(message).unwrap();
        assert_eq!(got, expected);
    }

    #[test]
    fn event_message_has_the_contract_fields() {
        let model = ModelInfo { name: "mbt-small".to_owned(), sha256: "ab".repeat(32) };
        let payload = EventPayload::new(&event(), 42, "gate", &model);
        let stored = EventPayload::from_spool_bytes(&payload.to_spool_bytes()).unwrap();
        let now = datetime!(2026-11-28 12:00:08.250 UTC);
        check(
            &stored.to_message(true, now),
            json!({
                "type": "start", "id": "6f1c0e0a-0000-4000-8000-000000000001", "seq": 42,
                "device": "gate", "source": "porch", "label": "dog bark",
                "score": 0.75, "peak_score": 0.75,
                "scores": {"fused": 0.75, "audio": 0.5, "video": null},
                "start_time": "2026-11-28T12:00:08Z", "end_time": null,
                "window": {"start": "2026-11-28T12:00:00Z", "end": "2026-11-28T12:00:08Z"},
                "model": {"name": "mbt-small", "sha256": "ab".repeat(32)},
                "degraded": "video_lost", "replayed": true, "latency_ms": 250
            }),
        );
    }

    #[test]
    fn scores_message_lists_top_labels() {
        let t = datetime!(2026-11-28 12:00:08 UTC);
        let scores = WindowScores {
            source: "porch".to_owned(),
            window_start: t - Duration::from_secs(8),
            window_end: t,
            fused: vec![0.25, 0.5],
            audio: None,
            video: None,
            degraded: None,
        };
        check(
            &scores_message(&scores, &["a".to_owned(), "b".to_owned()], Some(-13.5)),
            json!({
                "source": "porch",
                "window": {"start": "2026-11-28T12:00:00Z", "end": "2026-11-28T12:00:08Z"},
                "top": [
                    {"label": "b", "fused": 0.5, "audio": null, "video": null},
                    {"label": "a", "fused": 0.25, "audio": null, "video": null}
                ],
                "sound_dbfs": -13.5,
                "degraded": null
            }),
        );
    }

    fn discovery() -> Vec<(String, Value)> {
        let topics = Topics::new("mbt-edge", "gate", "homeassistant");
        let info = PublisherInfo {
            sources: vec!["porch".to_owned()],
            labels: vec!["dog bark".to_owned(), "car".to_owned()],
            enabled_labels: vec!["dog bark".to_owned()],
            audio_sources: vec!["porch".to_owned()],
            snapshot_sources: vec!["porch".to_owned()],
            model: ModelInfo::default(),
        };
        discovery_messages(&topics, "gate", &info)
            .into_iter()
            .map(|(topic, payload)| (topic, serde_json::from_slice(&payload).unwrap()))
            .collect()
    }

    #[test]
    fn discovery_announces_event_sound_level_and_per_label_state_switch_and_threshold() {
        let messages = discovery();
        let topics: Vec<&str> = messages.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            topics,
            [
                "homeassistant/event/gate/porch_events/config",
                "homeassistant/sensor/gate/porch_sound_level/config",
                "homeassistant/image/gate/porch_snapshot/config",
                "homeassistant/binary_sensor/gate/porch_dog_bark/config",
                "homeassistant/switch/gate/porch_dog_bark_enabled/config",
                "homeassistant/number/gate/porch_dog_bark_threshold/config",
            ]
        );
        let by_platform =
            |platform: &str| &messages.iter().find(|(t, _)| t.contains(&format!("/{platform}/"))).unwrap().1;
        let event = by_platform("event");
        assert_eq!(event["event_types"], json!(["dog bark", "car"]));
        assert_eq!(event["state_topic"], "mbt-edge/gate/porch/events");
        // The entity ids Home Assistant made from the former object_id, kept.
        assert_eq!(event["default_entity_id"], "event.mbt_edge_gate_porch_events");
        let sensor = by_platform("binary_sensor");
        assert_eq!(sensor["state_topic"], "mbt-edge/gate/porch/labels/dog_bark/state");
        assert_eq!(sensor["default_entity_id"], "binary_sensor.mbt_edge_gate_porch_dog_bark");
        let switch = by_platform("switch");
        assert_eq!(switch["command_topic"], "mbt-edge/gate/porch/labels/dog_bark/enabled/set");
        assert_eq!(by_platform("number")["state_topic"], "mbt-edge/gate/porch/labels/dog_bark/threshold");
        assert_eq!(by_platform("sensor")["state_topic"], "mbt-edge/gate/porch/sound_level");
        let image = by_platform("image");
        assert_eq!(image["image_topic"], "mbt-edge/gate/porch/snapshot");
        assert_eq!(image["content_type"], "image/jpeg");
        assert_eq!(image["default_entity_id"], "image.mbt_edge_gate_porch_snapshot");
    }

    /// Every key of every payload is one Home Assistant documents for its platform (it drops
    /// unknown keys silently), the required ones are there, and `object_id` is gone.
    #[test]
    fn discovery_payloads_use_only_the_keys_home_assistant_documents() {
        use super::super::ha_keys;
        for (topic, config) in discovery() {
            let platform = topic.split('/').nth(1).unwrap();
            let (own, required) = ha_keys::platform(platform).unwrap_or_else(|| panic!("{topic}: unknown platform"));
            let fields = config.as_object().unwrap();
            for key in fields.keys() {
                assert!(
                    ha_keys::COMMON.contains(&key.as_str()) || own.contains(&key.as_str()),
                    "{topic}: {key} is not a {platform} key"
                );
            }
            for key in required.iter().chain(&["name", "unique_id", "default_entity_id", "device", "origin"]) {
                assert!(fields.contains_key(*key), "{topic}: {key} missing");
            }
            for key in config["device"].as_object().unwrap().keys() {
                assert!(ha_keys::DEVICE.contains(&key.as_str()), "{topic}: device.{key}");
            }
            for key in config["origin"].as_object().unwrap().keys() {
                assert!(ha_keys::ORIGIN.contains(&key.as_str()), "{topic}: origin.{key}");
            }
            let entity_id = config["default_entity_id"].as_str().unwrap();
            assert!(entity_id.starts_with(&format!("{platform}.")), "{topic}: {entity_id}");
        }
    }

    #[test]
    fn label_state_is_on_from_start_to_end() {
        let start = event();
        let on: Value = serde_json::from_slice(&label_state_message(Some(&start))).unwrap();
        assert_eq!(on["state"], "ON");
        assert_eq!(on["event_id"], start.id.as_str());
        let end = Event { kind: EventKind::End, end_time: Some(start.start_time), ..start.clone() };
        let off: Value = serde_json::from_slice(&label_state_message(Some(&end))).unwrap();
        assert_eq!((off["state"].as_str(), off["event_id"].as_str()), (Some("OFF"), Some(start.id.as_str())));
        let never: Value = serde_json::from_slice(&label_state_message(None)).unwrap();
        assert_eq!((never["state"].as_str(), never["event_id"].as_str()), (Some("OFF"), None));
    }

    #[test]
    fn control_commands_parse_or_say_why_not() {
        let topics = Topics::new("site/a", "gate", "homeassistant");
        let info = PublisherInfo {
            sources: vec!["porch".to_owned()],
            labels: vec!["dog bark".to_owned(), "car".to_owned()],
            enabled_labels: vec!["dog bark".to_owned()],
            audio_sources: Vec::new(),
            snapshot_sources: Vec::new(),
            model: ModelInfo::default(),
        };
        let check = |topic: &str, payload: &str| match parse_control(&topics, &info, topic, payload.as_bytes()) {
            Ok(control) => format!("{} {} {:?}", control.source, control.label, control.change),
            Err(why) => format!("error: {why}"),
        };
        let base = "site/a/gate/porch/labels/dog_bark";
        assert_eq!(check(&format!("{base}/enabled/set"), "OFF"), "porch dog bark Enabled(Some(false))");
        assert_eq!(check(&format!("{base}/enabled/set"), "on"), "porch dog bark Enabled(Some(true))");
        assert_eq!(check(&format!("{base}/threshold/set"), "0.85"), "porch dog bark Threshold(Some(0.85))");
        assert_eq!(check(&format!("{base}/threshold/set"), ""), "porch dog bark Threshold(None)");
        assert!(check(&format!("{base}/threshold/set"), "2").starts_with("error: threshold takes a number"));
        assert!(check(&format!("{base}/enabled/set"), "maybe").starts_with("error: enabled takes ON or OFF"));
        assert!(check("site/a/gate/porch/labels/car/enabled/set", "OFF").starts_with("error: no enabled label"));
        assert!(check("site/a/gate/yard/labels/dog_bark/enabled/set", "OFF").starts_with("error: no source"));
        assert!(check("site/a/gate/porch/events", "").starts_with("error: not a control topic"));
    }
}
