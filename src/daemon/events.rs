//! The events thread: owns the event engine and the publisher. Scored windows become events,
//! statuses and reloads arrive as [`Notice`]s, so the publisher has one owner and shuts down
//! cleanly. A reload that changes MQTT or spool settings replaces the publisher; while a new
//! one fails to start, events wait in memory and starting is retried every second.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, select};
use serde_json::{Map, Value, json};

use super::infer::ScoredWindow;
use super::prepare::Prepared;
use super::state::{DaemonState, PublisherGauges, lock};
use crate::capture::SourceStatus;
use crate::events::{Event, EventEngine, EventKind, EventSettings, WindowScores};
use crate::publish::{self, MqttSettings, Publisher, PublisherInfo, SpoolSettings};
use crate::telemetry;

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
}

impl PublishConfig {
    pub(super) fn of(prepared: &Prepared) -> PublishConfig {
        let settings = &prepared.settings;
        let model = &prepared.model;
        let labels = model.metadata.labels.clone();
        PublishConfig {
            events: settings.events.clone(),
            mqtt: settings.mqtt.clone(),
            spool: settings.spool.clone(),
            info: PublisherInfo {
                sources: settings.sources.iter().map(|source| source.name.clone()).collect(),
                enabled_labels: settings.events.enabled_labels(&labels),
                labels,
                model: publish::ModelInfo { name: model.name().to_string(), sha256: model.sha256.clone() },
            },
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
    waiting: VecDeque<Event>,
    last_attempt: Instant,
}

impl PublisherSlot {
    fn publish(&mut self, events: Vec<Event>) {
        for event in events {
            if event.kind == EventKind::Start {
                telemetry::event_started(&event.source, &event.label);
            }
            self.waiting.push_back(event);
        }
        self.flush();
    }

    fn flush(&mut self) {
        if self.publisher.is_none() && self.last_attempt.elapsed() >= Duration::from_secs(1) {
            self.last_attempt = Instant::now();
            match self.config.start_publisher() {
                Ok(publisher) => {
                    tracing::info!("publisher started again");
                    self.publisher = Some(publisher);
                }
                Err(err) => tracing::error!(error = %err, waiting = self.waiting.len(), "publisher still not started"),
            }
        }
        let Some(publisher) = &self.publisher else { return };
        while let Some(event) = self.waiting.pop_front() {
            if let Err(err) = publisher.publish_event(&event) {
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
                }
            }
            None => PublisherGauges::default(),
        }
    }
}

/// Owns the event engine and the publisher until both input channels close.
pub(super) fn events_loop(
    mut engine: EventEngine,
    publisher: Publisher,
    config: PublishConfig,
    results: Receiver<ScoredWindow>,
    notices: Receiver<Notice>,
    state: &DaemonState,
) {
    let mut slot =
        PublisherSlot { publisher: Some(publisher), config, waiting: VecDeque::new(), last_attempt: Instant::now() };
    let mut results_open = true;
    let mut notices_open = true;
    let mut last_stats = Instant::now();
    while results_open || notices_open {
        select! {
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
                    if let Some(publisher) = &slot.publisher {
                        publisher.publish_scores(&scores);
                    }
                    let events = engine.process(&scores);
                    slot.publish(events);
                }
                Err(_) => results_open = false,
            },
            recv(if notices_open { notices.clone() } else { crossbeam_channel::never() }) -> message => match message {
                Ok(Notice::Status { source, status }) => {
                    if let Some(publisher) = &slot.publisher {
                        publisher.set_source_status(&source, status);
                    }
                }
                Ok(Notice::SourceDone { source }) => slot.publish(engine.finish_source(&source)),
                Ok(Notice::Reload(config)) => {
                    slot.publish(engine.set_settings(config.events.clone()));
                    slot.reconfigure(*config);
                }
                Err(_) => notices_open = false,
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
