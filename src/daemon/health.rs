//! The health thread (systemd's watchdog and `STATUS=`, the verdict `/health` answers: not ok
//! while the spool cannot write either, though the watchdog goes on) and the HTTP server's
//! wiring: both read [`DaemonState`] and the telemetry counters; the verdict itself is
//! `service::Health`'s, the HTTP side `web::WebServer`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::infer::WindowQueue;
use super::state::{DaemonState, SourceState, describe_sources, lock};
use crate::service::{
    EventCount, EvidenceMetrics, Health, HealthInput, HealthSettings, LatencyHistogram, MetricsSnapshot, Notifier,
    SourceActivity, SourceMetrics, Verdict,
};
use crate::telemetry;
use crate::web::{Handlers, SourceView, WebServer};

/// Starts the HTTP server (page, API, metrics, health); a failure to bind is logged, not
/// fatal (the daemon's job is events, not pages).
pub(super) fn start_web(
    address: std::net::SocketAddr,
    token: Option<String>,
    state: &Arc<DaemonState>,
    queue: &WindowQueue,
    about: serde_json::Value,
    evidence: Option<crate::evidence::EvidenceFiles>,
) -> Option<WebServer> {
    let metrics_state = state.clone();
    let queue = queue.clone();
    let health_state = state.clone();
    let sources_state = state.clone();
    let handlers = Handlers {
        metrics: Arc::new(move || crate::service::render(&metrics_snapshot(&metrics_state, &queue))),
        health: Arc::new(move || lock(&health_state.health).clone()),
        sources: Arc::new(move || source_views(&sources_state)),
        about: Arc::new(move || about.clone()),
        evidence: Arc::new(move |id, extension| evidence.as_ref().and_then(|files| files.read(id, extension))),
    };
    match WebServer::start(address, token.clone(), handlers, state.live.clone()) {
        Ok(server) => {
            let page = if token.is_some() { " (token required)" } else { "" };
            tracing::info!(address = %server.local_addr(), "page at http://{}/{page}, metrics and health listening", server.local_addr());
            Some(server)
        }
        Err(err) => {
            tracing::warn!(address = %address, error = %err, "HTTP server not started ([metrics] listen)");
            None
        }
    }
}

/// One value per configured source (config order), made from its state, its telemetry
/// counters and their rates now: what `/api/sources` and `/metrics` both read.
fn per_source<T>(
    state: &DaemonState,
    make: impl Fn(&SourceState, &telemetry::SourceCounters, (f64, f64), Instant) -> T,
) -> Vec<T> {
    let counters = telemetry::snapshot();
    let now = Instant::now();
    lock(&state.sources)
        .iter()
        .map(|source| {
            let counters = counters.get(&source.name).cloned().unwrap_or_default();
            make(source, &counters, counters.rates_at(now), now)
        })
        .collect()
}

/// Each source as `/api/sources` shows it.
fn source_views(state: &DaemonState) -> Vec<SourceView> {
    per_source(state, |source, counters, (video_fps, audio_rate_hz), now| SourceView {
        name: source.name.clone(),
        status: source.status.as_str().to_owned(),
        restarts: counters.restarts,
        windows_built: counters.windows_built,
        windows_dropped: counters.windows_dropped,
        video_fps,
        audio_rate_hz,
        last_window_age_seconds: source.last_window.map(|at| now.duration_since(at).as_secs_f64()),
    })
}

/// Everything `/metrics` shows, read from telemetry and the daemon's state.
fn metrics_snapshot(state: &DaemonState, queue: &WindowQueue) -> MetricsSnapshot {
    let sources = per_source(state, |source, counters, (video_fps, audio_rate_hz), _| SourceMetrics {
        source: source.name.clone(),
        video_fps,
        audio_rate_hz,
        av_skew_seconds: counters.last_av_skew_seconds,
        windows_built: counters.windows_built,
        windows_dropped: counters.windows_dropped,
        restarts: counters.restarts,
    });
    let inference = telemetry::inference();
    let publisher = lock(&state.publisher).clone();
    MetricsSnapshot {
        sources,
        inference_latency: LatencyHistogram {
            bounds_seconds: telemetry::LATENCY_BOUNDS.to_vec(),
            cumulative_counts: inference.latency_buckets.to_vec(),
            sum_seconds: inference.inference_seconds,
            count: inference.batches,
        },
        queue_depth: queue.depth(),
        queue_capacity: queue.capacity(),
        events: telemetry::events_started()
            .into_iter()
            .map(|((source, label), count)| EventCount { source, label, count })
            .collect(),
        mqtt_connected: publisher.connected,
        spool_events: publisher.spool_events,
        spool_bytes: publisher.spool_bytes,
        spool_unwritten: publisher.spool_unwritten,
        spool_unwritable: publisher.spool_unwritable.is_some(),
        evidence: {
            let evidence = telemetry::evidence();
            EvidenceMetrics {
                snapshots: evidence.snapshots,
                clips: evidence.clips,
                failed: evidence.failed,
                deleted: evidence.deleted,
                files: evidence.files,
                bytes: evidence.bytes,
            }
        },
    }
}

/// Judges health every second: keeps the verdict for `/health`, pings systemd's watchdog only
/// while healthy (windows flowing from at least one source, inference keeping up) and keeps
/// `STATUS=` current.
pub(super) fn spawn_health(
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
                queue_capacity: queue.capacity(),
                last_inference: telemetry::last_inference(),
                stages: &[],
            };
            let verdict = health.check(&input);
            let states = describe_sources(&snapshot);
            // A spool whose disk refuses writes is not healthy to look at, but a restart would
            // not help it and would lose the events held in memory: the watchdog goes on.
            let publisher = lock(&state.publisher).clone();
            let spool_problem = publisher.spool_unwritable.map(|reason| {
                format!("spool_unwritable: {} events held in memory ({reason})", publisher.spool_unwritten)
            });
            match &verdict {
                Verdict::Healthy => {
                    *lock(&state.health) = spool_problem.clone().map_or(Ok(()), Err);
                    if pings {
                        let _ = notifier.watchdog();
                    }
                    match &spool_problem {
                        Some(problem) => notifier.status(&format!("degraded: {problem}; {states}")),
                        None => notifier.status(&format!("healthy; {states}")),
                    }
                    .ok();
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
