//! The byte stream under each HTTP/2 connection, server and bench client alike.
//!
//! h2 (under tonic) keeps a DATA frame of 256 bytes or more out of its write buffer when the
//! stream says it takes vectored writes, and then must write it out before it can buffer the
//! next frame. A KMS response (an Encrypt's ciphertext blob, a data key) is just above that
//! size, so every response took two writes: headers and data, then the trailers, each its
//! own TCP send (strace at concurrency 64: 2 writev per response, 1.95 per request counted
//! with perf). A stream that declines vectored writes makes h2 copy frames under 1 KiB into
//! its buffer instead, so a response, and every response ready at the same moment, goes out
//! in one write (0.1 writes per request in the same measurement). Larger frames are still
//! sent without a copy.
//!
//! TLS is done here too, below the wrapper, rather than by tonic: tonic's TLS stream would
//! sit above it and report vectored writes again. The handshake is rustls's, with the same
//! rules as before: a client certificate is required and must chain to `tls.client_ca_file`
//! within its validity period, or no request is read.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// `T`, but reporting that it takes no vectored writes (see the module documentation).
pub struct Coalesced<T>(pub T);

impl<T: AsyncRead + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

/// Only `poll_write`: the default `is_write_vectored` (false) is the point of the type.
impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The peer's address (and, over TLS, its certificates) stay visible to requests.
impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Coalesced<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.connect_info()
    }
}

/// Whether a listener requires client certificates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Clients {
    /// gRPC: every client presents a certificate (it names the caller); HTTP/2 only.
    Certified,
    /// The AWS protocol: SigV4 names the caller; a certificate, if presented, must still
    /// chain to the client CA. HTTP/2 or HTTP/1.1.
    MayCertify,
    /// The XKS proxy API with mutual TLS: every client presents a certificate that chains
    /// to the client CA and whose subject common name is one of these (AWS KMS's is
    /// `cks.kms.<region>.amazonaws.com`); any other ends the handshake. HTTP/2 or HTTP/1.1.
    Subjects(Vec<String>),
}

/// A client certificate verifier that also requires the leaf's subject common name to be
/// one of `names`.
#[derive(Debug)]
struct SubjectVerifier {
    inner: Arc<dyn tokio_rustls::rustls::server::danger::ClientCertVerifier>,
    names: Vec<String>,
}

impl tokio_rustls::rustls::server::danger::ClientCertVerifier for SubjectVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[tokio_rustls::rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: tokio_rustls::rustls::pki_types::UnixTime,
    ) -> Result<tokio_rustls::rustls::server::danger::ClientCertVerified, tokio_rustls::rustls::Error>
    {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let named = x509_parser::parse_x509_certificate(end_entity.as_ref())
            .ok()
            .and_then(|(_, cert)| {
                let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
                Some(self.names.iter().any(|n| n == cn))
            })
            .unwrap_or(false);
        if named {
            Ok(verified)
        } else {
            Err(tokio_rustls::rustls::Error::InvalidCertificate(
                tokio_rustls::rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &tokio_rustls::rustls::DigitallySignedStruct,
    ) -> Result<
        tokio_rustls::rustls::client::danger::HandshakeSignatureValid,
        tokio_rustls::rustls::Error,
    > {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &tokio_rustls::rustls::DigitallySignedStruct,
    ) -> Result<
        tokio_rustls::rustls::client::danger::HandshakeSignatureValid,
        tokio_rustls::rustls::Error,
    > {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<tokio_rustls::rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A listener's TLS configuration: the server's PEM certificate chain and private key, and
/// the PEM CA certificate(s) that client certificates must chain to.
pub fn server_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: &[u8],
    clients: Clients,
) -> anyhow::Result<Arc<ServerConfig>> {
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(client_ca_pem) {
        roots
            .add(ca.context("tls.client_ca_file: not a PEM certificate")?)
            .context("tls.client_ca_file: not a usable CA certificate")?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let verifier = match clients {
        Clients::Certified | Clients::Subjects(_) => verifier,
        Clients::MayCertify => verifier.allow_unauthenticated(),
    }
    .build()
    .context("tls.client_ca_file: no CA certificate to verify clients with")?;
    let verifier: Arc<dyn tokio_rustls::rustls::server::danger::ClientCertVerifier> = match &clients
    {
        Clients::Subjects(names) => Arc::new(SubjectVerifier {
            inner: verifier,
            names: names.clone(),
        }),
        _ => verifier,
    };
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .context("tls.cert_file: not a PEM certificate chain")?;
    // The parser's own error is not passed on: it could quote the file.
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|_| anyhow::anyhow!("tls.key_file: no PEM private key in it"))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .context("tls.cert_file and tls.key_file do not make a usable server certificate")?;
    config.alpn_protocols = match clients {
        Clients::Certified => vec![b"h2".to_vec()],
        Clients::MayCertify | Clients::Subjects(_) => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    };
    Ok(Arc::new(config))
}

/// How long a pending connection is left alone before it may be closed to make room.
const MIN_PENDING: Duration = Duration::from_millis(250);

/// What makes a connection one that is kept (no longer pending).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proof {
    /// Its set-up: a TLS handshake whose client certificate names a principal.
    Handshake,
    /// An authenticated request on it (`Standing::prove`).
    Request,
}

/// Where a connection stands: pending until it is proven (see `Proof`), then kept. A
/// pending connection is what an unauthenticated client can hold, so it gives way: the
/// listener closes the oldest pending ones to make room for new clients.
#[derive(Debug, Default)]
pub struct Standing {
    proven: AtomicBool,
    /// Closed by its client or by the server, or its set-up failed.
    gone: AtomicBool,
    /// Tells the connection's reads to fail: it is closed to make room.
    evict: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl Standing {
    /// The connection carried an authenticated request: it is kept from now on.
    pub fn prove(&self) {
        self.proven.store(true, Ordering::Relaxed);
    }

    pub fn is_proven(&self) -> bool {
        self.proven.load(Ordering::Relaxed)
    }

    fn pending(&self) -> bool {
        !self.is_proven() && !self.gone.load(Ordering::Relaxed)
    }

    fn evict(&self) {
        self.gone.store(true, Ordering::Relaxed);
        let tx = self.evict.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(tx) = tx {
            let _ = tx.send(());
        }
    }
}

/// The connections not yet proven by a request, by peer address, for a listener whose
/// requests are authenticated above the transport (plaintext gRPC). Every request asks it
/// (`prove`), so an empty list costs an atomic load, not a lock.
#[derive(Debug, Default)]
pub struct UnprovenPeers {
    len: std::sync::atomic::AtomicUsize,
    map: std::sync::Mutex<HashMap<std::net::SocketAddr, Arc<Standing>>>,
}

pub type Unproven = Arc<UnprovenPeers>;

impl UnprovenPeers {
    /// Whether no connection waits to be proven.
    pub fn is_empty(&self) -> bool {
        self.len.load(Ordering::Relaxed) == 0
    }

    /// Marks the connection of `peer` proven, if it is listed.
    pub fn prove(&self, peer: std::net::SocketAddr) {
        if self.is_empty() {
            return;
        }
        if let Some(s) = self.with_map(|m| m.remove(&peer)) {
            s.prove();
        }
    }

    fn insert(&self, peer: std::net::SocketAddr, standing: Arc<Standing>) {
        self.with_map(|m| m.insert(peer, standing));
    }

    fn remove(&self, peer: &std::net::SocketAddr) {
        self.with_map(|m| m.remove(peer));
    }

    /// `f` on the list, with its length kept for `is_empty`.
    fn with_map<T>(
        &self,
        f: impl FnOnce(&mut HashMap<std::net::SocketAddr, Arc<Standing>>) -> T,
    ) -> T {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let out = f(&mut map);
        self.len.store(map.len(), Ordering::Relaxed);
        out
    }
}

/// What a listener lets clients hold before anyone is authenticated.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Open connections; past it, accepting waits (new clients queue in the backlog).
    pub max_connections: usize,
    /// Connections that have not sent their first bytes (or finished TLS) yet.
    pub max_pending: usize,
    /// How long a pending connection may stay pending.
    pub header_timeout: Duration,
    /// How long an open connection may go without a byte read or written.
    pub idle_timeout: Duration,
    /// What proves a connection (it is pending, and gives way, until then).
    pub proof: Proof,
    /// Where unproven connections are found by peer address, if the listener proves them
    /// that way.
    pub unproven: Option<Unproven>,
}

impl Limits {
    /// The gRPC listener's limits, from `[server]`.
    pub fn of(server: &crate::config::ServerSettings) -> Limits {
        Limits {
            max_connections: server.max_connections.max(1),
            max_pending: server.max_pending_connections.max(1),
            header_timeout: Duration::from_secs(server.header_timeout_seconds.max(1)),
            idle_timeout: Duration::from_secs(server.idle_timeout_seconds.max(1)),
            proof: Proof::Request,
            unproven: None,
        }
    }
}

/// The connections of `listener`, each with TCP_NODELAY set, once `handshake` has made them
/// ready (TLS accepted, or first bytes arrived) within `limits.header_timeout`.
///
/// At most `limits.max_connections` are open, pending ones included, so the process never
/// runs out of file descriptors because of clients. Pending connections (no first bytes or
/// no TLS handshake yet) are the ones an unauthenticated client can hold, so they give way:
/// when `limits.max_pending` are pending, or every connection slot is taken while some are
/// pending, the oldest pending connection is closed (once it has been pending for
/// `MIN_PENDING`) to take the new one. A flood of idle
/// connections thus cycles through the pending slots while a real client, which sends at
/// once, gets through. Only when every slot holds a ready connection does accepting wait
/// (new clients then queue in the kernel's backlog). A failed `accept` (out of descriptors
/// after all, say) is retried after a pause, never in a spin. Accepting stops when the
/// stream is dropped.
pub fn incoming<S, F, Fut>(
    listener: TcpListener,
    limits: Limits,
    handshake: F,
) -> ReceiverStream<io::Result<Guarded<S>>>
where
    S: Send + 'static,
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = io::Result<S>> + Send + 'static,
{
    let handshake = Arc::new(handshake);
    let open = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let (ready, incoming) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut failures = 0u32;
        // Pending connections (being set up, or open and not yet proven) with when they
        // were accepted, oldest first; proven and closed ones are dropped as the loop goes.
        let mut pending: std::collections::VecDeque<(
            tokio::time::Instant,
            tokio::task::AbortHandle,
            Arc<Standing>,
        )> = std::collections::VecDeque::new();
        let mut evicted = 0u64;
        loop {
            pending.retain(|(_, _, s)| s.pending());
            while pending.len() >= limits.max_pending
                || (open.available_permits() == 0 && !pending.is_empty())
            {
                let Some((since, set_up, oldest)) = pending.pop_front() else {
                    break;
                };
                // A pending connection gets a moment to prove itself before it can be pushed
                // out: a real client needs far less, and a flood is slowed to max_pending
                // connections per moment.
                tokio::time::sleep_until(since + MIN_PENDING).await;
                if !oldest.pending() {
                    continue; // proven or closed meanwhile
                }
                set_up.abort();
                oldest.evict();
                evicted += 1;
                crate::metrics::get().connection_evicted();
                if evicted.is_power_of_two() {
                    tracing::warn!(
                        evicted,
                        "closing connections that made no authenticated request, to make room (a flood of idle connections?)"
                    );
                }
                break;
            }
            let conn = tokio::select! {
                _ = ready.closed() => break,
                p = Arc::clone(&open).acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let accepted = tokio::select! {
                _ = ready.closed() => break,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => {
                    failures = 0;
                    a
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin, and
                    // say so once per streak, not once per try.
                    if failures == 0 {
                        tracing::warn!(error = %e, "accepting a connection failed; backing off");
                    }
                    failures = failures.saturating_add(1);
                    let pause = Duration::from_millis(10u64 << failures.min(6));
                    tokio::time::sleep(pause).await;
                    continue;
                }
            };
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "TCP_NODELAY");
            }
            let (handshake, ready) = (Arc::clone(&handshake), ready.clone());
            let (header_timeout, idle) = (limits.header_timeout, limits.idle_timeout);
            let standing = Arc::new(Standing::default());
            let (evict, evicted_rx) = tokio::sync::oneshot::channel();
            *standing.evict.lock().unwrap_or_else(|p| p.into_inner()) = Some(evict);
            let (proof, unproven) = (limits.proof, limits.unproven.clone());
            let task = tokio::spawn({
                let standing = Arc::clone(&standing);
                async move {
                    match tokio::time::timeout(header_timeout, handshake(tcp)).await {
                        Ok(Ok(io)) => {
                            if proof == Proof::Handshake {
                                standing.prove();
                            }
                            let watch = Watch {
                                standing,
                                evicted: Some(evicted_rx),
                                unproven,
                            };
                            watch.register(peer);
                            let guarded = Guarded::new(io, peer, conn, idle, watch);
                            let _ = ready.send(Ok(guarded)).await;
                        }
                        Ok(Err(e)) => {
                            standing.gone.store(true, Ordering::Relaxed);
                            tracing::debug!(%peer, error = %e, "connection set-up failed")
                        }
                        Err(_) => {
                            standing.gone.store(true, Ordering::Relaxed);
                            tracing::debug!(%peer, "connection sent nothing in time; closed")
                        }
                    }
                }
            });
            pending.push_back((tokio::time::Instant::now(), task.abort_handle(), standing));
        }
    });
    ReceiverStream::new(incoming)
}

/// The set-up of a plaintext connection: it is ready once its first bytes have arrived
/// (`peek` waits for data; readiness alone can be reported before any).
pub async fn first_bytes(tcp: TcpStream) -> io::Result<Coalesced<TcpStream>> {
    if tcp.peek(&mut [0u8; 1]).await? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(Coalesced(tcp))
}

/// A connection's set-up in progress.
pub type Handshake<S> = Pin<Box<dyn std::future::Future<Output = io::Result<S>> + Send>>;

/// The set-up of a TLS connection under `acceptor` (see `server_config`). rustls has checked
/// the client certificate's chain and dates; a certificate that names no principal
/// (`names_principal` false) is refused here too, so that no HTTP/2 stream is opened, and
/// nothing held, for a certificate that could never be authorised; the log says why.
pub fn tls_handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    names_principal: impl Fn(&[u8]) -> Result<(), String> + Send + Sync + 'static,
) -> impl Fn(TcpStream) -> Handshake<Coalesced<TlsStream<TcpStream>>> + Send + Sync + 'static {
    let names_principal = Arc::new(names_principal);
    move |tcp| {
        let accept = acceptor.accept(tcp);
        let names_principal = Arc::clone(&names_principal);
        Box::pin(async move {
            let tls = accept.await?;
            let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
            let named = leaf.map_or(Err("no client certificate".to_string()), |der| {
                names_principal(der)
            });
            if let Err(why) = named {
                let peer = tls.get_ref().0.peer_addr().ok();
                tracing::info!(?peer, reason = %why, "refused a TLS client whose certificate names no principal");
                return Err(io::Error::new(io::ErrorKind::PermissionDenied, why));
            }
            Ok(Coalesced(tls))
        })
    }
}

/// A tower layer giving every request body `limit` to arrive whole, counted from the first
/// time it is awaited: a stream that announces a message and then sends nothing more is
/// cut off, and what tonic reserved for it is freed, instead of holding a request slot.
pub fn body_deadline(
    limit: Duration,
) -> tower::util::MapRequestLayer<
    impl Fn(http::Request<tonic::body::Body>) -> http::Request<tonic::body::Body> + Clone,
> {
    tower::util::MapRequestLayer::new(move |req: http::Request<tonic::body::Body>| {
        req.map(|body| {
            tonic::body::Body::new(Deadline {
                inner: body,
                limit,
                timer: None,
            })
        })
    })
}

use tonic::codegen::http;

/// A body that fails once `limit` has passed since it first had to wait for data.
struct Deadline<B> {
    inner: B,
    limit: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> http_body::Body for Deadline<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Data = bytes::Bytes;
    type Error = tonic::codegen::StdError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => {
                let limit = self.limit;
                let timer = self
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(format!(
                        "the request message did not arrive within {limit:?}"
                    )
                    .into()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// An accepted connection: holds its place among `max_connections` while open, and fails
/// its reads once nothing has been read or written for the idle timeout.
pub struct Guarded<T> {
    inner: T,
    peer: std::net::SocketAddr,
    watch: Watch,
    _open: tokio::sync::OwnedSemaphorePermit,
    idle: Duration,
    /// When the connection was last active; the timer is moved to match only when it fires,
    /// so traffic costs a clock read, not a timer update.
    last: tokio::time::Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl<T> Guarded<T> {
    fn new(
        inner: T,
        peer: std::net::SocketAddr,
        open: tokio::sync::OwnedSemaphorePermit,
        idle: Duration,
        watch: Watch,
    ) -> Guarded<T> {
        let now = tokio::time::Instant::now();
        Guarded {
            inner,
            peer,
            watch,
            _open: open,
            idle,
            last: now,
            timer: Box::pin(tokio::time::sleep_until(now + idle)),
        }
    }

    pub fn peer(&self) -> std::net::SocketAddr {
        self.peer
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Where the connection stands: a front proves it once a request on it is authenticated.
    pub fn standing(&self) -> Arc<Standing> {
        Arc::clone(&self.watch.standing)
    }

    /// Whether the connection has been idle too long (registers for a wake-up otherwise).
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            let due = self.last + self.idle;
            if due <= tokio::time::Instant::now() {
                return true;
            }
            self.timer.as_mut().reset(due);
        }
    }
}

use std::future::Future as _;

/// A connection's side of its `Standing`: told when it is evicted, and saying when it closes.
struct Watch {
    standing: Arc<Standing>,
    /// Until the connection is proven: fires when it is closed to make room.
    evicted: Option<tokio::sync::oneshot::Receiver<()>>,
    unproven: Option<Unproven>,
}

impl Watch {
    /// Lists the connection among the unproven of its listener, if it has such a list.
    fn register(&self, peer: std::net::SocketAddr) {
        if let (Some(list), false) = (&self.unproven, self.standing.is_proven()) {
            list.insert(peer, Arc::clone(&self.standing));
        }
    }

    /// Whether the connection has been evicted (registers for a wake-up otherwise).
    fn evicted(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(rx) = self.evicted.as_mut() else {
            return false;
        };
        if self.standing.is_proven() {
            self.evicted = None;
            return false;
        }
        match Pin::new(rx).poll(cx) {
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err(_)) => {
                self.evicted = None; // the listener is gone: no one evicts any more
                false
            }
            Poll::Pending => false,
        }
    }
}

impl<T> Drop for Guarded<T> {
    fn drop(&mut self) {
        self.watch.standing.gone.store(true, Ordering::Relaxed);
        if let Some(list) = &self.watch.unproven {
            list.remove(&self.peer);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.watch.evicted(cx) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed to make room: no authenticated request yet",
            )));
        }
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.last = tokio::time::Instant::now();
                }
                Poll::Ready(r)
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection idle too long",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.last = tokio::time::Instant::now();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.last = tokio::time::Instant::now();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Guarded<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// (CA certificate PEM, server certificate PEM for `localhost`, server key PEM).
    pub(crate) fn pki() -> (String, String, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(
            rcgen::CertificateParams::new(Vec::<String>::new()).unwrap(),
            ca_key,
        );
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (ca.pem(), cert.pem(), key.serialize_pem())
    }

    /// Idle connections beyond the caps are pushed out oldest first; a client that sends
    /// gets through, and its connection is closed once idle.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pending_connections_give_way_and_idle_ones_close() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        use tokio_stream::StreamExt as _;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            max_connections: 16,
            max_pending: 8,
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_millis(500),
            proof: Proof::Handshake,
            unproven: None,
        };
        let mut incoming = incoming(listener, limits, first_bytes);
        let mut idle = Vec::new();
        for _ in 0..100 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut good = TcpStream::connect(addr).await.unwrap();
        good.write_all(b"hello").await.unwrap();
        let mut conn = tokio::time::timeout(Duration::from_secs(60), incoming.next())
            .await
            .expect("the client that sent was not accepted in time")
            .unwrap()
            .unwrap();
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        // Idle too long: the next read fails.
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // Most idle connections were closed to make room.
        let mut closed = 0;
        for s in &idle {
            let mut b = [0u8; 1];
            if matches!(s.try_read(&mut b), Ok(0))
                || matches!(s.try_read(&mut b), Err(e) if e.kind() != io::ErrorKind::WouldBlock)
            {
                closed += 1;
            }
        }
        assert!(closed >= 80, "{closed} of 100 idle connections closed");
    }

    #[test]
    fn a_server_config_needs_a_key_a_chain_and_a_client_ca() {
        let (ca, cert, key) = pki();
        let config = server_config(
            cert.as_bytes(),
            key.as_bytes(),
            ca.as_bytes(),
            Clients::Certified,
        )
        .unwrap();
        assert_eq!(config.alpn_protocols, vec![b"h2".to_vec()]);

        let err = |r: anyhow::Result<Arc<ServerConfig>>| format!("{:#}", r.unwrap_err());
        // No client CA: every client would be refused, so the listener does not start.
        assert!(err(server_config(
            cert.as_bytes(),
            key.as_bytes(),
            b"",
            Clients::Certified
        ))
        .contains("client_ca_file"));
        // A key file that holds no key: the error names the setting, never the content.
        let not_a_key = b"-----BEGIN NOTHING-----\nc2VjcmV0LXNlY3JldA==\n-----END NOTHING-----\n";
        let e = err(server_config(
            cert.as_bytes(),
            not_a_key,
            ca.as_bytes(),
            Clients::Certified,
        ));
        assert!(e.contains("tls.key_file"), "{e}");
        assert!(!e.contains("c2VjcmV0") && !e.contains("NOTHING"), "{e}");
        // Another certificate's key does not match the chain.
        let (_, _, other_key) = pki();
        let e = err(server_config(
            cert.as_bytes(),
            other_key.as_bytes(),
            ca.as_bytes(),
            Clients::Certified,
        ));
        assert!(e.contains("tls.cert_file"), "{e}");
    }
}
