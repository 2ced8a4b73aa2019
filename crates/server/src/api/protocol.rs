//! Requests that never reach an operation: a body that is not a protobuf message of the
//! method, a truncated frame, a bad compression flag, a message over `MAX_REQUEST_BYTES`, a
//! body that stops arriving. tonic answers those itself with a bare status (INTERNAL,
//! OUT_OF_RANGE...) that carries no AWS exception. This layer, around the KMS service,
//! gives them the contract's shape (INVALID_ARGUMENT with an ErrorInfo: ValidationException
//! for a message too large, SerializationException for one that cannot be read), and counts
//! and audits them like every other request.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};

use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use super::auth::Authenticator;
use super::status::to_status;
use crate::audit::Audit;
use crate::transport::Unproven;
use model::error::{ErrorKind, KmsError};

const PREFIX: &str = "/kms.v1.KeyManagementService/";

/// The service's method names, from its descriptor: each written once, in the proto.
static OPERATIONS: LazyLock<HashSet<&'static str>> = LazyLock::new(|| {
    use prost::Message as _;
    let set = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET)
        .expect("the compiled-in descriptor set decodes");
    set.file
        .iter()
        .flat_map(|f| &f.service)
        .filter(|s| s.name() == "KeyManagementService")
        .flat_map(|s| &s.method)
        .map(|m| &*Box::leak(m.name().to_string().into_boxed_str()))
        .collect()
});

fn operation(path: &str) -> Option<&'static str> {
    let name = path.strip_prefix(PREFIX)?;
    OPERATIONS.get(name).copied()
}

#[derive(Clone)]
pub struct ProtocolErrorsLayer {
    audit: Arc<Audit>,
    auth: Arc<Authenticator>,
    unproven: Unproven,
}

impl ProtocolErrorsLayer {
    /// `unproven`: the listener's connections that no request has proven yet; a KMS
    /// request whose caller is known proves its connection.
    pub fn new(
        audit: Arc<Audit>,
        auth: Arc<Authenticator>,
        unproven: Unproven,
    ) -> ProtocolErrorsLayer {
        ProtocolErrorsLayer {
            audit,
            auth,
            unproven,
        }
    }
}

impl<S> tower::Layer<S> for ProtocolErrorsLayer {
    type Service = ProtocolErrors<S>;

    fn layer(&self, inner: S) -> ProtocolErrors<S> {
        ProtocolErrors {
            inner,
            audit: Arc::clone(&self.audit),
            auth: Arc::clone(&self.auth),
            unproven: Arc::clone(&self.unproven),
        }
    }
}

#[derive(Clone)]
pub struct ProtocolErrors<S> {
    inner: S,
    audit: Arc<Audit>,
    auth: Arc<Authenticator>,
    unproven: Unproven,
}

type BoxFuture<T, E> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for ProtocolErrors<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let Some(op) = operation(req.uri().path()) else {
            return Box::pin(self.inner.call(req));
        };
        let started = std::time::Instant::now();
        let (source, certs) = peer(&req);
        // A plaintext connection is proven by its first KMS request (no lock when none waits).
        if let (Some(addr), None, false) = (source, &certs, self.unproven.is_empty()) {
            if self.auth.principal(None).is_ok() {
                self.unproven.prove(addr);
            }
        }
        let (audit, auth) = (Arc::clone(&self.audit), Arc::clone(&self.auth));
        let answer = self.inner.call(req);
        Box::pin(async move {
            let response = answer.await?;
            let Some((code, message)) = bare_error(&response) else {
                return Ok(response);
            };
            let e = if code == tonic::Code::OutOfRange as i32 {
                KmsError::new(
                    ErrorKind::Validation,
                    format!(
                        "The {op} request is larger than the {} bytes allowed",
                        super::MAX_REQUEST_BYTES
                    ),
                )
            } else {
                // tonic's grpc-message is percent-encoded; the status made from it is encoded
                // again on the way out, so it is decoded here (else the caller reads
                // "failed%20to%20decode").
                let message = percent_encoding::percent_decode_str(&message).decode_utf8_lossy();
                KmsError::new(
                    ErrorKind::Serialization,
                    format!("The {op} request could not be read: {message}"),
                )
            };
            let request_id = super::path::request_id();
            let leaf = certs.as_ref().and_then(|c| c.first()).map(|d| d.as_ref());
            let principal = auth.principal(leaf).ok();
            let receipt = audit.record(crate::audit::Entry {
                time_ms: model::now_ms(),
                request_id,
                principal,
                source,
                operation: op,
                resources: Vec::new(),
                encryption_context: None,
                request_metadata: None,
                outcome: "failed",
                error: Some(e.kind.aws_name()),
                unrecorded_refusals: None,
            });
            let _ = receipt.written().await;
            crate::metrics::get().request(op, e.kind.aws_name(), started.elapsed());
            super::failures::note(op, e.kind.aws_name(), &e.message, &request_id, source);
            let mut status = to_status(e);
            if let Ok(id) = tonic::metadata::MetadataValue::try_from(request_id.to_string()) {
                status.metadata_mut().insert("x-request-id", id);
            }
            Ok(status.into_http())
        })
    }
}

/// The caller's address and certificates, from the connection (a reference count, not a
/// copy: this runs for every request, and is used only for the rare malformed one).
type Certs = Arc<Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>>>;

fn peer<B>(req: &http::Request<B>) -> (Option<SocketAddr>, Option<Certs>) {
    let ext = req.extensions();
    if let Some(tls) = ext.get::<TlsConnectInfo<TcpConnectInfo>>() {
        return (tls.get_ref().remote_addr(), tls.peer_certs());
    }
    (
        ext.get::<TcpConnectInfo>().and_then(|i| i.remote_addr()),
        None,
    )
}

/// A failure status that tonic made itself: in the headers of a trailers-only response, with
/// no status details (every status of this service's own carries an ErrorInfo).
fn bare_error(response: &http::Response<tonic::body::Body>) -> Option<(i32, String)> {
    let headers = response.headers();
    let code: i32 = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    if code == 0 || headers.contains_key("grpc-status-details-bin") {
        return None;
    }
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or("")
        .to_string();
    Some((code, message))
}

#[cfg(test)]
mod tests {
    #[test]
    fn operations_come_from_the_descriptor() {
        assert_eq!(
            super::operation("/kms.v1.KeyManagementService/Encrypt"),
            Some("Encrypt")
        );
        assert_eq!(
            super::operation("/kms.v1.KeyManagementService/NoSuchThing"),
            None
        );
        assert_eq!(super::operation("/grpc.health.v1.Health/Check"), None);
        assert!(super::OPERATIONS.len() >= 35);
    }
}
