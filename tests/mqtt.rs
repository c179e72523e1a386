//! End-to-end tests of the `events` -> `publish` path against a real mosquitto started on a
//! free loopback port by each test (no mock broker): contract topics and schema, broker
//! outages, SIGKILL of a publishing process, TLS with a generated CA, client certificates and
//! a password file, and the last will. A burst of events is delivered live and replayed in
//! full, its rates printed (`cargo test --test mqtt -- --nocapture burst`).
//!
//! A subscriber here is a plain rumqttc client with a persistent session, so it sees what
//! the broker queued for it while it was down.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Broker, TinyDisk, free_port, schema_path, validate};
use mbt_edge::events::{Event, EventEngine, EventIdGenerator, EventSettings, LabelSettings, WindowScores};
use mbt_edge::publish::BrokerUrl;
use mbt_edge::publish::payload;
use mbt_edge::publish::spool::Spool;
use mbt_edge::publish::{ModelInfo, MqttSettings, Publisher, PublisherInfo, SourceStatus, SpoolSettings};
use serde_json::Value;
use time::OffsetDateTime;

const DEVICE: &str = "testdev";
const SOURCE: &str = "porch";

#[derive(Debug, Clone)]
struct Received {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
}

/// A subscriber with a persistent session that records everything it receives.
struct Collector {
    received: Arc<Mutex<Vec<Received>>>,
    client: rumqttc::Client,
}

impl Collector {
    fn start(port: u16, filter: &str, credentials: Option<(&str, &str)>) -> Collector {
        let id = format!("collector-{}", rand_suffix());
        let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        options.set_clean_session(false).set_keep_alive(Duration::from_secs(5)).set_max_packet_size(1 << 20, 1 << 20);
        if let Some((user, password)) = credentials {
            options.set_credentials(user, password);
        }
        let (client, mut connection) = rumqttc::Client::new(options, 100);
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&received);
        let (subscribed_tx, subscribed_rx) = crossbeam_channel::bounded(1);
        let sub_client = client.clone();
        let filter = filter.to_owned();
        std::thread::spawn(move || {
            loop {
                match connection.recv() {
                    Err(_) => break,
                    Ok(Ok(rumqttc::Event::Incoming(rumqttc::Incoming::ConnAck(_)))) => {
                        let _ = sub_client.try_subscribe(&filter, rumqttc::QoS::AtLeastOnce);
                    }
                    Ok(Ok(rumqttc::Event::Incoming(rumqttc::Incoming::SubAck(_)))) => {
                        let _ = subscribed_tx.try_send(());
                    }
                    Ok(Ok(rumqttc::Event::Incoming(rumqttc::Incoming::Publish(p)))) => {
                        sink.lock().unwrap().push(Received {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                        });
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        subscribed_rx.recv_timeout(Duration::from_secs(10)).expect("collector subscribed");
        Collector { received, client }
    }

    fn messages(&self, topic: &str) -> Vec<Received> {
        self.received.lock().unwrap().iter().filter(|r| r.topic == topic).cloned().collect()
    }

    fn events(&self) -> Vec<Value> {
        self.messages(&events_topic()).iter().map(|r| serde_json::from_slice(&r.payload).unwrap()).collect()
    }

    /// Waits until `done` holds for the received messages, or panics with `what`.
    fn wait_for(&self, what: &str, timeout: Duration, done: impl Fn(&Collector) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; received {} messages, {} events",
                self.received.lock().unwrap().len(),
                self.events().len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
    }
}

fn rand_suffix() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn events_topic() -> String {
    format!("mbt-edge/{DEVICE}/{SOURCE}/events")
}

fn availability_topic() -> String {
    format!("mbt-edge/{DEVICE}/availability")
}

fn mqtt_settings(port: u16) -> MqttSettings {
    MqttSettings {
        url: BrokerUrl { tls: false, host: "127.0.0.1".to_owned(), port },
        client_id: format!("mbt-edge-test-{}", rand_suffix()),
        device_id: DEVICE.to_owned(),
        stats_interval: Duration::ZERO,
        keepalive: Duration::from_secs(5),
        ..MqttSettings::default()
    }
}

fn spool_settings(dir: &Path) -> SpoolSettings {
    SpoolSettings { dir: dir.to_path_buf(), ..SpoolSettings::default() }
}

fn labels() -> Vec<String> {
    vec!["dog".to_owned(), "doorbell".to_owned()]
}

fn publisher_info() -> PublisherInfo {
    PublisherInfo {
        sources: vec![SOURCE.to_owned()],
        labels: labels(),
        enabled_labels: labels(),
        audio_sources: vec![SOURCE.to_owned()],
        snapshot_sources: vec![SOURCE.to_owned()],
        model: ModelInfo { name: "mbt-test".to_owned(), sha256: "0".repeat(64) },
    }
}

/// Produces events through the real engine: `dog` alternates above and below its
/// thresholds window by window, so every window yields one message (start, end, ...);
/// `doorbell` rises slowly so it also yields updates.
struct EventSource {
    engine: EventEngine,
    window_idx: u64,
    t0: OffsetDateTime,
}

impl EventSource {
    fn new() -> Self {
        let quick = LabelSettings { min_windows: 1, cooldown: Duration::ZERO, ..LabelSettings::default() };
        let settings = EventSettings { default: quick, per_label: HashMap::new() };
        EventSource {
            engine: EventEngine::with_id_generator(settings, labels(), true, EventIdGenerator::from_os()),
            window_idx: 0,
            t0: OffsetDateTime::now_utc(),
        }
    }

    fn next_window(&mut self) -> Vec<Event> {
        let i = self.window_idx;
        self.window_idx += 1;
        let window_end = self.t0 + Duration::from_millis(250 * i);
        let dog = if i.is_multiple_of(2) { 0.9 } else { 0.1 };
        let doorbell = [0.1, 0.65, 0.7, 0.8, 0.2][(i % 5) as usize];
        self.engine.process(&WindowScores {
            source: SOURCE.to_owned(),
            window_start: window_end - Duration::from_secs(8),
            window_end,
            fused: vec![dog, doorbell],
            audio: Some(vec![dog, doorbell]),
            video: None,
            degraded: None,
        })
    }

    /// At least `n` events.
    fn take(&mut self, n: usize) -> Vec<Event> {
        let mut events = Vec::new();
        while events.len() < n {
            events.extend(self.next_window());
        }
        events
    }
}

/// Deduplicates event messages by seq and checks: seqs gapless from `first_seq`, first
/// arrivals in seq order, ids shared only within one (source, label) event. Returns the
/// deduplicated messages.
fn check_delivery(events: &[Value], first_seq: u64, expected: usize) -> Vec<Value> {
    let mut by_seq: BTreeMap<u64, Value> = BTreeMap::new();
    let mut first_arrival_order = Vec::new();
    for e in events {
        let seq = e["seq"].as_u64().unwrap();
        if let Some(previous) = by_seq.get(&seq) {
            // A duplicate must be the same message (only replayed/latency may differ).
            assert_eq!(previous["id"], e["id"]);
            assert_eq!(previous["type"], e["type"]);
            continue;
        }
        by_seq.insert(seq, e.clone());
        first_arrival_order.push(seq);
    }
    let seqs: Vec<u64> = by_seq.keys().copied().collect();
    let wanted: Vec<u64> = (first_seq..first_seq + expected as u64).collect();
    assert_eq!(seqs, wanted, "every seq exactly once after dedupe, no gaps");
    let mut sorted = first_arrival_order.clone();
    sorted.sort_unstable();
    assert_eq!(first_arrival_order, sorted, "first arrivals in seq order");
    let mut id_owner: HashMap<String, String> = HashMap::new();
    let mut open: HashSet<String> = HashSet::new();
    for e in by_seq.values() {
        let id = e["id"].as_str().unwrap().to_owned();
        let owner = format!("{}/{}", e["source"], e["label"]);
        assert_eq!(id_owner.entry(id.clone()).or_insert(owner.clone()), &owner);
        match e["type"].as_str().unwrap() {
            "start" => assert!(open.insert(id), "start twice"),
            "update" => assert!(open.contains(&id), "update without start"),
            "end" => assert!(open.remove(&id), "end without start"),
            other => panic!("bad type {other}"),
        }
    }
    by_seq.into_values().collect()
}

#[test]
fn events_arrive_on_contract_topics_in_order_and_match_the_schema() {
    init_logs();
    let broker = Broker::start("");
    let collector = Collector::start(broker.port, "#", None);
    let spool_dir = tempfile::tempdir().unwrap();
    let settings = MqttSettings {
        publish_scores: true,
        home_assistant: true,
        stats_interval: Duration::from_millis(300),
        ..mqtt_settings(broker.port)
    };
    let publisher = Publisher::start(settings, spool_settings(spool_dir.path()), publisher_info()).unwrap();
    publisher.set_source_status(SOURCE, SourceStatus::Online);
    wait_connected(&publisher);
    let mut source = EventSource::new();
    let events = source.take(30);
    for event in &events {
        publisher.publish_event(event, None).unwrap();
    }
    let scores = WindowScores {
        source: SOURCE.to_owned(),
        window_start: OffsetDateTime::now_utc() - Duration::from_secs(8),
        window_end: OffsetDateTime::now_utc(),
        fused: vec![0.2, 0.7],
        audio: None,
        video: None,
        degraded: None,
    };
    publisher.publish_scores(SOURCE, payload::scores_message(&scores, &labels(), Some(-20.0)));
    collector.wait_for("all events", Duration::from_secs(10), |c| c.events().len() >= events.len());
    assert!(publisher.wait_until_flushed(Duration::from_secs(5)), "spool drained by PUBACKs");

    let schema: Value = serde_json::from_str(&std::fs::read_to_string(schema_path()).unwrap()).unwrap();
    let received = collector.events();
    for message in &received {
        let errors = validate(&schema, message, "$");
        assert!(errors.is_empty(), "schema errors {errors:?} in {message}");
    }
    let delivered = check_delivery(&received, 1, events.len());
    assert_eq!(received.len(), events.len(), "no duplicates without an outage");
    for (message, event) in delivered.iter().zip(&events) {
        assert_eq!(message["id"], event.id.as_str());
        assert_eq!(message["type"], event.kind.as_str());
        assert_eq!(message["device"], DEVICE);
        assert_eq!(message["model"]["name"], "mbt-test");
        assert_eq!(message["replayed"], false);
    }
    assert!(received.iter().any(|e| e["type"] == "update"));

    let availability = collector.messages(&availability_topic());
    assert_eq!(availability.last().unwrap().payload, b"online");
    let status = collector.messages(&format!("mbt-edge/{DEVICE}/{SOURCE}/status"));
    assert_eq!(status.last().unwrap().payload, b"online");
    collector.wait_for("scores and stats", Duration::from_secs(5), |c| {
        !c.messages(&format!("mbt-edge/{DEVICE}/{SOURCE}/scores")).is_empty()
            && !c.messages(&format!("mbt-edge/{DEVICE}/stats")).is_empty()
    });
    let scores: Value =
        serde_json::from_slice(&collector.messages(&format!("mbt-edge/{DEVICE}/{SOURCE}/scores"))[0].payload).unwrap();
    assert_eq!(scores["top"][0]["label"], "doorbell");
    let stats: Value =
        serde_json::from_slice(&collector.messages(&format!("mbt-edge/{DEVICE}/stats"))[0].payload).unwrap();
    assert_eq!(stats["device"], DEVICE);

    // Home Assistant discovery: an event entity and a binary_sensor per label, retained,
    // and published again when Home Assistant announces itself.
    let event_config = format!("homeassistant/event/{DEVICE}/{SOURCE}_events/config");
    let dog_config = format!("homeassistant/binary_sensor/{DEVICE}/{SOURCE}_dog/config");
    assert_eq!(collector.messages(&event_config).len(), 1);
    assert_eq!(collector.messages(&dog_config).len(), 1);
    let config: Value = serde_json::from_slice(&collector.messages(&event_config)[0].payload).unwrap();
    assert_eq!(config["event_types"], serde_json::json!(["dog", "doorbell"]));
    assert_eq!(config["state_topic"], events_topic());
    collector.client.publish("homeassistant/status", rumqttc::QoS::AtLeastOnce, false, "online").unwrap();
    collector.wait_for("discovery republished", Duration::from_secs(5), |c| c.messages(&event_config).len() >= 2);

    publisher.shutdown(Duration::from_secs(5));
    collector.wait_for("offline after clean shutdown", Duration::from_secs(5), |c| {
        c.messages(&availability_topic()).last().map(|r| r.payload.as_slice()) == Some(b"offline")
            && c.messages(&format!("mbt-edge/{DEVICE}/{SOURCE}/status")).last().map(|r| r.payload.as_slice())
                == Some(b"offline")
    });
}

#[test]
fn qos0_events_leave_the_spool_once_written() {
    init_logs();
    let broker = Broker::start("");
    let collector = Collector::start(broker.port, &events_topic(), None);
    let spool_dir = tempfile::tempdir().unwrap();
    let settings = MqttSettings { qos: 0, ..mqtt_settings(broker.port) };
    let publisher = Publisher::start(settings, spool_settings(spool_dir.path()), publisher_info()).unwrap();
    wait_connected(&publisher);
    let events = EventSource::new().take(20);
    for event in &events {
        publisher.publish_event(event, None).unwrap();
    }
    assert!(publisher.wait_until_flushed(Duration::from_secs(5)));
    collector.wait_for("every event", Duration::from_secs(5), |c| c.events().len() >= events.len());
    check_delivery(&collector.events(), 1, events.len());
    publisher.shutdown(Duration::from_secs(1));
}

#[test]
fn broker_outage_of_20s_loses_nothing_and_replays_in_order() {
    init_logs();
    // Persistence keeps the subscriber's session (and what was queued for it) across the
    // broker restart, as a production broker would.
    let mut broker = Broker::start("persistence true\npersistence_location {dir}/\n");
    let collector = Collector::start(broker.port, &events_topic(), None);
    let spool_dir = tempfile::tempdir().unwrap();
    let publisher =
        Publisher::start(mqtt_settings(broker.port), spool_settings(spool_dir.path()), publisher_info()).unwrap();
    let mut source = EventSource::new();
    let mut n_events = 0;
    let mut produce = |publisher: &Publisher, duration: Duration| {
        let deadline = Instant::now() + duration;
        let mut seqs = Vec::new();
        while Instant::now() < deadline {
            for event in source.next_window() {
                seqs.push(publisher.publish_event(&event, None).unwrap());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        seqs
    };
    wait_connected(&publisher);
    let before = produce(&publisher, Duration::from_secs(2));
    broker.stop();
    let during = produce(&publisher, Duration::from_secs(20));
    assert!(publisher.spool_stats().records >= during.len() as u64);
    broker.resume();
    let after = produce(&publisher, Duration::from_secs(2));
    n_events += before.len() + during.len() + after.len();
    assert!(publisher.wait_until_flushed(Duration::from_secs(30)), "spool drained after the outage");
    collector.wait_for("every event", Duration::from_secs(30), |c| {
        c.events().iter().map(|e| e["seq"].as_u64().unwrap()).collect::<HashSet<_>>().len() >= n_events
    });
    let received = collector.events();
    let delivered = check_delivery(&received, 1, n_events);
    for seq in &during {
        let message = &delivered[(*seq - 1) as usize];
        assert_eq!(message["replayed"], true, "seq {seq} was spooled during the outage");
    }
    for seq in &before {
        // Delivered before the outage, live.
        assert!(received.iter().any(|e| e["seq"] == *seq && e["replayed"] == false));
    }
    let stats = publisher.stats();
    assert!(stats.connects >= 2 && stats.events_replayed >= during.len() as u64);
    eprintln!(
        "outage test: {n_events} events ({} during the outage), {} messages received, {} duplicates",
        during.len(),
        received.len(),
        received.len() - n_events
    );
    publisher.shutdown(Duration::from_secs(5));
}

/// Events spooled before the first connection count as replayed; wait to see live ones.
fn wait_connected(publisher: &Publisher) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !publisher.stats().connected {
        assert!(Instant::now() < deadline, "publisher did not connect");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The child process of `sigkill_while_broker_down_loses_nothing`: spools events with the
/// broker down, writes a marker, and waits to be killed.
fn child_publisher(port: String) {
    let spool_dir = PathBuf::from(std::env::var("MBT_EDGE_TEST_CHILD_SPOOL").unwrap());
    let n: usize = std::env::var("MBT_EDGE_TEST_CHILD_EVENTS").unwrap().parse().unwrap();
    let publisher =
        Publisher::start(mqtt_settings(port.parse().unwrap()), spool_settings(&spool_dir), publisher_info()).unwrap();
    publisher.set_source_status(SOURCE, SourceStatus::Online);
    let mut source = EventSource::new();
    let mut seqs = Vec::new();
    for event in source.take(n) {
        seqs.push(publisher.publish_event(&event, None).unwrap());
    }
    let marker = spool_dir.join("child-spooled");
    std::fs::write(&marker, format!("{}", seqs.len())).unwrap();
    std::thread::sleep(Duration::from_secs(120)); // until SIGKILL
}

fn spawn_child(port: u16, spool_dir: &Path, n_events: usize) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["sigkill_while_broker_down_loses_nothing", "--exact", "--nocapture", "--test-threads=1"])
        .env("MBT_EDGE_TEST_CHILD_PORT", port.to_string())
        .env("MBT_EDGE_TEST_CHILD_SPOOL", spool_dir)
        .env("MBT_EDGE_TEST_CHILD_EVENTS", n_events.to_string())
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_for_marker(spool_dir: &Path) -> usize {
    let marker = spool_dir.join("child-spooled");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(&marker)
            && let Ok(n) = text.parse()
        {
            return n;
        }
        assert!(Instant::now() < deadline, "child did not spool its events");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigkill_while_broker_down_loses_nothing() {
    // The same test, re-run by `spawn_child` as the process that spools and is killed.
    if let Ok(port) = std::env::var("MBT_EDGE_TEST_CHILD_PORT") {
        return child_publisher(port);
    }
    init_logs();
    let mut broker = Broker::start("persistence true\npersistence_location {dir}/\n");
    let collector = Collector::start(broker.port, &events_topic(), None);
    broker.stop();
    let spool_dir = tempfile::tempdir().unwrap();
    let mut child = spawn_child(broker.port, spool_dir.path(), 200);
    let n_events = wait_for_marker(spool_dir.path());
    child.kill().unwrap(); // SIGKILL
    let _ = child.wait();
    std::fs::remove_file(spool_dir.path().join("child-spooled")).unwrap();

    broker.resume();
    let publisher =
        Publisher::start(mqtt_settings(broker.port), spool_settings(spool_dir.path()), publisher_info()).unwrap();
    assert!(publisher.wait_until_flushed(Duration::from_secs(20)));
    collector.wait_for("every spooled event", Duration::from_secs(20), |c| c.events().len() >= n_events);
    let delivered = check_delivery(&collector.events(), 1, n_events);
    assert!(delivered.iter().all(|e| e["replayed"] == true));
    // seq keeps increasing in the new process.
    let mut source = EventSource::new();
    let next = publisher.publish_event(&source.take(1)[0], None).unwrap();
    assert_eq!(next, n_events as u64 + 1);
    publisher.shutdown(Duration::from_secs(5));
}

#[test]
fn half_written_record_after_a_crash_is_skipped() {
    init_logs();
    let spool_dir = tempfile::tempdir().unwrap();
    let broker = Broker::start("");
    {
        // Spool three events while no broker listens on port 1 (nothing can be acked).
        let publisher =
            Publisher::start(mqtt_settings(free_port()), spool_settings(spool_dir.path()), publisher_info()).unwrap();
        for event in EventSource::new().take(3) {
            publisher.publish_event(&event, None).unwrap();
        }
        publisher.shutdown(Duration::ZERO);
    }
    // Append half a record, as a SIGKILL in the middle of a write would leave it.
    let segment = std::fs::read_dir(spool_dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("seg-"))
        .unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&segment)
        .unwrap()
        .write_all(&[0x53, 0x45, 0x42, 0x4d, 0xff, 0x00])
        .unwrap();
    let collector = Collector::start(broker.port, &events_topic(), None);
    let publisher =
        Publisher::start(mqtt_settings(broker.port), spool_settings(spool_dir.path()), publisher_info()).unwrap();
    assert_eq!(publisher.spool_stats().corrupt_records_skipped, 1);
    assert!(publisher.wait_until_flushed(Duration::from_secs(10)));
    collector.wait_for("3 events", Duration::from_secs(10), |c| c.events().len() >= 3);
    check_delivery(&collector.events(), 1, 3);
    publisher.shutdown(Duration::from_secs(2));
}

#[test]
fn last_will_reads_offline_after_sigkill() {
    init_logs();
    let broker = Broker::start("");
    let collector = Collector::start(broker.port, &format!("mbt-edge/{DEVICE}/#"), None);
    let spool_dir = tempfile::tempdir().unwrap();
    let mut child = spawn_child(broker.port, spool_dir.path(), 5);
    wait_for_marker(spool_dir.path());
    collector.wait_for("online and 5 events", Duration::from_secs(10), |c| {
        c.messages(&availability_topic()).last().map(|r| r.payload.as_slice()) == Some(b"online")
            && c.events().len() >= 5
    });
    child.kill().unwrap(); // SIGKILL: no DISCONNECT, so the broker publishes the will
    let _ = child.wait();
    collector.wait_for("offline (last will)", Duration::from_secs(10), |c| {
        c.messages(&availability_topic()).last().map(|r| r.payload.as_slice()) == Some(b"offline")
    });
    // Retained: a subscriber arriving later reads offline too.
    let late = Collector::start(broker.port, &availability_topic(), None);
    late.wait_for("retained offline", Duration::from_secs(5), |c| {
        c.messages(&availability_topic()).first().is_some_and(|r| r.retain && r.payload == b"offline")
    });
}

#[test]
fn tls_client_cert_and_password_wrong_password_and_unknown_ca_are_refused() {
    init_logs();
    let pki = tempfile::tempdir().unwrap();
    let pki = pki.path();
    make_pki(pki);
    let passwords = pki.join("passwords");
    std::fs::write(&passwords, "").unwrap();
    run(Command::new("mosquitto_passwd").arg("-b").arg(&passwords).args(["edge", "s3cret"]));
    let tls_port = free_port();
    let broker = Broker::start_with(|port| {
        format!(
            "per_listener_settings false\nallow_anonymous false\npassword_file {passwords}\n\
             listener {port} 127.0.0.1\n\
             listener {tls_port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\nrequire_certificate true\n",
            passwords = passwords.display(),
            ca = pki.join("ca.pem").display(),
            cert = pki.join("server.pem").display(),
            key = pki.join("server.key").display(),
        )
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", tls_port)).is_err() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let collector = Collector::start(broker.port, &events_topic(), Some(("edge", "s3cret")));
    let spool_dir = tempfile::tempdir().unwrap();
    let tls_settings = |password: &str, ca: &str| MqttSettings {
        url: BrokerUrl { tls: true, host: "127.0.0.1".to_owned(), port: tls_port },
        username: Some("edge".to_owned()),
        password: Some(password.to_owned()),
        ca: Some(pki.join(ca)),
        cert: Some(pki.join("client.pem")),
        key: Some(pki.join("client.key")),
        ..mqtt_settings(tls_port)
    };
    let mut source = EventSource::new();
    let mut n_events = 0;
    for (password, ca, expected_log) in [
        ("wrong", "ca.pem", "the broker refused the credentials"),
        ("s3cret", "rogue-ca.pem", "not signed by the CA in mqtt.ca"),
    ] {
        let log_mark = logs().len();
        let publisher =
            Publisher::start(tls_settings(password, ca), spool_settings(spool_dir.path()), publisher_info()).unwrap();
        for event in source.take(5) {
            publisher.publish_event(&event, None).unwrap();
            n_events += 1;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !logs()[log_mark..].contains(expected_log) {
            assert!(Instant::now() < deadline, "no log line saying {expected_log:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!publisher.stats().connected);
        publisher.shutdown(Duration::ZERO);
        assert!(collector.events().is_empty(), "nothing went through");
    }
    let publisher =
        Publisher::start(tls_settings("s3cret", "ca.pem"), spool_settings(spool_dir.path()), publisher_info()).unwrap();
    assert!(publisher.wait_until_flushed(Duration::from_secs(15)), "the right settings deliver the spool");
    collector.wait_for("every event", Duration::from_secs(10), |c| c.events().len() >= n_events);
    check_delivery(&collector.events(), 1, n_events);
    publisher.shutdown(Duration::from_secs(2));
}

/// CA, server cert for 127.0.0.1/localhost, client cert, and a rogue CA, with openssl.
fn make_pki(dir: &Path) {
    let openssl = |args: &[&str]| run(Command::new("openssl").current_dir(dir).args(args));
    for ca in ["ca", "rogue-ca"] {
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN=mbt-edge test {ca}"),
        ]);
    }
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
        .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, cn) in [("server", "localhost"), ("client", "mbt-edge-client")] {
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={cn}"),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ]);
    }
}

fn run(command: &mut Command) {
    let output = command.output().expect("command runs");
    assert!(output.status.success(), "{command:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// Every event of a burst reaches the broker, live and replayed; the rates are printed as
/// figures (`cargo test --release --test mqtt -- --nocapture burst`, `MBT_EDGE_BENCH_EVENTS`
/// for a bigger burst), not asserted.
#[test]
fn a_burst_of_events_is_delivered_live_and_replayed_and_its_rate_reported() {
    init_logs();
    let n: usize = std::env::var("MBT_EDGE_BENCH_EVENTS").ok().and_then(|s| s.parse().ok()).unwrap_or(500);
    let events = EventSource::new().take(n);

    // Spool alone: append + fsync per event, then ack.
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(spool_settings(dir.path())).unwrap();
    let payload = vec![b'x'; 600];
    let started = Instant::now();
    for _ in 0..n.min(2000) {
        spool.append(|_| payload.clone()).unwrap();
    }
    let append = started.elapsed() / n.min(2000) as u32;
    let started = Instant::now();
    for seq in 1..=n.min(2000) as u64 {
        spool.ack(seq).unwrap();
    }
    let ack = started.elapsed() / n.min(2000) as u32;
    println!("spool: append+fsync {append:?}/event, ack {ack:?}/event (600-byte payload)");

    // End to end, QoS 1 on loopback: publish_event (spool + fsync) until every PUBACK.
    let broker = Broker::start("max_inflight_messages 0\nmax_queued_messages 0\n");
    let collector = Collector::start(broker.port, &events_topic(), None);
    let dir = tempfile::tempdir().unwrap();
    let publisher = Publisher::start(mqtt_settings(broker.port), spool_settings(dir.path()), publisher_info()).unwrap();
    wait_connected(&publisher);
    let started = Instant::now();
    for event in &events {
        publisher.publish_event(event, None).unwrap();
    }
    assert!(publisher.wait_until_flushed(Duration::from_secs(120)));
    let live = started.elapsed();
    collector.wait_for("every live event", Duration::from_secs(30), |c| c.events().len() >= events.len());
    println!(
        "live QoS 1: {} events in {live:?} = {:.0} events/s (each spooled with fsync, removed on PUBACK)",
        events.len(),
        events.len() as f64 / live.as_secs_f64()
    );
    publisher.shutdown(Duration::from_secs(2));

    // Replay, QoS 1: the same events already spooled, published on connect.
    let dir = tempfile::tempdir().unwrap();
    {
        let offline =
            Publisher::start(mqtt_settings(free_port()), spool_settings(dir.path()), publisher_info()).unwrap();
        for event in &events {
            offline.publish_event(event, None).unwrap();
        }
        offline.shutdown(Duration::ZERO);
    }
    let started = Instant::now();
    let publisher = Publisher::start(mqtt_settings(broker.port), spool_settings(dir.path()), publisher_info()).unwrap();
    assert!(publisher.wait_until_flushed(Duration::from_secs(120)));
    let replay = started.elapsed();
    collector.wait_for("every replayed event", Duration::from_secs(30), |c| c.events().len() >= 2 * events.len());
    // Each spool numbers its events from 1: every seq once live and once replayed.
    let seqs = |replayed: bool| -> HashSet<u64> {
        collector.events().iter().filter(|e| e["replayed"] == replayed).map(|e| e["seq"].as_u64().unwrap()).collect()
    };
    let all: HashSet<u64> = (1..=events.len() as u64).collect();
    assert_eq!(seqs(false), all);
    assert_eq!(seqs(true), all);
    println!(
        "replay QoS 1: {} events in {replay:?} = {:.0} events/s (connect included, no fsync on the path)",
        events.len(),
        events.len() as f64 / replay.as_secs_f64()
    );
    publisher.shutdown(Duration::from_secs(2));
    drop(collector);
}

#[test]
fn schema_checker_rejects_what_it_should() {
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(schema_path()).unwrap()).unwrap();
    let good = serde_json::json!({
        "type": "end", "id": "6f1c0e0a-0000-4000-8000-000000000001", "seq": 3,
        "device": "d", "source": "s", "label": "dog", "score": 0.2, "peak_score": 0.9,
        "scores": {"fused": 0.2, "audio": null, "video": 0.1},
        "start_time": "2026-11-28T12:00:08Z", "end_time": "2026-11-28T12:00:10.5Z",
        "window": {"start": "2026-11-28T12:00:03Z", "end": "2026-11-28T12:00:11Z"},
        "model": {"name": "m", "sha256": "00"}, "degraded": null, "replayed": false, "latency_ms": 12
    });
    assert_eq!(validate(&schema, &good, "$"), Vec::<String>::new());
    let mut bad = good.clone();
    bad["type"] = "begin".into();
    bad["seq"] = 0.into();
    bad["start_time"] = "yesterday".into();
    bad["extra"] = true.into();
    bad.as_object_mut().unwrap().remove("replayed");
    assert_eq!(validate(&schema, &bad, "$").len(), 5);
}

// Captured logs, so tests can check what an operator would read.
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(buf);
        if std::env::var_os("MBT_EDGE_TEST_LOG").is_some() {
            std::io::stderr().write_all(buf)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "mbt_edge=info".into()),
        )
        .with_ansi(false)
        .with_writer(|| LogWriter)
        .try_init();
}

fn logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap()).into_owned()
}

/// The spool on a full disk (a tmpfs the test mounts; CI runs as root).
#[test]
fn a_full_disk_keeps_spool_records_in_memory_and_writes_them_back_when_it_has_room() {
    let disk = TinyDisk::mount("256k");
    let dir = disk.path().join("spool");
    let mut spool =
        Spool::open(SpoolSettings { dir: dir.clone(), max_bytes: 1 << 20, ..SpoolSettings::default() }).unwrap();
    spool.append(|_| b"before".to_vec()).unwrap();
    let filler = disk.fill();
    // Bigger than a page, so no record fits in the slack of the segment's last page.
    let held = |idx: usize| format!("held{idx}:{}", ".".repeat(8192)).into_bytes();
    let seqs: Vec<u64> = (0..5).map(|idx| spool.append(|_| held(idx)).unwrap()).collect();
    assert_eq!(seqs, [2, 3, 4, 5, 6], "seqs go on while the disk is full");
    assert!(spool.unwritable().is_some());
    assert_eq!(spool.stats().unwritten, 5);
    assert_eq!(spool.get(4), Some(&held(2)[..]));
    spool.ack(3).unwrap();
    assert!(!spool.retry_writes(), "still full");
    assert_eq!(spool.stats().unwritten, 4);

    std::fs::remove_file(filler).unwrap();
    assert!(spool.retry_writes());
    assert_eq!((spool.unwritable(), spool.stats().unwritten), (None, 0));
    spool.append(|_| b"after".to_vec()).unwrap();
    drop(spool);
    let mut reopened =
        Spool::open(SpoolSettings { dir: dir.clone(), max_bytes: 1 << 20, ..SpoolSettings::default() }).unwrap();
    let pending: Vec<(u64, String)> = reopened
        .pending()
        .unwrap()
        .into_iter()
        .map(|record| (record.seq, String::from_utf8(record.payload).unwrap().split(':').next().unwrap().to_owned()))
        .collect();
    let expected = [(1, "before"), (2, "held0"), (4, "held2"), (5, "held3"), (6, "held4"), (7, "after")];
    assert_eq!(pending, expected.map(|(seq, text)| (seq, text.to_owned())));
}
