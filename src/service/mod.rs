//! Living as a system service: systemd's notify protocol (`notify.rs`: `READY=1`, `STATUS=`,
//! `WATCHDOG=1`, `STOPPING=1`, `RELOADING=1`), the rule that decides whether the watchdog may
//! be fed (`health.rs`), and what `/metrics` shows (`metrics.rs`; the HTTP server that
//! answers it is `crate::web`).
//!
//! Nothing here reads telemetry or touches a stage: the daemon passes in typed snapshots
//! ([`HealthInput`], [`MetricsSnapshot`]) and closures, so every decision is testable without
//! a running pipeline. Without `NOTIFY_SOCKET` (a terminal, a test) notifications are no-ops.

mod health;
mod metrics;
mod notify;

pub use health::{Health, HealthInput, HealthSettings, Problem, SourceActivity, StageHeartbeat, Verdict};
pub use metrics::{
    CONTENT_TYPE, EventCount, EvidenceMetrics, LatencyHistogram, MetricsSnapshot, SourceMetrics, render,
};
pub use notify::Notifier;
