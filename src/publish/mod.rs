//! The `publish` stage: the only module that knows MQTT and JSON payloads. Events from the
//! `events` stage are spooled durably ([`spool`]), published with rumqttc ([`mqtt`]) as the
//! contract's payloads ([`payload`]); [`settings`] reads and validates the config sections.

pub mod mqtt;
pub mod payload;
pub mod settings;
pub mod spool;
mod telemetry;

pub use mqtt::{PublishError, Publisher, SourceStatus};
pub use payload::{ModelInfo, PublisherInfo};
pub use settings::{BrokerUrl, FieldError, MqttSettings};
pub use spool::{Spool, SpoolSettings};
pub use telemetry::PublishStats;
