//! The one HTTP stack of the HTTP fronts (the AWS KMS protocol, the admin listener): an
//! axum `Router` served over the connections `transport::incoming` accepted, which already
//! hold the listener's connection caps, pending-connection eviction and idle timeout. Here
//! each connection gets its HTTP/1.1 and HTTP/2 bounds (header deadline, header sizes,
//! streams, flow-control windows), and each request carries its connection's `Peer` as an
//! extension. A new front is a new router, or new routes on one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

/// The far end of a connection, on every request as an extension: its address, its client
/// certificate (DER) over TLS if it presented one, and its standing (proven by the first
/// request that authenticates, see `transport::Standing`).
#[derive(Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub certificate: Option<Arc<[u8]>>,
    pub standing: Arc<crate::transport::Standing>,
}

/// The client certificate of a connection, if it has one.
pub trait ClientCertificate {
    fn certificate(&self) -> Option<Arc<[u8]>>;
}

impl ClientCertificate for tokio::net::TcpStream {
    fn certificate(&self) -> Option<Arc<[u8]>> {
        None
    }
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

/// The HTTP bounds of a listener's connections.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// HTTP/1.1: the time a request's line and headers may take to arrive.
    pub header_timeout: Duration,
    /// HTTP/2: streams open at once on one connection.
    pub max_concurrent_streams: u32,
}

/// HTTP/2 windows and header bounds, as on the gRPC listener.
const STREAM_WINDOW: u32 = 256 * 1024;
const CONNECTION_WINDOW: u32 = 512 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// HTTP/1.1: the most of a request (line and headers) buffered before it is refused.
const MAX_HTTP1_BUFFER: usize = 64 * 1024;

/// Completes once `stop` says so (or its sender is gone).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Serves `router` on the connections of `incoming` until `stop` turns true; then each
/// connection finishes the requests it has and closes, and this returns once all have.
pub async fn serve<S>(
    router: axum::Router,
    mut incoming: tokio_stream::wrappers::ReceiverStream<
        std::io::Result<crate::transport::Guarded<S>>,
    >,
    bounds: Bounds,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    S: ClientCertificate + AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tokio_stream::StreamExt as _;

    // HTTP/1.1 and HTTP/2 (prior knowledge) on every listener: load balancers check the
    // admin listener in the protocol of the servers they check (HAProxy's `proto h2`).
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(bounds.header_timeout)
        .max_buf_size(MAX_HTTP1_BUFFER);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(bounds.max_concurrent_streams)
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
        let service = tower::ServiceBuilder::new()
            .map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(peer.clone());
                req
            })
            .service(router.clone());
        let connection = builder
            .serve_connection(
                TokioIo::new(io),
                hyper_util::service::TowerToHyperService::new(service),
            )
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
