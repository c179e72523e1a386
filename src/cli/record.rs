//! `mbt-edge record`: N windows of a configured source, preprocessed exactly as the daemon
//! does, appended to a dataset folder for training.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::daemon::StageOutput;
use crate::daemon::{self, Failure, Sources, exit};
use crate::features::Featurizer;
use crate::record::DatasetWriter;

/// Records `windows` windows (after skipping `skip`) of `source_name` labelled `label` into `out`.
pub fn record(
    config: &Path,
    source_name: &str,
    label: &str,
    out: &Path,
    windows: u64,
    skip: u64,
) -> Result<(), Failure> {
    let prepared = daemon::prepare(config)?;
    let source = prepared.settings.source(source_name).cloned().ok_or_else(|| {
        let names: Vec<&str> = prepared.settings.sources.iter().map(|source| source.name.as_str()).collect();
        Failure::config(anyhow::anyhow!(
            "{}: no [[source]] named {source_name:?}; configured: {}",
            config.display(),
            names.join(", ")
        ))
    })?;
    let mut featurizer = Featurizer::new(&prepared.model.metadata).map_err(Failure::config)?;
    let mut writer = DatasetWriter::open(out, &prepared.model.metadata).map_err(Failure::other)?;
    let stop = daemon::stop_flag().map_err(Failure::other)?;
    let mut sources = Sources::start(&prepared, std::slice::from_ref(&source), false, None).map_err(Failure::other)?;
    let mut video = vec![0.0; featurizer.video_len()];
    let mut audio = vec![0.0; featurizer.audio_len()];
    let (mut seen, mut written) = (0u64, 0u64);
    let mut error: Option<Failure> = None;
    let done = AtomicBool::new(false);
    sources.run(&stop, |_, output| match output {
        StageOutput::Window(window) => {
            seen += 1;
            if seen <= skip || written >= windows || error.is_some() {
                return;
            }
            featurizer.fill(&window, &mut video, &mut audio);
            match writer.write(label, &window, &video, &audio) {
                Ok(_) => written += 1,
                Err(err) => error = Some(Failure::other(err)),
            }
            if written >= windows {
                done.store(true, Ordering::SeqCst);
                stop.store(true, Ordering::SeqCst);
            }
        }
        StageOutput::Failed { message, .. } => {
            error = Some(Failure { code: exit::NO_INPUT, error: anyhow::anyhow!("source {source_name:?}: {message}") });
        }
        StageOutput::Status { .. } | StageOutput::Finished { .. } => {}
    });
    sources.stop();
    if let Some(failure) = error {
        return Err(failure);
    }
    eprintln!("recorded {written} window(s) of source {source_name:?} as {label:?} into {}", out.display());
    if written < windows && !done.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
        eprintln!("the source ended before {windows} windows");
    }
    Ok(())
}
