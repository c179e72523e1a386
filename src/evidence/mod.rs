//! Evidence: a JPEG snapshot at each event's start and an audio-visual clip from `pre_roll`
//! before its start to `post_roll` after its end, kept under `[evidence] dir` (one folder per
//! source, files named by event id) with retention by size and age.
//!
//! Threads: the store thread (`evidence`) owns one [`ring::Ring`] per source, fed by the
//! sources' evidence branches through a bounded channel (capture drops, never waits), and
//! answers the events thread's requests at once: a snapshot is a still already encoded by
//! GStreamer, written and handed back; a clip is planned, cut when the ring holds its
//! post-roll, and written by the clip thread (`evidence-clip`), whose encoding may take
//! seconds. The events thread waits for an answer at most [`ANSWER_TIMEOUT`]: a slow or
//! full disk gives an event without evidence, flagged, never a late event.

mod retention;
mod ring;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded, select};
use time::OffsetDateTime;

use crate::capture::{self, ClipMedia};
use crate::config::{EvidenceSettings, SourceEvidence, SourceSettings};
use crate::events::Event;
use crate::media::EvidenceMedia;
use crate::telemetry;

pub use retention::enforce as enforce_retention;
use ring::Ring;

/// Longest the events thread waits for the store's answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_millis(300);
/// Media the store may be behind by before capture drops them (about 10 s of 3 sources).
const MEDIA_CAPACITY: usize = 4096;
/// Clips waiting for the clip thread.
const CLIP_QUEUE: usize = 4;
/// The ring keeps this much more than `pre_roll`: the start of an event is known a few
/// windows (and an inference) after the fact.
const RING_SLACK: Duration = Duration::from_secs(15);
/// A clip whose post-roll never arrives (the source stopped) is written this long after it
/// was due, with what there is.
const CLIP_GRACE: Duration = Duration::from_secs(10);
/// How often retention runs besides after each write.
const RETENTION_PERIOD: Duration = Duration::from_secs(60);
/// A snapshot is a still this close to the middle of its window, or none.
const STILL_WITHIN: Duration = Duration::from_secs(5);
/// Longest a stop waits for the clips still being written (systemd's stop timeout is 20 s).
const STOP_DEADLINE: Duration = Duration::from_secs(12);

/// A snapshot written for an event's start.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Relative to the evidence dir: `<source>/<event id>.jpg`.
    pub path: String,
    pub jpeg: Arc<Vec<u8>>,
}

/// A clip the clip thread finished (or failed to).
#[derive(Debug, Clone)]
pub struct ClipDone {
    pub event_id: String,
    pub source: String,
    /// Relative to the evidence dir.
    pub path: String,
    pub result: Result<ClipInfo, String>,
}

#[derive(Debug, Clone, Copy)]
pub struct ClipInfo {
    pub bytes: u64,
    pub duration: Duration,
}

enum Request {
    Start {
        event: Event,
        reply: Sender<Result<Snapshot, String>>,
    },
    End {
        event: Event,
        reply: Sender<Result<String, String>>,
    },
    Configure {
        settings: EvidenceSettings,
        sources: HashMap<String, SourceEvidence>,
    },
    /// Write the planned clips with what the rings hold, then end.
    Stop,
}

/// The running store. Dropping it (or [`EvidenceStore::stop`]) writes the clips still
/// planned with what the rings hold and joins both threads.
pub struct EvidenceStore {
    requests: Option<Sender<Request>>,
    media: Sender<EvidenceMedia>,
    done: Receiver<ClipDone>,
    dir: PathBuf,
    thread: Option<JoinHandle<()>>,
}

/// What the events thread holds to ask the store.
#[derive(Clone)]
pub struct EvidenceClient {
    requests: Sender<Request>,
    done: Receiver<ClipDone>,
}

/// Finds evidence files for the HTTP server: `<dir>/<source>/<id>.<ext>`.
#[derive(Clone, Debug)]
pub struct EvidenceFiles {
    dir: PathBuf,
}

impl EvidenceStore {
    /// Creates the evidence dir and starts the threads. A dir that cannot be made is logged:
    /// events go out without evidence, flagged, rather than not at all.
    pub fn start(settings: EvidenceSettings, sources: &[SourceSettings]) -> anyhow::Result<EvidenceStore> {
        if settings.enabled
            && let Err(err) = std::fs::create_dir_all(&settings.dir)
        {
            tracing::error!(dir = %settings.dir.display(), error = %err, "cannot create the evidence dir");
        }
        let (requests, requests_rx) = bounded(64);
        let (media, media_rx) = bounded(MEDIA_CAPACITY);
        let (done_tx, done) = bounded(64);
        let dir = settings.dir.clone();
        let store = Store {
            settings,
            sources: per_source(sources),
            rings: HashMap::new(),
            open: HashMap::new(),
            planned: Vec::new(),
            clips: None,
            done: done_tx,
        };
        let thread = std::thread::Builder::new()
            .name("evidence".into())
            .spawn(move || store.run(requests_rx, media_rx))
            .map_err(|err| anyhow::anyhow!("spawning the evidence thread: {err}"))?;
        Ok(EvidenceStore { requests: Some(requests), media, done, dir, thread: Some(thread) })
    }

    /// Where sources send their evidence media.
    pub fn media(&self) -> Sender<EvidenceMedia> {
        self.media.clone()
    }

    pub fn client(&self) -> EvidenceClient {
        EvidenceClient { requests: self.requests.clone().expect("set until stop"), done: self.done.clone() }
    }

    pub fn files(&self) -> EvidenceFiles {
        EvidenceFiles { dir: self.dir.clone() }
    }

    /// New settings (a reload); sources that changed were restarted by then.
    /// `dir` is kept: a new one applies at the next start (the HTTP server and the clip
    /// thread keep serving and cleaning the one they have).
    pub fn configure(&self, mut settings: EvidenceSettings, sources: &[SourceSettings]) {
        if settings.dir != self.dir {
            tracing::warn!(
                running = %self.dir.display(), configured = %settings.dir.display(),
                "[evidence] dir changes apply at the next start"
            );
            settings.dir = self.dir.clone();
        }
        if let Some(requests) = &self.requests {
            let request = Request::Configure { settings, sources: per_source(sources) };
            if requests.send_timeout(request, Duration::from_secs(1)).is_err() {
                tracing::warn!("the evidence store is busy; its new settings apply at the next reload");
            }
        }
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        // The thread writes its planned clips and ends (clients left over get "busy").
        if let Some(requests) = self.requests.take() {
            let _ = requests.send_timeout(Request::Stop, Duration::from_secs(1));
        }
        if let Some(thread) = self.thread.take() {
            // Clips still being written get until the deadline; past it the daemon stops
            // without them (their `.part` files are removed by retention later).
            let deadline = Instant::now() + STOP_DEADLINE;
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                tracing::warn!("stopping while evidence clips are still being written");
            }
        }
    }
}

impl Drop for EvidenceStore {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl EvidenceClient {
    /// A snapshot for `event`'s start; `Err` says why there is none.
    pub fn snapshot(&self, event: &Event) -> Result<Snapshot, String> {
        let (reply, answer) = bounded(1);
        self.ask(Request::Start { event: event.clone(), reply }, &answer)
    }

    /// Plans `event`'s clip; the path it will have, or why there will be none. The clip comes
    /// out on [`EvidenceClient::clips_done`] once the post-roll has passed.
    pub fn clip(&self, event: &Event) -> Result<String, String> {
        let (reply, answer) = bounded(1);
        self.ask(Request::End { event: event.clone(), reply }, &answer)
    }

    pub fn clips_done(&self) -> &Receiver<ClipDone> {
        &self.done
    }

    fn ask<T>(&self, request: Request, answer: &Receiver<Result<T, String>>) -> Result<T, String> {
        self.requests.try_send(request).map_err(|_| "the evidence store is busy".to_string())?;
        answer.recv_timeout(ANSWER_TIMEOUT).unwrap_or_else(|_| Err("the evidence store did not answer in time".into()))
    }
}

impl EvidenceFiles {
    /// The bytes of `<id>.<ext>` of any source, when `id` is an event id the daemon could
    /// have made (so nothing outside the dir is ever read).
    pub fn read(&self, id: &str, extension: &str) -> Option<Vec<u8>> {
        let valid = !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !valid || !matches!(extension, "jpg" | "webm" | "mp4") {
            return None;
        }
        for entry in std::fs::read_dir(&self.dir).ok()?.flatten() {
            let path = entry.path().join(format!("{id}.{extension}"));
            if let Ok(bytes) = std::fs::read(&path) {
                return Some(bytes);
            }
        }
        None
    }
}

fn per_source(sources: &[SourceSettings]) -> HashMap<String, SourceEvidence> {
    sources.iter().map(|source| (source.name.clone(), source.evidence)).collect()
}

/// A clip waiting for its post-roll.
struct Planned {
    event_id: String,
    source: String,
    path: String,
    from: OffsetDateTime,
    to: OffsetDateTime,
    due: Instant,
}

struct ClipJob {
    planned: Planned,
    media: ClipMedia,
    /// `max_bytes`, `max_age` in force when the clip was cut.
    limits: (u64, Duration),
}

struct Store {
    settings: EvidenceSettings,
    sources: HashMap<String, SourceEvidence>,
    rings: HashMap<String, Ring>,
    /// Open events: id -> (source, start time), so their start stays in the ring.
    open: HashMap<String, (String, OffsetDateTime)>,
    planned: Vec<Planned>,
    clips: Option<(Sender<ClipJob>, JoinHandle<()>)>,
    done: Sender<ClipDone>,
}

impl Store {
    fn run(mut self, requests: Receiver<Request>, media: Receiver<EvidenceMedia>) {
        let mut last_retention = Instant::now() - RETENTION_PERIOD;
        let mut requests_open = true;
        while requests_open {
            select! {
                recv(media) -> message => if let Ok(media) = message {
                    self.take(media);
                },
                recv(requests) -> message => match message {
                    Ok(Request::Stop) | Err(_) => requests_open = false,
                    Ok(request) => self.answer(request),
                },
                default(Duration::from_millis(200)) => {}
            }
            self.cut_ready(false);
            telemetry::evidence_rings(self.rings.values().map(|ring| ring.bytes() as u64).sum());
            if last_retention.elapsed() >= RETENTION_PERIOD {
                last_retention = Instant::now();
                retention::enforce(&self.settings.dir, self.settings.max_bytes, self.settings.max_age);
            }
        }
        // Stopping: what arrived is all there will be.
        while let Ok(message) = media.try_recv() {
            self.take(message);
        }
        self.cut_ready(true);
        if let Some((jobs, thread)) = self.clips.take() {
            drop(jobs);
            let _ = thread.join();
        }
    }

    fn take(&mut self, media: EvidenceMedia) {
        let EvidenceMedia { source, utc, kind } = media;
        let source: &str = &source;
        let Some(settings) = self.sources.get(source).copied() else { return };
        // Many media a second: the source's name is copied only for its first.
        if !self.rings.contains_key(source) {
            self.rings.insert(source.to_owned(), Ring::default());
        }
        let ring = self.rings.get_mut(source).expect("inserted above");
        ring.push(utc, kind);
        // Keep pre-roll plus slack, and every open event's start minus pre-roll, but never
        // more than the longest clip.
        let newest = ring.newest().unwrap_or(utc);
        let mut keep_from = newest - (settings.pre_roll + RING_SLACK);
        for (open_source, start) in self.open.values() {
            if *open_source == source {
                keep_from = keep_from.min(*start - settings.pre_roll);
            }
        }
        // An ended event's clip waits for its post-roll: its start must stay too.
        for planned in self.planned.iter().filter(|planned| planned.source == source) {
            keep_from = keep_from.min(planned.from);
        }
        let longest = self.settings.max_clip + settings.pre_roll + settings.post_roll + RING_SLACK;
        let hard_from = newest - longest;
        ring.trim(keep_from.max(hard_from), hard_from);
    }

    fn answer(&mut self, request: Request) {
        match request {
            Request::Configure { settings, sources } => {
                self.settings = settings;
                // A source whose evidence settings changed was restarted with a new branch
                // (stills only instead of H.264, another width): its old media go.
                let old = std::mem::replace(&mut self.sources, sources);
                self.rings.retain(|source, _| {
                    self.sources.get(source).is_some_and(|now| now.enabled && old.get(source) == Some(now))
                });
            }
            Request::Start { event, reply } => {
                self.open.insert(event.id.clone(), (event.source.clone(), event.start_time));
                let written = self.snapshot(&event);
                let ok = written.is_ok();
                let _ = reply.send(written);
                // Retention after the answer: the events thread does not wait for a dir walk.
                if ok {
                    retention::enforce(&self.settings.dir, self.settings.max_bytes, self.settings.max_age);
                }
            }
            Request::End { event, reply } => {
                self.open.remove(&event.id);
                let _ = reply.send(self.plan(&event));
            }
            Request::Stop => {}
        }
    }

    fn snapshot(&self, event: &Event) -> Result<Snapshot, String> {
        let fail = |reason: String| {
            telemetry::evidence_failed(&event.source, "snapshot", &reason);
            Err(reason)
        };
        let ring = self.rings.get(&event.source).ok_or_else(|| "no evidence from this source yet".to_string())?;
        let middle = event.window_start + (event.window_end - event.window_start) / 2;
        let Some(jpeg) = ring.still_near(middle, STILL_WITHIN) else {
            return fail("no frame near the window".into());
        };
        let path = format!("{}/{}.jpg", event.source, event.id);
        let began = Instant::now();
        match write_file(&self.settings.dir.join(&path), &jpeg) {
            Ok(()) => {
                let took = began.elapsed();
                telemetry::evidence_written(&event.source, "snapshot", Path::new(&path), jpeg.len() as u64, took);
                Ok(Snapshot { path, jpeg })
            }
            Err(err) => fail(format!("cannot write {path}: {err}")),
        }
    }

    fn plan(&mut self, event: &Event) -> Result<String, String> {
        let Some(settings) = self.sources.get(&event.source).copied().filter(|settings| settings.enabled) else {
            return Err("no evidence for this source".into());
        };
        let Some(ring) = self.rings.get(&event.source) else { return Err("no evidence from this source yet".into()) };
        let end = event.end_time.unwrap_or(event.window_end);
        let extension = if ring.copies_video() { "mp4" } else { "webm" };
        let path = format!("{}/{}.{extension}", event.source, event.id);
        let mut from = event.start_time - settings.pre_roll;
        let to = end + settings.post_roll;
        if to - from > self.settings.max_clip {
            from = to - self.settings.max_clip;
        }
        // Due once the post-roll has been lived through, on the wall clock.
        let wait = Duration::try_from(to - OffsetDateTime::now_utc()).unwrap_or_default();
        self.planned.push(Planned {
            event_id: event.id.clone(),
            source: event.source.clone(),
            path: path.clone(),
            from,
            to,
            due: Instant::now() + wait,
        });
        Ok(path)
    }

    /// Cuts and hands to the clip thread every planned clip whose post-roll the ring holds
    /// (or that is overdue, or all of them when `stopping`).
    fn cut_ready(&mut self, stopping: bool) {
        let mut idx = 0;
        while idx < self.planned.len() {
            let planned = &self.planned[idx];
            let newest = self.rings.get(&planned.source).and_then(Ring::newest);
            let ready = stopping
                || newest.is_some_and(|newest| newest >= planned.to)
                || Instant::now() >= planned.due + CLIP_GRACE;
            if !ready {
                idx += 1;
                continue;
            }
            let planned = self.planned.swap_remove(idx);
            let media = self.rings.get(&planned.source).and_then(|ring| ring.cut(planned.from, planned.to));
            let limits = (self.settings.max_bytes, self.settings.max_age);
            match media {
                Some(media) => self.hand_over(ClipJob { planned, media, limits }),
                None => self.finish(planned, Err("nothing of the event was kept".into())),
            }
        }
    }

    fn hand_over(&mut self, job: ClipJob) {
        if self.clips.is_none() {
            let (jobs, jobs_rx) = bounded::<ClipJob>(CLIP_QUEUE);
            let dir = self.settings.dir.clone();
            let done = self.done.clone();
            match std::thread::Builder::new().name("evidence-clip".into()).spawn(move || {
                for job in jobs_rx {
                    let (max_bytes, max_age) = job.limits;
                    let outcome = write_job(&dir, job);
                    retention::enforce(&dir, max_bytes, max_age);
                    let _ = done.try_send(outcome);
                }
            }) {
                Ok(thread) => self.clips = Some((jobs, thread)),
                Err(err) => return self.finish(job.planned, Err(format!("cannot start the clip thread: {err}"))),
            }
        }
        let (jobs, _) = self.clips.as_ref().expect("started above");
        if let Err(err) = jobs.try_send(job) {
            let job = err.into_inner();
            self.finish(job.planned, Err("the clip writer is busy with other clips".into()));
        }
    }

    fn finish(&self, planned: Planned, result: Result<ClipInfo, String>) {
        if let Err(reason) = &result {
            telemetry::evidence_failed(&planned.source, "clip", reason);
        }
        let _ = self.done.try_send(ClipDone {
            event_id: planned.event_id,
            source: planned.source,
            path: planned.path,
            result,
        });
    }
}

fn write_job(dir: &Path, job: ClipJob) -> ClipDone {
    let ClipJob { mut planned, media, .. } = job;
    // The container follows what was cut (an RTSP camera whose H.264 stopped coming gives
    // stills): the `clip` message names the file as written.
    if let Some((stem, _)) = planned.path.rsplit_once('.') {
        planned.path = format!("{stem}.{}", media.extension());
    }
    let target = dir.join(&planned.path);
    let duration = media.length;
    let began = Instant::now();
    let result = (|| {
        let folder = target.parent().ok_or("no folder")?;
        std::fs::create_dir_all(folder).map_err(|err| format!("cannot create {}: {err}", folder.display()))?;
        let partial = folder.join(format!(".{}.part", planned.event_id));
        let written = capture::write_clip(media, &partial)
            .and_then(|()| std::fs::rename(&partial, &target).map_err(anyhow::Error::from));
        if let Err(err) = written {
            let _ = std::fs::remove_file(&partial);
            return Err(format!("cannot write {}: {err:#}", planned.path));
        }
        let bytes = std::fs::metadata(&target).map(|meta| meta.len()).unwrap_or(0);
        Ok(ClipInfo { bytes, duration })
    })();
    match &result {
        Ok(info) => {
            telemetry::evidence_written(&planned.source, "clip", Path::new(&planned.path), info.bytes, began.elapsed())
        }
        Err(reason) => telemetry::evidence_failed(&planned.source, "clip", reason),
    }
    ClipDone { event_id: planned.event_id, source: planned.source, path: planned.path, result }
}

/// Writes `bytes` to `path` whole: a temporary file renamed over it.
fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let folder = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(folder)?;
    let partial = folder.join(format!(".{}.part", path.file_name().and_then(|n| n.to_str()).unwrap_or("evidence")));
    let written = std::fs::write(&partial, bytes).and_then(|()| std::fs::rename(&partial, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{EventKind, LabelScores};
    use crate::media::EvidenceKind;

    /// An event that lasts longer than the ring's slack (30 s against pre_roll + 15 s) and
    /// whose post-roll arrives after its end: its clip still starts at `pre_roll` before its
    /// start (the planned clip holds its start in the ring). Audio only, so the clip is an
    /// Opus WebM; time runs as fast as the media are handed in.
    #[test]
    fn a_long_events_clip_keeps_its_start_while_it_waits_for_its_post_roll() {
        crate::capture::init().expect("GStreamer");
        let root = tempfile::tempdir().expect("tempdir");
        let text = "[model]\npath = \"m.onnx\"\n\n[[source]]\nname = \"porch\"\nkind = \"test\"\n";
        let mut source =
            crate::config::Settings::from_toml_str(Path::new("t.toml"), text).expect("config").sources.remove(0);
        source.evidence.pre_roll = Duration::from_secs(1);
        source.evidence.post_roll = Duration::from_secs(2);
        let settings = EvidenceSettings {
            enabled: true,
            dir: root.path().join("evidence"),
            max_bytes: 1 << 30,
            max_age: Duration::from_secs(3600),
            max_clip: Duration::from_secs(120),
            default: source.evidence,
        };
        let store = EvidenceStore::start(settings, std::slice::from_ref(&source)).expect("store");
        let media = store.media();
        let base = OffsetDateTime::now_utc() - Duration::from_secs(120);
        let at = |seconds: f64| base + Duration::from_secs_f64(seconds);
        let feed = |from: u32, to: u32| {
            for tenth in from..to {
                let samples =
                    (0..1600).map(|n| (f64::from(n) * 440.0 / 16_000.0 * std::f64::consts::TAU).sin() as f32 * 0.3);
                let kind = EvidenceKind::Audio { samples: samples.collect(), rate: 16_000 };
                media
                    .send(EvidenceMedia { source: "porch".into(), utc: at(f64::from(tenth) / 10.0), kind })
                    .expect("send");
            }
            // The store takes media and requests from two channels: let it catch up.
            std::thread::sleep(Duration::from_millis(300));
        };
        let event = |kind: EventKind, end: Option<f64>| Event {
            kind,
            id: "0b6f3c1e-5a7d-4f0e-9a51-3f1c2d4e5a6b".into(),
            source: "porch".into(),
            label: "tone".into(),
            score: 0.9,
            peak_score: 0.9,
            scores: LabelScores { fused: 0.9, audio: None, video: None },
            start_time: at(5.0),
            end_time: end.map(at),
            window_start: at(4.0),
            window_end: at(5.0),
            degraded: None,
        };
        let client = store.client();
        feed(0, 100);
        assert!(client.snapshot(&event(EventKind::Start, None)).is_err(), "no stills, no snapshot");
        feed(100, 400);
        // Ends at 39 s; its post-roll (to 41 s) is not in the ring yet.
        assert_eq!(
            client.clip(&event(EventKind::End, Some(39.0))).expect("planned"),
            "porch/0b6f3c1e-5a7d-4f0e-9a51-3f1c2d4e5a6b.webm"
        );
        feed(400, 600);
        let done = client.clips_done().recv_timeout(Duration::from_secs(30)).expect("a clip");
        let info = done.result.expect("written");
        // From 4 s (start - pre_roll) to 41 s (end + post_roll).
        assert!((info.duration.as_secs_f64() - 37.0).abs() < 0.05, "{:?}", info.duration);
        assert!(root.path().join("evidence").join(&done.path).exists());
        store.stop();
    }

    #[test]
    fn files_are_found_by_event_id_only_and_nothing_outside_the_dir_is_read() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("evidence");
        std::fs::create_dir_all(dir.join("porch")).expect("mkdir");
        std::fs::write(dir.join("porch/6f1e3a52-0c4b.jpg"), b"jpeg").expect("write");
        std::fs::write(root.path().join("secret.jpg"), b"secret").expect("write");
        let files = EvidenceFiles { dir };
        assert_eq!(files.read("6f1e3a52-0c4b", "jpg").as_deref(), Some(&b"jpeg"[..]));
        assert_eq!(files.read("6f1e3a52-0c4b", "webm"), None);
        for id in ["../secret", "..", "", "porch/6f1e3a52-0c4b", "a b", &"a".repeat(65)] {
            assert_eq!(files.read(id, "jpg"), None, "{id:?}");
        }
        assert_eq!(files.read("6f1e3a52-0c4b", "jpg/../../secret.jpg"), None);
    }
}
