//! The MQTT publisher: two threads around rumqttc's sync `Client` / `Connection`.
//!
//! - `mqtt-conn` drives the connection: it reconnects with capped, jittered exponential
//!   backoff, logs each failure with a reason and a hint, and maps broker acknowledgements
//!   (PUBACK for QoS 1, the socket write for QoS 0) back to spool seqs.
//! - `mqtt-publish` owns what goes out: it replays the spool in seq order on every (re)connect
//!   with `replayed: true`, sends new events, retained availability, source status, label
//!   states and control states (all republished on every connect), Home Assistant discovery,
//!   scores, sound levels and stats, and removes events from the spool once acked.
//! - Control commands (`.../labels/<label>/{enabled,threshold}/set`) arrive on the connection
//!   thread and go, parsed, to [`Publisher::controls`]; the daemon applies and persists them
//!   and echoes their state back through [`Publisher::set_label_control`].
//!
//! Every event is appended and fsynced to the spool on the caller's thread before
//! [`Publisher::publish_event`] returns, so nothing that call accepted is lost by a crash.
//!
//! Mapping acks to seqs: rumqttc reports only packet ids, in request order. Each request the
//! publisher enqueues pushes a tag onto a FIFO, under one lock with a non-blocking enqueue,
//! so tags and requests keep the same order. rumqttc drops queued requests when a new clean
//! session starts, so after every CONNACK the connection thread clears the FIFO and enqueues
//! a *barrier* (an UNSUBSCRIBE of a topic nobody uses) under the same lock; publishes that
//! rumqttc reports before the barrier are leftovers of the old connection and are ignored
//! (their events are still in the spool and are replayed). Only publishes after the barrier
//! pop tags.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use rumqttc::{
    Client, Connection, Event as MqttEvent, Incoming, LastWill, MqttOptions, Outgoing, QoS, TlsConfiguration, Transport,
};
use serde_json::{Map, Value};
use time::OffsetDateTime;

use super::payload::{self, Control, EventPayload, EvidencePayload, ModelInfo, PublisherInfo, Topics};
use super::spool::{Spool, SpoolError, SpoolStats};
use super::telemetry::{PublishCounters, PublishStats};
pub use crate::capture::SourceStatus;
use crate::delivery::{MqttSettings, SpoolSettings};
use crate::events::{Event, EventKind};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("reading {what} {path}: {source}")]
    TlsFile { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("mqtts:// without mqtt.ca needs the system CA bundle, and none was found")]
    NoSystemCa,
    #[error("starting a publisher thread: {0}")]
    Thread(std::io::Error),
    #[error("the publisher has stopped")]
    Stopped,
}

/// Publishes events and the rest of the contract's topics; see the module docs.
pub struct Publisher {
    commands: Sender<Message>,
    spool: Arc<Mutex<Spool>>,
    counters: Arc<PublishCounters>,
    device_id: String,
    model: ModelInfo,
    publish_scores: bool,
    topics: Topics,
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    controls: Receiver<Control>,
}

/// Control commands waiting for the daemon; they come at human pace, so a full channel (the
/// daemon not reading) drops the command with a warning.
const CONTROLS_QUEUE: usize = 64;

impl Publisher {
    /// Opens the spool and starts the threads; connecting happens in the background, so a
    /// broker that is down does not stop the daemon from starting.
    pub fn start(
        settings: MqttSettings,
        spool_settings: SpoolSettings,
        info: PublisherInfo,
    ) -> Result<Publisher, PublishError> {
        let spool = Arc::new(Mutex::new(Spool::open(spool_settings)?));
        let topics = Topics::new(&settings.topic_prefix, &settings.device_id, &settings.discovery_prefix);
        let options = mqtt_options(&settings, &topics)?;
        let (client, connection) = Client::new(options, REQUEST_QUEUE);
        let (tx, rx) = crossbeam_channel::unbounded();
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
        let (controls_tx, controls) = crossbeam_channel::bounded::<Control>(CONTROLS_QUEUE);
        // Every label starts OFF: a daemon that starts has no open event (a retained ON left
        // by one that was killed is corrected on the first connect).
        let retained: BTreeMap<String, Vec<u8>> = info
            .sources
            .iter()
            .flat_map(|source| info.enabled_labels.iter().map(move |label| (source, label)))
            .map(|(source, label)| (topics.label_state(source, label), payload::label_state_message(None)))
            .collect();
        let counters = Arc::new(PublishCounters::default());
        let shared = Arc::new(Mutex::new(Shared { mode: Mode::Disconnected, tags: VecDeque::new() }));
        let stop = Arc::new(AtomicBool::new(false));

        let conn = ConnectionLoop {
            connection,
            client: client.clone(),
            shared: Arc::clone(&shared),
            to_worker: tx.clone(),
            stop_rx,
            stop: Arc::clone(&stop),
            counters: Arc::clone(&counters),
            topics: topics.clone(),
            url: settings.url.to_string(),
            qos0_events: settings.qos == 0,
            info: info.clone(),
            controls: controls_tx,
        };
        let worker = Worker {
            client,
            shared,
            spool: Arc::clone(&spool),
            counters: Arc::clone(&counters),
            topics: topics.clone(),
            settings: settings.clone(),
            info: info.clone(),
            stop: Arc::clone(&stop),
            stop_tx,
            connected: false,
            to_send: VecDeque::new(),
            queued: HashSet::new(),
            outbox: VecDeque::new(),
            statuses: BTreeMap::new(),
            retained,
            runtime_stats: Map::new(),
            shutdown: None,
        };
        let conn_thread = std::thread::Builder::new()
            .name("mqtt-conn".to_owned())
            .spawn(move || conn.run())
            .map_err(PublishError::Thread)?;
        let worker_thread = std::thread::Builder::new()
            .name("mqtt-publish".to_owned())
            .spawn(move || worker.run(rx))
            .map_err(PublishError::Thread)?;
        Ok(Publisher {
            commands: tx,
            spool,
            counters,
            device_id: settings.device_id,
            model: info.model,
            publish_scores: settings.publish_scores,
            topics,
            threads: vec![worker_thread, conn_thread],
            stop,
            controls,
        })
    }

    /// Spools the event (assigning its `seq`, fsynced before this returns), then hands it to
    /// the publishing thread. Returns the seq.
    pub fn publish_event(&self, event: &Event, evidence: Option<&EvidencePayload>) -> Result<u64, PublishError> {
        let mut spool = lock(&self.spool);
        let result = spool.append(|seq| {
            let mut payload = EventPayload::new(event, seq, &self.device_id, &self.model);
            payload.evidence = evidence.cloned();
            payload.to_spool_bytes()
        });
        match result {
            Ok(seq) => {
                self.counters.event_spooled();
                // Sent under the spool lock so the worker sees seqs in order.
                self.commands.send(Message::Spooled(seq)).map_err(|_| PublishError::Stopped)?;
                if matches!(event.kind, EventKind::Start | EventKind::End) {
                    let topic = self.topics.label_state(&event.source, &event.label);
                    let _ = self.commands.send(Message::Retained(topic, payload::label_state_message(Some(event))));
                }
                Ok(seq)
            }
            Err(e) => {
                self.counters.spool_error(&e);
                Err(e.into())
            }
        }
    }

    /// Sets a source's retained status; republished on every reconnect.
    pub fn set_source_status(&self, source: &str, status: SourceStatus) {
        let _ = self.commands.send(Message::Status(source.to_owned(), status));
    }

    /// Control commands from MQTT (Home Assistant's switches and numbers), parsed.
    pub fn controls(&self) -> Receiver<Control> {
        self.controls.clone()
    }

    /// The retained state of a label's controls on a source, as the daemon now applies them;
    /// republished on every reconnect.
    pub fn set_label_control(&self, source: &str, label: &str, enabled: bool, threshold: f32) {
        let enabled = if enabled { "ON" } else { "OFF" };
        let _ = self.commands.send(Message::Retained(self.topics.label_enabled(source, label), enabled.into()));
        let threshold = format!("{}", (threshold * 10_000.0).round() / 10_000.0);
        let _ = self.commands.send(Message::Retained(self.topics.label_threshold(source, label), threshold.into()));
    }

    /// Publishes a source's sound level (dBFS, retained, QoS 0); dropped while disconnected.
    pub fn publish_sound_level(&self, source: &str, dbfs: f32) {
        if !dbfs.is_finite() {
            return;
        }
        let _ = self.commands.send(Message::Outgoing(OutMessage {
            topic: self.topics.sound_level(source),
            qos: QoS::AtMostOnce,
            retain: true,
            payload: format!("{dbfs:.1}").into_bytes(),
        }));
    }

    /// Sets the source's retained snapshot (JPEG bytes; Home Assistant's image entity).
    /// A JPEG too large for one MQTT packet (with room for the topic) is not published: the
    /// broker connection would fail on it, and being retained, on every reconnect.
    pub fn publish_snapshot(&self, source: &str, jpeg: Vec<u8>) {
        if jpeg.len() > MAX_PACKET / 2 {
            tracing::warn!(
                source,
                bytes = jpeg.len(),
                "snapshot too large for MQTT; kept on disk and served over HTTP only"
            );
            return;
        }
        let _ = self.commands.send(Message::Retained(self.topics.snapshot(source), jpeg));
    }

    /// Announces a finished (or failed) clip on the source's `clip` topic (QoS 1).
    pub fn publish_clip(&self, source: &str, message: Vec<u8>) {
        let _ = self.commands.send(Message::Outgoing(OutMessage {
            topic: self.topics.clip(source),
            qos: QoS::AtLeastOnce,
            retain: false,
            payload: message,
        }));
    }

    /// Publishes a window's scores message (`payload::scores_message`: top scores and sound
    /// level) on `source`'s scores topic (QoS 0) when `mqtt.publish_scores` is on. The caller
    /// builds it once for MQTT and the page alike.
    pub fn publish_scores(&self, source: &str, message: Vec<u8>) {
        if !self.publish_scores {
            return;
        }
        let _ = self.commands.send(Message::Outgoing(OutMessage {
            topic: self.topics.scores(source),
            qos: QoS::AtMostOnce,
            retain: false,
            payload: message,
        }));
    }

    /// Replaces the `runtime` part of the periodic stats message.
    pub fn set_runtime_stats(&self, stats: Map<String, Value>) {
        let _ = self.commands.send(Message::RuntimeStats(stats));
    }

    /// Publishes a stats message now (also done every `stats_interval`).
    pub fn publish_stats_now(&self) {
        let _ = self.commands.send(Message::StatsNow);
    }

    pub fn stats(&self) -> PublishStats {
        self.counters.snapshot()
    }

    pub fn spool_stats(&self) -> SpoolStats {
        lock(&self.spool).stats()
    }

    /// Why the spool's disk refuses writes, while it does (events are held in memory).
    pub fn spool_unwritable(&self) -> Option<String> {
        lock(&self.spool).unwritable().map(str::to_owned)
    }

    /// Waits until every spooled event is acknowledged; false on timeout.
    pub fn wait_until_flushed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if lock(&self.spool).stats().records == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops cleanly: waits up to `flush_timeout` for outstanding acks, publishes every
    /// source and the availability as `offline`, disconnects. What is not acked stays in the
    /// spool for the next start.
    pub fn shutdown(mut self, flush_timeout: Duration) {
        self.stop_threads(flush_timeout);
    }

    fn stop_threads(&mut self, flush_timeout: Duration) {
        if self.threads.is_empty() {
            return;
        }
        let _ = self.commands.send(Message::Shutdown { flush_timeout });
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        self.stop.store(true, Ordering::Relaxed);
        tracing::info!(spooled = lock(&self.spool).stats().records, "publisher stopped");
    }
}

impl Drop for Publisher {
    /// A publisher dropped without [`Publisher::shutdown`] still stops cleanly, without
    /// waiting for acks.
    fn drop(&mut self) {
        self.stop_threads(Duration::ZERO);
    }
}

/// How often the worker tries to write events the disk refused back to the spool.
const SPOOL_RETRY: Duration = Duration::from_secs(1);

/// Capacity of rumqttc's request queue; the worker never blocks on it.
const REQUEST_QUEUE: usize = 512;
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
const MAX_PACKET: usize = 1024 * 1024;

fn mqtt_options(settings: &MqttSettings, topics: &Topics) -> Result<MqttOptions, PublishError> {
    let mut options = MqttOptions::new(settings.client_id.clone(), settings.url.host.clone(), settings.url.port);
    options
        .set_keep_alive(settings.keepalive.max(Duration::from_secs(5)))
        .set_clean_session(true)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET)
        .set_inflight(100)
        .set_last_will(LastWill::new(topics.availability(), "offline", QoS::AtLeastOnce, true));
    if let Some(username) = &settings.username {
        options.set_credentials(username.clone(), settings.password.clone().unwrap_or_default());
    }
    if settings.url.tls {
        let read = |what: &'static str, path: &Path| {
            std::fs::read(path).map_err(|source| PublishError::TlsFile { what, path: path.to_path_buf(), source })
        };
        let ca = match &settings.ca {
            Some(path) => read("mqtt.ca", path)?,
            None => SYSTEM_CA_BUNDLES.iter().find_map(|p| std::fs::read(p).ok()).ok_or(PublishError::NoSystemCa)?,
        };
        let client_auth = match (&settings.cert, &settings.key) {
            (Some(cert), Some(key)) => Some((read("mqtt.cert", cert)?, read("mqtt.key", key)?)),
            _ => None,
        };
        options.set_transport(Transport::Tls(TlsConfiguration::Simple { ca, alpn: None, client_auth }));
    }
    Ok(options)
}

const SYSTEM_CA_BUNDLES: &[&str] =
    &["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"];

/// Messages to the worker, from the API and from the connection thread.
enum Message {
    Spooled(u64),
    Status(String, SourceStatus),
    /// A retained message the broker must hold the latest of: sent now and on every connect.
    Retained(String, Vec<u8>),
    Outgoing(OutMessage),
    RuntimeStats(Map<String, Value>),
    StatsNow,
    Shutdown {
        flush_timeout: Duration,
    },
    /// The barrier passed: publishing may start.
    Connected,
    Lost,
    Acked(u64),
    HomeAssistantOnline,
}

struct OutMessage {
    topic: String,
    qos: QoS,
    retain: bool,
    payload: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Disconnected,
    /// Connected; waiting for the barrier to leave the request queue.
    AwaitBarrier,
    Connected,
}

#[derive(Debug, Clone, Copy)]
enum Tag {
    Event(u64),
    Other,
}

struct Shared {
    mode: Mode,
    tags: VecDeque<Tag>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicked thread must not take the publisher down with it.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct ConnectionLoop {
    connection: Connection,
    client: Client,
    shared: Arc<Mutex<Shared>>,
    to_worker: Sender<Message>,
    stop_rx: Receiver<()>,
    stop: Arc<AtomicBool>,
    counters: Arc<PublishCounters>,
    topics: Topics,
    url: String,
    qos0_events: bool,
    info: PublisherInfo,
    controls: Sender<Control>,
}

impl ConnectionLoop {
    fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        let mut pkid_to_seq: HashMap<u16, u64> = HashMap::new();
        let mut collided: Option<Tag> = None;
        let mut barrier_pending = false;
        let ha_status = self.topics.home_assistant_status();
        let mut connected = false;
        loop {
            // While connected, a stop ends with the worker's DISCONNECT going out (below).
            if !connected && self.stop.load(Ordering::Relaxed) {
                break;
            }
            let event = match self.connection.recv() {
                Err(_) => break, // every Client is gone
                Ok(Ok(event)) => event,
                Ok(Err(error)) => {
                    connected = false;
                    {
                        let mut shared = lock(&self.shared);
                        shared.mode = Mode::Disconnected;
                        shared.tags.clear();
                    }
                    pkid_to_seq.clear();
                    collided = None;
                    barrier_pending = false;
                    let _ = self.to_worker.send(Message::Lost);
                    if self.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let wait = jitter(backoff);
                    self.counters.broker_error(&self.url, &error, wait.as_millis() as u64);
                    // Wakes early (and stops) when the worker shuts down or goes away.
                    match self.stop_rx.recv_timeout(wait) {
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                        _ => break,
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            match event {
                MqttEvent::Incoming(Incoming::ConnAck(_)) => {
                    connected = true;
                    backoff = BACKOFF_MIN;
                    if self.stop.load(Ordering::Relaxed) {
                        // Connected after the worker stopped: say goodbye at once.
                        let _ = self.client.try_disconnect();
                        continue;
                    }
                    let mut shared = lock(&self.shared);
                    shared.mode = Mode::AwaitBarrier;
                    barrier_pending = true;
                    drop(shared);
                }
                MqttEvent::Outgoing(Outgoing::Unsubscribe(_)) => {
                    let mut shared = lock(&self.shared);
                    if shared.mode == Mode::AwaitBarrier && !barrier_pending {
                        shared.mode = Mode::Connected;
                        drop(shared);
                        let _ = self.to_worker.send(Message::Connected);
                    }
                }
                MqttEvent::Outgoing(Outgoing::Publish(pkid)) => {
                    let mut shared = lock(&self.shared);
                    if shared.mode == Mode::Connected {
                        let tag = collided.take().or_else(|| shared.tags.pop_front());
                        drop(shared);
                        if let Some(Tag::Event(seq)) = tag {
                            if self.qos0_events || pkid == 0 {
                                // QoS 0: written to the socket is as acknowledged as it gets.
                                let _ = self.to_worker.send(Message::Acked(seq));
                            } else {
                                pkid_to_seq.insert(pkid, seq);
                            }
                        }
                    }
                }
                MqttEvent::Outgoing(Outgoing::AwaitAck(_)) => {
                    // rumqttc holds a publish back until its packet id is free, then
                    // reports it as a Publish; its tag waits here meanwhile.
                    let mut shared = lock(&self.shared);
                    if shared.mode == Mode::Connected {
                        collided = shared.tags.pop_front();
                    }
                }
                MqttEvent::Incoming(Incoming::PubAck(ack)) => {
                    if let Some(seq) = pkid_to_seq.remove(&ack.pkid) {
                        let _ = self.to_worker.send(Message::Acked(seq));
                    }
                }
                MqttEvent::Incoming(Incoming::Publish(publish))
                    if publish.topic == ha_status && publish.payload.as_ref() == b"online" =>
                {
                    let _ = self.to_worker.send(Message::HomeAssistantOnline);
                }
                MqttEvent::Incoming(Incoming::Publish(publish))
                    if self.topics.parse_control(&publish.topic).is_some() =>
                {
                    match payload::parse_control(&self.topics, &self.info, &publish.topic, &publish.payload) {
                        Ok(control) => {
                            if self.controls.try_send(control).is_err() {
                                tracing::warn!(
                                    topic = publish.topic,
                                    "control command dropped: the daemon is not reading them"
                                );
                            }
                        }
                        Err(reason) => tracing::warn!(topic = publish.topic, reason, "control command ignored"),
                    }
                }
                MqttEvent::Outgoing(Outgoing::Disconnect) if self.stop.load(Ordering::Relaxed) => {
                    break;
                }
                _ => {}
            }
            if barrier_pending {
                // Enqueued under the lock with cleared tags: every tag pushed from now on
                // belongs to a request behind the barrier. A full queue only delays it.
                let mut shared = lock(&self.shared);
                if self.client.try_unsubscribe(self.topics.barrier()).is_ok() {
                    shared.tags.clear();
                    barrier_pending = false;
                }
            }
        }
        tracing::debug!("mqtt connection thread stopped");
    }
}

/// ±25 % so that a fleet does not reconnect in lockstep.
fn jitter(backoff: Duration) -> Duration {
    let factor = 0.75 + rand::random::<f64>() * 0.5;
    backoff.mul_f64(factor)
}

struct Worker {
    client: Client,
    shared: Arc<Mutex<Shared>>,
    spool: Arc<Mutex<Spool>>,
    counters: Arc<PublishCounters>,
    topics: Topics,
    settings: MqttSettings,
    info: PublisherInfo,
    stop: Arc<AtomicBool>,
    stop_tx: Sender<()>,
    connected: bool,
    /// Seqs to send on this connection, in order, and whether each is a replay.
    to_send: VecDeque<(u64, bool)>,
    /// Seqs queued or in flight on this connection (until acked), so none is sent twice.
    queued: HashSet<u64>,
    outbox: VecDeque<OutMessage>,
    statuses: BTreeMap<String, SourceStatus>,
    /// Retained label and control states by topic, republished on every connect.
    retained: BTreeMap<String, Vec<u8>>,
    runtime_stats: Map<String, Value>,
    shutdown: Option<Instant>,
}

enum SendResult {
    Sent,
    Full,
    NotConnected,
}

impl Worker {
    fn run(mut self, rx: Receiver<Message>) {
        let stats_interval = self.settings.stats_interval;
        let mut next_stats = Instant::now() + stats_interval;
        let mut next_spool_retry = Instant::now();
        loop {
            let backlog = self.connected && (!self.to_send.is_empty() || !self.outbox.is_empty());
            let wait = if backlog { Duration::from_millis(5) } else { Duration::from_millis(200) };
            match rx.recv_timeout(wait) {
                Ok(message) => self.handle(message),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            }
            while let Ok(message) = rx.try_recv() {
                self.handle(message);
            }
            self.pump();
            if Instant::now() >= next_spool_retry {
                // Events the disk did not take go to it as soon as it has room again.
                next_spool_retry = Instant::now() + SPOOL_RETRY;
                let mut spool = lock(&self.spool);
                if spool.unwritable().is_some() {
                    spool.retry_writes();
                }
            }
            if !stats_interval.is_zero() && Instant::now() >= next_stats {
                next_stats = Instant::now() + stats_interval;
                self.queue_stats();
            }
            if let Some(deadline) = self.shutdown {
                let flushed = lock(&self.spool).stats().records == 0;
                if !self.connected || flushed || Instant::now() >= deadline {
                    self.finish();
                    break;
                }
            }
        }
    }

    fn handle(&mut self, message: Message) {
        match message {
            Message::Spooled(seq) => {
                if self.connected && self.queued.insert(seq) {
                    self.to_send.push_back((seq, false));
                }
            }
            Message::Status(source, status) => {
                self.statuses.insert(source.clone(), status);
                self.outbox.push_back(status_message(&self.topics, &source, status));
            }
            Message::Retained(topic, payload) => {
                self.retained.insert(topic.clone(), payload.clone());
                // Offline, the latest is sent on connect with every retained message.
                if self.connected {
                    self.outbox.push_back(OutMessage { topic, qos: QoS::AtLeastOnce, retain: true, payload });
                }
            }
            Message::Outgoing(out) => {
                if self.connected {
                    self.outbox.push_back(out);
                } else {
                    self.counters.message_dropped_offline(&out.topic);
                }
            }
            Message::RuntimeStats(stats) => self.runtime_stats = stats,
            Message::StatsNow => self.queue_stats(),
            Message::Shutdown { flush_timeout } => {
                self.shutdown = Some(Instant::now() + flush_timeout);
            }
            Message::Connected => self.on_connected(),
            Message::Lost => {
                self.connected = false;
                self.to_send.clear();
                self.queued.clear();
                self.outbox.clear();
            }
            Message::Acked(seq) => {
                // `queued` only has to keep a seq from being sent twice while it is in flight;
                // kept after its ack it would grow by one entry per event for the daemon's life.
                self.queued.remove(&seq);
                let result = lock(&self.spool).ack(seq);
                match result {
                    Ok(()) => self.counters.event_acked(),
                    Err(e) => self.counters.spool_error(&e),
                }
            }
            Message::HomeAssistantOnline => {
                if self.connected && self.settings.home_assistant {
                    tracing::info!("home assistant announced itself: republishing discovery");
                    self.queue_discovery();
                }
            }
        }
    }

    fn on_connected(&mut self) {
        self.connected = true;
        self.to_send.clear();
        self.queued.clear();
        self.outbox.clear();
        let pending = lock(&self.spool).pending();
        match pending {
            Ok(records) => {
                for record in records {
                    self.queued.insert(record.seq);
                    self.to_send.push_back((record.seq, true));
                }
            }
            Err(e) => self.counters.spool_error(&e),
        }
        self.counters.broker_connected(&self.settings.url.to_string(), self.to_send.len() as u64);
        self.outbox.push_back(OutMessage {
            topic: self.topics.availability(),
            qos: QoS::AtLeastOnce,
            retain: true,
            payload: b"online".to_vec(),
        });
        for (source, status) in &self.statuses {
            self.outbox.push_back(status_message(&self.topics, source, *status));
        }
        for (topic, payload) in &self.retained {
            self.outbox.push_back(OutMessage {
                topic: topic.clone(),
                qos: QoS::AtLeastOnce,
                retain: true,
                payload: payload.clone(),
            });
        }
        if let Err(e) = self.client.try_subscribe(self.topics.control_filter(), QoS::AtLeastOnce) {
            tracing::warn!(error = %e, "subscribing to control commands failed");
        }
        if self.settings.home_assistant {
            if let Err(e) = self.client.try_subscribe(self.topics.home_assistant_status(), QoS::AtLeastOnce) {
                tracing::warn!(error = %e, "subscribing to home assistant status failed");
            }
            self.queue_discovery();
        }
    }

    fn queue_discovery(&mut self) {
        for (topic, payload) in payload::discovery_messages(&self.topics, &self.settings.device_id, &self.info) {
            self.outbox.push_back(OutMessage { topic, qos: QoS::AtLeastOnce, retain: true, payload });
        }
    }

    fn queue_stats(&mut self) {
        if !self.connected {
            return;
        }
        let spool = lock(&self.spool).stats();
        let spool = serde_json::json!({
            "records": spool.records,
            "bytes": spool.bytes,
            "next_seq": spool.next_seq,
            "dropped_overflow": spool.dropped_overflow,
            "dropped_age": spool.dropped_age,
            "corrupt_records_skipped": spool.corrupt_records_skipped,
            "unwritten": spool.unwritten,
            "unwritable": lock(&self.spool).unwritable(),
        });
        self.outbox.push_back(OutMessage {
            topic: self.topics.stats(),
            qos: QoS::AtMostOnce,
            retain: false,
            payload: payload::stats_message(
                &self.settings.device_id,
                OffsetDateTime::now_utc(),
                self.counters.to_json(),
                spool,
                &self.runtime_stats,
            ),
        });
    }

    /// Sends what it can without blocking: the outbox first (availability and status must
    /// precede replays), then events in seq order.
    fn pump(&mut self) {
        if !self.connected {
            return;
        }
        while let Some(out) = self.outbox.pop_front() {
            match self.try_send(&out.topic, out.qos, out.retain, out.payload.clone(), Tag::Other) {
                SendResult::Sent => {}
                SendResult::Full => {
                    self.outbox.push_front(out);
                    return;
                }
                SendResult::NotConnected => {
                    self.outbox.push_front(out);
                    return;
                }
            }
        }
        let qos = if self.settings.qos == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce };
        while let Some(&(seq, replayed)) = self.to_send.front() {
            let stored = lock(&self.spool).get(seq).map(|b| b.to_vec());
            let Some(stored) = stored else {
                // Dropped (overflow, age) or acked meanwhile.
                self.queued.remove(&seq);
                self.to_send.pop_front();
                continue;
            };
            let payload = match EventPayload::from_spool_bytes(&stored) {
                Ok(payload) => payload,
                Err(e) => {
                    tracing::error!(seq, error = %e, "spooled event unreadable: dropped");
                    let _ = lock(&self.spool).ack(seq);
                    self.queued.remove(&seq);
                    self.to_send.pop_front();
                    continue;
                }
            };
            let message = payload.to_message(replayed, OffsetDateTime::now_utc());
            match self.try_send(&self.topics.events(&payload.source), qos, false, message, Tag::Event(seq)) {
                SendResult::Sent => {
                    self.to_send.pop_front();
                    self.counters.event_sent(replayed);
                }
                SendResult::Full | SendResult::NotConnected => return,
            }
        }
    }

    fn try_send(&self, topic: &str, qos: QoS, retain: bool, payload: Vec<u8>, tag: Tag) -> SendResult {
        let mut shared = lock(&self.shared);
        if shared.mode != Mode::Connected {
            return SendResult::NotConnected;
        }
        match self.client.try_publish(topic, qos, retain, payload) {
            Ok(()) => {
                shared.tags.push_back(tag);
                SendResult::Sent
            }
            Err(_) => SendResult::Full,
        }
    }

    /// Last words of a clean stop: every source and the device go `offline`, then DISCONNECT
    /// (which tells the broker not to send the last will).
    fn finish(&mut self) {
        if self.connected {
            let mut farewell: Vec<OutMessage> = self
                .statuses
                .keys()
                .map(|source| status_message(&self.topics, source, SourceStatus::Offline))
                .collect();
            farewell.push(OutMessage {
                topic: self.topics.availability(),
                qos: QoS::AtLeastOnce,
                retain: true,
                payload: b"offline".to_vec(),
            });
            let deadline = Instant::now() + Duration::from_secs(2);
            for out in farewell {
                loop {
                    match self.try_send(&out.topic, out.qos, out.retain, out.payload.clone(), Tag::Other) {
                        SendResult::Full if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        _ => break,
                    }
                }
            }
        }
        self.stop.store(true, Ordering::Relaxed);
        if self.connected && self.client.try_disconnect().is_ok() {
            return; // the connection thread stops once DISCONNECT is written
        }
        // Not connected: wake the connection thread out of its backoff; dropping stop_tx
        // when this thread ends does the same.
        let _ = self.stop_tx.try_send(());
    }
}

fn status_message(topics: &Topics, source: &str, status: SourceStatus) -> OutMessage {
    OutMessage {
        topic: topics.status(source),
        qos: QoS::AtLeastOnce,
        retain: true,
        payload: status.as_str().as_bytes().to_vec(),
    }
}
