//! The configuration file: `config.toml` parsed by serde into [`RawConfig`] (a mirror of the
//! file whose doc comments are the user documentation) and validated once into typed
//! [`Settings`] (durations, sample counts, thresholds in range).
//!
//! Every error names the file, line, column and dotted key and says what is allowed; unknown
//! keys are errors. This module reads the file and nothing else: it does not open the model
//! or a device (`check-config` does that on top).

mod events;
mod evidence;
mod mqtt;
mod raw;
mod units;
mod validate;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use events::RawEvents;
pub use evidence::{EvidenceSettings, SourceEvidence};
pub use mqtt::PASSWORD_ENV;
pub use raw::RawConfig;
pub use units::{RawBytes, RawDuration, parse_bytes, parse_duration};

use crate::delivery::{MqttSettings, SpoolSettings};
use crate::events::EventSettings;

/// Default location of the configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/mbt-edge/config.toml";

/// A configuration error with its position in the file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", self.render())]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line and column; `None` when the error is not about one place (unreadable file).
    pub line_column: Option<(usize, usize)>,
    /// Dotted key, e.g. `source[1].kind` or `window.hop`; empty for the whole file.
    pub key: String,
    pub message: String,
}

impl ConfigError {
    fn render(&self) -> String {
        let mut out = self.file.display().to_string();
        if let Some((line, column)) = self.line_column {
            out.push_str(&format!(":{line}:{column}"));
        }
        if !self.key.is_empty() {
            out.push_str(&format!(": key `{}`", self.key));
        }
        out.push_str(": ");
        out.push_str(&self.message);
        out
    }
}

/// A validation error before it is placed in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    /// Dotted key, e.g. `events.labels.dog.threshold`.
    pub key: String,
    /// Byte span of the offending value (or key) in the file, when known.
    pub span: Option<Range<usize>>,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl FieldError {
    pub fn new(key: impl Into<String>, span: Option<Range<usize>>, message: impl Into<String>) -> Self {
        Self { key: key.into(), span, message: message.into() }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub file: PathBuf,
    pub device_id: String,
    pub model: ModelSettings,
    pub window: WindowConfig,
    pub sources: Vec<SourceSettings>,
    pub log_level: Option<String>,
    pub events: EventSettings,
    /// `[events]` as written, to check its label names against the model once it is read.
    pub events_raw: RawEvents,
    pub mqtt: MqttSettings,
    pub spool: SpoolSettings,
    pub metrics: MetricsSettings,
    /// `[device] state_dir`: the daemon's own state (run-time controls).
    pub state_dir: PathBuf,
    pub evidence: EvidenceSettings,
}

/// `[metrics]`: where the HTTP server (page, API, metrics, health) listens; `None` when
/// disabled; and the token clients must send, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsSettings {
    pub listen: Option<std::net::SocketAddr>,
    pub token: Option<String>,
}

/// The endpoint's address when `[metrics] listen` is not set.
pub const DEFAULT_METRICS_LISTEN: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9464);

#[derive(Debug, Clone, PartialEq)]
pub struct ModelSettings {
    /// Resolved against the config file's folder when relative.
    pub path: PathBuf,
    pub runtime: Runtime,
    pub threads: usize,
    /// Windows run together as one batch at most (several sources).
    pub max_batch: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Auto,
    Cpu,
    Cuda,
}

/// `[window]`: how windows are cut. `seconds` defaults to the model's window.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowConfig {
    pub seconds: Option<Duration>,
    pub hop: Duration,
    /// How far ahead of the window being built one modality may run before the other is
    /// declared late (a file source's decoder delivers audio seconds ahead of video).
    pub max_lead: Duration,
    /// How long the window builder waits for a lagging modality of a live source before it
    /// emits the window with the gap filled and marked degraded.
    pub max_wait: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SourceSettings {
    pub name: String,
    pub kind: SourceKind,
    pub video: bool,
    pub audio: bool,
    pub restart: RestartSettings,
    /// Cap on the captured frame rate (videorate); `None` keeps the source's rate.
    pub max_fps: Option<u32>,
    /// Snapshots and clips of this source's events.
    pub evidence: SourceEvidence,
}

/// How a failed live source is brought back.
#[derive(Debug, Clone, PartialEq)]
pub struct RestartSettings {
    /// No buffer for this long on an enabled modality counts as a failure.
    pub stall_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SourceKind {
    V4l2 { video_device: String, video_caps: Option<String>, audio_device: Option<String> },
    Alsa { audio_device: String },
    Pulse { audio_device: Option<String> },
    Rtsp { url: String, latency: Duration, protocols: Option<String> },
    Uri { uri: String },
    Test(TestSource),
    Pipeline { video_pipeline: Option<String>, audio_pipeline: Option<String>, live: bool },
}

impl SourceKind {
    pub fn name(&self) -> &'static str {
        match self {
            SourceKind::V4l2 { .. } => "v4l2",
            SourceKind::Alsa { .. } => "alsa",
            SourceKind::Pulse { .. } => "pulse",
            SourceKind::Rtsp { .. } => "rtsp",
            SourceKind::Uri { .. } => "uri",
            SourceKind::Test(_) => "test",
            SourceKind::Pipeline { .. } => "pipeline",
        }
    }

    /// Files end; everything else is live and is restarted when it ends.
    pub fn is_live(&self) -> bool {
        match self {
            SourceKind::Uri { uri } => !is_file_like_uri(uri),
            SourceKind::Test(test) => test.is_live,
            SourceKind::Pipeline { live, .. } => *live,
            _ => true,
        }
    }
}

fn is_file_like_uri(uri: &str) -> bool {
    !(uri.starts_with("rtsp://")
        || uri.starts_with("rtsps://")
        || uri.starts_with("udp://")
        || uri.starts_with("srt://"))
}

/// `kind = "test"`: GStreamer's videotestsrc and audiotestsrc.
#[derive(Debug, Clone, PartialEq)]
pub struct TestSource {
    pub pattern: String,
    pub wave: String,
    pub freq: f64,
    pub volume: f64,
    pub is_live: bool,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub sample_rate: u32,
    /// Extra properties for videotestsrc / audiotestsrc, `name=value` separated by spaces.
    pub video_extra: String,
    pub audio_extra: String,
    /// Ends the source (EOS) after this long; `None` runs forever.
    pub duration: Option<Duration>,
}

impl Settings {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        Self::from_toml_str(path, &read_text(path)?)
    }

    /// Parses and validates the text of a configuration file named `path`.
    pub fn from_toml_str(path: &Path, text: &str) -> Result<Settings, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|err| serde_error(path, text, &err))?;
        validate::validate(path, raw).map_err(|err| place(path, text, err))
    }

    pub fn source(&self, name: &str) -> Option<&SourceSettings> {
        self.sources.iter().find(|source| source.name == name)
    }
}

/// Reads the configuration file's text.
pub fn read_text(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|err| ConfigError {
        file: path.to_path_buf(),
        line_column: None,
        key: String::new(),
        message: format!("cannot read the file: {err}"),
    })
}

/// Turns a validation error into a positioned one.
pub fn place(path: &Path, text: &str, err: FieldError) -> ConfigError {
    ConfigError {
        file: path.to_path_buf(),
        line_column: err.span.map(|span| line_column(text, span.start)),
        key: err.key,
        message: err.message,
    }
}

fn serde_error(path: &Path, text: &str, err: &toml::de::Error) -> ConfigError {
    let span = err.span();
    let key = span.as_ref().map(|span| key_at(text, span.start)).unwrap_or_default();
    let mut message = err.message().trim().to_string();
    if let Some(rest) = message.strip_prefix("unknown field `") {
        // "unknown field `x`, expected one of `a`, `b`" reads better with "allowed:".
        if let Some((field, expected)) = rest.split_once("`, expected ") {
            message = format!("unknown key `{field}`; allowed: {}", expected.trim_start_matches("one of "));
        }
    }
    ConfigError { file: path.to_path_buf(), line_column: span.map(|span| line_column(text, span.start)), key, message }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..text.floor_char_boundary(offset)];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    (line, column)
}

/// Every key of the file with its dotted path (`source[1].kind`), the span of the key and
/// the span of its value; array items are entries too (`source[1]`, spanning their header).
/// Empty when the text is not TOML.
fn spanned_entries(text: &str) -> Vec<(String, Range<usize>, Range<usize>)> {
    use toml::de::{DeTable, DeValue};
    type Entries = Vec<(String, Range<usize>, Range<usize>)>;
    fn walk_table(table: &DeTable<'_>, prefix: &str, out: &mut Entries) {
        for (key, value) in table.iter() {
            let path =
                if prefix.is_empty() { key.get_ref().to_string() } else { format!("{prefix}.{}", key.get_ref()) };
            out.push((path.clone(), key.span(), value.span()));
            walk_value(value.get_ref(), &path, out);
        }
    }
    fn walk_value(value: &DeValue<'_>, path: &str, out: &mut Entries) {
        match value {
            DeValue::Table(table) => walk_table(table, path, out),
            DeValue::Array(array) => {
                for (idx, item) in array.iter().enumerate() {
                    let item_path = format!("{path}[{idx}]");
                    out.push((item_path.clone(), item.span(), item.span()));
                    walk_value(item.get_ref(), &item_path, out);
                }
            }
            _ => {}
        }
    }
    let Ok(root) = DeTable::parse(text) else { return Vec::new() };
    let mut entries = Vec::new();
    walk_table(root.get_ref(), "", &mut entries);
    entries
}

/// The dotted key path of the innermost key or value whose span contains `offset`.
///
/// Table spans cover only their `[header]`, so every entry is visited and the smallest
/// enclosing span wins.
pub fn key_at(text: &str, offset: usize) -> String {
    let contains = |span: &Range<usize>| span.start <= offset && offset < span.end.max(span.start + 1);
    spanned_entries(text)
        .into_iter()
        .flat_map(|(path, key, value)| [(key, path.clone()), (value, path)])
        .filter(|(span, _)| contains(span))
        .min_by_key(|(span, _)| span.len())
        .map(|(_, path)| path)
        .unwrap_or_default()
}

/// The span of dotted `key` in the file, for errors found after parsing. A key the file
/// does not spell out (a default) gets the span of its nearest written parent.
pub fn span_of(text: &str, key: &str) -> Option<Range<usize>> {
    let entries = spanned_entries(text);
    let mut wanted = key;
    loop {
        if let Some((_, key_span, _)) = entries.iter().find(|(path, _, _)| path == wanted) {
            return Some(key_span.clone());
        }
        wanted = &wanted[..wanted.rfind(['.', '['])?];
    }
}

#[cfg(test)]
mod tests;
