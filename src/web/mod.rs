//! The HTTP side: the live page at `/` (its assets compiled in), the JSON API behind it,
//! `/metrics` (Prometheus text) and `/health`, served by hyper and axum on a tokio runtime of
//! its own thread (`http`).
//!
//! A client never holds up another: every connection is its own task, a request head must
//! arrive within [`HEAD_TIMEOUT`] (also the longest idle wait between two requests on a
//! kept-alive connection), and past [`MAX_CONNECTIONS`] new connections are closed at once. `/health` does no I/O and takes no lock another request holds, so a
//! slow or hostile client cannot block the health check.
//!
//! Like `service`, nothing here reads telemetry: the daemon passes in closures
//! ([`Handlers`]) and the [`Live`] hub its events thread feeds.

mod live;
mod routes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Serialize;
use tokio::sync::{Semaphore, watch};

pub use live::{EVENTS_KEPT, Live, LiveMessage, SCORES_KEPT};

/// The longest wait for a request head (request line and headers), and for the next one on
/// an idle kept-alive connection.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed as they come.
pub const MAX_CONNECTIONS: usize = 256;
/// The largest request head accepted.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// One source as `/api/sources` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SourceView {
    pub name: String,
    /// `online`, `degraded` or `offline`.
    pub status: String,
    pub restarts: u64,
    pub windows_built: u64,
    pub windows_dropped: u64,
    pub video_fps: f64,
    pub audio_rate_hz: f64,
    /// Seconds since the source's last window; `None` before the first.
    pub last_window_age_seconds: Option<f64>,
}

/// What the server asks the daemon for, at request time.
#[derive(Clone)]
pub struct Handlers {
    /// The `/metrics` body.
    pub metrics: Arc<dyn Fn() -> String + Send + Sync>,
    /// `Ok` while healthy, else the reason (the body of the 503).
    pub health: Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
    pub sources: Arc<dyn Fn() -> Vec<SourceView> + Send + Sync>,
    /// The model's name and labels, the device id: fixed while the server runs.
    pub about: Arc<dyn Fn() -> serde_json::Value + Send + Sync>,
    /// The bytes of an event's evidence file: `(event id, extension)` (`jpg`, `webm`, `mp4`);
    /// `None` when there is none. Called off the server's async threads.
    pub evidence: EvidenceReader,
}

/// Reads an event's evidence file: `(event id, extension)` -> its bytes.
pub type EvidenceReader = Arc<dyn Fn(&str, &str) -> Option<Vec<u8>> + Send + Sync>;

/// The HTTP server; stops on [`WebServer::stop`] or when dropped.
pub struct WebServer {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for WebServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebServer").field("local_addr", &self.local_addr).finish_non_exhaustive()
    }
}

impl WebServer {
    /// Binds `address` (port 0 picks a free one) and serves on a new thread. With `token`,
    /// every path but `/health` needs it (`Authorization: Bearer`, `?token=` or the cookie
    /// the page sets). Fails only if the address cannot be bound or the thread not started.
    pub fn start(
        address: SocketAddr,
        token: Option<String>,
        handlers: Handlers,
        live: Arc<Live>,
    ) -> std::io::Result<WebServer> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("http")
            .enable_io()
            .enable_time()
            .build()?;
        let listener = std::net::TcpListener::bind(address)?;
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let app = routes::router(routes::AppState { handlers, live, token: token.map(Arc::from) });
        let thread = std::thread::Builder::new().name("http".into()).spawn(move || {
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => accept_loop(listener, app, stopped).await,
                    Err(err) => tracing::error!(error = %err, "HTTP listener unusable"),
                }
            });
            runtime.shutdown_timeout(Duration::from_secs(1));
        })?;
        Ok(WebServer { local_addr, stop, thread: Some(thread) })
    }

    /// The bound address (with the port actually chosen).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, ends open connections (live streams at once, others within a second)
    /// and waits for the thread.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for WebServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, app: axum::Router, mut stopped: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                // EMFILE, ECONNABORTED: transient for a server; wait and accept again.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped.changed() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = stopped.changed() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(1), connection).await;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests;
