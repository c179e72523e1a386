//! Every MQTT topic and JSON payload mbt-edge publishes, in one place, as the contract
//! (shared/CONTRACT.md) spells them: event messages, per-window scores, stats and Home
//! Assistant discovery configs. Pure functions of their inputs; the publisher threads only
//! move the bytes.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use crate::events::{Degraded, Event, WindowScores};

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

/// Top-k labels of one window, for `{prefix}/{device}/{source}/scores`.
pub fn scores_message(scores: &WindowScores, labels: &[String]) -> Vec<u8> {
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
    /// Labels with events enabled: one binary_sensor per source and label.
    pub enabled_labels: Vec<String>,
    pub model: ModelInfo,
}

/// Retained discovery configs: one device per daemon; per source an `event` entity and a
/// `binary_sensor` per enabled label, all reading the source's events topic.
pub fn discovery_messages(topics: &Topics, device: &str, info: &PublisherInfo) -> Vec<(String, Vec<u8>)> {
    let device_block = json!({
        "identifiers": [format!("mbt-edge_{}", object_id(device))],
        "name": format!("mbt-edge {device}"),
        "manufacturer": "mbt-edge",
        "model": info.model.name,
        "sw_version": env!("CARGO_PKG_VERSION"),
    });
    let node = object_id(device);
    let mut messages = Vec::new();
    for source in &info.sources {
        let source_id = object_id(source);
        let unique_id = format!("mbt-edge_{node}_{source_id}_events");
        let config = json!({
            "name": format!("{source} events"),
            "unique_id": unique_id,
            "object_id": unique_id,
            "state_topic": topics.events(source),
            "availability_topic": topics.availability(),
            "event_types": info.labels,
            // Only `start` fires an event; update/end render empty and are ignored.
            "value_template": "{% if value_json.type == 'start' %}{{ {'event_type': value_json.label, 'score': value_json.score, 'id': value_json.id} | tojson }}{% endif %}",
            "device": device_block,
        });
        messages.push((
            format!("{}/event/{node}/{source_id}_events/config", topics.discovery_prefix),
            serde_json::to_vec(&config).expect("json values serialize"),
        ));
        for label in &info.enabled_labels {
            let label_id = object_id(label);
            let unique_id = format!("mbt-edge_{node}_{source_id}_{label_id}");
            let label_literal = serde_json::to_string(label).expect("strings serialize");
            let config = json!({
                "name": format!("{source} {label}"),
                "unique_id": unique_id,
                "object_id": unique_id,
                "state_topic": topics.events(source),
                "availability_topic": topics.availability(),
                "device_class": "sound",
                "value_template": format!(
                    "{{% if value_json.label == {label_literal} %}}{{{{ 'OFF' if value_json.type == 'end' else 'ON' }}}}{{% else %}}{{{{ 'ON' if this.state == 'on' else 'OFF' }}}}{{% endif %}}"
                ),
                "device": device_block,
            });
            messages.push((
                format!("{}/binary_sensor/{node}/{source_id}_{label_id}/config", topics.discovery_prefix),
                serde_json::to_vec(&config).expect("json values serialize"),
            ));
        }
    }
    messages
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
            &scores_message(&scores, &["a".to_owned(), "b".to_owned()]),
            json!({
                "source": "porch",
                "window": {"start": "2026-11-28T12:00:00Z", "end": "2026-11-28T12:00:08Z"},
                "top": [
                    {"label": "b", "fused": 0.5, "audio": null, "video": null},
                    {"label": "a", "fused": 0.25, "audio": null, "video": null}
                ],
                "degraded": null
            }),
        );
    }

    #[test]
    fn discovery_has_an_event_entity_and_a_binary_sensor_per_enabled_label() {
        let topics = Topics::new("mbt-edge", "gate", "homeassistant");
        let info = PublisherInfo {
            sources: vec!["porch".to_owned()],
            labels: vec!["dog bark".to_owned(), "car".to_owned()],
            enabled_labels: vec!["dog bark".to_owned()],
            model: ModelInfo::default(),
        };
        let messages = discovery_messages(&topics, "gate", &info);
        let topics: Vec<&str> = messages.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            topics,
            ["homeassistant/event/gate/porch_events/config", "homeassistant/binary_sensor/gate/porch_dog_bark/config"]
        );
        let event: Value = serde_json::from_slice(&messages[0].1).unwrap();
        assert_eq!(event["event_types"], json!(["dog bark", "car"]));
        assert_eq!(event["state_topic"], "mbt-edge/gate/porch/events");
        let sensor: Value = serde_json::from_slice(&messages[1].1).unwrap();
        assert!(sensor["value_template"].as_str().unwrap().contains("== \"dog bark\""));
    }
}
