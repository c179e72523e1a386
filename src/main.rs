//! The `mbt-edge` command line: parses arguments, sets up logging, runs one command and maps
//! its outcome to a sysexits code (78 for a bad config or model, so systemd does not
//! crash-loop on it). No stage logic lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mbt_edge::cli;
use mbt_edge::config::DEFAULT_CONFIG_PATH;
use mbt_edge::daemon::exit;

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
    /// Classify a recorded clip: one JSON object per window on stdout (exit 66: unreadable input).
    Classify {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// A file path or a URI (file://, http://, rtsp://, ...).
        #[arg(long)]
        input: String,
        /// Labels listed per window, best first.
        #[arg(long, default_value_t = 3)]
        top: usize,
    },
    /// Time preprocessing and inference per window on this machine.
    Bench {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Timed inference runs per batch size.
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Batch sizes to time, comma-separated.
        #[arg(long, default_value = "1", value_delimiter = ',')]
        batch: Vec<usize>,
        /// Other model files to time in the same run (same inputs), e.g. an int8 variant.
        #[arg(long = "also")]
        also: Vec<PathBuf>,
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
        Command::Run { config } => cli::run(&config),
        Command::CheckConfig { config } => cli::check_config(&config),
        Command::Classify { config, input, top } => cli::classify(&config, &input, top),
        Command::Bench { config, json, runs, batch, also } => cli::bench(&config, json, runs, &batch, &also),
        Command::Record { config, source, label, out, windows, skip } => {
            cli::record(&config, &source, &label, &out, windows, skip)
        }
    };
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err(failure) => {
            eprintln!("mbt-edge: {:#}", failure.error);
            ExitCode::from(failure.code)
        }
    }
}

fn init_logging(cli_level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    // tract warns at every load that it is "only tested against operator set 9 to 18"; our
    // models use opset 20 for the one `Gelu` op and are checked against PyTorch and
    // onnxruntime in tests/model.rs, so by default only tract_onnx's errors show.
    const DEFAULT: &str = "info,tract_onnx=error";
    let filter = match cli_level {
        Some(level) => EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new(DEFAULT)),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT)),
    };
    // Colours only on a terminal: journald and log files get plain `key=value` text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi)
        .init();
}
