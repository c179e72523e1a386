//! The `mbt-edge` command line: parses arguments, sets up logging, runs one command and maps
//! its outcome to a sysexits code (78 for a bad config or model, so systemd does not
//! crash-loop on it). No stage logic lives here.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;

use clap::{Parser, Subcommand};
use mbt_edge::config::DEFAULT_CONFIG_PATH;
use mbt_edge::daemon::{self, Failure, Sources, exit};
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_level.as_deref());
    let result = match cli.command {
        Command::Run { config } => run(&config),
        Command::CheckConfig { config } => check_config(&config),
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
