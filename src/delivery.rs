//! The typed settings of event delivery: the broker ([`MqttSettings`], from `[mqtt]`) and the
//! spool ([`SpoolSettings`], from `[spool]`). Plain data with defaults: `config` validates
//! config.toml into them and `publish` runs with them, so neither of those two imports the
//! other (config -> delivery <- publish).

use std::path::PathBuf;
use std::time::Duration;

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
            keepalive: Duration::from_secs(30),
            qos: 1,
            topic_prefix: "mbt-edge".to_owned(),
            device_id: "mbt-edge".to_owned(),
            publish_scores: false,
            stats_interval: Duration::from_secs(60),
            home_assistant: false,
            discovery_prefix: "homeassistant".to_owned(),
        }
    }
}

/// Where and how much to spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolSettings {
    pub dir: PathBuf,
    /// Bound on the bytes of unacknowledged records (framing included).
    pub max_bytes: u64,
    /// Records older than this are dropped (counted and logged) instead of published.
    pub max_age: Duration,
}

impl Default for SpoolSettings {
    fn default() -> Self {
        SpoolSettings {
            dir: PathBuf::from("/var/lib/mbt-edge/spool"),
            max_bytes: 64 * 1024 * 1024,
            max_age: Duration::from_secs(7 * 24 * 3600),
        }
    }
}
