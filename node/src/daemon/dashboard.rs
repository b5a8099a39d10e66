//! The operator's dashboard (`--dashboard ADDR`): a small web page served by the daemon itself, showing the
//! node's state, its contributions, the run's loss curve, its peers and its traffic, refreshed every 2 s.
//! Two routes, both GET: `/` (the page: one HTML file with its script and style inline, nothing fetched
//! from anywhere else, and a content security policy that forbids it) and `/api/status` (the
//! [`super::status::NodeStatus`] that `mana status --json` reads, collected fresh). Bind it to loopback: it
//! has no authentication, and it shows what `mana status` shows.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::{NodeError, Shared, status};

/// The page: static, its data comes from `/api/status`.
const PAGE: &str = include_str!("dashboard.html");

/// Most connections served at once (a browser opens a few; more are made to wait).
const MAX_CONNECTIONS: usize = 16;

/// Binds `addr` and serves the dashboard on the node's task tracker until shutdown; returns the bound address
/// (the port, when `addr`'s is 0).
pub(crate) async fn start(shared: Arc<Shared>, addr: SocketAddr) -> Result<SocketAddr, NodeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| NodeError::Config(format!("dashboard {addr}: cannot listen: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| NodeError::Config(format!("dashboard {addr}: {e}")))?;
    if !bound.ip().is_loopback() {
        tracing::warn!(%bound, "the dashboard listens beyond loopback: anyone who reaches it sees the node's status");
    }
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let task_shared = shared.clone();
    shared.spawn(async move {
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::debug!(error = %e, "dashboard accept failed");
                    continue;
                }
            };
            let conn_shared = task_shared.clone();
            task_shared.spawn(async move {
                let service = service_fn(move |request| respond(conn_shared.clone(), request));
                if let Err(e) = http1::Builder::new()
                    .max_buf_size(64 * 1024)
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(error = %e, "dashboard connection ended");
                }
                drop(permit);
            });
        }
    });
    Ok(bound)
}

async fn respond(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Ok(plain(StatusCode::METHOD_NOT_ALLOWED, "only GET"));
    }
    Ok(match request.uri().path() {
        "/" | "/index.html" => {
            let mut response = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
            let headers = response.headers_mut();
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            // Nothing from elsewhere: the page's own inline script and style, and its own origin's API.
            headers.insert(
                CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
                ),
            );
            response
        }
        "/api/status" => match status::collect(&shared).await {
            Ok(s) => match serde_json::to_vec(&s) {
                Ok(json) => {
                    let mut response = Response::new(Full::new(Bytes::from(json)));
                    let headers = response.headers_mut();
                    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
                    response
                }
                Err(e) => plain(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("status not encoded: {e}"),
                ),
            },
            Err(e) => plain(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("status not collected: {e}"),
            ),
        },
        _ => plain(StatusCode::NOT_FOUND, "not found"),
    })
}

fn plain(code: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text.to_owned())));
    *response.status_mut() = code;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
