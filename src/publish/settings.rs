//! The `[events]`, `[events.labels."<label>"]`, `[mqtt]` and `[spool]` sections of
//! config.toml as written (raw serde structs whose doc comments are the user docs), and their
//! one-time validation into typed settings ([`EventSettings`], [`MqttSettings`],
//! [`SpoolSettings`]).
//!
//! Errors name the dotted key and keep the byte span of the offending value, so the binary
//! can print file:line:column; they say what is allowed. Reading the password file or the
//! `MBT_EDGE_MQTT_PASSWORD` environment variable happens here, once, so the running publisher
//! never looks at the environment.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::spool::SpoolSettings;
pub use crate::config::FieldError;
use crate::events::{EventSettings, LabelSettings, Require};

/// The environment variable read for the MQTT password when the config sets neither
/// `password` nor `password_file`.
pub const PASSWORD_ENV: &str = "MBT_EDGE_MQTT_PASSWORD";

/// `[events]`: when scores become events. Every key is optional.
///
/// ```toml
/// [events]
/// threshold = 0.6      # a window counts as "on" at or above this score
/// off_threshold = 0.5  # an event stays open until the score falls below this
/// min_windows = 2      # consecutive "on" windows before `start`
/// cooldown = "3s"      # time below off_threshold before `end` (seconds or "500ms", "3s", "1m")
/// require = "fused"    # fused | both (audio and video must each pass) | either (one is enough)
/// [events.labels."dog bark"]
/// threshold = 0.8      # per-label overrides of any key above, plus `enabled = false`
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEvents {
    /// Default on-threshold for every label, in 0..=1. Default 0.6.
    #[serde(default)]
    pub threshold: Option<Spanned<f32>>,
    /// Default off-threshold, in 0..=threshold. Default: threshold - 0.1 (at least 0).
    #[serde(default)]
    pub off_threshold: Option<Spanned<f32>>,
    /// Consecutive windows at or above the threshold before `start`, at least 1. Default 2.
    #[serde(default)]
    pub min_windows: Option<Spanned<u32>>,
    /// How long the score must stay below off_threshold before `end`. Default 3 s.
    #[serde(default)]
    pub cooldown: Option<Spanned<RawDuration>>,
    /// fused | both | either. Default fused.
    #[serde(default)]
    pub require: Option<Spanned<String>>,
    /// Per-label overrides, keyed by the model's label names.
    #[serde(default)]
    pub labels: BTreeMap<Spanned<String>, RawLabel>,
}

/// `[events.labels."<label>"]`: overrides for one label; a missing key uses `[events]`'s.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLabel {
    #[serde(default)]
    pub threshold: Option<Spanned<f32>>,
    #[serde(default)]
    pub off_threshold: Option<Spanned<f32>>,
    #[serde(default)]
    pub min_windows: Option<Spanned<u32>>,
    #[serde(default)]
    pub cooldown: Option<Spanned<RawDuration>>,
    #[serde(default)]
    pub require: Option<Spanned<String>>,
    /// false: never produce events (nor a Home Assistant binary_sensor) for this label.
    #[serde(default)]
    pub enabled: Option<Spanned<bool>>,
}

/// A duration: a number of seconds (`3`, `0.5`) or a string with a unit
/// (`"500ms"`, `"3s"`, `"2m"`, `"1h"`, `"7d"`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum RawDuration {
    Seconds(f64),
    Text(String),
}

/// A size: a number of bytes or a string with a unit (`"64MiB"`, `"512KiB"`, `"1GiB"`, `"10MB"`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum RawBytes {
    Bytes(u64),
    Text(String),
}

/// `[mqtt]`: the broker and what is published.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMqtt {
    /// `mqtt://host:port` or `mqtts://host:port` (TLS). Default `mqtt://127.0.0.1:1883`;
    /// the port defaults to 1883 / 8883.
    #[serde(default)]
    pub url: Option<Spanned<String>>,
    /// MQTT client id. Default `mbt-edge-<device id>`.
    #[serde(default)]
    pub client_id: Option<Spanned<String>>,
    #[serde(default)]
    pub username: Option<Spanned<String>>,
    /// Prefer `password_file` or the `MBT_EDGE_MQTT_PASSWORD` environment variable, which
    /// keep the secret out of the config file.
    #[serde(default)]
    pub password: Option<Spanned<String>>,
    /// A file whose content (trailing newline removed) is the password.
    #[serde(default)]
    pub password_file: Option<Spanned<PathBuf>>,
    /// PEM file of the CA that signed the broker's certificate (mqtts). Default: the system's
    /// CA bundle.
    #[serde(default)]
    pub ca: Option<Spanned<PathBuf>>,
    /// PEM client certificate for mutual TLS; needs `key`.
    #[serde(default)]
    pub cert: Option<Spanned<PathBuf>>,
    /// PEM private key of `cert`.
    #[serde(default)]
    pub key: Option<Spanned<PathBuf>>,
    /// MQTT keepalive, at least 5 s. Default 30 s.
    #[serde(default)]
    pub keepalive: Option<Spanned<RawDuration>>,
    /// QoS of event messages: 0 or 1. Default 1 (events are removed from the spool on PUBACK).
    #[serde(default)]
    pub qos: Option<Spanned<u8>>,
    /// First topic level. Default `mbt-edge`.
    #[serde(default)]
    pub topic_prefix: Option<Spanned<String>>,
    /// Publish every window's top scores on `{prefix}/{device}/{source}/scores`. Default false.
    #[serde(default)]
    pub publish_scores: Option<Spanned<bool>>,
    /// Period of `{prefix}/{device}/stats`; 0 turns stats off. Default 60 s.
    #[serde(default)]
    pub stats_interval: Option<Spanned<RawDuration>>,
    /// Publish Home Assistant MQTT discovery configs. Default false.
    #[serde(default)]
    pub home_assistant: Option<Spanned<bool>>,
    /// Home Assistant's discovery prefix. Default `homeassistant`.
    #[serde(default)]
    pub discovery_prefix: Option<Spanned<String>>,
}

/// `[spool]`: where events wait until the broker acknowledges them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpool {
    /// Default `/var/lib/mbt-edge/spool`.
    #[serde(default)]
    pub dir: Option<Spanned<PathBuf>>,
    /// Bound on unacknowledged events; the oldest are dropped beyond it. Default "64MiB".
    #[serde(default)]
    pub max_bytes: Option<Spanned<RawBytes>>,
    /// Events older than this are dropped instead of published. Default "7d".
    #[serde(default)]
    pub max_age: Option<Spanned<RawDuration>>,
}

/// `mqtt://` or `mqtts://`, host and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

impl std::str::FromStr for BrokerUrl {
    type Err = String;

    fn from_str(url: &str) -> Result<Self, String> {
        let allowed = "expected mqtt://host[:port] or mqtts://host[:port]";
        let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("mqtt://") {
            (false, rest)
        } else {
            return Err(format!("{allowed}, got {url:?}"));
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') || rest.contains('@') || rest.is_empty() {
            return Err(format!("{allowed} (no path or user part), got {url:?}"));
        }
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or(format!("{allowed}, got {url:?}"))?;
            (host, after.strip_prefix(':'))
        } else {
            match rest.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            }
        };
        let port = match port {
            Some(p) => p.parse::<u16>().ok().filter(|&p| p != 0).ok_or(format!("port must be 1..=65535, got {p:?}"))?,
            None => default_port,
        };
        if host.is_empty() {
            return Err(format!("{allowed}: the host is missing"));
        }
        Ok(BrokerUrl { tls, host: host.to_owned(), port })
    }
}

/// Typed MQTT settings.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttSettings {
    pub url: BrokerUrl,
    pub client_id: String,
    pub username: Option<String>,
    /// Already resolved from `password`, `password_file` or the environment.
    pub password: Option<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub keepalive: Duration,
    /// 0 or 1.
    pub qos: u8,
    pub topic_prefix: String,
    pub device_id: String,
    pub publish_scores: bool,
    /// Zero: no periodic stats.
    pub stats_interval: Duration,
    pub home_assistant: bool,
    pub discovery_prefix: String,
}

impl Default for MqttSettings {
    fn default() -> Self {
        MqttSettings {
            url: BrokerUrl { tls: false, host: "127.0.0.1".to_owned(), port: 1883 },
            client_id: "mbt-edge".to_owned(),
            username: None,
            password: None,
            ca: None,
            cert: None,
            key: None,
            keepalive: default_keepalive(),
            qos: default_qos(),
            topic_prefix: default_topic_prefix(),
            device_id: "mbt-edge".to_owned(),
            publish_scores: false,
            stats_interval: default_stats_interval(),
            home_assistant: false,
            discovery_prefix: default_discovery_prefix(),
        }
    }
}

pub fn default_threshold() -> f32 {
    LabelSettings::default().threshold
}
pub fn default_min_windows() -> u32 {
    LabelSettings::default().min_windows
}
pub fn default_cooldown() -> Duration {
    LabelSettings::default().cooldown
}
pub fn default_url() -> String {
    "mqtt://127.0.0.1:1883".to_owned()
}
pub fn default_keepalive() -> Duration {
    Duration::from_secs(30)
}
pub fn default_qos() -> u8 {
    1
}
pub fn default_topic_prefix() -> String {
    "mbt-edge".to_owned()
}
pub fn default_stats_interval() -> Duration {
    Duration::from_secs(60)
}
pub fn default_discovery_prefix() -> String {
    "homeassistant".to_owned()
}
pub fn default_spool_dir() -> PathBuf {
    SpoolSettings::default().dir
}
pub fn default_spool_max_bytes() -> u64 {
    SpoolSettings::default().max_bytes
}
pub fn default_spool_max_age() -> Duration {
    SpoolSettings::default().max_age
}

impl RawEvents {
    /// Merges defaults and overrides into typed settings. Label names are checked against
    /// the model separately, by [`RawEvents::check_labels`], once the model is loaded.
    pub fn validate(self) -> Result<EventSettings, FieldError> {
        let default_threshold =
            probability("events.threshold", self.threshold.as_ref())?.unwrap_or_else(default_threshold);
        let default = LabelSettings {
            threshold: default_threshold,
            off_threshold: off_threshold("events.off_threshold", self.off_threshold.as_ref(), default_threshold)?,
            min_windows: min_windows("events.min_windows", self.min_windows.as_ref())?
                .unwrap_or_else(default_min_windows),
            cooldown: duration("events.cooldown", self.cooldown.as_ref())?.unwrap_or_else(default_cooldown),
            require: require("events.require", self.require.as_ref())?.unwrap_or_default(),
            enabled: true,
        };
        let mut per_label = HashMap::new();
        for (label, raw) in self.labels {
            let prefix = format!("events.labels.{}", quote_key(label.get_ref()));
            let key = |field: &str| format!("{prefix}.{field}");
            let threshold = probability(&key("threshold"), raw.threshold.as_ref())?;
            let label_threshold = threshold.unwrap_or(default.threshold);
            // An overridden threshold without an off_threshold gets its own default gap,
            // unless the inherited off_threshold still fits below it.
            let off = match (&raw.off_threshold, threshold) {
                (Some(_), _) | (None, Some(_)) => {
                    off_threshold(&key("off_threshold"), raw.off_threshold.as_ref(), label_threshold)?
                }
                (None, None) => default.off_threshold,
            };
            let settings = LabelSettings {
                threshold: label_threshold,
                off_threshold: off,
                min_windows: min_windows(&key("min_windows"), raw.min_windows.as_ref())?.unwrap_or(default.min_windows),
                cooldown: duration(&key("cooldown"), raw.cooldown.as_ref())?.unwrap_or(default.cooldown),
                require: require(&key("require"), raw.require.as_ref())?.unwrap_or(default.require),
                enabled: raw.enabled.map(|e| e.into_inner()).unwrap_or(true),
            };
            per_label.insert(label.into_inner(), settings);
        }
        Ok(EventSettings { default, per_label })
    }

    /// Every `[events.labels."<label>"]` must name one of the model's labels.
    pub fn check_labels(&self, model_labels: &[String]) -> Result<(), FieldError> {
        for label in self.labels.keys() {
            if !model_labels.iter().any(|l| l == label.get_ref()) {
                return Err(FieldError::new(
                    format!("events.labels.{}", quote_key(label.get_ref())),
                    Some(label.span()),
                    format!(
                        "the model has no label {:?}; its labels are: {}",
                        label.get_ref(),
                        model_labels.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl RawMqtt {
    /// `device_id` comes from `[device].id` (default: the hostname).
    pub fn validate(self, device_id: &str) -> Result<MqttSettings, FieldError> {
        let url = match &self.url {
            Some(url) => url
                .get_ref()
                .parse::<BrokerUrl>()
                .map_err(|message| FieldError::new("mqtt.url", Some(url.span()), message))?,
            None => default_url().parse().expect("the default url parses"),
        };
        let client_id = match self.client_id {
            Some(id) if id.get_ref().is_empty() || id.get_ref().len() > 65535 => {
                return Err(FieldError::new("mqtt.client_id", Some(id.span()), "must be 1 to 65535 bytes"));
            }
            Some(id) => id.into_inner(),
            None => format!("mbt-edge-{device_id}"),
        };
        let password = match (&self.password, &self.password_file) {
            (Some(p), Some(_)) => {
                return Err(FieldError::new(
                    "mqtt.password",
                    Some(p.span()),
                    "set password or password_file, not both",
                ));
            }
            (Some(p), None) => Some(p.get_ref().clone()),
            (None, Some(file)) => {
                let text = std::fs::read_to_string(file.get_ref()).map_err(|e| {
                    FieldError::new(
                        "mqtt.password_file",
                        Some(file.span()),
                        format!("cannot read {}: {e}", file.get_ref().display()),
                    )
                })?;
                Some(text.trim_end_matches(['\n', '\r']).to_owned())
            }
            (None, None) => std::env::var(PASSWORD_ENV).ok(),
        };
        if password.is_some() && self.username.is_none() {
            let span = self.password.as_ref().map(|p| p.span());
            return Err(FieldError::new(
                "mqtt.username",
                span,
                "a password (from password, password_file or MBT_EDGE_MQTT_PASSWORD) needs a username",
            ));
        }
        for (key, path) in [("mqtt.ca", &self.ca), ("mqtt.cert", &self.cert), ("mqtt.key", &self.key)] {
            if let Some(path) = path {
                if !url.tls {
                    return Err(FieldError::new(key, Some(path.span()), "TLS files need an mqtts:// url"));
                }
                if !path.get_ref().is_file() {
                    return Err(FieldError::new(
                        key,
                        Some(path.span()),
                        format!("{} is not a readable file", path.get_ref().display()),
                    ));
                }
            }
        }
        match (&self.cert, &self.key) {
            (Some(cert), None) => {
                return Err(FieldError::new("mqtt.key", Some(cert.span()), "cert needs key"));
            }
            (None, Some(key)) => {
                return Err(FieldError::new("mqtt.cert", Some(key.span()), "key needs cert"));
            }
            _ => {}
        }
        let keepalive = duration("mqtt.keepalive", self.keepalive.as_ref())?.unwrap_or_else(default_keepalive);
        if keepalive < Duration::from_secs(5) || keepalive > Duration::from_secs(65535) {
            return Err(FieldError::new(
                "mqtt.keepalive",
                self.keepalive.as_ref().map(|k| k.span()),
                "must be 5 s to 65535 s",
            ));
        }
        let qos = match &self.qos {
            Some(q) if *q.get_ref() > 1 => {
                return Err(FieldError::new(
                    "mqtt.qos",
                    Some(q.span()),
                    "must be 0 or 1 (events carry ids for deduplication; QoS 2 is not supported)",
                ));
            }
            Some(q) => *q.get_ref(),
            None => default_qos(),
        };
        let topic_prefix = topic_level("mqtt.topic_prefix", self.topic_prefix, default_topic_prefix, true)?;
        let discovery_prefix =
            topic_level("mqtt.discovery_prefix", self.discovery_prefix, default_discovery_prefix, true)?;
        if let Some(message) = topic_level_problem(device_id, false) {
            return Err(FieldError::new("device.id", None, message));
        }
        Ok(MqttSettings {
            url,
            client_id,
            username: self.username.map(|u| u.into_inner()),
            password,
            ca: self.ca.map(|p| p.into_inner()),
            cert: self.cert.map(|p| p.into_inner()),
            key: self.key.map(|p| p.into_inner()),
            keepalive,
            qos,
            topic_prefix,
            device_id: device_id.to_owned(),
            publish_scores: self.publish_scores.map(|b| b.into_inner()).unwrap_or(false),
            stats_interval: duration("mqtt.stats_interval", self.stats_interval.as_ref())?
                .unwrap_or_else(default_stats_interval),
            home_assistant: self.home_assistant.map(|b| b.into_inner()).unwrap_or(false),
            discovery_prefix,
        })
    }
}

impl RawSpool {
    pub fn validate(self) -> Result<SpoolSettings, FieldError> {
        let max_bytes = match &self.max_bytes {
            Some(raw) => {
                let bytes = parse_bytes(raw.get_ref())
                    .map_err(|message| FieldError::new("spool.max_bytes", Some(raw.span()), message))?;
                if bytes < 64 * 1024 {
                    return Err(FieldError::new("spool.max_bytes", Some(raw.span()), "must be at least 64KiB"));
                }
                bytes
            }
            None => default_spool_max_bytes(),
        };
        let max_age = duration("spool.max_age", self.max_age.as_ref())?.unwrap_or_else(default_spool_max_age);
        if max_age.is_zero() {
            return Err(FieldError::new(
                "spool.max_age",
                self.max_age.as_ref().map(|a| a.span()),
                "must be more than 0",
            ));
        }
        let dir = match self.dir {
            Some(dir) if dir.get_ref().as_os_str().is_empty() => {
                return Err(FieldError::new("spool.dir", Some(dir.span()), "must not be empty"));
            }
            Some(dir) => dir.into_inner(),
            None => default_spool_dir(),
        };
        Ok(SpoolSettings { dir, max_bytes, max_age })
    }
}

fn quote_key(label: &str) -> String {
    if !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        label.to_owned()
    } else {
        format!("{label:?}")
    }
}

fn probability(key: &str, value: Option<&Spanned<f32>>) -> Result<Option<f32>, FieldError> {
    match value {
        Some(v) if !(0.0..=1.0).contains(v.get_ref()) => {
            Err(FieldError::new(key, Some(v.span()), format!("must be a score in 0..=1, got {}", v.get_ref())))
        }
        Some(v) => Ok(Some(*v.get_ref())),
        None => Ok(None),
    }
}

fn off_threshold(key: &str, value: Option<&Spanned<f32>>, threshold: f32) -> Result<f32, FieldError> {
    match value {
        Some(v) if !(0.0..=threshold).contains(v.get_ref()) => Err(FieldError::new(
            key,
            Some(v.span()),
            format!("must be in 0..=threshold ({threshold}), got {}", v.get_ref()),
        )),
        Some(v) => Ok(*v.get_ref()),
        // Rounded so that 0.9 gives 0.8, not 0.79999995.
        None => Ok(((threshold - 0.1).max(0.0) * 10_000.0).round() / 10_000.0),
    }
}

fn min_windows(key: &str, value: Option<&Spanned<u32>>) -> Result<Option<u32>, FieldError> {
    match value {
        Some(v) if *v.get_ref() == 0 => Err(FieldError::new(key, Some(v.span()), "must be at least 1")),
        Some(v) => Ok(Some(*v.get_ref())),
        None => Ok(None),
    }
}

fn require(key: &str, value: Option<&Spanned<String>>) -> Result<Option<Require>, FieldError> {
    let Some(v) = value else { return Ok(None) };
    match v.get_ref().as_str() {
        "fused" => Ok(Some(Require::Fused)),
        "both" => Ok(Some(Require::Both)),
        "either" => Ok(Some(Require::Either)),
        other => Err(FieldError::new(key, Some(v.span()), format!("must be fused, both or either, got {other:?}"))),
    }
}

fn duration(key: &str, value: Option<&Spanned<RawDuration>>) -> Result<Option<Duration>, FieldError> {
    let Some(v) = value else { return Ok(None) };
    parse_duration(v.get_ref()).map(Some).map_err(|message| FieldError::new(key, Some(v.span()), message))
}

/// Seconds as a number, or a string with a unit: ms, s, m, h, d.
pub fn parse_duration(raw: &RawDuration) -> Result<Duration, String> {
    let allowed = "expected seconds (3, 0.5) or a string with a unit (\"500ms\", \"3s\", \"2m\", \"1h\", \"7d\")";
    let seconds = match raw {
        RawDuration::Seconds(s) => *s,
        RawDuration::Text(text) => {
            let text = text.trim();
            let split =
                text.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or(format!("{allowed}, got {text:?}"))?;
            let (number, unit) = text.split_at(split);
            let number: f64 = number.parse().map_err(|_| format!("{allowed}, got {text:?}"))?;
            let scale = match unit.trim() {
                "ms" => 0.001,
                "s" => 1.0,
                "m" | "min" => 60.0,
                "h" => 3600.0,
                "d" => 86400.0,
                _ => return Err(format!("{allowed}, got {text:?}")),
            };
            number * scale
        }
    };
    if !seconds.is_finite() || !(0.0..=1e9).contains(&seconds) {
        return Err(format!("{allowed}; it must be 0 or more"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Bytes as an integer, or a string with a unit: B, KB, MB, GB, KiB, MiB, GiB.
pub fn parse_bytes(raw: &RawBytes) -> Result<u64, String> {
    let allowed = "expected bytes (65536) or a string with a unit (\"512KiB\", \"64MiB\", \"1GiB\", \"10MB\")";
    match raw {
        RawBytes::Bytes(b) => Ok(*b),
        RawBytes::Text(text) => {
            let text = text.trim();
            let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
            let (number, unit) = text.split_at(split);
            let number: u64 = number.parse().map_err(|_| format!("{allowed}, got {text:?}"))?;
            let scale: u64 = match unit.trim() {
                "" | "B" => 1,
                "KB" => 1000,
                "MB" => 1_000_000,
                "GB" => 1_000_000_000,
                "KiB" => 1 << 10,
                "MiB" => 1 << 20,
                "GiB" => 1 << 30,
                _ => return Err(format!("{allowed}, got {text:?}")),
            };
            number.checked_mul(scale).ok_or(format!("{text:?} is too large"))
        }
    }
}

fn topic_level(
    key: &str,
    value: Option<Spanned<String>>,
    default: fn() -> String,
    allow_slash: bool,
) -> Result<String, FieldError> {
    match value {
        Some(v) => match topic_level_problem(v.get_ref(), allow_slash) {
            Some(message) => Err(FieldError::new(key, Some(v.span()), message)),
            None => Ok(v.into_inner()),
        },
        None => Ok(default()),
    }
}

fn topic_level_problem(value: &str, allow_slash: bool) -> Option<String> {
    if value.is_empty() {
        return Some("must not be empty".to_owned());
    }
    if value.contains(['+', '#', '\0']) {
        return Some(format!("must not contain MQTT wildcards (+, #), got {value:?}"));
    }
    if !allow_slash && value.contains('/') {
        return Some(format!("must be one topic level (no '/'), got {value:?}"));
    }
    if value.starts_with('/') || value.ends_with('/') {
        return Some(format!("must not start or end with '/', got {value:?}"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[serde(default)]
        events: RawEvents,
        #[serde(default)]
        mqtt: RawMqtt,
        #[serde(default)]
        spool: RawSpool,
    }

    struct Typed {
        events: EventSettings,
        mqtt: MqttSettings,
        spool: SpoolSettings,
    }

    fn parse(toml_text: &str) -> Result<Typed, FieldError> {
        let file: File = toml::from_str(toml_text).map_err(|e| FieldError::new("", e.span(), e.message()))?;
        Ok(Typed { events: file.events.validate()?, mqtt: file.mqtt.validate("porch")?, spool: file.spool.validate()? })
    }

    /// Parses `toml_text` and compares either what `inspect` extracts from the typed
    /// settings, or the error as `key: message-prefix @ spanned text`, with `expected`.
    fn check(toml_text: &str, inspect: fn(&Typed) -> String, expected: &str) {
        let got = match parse(toml_text) {
            Ok(typed) => inspect(&typed),
            Err(e) => {
                let spanned = e.span.clone().map(|s| &toml_text[s]).unwrap_or("");
                format!("{}: {} @ {spanned}", e.key, e.message)
            }
        };
        assert!(got.starts_with(expected), "got {got:?}, expected {expected:?}");
    }

    #[test]
    fn defaults() {
        check(
            "",
            |t| {
                format!(
                    "{:?} {} {} {:?} {} {:?}",
                    t.events.default,
                    t.mqtt.url,
                    t.mqtt.client_id,
                    t.mqtt.keepalive,
                    t.spool.max_bytes,
                    t.spool.max_age
                )
            },
            "LabelSettings { threshold: 0.6, off_threshold: 0.5, min_windows: 2, cooldown: 3s, require: Fused, enabled: true } mqtt://127.0.0.1:1883 mbt-edge-porch 30s 67108864 604800s",
        );
    }

    #[test]
    fn label_overrides_merge_with_defaults() {
        check(
            "[events]\nthreshold = 0.7\ncooldown = \"500ms\"\n[events.labels.\"dog bark\"]\nthreshold = 0.9\nrequire = \"both\"\n[events.labels.cat]\nenabled = false\n",
            |t| {
                let dog = &t.events.per_label["dog bark"];
                let cat = &t.events.per_label["cat"];
                format!(
                    "{} {} {:?} {:?} {} {}",
                    dog.threshold, dog.off_threshold, dog.cooldown, dog.require, cat.enabled, cat.off_threshold
                )
            },
            "0.9 0.8 500ms Both false 0.6",
        );
    }

    #[test]
    fn errors_name_the_key_and_span() {
        let none = |_: &Typed| String::new();
        check(
            "[events.labels.dog]\nthreshold = 1.5\n",
            none,
            "events.labels.dog.threshold: must be a score in 0..=1, got 1.5 @ 1.5",
        );
        check(
            "[events]\nthreshold = 0.5\noff_threshold = 0.7\n",
            none,
            "events.off_threshold: must be in 0..=threshold (0.5), got 0.7 @ 0.7",
        );
        check(
            "[events]\nrequire = \"all\"\n",
            none,
            "events.require: must be fused, both or either, got \"all\" @ \"all\"",
        );
        check("[events]\ncooldown = \"3 weeks\"\n", none, "events.cooldown: expected seconds");
        check(
            "[mqtt]\nurl = \"http://x\"\n",
            none,
            "mqtt.url: expected mqtt://host[:port] or mqtts://host[:port], got \"http://x\" @ \"http://x\"",
        );
        check("[mqtt]\nqos = 2\n", none, "mqtt.qos: must be 0 or 1");
        check("[mqtt]\nca = \"/etc/hostname\"\n", none, "mqtt.ca: TLS files need an mqtts:// url");
        check("[mqtt]\ntopic_prefix = \"a/#\"\n", none, "mqtt.topic_prefix: must not contain MQTT wildcards");
        check("[spool]\nmax_bytes = \"12 parsecs\"\n", none, "spool.max_bytes: expected bytes");
        check("[mqtt]\nbogus = 1\n", none, ": unknown field `bogus`");
    }

    #[test]
    fn urls_and_sizes() {
        check("[mqtt]\nurl = \"mqtts://broker.lan\"\n", |t| t.mqtt.url.to_string(), "mqtts://broker.lan:8883");
        check("[mqtt]\nurl = \"mqtt://[::1]:1884\"\n", |t| t.mqtt.url.to_string(), "mqtt://[::1]:1884");
        check(
            "[spool]\nmax_bytes = \"1GiB\"\nmax_age = \"2h\"\n",
            |t| format!("{} {:?}", t.spool.max_bytes, t.spool.max_age),
            "1073741824 7200s",
        );
    }

    #[test]
    fn password_from_file_and_unknown_label() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let text = format!("[mqtt]\nusername = \"edge\"\npassword_file = {:?}\n", file.display().to_string());
        let typed = parse(&text).unwrap();
        assert_eq!(typed.mqtt.password.as_deref(), Some("s3cret"));

        let text = "[events.labels.unicorn]\nthreshold = 0.9\n";
        let file: File = toml::from_str(text).unwrap();
        let e = file.events.check_labels(&["dog".to_owned()]).unwrap_err();
        assert_eq!(e.key, "events.labels.unicorn");
        assert_eq!(&text[e.span.unwrap()], "unicorn");
    }
}
