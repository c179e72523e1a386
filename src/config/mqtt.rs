//! `[mqtt]` and `[spool]` of config.toml: the raw serde structs (their doc comments are the
//! user documentation) and their one-time validation into the typed [`MqttSettings`] and
//! [`SpoolSettings`] the publisher runs with. Reading the password file or the
//! `MBT_EDGE_MQTT_PASSWORD` environment variable happens here, once, so the running publisher
//! never looks at the environment.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::FieldError;
use super::units::{RawBytes, RawDuration, duration, parse_bytes};
use crate::delivery::{BrokerUrl, MqttSettings, SpoolSettings};

/// The environment variable read for the MQTT password when the config sets neither
/// `password` nor `password_file`.
pub const PASSWORD_ENV: &str = "MBT_EDGE_MQTT_PASSWORD";

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

pub fn default_url() -> String {
    "mqtt://127.0.0.1:1883".to_owned()
}
pub fn default_keepalive() -> Duration {
    MqttSettings::default().keepalive
}
pub fn default_qos() -> u8 {
    MqttSettings::default().qos
}
pub fn default_topic_prefix() -> String {
    MqttSettings::default().topic_prefix
}
pub fn default_stats_interval() -> Duration {
    MqttSettings::default().stats_interval
}
pub fn default_discovery_prefix() -> String {
    MqttSettings::default().discovery_prefix
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
