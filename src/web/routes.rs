//! The routes: the page and its assets, the JSON API (docs/http.md), `/metrics`, `/health`,
//! and the token check in front of all but `/health`.

use std::convert::Infallible;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use super::{EVENTS_KEPT, Handlers, Live};

const INDEX_HTML: &str = include_str!("page/index.html");
const PAGE_JS: &str = include_str!("page/page.js");
const PAGE_CSS: &str = include_str!("page/page.css");

/// The cookie the page keeps its token in once opened with `?token=`.
const TOKEN_COOKIE: &str = "mbt_edge_token";

#[derive(Clone)]
pub(super) struct AppState {
    pub(super) handlers: Handlers,
    pub(super) live: Arc<Live>,
    pub(super) token: Option<Arc<str>>,
}

pub(super) fn router(state: AppState) -> Router {
    let guarded = Router::new()
        .route("/", get(index))
        .route("/page.js", get(|| async { asset("text/javascript; charset=utf-8", PAGE_JS) }))
        .route("/page.css", get(|| async { asset("text/css; charset=utf-8", PAGE_CSS) }))
        .route("/metrics", get(metrics))
        .route("/api/about", get(about))
        .route("/api/sources", get(sources))
        .route("/api/events", get(events))
        .route("/api/events/{id}/{file}", get(evidence))
        .route("/api/scores", get(scores))
        .route("/api/stream", get(stream))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/health", get(health))
        .merge(guarded)
        .fallback(|| async { text(StatusCode::NOT_FOUND, "not found\n") })
        .with_state(state)
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], body.into())
        .into_response()
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

fn json_response(value: Value) -> Response {
    ([(header::CACHE_CONTROL, "no-store")], axum::Json(value)).into_response()
}

/// Calls a daemon closure; a panic in it is a 500 for this request, never a dead server.
fn guarded<T>(call: impl FnOnce() -> T) -> Result<T, Box<Response>> {
    catch_unwind(AssertUnwindSafe(call))
        .map_err(|_| Box::new(text(StatusCode::INTERNAL_SERVER_ERROR, "internal error (logged by the daemon)\n")))
}

async fn health(State(state): State<AppState>) -> Response {
    match guarded(|| (state.handlers.health)()) {
        Ok(Ok(())) => text(StatusCode::OK, "ok\n"),
        Ok(Err(reason)) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{}\n", one_line(&reason))),
        Err(response) => *response,
    }
}

fn one_line(text: &str) -> String {
    text.chars().map(|c| if c == '\n' || c == '\r' { ' ' } else { c }).collect()
}

async fn metrics(State(state): State<AppState>) -> Response {
    match guarded(|| (state.handlers.metrics)()) {
        Ok(body) => ([(header::CONTENT_TYPE, crate::service::CONTENT_TYPE)], body).into_response(),
        Err(response) => *response,
    }
}

#[derive(Debug, Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

async fn index(State(state): State<AppState>, Query(query): Query<TokenQuery>) -> Response {
    let mut response =
        ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], INDEX_HTML)
            .into_response();
    // Opened with `?token=` (checked already): the page's own requests carry it as a cookie.
    // Without a token configured there is nothing to keep.
    if state.token.is_some()
        && let Some(token) = query.token
        && let Ok(cookie) = HeaderValue::from_str(&format!("{TOKEN_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"))
    {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

/// `/api/events/<id>/snapshot.jpg`, `/clip.webm`, `/clip.mp4`: an event's evidence file.
async fn evidence(State(state): State<AppState>, Path((id, file)): Path<(String, String)>) -> Response {
    let (extension, content_type) = match file.as_str() {
        "snapshot.jpg" => ("jpg", "image/jpeg"),
        "clip.webm" => ("webm", "video/webm"),
        "clip.mp4" => ("mp4", "video/mp4"),
        _ => return text(StatusCode::NOT_FOUND, "not found\n"),
    };
    let read = state.handlers.evidence.clone();
    let found = tokio::task::spawn_blocking(move || guarded(|| read(&id, extension))).await;
    match found {
        Ok(Ok(Some(bytes))) => {
            ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "max-age=3600")], bytes).into_response()
        }
        Ok(Ok(None)) => text(StatusCode::NOT_FOUND, "no such evidence (not written yet, or deleted by retention)\n"),
        Ok(Err(response)) => *response,
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "internal error (logged by the daemon)\n"),
    }
}

async fn about(State(state): State<AppState>) -> Response {
    match guarded(|| (state.handlers.about)()) {
        Ok(about) => json_response(about),
        Err(response) => *response,
    }
}

async fn sources(State(state): State<AppState>) -> Response {
    let sources = match guarded(|| (state.handlers.sources)()) {
        Ok(sources) => sources,
        Err(response) => return *response,
    };
    let sources: Vec<Value> = sources
        .into_iter()
        .map(|source| {
            let labels = state.live.settings_of(&source.name);
            let mut value = serde_json::to_value(&source).unwrap_or(Value::Null);
            if let Some(fields) = value.as_object_mut() {
                fields.insert("labels".into(), labels);
            }
            value
        })
        .collect();
    json_response(Value::Array(sources))
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    limit: Option<usize>,
}

async fn events(State(state): State<AppState>, Query(query): Query<EventsQuery>) -> Response {
    let limit = query.limit.unwrap_or(50).min(EVENTS_KEPT);
    json_response(Value::Array(state.live.events(limit)))
}

#[derive(Debug, Deserialize)]
struct ScoresQuery {
    source: Option<String>,
}

/// The scores kept (oldest first) per source: `{source: [scores message, ...]}`.
async fn scores(State(state): State<AppState>, Query(query): Query<ScoresQuery>) -> Response {
    let names: Vec<String> = match query.source {
        Some(source) => vec![source],
        None => match guarded(|| (state.handlers.sources)()) {
            Ok(sources) => sources.into_iter().map(|source| source.name).collect(),
            Err(response) => return *response,
        },
    };
    let scores: serde_json::Map<String, Value> =
        names.into_iter().map(|name| (name.clone(), Value::Array(state.live.recent_scores(&name)))).collect();
    json_response(Value::Object(scores))
}

/// Server-sent events: `scores`, `event`, `status` and `settings`, as they happen; `lagged`
/// (with how many were skipped) when this client fell behind.
async fn stream(State(state): State<AppState>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let receiver = state.live.subscribe();
    let events = futures_util::stream::unfold(receiver, |mut receiver| async move {
        let event = match receiver.recv().await {
            Ok(message) => Event::default().event(message.kind).data(&*message.data),
            Err(RecvError::Lagged(skipped)) => {
                Event::default().event("lagged").data(json!({ "skipped": skipped }).to_string())
            }
            Err(RecvError::Closed) => return None,
        };
        Some((Ok(event), receiver))
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// Lets a request through when no token is configured or when it carries the token.
async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(token) = &state.token else { return next.run(request).await };
    if carries_token(request.headers(), request.uri().query(), token) {
        return next.run(request).await;
    }
    let mut response = text(
        StatusCode::UNAUTHORIZED,
        "a token is needed: Authorization: Bearer <token>, or open the page once with ?token=<token>\n",
    );
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

fn carries_token(headers: &HeaderMap, query: Option<&str>, token: &str) -> bool {
    let bearer = headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .filter_map(|value| value.strip_prefix("Bearer "))
        .any(|given| same(given.trim(), token));
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .any(|(name, given)| name == TOKEN_COOKIE && same(given, token));
    let in_query = query
        .into_iter()
        .flat_map(|query| query.split('&'))
        .filter_map(|pair| pair.split_once('='))
        .any(|(name, given)| name == "token" && same(given, token));
    bearer || cookie || in_query
}

/// Compares in time that depends on the lengths only.
fn same(given: &str, token: &str) -> bool {
    given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |diff, (a, b)| diff | (a ^ b)) == 0
}
