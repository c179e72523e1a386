//! `mbt-edge check-config` and `mbt-edge run`: the daemon itself lives in `crate::daemon`.

use std::path::Path;

use crate::daemon::{self, Failure};

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

/// The daemon: runs until SIGTERM/SIGINT, or until every source (files) has ended.
pub fn run(config: &Path) -> Result<(), Failure> {
    daemon::run(config)
}
