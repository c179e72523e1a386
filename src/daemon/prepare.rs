//! Config and model, loaded and checked against each other before anything starts
//! ([`prepare`]), and the exit codes every command ends with ([`exit`], [`Failure`]).

use std::path::Path;
use std::time::Duration;

use crate::capture::CaptureFormat;
use crate::config::{self, FieldError, Settings, SourceSettings};
use crate::model::ModelInfo;
use crate::window::WindowSettings;

/// sysexits codes the commands end with.
pub mod exit {
    pub const OK: u8 = 0;
    /// EX_DATAERR: bad command-line usage is clap's 2; a failure inside a run is this.
    pub const FAILURE: u8 = 1;
    /// EX_NOINPUT: an input file cannot be read.
    pub const NO_INPUT: u8 = 66;
    /// EX_CANTCREAT: an output (the spool) cannot be created.
    pub const CANT_CREATE: u8 = 73;
    /// EX_SOFTWARE: an internal error.
    pub const SOFTWARE: u8 = 70;
    /// EX_CONFIG: the configuration or the model is invalid.
    pub const CONFIG: u8 = 78;
}

/// An error with the exit code it ends the process with.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl Failure {
    pub fn config(error: impl Into<anyhow::Error>) -> Self {
        Failure { code: exit::CONFIG, error: error.into() }
    }
    pub fn other(error: impl Into<anyhow::Error>) -> Self {
        Failure { code: exit::FAILURE, error: error.into() }
    }
}

/// Configuration and model, checked against each other.
pub struct Prepared {
    pub settings: Settings,
    pub model: ModelInfo,
    pub window_length: Duration,
}

/// Loads config and model and checks that they fit together (exit 78 otherwise).
pub fn prepare(config_path: &Path) -> Result<Prepared, Failure> {
    let text = config::read_text(config_path).map_err(Failure::config)?;
    let settings = Settings::from_toml_str(config_path, &text).map_err(Failure::config)?;
    // Errors found from here on are about a key of the file as written.
    let located = |key: &str, message: String| {
        Failure::config(config::place(config_path, &text, FieldError::new(key, config::span_of(&text, key), message)))
    };
    let model = ModelInfo::read(&settings.model.path).map_err(|err| located("model.path", err.to_string()))?;
    check_sidecar_sha256(&settings.model.path, &model.sha256).map_err(|message| located("model.path", message))?;
    if let Err(err) = settings.events_raw.check_labels(&model.metadata.labels) {
        return Err(Failure::config(config::place(config_path, &text, err)));
    }
    let model_length = model.metadata.window_length();
    let window_length = match settings.window.seconds {
        Some(seconds) if seconds.abs_diff(model_length) > Duration::from_micros(1) => {
            return Err(located(
                "window.seconds",
                format!(
                    "{seconds:?} differs from the model's window of {model_length:?}; remove the key or set it to the model's"
                ),
            ));
        }
        _ => model_length,
    };
    for (idx, source) in settings.sources.iter().enumerate() {
        if source.video && model.metadata.video.is_none() && !source.audio {
            return Err(located(
                &format!("source[{idx}].video"),
                format!("source {:?} gives only video but model {} takes only audio", source.name, model.name()),
            ));
        }
        if source.audio && model.metadata.audio.is_none() && !source.video {
            return Err(located(
                &format!("source[{idx}].audio"),
                format!("source {:?} gives only audio but model {} takes only video", source.name, model.name()),
            ));
        }
    }
    Ok(Prepared { settings, model, window_length })
}

impl Prepared {
    /// The formats capture must deliver for `source`.
    pub fn capture_format(&self, source: &SourceSettings) -> CaptureFormat {
        CaptureFormat {
            video: self.model.metadata.video.as_ref().filter(|_| source.video).map(|video| (video.width, video.height)),
            audio: self.model.metadata.audio.as_ref().filter(|_| source.audio).map(|audio| audio.sample_rate),
        }
    }

    /// Window settings for `source`.
    pub fn window_settings(&self, source: &SourceSettings) -> WindowSettings {
        let format = self.capture_format(source);
        WindowSettings {
            length: self.window_length,
            hop: self.settings.window.hop,
            n_frames: self.model.metadata.video.as_ref().map_or(0, |video| video.frames),
            sample_rate: self.model.metadata.audio.as_ref().map_or(16_000, |audio| audio.sample_rate),
            video: format.video.is_some(),
            audio: format.audio.is_some(),
            max_lead: self.settings.window.max_lead,
            max_wait: self.settings.window.max_wait,
            video_span: self.model.metadata.video_span(),
        }
    }
}

/// A `NAME.onnx.sha256` beside the model (as `python -m mbt export` writes it: the hex digest,
/// optionally followed by the file name, `sha256sum` style) must match the file: a model
/// that rotted on its SD card or was replaced half-way is refused, not run.
fn check_sidecar_sha256(model_path: &Path, actual: &str) -> Result<(), String> {
    let mut sidecar = model_path.as_os_str().to_owned();
    sidecar.push(".sha256");
    let sidecar = std::path::PathBuf::from(sidecar);
    let text = match std::fs::read_to_string(&sidecar) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(format!("cannot read {}: {err}", sidecar.display())),
    };
    let expected = text.split_whitespace().next().unwrap_or("").to_ascii_lowercase();
    if expected.len() != 64 || !expected.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{} does not hold a sha256 hex digest", sidecar.display()));
    }
    if expected != actual {
        return Err(format!(
            "{} has sha256 {actual}, but {} says {expected}: the file is damaged or not the one exported; \
             copy it again (or remove the .sha256 file if the model was changed on purpose)",
            model_path.display(),
            sidecar.display()
        ));
    }
    Ok(())
}
