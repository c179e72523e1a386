//! What the page shows as it happens: the events thread hands in every window's scores (the
//! same JSON as the MQTT `scores` topic), every event (the MQTT event JSON without the
//! delivery fields) and every status change; [`Live`] keeps the recent ones for a page that
//! just opened and broadcasts each to the page's live streams. Handing in never blocks: a
//! stream that falls behind skips what it missed (and the page says so), the daemon does not
//! wait for a browser.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Value, json};
use tokio::sync::broadcast;

/// Scores kept per source for a page that opens: 4 minutes at the default 0.5 s hop.
pub const SCORES_KEPT: usize = 480;
/// Events kept (a start and its end count once: the latest state of each event is kept).
pub const EVENTS_KEPT: usize = 200;
/// Messages a live stream may fall behind before it skips.
const STREAM_BACKLOG: usize = 1024;

/// One message on the live stream: `kind` is the server-sent event's name (`scores`,
/// `event`, `status`, `settings`), `data` its JSON.
#[derive(Debug, Clone)]
pub struct LiveMessage {
    pub kind: &'static str,
    pub data: Arc<str>,
}

/// The recent scores, events, statuses and label settings, and the live stream of them.
#[derive(Debug)]
pub struct Live {
    recent: Mutex<Recent>,
    stream: broadcast::Sender<LiveMessage>,
}

#[derive(Debug, Default)]
struct Recent {
    /// Per source, oldest first.
    scores: BTreeMap<String, VecDeque<Arc<str>>>,
    /// Latest state of each event, oldest first.
    events: VecDeque<Value>,
    /// Per source and label: whether events are on and the threshold in force.
    settings: BTreeMap<(String, String), (bool, f32)>,
}

impl Default for Live {
    fn default() -> Self {
        Live { recent: Mutex::new(Recent::default()), stream: broadcast::channel(STREAM_BACKLOG).0 }
    }
}

impl Live {
    pub fn new() -> Arc<Live> {
        Arc::new(Live::default())
    }

    fn recent(&self) -> MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn send(&self, kind: &'static str, data: Arc<str>) {
        // No stream open is not an error.
        let _ = self.stream.send(LiveMessage { kind, data });
    }

    /// A window's scores message (`publish::payload::scores_message`).
    pub fn scores(&self, source: &str, message: &[u8]) {
        let data: Arc<str> = String::from_utf8_lossy(message).into();
        {
            let mut recent = self.recent();
            let kept = recent.scores.entry(source.to_owned()).or_default();
            if kept.len() == SCORES_KEPT {
                kept.pop_front();
            }
            kept.push_back(data.clone());
        }
        self.send("scores", data);
    }

    /// An event (`start`, `update` or `end`): replaces the earlier state of the same `id`.
    pub fn event(&self, event: Value) {
        let data: Arc<str> = event.to_string().into();
        {
            let mut recent = self.recent();
            let id = event.get("id").cloned();
            if let Some(known) = recent.events.iter_mut().find(|known| known.get("id") == id.as_ref()) {
                *known = event;
            } else {
                if recent.events.len() == EVENTS_KEPT {
                    recent.events.pop_front();
                }
                recent.events.push_back(event);
            }
        }
        self.send("event", data);
    }

    /// A clip was written or failed (`publish::payload::clip_message`): the event's
    /// `evidence` gains `clip_ready` (and `clip_error`), and the page hears of it.
    pub fn clip(&self, event_id: &str, message: &[u8]) {
        let Ok(clip) = serde_json::from_slice::<Value>(message) else { return };
        let updated = {
            let mut recent = self.recent();
            let Some(known) =
                recent.events.iter_mut().find(|known| known.get("id").and_then(Value::as_str) == Some(event_id))
            else {
                return;
            };
            if let Some(evidence) = known.get_mut("evidence").and_then(Value::as_object_mut) {
                evidence.insert("clip_ready".into(), clip["error"].is_null().into());
                if !clip["error"].is_null() {
                    evidence.insert("clip_error".into(), clip["error"].clone());
                }
            }
            known.to_string()
        };
        self.send("event", updated.into());
    }

    /// A source's status changed (`online`, `degraded`, `offline`).
    pub fn status(&self, source: &str, status: &str) {
        self.send("status", json!({ "source": source, "status": status }).to_string().into());
    }

    /// A label's settings now in force (config, or a control from MQTT).
    pub fn label_settings(&self, source: &str, label: &str, enabled: bool, threshold: f32) {
        let changed = self.recent().settings.insert((source.to_owned(), label.to_owned()), (enabled, threshold))
            != Some((enabled, threshold));
        if changed {
            let message = json!({ "source": source, "label": label, "enabled": enabled, "threshold": threshold });
            self.send("settings", message.to_string().into());
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<LiveMessage> {
        self.stream.subscribe()
    }

    /// The latest state of the last `limit` events, newest first.
    pub fn events(&self, limit: usize) -> Vec<Value> {
        self.recent().events.iter().rev().take(limit).cloned().collect()
    }

    /// The scores kept for `source`, oldest first, as JSON objects.
    pub fn recent_scores(&self, source: &str) -> Vec<Value> {
        let recent = self.recent();
        let Some(kept) = recent.scores.get(source) else { return Vec::new() };
        kept.iter().filter_map(|text| serde_json::from_str(text).ok()).collect()
    }

    /// `{label: {enabled, threshold}}` for `source`.
    pub fn settings_of(&self, source: &str) -> Value {
        let recent = self.recent();
        let labels: serde_json::Map<String, Value> = recent
            .settings
            .iter()
            .filter(|((of, _), _)| of == source)
            .map(|((_, label), (enabled, threshold))| {
                (label.clone(), json!({ "enabled": enabled, "threshold": threshold }))
            })
            .collect();
        Value::Object(labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_keep_their_latest_state_newest_first() {
        let live = Live::new();
        let mut stream = live.subscribe();
        live.event(json!({ "id": "a", "type": "start" }));
        live.event(json!({ "id": "b", "type": "start" }));
        live.event(json!({ "id": "a", "type": "end" }));
        let events = live.events(10);
        assert_eq!(events, vec![json!({ "id": "b", "type": "start" }), json!({ "id": "a", "type": "end" })]);
        assert_eq!(live.events(1).len(), 1);
        let kinds: Vec<&str> = std::iter::from_fn(|| stream.try_recv().ok()).map(|message| message.kind).collect();
        assert_eq!(kinds, ["event", "event", "event"]);
    }

    #[test]
    fn a_finished_clip_marks_its_event_ready_and_a_failed_one_says_why() {
        let live = Live::new();
        live.event(json!({ "id": "a", "type": "end", "evidence": { "clip": "s/a.webm" } }));
        live.event(json!({ "id": "b", "type": "end", "evidence": { "clip": "s/b.webm" } }));
        let mut stream = live.subscribe();
        live.clip("a", br#"{"event_id":"a","clip":"s/a.webm","error":null}"#);
        live.clip("b", br#"{"event_id":"b","clip":null,"error":"disk full"}"#);
        live.clip("gone", br#"{"event_id":"gone","error":null}"#);
        let events = live.events(2);
        assert_eq!(events[1]["evidence"]["clip_ready"], json!(true));
        assert_eq!(events[0]["evidence"]["clip_ready"], json!(false));
        assert_eq!(events[0]["evidence"]["clip_error"], json!("disk full"));
        assert_eq!(std::iter::from_fn(|| stream.try_recv().ok()).count(), 2);
    }

    #[test]
    fn scores_are_kept_per_source_up_to_the_limit() {
        let live = Live::new();
        for idx in 0..SCORES_KEPT + 5 {
            live.scores("porch", json!({ "n": idx }).to_string().as_bytes());
        }
        live.scores("yard", b"{\"n\":0}");
        let porch = live.recent_scores("porch");
        assert_eq!(porch.len(), SCORES_KEPT);
        assert_eq!(porch[0], json!({ "n": 5 }));
        assert_eq!(live.recent_scores("yard").len(), 1);
        assert!(live.recent_scores("nowhere").is_empty());
    }

    #[test]
    fn settings_are_announced_when_they_change_only() {
        let live = Live::new();
        let mut stream = live.subscribe();
        live.label_settings("porch", "dog", true, 0.5);
        live.label_settings("porch", "dog", true, 0.5);
        live.label_settings("porch", "dog", false, 0.5);
        assert_eq!(live.settings_of("porch"), json!({ "dog": { "enabled": false, "threshold": 0.5 } }));
        assert_eq!(std::iter::from_fn(|| stream.try_recv().ok()).count(), 2);
    }

    #[test]
    fn a_stream_that_falls_behind_skips_and_the_sender_never_waits() {
        let live = Live::new();
        let mut stream = live.subscribe();
        for _ in 0..STREAM_BACKLOG * 2 {
            live.status("porch", "online");
        }
        assert!(matches!(stream.try_recv(), Err(broadcast::error::TryRecvError::Lagged(_))));
        assert!(stream.try_recv().is_ok());
    }
}
