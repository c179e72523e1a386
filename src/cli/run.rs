//! `mbt-edge check-config` and `mbt-edge run`.
//!
//! `run` wires the stages: capture and the window stage on this thread, the inference worker
//! on its own, and an events thread that owns the event engine and the publisher (statuses
//! reach it over a channel, so the publisher has one owner and shuts down cleanly).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, bounded, select, unbounded};
use serde_json::{Map, Value, json};

use crate::capture::SourceStatus;
use crate::daemon::{self, Failure, Sources, exit};
use crate::events::{EventEngine, WindowScores};
use crate::infer::{self, ScoredWindow, WindowQueue};
use crate::model::ModelRuntime;
use crate::publish::{self, Publisher, PublisherInfo};
use crate::service::{Health, HealthInput, HealthSettings, Notifier, SourceActivity, Verdict};
use crate::stage::StageOutput;
use crate::telemetry;

/// Validates config and model; prints a one-line summary.
pub fn check_config(config: &Path) -> Result<(), Failure> {
    let prepared = daemon::prepare(config)?;
    let model = &prepared.model;
    println!(
        "{}: ok; model {} ({} labels, sha256 {}), window {:?} every {:?}, {} source(s)",
        config.display(),
        model.name(),
        model.metadata.labels.len(),
        &model.sha256[..12],
        prepared.window_length,
        prepared.settings.window.hop,
        prepared.settings.sources.len()
    );
    Ok(())
}

/// What the main thread tells the events thread besides scores.
enum Notice {
    Status { source: String, status: SourceStatus },
    SourceDone { source: String },
}

/// The daemon: runs until SIGTERM/SIGINT, or until every source (files) has ended.
pub fn run(config: &Path) -> Result<(), Failure> {
    let prepared = daemon::prepare(config)?;
    let settings = &prepared.settings;
    let model = &prepared.model;
    let stop = daemon::stop_flag().map_err(Failure::other)?;
    let runtime = ModelRuntime::load(model, settings.model.runtime, settings.model.threads).map_err(Failure::config)?;
    tracing::info!(
        model = model.name(),
        sha256 = &model.sha256[..12],
        runtime = %runtime.backend_name(),
        threads = settings.model.threads,
        "model loaded"
    );

    let labels = model.metadata.labels.clone();
    let enabled_labels = labels
        .iter()
        .filter(|label| settings.events.per_label.get(*label).is_none_or(|label_settings| label_settings.enabled))
        .cloned()
        .collect();
    let info = PublisherInfo {
        sources: settings.sources.iter().map(|source| source.name.clone()).collect(),
        labels: labels.clone(),
        enabled_labels,
        model: publish::ModelInfo { name: model.name().to_string(), sha256: model.sha256.clone() },
    };
    let publisher = Publisher::start(settings.mqtt.clone(), settings.spool.clone(), info)
        .map_err(|err| Failure { code: exit::CANT_CREATE, error: anyhow::anyhow!("starting the publisher: {err}") })?;

    let (results_tx, results) = bounded::<ScoredWindow>(64);
    let capacity = settings.model.max_batch * 2;
    let (queue, worker) =
        infer::spawn(runtime, model.metadata.clone(), settings.model.max_batch, capacity, false, results_tx)
            .map_err(Failure::config)?;
    let (notices_tx, notices) = unbounded::<Notice>();
    let engine = EventEngine::new(settings.events.clone(), labels, model.metadata.multi_label);
    let events_thread = std::thread::Builder::new()
        .name("events".into())
        .spawn(move || events_loop(engine, publisher, results, notices))
        .map_err(Failure::other)?;

    let mut sources = Sources::start(&prepared, &settings.sources, true).map_err(Failure::other)?;
    tracing::info!(sources = settings.sources.len(), "running");
    let liveness = Arc::new(Liveness::new(settings.sources.iter().map(|source| source.name.clone())));
    let notifier = Notifier::from_env();
    if let Err(err) = notifier.ready_with_status(&format!("starting {} source(s)", settings.sources.len())) {
        tracing::warn!(error = %err, "sd_notify READY failed");
    }
    let watchdog_stop = Arc::new(AtomicBool::new(false));
    let watchdog = spawn_watchdog(notifier, liveness.clone(), queue.clone(), capacity, watchdog_stop.clone());
    sources.run(&stop, |stage, output| match output {
        StageOutput::Window(window) => {
            liveness.window(&window.source);
            queue.push(window)
        }
        StageOutput::Status { source_idx, status, detail } => {
            let source = stage.source_name(source_idx).to_string();
            tracing::info!(source, status = status.as_str(), detail, "source status");
            liveness.status(&source, status);
            let _ = notices_tx.send(Notice::Status { source, status });
        }
        StageOutput::Finished { source_idx } => {
            let source = stage.source_name(source_idx).to_string();
            tracing::info!(source, "source finished");
            let _ = notices_tx.send(Notice::SourceDone { source });
        }
        StageOutput::Failed { source_idx, message } => {
            let source = stage.source_name(source_idx).to_string();
            tracing::error!(source, message, "source failed and will not be retried");
            let _ = notices_tx.send(Notice::SourceDone { source });
        }
    });
    tracing::info!(signal = stop.load(Ordering::SeqCst), "stopping");
    let _ = notifier.stopping();
    watchdog_stop.store(true, Ordering::SeqCst);
    if let Some(watchdog) = watchdog {
        let _ = watchdog.join();
    }
    sources.stop();
    // The worker finishes the windows in flight, then the events thread drains its results.
    drop(queue);
    let _ = worker.join();
    drop(notices_tx);
    let _ = events_thread.join();
    tracing::info!("stopped");
    Ok(())
}

/// What the watchdog needs to judge health: when each source last gave a window, its status.
struct Liveness {
    sources: Mutex<BTreeMap<String, (Option<Instant>, SourceStatus)>>,
}

impl Liveness {
    fn new(names: impl Iterator<Item = String>) -> Liveness {
        Liveness { sources: Mutex::new(names.map(|name| (name, (None, SourceStatus::Offline))).collect()) }
    }

    fn window(&self, source: &str) {
        if let Some(entry) = self.sources.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get_mut(source) {
            entry.0 = Some(Instant::now());
        }
    }

    fn status(&self, source: &str, status: SourceStatus) {
        if let Some(entry) = self.sources.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get_mut(source) {
            entry.1 = status;
        }
    }
}

/// Pings systemd's watchdog only while the daemon is healthy (windows flowing from at least
/// one source, inference keeping up) and keeps `STATUS=` current. Nothing to do without
/// `WatchdogSec` / `NOTIFY_SOCKET`.
fn spawn_watchdog(
    notifier: Notifier,
    liveness: Arc<Liveness>,
    queue: WindowQueue,
    capacity: usize,
    stop: Arc<AtomicBool>,
) -> Option<std::thread::JoinHandle<()>> {
    if !notifier.is_enabled() {
        return None;
    }
    let period = notifier.watchdog_ping_period().unwrap_or(Duration::from_secs(5)).min(Duration::from_secs(5));
    let pings = notifier.watchdog_ping_period().is_some();
    std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            let ready_since = Instant::now();
            let mut health = Health::new(HealthSettings::default());
            let mut last_verdict_healthy = true;
            while !stop.load(Ordering::SeqCst) {
                let snapshot = liveness.sources.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
                let activity: Vec<SourceActivity<'_>> = snapshot
                    .iter()
                    .map(|(source, (last_window, _))| SourceActivity { source, last_window: *last_window })
                    .collect();
                let input = HealthInput {
                    now: Instant::now(),
                    ready_since,
                    sources: &activity,
                    queue_depth: queue.depth(),
                    queue_capacity: capacity,
                    last_inference: crate::telemetry::last_inference(),
                    stages: &[],
                };
                let verdict = health.check(&input);
                let states: Vec<String> =
                    snapshot.iter().map(|(source, (_, status))| format!("{source} {}", status.as_str())).collect();
                match &verdict {
                    Verdict::Healthy => {
                        if pings {
                            let _ = notifier.watchdog();
                        }
                        let _ = notifier.status(&format!("healthy; {}", states.join(", ")));
                        if !last_verdict_healthy {
                            tracing::info!("healthy again; watchdog pings resume");
                        }
                    }
                    Verdict::Unhealthy(problem) => {
                        let _ = notifier.status(&format!("unhealthy: {problem}; {}", states.join(", ")));
                        if last_verdict_healthy {
                            tracing::warn!(problem = %problem, "unhealthy; watchdog pings stop");
                        }
                    }
                }
                last_verdict_healthy = verdict.is_healthy();
                let until = Instant::now() + period;
                while Instant::now() < until && !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        })
        .ok()
}

/// Owns the event engine and the publisher until both input channels close.
fn events_loop(
    mut engine: EventEngine,
    publisher: Publisher,
    results: Receiver<ScoredWindow>,
    notices: Receiver<Notice>,
) {
    let mut results_open = true;
    let mut notices_open = true;
    let mut last_stats = Instant::now();
    let publish = |publisher: &Publisher, events: Vec<crate::events::Event>| {
        for event in events {
            if let Err(err) = publisher.publish_event(&event) {
                tracing::error!(error = %err, label = event.label, "event could not be spooled");
            }
        }
    };
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
                    publisher.publish_scores(&scores);
                    let events = engine.process(&scores);
                    publish(&publisher, events);
                }
                Err(_) => results_open = false,
            },
            recv(if notices_open { notices.clone() } else { crossbeam_channel::never() }) -> message => match message {
                Ok(Notice::Status { source, status }) => publisher.set_source_status(&source, status),
                Ok(Notice::SourceDone { source }) => publish(&publisher, engine.finish_source(&source)),
                Err(_) => notices_open = false,
            },
            default(Duration::from_secs(1)) => {}
        }
        if last_stats.elapsed() >= Duration::from_secs(5) {
            last_stats = Instant::now();
            publisher.set_runtime_stats(runtime_stats());
        }
    }
    // Open events end with the daemon, so consumers never wait for an `end` that won't come.
    for source in engine.sources_with_open_events() {
        publish(&publisher, engine.finish_source(&source));
    }
    publisher.set_runtime_stats(runtime_stats());
    publisher.shutdown(Duration::from_secs(5));
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
