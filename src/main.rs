//! The `mbt-edge` command line: parses arguments, sets up logging, runs one command and maps
//! its outcome to a sysexits code (78 for a bad config or model, so systemd does not
//! crash-loop on it). No stage logic lives here.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;

use clap::{Parser, Subcommand};
use mbt_edge::config::DEFAULT_CONFIG_PATH;
use mbt_edge::daemon::{self, Failure, Sources, exit};
use mbt_edge::features::Featurizer;
use mbt_edge::record::DatasetWriter;
use mbt_edge::stage::StageOutput;

#[derive(Parser)]
#[command(name = "mbt-edge", version, about = "Audio-visual event detection with a Multimodal Bottleneck Transformer")]
struct Cli {
    /// Log filter in RUST_LOG syntax (e.g. `info`, `mbt_edge=debug`); overrides the config and RUST_LOG.
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The daemon: capture, classify and publish until SIGTERM.
    Run {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Validate the config and the model without starting anything (exit 0 ok, 78 invalid).
    CheckConfig {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Save N windows of model inputs (exactly as the daemon computes them) for training.
    Record {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// The `[[source]]` to record from.
        #[arg(long)]
        source: String,
        /// The label written into the manifest for every window.
        #[arg(long)]
        label: String,
        /// Dataset folder (created; appended to when it holds the same recipe).
        #[arg(long)]
        out: PathBuf,
        /// Windows to save; the command ends after them (or at the end of a file source).
        #[arg(long)]
        windows: u64,
        /// Windows to skip first (e.g. while a live source settles).
        #[arg(long, default_value_t = 0)]
        skip: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_level.as_deref());
    let result = match cli.command {
        Command::Run { config } => run(&config),
        Command::CheckConfig { config } => check_config(&config),
        Command::Record { config, source, label, out, windows, skip } => {
            record(&config, &source, &label, &out, windows, skip)
        }
    };
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err(failure) => {
            tracing::error!("{:#}", failure.error);
            eprintln!("mbt-edge: {:#}", failure.error);
            ExitCode::from(failure.code)
        }
    }
}

fn init_logging(cli_level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match cli_level {
        Some(level) => EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info")),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}

fn check_config(config: &std::path::Path) -> Result<(), Failure> {
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

fn run(config: &std::path::Path) -> Result<(), Failure> {
    let prepared = daemon::prepare(config)?;
    let stop = daemon::stop_flag().map_err(Failure::other)?;
    let mut sources = Sources::start(&prepared, &prepared.settings.sources, true).map_err(Failure::other)?;
    tracing::info!(model = prepared.model.name(), sources = prepared.settings.sources.len(), "running");
    sources.run(&stop, |stage, output| match output {
        StageOutput::Window(window) => {
            tracing::info!(source = %window.source, index = window.index, start = ?window.start_utc, degraded = ?window.degraded, "window");
        }
        StageOutput::Status { source_idx, status, detail } => {
            tracing::info!(source = stage.source_name(source_idx), status = status.as_str(), detail, "source status");
        }
        StageOutput::Finished { source_idx } => tracing::info!(source = stage.source_name(source_idx), "source finished"),
        StageOutput::Failed { source_idx, message } => tracing::error!(source = stage.source_name(source_idx), message, "source failed"),
    });
    tracing::info!(signal = stop.load(Ordering::SeqCst), "stopping");
    sources.stop();
    Ok(())
}

fn record(
    config: &std::path::Path,
    source_name: &str,
    label: &str,
    out: &std::path::Path,
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
    let mut sources = Sources::start(&prepared, std::slice::from_ref(&source), false).map_err(Failure::other)?;
    let mut video = vec![0.0; featurizer.video_len()];
    let mut audio = vec![0.0; featurizer.audio_len()];
    let (mut seen, mut written) = (0u64, 0u64);
    let mut error: Option<Failure> = None;
    let done = std::sync::atomic::AtomicBool::new(false);
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
