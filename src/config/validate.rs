//! `RawConfig` -> `Settings`: every check with the key and span it is about.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;

use super::raw::{RawConfig, RawSource};
use super::units::duration_in;
use super::{
    DEFAULT_METRICS_LISTEN, FieldError, MetricsSettings, ModelSettings, RestartSettings, Runtime, Settings,
    SourceEvidence, SourceKind, SourceSettings, TestSource, WindowConfig,
};

const KINDS: &str = "v4l2, alsa, pulse, rtsp, uri, test, pipeline";

pub fn validate(path: &Path, raw: RawConfig) -> Result<Settings, FieldError> {
    let device_id = match raw.device.id {
        Some(id) => {
            check_topic_name("device.id", &id)?;
            id.into_inner()
        }
        None => default_device_id(),
    };

    let model = raw.model.into_inner();
    let model_path = non_empty("model.path", &model.path)?;
    let model_path = {
        let candidate = Path::new(&model_path);
        if candidate.is_absolute() {
            candidate.to_path_buf()
        } else {
            path.parent().unwrap_or(Path::new(".")).join(candidate)
        }
    };
    let runtime = match model.runtime.get_ref().as_str() {
        "auto" => Runtime::Auto,
        "cpu" => Runtime::Cpu,
        "cuda" => Runtime::Cuda,
        other => {
            return Err(err(
                "model.runtime",
                &model.runtime,
                format!("unknown runtime {other:?}; allowed: auto, cpu, cuda"),
            ));
        }
    };
    let threads = int_in("model.threads", &model.threads, 1, 256)? as usize;
    let max_batch = int_in("model.max_batch", &model.max_batch, 1, 64)? as usize;

    let window = WindowConfig {
        seconds: duration_in(
            "window.seconds",
            raw.window.seconds.as_ref(),
            Duration::from_millis(100),
            Duration::from_secs(60),
        )?,
        hop: duration_in("window.hop", raw.window.hop.as_ref(), Duration::from_millis(10), Duration::from_secs(3600))?
            .unwrap_or(Duration::from_secs(1)),
        max_lead: duration_in(
            "window.max_lead",
            raw.window.max_lead.as_ref(),
            Duration::ZERO,
            Duration::from_secs(600),
        )?
        .unwrap_or(Duration::from_secs(30)),
        max_wait: duration_in(
            "window.max_wait",
            raw.window.max_wait.as_ref(),
            Duration::ZERO,
            Duration::from_secs(600),
        )?
        .unwrap_or(Duration::from_secs(2)),
    };

    let evidence_default = raw.evidence.source_default()?;
    let mut sources: Vec<SourceSettings> = Vec::new();
    for (idx, source) in raw.sources.into_iter().enumerate() {
        let span = source.span();
        let source = validate_source(idx, span.clone(), source.into_inner(), evidence_default)?;
        if sources.iter().any(|other| other.name == source.name) {
            return Err(FieldError::new(
                format!("source[{idx}].name"),
                Some(span),
                format!("duplicate source name {:?}; every source needs its own name", source.name),
            ));
        }
        sources.push(source);
    }

    let log_level = raw.log.level.map(Spanned::into_inner);
    let mqtt = raw.mqtt.validate(&device_id)?;
    let config_dir = path.parent().unwrap_or(Path::new("."));
    let metrics = {
        let listen = match &raw.metrics.listen {
            Some(listen) => listen.get_ref().parse::<SocketAddr>().map_err(|_| {
                err(
                    "metrics.listen",
                    listen,
                    format!(
                        "{:?} is not an address and port; e.g. \"127.0.0.1:9464\" or \"[::1]:9464\"",
                        listen.get_ref()
                    ),
                )
            })?,
            None => DEFAULT_METRICS_LISTEN,
        };
        let enabled = raw.metrics.enabled.as_ref().is_none_or(|enabled| *enabled.get_ref());
        let token = match &raw.metrics.token_file {
            Some(file) => Some(read_token(file, config_dir)?),
            None => None,
        };
        if enabled && token.is_none() && !listen.ip().is_loopback() {
            let message = format!(
                "{listen} is not a loopback address: set [metrics] token_file to a file holding the token \
                 clients must send (anyone on the network could read the page and metrics otherwise)"
            );
            return Err(match &raw.metrics.listen {
                Some(value) => err("metrics.listen", value, message),
                None => FieldError::new("metrics.listen", None, message),
            });
        }
        MetricsSettings { listen: enabled.then_some(listen), token }
    };
    let spool = {
        let mut spool = raw.spool.validate()?;
        if spool.dir.is_relative() {
            spool.dir = config_dir.join(&spool.dir);
        }
        spool
    };
    let state_dir = match &raw.device.state_dir {
        Some(dir) => config_dir.join(non_empty("device.state_dir", dir)?),
        None => spool.dir.parent().unwrap_or(&spool.dir).to_path_buf(),
    };
    let evidence = raw.evidence.validate(config_dir, &state_dir)?;
    Ok(Settings {
        file: path.to_path_buf(),
        device_id,
        model: ModelSettings { path: model_path, runtime, threads, max_batch },
        window,
        sources,
        log_level,
        events: raw.events.clone().validate()?,
        events_raw: raw.events,
        mqtt,
        state_dir,
        spool,
        metrics,
        evidence,
    })
}

fn validate_source(
    idx: usize,
    span: std::ops::Range<usize>,
    raw: RawSource,
    evidence_default: SourceEvidence,
) -> Result<SourceSettings, FieldError> {
    let prefix = format!("source[{idx}]");
    let key = |name: &str| format!("{prefix}.{name}");
    let name = raw.name.as_ref().ok_or_else(|| {
        FieldError::new(key("name"), Some(span.clone()), "missing; every source needs a unique `name`")
    })?;
    check_topic_name(&key("name"), name)?;
    let kind_value = raw.kind.as_ref().ok_or_else(|| {
        FieldError::new(key("kind"), Some(span.clone()), format!("missing; `kind` is one of {KINDS}"))
    })?;
    let kind_name = kind_value.get_ref().as_str();
    let allowed: &[&str] = match kind_name {
        "v4l2" => &["video_device", "video_caps", "audio_device"],
        "alsa" => &["audio_device"],
        "pulse" => &["audio_device"],
        "rtsp" => &["url", "latency", "protocols"],
        "uri" => &["uri"],
        "test" => &[
            "pattern",
            "wave",
            "freq",
            "volume",
            "is_live",
            "width",
            "height",
            "fps",
            "sample_rate",
            "video_extra",
            "audio_extra",
            "duration",
        ],
        "pipeline" => &["video_pipeline", "audio_pipeline", "live"],
        other => return Err(err(&key("kind"), kind_value, format!("unknown kind {other:?}; allowed: {KINDS}"))),
    };
    for (set_key, set_span) in raw.set_keys() {
        if !allowed.contains(&set_key) {
            return Err(FieldError::new(
                key(set_key),
                Some(set_span),
                format!("not a key of kind = {kind_name:?}; allowed for this kind: {}", allowed.join(", ")),
            ));
        }
    }
    let required = |field: &Option<Spanned<String>>, field_name: &str| -> Result<String, FieldError> {
        match field {
            Some(value) => non_empty(&key(field_name), value),
            None => Err(FieldError::new(
                key(field_name),
                Some(span.clone()),
                format!("missing; kind = {kind_name:?} needs `{field_name}`"),
            )),
        }
    };
    let optional = |field: &Option<Spanned<String>>| field.as_ref().map(|value| value.get_ref().clone());

    let mut video_default = true;
    let mut audio_default = true;
    let kind = match kind_name {
        "v4l2" => {
            audio_default = raw.audio_device.is_some();
            SourceKind::V4l2 {
                video_device: required(&raw.video_device, "video_device")?,
                video_caps: optional(&raw.video_caps),
                audio_device: optional(&raw.audio_device),
            }
        }
        "alsa" => {
            video_default = false;
            SourceKind::Alsa { audio_device: required(&raw.audio_device, "audio_device")? }
        }
        "pulse" => {
            video_default = false;
            SourceKind::Pulse { audio_device: optional(&raw.audio_device) }
        }
        "rtsp" => {
            let url = required(&raw.url, "url")?;
            if !(url.starts_with("rtsp://") || url.starts_with("rtsps://")) {
                return Err(err(
                    &key("url"),
                    raw.url.as_ref().expect("checked above"),
                    "must start with rtsp:// or rtsps://",
                ));
            }
            let latency = duration_in(&key("latency"), raw.latency.as_ref(), Duration::ZERO, Duration::from_secs(10))?
                .unwrap_or(Duration::from_millis(200));
            let protocols = optional(&raw.protocols);
            if let (Some(value), Some(spanned)) = (&protocols, &raw.protocols) {
                let ok = value.split('+').all(|part| matches!(part, "tcp" | "udp" | "udp-mcast" | "http"));
                if !ok {
                    return Err(err(&key("protocols"), spanned, "allowed: tcp, udp, udp-mcast, http (joined with +)"));
                }
            }
            SourceKind::Rtsp { url, latency, protocols }
        }
        "uri" => {
            let uri = required(&raw.uri, "uri")?;
            let uri = if uri.contains("://") {
                uri
            } else {
                let absolute = std::path::absolute(&uri).unwrap_or_else(|_| uri.clone().into());
                format!("file://{}", absolute.display())
            };
            SourceKind::Uri { uri }
        }
        "test" => {
            let test = TestSource {
                pattern: optional(&raw.pattern).unwrap_or_else(|| "smpte".into()),
                wave: optional(&raw.wave).unwrap_or_else(|| "sine".into()),
                freq: float_in(&key("freq"), raw.freq.as_ref(), 0.0, 20_000.0)?.unwrap_or(440.0),
                volume: float_in(&key("volume"), raw.volume.as_ref(), 0.0, 1.0)?.unwrap_or(0.8),
                is_live: raw.is_live.as_ref().map(|value| *value.get_ref()).unwrap_or(true),
                width: opt_int_in(&key("width"), raw.width.as_ref(), 16, 7680)?.unwrap_or(640) as u32,
                height: opt_int_in(&key("height"), raw.height.as_ref(), 16, 4320)?.unwrap_or(480) as u32,
                fps: opt_int_in(&key("fps"), raw.fps.as_ref(), 1, 240)?.unwrap_or(30) as u32,
                sample_rate: opt_int_in(&key("sample_rate"), raw.sample_rate.as_ref(), 8000, 192_000)?.unwrap_or(48_000)
                    as u32,
                video_extra: optional(&raw.video_extra).unwrap_or_default(),
                audio_extra: optional(&raw.audio_extra).unwrap_or_default(),
                duration: duration_in(
                    &key("duration"),
                    raw.duration.as_ref(),
                    Duration::from_millis(1),
                    Duration::MAX,
                )?,
            };
            for (field, value) in [("video_extra", &raw.video_extra), ("audio_extra", &raw.audio_extra)] {
                if let Some(value) = value
                    && value.get_ref().contains('!')
                {
                    return Err(err(&key(field), value, "properties only (`name=value ...`), no `!` links"));
                }
            }
            SourceKind::Test(test)
        }
        "pipeline" => {
            if raw.video_pipeline.is_none() && raw.audio_pipeline.is_none() {
                return Err(FieldError::new(
                    key("video_pipeline"),
                    Some(span.clone()),
                    "missing; kind = \"pipeline\" needs `video_pipeline`, `audio_pipeline` or both",
                ));
            }
            video_default = raw.video_pipeline.is_some();
            audio_default = raw.audio_pipeline.is_some();
            SourceKind::Pipeline {
                video_pipeline: optional(&raw.video_pipeline),
                audio_pipeline: optional(&raw.audio_pipeline),
                live: raw.live.as_ref().map(|value| *value.get_ref()).unwrap_or(true),
            }
        }
        _ => unreachable!("kind checked above"),
    };
    let video = raw.video.as_ref().map(|value| *value.get_ref()).unwrap_or(video_default);
    let audio = raw.audio.as_ref().map(|value| *value.get_ref()).unwrap_or(audio_default);
    if video && !video_default {
        let at = raw.video.as_ref().map(|value| value.span()).unwrap_or(span.clone());
        return Err(FieldError::new(
            key("video"),
            Some(at),
            format!("kind = {kind_name:?} with these keys has no video"),
        ));
    }
    if audio && !audio_default {
        let at = raw.audio.as_ref().map(|value| value.span()).unwrap_or(span.clone());
        return Err(FieldError::new(
            key("audio"),
            Some(at),
            format!("kind = {kind_name:?} with these keys has no audio"),
        ));
    }
    if !video && !audio {
        return Err(FieldError::new(key("video"), Some(span.clone()), "a source needs video, audio or both"));
    }
    let restart = RestartSettings {
        stall_timeout: duration_in(
            &key("stall_timeout"),
            raw.stall_timeout.as_ref(),
            Duration::from_millis(100),
            Duration::from_secs(3600),
        )?
        .unwrap_or(Duration::from_secs(5)),
        backoff_initial: duration_in(
            &key("backoff_initial"),
            raw.backoff_initial.as_ref(),
            Duration::from_millis(10),
            Duration::from_secs(3600),
        )?
        .unwrap_or(Duration::from_secs(1)),
        backoff_max: duration_in(
            &key("backoff_max"),
            raw.backoff_max.as_ref(),
            Duration::from_millis(10),
            Duration::from_secs(86_400),
        )?
        .unwrap_or(Duration::from_secs(60)),
    };
    let max_fps = opt_int_in(&key("max_fps"), raw.max_fps.as_ref(), 1, 240)?.map(|fps| fps as u32);
    let evidence = match &raw.evidence {
        Some(evidence) => evidence.get_ref().merge(&prefix, evidence_default)?,
        None => evidence_default,
    };
    Ok(SourceSettings { name: name.get_ref().clone(), kind, video, audio, restart, max_fps, evidence })
}

fn err<T>(key: &str, value: &Spanned<T>, message: impl Into<String>) -> FieldError {
    FieldError::new(key, Some(value.span()), message)
}

/// The shortest token accepted from `[metrics] token_file`.
const MIN_TOKEN_LEN: usize = 16;

/// The HTTP token: the file's first line, at least [`MIN_TOKEN_LEN`] characters of
/// `A-Z a-z 0-9 . _ ~ -` (it travels in URLs and cookies as is).
fn read_token(file: &Spanned<String>, config_dir: &Path) -> Result<String, FieldError> {
    let path = config_dir.join(file.get_ref());
    let text = std::fs::read_to_string(&path)
        .map_err(|e| err("metrics.token_file", file, format!("cannot read {}: {e}", path.display())))?;
    let token = text.lines().next().unwrap_or("").trim();
    let allowed = |c: char| c.is_ascii_alphanumeric() || ".-_~".contains(c);
    if token.len() < MIN_TOKEN_LEN || !token.chars().all(allowed) {
        return Err(err(
            "metrics.token_file",
            file,
            format!(
                "{} must hold a token of at least {MIN_TOKEN_LEN} characters of A-Z a-z 0-9 . _ ~ - \
                 (e.g. from `openssl rand -hex 24`)",
                path.display()
            ),
        ));
    }
    Ok(token.to_owned())
}

fn non_empty(key: &str, value: &Spanned<String>) -> Result<String, FieldError> {
    if value.get_ref().trim().is_empty() {
        return Err(err(key, value, "must not be empty"));
    }
    Ok(value.get_ref().clone())
}

/// Names used in MQTT topics: no `/`, `+`, `#`, no spaces or control characters.
fn check_topic_name(key: &str, value: &Spanned<String>) -> Result<(), FieldError> {
    let text = value.get_ref();
    let ok = !text.is_empty()
        && text != "."
        && text != ".."
        && text.len() <= 64
        && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !ok {
        return Err(err(key, value, format!("{text:?} is not allowed; use 1-64 of a-z, A-Z, 0-9, '-', '_', '.'")));
    }
    Ok(())
}

fn int_in(key: &str, value: &Spanned<i64>, min: i64, max: i64) -> Result<i64, FieldError> {
    let number = *value.get_ref();
    if number < min || number > max {
        return Err(err(key, value, format!("{number} is out of range; allowed: {min} to {max}")));
    }
    Ok(number)
}

fn opt_int_in(key: &str, value: Option<&Spanned<i64>>, min: i64, max: i64) -> Result<Option<i64>, FieldError> {
    value.map(|value| int_in(key, value, min, max)).transpose()
}

fn float_in(key: &str, value: Option<&Spanned<f64>>, min: f64, max: f64) -> Result<Option<f64>, FieldError> {
    let Some(value) = value else { return Ok(None) };
    let number = *value.get_ref();
    if !(number >= min && number <= max) {
        return Err(err(key, value, format!("{number} is out of range; allowed: {min} to {max}")));
    }
    Ok(Some(number))
}

fn default_device_id() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let cleaned: String = raw
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '_' })
        .take(64)
        .collect();
    if cleaned.is_empty() { "mbt-edge".to_string() } else { cleaned }
}
