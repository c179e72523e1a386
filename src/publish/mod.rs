//! The `publish` stage: the only module that knows MQTT and JSON payloads. Events from the
//! `events` stage are spooled durably ([`spool`]), published with rumqttc ([`mqtt`]) as the
//! contract's payloads ([`payload`]). It runs with typed settings (`crate::delivery`) and knows
//! nothing of config.toml.

#[cfg(test)]
mod ha_keys;
pub mod mqtt;
pub mod payload;
pub mod spool;
mod telemetry;

pub use crate::delivery::{BrokerUrl, MqttSettings, SpoolSettings};
pub use mqtt::{PublishError, Publisher, SourceStatus};
pub use payload::{Control, ControlChange, EvidencePayload, ModelInfo, PublisherInfo};
pub use spool::Spool;
pub use telemetry::PublishStats;
