//! The AWS KMS protocol front: `POST /` with `X-Amz-Target: TrentService.<Operation>` and an
//! AWS JSON 1.1 body, over HTTP/1.1 or HTTP/2, signed with SigV4. The caller is the
//! principal of the signing access key (`sigv4`); the request and response are the proto's
//! own messages in AWS's JSON (`json`); everything between is the request path every
//! transport shares (`api::path`): audit, quotas, metrics, the failure log.
//!
//! Answers are AWS's: `x-amzn-RequestId` on every response (the id of the request's audit
//! line), errors as `{"__type": <exception>, "message": ...}` with HTTP 400, or 5xx for the
//! exceptions the model marks as server faults, which SDKs retry.

pub mod json;
pub mod sigv4;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};

use super::auth::Authenticator;
use super::path::{Call, RequestPath};
use super::{audited, Audited};
use crate::kms::access::Caller;
use crate::kms::Kms;
use model::error::{ErrorKind, KmsError, KmsResult};
use model::op::{Op, Recorded};

const TARGET_PREFIX: &str = "TrentService.";
const CONTENT_TYPE: &str = "application/x-amz-json-1.1";

/// The AWS protocol front of one listener.
pub struct Front {
    path: RequestPath,
    verifier: sigv4::Verifier,
    /// Names the principal of a client certificate, when one is presented over TLS.
    auth: Arc<Authenticator>,
    /// How long a request body may take to arrive whole.
    body_deadline: Duration,
    /// Bytes of request bodies read before their signature is checked, over all
    /// connections: what unauthenticated clients can make this listener hold.
    unauthenticated_bytes: tokio::sync::Semaphore,
    /// Authenticated requests served at once on this listener; more wait, at most
    /// `slot_wait`, then are answered ThrottlingException.
    inflight: tokio::sync::Semaphore,
    slot_wait: Duration,
}

/// The far end of a connection: its address and, over TLS, its certificate (DER), if any.
#[derive(Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub certificate: Option<Arc<[u8]>>,
    /// Proven by the first request on the connection whose signature holds.
    pub standing: Arc<crate::transport::Standing>,
}

impl Front {
    pub fn new(
        path: RequestPath,
        verifier: sigv4::Verifier,
        auth: Arc<Authenticator>,
        server: &crate::config::ServerSettings,
    ) -> Front {
        Front {
            path,
            verifier,
            auth,
            body_deadline: Duration::from_secs(server.header_timeout_seconds.max(1)),
            unauthenticated_bytes: tokio::sync::Semaphore::new(
                server.max_inflight_requests.max(1) * super::MAX_REQUEST_BYTES,
            ),
            inflight: tokio::sync::Semaphore::new(server.max_inflight_requests.max(1)),
            slot_wait: Duration::from_secs(server.header_timeout_seconds.max(1)),
        }
    }

    /// Answers one HTTP request, in an order that lets no one hold what is scarce before
    /// they are known: the headers are checked first (an unsigned request is refused before
    /// its body is read); the body is read under its deadline, its bytes counted against the
    /// listener's budget for requests not yet authenticated; then the signature is checked;
    /// only then does the request wait, for a bounded time, for one of the request slots.
    pub async fn handle(&self, req: Request<Incoming>, peer: &Peer) -> Response<Full<Bytes>> {
        let op = match operation(&req) {
            Ok(op) => op,
            Err(e) => return error(&e, &super::path::request_id()),
        };
        let (parts, body) = req.into_parts();
        let headers = header_list(&parts);
        if let Err(e) = self.verifier.precheck(&headers, SystemTime::now()) {
            return self.refuse(op, e, peer).await;
        }
        let read = {
            let _reading = crate::metrics::get().aws_stage("reading");
            self.read_body(op, body).await
        };
        let (body, budget) = match read {
            Ok(read) => read,
            Err(e) => return self.refuse(op, e, peer).await,
        };
        let caller = match self.caller(&parts, &headers, &body, peer) {
            Ok(caller) => caller,
            Err(e) => return self.refuse(op, e, peer).await,
        };
        peer.standing.prove();
        let slot = {
            let _waiting = crate::metrics::get().aws_stage("waiting");
            tokio::time::timeout(self.slot_wait, self.inflight.acquire()).await
        };
        drop(budget);
        let _permit = match slot {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return error(&unavailable(), &super::path::request_id()),
            Err(_) => {
                let busy = KmsError::new(
                    ErrorKind::Throttling,
                    format!(
                        "The service is busy: no request slot became free within {:?}",
                        self.slot_wait
                    ),
                );
                let call = Call::new(op, Err(busy), Some(peer.addr));
                return self.answer(&call, &body).await;
            }
        };
        let _serving = crate::metrics::get().aws_stage("serving");
        let call = Call::new(op, Ok(caller), Some(peer.addr));
        self.answer(&call, &body).await
    }

    /// Runs `call` on the request path and writes its answer.
    async fn answer(&self, call: &Call, body: &[u8]) -> Response<Full<Bytes>> {
        match super::aws_dispatch(&self.path, call, body).await {
            Ok(json) => answer(StatusCode::OK, json, &call.request_id),
            Err(e) => error(&e, &call.request_id),
        }
    }

    /// A request refused before its caller is known: recorded without its content (the
    /// request path limits such lines per source).
    async fn refuse(&self, op: Op, e: KmsError, peer: &Peer) -> Response<Full<Bytes>> {
        let call = Call::new(op, Err(e), Some(peer.addr));
        self.answer(&call, &[]).await
    }

    /// The body, whole, within the body deadline and `MAX_REQUEST_BYTES`; its bytes are
    /// held against the budget of unauthenticated requests until the permit is dropped.
    async fn read_body(
        &self,
        op: Op,
        mut body: Incoming,
    ) -> KmsResult<(Bytes, tokio::sync::SemaphorePermit<'_>)> {
        let read = async {
            let mut held: Option<tokio::sync::SemaphorePermit<'_>> = None;
            let mut bytes = bytes::BytesMut::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|_| {
                    KmsError::new(
                        ErrorKind::Serialization,
                        format!("The {} request body could not be read", op.name()),
                    )
                })?;
                let Ok(data) = frame.into_data() else {
                    continue; // trailers
                };
                if bytes.len() + data.len() > super::MAX_REQUEST_BYTES {
                    return Err(KmsError::validation(format!(
                        "The {} request is larger than the {} bytes allowed",
                        op.name(),
                        super::MAX_REQUEST_BYTES
                    )));
                }
                let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
                let permit = self
                    .unauthenticated_bytes
                    .acquire_many(n)
                    .await
                    .map_err(|_| unavailable())?;
                match held.as_mut() {
                    Some(h) => h.merge(permit),
                    None => held = Some(permit),
                }
                bytes.extend_from_slice(&data);
            }
            let held = match held {
                Some(h) => h,
                None => self
                    .unauthenticated_bytes
                    .acquire_many(0)
                    .await
                    .map_err(|_| unavailable())?,
            };
            Ok((bytes.freeze(), held))
        };
        match tokio::time::timeout(self.body_deadline, read).await {
            Ok(r) => r,
            Err(_) => Err(KmsError::new(
                ErrorKind::Serialization,
                format!(
                    "The {} request body did not arrive within {:?}",
                    op.name(),
                    self.body_deadline
                ),
            )),
        }
    }

    /// The principal that signed the request. A client certificate, when presented, must
    /// name the same principal.
    fn caller(
        &self,
        parts: &hyper::http::request::Parts,
        headers: &[(&str, &str)],
        body: &[u8],
        peer: &Peer,
    ) -> KmsResult<Caller> {
        let uri = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let principal = self.verifier.verify(
            &sigv4::Request {
                method: parts.method.as_str(),
                uri,
                headers,
                body,
            },
            SystemTime::now(),
        )?;
        if let Some(der) = &peer.certificate {
            let named = self.auth.principal(Some(der))?;
            if named.arn != principal.arn {
                return Err(KmsError::new(
                    ErrorKind::AccessDenied,
                    format!(
                        "The client certificate names {}, but the request is signed with an \
                         access key of {}",
                        named.arn, principal.arn
                    ),
                ));
            }
        }
        Ok(Caller::new(principal, Some(peer.addr)))
    }
}

/// A request's headers as text (names in lower case); HTTP/2 carries the host as the
/// request's authority, which stands in for a Host header.
fn header_list(parts: &hyper::http::request::Parts) -> Vec<(&str, &str)> {
    let mut headers: Vec<(&str, &str)> = parts
        .headers
        .iter()
        .filter_map(|(n, v)| v.to_str().ok().map(|v| (n.as_str(), v)))
        .collect();
    if !parts.headers.contains_key(hyper::header::HOST) {
        if let Some(authority) = parts.uri.authority() {
            headers.push(("host", authority.as_str()));
        }
    }
    headers
}

/// The operation a request names, or UnknownOperationException (no audit line: there is
/// no operation to record, as AWS records none).
fn operation<B>(req: &Request<B>) -> KmsResult<Op> {
    let unknown = || KmsError::new(ErrorKind::UnknownOperation, "");
    if req.method() != hyper::Method::POST || req.uri().path() != "/" {
        return Err(unknown());
    }
    // A body of another content type is no AWS JSON 1.1 request: AWS answers it as an
    // operation it does not know (Kinesis, sent `application/octet-stream`, answered
    // `<UnknownOperationException/>`: disneystreaming/smithy4s issue 167).
    let json = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|t| t.to_str().ok())
        .and_then(|t| t.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case(CONTENT_TYPE));
    if !json {
        return Err(unknown());
    }
    req.headers()
        .get("x-amz-target")
        .and_then(|t| t.to_str().ok())
        .and_then(|t| t.strip_prefix(TARGET_PREFIX))
        .and_then(Op::parse)
        .ok_or_else(unknown)
}

fn unavailable() -> KmsError {
    KmsError::new(ErrorKind::KmsInternal, "The service is shutting down")
}

/// One operation over the AWS protocol: its JSON request read, run on the shared request
/// path with `handle` (the same mapping gRPC uses), its response written as JSON.
pub(super) async fn call<R, T>(
    path: &RequestPath,
    call: &Call,
    body: &[u8],
    handle: impl AsyncFnOnce(&Arc<Kms>, &Caller, R) -> KmsResult<T>,
) -> KmsResult<Vec<u8>>
where
    R: DeserializeOwned + Audited,
    T: Serialize,
{
    let request = json::parse::<R>(call.op, body);
    let context = match (&request, call.op.recorded()) {
        (Ok(r), Recorded::EncryptionContext) => r.encryption_context().and_then(audited),
        _ => None,
    };
    let target = request
        .as_ref()
        .ok()
        .and_then(|r| super::intent_target(call.op, r));
    let response = path
        .run(call, context, target, async |kms, caller| {
            handle(kms, caller, request?).await
        })
        .await?;
    json::write(&response)
}

/// The HTTP status AWS answers an exception with: 5xx for the model's server faults (so
/// that SDKs retry them), 400 for everything the caller can change.
pub fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::KmsInternal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorKind::DependencyTimeout => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_REQUEST,
    }
}

fn answer(status: StatusCode, body: Vec<u8>, request_id: &uuid::Uuid) -> Response<Full<Bytes>> {
    let mut id = uuid::Uuid::encode_buffer();
    let id = request_id.hyphenated().encode_lower(&mut id);
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(CONTENT_TYPE),
    );
    if let Ok(id) = hyper::header::HeaderValue::from_str(id) {
        headers.insert("x-amzn-requestid", id);
    }
    response
}

fn error(e: &KmsError, request_id: &uuid::Uuid) -> Response<Full<Bytes>> {
    let mut body = serde_json::Map::new();
    body.insert("__type".into(), e.kind.aws_name().into());
    if !e.message.is_empty() {
        body.insert("message".into(), e.message.clone().into());
    }
    let body = serde_json::to_vec(&body).unwrap_or_default();
    answer(status_of(e.kind), body, request_id)
}

/// The client certificate of a connection, if it has one.
pub trait ClientCertificate {
    fn certificate(&self) -> Option<Arc<[u8]>>;
}

impl ClientCertificate for crate::transport::Coalesced<tokio::net::TcpStream> {
    fn certificate(&self) -> Option<Arc<[u8]>> {
        None
    }
}

impl ClientCertificate
    for crate::transport::Coalesced<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>
{
    fn certificate(&self) -> Option<Arc<[u8]>> {
        let certs = self.0.get_ref().1.peer_certificates()?;
        certs.first().map(|c| Arc::from(c.as_ref()))
    }
}

/// Completes once `stop` says so (or its sender is gone).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// HTTP/2 windows and header bounds, as on the gRPC listener.
const STREAM_WINDOW: u32 = 256 * 1024;
const CONNECTION_WINDOW: u32 = 512 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// HTTP/1.1: the most of a request (line and headers) buffered before it is refused.
const MAX_HTTP1_BUFFER: usize = 64 * 1024;

/// Serves `incoming` connections with `front` until `stop` turns true; then each connection
/// finishes the requests it has and closes, and this returns once all have.
pub async fn serve<S>(
    front: Arc<Front>,
    mut incoming: tokio_stream::wrappers::ReceiverStream<
        std::io::Result<crate::transport::Guarded<S>>,
    >,
    max_concurrent_streams: u32,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    S: ClientCertificate + AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tokio_stream::StreamExt as _;

    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(front.body_deadline)
        .max_buf_size(MAX_HTTP1_BUFFER);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(max_concurrent_streams)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(MAX_HEADER_LIST);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let next = tokio::select! {
            next = incoming.next() => next,
            _ = stopped(&mut stop) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let io = match next {
            Some(Ok(io)) => io,
            Some(Err(_)) => continue,
            None => break,
        };
        let peer = Peer {
            addr: io.peer(),
            certificate: io.get_ref().certificate(),
            standing: io.standing(),
        };
        let front = Arc::clone(&front);
        let service = hyper::service::service_fn(move |req| {
            let (front, peer) = (Arc::clone(&front), peer.clone());
            async move { Ok::<_, Infallible>(front.handle(req, &peer).await) }
        });
        let connection = builder
            .serve_connection(TokioIo::new(io), service)
            .into_owned();
        let mut stop = stop.clone();
        connections.spawn(async move {
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = stopped(&mut stop) => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    drop(incoming);
    while connections.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exceptions the AWS model marks as server faults answer 5xx (SDKs retry them);
    /// everything a caller can change answers 400.
    #[test]
    fn faults_answer_5xx_and_client_errors_400() {
        assert_eq!(status_of(ErrorKind::KmsInternal), 500);
        assert_eq!(status_of(ErrorKind::DependencyTimeout), 503);
        for kind in [
            ErrorKind::Validation,
            ErrorKind::NotFound,
            ErrorKind::Throttling,
            ErrorKind::AccessDenied,
            ErrorKind::InvalidSignature,
            ErrorKind::KmsInvalidState,
        ] {
            assert_eq!(status_of(kind), 400, "{kind:?}");
        }
        let e = KmsError::new(ErrorKind::NotFound, "Key 'k' does not exist");
        let id = uuid::Uuid::nil();
        let r = error(&e, &id);
        assert_eq!(r.status(), 400);
        assert_eq!(r.headers()["x-amzn-requestid"], id.to_string().as_str());
        assert_eq!(r.headers()["content-type"], CONTENT_TYPE);
    }
}
