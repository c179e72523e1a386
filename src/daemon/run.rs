//! The daemon's main thread (`mbt-edge run`): wires the stages and runs the window stage.
//!
//! Capture and the window stage run on this thread, the inference worker on its own, an
//! events thread owns the event engine and the publisher ([`super::events`]), a health thread
//! keeps systemd's watchdog and `STATUS=` and the `/health` verdict ([`super::health`]), and
//! the HTTP server (`crate::web`) answers the page, the API, `/metrics` and `/health`. SIGHUP sets a flag this loop checks between two
//! rounds of the window stage; [`super::reload`] applies the new config.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crossbeam_channel::bounded;

use super::controls::Controls;
use super::events::{self, Notice, PublishConfig};
use super::health;
use super::infer::{self, ScoredWindow};
use super::prepare::{self, Failure, exit};
use super::reload;
use super::sources::{self, Sources};
use super::stage::{StageOutput, WindowStage};
use super::state::{DaemonState, READY_TIMEOUT};
use crate::events::EventEngine;
use crate::evidence::EvidenceStore;
use crate::model::ModelRuntime;
use crate::service::Notifier;

/// Status changes, finished sources and reloads waiting for the events thread: a few per
/// source at a time; the window stage waits (briefly) rather than losing one.
const NOTICES_CAPACITY: usize = 256;

/// The daemon: runs until SIGTERM/SIGINT, or until every source (files) has ended.
pub fn run(config: &Path) -> Result<(), Failure> {
    let mut prepared = prepare::prepare(config)?;
    let stop = sources::stop_flag().map_err(Failure::other)?;
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
    let capacity = infer::queue_capacity(settings.model.max_batch, settings.sources.len());
    let (queue, worker) =
        infer::spawn(runtime, model.metadata.clone(), settings.model.max_batch, capacity, false, results_tx)
            .map_err(Failure::config)?;
    let state = Arc::new(DaemonState::new(settings.sources.iter().map(|source| source.name.clone())));
    let (notices_tx, notices) = bounded::<Notice>(NOTICES_CAPACITY);
    let engine = EventEngine::new(settings.events.clone(), model.metadata.labels.clone(), model.metadata.multi_label);
    let controls = Controls::load(&settings.state_dir);
    let evidence = EvidenceStore::start(settings.evidence.clone(), &settings.sources).map_err(Failure::other)?;
    let events_thread = {
        let state = state.clone();
        let inputs = events::EventsInputs { results, notices, evidence: Some(evidence.client()) };
        std::thread::Builder::new()
            .name("events".into())
            .spawn(move || events::events_loop(engine, publisher, publish_config, controls, inputs, &state))
            .map_err(Failure::other)?
    };
    let about = serde_json::json!({
        "device": settings.mqtt.device_id,
        "model": model.name(),
        "model_sha256": model.sha256,
        "labels": model.metadata.labels,
        "version": env!("CARGO_PKG_VERSION"),
    });
    let web = settings.metrics.listen.and_then(|address| {
        let files = Some(evidence.files());
        health::start_web(address, settings.metrics.token.clone(), &state, &queue, about, files)
    });

    let mut sources =
        Sources::start(&prepared, &settings.sources, true, Some(evidence.media())).map_err(Failure::other)?;
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
            health = Some(health::spawn_health(notifier, state.clone(), queue.clone(), health_stop.clone()));
            continue;
        }
        if stop.load(Ordering::SeqCst) || !reload.swap(false, Ordering::SeqCst) {
            break;
        }
        let _ = notifier.reloading();
        match reload::apply_reload(config, &mut prepared, &mut sources, &state, &notices_tx, &evidence, &mut sink) {
            Ok(summary) => {
                queue.set_capacity(infer::queue_capacity(settings.model.max_batch, prepared.settings.sources.len()));
                tracing::info!(config = %config.display(), "{summary}")
            }
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
    // The HTTP server's handlers hold the queue too: stop it before the worker waits for the
    // last handle.
    if let Some(web) = web {
        web.stop();
    }
    // The worker finishes the windows in flight, then the events thread drains its results.
    drop(queue);
    let _ = worker.join();
    drop(notices_tx);
    let _ = events_thread.join();
    // The events thread ended the open events: their clips are written with what was kept.
    evidence.stop();
    tracing::info!("stopped");
    Ok(())
}
