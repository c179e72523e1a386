//! The server over real TCP on loopback, with plain sockets as clients.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::*;

const TOKEN: &str = "0123456789abcdef-token";

fn handlers(health: Result<(), String>) -> Handlers {
    Handlers {
        metrics: Arc::new(|| "# HELP x y.\n# TYPE x gauge\nx 1\n".to_owned()),
        health: Arc::new(move || health.clone()),
        sources: Arc::new(|| {
            vec![SourceView {
                name: "porch".into(),
                status: "online".into(),
                windows_built: 7,
                ..SourceView::default()
            }]
        }),
        about: Arc::new(|| json!({ "device": "box", "model": "demo", "labels": ["a", "b"] })),
        evidence: Arc::new(|id, extension| (id == "e1" && extension == "jpg").then(|| b"\xff\xd8jpeg".to_vec())),
    }
}

fn start(health: Result<(), String>, token: Option<&str>) -> (WebServer, Arc<Live>) {
    let live = Live::new();
    let server = WebServer::start(
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        token.map(str::to_owned),
        handlers(health),
        live.clone(),
    )
    .expect("binding a loopback port");
    (server, live)
}

/// Sends `request` as is and returns the whole answer (the request asks to close).
fn exchange(server: &WebServer, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(server.local_addr()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(request).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// `GET path` with extra header lines; returns the status line, the head and the body.
fn get(server: &WebServer, path: &str, headers: &str) -> (String, String, String) {
    let answer =
        exchange(server, format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n").as_bytes());
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    (head.lines().next().unwrap_or("").to_owned(), head.to_lowercase(), body.to_owned())
}

fn status(server: &WebServer, path: &str, headers: &str) -> String {
    get(server, path, headers).0
}

#[test]
fn serves_metrics_health_and_the_page() {
    let (server, _) = start(Ok(()), None);
    let (line, head, body) = get(&server, "/metrics", "");
    assert_eq!(line, "HTTP/1.1 200 OK");
    assert!(head.contains("content-type: text/plain; version=0.0.4; charset=utf-8"), "{head}");
    assert_eq!(body, "# HELP x y.\n# TYPE x gauge\nx 1\n");
    assert_eq!(get(&server, "/health", "").2, "ok\n");
    let (line, head, body) = get(&server, "/", "");
    assert_eq!(line, "HTTP/1.1 200 OK");
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(body.contains("<script src=\"page.js\">"), "{body}");
    let (_, head, body) = get(&server, "/page.js", "");
    assert!(head.contains("content-type: text/javascript"), "{head}");
    assert!(body.contains("EventSource(\"api/stream\")"));
    assert_eq!(status(&server, "/page.css", ""), "HTTP/1.1 200 OK");
}

#[test]
fn evidence_files_are_served_by_event_id_with_their_type_and_nothing_else_is() {
    let (server, _) = start(Ok(()), Some(TOKEN));
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    let (line, head, body) = get(&server, "/api/events/e1/snapshot.jpg", &auth);
    assert_eq!(line, "HTTP/1.1 200 OK");
    assert!(head.contains("content-type: image/jpeg"), "{head}");
    assert!(head.contains("content-length: 6") && body.ends_with("jpeg"), "{head} {body:?}");
    assert!(status(&server, "/api/events/e1/clip.webm", &auth).starts_with("HTTP/1.1 404 "));
    assert!(status(&server, "/api/events/e1/passwd", &auth).starts_with("HTTP/1.1 404 "));
    assert!(status(&server, "/api/events/..%2f..%2fetc/snapshot.jpg", &auth).starts_with("HTTP/1.1 404 "));
    assert!(status(&server, "/api/events/e1/snapshot.jpg", "").starts_with("HTTP/1.1 401 "));
}

#[test]
fn health_answers_ok_or_the_reason_and_head_has_no_body() {
    let (sick, _) = start(Err("no windows from any source\nfor 11.0s".into()), None);
    let (line, _, body) = get(&sick, "/health?verbose=1", "");
    assert_eq!(
        (line.as_str(), body.as_str()),
        ("HTTP/1.1 503 Service Unavailable", "no windows from any source for 11.0s\n")
    );
    let answer = exchange(&sick, b"HEAD /health HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(answer.ends_with("\r\n\r\n"), "HEAD has no body: {answer:?}");
}

#[test]
fn unknown_paths_methods_and_garbage_get_errors_and_the_server_lives_on() {
    let (server, _) = start(Ok(()), None);
    let cases: &[(&[u8], &str)] = &[
        (b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n", "HTTP/1.1 404 Not Found"),
        (
            b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            "HTTP/1.1 405 Method Not Allowed",
        ),
        (b"\x00\xff\xfe garbage\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (b"GET /metrics SPDY/3\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (b"GET /api/events?limit=many HTTP/1.1\r\nConnection: close\r\n\r\n", "HTTP/1.1 400 Bad Request"),
    ];
    for (request, expected) in cases {
        let answer = exchange(&server, request);
        assert!(answer.starts_with(expected), "request {:?}: {answer:?}", String::from_utf8_lossy(request));
    }
    // A head larger than the server takes is refused, not buffered without end.
    let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
    huge.extend(std::iter::repeat_n(b'x', MAX_HEAD_BYTES + 10));
    let answer = exchange(&server, &huge);
    assert!(answer.starts_with("HTTP/1.1 431 ") || answer.is_empty(), "{answer:?}");
    // A client that connects and leaves, and one that sends half a request and hangs up.
    drop(TcpStream::connect(server.local_addr()).unwrap());
    {
        let mut half = TcpStream::connect(server.local_addr()).unwrap();
        half.write_all(b"GET /met").unwrap();
    }
    assert_eq!(status(&server, "/metrics", ""), "HTTP/1.1 200 OK");
}

#[test]
fn a_panicking_closure_is_a_500_not_a_dead_server() {
    let mut handlers = handlers(Ok(()));
    handlers.metrics = Arc::new(|| panic!("snapshot failed"));
    let server = WebServer::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), None, handlers, Live::new()).unwrap();
    assert!(status(&server, "/metrics", "").starts_with("HTTP/1.1 500 "));
    assert!(status(&server, "/health", "").starts_with("HTTP/1.1 200 "));
}

/// Twenty clients that send their request one byte every half second hold twenty
/// connections; every health probe beside them is still answered within a second, and the
/// server closes the trickling ones once [`HEAD_TIMEOUT`] has passed.
#[test]
fn slow_clients_never_hold_up_the_health_check() {
    let (server, _) = start(Ok(()), None);
    let address = server.local_addr();
    let closed = Arc::new(AtomicU64::new(0));
    let trickling: Vec<_> = (0..20)
        .map(|_| {
            let closed = closed.clone();
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(address).unwrap();
                for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ".iter().chain(std::iter::repeat(&b'a')) {
                    if stream.write_all(&[*byte]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                    // The server answers 408 or closes: either ends the trickle.
                    stream.set_nonblocking(true).unwrap();
                    let mut buffer = [0u8; 64];
                    let ended = stream.read(&mut buffer).is_ok();
                    stream.set_nonblocking(false).unwrap();
                    if ended {
                        break;
                    }
                }
                closed.fetch_add(1, Ordering::SeqCst);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    let started = Instant::now();
    let mut probes = 0;
    while started.elapsed() < HEAD_TIMEOUT - Duration::from_millis(1_500) {
        let mut probe = TcpStream::connect(address).unwrap();
        probe.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        probe.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut answer = String::new();
        probe.read_to_string(&mut answer).expect("every probe is answered within a second");
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer:?}");
        probes += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(probes >= 10, "{probes} probes");
    assert_eq!(closed.load(Ordering::SeqCst), 0, "the trickling clients were still connected during the probes");
    for client in trickling {
        client.join().unwrap();
    }
    assert_eq!(closed.load(Ordering::SeqCst), 20, "the server closed every trickling client");
}

#[test]
fn a_token_guards_everything_but_health() {
    let (server, _) = start(Ok(()), Some(TOKEN));
    let (line, head, _) = get(&server, "/metrics", "");
    assert_eq!(line, "HTTP/1.1 401 Unauthorized");
    assert!(head.contains("www-authenticate: bearer"), "{head}");
    assert!(status(&server, "/", "").starts_with("HTTP/1.1 401 "));
    assert!(status(&server, "/api/stream", "").starts_with("HTTP/1.1 401 "));
    assert!(status(&server, "/metrics", "Authorization: Bearer wrong-token-0123456\r\n").starts_with("HTTP/1.1 401 "));
    assert_eq!(status(&server, "/health", ""), "HTTP/1.1 200 OK");
    assert_eq!(status(&server, "/metrics", &format!("Authorization: Bearer {TOKEN}\r\n")), "HTTP/1.1 200 OK");
    // The page opened with ?token= sets the cookie its own requests then carry.
    let (line, head, _) = get(&server, &format!("/?token={TOKEN}"), "");
    assert_eq!(line, "HTTP/1.1 200 OK");
    assert!(head.contains(&format!("set-cookie: mbt_edge_token={}; httponly", TOKEN.to_lowercase())), "{head}");
    assert_eq!(
        status(&server, "/api/sources", &format!("Cookie: other=1; mbt_edge_token={TOKEN}\r\n")),
        "HTTP/1.1 200 OK"
    );
}

#[test]
fn the_api_serves_sources_events_and_kept_scores() {
    let (server, live) = start(Ok(()), None);
    live.label_settings("porch", "a", true, 0.6);
    live.scores("porch", br#"{"source":"porch","top":[]}"#);
    live.event(json!({ "id": "e1", "type": "start", "label": "a" }));
    live.event(json!({ "id": "e2", "type": "start", "label": "b" }));
    let sources: Value = serde_json::from_str(&get(&server, "/api/sources", "").2).unwrap();
    assert_eq!(sources[0]["name"], "porch");
    assert_eq!(sources[0]["windows_built"], 7);
    assert_eq!(sources[0]["labels"], json!({ "a": { "enabled": true, "threshold": 0.6f32 } }));
    let events: Value = serde_json::from_str(&get(&server, "/api/events?limit=1", "").2).unwrap();
    assert_eq!(events, json!([{ "id": "e2", "type": "start", "label": "b" }]));
    let scores: Value = serde_json::from_str(&get(&server, "/api/scores", "").2).unwrap();
    assert_eq!(scores, json!({ "porch": [{ "source": "porch", "top": [] }] }));
    let about: Value = serde_json::from_str(&get(&server, "/api/about", "").2).unwrap();
    assert_eq!(about["labels"], json!(["a", "b"]));
}

#[test]
fn the_live_stream_carries_what_the_daemon_hands_in() {
    let (server, live) = start(Ok(()), None);
    let mut stream = TcpStream::connect(server.local_addr()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(b"GET /api/stream HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n").unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "HTTP/1.1 200 OK\r\n");
    let mut head = String::new();
    while line != "\r\n" {
        line.clear();
        reader.read_line(&mut line).unwrap();
        head.push_str(&line.to_lowercase());
    }
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    // The subscription exists once the head went out; hand in until it arrives.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut received = String::new();
    while !received.contains("data: {\"source\":\"porch\",\"status\":\"offline\"}") {
        assert!(Instant::now() < deadline, "nothing arrived: {received:?}");
        live.status("porch", "offline");
        let mut chunk = String::new();
        reader.read_line(&mut chunk).unwrap();
        received.push_str(&chunk);
    }
    assert!(received.contains("event: status"), "{received:?}");
    // Stopping the server ends the stream.
    server.stop();
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
}

#[test]
fn stop_closes_the_port() {
    let (server, _) = start(Ok(()), None);
    let address = server.local_addr();
    server.stop();
    assert!(TcpStream::connect(address).is_err(), "the port is closed after stop");
}
