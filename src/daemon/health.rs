//! The health thread (systemd's watchdog and `STATUS=`, the verdict `/health` answers: not ok
//! while the spool cannot write either, though the watchdog goes on) and the
//! metrics endpoint's wiring: both read [`DaemonState`] and the telemetry counters; the
//! verdict itself is `service::Health`'s, the HTTP side `service::MetricsServer`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::infer::WindowQueue;
use super::state::{DaemonState, describe_sources, lock};
use crate::service::{
    EventCount, Health, HealthInput, HealthSettings, LatencyHistogram, MetricsServer, MetricsSnapshot, Notifier,
    SourceActivity, SourceMetrics, Verdict,
};
use crate::telemetry;

/// Starts the metrics and health endpoint; a failure to bind is logged, not fatal (the daemon's
/// job is events, not metrics).
pub(super) fn start_metrics(
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
        move || crate::service::render(&metrics_snapshot(&metrics_state, &queue)),
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
fn metrics_snapshot(state: &DaemonState, queue: &WindowQueue) -> MetricsSnapshot {
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
