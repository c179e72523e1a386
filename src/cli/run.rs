//! `mbt-edge check-config` and `mbt-edge run`.
//!
//! `run` wires the stages: capture and the window stage on this thread, the inference worker
//! on its own, an events thread that owns the event engine and the publisher (statuses reach
//! it over a channel, so the publisher has one owner and shuts down cleanly), a health thread
//! (systemd's watchdog and `STATUS=`, the verdict `/health` answers) and the metrics server.
//!
//! SIGHUP reloads the config on this thread between two rounds of the window stage: sources
//! whose settings changed restart alone, the others keep running; event settings, MQTT and
//! spool settings go to the events thread, which applies them without touching capture. A
//! config that does not validate, or that changes the model, is refused and the running one
//! stays.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded, select, unbounded};
use serde_json::{Map, Value, json};

use crate::capture::SourceStatus;
use crate::daemon::{self, Failure, Prepared, Sources, exit};
use crate::events::{Event, EventEngine, EventKind, EventSettings, WindowScores};
use crate::infer::{self, ScoredWindow, WindowQueue};
use crate::model::ModelRuntime;
use crate::publish::{self, MqttSettings, Publisher, PublisherInfo, SpoolSettings};
use crate::service::{
    EventCount, Health, HealthInput, HealthSettings, LatencyHistogram, MetricsServer, MetricsSnapshot, Notifier,
    SourceActivity, SourceMetrics, Verdict,
};
use crate::stage::{StageOutput, WindowStage};
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
    Reload(Box<PublishConfig>),
}

/// What the events thread runs with; replaced as a whole on reload.
#[derive(Debug, Clone, PartialEq)]
struct PublishConfig {
    events: EventSettings,
    mqtt: MqttSettings,
    spool: SpoolSettings,
    info: PublisherInfo,
}

impl PublishConfig {
    fn of(prepared: &Prepared) -> PublishConfig {
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
    fn publisher_differs(&self, other: &PublishConfig) -> bool {
        self.mqtt != other.mqtt || self.spool != other.spool || self.info != other.info
    }

    fn start_publisher(&self) -> Result<Publisher, publish::PublishError> {
        Publisher::start(self.mqtt.clone(), self.spool.clone(), self.info.clone())
    }
}

/// The daemon: runs until SIGTERM/SIGINT, or until every source (files) has ended.
pub fn run(config: &Path) -> Result<(), Failure> {
    let mut prepared = daemon::prepare(config)?;
    let stop = daemon::stop_flag().map_err(Failure::other)?;
    let reload = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, reload.clone()).map_err(Failure::other)?;
    let settings = prepared.settings.clone();
    let model = &prepared.model;
    let runtime = ModelRuntime::load(model, settings.model.runtime, settings.model.threads).map_err(Failure::config)?;
    tracing::info!(
        model = model.name(),
        sha256 = &model.sha256[..12],
        runtime = %runtime.backend_name(),
        threads = settings.model.threads,
        "model loaded"
    );

    let publish_config = PublishConfig::of(&prepared);
    let publisher = publish_config
        .start_publisher()
        .map_err(|err| Failure { code: exit::CANT_CREATE, error: anyhow::anyhow!("starting the publisher: {err}") })?;

    let (results_tx, results) = bounded::<ScoredWindow>(64);
    let capacity = settings.model.max_batch * 2;
    let (queue, worker) =
        infer::spawn(runtime, model.metadata.clone(), settings.model.max_batch, capacity, false, results_tx)
            .map_err(Failure::config)?;
    let state = Arc::new(DaemonState::new(settings.sources.iter().map(|source| source.name.clone()), capacity));
    let (notices_tx, notices) = unbounded::<Notice>();
    let engine = EventEngine::new(settings.events.clone(), model.metadata.labels.clone(), model.metadata.multi_label);
    let events_thread = {
        let state = state.clone();
        std::thread::Builder::new()
            .name("events".into())
            .spawn(move || events_loop(engine, publisher, publish_config, results, notices, &state))
            .map_err(Failure::other)?
    };
    let metrics = settings.metrics.listen.and_then(|address| start_metrics(address, &state, &queue, &stop));

    let mut sources = Sources::start(&prepared, &settings.sources, true).map_err(Failure::other)?;
    tracing::info!(sources = settings.sources.len(), "running");
    let notifier = Notifier::from_env();
    let health_stop = Arc::new(AtomicBool::new(false));
    let mut health = None;
    let starting = Instant::now();
    let mut sink = |stage: &WindowStage, output: StageOutput| match output {
        StageOutput::Window(window) => {
            state.window(&window.source);
            queue.push(window)
        }
        StageOutput::Status { source_idx, status, detail } => {
            let source = stage.source_name(source_idx).to_string();
            tracing::info!(source, status = status.as_str(), detail, "source status");
            state.status(&source, status);
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
    };
    // READY=1 once every source is playing or has failed and waits in backoff (it reported a
    // first status), or after READY_TIMEOUT; the health thread (watchdog pings) starts then.
    let is_ready = || state.all_reported() || starting.elapsed() >= READY_TIMEOUT;
    loop {
        let ready_sent = health.is_some();
        sources.run_until(
            || stop.load(Ordering::SeqCst) || reload.load(Ordering::SeqCst) || (!ready_sent && is_ready()),
            &mut sink,
        );
        if !ready_sent && !stop.load(Ordering::SeqCst) && is_ready() {
            let states = state.describe();
            if let Err(err) = notifier.ready_with_status(&format!("started; {states}")) {
                tracing::warn!(error = %err, "sd_notify READY failed");
            }
            health = Some(spawn_health(notifier, state.clone(), queue.clone(), health_stop.clone()));
            continue;
        }
        if stop.load(Ordering::SeqCst) || !reload.swap(false, Ordering::SeqCst) {
            break;
        }
        let _ = notifier.reloading();
        match apply_reload(config, &mut prepared, &mut sources, &state, &notices_tx, &mut sink) {
            Ok(summary) => tracing::info!(config = %config.display(), "{summary}"),
            Err(reason) => {
                tracing::warn!(config = %config.display(), "reload refused: {reason}; the running configuration stays")
            }
        }
        let _ = notifier.ready();
    }
    tracing::info!(signal = stop.load(Ordering::SeqCst), "stopping");
    let _ = notifier.stopping();
    health_stop.store(true, Ordering::SeqCst);
    if let Some(Some(health)) = health {
        let _ = health.join();
    }
    sources.stop();
    // The worker finishes the windows in flight, then the events thread drains its results.
    drop(queue);
    let _ = worker.join();
    drop(notices_tx);
    let _ = events_thread.join();
    if let Some(metrics) = metrics {
        metrics.stop();
    }
    tracing::info!("stopped");
    Ok(())
}

/// Reads the config again and applies it; `Err` says why nothing was applied.
fn apply_reload(
    config: &Path,
    current: &mut Prepared,
    sources: &mut Sources,
    state: &DaemonState,
    notices: &Sender<Notice>,
    sink: &mut impl FnMut(&WindowStage, StageOutput),
) -> Result<String, String> {
    tracing::info!(config = %config.display(), "SIGHUP: reloading the configuration");
    let new = daemon::prepare(config).map_err(|failure| format!("{:#}", failure.error))?;
    if new.settings.model != current.settings.model || new.model.sha256 != current.model.sha256 {
        return Err("[model] or the model file changed; restart the daemon to load another model".into());
    }
    let changes = sources
        .reconfigure(&new, &new.settings.sources, &mut *sink)
        .map_err(|err| format!("restarting sources: {err:#}"))?;
    for source in &changes.removed {
        let _ = notices.send(Notice::SourceDone { source: source.clone() });
    }
    state.set_sources(new.settings.sources.iter().map(|source| source.name.clone()));
    let old_publish = PublishConfig::of(current);
    let new_publish = PublishConfig::of(&new);
    let events_changed = old_publish.events != new_publish.events;
    let publisher_changed = old_publish.publisher_differs(&new_publish);
    let _ = notices.send(Notice::Reload(Box::new(new_publish)));
    if new.settings.log_level != current.settings.log_level {
        tracing::warn!("[log] level changes apply at the next start");
    }
    *current = new;
    Ok(format!(
        "reloaded: sources unchanged {:?}, restarted {:?}, added {:?}, removed {:?}; events {}; mqtt/spool {}",
        changes.unchanged,
        changes.restarted,
        changes.added,
        changes.removed,
        if events_changed { "changed" } else { "unchanged" },
        if publisher_changed { "changed (publisher restarted)" } else { "unchanged" },
    ))
}

/// What the health thread and the metrics endpoint read: each source's last window and
/// status (in config order), the publisher's gauges and the last health verdict.
struct DaemonState {
    sources: Mutex<Vec<SourceState>>,
    /// Since when the current sources run (start or last reload): a first window is not
    /// expected before this.
    ready_since: Mutex<Instant>,
    publisher: Mutex<PublisherGauges>,
    health: Mutex<Result<(), String>>,
    queue_capacity: usize,
}

#[derive(Debug, Clone)]
struct SourceState {
    name: String,
    last_window: Option<Instant>,
    status: SourceStatus,
    /// A first status came from capture: playing, or failed and in backoff.
    reported: bool,
}

/// The longest wait for every source's first status before READY=1.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, Default)]
struct PublisherGauges {
    connected: bool,
    spool_events: u64,
    spool_bytes: u64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl DaemonState {
    fn new(names: impl Iterator<Item = String>, queue_capacity: usize) -> DaemonState {
        let state = DaemonState {
            sources: Mutex::new(Vec::new()),
            ready_since: Mutex::new(Instant::now()),
            publisher: Mutex::new(PublisherGauges::default()),
            health: Mutex::new(Ok(())),
            queue_capacity,
        };
        state.set_sources(names);
        state
    }

    /// The sources now configured; those already known keep their state.
    fn set_sources(&self, names: impl Iterator<Item = String>) {
        let mut sources = lock(&self.sources);
        let old = std::mem::take(&mut *sources);
        *sources = names
            .map(|name| match old.iter().find(|source| source.name == name) {
                Some(known) => known.clone(),
                None => SourceState { name, last_window: None, status: SourceStatus::Offline, reported: false },
            })
            .collect();
        *lock(&self.ready_since) = Instant::now();
    }

    fn window(&self, source: &str) {
        if let Some(entry) = lock(&self.sources).iter_mut().find(|entry| entry.name == source) {
            entry.last_window = Some(Instant::now());
        }
    }

    fn status(&self, source: &str, status: SourceStatus) {
        if let Some(entry) = lock(&self.sources).iter_mut().find(|entry| entry.name == source) {
            entry.status = status;
            entry.reported = true;
        }
    }

    fn all_reported(&self) -> bool {
        lock(&self.sources).iter().all(|source| source.reported)
    }

    /// `name status, ...` for `STATUS=` lines.
    fn describe(&self) -> String {
        describe_sources(&lock(&self.sources))
    }
}

fn describe_sources(sources: &[SourceState]) -> String {
    sources.iter().map(|source| format!("{} {}", source.name, source.status.as_str())).collect::<Vec<_>>().join(", ")
}

/// Starts the metrics and health endpoint; a failure to bind is logged, not fatal (the daemon's
/// job is events, not metrics).
fn start_metrics(
    address: std::net::SocketAddr,
    state: &Arc<DaemonState>,
    queue: &WindowQueue,
    stop: &Arc<AtomicBool>,
) -> Option<MetricsServer> {
    let metrics_state = state.clone();
    let queue = queue.clone();
    let health_state = state.clone();
    let server = MetricsServer::start(
        address,
        stop.clone(),
        move || crate::service::render(&metrics_snapshot(&metrics_state, queue.depth())),
        move || lock(&health_state.health).clone(),
    );
    match server {
        Ok(server) => {
            tracing::info!(address = %server.local_addr(), "metrics and health endpoint listening");
            Some(server)
        }
        Err(err) => {
            tracing::warn!(address = %address, error = %err, "metrics endpoint not started ([metrics] listen)");
            None
        }
    }
}

/// Everything `/metrics` shows, read from telemetry and the daemon's state.
fn metrics_snapshot(state: &DaemonState, queue_depth: usize) -> MetricsSnapshot {
    let counters = telemetry::snapshot();
    let now = Instant::now();
    let sources = lock(&state.sources)
        .iter()
        .map(|source| {
            let counters = counters.get(&source.name).cloned().unwrap_or_default();
            let (video_fps, audio_rate_hz) = counters.rates_at(now);
            SourceMetrics {
                source: source.name.clone(),
                video_fps,
                audio_rate_hz,
                av_skew_seconds: counters.last_av_skew_seconds,
                windows_built: counters.windows_built,
                windows_dropped: counters.windows_dropped,
                restarts: counters.restarts,
            }
        })
        .collect();
    let inference = telemetry::inference();
    let publisher = *lock(&state.publisher);
    MetricsSnapshot {
        sources,
        inference_latency: LatencyHistogram {
            bounds_seconds: telemetry::LATENCY_BOUNDS.to_vec(),
            cumulative_counts: inference.latency_buckets.to_vec(),
            sum_seconds: inference.inference_seconds,
            count: inference.batches,
        },
        queue_depth,
        queue_capacity: state.queue_capacity,
        events: telemetry::events_started()
            .into_iter()
            .map(|((source, label), count)| EventCount { source, label, count })
            .collect(),
        mqtt_connected: publisher.connected,
        spool_events: publisher.spool_events,
        spool_bytes: publisher.spool_bytes,
    }
}

/// Judges health every second: keeps the verdict for `/health`, pings systemd's watchdog only
/// while healthy (windows flowing from at least one source, inference keeping up) and keeps
/// `STATUS=` current.
fn spawn_health(
    notifier: Notifier,
    state: Arc<DaemonState>,
    queue: WindowQueue,
    stop: Arc<AtomicBool>,
) -> Option<std::thread::JoinHandle<()>> {
    let period = notifier.watchdog_ping_period().unwrap_or(Duration::from_secs(1)).min(Duration::from_secs(1));
    let pings = notifier.watchdog_ping_period().is_some();
    let spawned = std::thread::Builder::new().name("health".into()).spawn(move || {
        let mut health = Health::new(HealthSettings::default());
        let mut last_verdict_healthy = true;
        while !stop.load(Ordering::SeqCst) {
            let snapshot = lock(&state.sources).clone();
            let activity: Vec<SourceActivity<'_>> = snapshot
                .iter()
                .map(|source| SourceActivity { source: &source.name, last_window: source.last_window })
                .collect();
            let input = HealthInput {
                now: Instant::now(),
                ready_since: *lock(&state.ready_since),
                sources: &activity,
                queue_depth: queue.depth(),
                queue_capacity: state.queue_capacity,
                last_inference: telemetry::last_inference(),
                stages: &[],
            };
            let verdict = health.check(&input);
            let states = describe_sources(&snapshot);
            match &verdict {
                Verdict::Healthy => {
                    *lock(&state.health) = Ok(());
                    if pings {
                        let _ = notifier.watchdog();
                    }
                    let _ = notifier.status(&format!("healthy; {states}"));
                    if !last_verdict_healthy {
                        tracing::info!("healthy again; watchdog pings resume");
                    }
                }
                Verdict::Unhealthy(problem) => {
                    *lock(&state.health) = Err(problem.to_string());
                    let _ = notifier.status(&format!("unhealthy: {problem}; {states}"));
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
    });
    match spawned {
        Ok(handle) => Some(handle),
        Err(err) => {
            tracing::error!(error = %err, "health thread not started: no watchdog pings, /health stays ok");
            None
        }
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
fn events_loop(
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
