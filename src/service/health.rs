//! The health rule: whether the daemon may feed systemd's watchdog (`WATCHDOG=1`) and what
//! `/health` answers. Healthy means windows are flowing from at least one source, inference
//! keeps up with them, and no stage has stopped beating.
//!
//! Pure: no clock of its own, no I/O, no threads. The caller passes `now` and the last times
//! each part made progress as `Instant`s; the only state kept is since when the inference
//! queue has been full, which is why [`Health::check`] takes `&mut self`.

use std::fmt;
use std::time::{Duration, Instant};

/// The limits of the health rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthSettings {
    /// Windows must have come from at least one source within this long (or, before the
    /// first window, since the daemon became ready).
    pub max_window_age: Duration,
    /// The inference queue may stay full (inference behind, dropping the oldest windows) at
    /// most this long.
    pub max_queue_full: Duration,
    /// While windows wait in the queue, an inference must have completed within this long.
    pub max_inference_age: Duration,
    /// A stage whose heartbeat is older than this is stuck.
    pub max_stage_silence: Duration,
}

impl Default for HealthSettings {
    /// 10 s each: several hops and several slow batches, yet well inside a 30 s `WatchdogSec`,
    /// so systemd restarts a daemon that stopped working within about 40 s.
    fn default() -> HealthSettings {
        HealthSettings {
            max_window_age: Duration::from_secs(10),
            max_queue_full: Duration::from_secs(10),
            max_inference_age: Duration::from_secs(10),
            max_stage_silence: Duration::from_secs(10),
        }
    }
}

/// When one source last delivered a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceActivity<'a> {
    pub source: &'a str,
    /// `None`: no window yet from this source's current incarnation.
    pub last_window: Option<Instant>,
}

/// When one stage thread last went round its loop (an idle loop beats too, on its receive
/// timeout); a stage blocked forever stops beating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageHeartbeat<'a> {
    pub stage: &'a str,
    pub last_beat: Instant,
}

/// What the health rule looks at, sampled at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthInput<'a> {
    pub now: Instant,
    /// When the daemon sent `READY=1` (or last reloaded sources): the grace before a first
    /// window counts from here.
    pub ready_since: Instant,
    pub sources: &'a [SourceActivity<'a>],
    /// Windows waiting for inference, and how many the queue holds.
    pub queue_depth: usize,
    pub queue_capacity: usize,
    /// When the last inference batch completed; `None` before the first.
    pub last_inference: Option<Instant>,
    pub stages: &'a [StageHeartbeat<'a>],
}

/// The answer: healthy, or the first problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Healthy,
    Unhealthy(Problem),
}

impl Verdict {
    pub fn is_healthy(&self) -> bool {
        matches!(self, Verdict::Healthy)
    }
}

/// Why the daemon is not healthy. `Display` is the line `/health` and `STATUS=` show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The config has no sources running at all.
    NoSources,
    /// No source delivered a window for `quiet_for`.
    NoWindows { quiet_for: Duration },
    /// The inference queue has been full for `full_for`: windows are being dropped.
    QueueFull { full_for: Duration },
    /// `waiting` windows are queued but no inference completed for `since_last`.
    InferenceStalled { waiting: usize, since_last: Duration },
    /// A stage thread has not beaten for `silent_for`.
    StageStuck { stage: String, silent_for: Duration },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::NoSources => write!(f, "no sources"),
            Problem::NoWindows { quiet_for } => {
                write!(f, "no windows from any source for {:.1}s", quiet_for.as_secs_f64())
            }
            Problem::QueueFull { full_for } => {
                write!(f, "inference is behind: queue full for {:.1}s, dropping windows", full_for.as_secs_f64())
            }
            Problem::InferenceStalled { waiting, since_last } => write!(
                f,
                "inference stalled: {waiting} windows waiting, none finished for {:.1}s",
                since_last.as_secs_f64()
            ),
            Problem::StageStuck { stage, silent_for } => {
                write!(f, "stage {stage} stuck for {:.1}s", silent_for.as_secs_f64())
            }
        }
    }
}

/// The health rule with the one piece of state it needs (since when the queue is full).
#[derive(Debug, Clone)]
pub struct Health {
    settings: HealthSettings,
    queue_full_since: Option<Instant>,
}

impl Health {
    pub fn new(settings: HealthSettings) -> Health {
        Health { settings, queue_full_since: None }
    }

    pub fn settings(&self) -> &HealthSettings {
        &self.settings
    }

    /// Judges `input`. Call it at least every watchdog ping period, with a `now` that does not
    /// go backwards: the queue-full duration is measured between calls.
    ///
    /// Problems are reported downstream first (a stuck stage, then stalled inference, then a
    /// full queue, then missing windows), since a blocked later stage is usually what makes
    /// the earlier ones back up.
    pub fn check(&mut self, input: &HealthInput<'_>) -> Verdict {
        let settings = self.settings;
        let now = input.now;
        let queue_full = input.queue_capacity > 0 && input.queue_depth >= input.queue_capacity;
        self.queue_full_since = match (queue_full, self.queue_full_since) {
            (false, _) => None,
            (true, Some(since)) => Some(since),
            (true, None) => Some(now),
        };

        for heartbeat in input.stages {
            let silent_for = now.saturating_duration_since(heartbeat.last_beat);
            if silent_for > settings.max_stage_silence {
                return Verdict::Unhealthy(Problem::StageStuck { stage: heartbeat.stage.to_string(), silent_for });
            }
        }

        if input.queue_depth > 0 {
            let last_progress = input.last_inference.unwrap_or(input.ready_since).max(input.ready_since);
            let since_last = now.saturating_duration_since(last_progress);
            if since_last > settings.max_inference_age {
                return Verdict::Unhealthy(Problem::InferenceStalled { waiting: input.queue_depth, since_last });
            }
        }

        if let Some(since) = self.queue_full_since {
            let full_for = now.saturating_duration_since(since);
            if full_for > settings.max_queue_full {
                return Verdict::Unhealthy(Problem::QueueFull { full_for });
            }
        }

        if input.sources.is_empty() {
            return Verdict::Unhealthy(Problem::NoSources);
        }
        let newest_window = input
            .sources
            .iter()
            .map(|source| source.last_window.unwrap_or(input.ready_since).max(input.ready_since))
            .max()
            .unwrap_or(input.ready_since);
        let quiet_for = now.saturating_duration_since(newest_window);
        if quiet_for > settings.max_window_age {
            return Verdict::Unhealthy(Problem::NoWindows { quiet_for });
        }

        Verdict::Healthy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test situation in seconds after `ready_since`, turned into `Instant`s by `check`.
    #[derive(Clone)]
    struct At {
        now: f64,
        windows: Vec<(&'static str, Option<f64>)>,
        queue_depth: usize,
        queue_capacity: usize,
        last_inference: Option<f64>,
        stages: Vec<(&'static str, f64)>,
    }

    /// One source, windows a second ago, an empty queue, inference just done.
    fn flowing(now: f64) -> At {
        At {
            now,
            windows: vec![("yard", Some(now - 1.0))],
            queue_depth: 0,
            queue_capacity: 8,
            last_inference: Some(now - 0.5),
            stages: vec![],
        }
    }

    fn secs(seconds: f64) -> Duration {
        Duration::from_secs_f64(seconds)
    }

    /// Runs each situation through one `Health` in order and compares every verdict.
    fn check(steps: &[(At, Verdict)]) {
        let start = Instant::now();
        let t = |seconds: f64| start + secs(seconds);
        let mut health = Health::new(HealthSettings::default());
        for (step, (at, expected)) in steps.iter().enumerate() {
            let sources: Vec<SourceActivity<'_>> =
                at.windows.iter().map(|(source, last)| SourceActivity { source, last_window: last.map(t) }).collect();
            let stages: Vec<StageHeartbeat<'_>> =
                at.stages.iter().map(|(stage, beat)| StageHeartbeat { stage, last_beat: t(*beat) }).collect();
            let input = HealthInput {
                now: t(at.now),
                ready_since: start,
                sources: &sources,
                queue_depth: at.queue_depth,
                queue_capacity: at.queue_capacity,
                last_inference: at.last_inference.map(t),
                stages: &stages,
            };
            assert_eq!(&health.check(&input), expected, "step {step} at {}s", at.now);
        }
    }

    #[test]
    fn windows_flowing_and_inference_keeping_up_is_healthy() {
        check(&[(flowing(20.0), Verdict::Healthy), (flowing(21.0), Verdict::Healthy)]);
    }

    #[test]
    fn first_window_has_a_grace_period_from_ready() {
        let waiting = |now| At { windows: vec![("yard", None)], last_inference: None, ..flowing(now) };
        check(&[
            (waiting(9.0), Verdict::Healthy),
            (waiting(12.0), Verdict::Unhealthy(Problem::NoWindows { quiet_for: secs(12.0) })),
        ]);
    }

    #[test]
    fn the_only_source_stalling_stops_the_watchdog() {
        let stalled = At { windows: vec![("yard", Some(5.0))], ..flowing(16.0) };
        check(&[
            (flowing(5.0), Verdict::Healthy),
            (At { windows: vec![("yard", Some(5.0))], ..flowing(15.0) }, Verdict::Healthy),
            (stalled, Verdict::Unhealthy(Problem::NoWindows { quiet_for: secs(11.0) })),
        ]);
    }

    #[test]
    fn one_flowing_source_is_enough() {
        let one_of_two = At { windows: vec![("yard", Some(2.0)), ("gate", Some(29.0))], ..flowing(30.0) };
        check(&[(one_of_two, Verdict::Healthy)]);
    }

    #[test]
    fn no_sources_is_unhealthy() {
        check(&[(At { windows: vec![], ..flowing(1.0) }, Verdict::Unhealthy(Problem::NoSources))]);
    }

    #[test]
    fn a_full_queue_is_tolerated_for_a_while() {
        let full = |now| At { queue_depth: 8, ..flowing(now) };
        check(&[
            (full(10.0), Verdict::Healthy),
            (full(20.0), Verdict::Healthy),
            (full(20.5), Verdict::Unhealthy(Problem::QueueFull { full_for: secs(10.5) })),
            // Draining resets the clock.
            (At { queue_depth: 3, ..flowing(21.0) }, Verdict::Healthy),
            (full(22.0), Verdict::Healthy),
            (full(31.0), Verdict::Healthy),
        ]);
    }

    #[test]
    fn windows_waiting_without_inference_progress_is_a_stall() {
        let stalled = |now, depth| At { queue_depth: depth, last_inference: Some(3.0), ..flowing(now) };
        check(&[
            (stalled(12.0, 2), Verdict::Healthy),
            (stalled(14.0, 2), Verdict::Unhealthy(Problem::InferenceStalled { waiting: 2, since_last: secs(11.0) })),
            // Nothing waiting: an idle worker is not stalled.
            (stalled(30.0, 0), Verdict::Healthy),
        ]);
    }

    #[test]
    fn a_silent_stage_is_stuck_and_reported_first() {
        let stuck = At { stages: vec![("events", 29.0), ("publish", 5.0)], queue_depth: 8, ..flowing(30.0) };
        check(&[(stuck, Verdict::Unhealthy(Problem::StageStuck { stage: "publish".into(), silent_for: secs(25.0) }))]);
    }

    #[test]
    fn a_zero_capacity_queue_is_never_full() {
        check(&[
            (At { queue_capacity: 0, ..flowing(1.0) }, Verdict::Healthy),
            (At { queue_capacity: 0, ..flowing(30.0) }, Verdict::Healthy),
        ]);
    }

    #[test]
    fn problems_read_as_one_line() {
        let text = Problem::QueueFull { full_for: secs(12.3) }.to_string();
        assert_eq!(text, "inference is behind: queue full for 12.3s, dropping windows");
        assert_eq!(Problem::NoWindows { quiet_for: secs(11.0) }.to_string(), "no windows from any source for 11.0s");
    }
}
