//! The publisher's notable events, each defined once: its log line (tracing, key=value
//! fields) and its counter together, so logs and the stats message never disagree.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde_json::{Value, json};

/// Counters shared by the publisher threads; read by stats and tests.
#[derive(Debug, Default)]
pub struct PublishCounters {
    pub connected: AtomicBool,
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    pub disconnects: AtomicU64,
    pub events_spooled: AtomicU64,
    pub events_sent: AtomicU64,
    pub events_replayed: AtomicU64,
    pub events_acked: AtomicU64,
    pub messages_dropped_offline: AtomicU64,
    pub spool_errors: AtomicU64,
}

/// A snapshot of [`PublishCounters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PublishStats {
    pub connected: bool,
    pub connects: u64,
    pub connect_failures: u64,
    pub disconnects: u64,
    pub events_spooled: u64,
    pub events_sent: u64,
    pub events_replayed: u64,
    pub events_acked: u64,
    pub messages_dropped_offline: u64,
    pub spool_errors: u64,
}

impl PublishCounters {
    pub fn snapshot(&self) -> PublishStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PublishStats {
            connected: self.connected.load(Ordering::Relaxed),
            connects: get(&self.connects),
            connect_failures: get(&self.connect_failures),
            disconnects: get(&self.disconnects),
            events_spooled: get(&self.events_spooled),
            events_sent: get(&self.events_sent),
            events_replayed: get(&self.events_replayed),
            events_acked: get(&self.events_acked),
            messages_dropped_offline: get(&self.messages_dropped_offline),
            spool_errors: get(&self.spool_errors),
        }
    }

    pub fn to_json(&self) -> Value {
        let s = self.snapshot();
        json!({
            "connected": s.connected,
            "connects": s.connects,
            "connect_failures": s.connect_failures,
            "disconnects": s.disconnects,
            "events_spooled": s.events_spooled,
            "events_sent": s.events_sent,
            "events_replayed": s.events_replayed,
            "events_acked": s.events_acked,
            "messages_dropped_offline": s.messages_dropped_offline,
            "spool_errors": s.spool_errors,
        })
    }

    pub fn broker_connected(&self, url: &str, spooled: u64) {
        self.connected.store(true, Ordering::Relaxed);
        self.connects.fetch_add(1, Ordering::Relaxed);
        tracing::info!(url, spooled, "broker connected");
    }

    /// A connection attempt failed or an established connection broke.
    pub fn broker_error(&self, url: &str, error: &rumqttc::ConnectionError, retry_in_ms: u64) {
        let was_connected = self.connected.swap(false, Ordering::Relaxed);
        if was_connected {
            self.disconnects.fetch_add(1, Ordering::Relaxed);
        } else {
            self.connect_failures.fetch_add(1, Ordering::Relaxed);
        }
        let (reason, hint) = explain(error);
        if matches!(reason, "refused" | "tls") {
            tracing::error!(url, reason, %hint, error = %error, retry_in_ms, "broker connection failed; events stay in the spool");
        } else if was_connected {
            tracing::warn!(url, reason, %hint, error = %error, retry_in_ms, "broker connection lost; events stay in the spool");
        } else {
            tracing::warn!(url, reason, %hint, error = %error, retry_in_ms, "broker unreachable; events stay in the spool");
        }
    }

    pub fn event_spooled(&self) {
        self.events_spooled.fetch_add(1, Ordering::Relaxed);
    }

    pub fn event_sent(&self, replayed: bool) {
        self.events_sent.fetch_add(1, Ordering::Relaxed);
        if replayed {
            self.events_replayed.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn event_acked(&self) {
        self.events_acked.fetch_add(1, Ordering::Relaxed);
    }

    pub fn message_dropped_offline(&self, topic: &str) {
        self.messages_dropped_offline.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(topic, "not connected: QoS 0 message dropped");
    }

    pub fn spool_error(&self, error: &super::spool::SpoolError) {
        self.spool_errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!(error = %error, "spool write failed");
    }
}

/// A short reason and a hint for the operator, from a connection error.
fn explain(error: &rumqttc::ConnectionError) -> (&'static str, String) {
    use rumqttc::{ConnectReturnCode, ConnectionError};
    match error {
        ConnectionError::ConnectionRefused(
            code @ (ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized),
        ) => {
            ("refused", format!("the broker refused the credentials ({code:?}): check mqtt.username and the password"))
        }
        ConnectionError::ConnectionRefused(code) => {
            ("refused", format!("the broker refused the connection ({code:?})"))
        }
        ConnectionError::Tls(tls) => {
            let text = tls.to_string();
            let hint = if text.contains("UnknownIssuer") {
                "the broker's certificate is not signed by the CA in mqtt.ca (unknown issuer)".to_owned()
            } else if text.contains("NotValidForName") {
                "the broker's certificate does not name the host in mqtt.url".to_owned()
            } else if text.contains("CertificateRequired") || text.contains("certificate required") {
                "the broker requires a client certificate: set mqtt.cert and mqtt.key".to_owned()
            } else {
                format!("TLS handshake failed: {text}")
            };
            ("tls", hint)
        }
        ConnectionError::Io(io) => ("unreachable", format!("network error: {io}")),
        ConnectionError::NetworkTimeout | ConnectionError::FlushTimeout => {
            ("timeout", "the broker did not answer in time".to_owned())
        }
        other => ("lost", other.to_string()),
    }
}
