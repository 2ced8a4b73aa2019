//! SigV4-signed requests, for any front that takes them (the AWS KMS protocol; the XKS
//! proxy API signs the same way for another service name): a route's handler hands its
//! request here first and gets back the caller, the body and a request slot, or the
//! exception that refuses it.
//!
//! The order lets no one hold what is scarce before they are known: the headers are checked
//! first (an unsigned request is refused before its body is read); the body is read under
//! its deadline, its bytes counted against the listener's budget for requests not yet
//! authenticated; then the signature is checked; only then does the request wait, for a
//! bounded time, for one of the request slots.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::BodyExt as _;

use super::sigv4;
use crate::api::auth::Authenticator;
use crate::http::Peer;
use crate::kms::access::Caller;
use model::error::{ErrorKind, KmsError, KmsResult};

/// The signature checks, and the bounds on what requests hold, of one listener.
pub struct Signed {
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
    /// The largest request body taken.
    max_body: usize,
    /// Whether a client certificate names a principal that must be the signer's (the AWS
    /// protocol); the XKS listener checks its clients' certificates by subject instead.
    certificates_name_callers: bool,
}

/// A request whose signature holds, with a request slot.
pub struct Authenticated<'a> {
    pub caller: Caller,
    pub body: Bytes,
    _slot: tokio::sync::SemaphorePermit<'a>,
}

/// Why a request was not taken.
pub enum Refused {
    /// Before or at its signature: the caller is not known. Recorded (without content).
    Unauthenticated(KmsError),
    /// Signed, but no request slot became free in time. Recorded.
    Busy(KmsError),
    /// The listener is shutting down.
    Closing(KmsError),
}

impl Signed {
    pub fn new(
        verifier: sigv4::Verifier,
        auth: Arc<Authenticator>,
        server: &crate::config::ServerSettings,
        max_body: usize,
    ) -> Signed {
        Signed {
            verifier,
            auth,
            body_deadline: Duration::from_secs(server.header_timeout_seconds.max(1)),
            unauthenticated_bytes: tokio::sync::Semaphore::new(
                server.max_inflight_requests.max(1) * max_body,
            ),
            inflight: tokio::sync::Semaphore::new(server.max_inflight_requests.max(1)),
            slot_wait: Duration::from_secs(server.header_timeout_seconds.max(1)),
            max_body,
            certificates_name_callers: true,
        }
    }

    /// As `new`, for a listener whose client certificates name no principal (XKS).
    pub fn certificates_by_subject(mut self) -> Signed {
        self.certificates_name_callers = false;
        self
    }

    /// The signature checks (their access keys are replaced on reload).
    pub fn verifier(&self) -> &sigv4::Verifier {
        &self.verifier
    }

    /// Checks `req` (`what` names it in messages) and waits for a request slot.
    pub async fn accept(
        &self,
        what: &str,
        req: axum::extract::Request,
        peer: &Peer,
    ) -> Result<Authenticated<'_>, Refused> {
        let (parts, body) = req.into_parts();
        let headers = header_list(&parts);
        self.verifier
            .precheck(&headers, SystemTime::now())
            .map_err(Refused::Unauthenticated)?;
        let read = {
            let _reading = crate::metrics::get().aws_stage("reading");
            self.read_body(what, body).await
        };
        let (body, budget) = read.map_err(Refused::Unauthenticated)?;
        let caller = self
            .caller(&parts, &headers, &body, peer)
            .map_err(Refused::Unauthenticated)?;
        peer.standing.prove();
        let slot = {
            let _waiting = crate::metrics::get().aws_stage("waiting");
            tokio::time::timeout(self.slot_wait, self.inflight.acquire()).await
        };
        drop(budget);
        match slot {
            Ok(Ok(slot)) => Ok(Authenticated {
                caller,
                body,
                _slot: slot,
            }),
            Ok(Err(_)) => Err(Refused::Closing(closing())),
            Err(_) => Err(Refused::Busy(KmsError::new(
                ErrorKind::Throttling,
                format!(
                    "The service is busy: no request slot became free within {:?}",
                    self.slot_wait
                ),
            ))),
        }
    }

    /// The body, whole, within the body deadline and `max_body`; its bytes are held against
    /// the budget of unauthenticated requests until the permit is dropped.
    async fn read_body(
        &self,
        what: &str,
        mut body: axum::body::Body,
    ) -> KmsResult<(Bytes, tokio::sync::SemaphorePermit<'_>)> {
        let read = async {
            let mut held: Option<tokio::sync::SemaphorePermit<'_>> = None;
            let mut bytes = bytes::BytesMut::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|_| {
                    KmsError::new(
                        ErrorKind::Serialization,
                        format!("The {what} request body could not be read"),
                    )
                })?;
                let Ok(data) = frame.into_data() else {
                    continue; // trailers
                };
                if bytes.len() + data.len() > self.max_body {
                    return Err(KmsError::validation(format!(
                        "The {what} request is larger than the {} bytes allowed",
                        self.max_body
                    )));
                }
                let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
                let permit = self
                    .unauthenticated_bytes
                    .acquire_many(n)
                    .await
                    .map_err(|_| closing())?;
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
                    .map_err(|_| closing())?,
            };
            Ok((bytes.freeze(), held))
        };
        match tokio::time::timeout(self.body_deadline, read).await {
            Ok(r) => r,
            Err(_) => Err(KmsError::new(
                ErrorKind::Serialization,
                format!(
                    "The {what} request body did not arrive within {:?}",
                    self.body_deadline
                ),
            )),
        }
    }

    /// The principal that signed the request. A client certificate, when presented, must
    /// name the same principal.
    fn caller(
        &self,
        parts: &axum::http::request::Parts,
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
        if let (Some(der), true) = (&peer.certificate, self.certificates_name_callers) {
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
fn header_list(parts: &axum::http::request::Parts) -> Vec<(&str, &str)> {
    let mut headers: Vec<(&str, &str)> = parts
        .headers
        .iter()
        .filter_map(|(n, v)| v.to_str().ok().map(|v| (n.as_str(), v)))
        .collect();
    if !parts.headers.contains_key(axum::http::header::HOST) {
        if let Some(authority) = parts.uri.authority() {
            headers.push(("host", authority.as_str()));
        }
    }
    headers
}

pub(super) fn closing() -> KmsError {
    KmsError::new(ErrorKind::KmsInternal, "The service is shutting down")
}
