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

use std::io;
use std::pin::Pin;
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

/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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

/// The listener's TLS configuration: the server's PEM certificate chain and private key, and
/// the PEM CA certificate(s) that every client certificate must chain to. HTTP/2 only.
pub fn server_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: &[u8],
) -> anyhow::Result<Arc<ServerConfig>> {
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(client_ca_pem) {
        roots
            .add(ca.context("tls.client_ca_file: not a PEM certificate")?)
            .context("tls.client_ca_file: not a usable CA certificate")?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .context("tls.client_ca_file: no CA certificate to verify clients with")?;
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
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The connections of `listener` that completed a TLS handshake under `config`, each with
/// TCP_NODELAY set. Handshakes run concurrently, each within `HANDSHAKE_TIMEOUT`; a failed one
/// is logged (debug) and dropped. Accepting stops when the stream is dropped.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> ReceiverStream<io::Result<Coalesced<TlsStream<TcpStream>>>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let (ready, incoming) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = ready.closed() => break,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "TCP_NODELAY");
            }
            let (acceptor, ready) = (acceptor.clone(), ready.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = ready.send(Ok(Coalesced(tls))).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(incoming)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (CA certificate PEM, server certificate PEM, server key PEM).
    fn pki() -> (String, String, String) {
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

    #[test]
    fn a_server_config_needs_a_key_a_chain_and_a_client_ca() {
        let (ca, cert, key) = pki();
        let config = server_config(cert.as_bytes(), key.as_bytes(), ca.as_bytes()).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"h2".to_vec()]);

        let err = |r: anyhow::Result<Arc<ServerConfig>>| format!("{:#}", r.unwrap_err());
        // No client CA: every client would be refused, so the listener does not start.
        assert!(err(server_config(cert.as_bytes(), key.as_bytes(), b"")).contains("client_ca_file"));
        // A key file that holds no key: the error names the setting, never the content.
        let not_a_key = b"-----BEGIN NOTHING-----\nc2VjcmV0LXNlY3JldA==\n-----END NOTHING-----\n";
        let e = err(server_config(cert.as_bytes(), not_a_key, ca.as_bytes()));
        assert!(e.contains("tls.key_file"), "{e}");
        assert!(!e.contains("c2VjcmV0") && !e.contains("NOTHING"), "{e}");
        // Another certificate's key does not match the chain.
        let (_, _, other_key) = pki();
        let e = err(server_config(
            cert.as_bytes(),
            other_key.as_bytes(),
            ca.as_bytes(),
        ));
        assert!(e.contains("tls.cert_file"), "{e}");
    }
}
