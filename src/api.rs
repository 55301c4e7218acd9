//! The HTTP API of a running pipeline (axum, on one thread with its own tokio runtime).
//!
//! | route | what |
//! |---|---|
//! | `GET /` | the dashboard: a page (embedded in the binary) that polls `/status` and shows a tile per stream with its live preview, fps, SLO attainment and p99 charts, the stages and sinks, re-plans, and a form to add streams; it asks for the token when the API needs one |
//! | `GET /health` | 200 `{"status":"ok"}` while running, 503 while stopping (never needs the token) |
//! | `GET /status` | streams, stages, pools, the plan that runs, counters (JSON) |
//! | `GET /metrics` | Prometheus / OpenMetrics text ([`crate::metrics`]) |
//! | `POST /streams` | add a stream: a JSON object with the keys of a `[[source]]` table (or that table as TOML with `Content-Type: application/toml`); 201, 400 with the same text as `poolpipe validate`, 409 when the name runs |
//! | `DELETE /streams/{name}` | stop a stream; 200, 404 |
//! | `GET /streams/{name}/preview.mjpeg?fps=N` | a live preview: the stream's newest published frame, drawn, as MJPEG (`multipart/x-mixed-replace`) at most N (default 5, at most 30) times a second; a slow client gets fewer frames and slows nothing else; 404 for an unknown stream |
//! | `GET /streams/{name}/snapshot.jpg` | the stream's last published frame with its results drawn on it (JPEG; its `seq` in `X-Poolpipe-Seq`); 404 before its first |
//! | `POST /reload` | read the pipeline file again and apply it; 200 with what changed, 400 when it is invalid, 409 when it changes what cannot change live (nothing is applied) |
//!
//! Bound to a loopback address, no token is needed. Bound to any other address, the server
//! refuses to start without a token, and every route but `/health` needs
//! `Authorization: Bearer <token>` (401 otherwise).

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde_json::{Value, json};

use crate::pipeline::{Live, LiveError};

/// Where and how the API listens.
#[derive(Clone)]
pub struct ApiOptions {
    /// Address to bind (port 0: any free port).
    pub listen: SocketAddr,
    /// Bearer token; required when `listen` is not a loopback address.
    pub token: Option<String>,
}

impl std::fmt::Debug for ApiOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiOptions")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The address is taken or not ours.
    #[error("API: cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Not a loopback address and no token.
    #[error(
        "API: {0} is not a loopback address, so a bearer token is required (set it in the environment variable named by --api-token-env, POOLPIPE_API_TOKEN by default)"
    )]
    NeedsToken(SocketAddr),
    /// The server thread could not start.
    #[error("API: cannot start its thread: {0}")]
    Thread(std::io::Error),
}

impl ApiOptions {
    /// Refuses a non-loopback address without a token.
    pub fn check(&self) -> Result<(), ApiError> {
        if !self.listen.ip().is_loopback() && self.token.as_deref().is_none_or(str::is_empty) {
            return Err(ApiError::NeedsToken(self.listen));
        }
        Ok(())
    }
}

/// A running API server.
pub struct ApiServer {
    /// The address it listens on (the real port when 0 was asked for).
    pub addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

impl ApiServer {
    /// Stops accepting requests and waits for the server thread.
    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

#[derive(Clone)]
struct AppState {
    live: Arc<Live>,
    token: Option<Arc<str>>,
}

/// Binds (before returning, so that a taken port is an error at start) and serves.
pub fn serve(opts: &ApiOptions, live: Arc<Live>) -> Result<ApiServer, ApiError> {
    opts.check()?;
    let bind = |source| ApiError::Bind {
        addr: opts.listen,
        source,
    };
    let listener = std::net::TcpListener::bind(opts.listen).map_err(bind)?;
    listener.set_nonblocking(true).map_err(bind)?;
    let addr = listener.local_addr().map_err(bind)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ApiError::Thread)?;
    let state = AppState {
        live,
        token: opts
            .token
            .as_deref()
            .filter(|_| !addr.ip().is_loopback())
            .map(Arc::from),
    };
    let app = router(state);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "API: cannot use the listening socket.");
                        return;
                    }
                };
                let served = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.await;
                    })
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "API server failed.");
                }
            });
        })
        .map_err(ApiError::Thread)?;
    tracing::info!(
        api = %format!("http://{addr}"),
        metrics = %format!("http://{addr}/metrics"),
        token_required = !addr.ip().is_loopback(),
        "HTTP API and metrics listening."
    );
    Ok(ApiServer { addr, stop, thread })
}

fn router(state: AppState) -> Router {
    let guarded = Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/streams", post(add_stream))
        .route("/streams/{name}", delete(remove_stream))
        .route("/streams/{name}/snapshot.jpg", get(snapshot))
        .route("/streams/{name}/preview.mjpeg", get(preview))
        .route("/reload", post(reload))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/", get(dashboard))
        .route("/index.html", get(dashboard))
        .route("/health", get(health))
        .merge(guarded)
        .with_state(state)
}

async fn require_token(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(token) = &s.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "a bearer token is required: Authorization: Bearer <token>",
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    next.run(req).await
}

/// Compares without stopping at the first difference (the length still shows).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn error(code: StatusCode, text: impl Into<String>) -> Response {
    (code, axum::Json(json!({"error": text.into()}))).into_response()
}

fn live_error(e: &LiveError) -> Response {
    let code = match e {
        LiveError::Invalid(_) => StatusCode::BAD_REQUEST,
        LiveError::Exists(_) | LiveError::Refused(_) => StatusCode::CONFLICT,
        LiveError::NotFound(_) => StatusCode::NOT_FOUND,
        LiveError::Stopping => StatusCode::SERVICE_UNAVAILABLE,
        LiveError::Thread(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(code, e.to_string())
}

/// The dashboard page (static: it holds no data, so it needs no token; what it fetches does).
const DASHBOARD: &str = include_str!("dashboard/index.html");

async fn dashboard() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        DASHBOARD,
    )
        .into_response()
}

async fn health(State(s): State<AppState>) -> Response {
    if s.live.is_stopping() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "stopping"})),
        )
            .into_response()
    } else {
        axum::Json(json!({"status": "ok"})).into_response()
    }
}

async fn status(State(s): State<AppState>) -> Response {
    axum::Json(s.live.status()).into_response()
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        crate::metrics::render(&s.live),
    )
        .into_response()
}

/// The request body as the TOML text of one `[[source]]` table.
fn stream_definition(headers: &HeaderMap, body: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(body).map_err(|_| "request body is not UTF-8".to_string())?;
    let is_toml = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("toml"));
    if is_toml {
        return Ok(if text.contains("[[source]]") {
            text.to_string()
        } else {
            format!("[[source]]\n{text}")
        });
    }
    let value: Value = serde_json::from_str(text).map_err(|e| {
        format!("request body: expected a JSON object with the keys of a [[source]] table: {e}")
    })?;
    if !value.is_object() {
        return Err(
            "request body: expected a JSON object with the keys of a [[source]] table".into(),
        );
    }
    let table = toml::to_string(&value).map_err(|e| format!("request body: {e}"))?;
    Ok(format!("[[source]]\n{table}"))
}

async fn add_stream(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let text = match stream_definition(&headers, &body) {
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let live = s.live.clone();
    let added = tokio::task::spawn_blocking(move || {
        let spec = live.validate_stream(&text)?;
        let name = spec.name.clone();
        let uri = spec.redacted_uri();
        live.add_stream(spec)?;
        Ok::<_, LiveError>((name, uri))
    })
    .await;
    match added {
        Ok(Ok((name, uri))) => {
            tracing::info!(stream = %name, "Stream added through the API.");
            (
                StatusCode::CREATED,
                axum::Json(json!({"added": name, "uri": uri})),
            )
                .into_response()
        }
        Ok(Err(e)) => live_error(&e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn remove_stream(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    match s.live.remove_stream(&name) {
        Ok(()) => axum::Json(json!({"removed": name})).into_response(),
        Err(e) => live_error(&e),
    }
}

async fn snapshot(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    let live = s.live.clone();
    let who = name.clone();
    match tokio::task::spawn_blocking(move || live.snapshot(&who)).await {
        Ok(Some(Ok((jpeg, seq)))) => (
            [
                (header::CONTENT_TYPE, "image/jpeg".to_string()),
                (header::CACHE_CONTROL, "no-store".to_string()),
                (
                    header::HeaderName::from_static("x-poolpipe-seq"),
                    seq.to_string(),
                ),
            ],
            Bytes::from_owner(jpeg),
        )
            .into_response(),
        Ok(Some(Err(e))) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("stream `{name}` has published no frame (unknown, or none yet)"),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// The boundary of MJPEG parts.
const BOUNDARY: &str = "poolpipe-frame";

async fn preview(
    State(s): State<AppState>,
    Path(name): Path<String>,
    uri: axum::http::Uri,
) -> Response {
    if !s.live.stream_states().contains_key(&name) {
        return error(StatusCode::NOT_FOUND, format!("no stream `{name}`"));
    }
    let fps = uri
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("fps=")))
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|f| f.is_finite() && *f > 0.0)
        .unwrap_or(5.0)
        .min(30.0);
    let every = std::time::Duration::from_secs_f64(1.0 / fps);
    // Each client draws the newest frame when it is ready for one: a client that reads slowly
    // (or not at all) holds only its own loop back, and the frames it missed are counted.
    let parts = futures_util::stream::unfold(
        (s.live.clone(), name, None::<u64>),
        move |(live, name, last)| async move {
            loop {
                tokio::time::sleep(every).await;
                let (l, n) = (live.clone(), name.clone());
                match tokio::task::spawn_blocking(move || l.snapshot(&n)).await {
                    Ok(Some(Ok((jpeg, seq)))) if Some(seq) != last => {
                        let skipped = last.map_or(0, |l| seq.saturating_sub(l + 1));
                        live.preview_sent(&name, skipped);
                        let mut part = format!(
                            "--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\nX-Poolpipe-Seq: {seq}\r\n\r\n",
                            jpeg.len()
                        )
                        .into_bytes();
                        part.extend_from_slice(&jpeg);
                        part.extend_from_slice(b"\r\n");
                        return Some((
                            Ok::<Bytes, std::convert::Infallible>(Bytes::from(part)),
                            (live, name, Some(seq)),
                        ));
                    }
                    // Nothing new yet (or no frame yet): look again.
                    Ok(Some(Ok(_))) | Ok(None) => {
                        if live.is_stopping() {
                            return None;
                        }
                    }
                    Ok(Some(Err(_))) | Err(_) => return None,
                }
            }
        },
    );
    (
        [
            (
                header::CONTENT_TYPE,
                format!("multipart/x-mixed-replace; boundary={BOUNDARY}"),
            ),
            (header::CACHE_CONTROL, "no-store".to_string()),
        ],
        axum::body::Body::from_stream(parts),
    )
        .into_response()
}

async fn reload(State(s): State<AppState>) -> Response {
    let live = s.live.clone();
    match tokio::task::spawn_blocking(move || live.reload()).await {
        Ok(Ok(report)) => axum::Json(json!({"applied": report})).into_response(),
        Ok(Err(e)) => live_error(&e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_loopback_address_needs_a_token() {
        let opts = |listen: &str, token: Option<&str>| ApiOptions {
            listen: listen.parse().unwrap(),
            token: token.map(String::from),
        };
        assert!(opts("127.0.0.1:0", None).check().is_ok());
        assert!(opts("[::1]:0", None).check().is_ok());
        assert!(matches!(
            opts("0.0.0.0:0", None).check(),
            Err(ApiError::NeedsToken(_))
        ));
        assert!(opts("0.0.0.0:0", Some("")).check().is_err());
        assert!(opts("0.0.0.0:0", Some("s3cret")).check().is_ok());
        assert!(!format!("{:?}", opts("0.0.0.0:0", Some("s3cret"))).contains("s3cret"));
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn a_json_stream_becomes_a_source_table() {
        let h = HeaderMap::new();
        let t = stream_definition(
            &h,
            br#"{"name": "cam", "uri": "test://ball", "max_fps": 5}"#,
        )
        .unwrap();
        assert_eq!(
            t,
            "[[source]]\nname = \"cam\"\nuri = \"test://ball\"\nmax_fps = 5\n"
        );
        assert!(
            stream_definition(&h, b"[1]")
                .unwrap_err()
                .contains("JSON object")
        );
        assert!(stream_definition(&h, b"{").is_err());
        let mut toml = HeaderMap::new();
        toml.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/toml"),
        );
        assert_eq!(
            stream_definition(&toml, b"name = \"a\"").unwrap(),
            "[[source]]\nname = \"a\""
        );
    }
}
