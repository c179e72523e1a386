//! `mbt-edge classify`: a recorded clip through the daemon's own capture, windowing, features
//! and model, one JSON object per window on stdout, as fast as the machine allows.

use std::io::Write;
use std::path::Path;

use crossbeam_channel::bounded;
use serde::Serialize;
use time::format_description::well_known::Rfc3339;

use crate::config::{RestartSettings, SourceKind, SourceSettings};
use crate::daemon::StageOutput;
use crate::daemon::infer::{self, ScoredWindow};
use crate::daemon::{self, Failure, Sources, exit};
use crate::model::ModelRuntime;

#[derive(Serialize)]
struct Line<'a> {
    source: &'a str,
    window: u64,
    /// Seconds from the start of the clip.
    offset_start: f64,
    offset_end: f64,
    start: String,
    end: String,
    degraded: Option<&'static str>,
    top: Vec<Scored<'a>>,
}

#[derive(Serialize)]
struct Scored<'a> {
    label: &'a str,
    score: f32,
    audio: Option<f32>,
    video: Option<f32>,
}

/// Classifies `input` (a path or any URI uridecodebin reads) and prints a JSON line per window.
pub fn classify(config: &Path, input: &str, top: usize) -> Result<(), Failure> {
    let prepared = daemon::prepare(config)?;
    let uri = if input.contains("://") {
        input.to_string()
    } else {
        let path = Path::new(input);
        if !path.exists() {
            return Err(Failure { code: exit::NO_INPUT, error: anyhow::anyhow!("{input}: no such file") });
        }
        format!("file://{}", std::path::absolute(path).map_err(Failure::other)?.display())
    };
    let source = SourceSettings {
        name: "input".into(),
        kind: SourceKind::Uri { uri },
        video: prepared.model.metadata.video.is_some(),
        audio: prepared.model.metadata.audio.is_some(),
        restart: RestartSettings {
            stall_timeout: std::time::Duration::from_secs(30),
            backoff_initial: std::time::Duration::from_secs(1),
            backoff_max: std::time::Duration::from_secs(1),
        },
        max_fps: None,
        evidence: crate::config::SourceEvidence { enabled: false, ..Default::default() },
    };
    let model = &prepared.model;
    let runtime = ModelRuntime::load(model, prepared.settings.model.runtime, prepared.settings.model.threads)
        .map_err(Failure::config)?;
    // Scored windows go to a printer thread, so the bounded results channel never waits on the
    // window stage (which itself waits on the lossless window queue).
    let (results_tx, results) = bounded::<ScoredWindow>(64);
    let (queue, worker) = infer::spawn(
        runtime,
        model.metadata.clone(),
        prepared.settings.model.max_batch,
        prepared.settings.model.max_batch * 2,
        true,
        results_tx,
    )
    .map_err(Failure::config)?;
    let labels = model.metadata.labels.clone();
    let printer = std::thread::Builder::new()
        .name("print".into())
        .spawn(move || {
            let stdout = std::io::stdout();
            for scored in results {
                let line = line(&scored, &labels, top);
                let mut out = stdout.lock();
                let _ = serde_json::to_writer(&mut out, &line);
                let _ = out.write_all(b"\n");
            }
        })
        .map_err(Failure::other)?;
    let stop = daemon::stop_flag().map_err(Failure::other)?;
    let mut sources = Sources::start(&prepared, std::slice::from_ref(&source), false, None).map_err(Failure::other)?;
    let mut failure = None;
    sources.run(&stop, |_, output| match output {
        StageOutput::Window(window) => queue.push(window),
        StageOutput::Failed { message, .. } => {
            failure = Some(Failure { code: exit::NO_INPUT, error: anyhow::anyhow!("{input}: {message}") });
        }
        StageOutput::Status { .. } | StageOutput::Finished { .. } => {}
    });
    sources.stop();
    // The worker finishes the queued windows and drops its sender; the printer then ends.
    drop(queue);
    let _ = worker.join();
    let _ = printer.join();
    match failure {
        Some(failure) => Err(failure),
        None => Ok(()),
    }
}

fn line<'a>(scored: &'a ScoredWindow, labels: &'a [String], top: usize) -> Line<'a> {
    let mut order: Vec<usize> = (0..scored.fused.len()).collect();
    order.sort_by(|a, b| scored.fused[*b].total_cmp(&scored.fused[*a]));
    let top = order
        .into_iter()
        .take(top.max(1))
        .map(|label_idx| Scored {
            label: labels.get(label_idx).map(String::as_str).unwrap_or("?"),
            score: scored.fused[label_idx],
            audio: scored.audio.as_ref().map(|audio| audio[label_idx]),
            video: scored.video.as_ref().map(|video| video[label_idx]),
        })
        .collect();
    Line {
        source: &scored.source,
        window: scored.index,
        offset_start: scored.start.as_duration().as_secs_f64(),
        offset_end: scored.end.as_duration().as_secs_f64(),
        start: scored.start_utc.format(&Rfc3339).unwrap_or_default(),
        end: scored.end_utc.format(&Rfc3339).unwrap_or_default(),
        degraded: scored.degraded.map(crate::window::Degraded::as_str),
        top,
    }
}
