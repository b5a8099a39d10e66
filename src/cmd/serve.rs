//! `mana serve`: an OpenAI-style HTTP endpoint for text completions, so that any OpenAI client library (or
//! curl) can use a mana model. Routes: `POST /v1/completions` (one completion, or a stream of server-sent
//! events with `"stream": true`), `GET /v1/models` and `GET /v1/models/{id}`.
//!
//! Completions come from a [`Completer`]: [`LocalModel`], a checkpoint written by `mana train`
//! (`--checkpoint DIR`) run on this machine's CPUs through the KV cache, or [`NetworkModel`], a run's latest
//! committed checkpoint across the network (`--bootstrap ADDR --run NAME --coordinator KEY`): the trunk
//! runs here and each routed expert on a node that hosts it (`mana_node::infer`).
//!
//! One completion runs at a time, on a blocking thread, so the server keeps answering (models, errors,
//! `server_busy`) while it runs. Up to `--queue` more requests wait their turn; beyond that a request is
//! answered 503 `server_busy` at once. A request body over [`MAX_BODY_BYTES`] is refused with 413 while it
//! is read (nothing beyond the limit is kept). Every refusal is a JSON error in OpenAI's shape
//! (`{"error": {"message", "type", "param", "code"}}`), and no input reaches a panic. A client that goes
//! away stops its generation: a stream notices at the next token it cannot deliver, a plain request when
//! hyper drops its future.
//!
//! Tokens are bytes (the model is byte-level). Text goes out as UTF-8, and a stream never splits a
//! character across events: [`TextAssembler`] holds back an incomplete character (and any tail that may
//! be the start of a stop string) until it knows more; bytes that can never be valid UTF-8 become U+FFFD,
//! exactly as `mana generate` prints them, so a stream's pieces add up to the plain answer.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Args;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use mana_engine::round::RunSpec;
use mana_kernels::CpuBackend;
use mana_kernels::generate::{self, CachedModel, GenerateConfig, LanguageModel, Sampling};
use mana_kernels::train::Trainer;
use mana_node::daemon;
use mana_node::infer::{InferClient, InferConfig, Session};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore, mpsc};

use super::generate::MAX_TOKENS_LIMIT;

/// The most bytes of a request body that are kept; a longer body is refused with 413.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// How much of a too-long body is read (and dropped) before the 413 goes out: a client that writes its whole
/// body before it reads the answer (most do) then gets the 413 rather than a reset connection. Longer bodies
/// are cut off at once.
const MAX_DRAINED_BYTES: usize = 16 << 20;

/// `max_tokens` when a request gives none (OpenAI's default for completions).
const DEFAULT_MAX_TOKENS: usize = 16;

/// The most stop strings a request may give (OpenAI's limit).
const MAX_STOPS: usize = 4;

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 256;

/// How long a client may take to send a request's headers before its connection is closed.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// The first pause after a failed accept.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);

/// The longest pause after failed accepts in a row.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Events a stream may have in flight before generation waits for the client to read them.
const STREAM_BUFFER: usize = 64;

/// The longest `--queue`.
const MAX_QUEUE: usize = 4096;

/// How long Ctrl-C waits for running generations (which stop at their next token) before the process exits.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Arguments of `mana serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the bound address is printed on start). The server
    /// has no authentication: keep it on loopback or behind a proxy that has.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Checkpoint directory written by `mana train --save`, served from this machine. Without it, the
    /// completions come from the network (--bootstrap, --run, --coordinator).
    #[arg(long, env = "MANA_CHECKPOINT", conflicts_with = "bootstrap")]
    checkpoint: Option<PathBuf>,
    /// Serve from the network: a bootstrap node to join through, with /p2p/<peer id> (repeatable).
    #[arg(long, env = "MANA_BOOTSTRAP", value_delimiter = ',')]
    bootstrap: Vec<String>,
    /// Serve from the network: the run whose latest committed checkpoint to use.
    #[arg(long, env = "MANA_RUN")]
    run: Option<String>,
    /// Serve from the network: the run coordinator's public key (64 hex digits), whose signed commits are
    /// trusted.
    #[arg(long, env = "MANA_COORDINATOR")]
    coordinator: Option<String>,
    /// Serve from the network: seconds to wait for a signed commit and a host of every expert.
    #[arg(long, default_value_t = 120)]
    wait_secs: u64,
    /// Serve from the network: how expert calls are made.
    #[command(flatten)]
    calls: super::infer::ExpertCallArgs,
    /// The model's id in the API (`model` in requests and in `/v1/models`); default: the checkpoint
    /// directory's name.
    #[arg(long)]
    model_name: Option<String>,
    /// CPU threads for the GEMMs (default: all).
    #[arg(long, env = "MANA_THREADS")]
    threads: Option<usize>,
    /// Requests that may wait while one generates; a request beyond them is answered 503 server_busy.
    #[arg(long, default_value_t = 8)]
    queue: usize,
}

/// Loads the checkpoint (or joins the network), then serves until Ctrl-C or SIGTERM.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    if args.queue > MAX_QUEUE {
        bail!("--queue is limited to {MAX_QUEUE}");
    }
    let Some(checkpoint) = args.checkpoint.clone() else {
        return run_network(args);
    };
    let model_id = match args.model_name {
        Some(name) if name.trim().is_empty() => bail!("--model-name must not be empty"),
        Some(name) => name,
        None => checkpoint_name(&checkpoint)?,
    };
    let backend = match args.threads {
        Some(n) if n > 0 => CpuBackend::with_threads(n),
        _ => CpuBackend::new(),
    };
    let trainer = Trainer::load(&checkpoint, Box::new(backend))
        .with_context(|| format!("loading the checkpoint {}", checkpoint.display()))?;
    let created = std::fs::metadata(&checkpoint)
        .and_then(|m| m.modified())
        .map_or_else(|_| unix_now(), unix_seconds);
    let completer = LocalModel { trainer };
    let server = server(model_id, created, Box::new(completer), args.queue);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let result = runtime.block_on(serve(Arc::new(server), args.listen));
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    result
}

/// The server's state around `completer`.
fn server(model_id: String, created: u64, completer: Box<dyn Completer>, queue: usize) -> Server {
    Server {
        model_id,
        created,
        max_tokens_limit: completer.max_tokens_limit(),
        vocab_size: completer.vocab_size(),
        completer: Arc::new(Mutex::new(completer)),
        admitted: Arc::new(Semaphore::new(queue.saturating_add(1))),
        stopping: Arc::new(AtomicBool::new(false)),
        next_id: AtomicU64::new(0),
        id_salt: random_u64(),
    }
}

/// Joins the network as an inference client, loads the run's latest committed checkpoint, then serves
/// until Ctrl-C or SIGTERM.
fn run_network(args: ServeArgs) -> anyhow::Result<()> {
    let (Some(run), Some(coordinator)) = (&args.run, &args.coordinator) else {
        bail!(
            "mana serve needs --checkpoint DIR, or --bootstrap ADDR --run NAME --coordinator KEY to serve a \
             run's latest committed checkpoint from the network"
        );
    };
    if args.bootstrap.is_empty() {
        bail!("serving from the network needs --bootstrap ADDR");
    }
    args.calls.check()?;
    let model_id = match &args.model_name {
        Some(name) if name.trim().is_empty() => bail!("--model-name must not be empty"),
        Some(name) => name.clone(),
        None => run.clone(),
    };
    let data_dir = super::infer::TempDir::new()?;
    let config = super::infer::client_config(
        &data_dir.0,
        &args.bootstrap,
        "/ip4/0.0.0.0/tcp/0",
        run,
        coordinator,
    )?;
    let spec = RunSpec::tiny();
    let infer = InferConfig {
        call_timeout: Duration::from_secs(10),
        wait: Duration::from_secs(args.wait_secs),
        check_share: args.calls.check_share,
        // Every selected expert must answer (a step that lacks one waits, up to the wait).
        k_min: spec.model.top_k,
        cache_experts: args.calls.cache_experts,
        dispatch: args.calls.dispatch,
        spec,
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let result = runtime.block_on(async {
        let node = Arc::new(daemon::start(config).await?);
        let loaded = InferClient::new(node.clone(), infer).load().await;
        let served = match loaded {
            Ok(session) => {
                tracing::info!(round = session.round, checkpoint = %session.checkpoint, "serving from the network");
                let completer = NetworkModel { session };
                let server = server(model_id, unix_now(), Box::new(completer), args.queue);
                serve(Arc::new(server), args.listen).await
            }
            Err(e) => Err(e.into()),
        };
        node.stop().await?;
        served
    });
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    result
}

/// The directory's own name, the default model id.
fn checkpoint_name(dir: &Path) -> anyhow::Result<String> {
    let full = dir
        .canonicalize()
        .with_context(|| format!("the checkpoint {}", dir.display()))?;
    full.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .with_context(|| {
            format!(
                "the checkpoint {} has no name: give --model-name",
                dir.display()
            )
        })
}

/// Binds `listen`, prints the bound address and serves connections until a shutdown signal.
async fn serve(server: Arc<Server>, listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let bound = listener.local_addr().context("the bound address")?;
    if !bound.ip().is_loopback() {
        tracing::warn!(%bound, "mana serve listens beyond loopback and has no authentication");
    }
    // Tests and scripts read this line to learn the port. Written, not println!: a closed stdout must not
    // end the server.
    let _ = writeln!(
        std::io::stdout(),
        "mana serve: model {} listening on http://{bound}",
        server.model_id
    );
    tracing::info!(%bound, model = %server.model_id, "serving completions");
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let shutdown = super::net::shutdown_signal("serve");
    tokio::pin!(shutdown);
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff = ACCEPT_BACKOFF_MIN;
                accepted
            }
            Err(e) => {
                // Out of file descriptors, a connection reset before accept: keep serving the others,
                // backing off (doubling up to a limit) so that a lasting failure does not spin.
                tracing::debug!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let server = server.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(server.respond(request).await) }
            });
            if let Err(e) = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
            drop(permit);
        });
    }
    // Running generations stop at their next token; the runtime's shutdown waits for them, briefly.
    server.stopping.store(true, Ordering::SeqCst);
    tracing::info!("mana serve stopped");
    Ok(())
}

/// What the server needs from whatever produces the tokens: a checkpoint on this machine ([`LocalModel`]) or
/// the network ([`NetworkModel`]). [`Completer::complete`] blocks, so the server calls
/// it on a blocking thread, one request at a time.
pub trait Completer: Send {
    /// The most tokens one request may ask for.
    fn max_tokens_limit(&self) -> usize;
    /// V: tokens (bytes of the prompt) must be below it.
    fn vocab_size(&self) -> usize;
    /// Generates up to `params.max_tokens` tokens after `prompt`, handing each to `on_token` as it comes;
    /// stops early when `on_token` breaks.
    fn complete(
        &mut self,
        prompt: &[u32],
        params: &Params,
        on_token: &mut dyn FnMut(u32) -> ControlFlow<()>,
    ) -> anyhow::Result<()>;
}

/// A checkpoint loaded on this machine, run through the KV cache (with MTP speculation when the model has
/// an MTP head: the same tokens, fewer passes).
pub struct LocalModel {
    /// The loaded checkpoint (the model inside is what runs).
    trainer: Trainer,
}

impl Completer for LocalModel {
    fn max_tokens_limit(&self) -> usize {
        MAX_TOKENS_LIMIT
    }

    fn vocab_size(&self) -> usize {
        self.trainer.model().config().vocab_size
    }

    fn complete(
        &mut self,
        prompt: &[u32],
        params: &Params,
        on_token: &mut dyn FnMut(u32) -> ControlFlow<()>,
    ) -> anyhow::Result<()> {
        let mut model = CachedModel::new(self.trainer.model_mut());
        let config = GenerateConfig {
            max_tokens: params.max_tokens,
            sampling: params.sampling,
            seed: params.seed,
            speculative: model.has_mtp(),
        };
        generate::generate_each(&mut model, prompt, &config, on_token)?;
        Ok(())
    }
}

/// A run's latest committed checkpoint across the network: the trunk here, each routed expert on a node that
/// hosts it (with MTP speculation when the model has an MTP head: the same tokens, fewer rounds of calls).
pub struct NetworkModel {
    /// The loaded checkpoint and its expert hosts.
    session: Session,
}

impl Completer for NetworkModel {
    fn max_tokens_limit(&self) -> usize {
        MAX_TOKENS_LIMIT
    }

    fn vocab_size(&self) -> usize {
        self.session.model_config().vocab_size
    }

    fn complete(
        &mut self,
        prompt: &[u32],
        params: &Params,
        on_token: &mut dyn FnMut(u32) -> ControlFlow<()>,
    ) -> anyhow::Result<()> {
        let config = GenerateConfig {
            max_tokens: params.max_tokens,
            sampling: params.sampling,
            seed: params.seed,
            speculative: self.session.model_config().mtp,
        };
        self.session.generate_each(prompt, &config, on_token)?;
        Ok(())
    }
}

/// The settings of one completion, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// Greedy (temperature 0) or sampled.
    pub sampling: Sampling,
    /// Seed of the sampling draws (the request's, or a random one).
    pub seed: u64,
}

/// A validated `POST /v1/completions` request.
#[derive(Debug, Clone, PartialEq)]
struct CompletionRequest {
    prompt: Vec<u32>,
    params: Params,
    stop: Vec<Vec<u8>>,
    stream: bool,
}

impl CompletionRequest {
    /// Logs that the generation of completion `id` begins.
    fn log_start(&self, id: &str) {
        tracing::info!(
            id,
            prompt_tokens = self.prompt.len(),
            max_tokens = self.params.max_tokens,
            stream = self.stream,
            "generating"
        );
    }
}

/// The server's state, shared by every connection.
struct Server {
    /// The model's id in the API.
    model_id: String,
    /// When the model was made (the checkpoint's modification time), in Unix seconds.
    created: u64,
    /// The most tokens one request may ask for.
    max_tokens_limit: usize,
    /// V, which every prompt byte must be below.
    vocab_size: usize,
    /// The completer, locked by the request that generates.
    completer: Arc<Mutex<Box<dyn Completer>>>,
    /// One permit per request admitted (generating or waiting): 1 + `--queue`.
    admitted: Arc<Semaphore>,
    /// Set on shutdown: running generations stop at their next token.
    stopping: Arc<AtomicBool>,
    /// Numbers the completions' ids.
    next_id: AtomicU64,
    /// Makes this process's ids differ from another's.
    id_salt: u64,
}

/// The body of every response: a whole JSON document or a stream of events.
type Body = BoxBody<Bytes, Infallible>;

impl Server {
    /// Routes one request; every failure becomes an [`ApiError`] response.
    async fn respond(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let response = match self.route(request).await {
            Ok(response) => response,
            Err(e) => e.into_response(),
        };
        tracing::info!(%method, %path, status = response.status().as_u16(), "request");
        response
    }

    async fn route(&self, request: Request<Incoming>) -> Result<Response<Body>, ApiError> {
        let full = request.uri().path().to_owned();
        let path = full.trim_end_matches('/');
        match path {
            "/v1/completions" => {
                only(&request, &Method::POST)?;
                self.completions(request).await
            }
            "/v1/models" => {
                only(&request, &Method::GET)?;
                Ok(json_response(
                    StatusCode::OK,
                    &json!({ "object": "list", "data": [self.model_object()] }),
                ))
            }
            _ => match path.strip_prefix("/v1/models/") {
                Some(id) => {
                    only(&request, &Method::GET)?;
                    if id != self.model_id {
                        return Err(self.unknown_model(id));
                    }
                    Ok(json_response(StatusCode::OK, &self.model_object()))
                }
                None => Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!(
                        "no route {full}: this server offers POST /v1/completions and GET /v1/models"
                    ),
                )
                .code("not_found")),
            },
        }
    }

    fn model_object(&self) -> Value {
        json!({ "id": self.model_id, "object": "model", "created": self.created, "owned_by": "mana" })
    }

    fn unknown_model(&self, id: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "the model {id:?} is not served here; this server serves {:?}",
                self.model_id
            ),
        )
        .param("model")
        .code("model_not_found")
    }

    async fn completions(&self, request: Request<Incoming>) -> Result<Response<Body>, ApiError> {
        let declared = request
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let body = read_body(request.into_body(), declared).await?;
        let json: Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
        let request = self.parse(&json)?;
        let Ok(permit) = self.admitted.clone().try_acquire_owned() else {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is busy: too many requests are waiting; try again later",
            )
            .kind("server_error")
            .code("server_busy"));
        };
        let id = format!(
            "cmpl-{:016x}{:08x}",
            self.id_salt,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let head = ChunkHead {
            id,
            created: unix_now(),
            model: self.model_id.clone(),
        };
        if request.stream {
            Ok(self.stream(request, head, permit))
        } else {
            self.complete(request, head, permit).await
        }
    }

    /// Validates a request's JSON (unknown fields are ignored, as OpenAI does).
    fn parse(&self, json: &Value) -> Result<CompletionRequest, ApiError> {
        let Some(body) = json.as_object() else {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        };
        let field = |name: &str| body.get(name).filter(|v| !v.is_null());
        if let Some(model) = field("model") {
            let Some(model) = model.as_str() else {
                return Err(ApiError::bad_request("model must be a string").param("model"));
            };
            if model != self.model_id {
                return Err(self.unknown_model(model));
            }
        }
        let prompt = parse_prompt(field("prompt"))?;
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(ApiError::bad_request(format!(
                "the prompt holds byte {bad}, outside the model's vocabulary of {}",
                self.vocab_size
            ))
            .param("prompt"));
        }
        let max_tokens = match field("max_tokens") {
            None => DEFAULT_MAX_TOKENS,
            Some(v) => match v.as_u64() {
                Some(n) if n <= self.max_tokens_limit as u64 => n as usize,
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "max_tokens must be an integer from 0 to {}",
                        self.max_tokens_limit
                    ))
                    .param("max_tokens"));
                }
            },
        };
        // Checked as the f32 the sampler gets: a tiny positive f64 may round to 0.
        let temperature = number(body, "temperature", 1.0, |t| (0.0..=2.0).contains(&t))
            .ok_or_else(|| bad_number("temperature", "a number from 0 to 2"))?;
        let top_p = number(body, "top_p", 1.0, |p| p > 0.0 && p <= 1.0)
            .ok_or_else(|| bad_number("top_p", "a number in (0, 1]"))?;
        let sampling = if temperature == 0.0 {
            Sampling::Greedy
        } else {
            Sampling::Sample {
                temperature: temperature.max(f64::from(f32::MIN_POSITIVE)) as f32,
                top_p: top_p.max(f64::from(f32::MIN_POSITIVE)) as f32,
            }
        };
        let seed = match field("seed") {
            None => random_u64(),
            Some(v) => v
                .as_u64()
                .or_else(|| v.as_i64().map(|s| s as u64))
                .ok_or_else(|| ApiError::bad_request("seed must be an integer").param("seed"))?,
        };
        let stream = match field("stream") {
            None => false,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| ApiError::bad_request("stream must be a boolean").param("stream"))?,
        };
        let stop = parse_stop(field("stop"))?;
        refuse_unsupported(body)?;
        Ok(CompletionRequest {
            prompt,
            params: Params {
                max_tokens,
                sampling,
                seed,
            },
            stop,
            stream,
        })
    }

    /// Generates the whole completion, then answers it as one JSON document.
    async fn complete(
        &self,
        request: CompletionRequest,
        head: ChunkHead,
        permit: OwnedSemaphorePermit,
    ) -> Result<Response<Body>, ApiError> {
        // Dropped with this future when hyper gives up on the connection: the generation then stops.
        let cancel = CancelOnDrop(Arc::new(AtomicBool::new(false)));
        let cancelled = cancel.0.clone();
        let stopping = self.stopping.clone();
        let mut completer = self.completer.clone().lock_owned().await;
        let started = Instant::now();
        let prompt_tokens = request.prompt.len();
        let id = head.id.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            request.log_start(&id);
            let mut text = TextAssembler::new(request.stop);
            let mut out = String::new();
            let mut interrupted = false;
            let result = completer.complete(&request.prompt, &request.params, &mut |token| {
                if cancelled.load(Ordering::Relaxed) || stopping.load(Ordering::Relaxed) {
                    interrupted = true;
                    return ControlFlow::Break(());
                }
                let piece = text.push(token);
                out.push_str(&piece);
                text.control()
            });
            out.push_str(&text.finish());
            // Free the slot before saying the generation ended, so that a client that reads the log
            // never finds the slot still taken.
            drop(permit);
            tracing::info!(
                tokens = text.tokens,
                seconds = started.elapsed().as_secs_f64(),
                client_left = cancelled.load(Ordering::Relaxed),
                "completion"
            );
            result.map(|()| (out, text, interrupted))
        })
        .await;
        let (out, text) = match outcome {
            // Only shutdown can be told: a client that left is not there to read it.
            Ok(Ok((_, _, true))) => return Err(ApiError::shutting_down()),
            Ok(Ok((out, text, false))) => (out, text),
            Ok(Err(e)) => return Err(ApiError::server(format!("generation failed: {e:#}"))),
            Err(e) => return Err(ApiError::server(format!("generation failed: {e}"))),
        };
        let mut body = head.chunk(&out, Some(text.finish_reason()));
        body["usage"] = json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": text.tokens,
            "total_tokens": prompt_tokens + text.tokens,
        });
        Ok(json_response(StatusCode::OK, &body))
    }

    /// Answers at once with an event stream and generates into it on a blocking thread: one event per token
    /// that completes some text, a last event with the finish reason, then `data: [DONE]`.
    fn stream(
        &self,
        request: CompletionRequest,
        head: ChunkHead,
        permit: OwnedSemaphorePermit,
    ) -> Response<Body> {
        let (events, rx) = mpsc::channel::<Bytes>(STREAM_BUFFER);
        let completer = self.completer.clone();
        let stopping = self.stopping.clone();
        tokio::spawn(async move {
            let completer = tokio::select! {
                guard = completer.lock_owned() => guard,
                // The client left while waiting its turn.
                _ = events.closed() => return,
            };
            let started = Instant::now();
            let generation = tokio::task::spawn_blocking(move || {
                let mut completer = completer;
                request.log_start(&head.id);
                let mut text = TextAssembler::new(request.stop);
                let mut client_left = false;
                let mut interrupted = false;
                let mut send = |event: Bytes| {
                    client_left = client_left || events.blocking_send(event).is_err();
                    !client_left
                };
                let result = completer.complete(&request.prompt, &request.params, &mut |token| {
                    if stopping.load(Ordering::Relaxed) {
                        interrupted = true;
                        return ControlFlow::Break(());
                    }
                    let piece = text.push(token);
                    if !piece.is_empty() && !send(event(&head.chunk(&piece, None))) {
                        return ControlFlow::Break(());
                    }
                    text.control()
                });
                match result {
                    // The text is cut short: say why instead of a finish reason that would be untrue.
                    Ok(()) if interrupted => {
                        send(event(&ApiError::shutting_down().body()));
                    }
                    Ok(()) => {
                        let last = head.chunk(&text.finish(), Some(text.finish_reason()));
                        if send(event(&last)) {
                            send(Bytes::from_static(b"data: [DONE]\n\n"));
                        }
                    }
                    Err(e) => {
                        let error = ApiError::server(format!("generation failed: {e:#}"));
                        send(event(&error.body()));
                    }
                }
                drop(permit);
                tracing::info!(
                    tokens = text.tokens,
                    seconds = started.elapsed().as_secs_f64(),
                    client_left,
                    "streamed completion"
                );
            })
            .await;
            if let Err(e) = generation {
                tracing::warn!(error = %e, "a streamed generation failed");
            }
        });
        let mut response = Response::new(EventStream { rx }.boxed());
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        response
    }
}

/// Refuses a method other than `allowed` with 405 (and an `Allow` header).
fn only(request: &Request<Incoming>, allowed: &Method) -> Result<(), ApiError> {
    if request.method() == allowed {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{} {} is not allowed: use {allowed}",
            request.method(),
            request.uri().path()
        ),
    )
    .code("method_not_allowed")
    .allow(allowed.clone()))
}

/// Reads a request body, keeping at most [`MAX_BODY_BYTES`] (see [`MAX_DRAINED_BYTES`] for what happens to
/// the rest).
async fn read_body(mut body: Incoming, declared: Option<u64>) -> Result<Vec<u8>, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is over {MAX_BODY_BYTES} bytes"),
        )
        .code("request_too_large")
    };
    if declared.is_some_and(|n| n > MAX_DRAINED_BYTES as u64) {
        return Err(too_large());
    }
    let mut kept = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::bad_request(format!("the request body could not be read: {e}"))
        })?;
        if let Ok(data) = frame.into_data() {
            seen = seen.saturating_add(data.len());
            if seen > MAX_DRAINED_BYTES {
                return Err(too_large());
            }
            if seen <= MAX_BODY_BYTES {
                kept.extend_from_slice(&data);
            }
        }
    }
    if seen > MAX_BODY_BYTES {
        return Err(too_large());
    }
    Ok(kept)
}

/// `prompt`: a non-empty string, or an array of one.
fn parse_prompt(value: Option<&Value>) -> Result<Vec<u32>, ApiError> {
    let bad = |message: &str| ApiError::bad_request(message).param("prompt");
    let text = match value {
        None => return Err(bad("prompt is required")),
        Some(Value::String(s)) => s.as_str(),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(s)] => s.as_str(),
            _ => {
                return Err(bad(
                    "prompt must be a string or an array of one string (one completion per request)",
                ));
            }
        },
        Some(_) => return Err(bad("prompt must be a string")),
    };
    if text.is_empty() {
        return Err(bad(
            "prompt must not be empty: the model continues at least one byte",
        ));
    }
    Ok(text.bytes().map(u32::from).collect())
}

/// `stop`: a string or an array of up to [`MAX_STOPS`] strings, none empty.
fn parse_stop(value: Option<&Value>) -> Result<Vec<Vec<u8>>, ApiError> {
    let bad = |message: String| ApiError::bad_request(message).param("stop");
    let stops: Vec<&str> = match value {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(items)) if items.len() <= MAX_STOPS => items
            .iter()
            .map(|v| v.as_str())
            .collect::<Option<_>>()
            .ok_or_else(|| bad("stop must hold strings".to_owned()))?,
        Some(_) => {
            return Err(bad(format!(
                "stop must be a string or an array of up to {MAX_STOPS} strings"
            )));
        }
    };
    if stops.iter().any(|s| s.is_empty()) {
        return Err(bad("stop strings must not be empty".to_owned()));
    }
    Ok(stops.into_iter().map(|s| s.as_bytes().to_vec()).collect())
}

/// An optional number field: `default` when absent or null, None when it is not a number or not `ok`.
fn number(
    body: &Map<String, Value>,
    name: &str,
    default: f64,
    ok: impl Fn(f64) -> bool,
) -> Option<f64> {
    match body.get(name).filter(|v| !v.is_null()) {
        None => Some(default),
        Some(v) => v.as_f64().filter(|&x| ok(x)),
    }
}

fn bad_number(name: &'static str, what: &str) -> ApiError {
    ApiError::bad_request(format!("{name} must be {what}")).param(name)
}

/// OpenAI options this server cannot honour are refused rather than silently ignored (their neutral
/// values are fine: many clients send them).
fn refuse_unsupported(body: &Map<String, Value>) -> Result<(), ApiError> {
    type IsNeutral = fn(&Value) -> bool;
    let neutral: [(&'static str, IsNeutral); 7] = [
        ("n", |v| v.as_u64() == Some(1)),
        ("best_of", |v| v.as_u64() == Some(1)),
        ("echo", |v| v.as_bool() == Some(false)),
        ("logprobs", |v| v.as_u64() == Some(0)),
        ("suffix", |v| v.as_str() == Some("")),
        ("presence_penalty", |v| v.as_f64() == Some(0.0)),
        ("frequency_penalty", |v| v.as_f64() == Some(0.0)),
    ];
    for (name, is_neutral) in neutral {
        if let Some(v) = body.get(name).filter(|v| !v.is_null())
            && !is_neutral(v)
        {
            return Err(ApiError::bad_request(format!(
                "{name} = {v} is not supported by this server"
            ))
            .param(name)
            .code("unsupported_parameter"));
        }
    }
    Ok(())
}

/// What every chunk of one completion shares.
struct ChunkHead {
    id: String,
    created: u64,
    model: String,
}

impl ChunkHead {
    /// A completion object (or stream chunk) with `text` and `finish_reason`.
    fn chunk(&self, text: &str, finish_reason: Option<&str>) -> Value {
        json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{ "text": text, "index": 0, "logprobs": null, "finish_reason": finish_reason }],
        })
    }
}

/// One server-sent event carrying `value`.
fn event(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// Turns generated bytes into text as they come. [`TextAssembler::push`] returns the text that is now
/// certain: it holds back an incomplete UTF-8 character and any tail that may be the start of a stop
/// string, and ends the text before the first stop string. Bytes that can never be valid become U+FFFD
/// (one per maximal invalid sequence, as [`String::from_utf8_lossy`] does), so the pieces, with
/// [`TextAssembler::finish`], always add up to the lossy decoding of the whole text.
pub struct TextAssembler {
    /// Every generated byte.
    bytes: Vec<u8>,
    /// How many of `bytes` went out as text.
    emitted: usize,
    /// The stop strings' bytes.
    stops: Vec<Vec<u8>>,
    /// Where the first stop string starts, once one appeared.
    stopped_at: Option<usize>,
    /// Tokens pushed (the completion's token count).
    tokens: usize,
}

impl TextAssembler {
    /// An assembler that ends the text before any of `stops` (empty ones are ignored).
    pub fn new(mut stops: Vec<Vec<u8>>) -> Self {
        stops.retain(|s| !s.is_empty());
        Self {
            bytes: Vec::new(),
            emitted: 0,
            stops,
            stopped_at: None,
            tokens: 0,
        }
    }

    /// Adds one token (a byte; a token above 255 counts as an invalid byte) and returns the text it
    /// completes, possibly empty.
    pub fn push(&mut self, token: u32) -> String {
        self.tokens += 1;
        if self.stopped_at.is_some() {
            return String::new();
        }
        self.bytes.push(u8::try_from(token).unwrap_or(0xFF));
        // A stop string cannot start before `emitted`: anything that could begin one was held back.
        let found = self
            .stops
            .iter()
            .filter_map(|s| find(&self.bytes[self.emitted..], s))
            .min();
        if let Some(at) = found {
            let end = self.emitted + at;
            self.stopped_at = Some(end);
            let text = String::from_utf8_lossy(&self.bytes[self.emitted..end]).into_owned();
            self.emitted = end;
            return text;
        }
        let held = self
            .stops
            .iter()
            .map(|s| longest_prefix_at_end(&self.bytes[self.emitted..], s))
            .max()
            .unwrap_or(0);
        let ready = self.bytes.len() - held;
        let (text, used) = decode_complete(&self.bytes[self.emitted..ready]);
        self.emitted += used;
        text
    }

    /// Whether generation should go on: it stops once a stop string appeared.
    pub fn control(&self) -> ControlFlow<()> {
        if self.stopped_at.is_some() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }

    /// The text still held back, now final: an incomplete character becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        let end = self.stopped_at.unwrap_or(self.bytes.len());
        let text = String::from_utf8_lossy(&self.bytes[self.emitted..end]).into_owned();
        self.emitted = end;
        text
    }

    /// "stop" when a stop string ended the text, "length" otherwise.
    pub fn finish_reason(&self) -> &'static str {
        if self.stopped_at.is_some() {
            "stop"
        } else {
            "length"
        }
    }
}

/// Where `needle` first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The length of the longest proper prefix of `stop` that `bytes` ends with.
fn longest_prefix_at_end(bytes: &[u8], stop: &[u8]) -> usize {
    (1..stop.len())
        .rev()
        .find(|&k| bytes.ends_with(&stop[..k]))
        .unwrap_or(0)
}

/// Decodes `bytes` up to an incomplete character at its end (which more bytes may complete), replacing
/// invalid sequences with U+FFFD; returns the text and how many bytes it used.
fn decode_complete(bytes: &[u8]) -> (String, usize) {
    let mut text = String::new();
    let mut used = 0;
    loop {
        let rest = &bytes[used..];
        match std::str::from_utf8(rest) {
            Ok(s) => {
                text.push_str(s);
                return (text, bytes.len());
            }
            Err(e) => {
                let valid = e.valid_up_to();
                text.push_str(std::str::from_utf8(&rest[..valid]).unwrap_or_default());
                used += valid;
                match e.error_len() {
                    Some(n) => {
                        text.push(char::REPLACEMENT_CHARACTER);
                        used += n;
                    }
                    None => return (text, used),
                }
            }
        }
    }
}

/// The body of a streamed completion: the events a generation sends, in order. When hyper drops it (the
/// client left), the generation's next send fails and it stops.
struct EventStream {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|event| event.map(|e| Ok(Frame::data(e))))
    }
}

/// Sets its flag when dropped: a plain request's generation checks it to stop once hyper drops the request.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A refusal, answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
    allow: Option<Method>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
            allow: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn server(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message).kind("server_error")
    }

    fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down: the completion was cut short",
        )
        .kind("server_error")
        .code("server_shutting_down")
    }

    fn kind(mut self, kind: &'static str) -> Self {
        self.kind = kind;
        self
    }

    fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    fn allow(mut self, method: Method) -> Self {
        self.allow = Some(method);
        self
    }

    fn body(&self) -> Value {
        json!({ "error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }

    fn into_response(self) -> Response<Body> {
        let mut response = json_response(self.status, &self.body());
        if let Some(method) = &self.allow
            && let Ok(value) = HeaderValue::from_str(method.as_str())
        {
            response.headers_mut().insert(ALLOW, value);
        }
        response
    }
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn unix_now() -> u64 {
    unix_seconds(SystemTime::now())
}

/// 64 random bits from the standard library's per-process hash keys (each `RandomState` differs), enough
/// for completion ids and default seeds, which need to differ, not to be secret.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server of the model "m" (limit 100 tokens) that generates nothing.
    fn test_server() -> Server {
        Server {
            model_id: "m".into(),
            created: 0,
            max_tokens_limit: 100,
            vocab_size: 256,
            completer: Arc::new(Mutex::new(Box::new(Nothing))),
            admitted: Arc::new(Semaphore::new(1)),
            stopping: Arc::new(AtomicBool::new(false)),
            next_id: AtomicU64::new(0),
            id_salt: 0,
        }
    }

    /// Pushes `bytes` one at a time and returns the pieces, the finished tail last.
    fn pieces(bytes: &[u8], stops: &[&str]) -> (Vec<String>, &'static str) {
        let mut text = TextAssembler::new(stops.iter().map(|s| s.as_bytes().to_vec()).collect());
        let mut out = Vec::new();
        for &b in bytes {
            out.push(text.push(u32::from(b)));
            if text.control().is_break() {
                break;
            }
        }
        out.push(text.finish());
        (out, text.finish_reason())
    }

    #[test]
    fn a_character_is_never_split_and_the_pieces_add_up_to_the_lossy_text() {
        let cases: [&[u8]; 6] = [
            "héllo wörld ✓ 🎉".as_bytes(),
            b"\xff\xfeabc\xc3",
            b"a\xe2\x9c",
            b"\xf0\x9f\x8e\x89\xf0\x9f",
            b"\xc3\x28\xe2\x82\x28\xed\xa0\x80",
            b"",
        ];
        for bytes in cases {
            let (out, reason) = pieces(bytes, &[]);
            assert_eq!(reason, "length");
            assert_eq!(out.concat(), String::from_utf8_lossy(bytes), "{bytes:?}");
        }
        let (out, _) = pieces("é🎉".as_bytes(), &[]);
        assert_eq!(out, ["", "é", "", "", "", "🎉", ""]);
    }

    #[test]
    fn text_ends_before_the_first_stop_string_and_a_possible_start_is_held() {
        let (out, reason) = pieces(b"one two. three", &[".", "xyz"]);
        assert_eq!(out.concat(), "one two");
        assert_eq!(reason, "stop");
        // "ab" may begin "abc", so it waits; "abd" shows it did not.
        let (out, reason) = pieces(b"xabdabc!", &["abc"]);
        assert_eq!(out, ["x", "", "", "abd", "", "", "", ""]);
        assert_eq!(reason, "stop");
        let (out, reason) = pieces(b"xab", &["abc"]);
        assert_eq!(out.concat(), "xab");
        assert_eq!(reason, "length");
        // The earliest of several stop strings wins.
        let (out, _) = pieces(b"hello world", &["world", "lo w"]);
        assert_eq!(out.concat(), "hel");
        let (out, _) = pieces("caf\u{e9}!".as_bytes(), &["\u{e9}"]);
        assert_eq!(out.concat(), "caf");
        let (out, reason) = pieces(b"abc", &[""]);
        assert_eq!((out.concat().as_str(), reason), ("abc", "length"));
    }

    #[test]
    fn requests_are_validated_with_the_field_named() {
        let server = test_server();
        let ok = server
            .parse(&json!({"model": "m", "prompt": ["hi"], "max_tokens": 5, "temperature": 0, "stop": ["a", "b"], "seed": 3, "whatever": 1}))
            .expect("valid");
        assert_eq!(ok.prompt, [104, 105]);
        assert_eq!(
            ok.params,
            Params {
                max_tokens: 5,
                sampling: Sampling::Greedy,
                seed: 3
            }
        );
        assert_eq!(ok.stop, [b"a".to_vec(), b"b".to_vec()]);
        // A tiny temperature or top_p stays positive as the sampler's f32.
        let tiny = server
            .parse(&json!({"prompt": "a", "temperature": 1e-50, "top_p": 1e-60}))
            .expect("valid");
        let Sampling::Sample { temperature, top_p } = tiny.params.sampling else {
            panic!("sampled: {tiny:?}");
        };
        assert!(temperature > 0.0 && top_p > 0.0);
        let refused = |body: Value| server.parse(&body).expect_err("refused");
        for (body, status, param) in [
            (json!([1]), 400, None),
            (json!({}), 400, Some("prompt")),
            (json!({"prompt": ""}), 400, Some("prompt")),
            (json!({"prompt": ["a", "b"]}), 400, Some("prompt")),
            (json!({"prompt": 5}), 400, Some("prompt")),
            (json!({"prompt": "a", "model": "other"}), 404, Some("model")),
            (
                json!({"prompt": "a", "max_tokens": 101}),
                400,
                Some("max_tokens"),
            ),
            (
                json!({"prompt": "a", "max_tokens": -1}),
                400,
                Some("max_tokens"),
            ),
            (
                json!({"prompt": "a", "temperature": 2.5}),
                400,
                Some("temperature"),
            ),
            (json!({"prompt": "a", "top_p": 0}), 400, Some("top_p")),
            (
                json!({"prompt": "a", "stop": ["1", "2", "3", "4", "5"]}),
                400,
                Some("stop"),
            ),
            (json!({"prompt": "a", "stop": [""]}), 400, Some("stop")),
            (json!({"prompt": "a", "stream": "yes"}), 400, Some("stream")),
            (json!({"prompt": "a", "n": 2}), 400, Some("n")),
            (json!({"prompt": "a", "echo": true}), 400, Some("echo")),
        ] {
            let e = refused(body.clone());
            assert_eq!(e.status.as_u16(), status, "{body}");
            assert_eq!(e.param, param, "{body}");
        }
    }

    #[test]
    fn no_value_in_any_field_panics() {
        let server = test_server();
        let values = [
            json!(null),
            json!(true),
            json!(-1),
            json!(0),
            json!(u64::MAX),
            json!(i64::MIN),
            json!(1e308),
            json!(-1e-308),
            json!(""),
            json!("x"),
            json!([]),
            json!([null]),
            json!([1, 2]),
            json!({"a": 1}),
        ];
        let fields = [
            "model",
            "prompt",
            "max_tokens",
            "temperature",
            "top_p",
            "seed",
            "stream",
            "stop",
            "n",
            "best_of",
            "echo",
            "logprobs",
            "suffix",
            "presence_penalty",
            "frequency_penalty",
        ];
        for field in fields {
            for value in &values {
                let mut body = json!({"prompt": "a"});
                body[field] = value.clone();
                if let Err(e) = server.parse(&body) {
                    assert!(e.status.is_client_error(), "{body}: {e:?}");
                    assert!(!e.message.is_empty());
                }
            }
        }
    }

    struct Nothing;

    impl Completer for Nothing {
        fn max_tokens_limit(&self) -> usize {
            100
        }

        fn vocab_size(&self) -> usize {
            256
        }

        fn complete(
            &mut self,
            _: &[u32],
            _: &Params,
            _: &mut dyn FnMut(u32) -> ControlFlow<()>,
        ) -> anyhow::Result<()> {
            Ok(())
        }
    }
}
