//! The events thread: owns the event engine and the publisher. Scored windows become events,
//! statuses and reloads arrive as [`Notice`]s, so the publisher has one owner and shuts down
//! cleanly. A reload that changes MQTT or spool settings replaces the publisher; while a new
//! one fails to start, events wait in memory and starting is retried every second. Control
//! commands from MQTT ([`Controls`]) are applied to the engine here, kept on disk, and their
//! state echoed on the retained control topics.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, select};
use serde_json::{Map, Value, json};

use super::controls::Controls;
use super::infer::ScoredWindow;
use super::prepare::Prepared;
use super::state::{DaemonState, PublisherGauges, lock};
use crate::capture::SourceStatus;
use crate::events::{Event, EventEngine, EventKind, EventSettings, WindowScores};
use crate::evidence::{ClipDone, EvidenceClient};
use crate::publish::{self, EvidencePayload, MqttSettings, Publisher, PublisherInfo, SpoolSettings};
use crate::telemetry;
use crate::web::Live;

/// What the main thread tells the events thread besides scores.
pub(super) enum Notice {
    Status { source: String, status: SourceStatus },
    SourceDone { source: String },
    Reload(Box<PublishConfig>),
}

/// What the events thread runs with; replaced as a whole on reload.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct PublishConfig {
    pub(super) events: EventSettings,
    mqtt: MqttSettings,
    spool: SpoolSettings,
    info: PublisherInfo,
    /// Sources that keep evidence (`[evidence]` and `[source.evidence]` enabled).
    evidence_sources: HashSet<String>,
}

impl PublishConfig {
    pub(super) fn of(prepared: &Prepared) -> PublishConfig {
        let settings = &prepared.settings;
        let model = &prepared.model;
        let labels = model.metadata.labels.clone();
        let model_hears = model.metadata.audio.is_some();
        let model_sees = model.metadata.video.is_some();
        let evidence_sources: HashSet<String> = settings
            .sources
            .iter()
            .filter(|source| settings.evidence.enabled && source.evidence.enabled)
            .map(|source| source.name.clone())
            .collect();
        PublishConfig {
            events: settings.events.clone(),
            mqtt: settings.mqtt.clone(),
            spool: settings.spool.clone(),
            info: PublisherInfo {
                sources: settings.sources.iter().map(|source| source.name.clone()).collect(),
                enabled_labels: settings.events.enabled_labels(&labels),
                audio_sources: settings
                    .sources
                    .iter()
                    .filter(|source| source.audio && model_hears)
                    .map(|source| source.name.clone())
                    .collect(),
                snapshot_sources: settings
                    .sources
                    .iter()
                    .filter(|source| evidence_sources.contains(&source.name) && source.video && model_sees)
                    .map(|source| source.name.clone())
                    .collect(),
                labels,
                model: publish::ModelInfo { name: model.name().to_string(), sha256: model.sha256.clone() },
            },
            evidence_sources,
        }
    }

    /// Whether going from `self` to `other` needs a new publisher (not just new thresholds).
    pub(super) fn publisher_differs(&self, other: &PublishConfig) -> bool {
        self.mqtt != other.mqtt || self.spool != other.spool || self.info != other.info
    }

    pub(super) fn start_publisher(&self) -> Result<Publisher, publish::PublishError> {
        Publisher::start(self.mqtt.clone(), self.spool.clone(), self.info.clone())
    }
}

/// The events thread's publisher: replaced on a reload that changes MQTT or spool settings.
/// While none runs (a new one failed to start), events wait in memory and starting is retried.
struct PublisherSlot {
    publisher: Option<Publisher>,
    config: PublishConfig,
    waiting: VecDeque<(Event, Option<EvidencePayload>)>,
    last_attempt: Instant,
    /// Counts the publishers started, so the events thread knows when to announce the
    /// control states to a new one.
    generation: u64,
    /// The page's live feed: every event as it happens, whether or not a publisher runs.
    live: Arc<Live>,
    /// The evidence store, when evidence is kept.
    evidence: Option<EvidenceClient>,
    /// Open events' evidence (the snapshot of their start), carried on to update and end.
    open_evidence: HashMap<String, EvidencePayload>,
}

impl PublisherSlot {
    fn publish(&mut self, events: Vec<Event>) {
        for event in events {
            if event.kind == EventKind::Start {
                telemetry::event_started(&event.source, &event.label);
            }
            let evidence = self.evidence_for(&event);
            self.live.event(page_event(&event, &self.config, evidence.as_ref()));
            self.waiting.push_back((event, evidence));
        }
        self.flush();
    }

    /// The snapshot at `start` (also set as the source's retained snapshot), the clip planned
    /// at `end`; what the store could not give within its answer time is flagged in `error`.
    fn evidence_for(&mut self, event: &Event) -> Option<EvidencePayload> {
        let client = self.evidence.as_ref()?;
        if !self.config.evidence_sources.contains(&event.source) {
            return None;
        }
        match event.kind {
            EventKind::Start => {
                let mut evidence = EvidencePayload::default();
                // Asked even for a source without video: the store keeps the event's start.
                let sees = self.config.info.snapshot_sources.contains(&event.source);
                match client.snapshot(event) {
                    Err(_) if !sees => {}
                    Ok(snapshot) => {
                        evidence.snapshot_url = Some(EvidencePayload::url(&event.id, &snapshot.path));
                        evidence.snapshot = Some(snapshot.path);
                        if let Some(publisher) = &self.publisher {
                            publisher.publish_snapshot(&event.source, snapshot.jpeg.as_ref().clone());
                        }
                    }
                    Err(reason) => evidence.error = Some(format!("snapshot: {reason}")),
                }
                self.open_evidence.insert(event.id.clone(), evidence.clone());
                Some(evidence)
            }
            EventKind::Update => Some(self.open_evidence.get(&event.id).cloned().unwrap_or_default()),
            EventKind::End => {
                let mut evidence = self.open_evidence.remove(&event.id).unwrap_or_default();
                match client.clip(event) {
                    Ok(path) => {
                        evidence.clip_url = Some(EvidencePayload::url(&event.id, &path));
                        evidence.clip = Some(path);
                    }
                    Err(reason) => {
                        let error = format!("clip: {reason}");
                        evidence.error = Some(match evidence.error.take() {
                            Some(earlier) => format!("{earlier}; {error}"),
                            None => error,
                        });
                    }
                }
                Some(evidence)
            }
        }
    }

    fn flush(&mut self) {
        if self.publisher.is_none() && self.last_attempt.elapsed() >= Duration::from_secs(1) {
            self.last_attempt = Instant::now();
            match self.config.start_publisher() {
                Ok(publisher) => {
                    tracing::info!("publisher started again");
                    self.publisher = Some(publisher);
                    self.generation += 1;
                }
                Err(err) => tracing::error!(error = %err, waiting = self.waiting.len(), "publisher still not started"),
            }
        }
        let Some(publisher) = &self.publisher else { return };
        while let Some((event, evidence)) = self.waiting.pop_front() {
            if let Err(err) = publisher.publish_event(&event, evidence.as_ref()) {
                tracing::error!(error = %err, label = event.label, "event could not be spooled");
            }
        }
    }

    /// Applies a reloaded config: a new publisher when MQTT, spool or what it announces changed.
    fn reconfigure(&mut self, config: PublishConfig) {
        if !self.config.publisher_differs(&config) {
            self.config = config;
            return;
        }
        if let Some(old) = self.publisher.take() {
            old.shutdown(Duration::from_secs(2));
        }
        let previous = std::mem::replace(&mut self.config, config);
        self.generation += 1;
        match self.config.start_publisher() {
            Ok(publisher) => self.publisher = Some(publisher),
            Err(err) => {
                tracing::error!(error = %err, "the reloaded MQTT/spool settings do not start; going back to the previous ones");
                self.config = previous;
                self.publisher = self.config.start_publisher().ok();
                self.last_attempt = Instant::now();
            }
        }
    }

    fn gauges(&self) -> PublisherGauges {
        match &self.publisher {
            Some(publisher) => {
                let spool = publisher.spool_stats();
                PublisherGauges {
                    connected: publisher.stats().connected,
                    spool_events: spool.records,
                    spool_bytes: spool.bytes,
                    spool_unwritten: spool.unwritten,
                    spool_unwritable: publisher.spool_unwritable(),
                }
            }
            None => PublisherGauges::default(),
        }
    }
}

/// Owns the event engine and the publisher until both input channels close.
/// What the events thread listens to: scored windows, notices from the main thread, and
/// the evidence store it asks for snapshots and clips (`None`: no evidence is kept).
pub(super) struct EventsInputs {
    pub(super) results: Receiver<ScoredWindow>,
    pub(super) notices: Receiver<Notice>,
    pub(super) evidence: Option<EvidenceClient>,
}

pub(super) fn events_loop(
    mut engine: EventEngine,
    publisher: Publisher,
    config: PublishConfig,
    mut controls: Controls,
    inputs: EventsInputs,
    state: &DaemonState,
) {
    let EventsInputs { results, notices, evidence } = inputs;
    for (source, label, over) in controls.iter() {
        tracing::info!(source, label, enabled = ?over.enabled, threshold = ?over.threshold, "control from MQTT in force");
        engine.set_override(source, label, *over);
    }
    let mut slot = PublisherSlot {
        publisher: Some(publisher),
        config,
        waiting: VecDeque::new(),
        last_attempt: Instant::now(),
        generation: 1,
        live: state.live.clone(),
        evidence,
        open_evidence: HashMap::new(),
    };
    let mut echoed_generation = 0;
    let mut results_open = true;
    let mut notices_open = true;
    let mut last_stats = Instant::now();
    while results_open || notices_open {
        if echoed_generation != slot.generation {
            echoed_generation = slot.generation;
            echo_controls(&engine, &slot);
        }
        let control_commands = slot.publisher.as_ref().map_or_else(crossbeam_channel::never, Publisher::controls);
        let clips_done: Receiver<ClipDone> =
            slot.evidence.as_ref().map_or_else(crossbeam_channel::never, |client| client.clips_done().clone());
        select! {
            recv(clips_done) -> message => if let Ok(done) = message {
                let result = done.result.as_ref().map(|info| (info.bytes, info.duration.as_secs_f64())).map_err(String::as_str);
                let message = publish::payload::clip_message(&done.event_id, &done.path, result);
                slot.live.clip(&done.event_id, &message);
                if let Some(publisher) = &slot.publisher {
                    publisher.publish_clip(&done.source, message);
                }
            },
            recv(if results_open { results.clone() } else { crossbeam_channel::never() }) -> message => match message {
                Ok(scored) => {
                    let scores = WindowScores {
                        source: scored.source.to_string(),
                        window_start: scored.start_utc,
                        window_end: scored.end_utc,
                        fused: scored.fused,
                        audio: scored.audio,
                        video: scored.video,
                        degraded: scored.degraded,
                    };
                    let message = publish::payload::scores_message(&scores, &slot.config.info.labels, scored.sound_dbfs);
                    slot.live.scores(&scores.source, &message);
                    if let Some(publisher) = &slot.publisher {
                        publisher.publish_scores(&scores.source, message);
                        if let Some(dbfs) = scored.sound_dbfs {
                            publisher.publish_sound_level(&scores.source, dbfs);
                        }
                    }
                    let events = engine.process(&scores);
                    slot.publish(events);
                }
                Err(_) => results_open = false,
            },
            recv(if notices_open { notices.clone() } else { crossbeam_channel::never() }) -> message => match message {
                Ok(Notice::Status { source, status }) => {
                    slot.live.status(&source, status.as_str());
                    if let Some(publisher) = &slot.publisher {
                        publisher.set_source_status(&source, status);
                    }
                }
                Ok(Notice::SourceDone { source }) => slot.publish(engine.finish_source(&source)),
                Ok(Notice::Reload(config)) => {
                    slot.publish(engine.set_settings(config.events.clone()));
                    slot.reconfigure(*config);
                    for (source, label, over) in controls.iter() {
                        tracing::info!(
                            source, label, enabled = ?over.enabled, threshold = ?over.threshold,
                            "control from MQTT still overrides config.toml (clear it with an empty set message)"
                        );
                    }
                    // Thresholds of labels without a control may have changed.
                    echoed_generation = 0;
                }
                Err(_) => notices_open = false,
            },
            recv(control_commands) -> message => if let Ok(control) = message {
                let over = controls.apply(&control);
                tracing::info!(
                    source = control.source, label = control.label, enabled = ?over.enabled,
                    threshold = ?over.threshold, "control from MQTT applied"
                );
                slot.publish(engine.set_override(&control.source, &control.label, over));
                let settings = engine.label_settings(&control.source, &control.label);
                slot.live.label_settings(&control.source, &control.label, settings.enabled, settings.threshold);
                if let Some(publisher) = &slot.publisher {
                    publisher.set_label_control(&control.source, &control.label, settings.enabled, settings.threshold);
                }
            },
            default(Duration::from_secs(1)) => {}
        }
        slot.flush();
        *lock(&state.publisher) = slot.gauges();
        if last_stats.elapsed() >= Duration::from_secs(5) {
            last_stats = Instant::now();
            if let Some(publisher) = &slot.publisher {
                publisher.set_runtime_stats(runtime_stats());
            }
        }
    }
    // Open events end with the daemon, so consumers never wait for an `end` that won't come.
    for source in engine.sources_with_open_events() {
        slot.publish(engine.finish_source(&source));
    }
    if !slot.waiting.is_empty() {
        tracing::error!(events = slot.waiting.len(), "stopping with events that no publisher took");
    }
    if let Some(publisher) = slot.publisher.take() {
        publisher.set_runtime_stats(runtime_stats());
        publisher.shutdown(Duration::from_secs(5));
    }
}

/// Announces every label's control state (enabled, threshold) as the engine applies it, to
/// the publisher and the page.
fn echo_controls(engine: &EventEngine, slot: &PublisherSlot) {
    let info = &slot.config.info;
    for source in &info.sources {
        for label in &info.enabled_labels {
            let settings = engine.label_settings(source, label);
            slot.live.label_settings(source, label, settings.enabled, settings.threshold);
            if let Some(publisher) = &slot.publisher {
                publisher.set_label_control(source, label, settings.enabled, settings.threshold);
            }
        }
    }
}

/// An event as the page and `/api/events` show it: the MQTT event JSON without the fields
/// of its delivery (`seq`, `replayed`, `latency_ms`).
fn page_event(event: &Event, config: &PublishConfig, evidence: Option<&EvidencePayload>) -> Value {
    let mut payload = publish::payload::EventPayload::new(event, 0, &config.mqtt.device_id, &config.info.model);
    payload.evidence = evidence.cloned();
    let mut value = serde_json::to_value(payload).unwrap_or(Value::Null);
    if let Some(fields) = value.as_object_mut() {
        for delivery in ["seq", "replayed", "latency_ms"] {
            fields.remove(delivery);
        }
    }
    value
}

/// The `runtime` part of the stats message, from the telemetry counters.
fn runtime_stats() -> Map<String, Value> {
    let inference = telemetry::inference();
    let mut sources = Map::new();
    for (name, counters) in telemetry::snapshot() {
        sources.insert(
            name,
            json!({
                "windows_built": counters.windows_built,
                "windows_degraded": counters.windows_degraded,
                "windows_dropped": counters.windows_dropped,
                "restarts": counters.restarts,
                "failures": counters.failures,
                "av_skew_seconds": counters.last_av_skew_seconds,
            }),
        );
    }
    let mut stats = Map::new();
    stats.insert("sources".into(), Value::Object(sources));
    let evidence = telemetry::evidence();
    stats.insert(
        "evidence".into(),
        json!({
            "snapshots": evidence.snapshots,
            "clips": evidence.clips,
            "failed": evidence.failed,
            "deleted": evidence.deleted,
            "files": evidence.files,
            "bytes": evidence.bytes,
            "ring_bytes": evidence.ring_bytes,
            "media_dropped": evidence.media_dropped,
        }),
    );
    stats.insert(
        "inference".into(),
        json!({
            "batches": inference.batches,
            "windows": inference.windows,
            "mean_ms_per_window": if inference.windows > 0 { inference.inference_seconds * 1e3 / inference.windows as f64 } else { 0.0 },
        }),
    );
    stats
}
