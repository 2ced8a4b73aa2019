//! The AWS KMS protocol front: `POST /` with `X-Amz-Target: TrentService.<Operation>` and an
//! AWS JSON 1.1 body, over HTTP/1.1 or HTTP/2, signed with SigV4. The caller is the
//! principal of the signing access key (`sigv4`); the request and response are the proto's
//! own messages in AWS's JSON (`json`); everything between is the request path every
//! transport shares (`api::path`): audit, quotas, metrics, the failure log.
//!
//! Answers are AWS's: `x-amzn-RequestId` on every response (the id of the request's audit
//! line), errors as `{"__type": <exception>, "message": ...}` with HTTP 400, or 5xx for the
//! exceptions the model marks as server faults, which SDKs retry.

pub mod constraints;
pub mod json;
pub mod signed;
pub mod sigv4;

use std::sync::Arc;

use axum::http::{Request, StatusCode};
use axum::response::Response;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::path::{Call, RequestPath};
use super::{audited, Audited};
use crate::http::Peer;
use crate::kms::fields::KeyId;
use crate::kms::gate::{Gate, KeyNamed, Subject};
use crate::kms::Kms;
use model::context::NO_CONTEXT;
use model::error::{ErrorKind, KmsError, KmsResult};
use model::op::{Op, Recorded, Unserved};
use signed::{Refused, Signed};

const TARGET_PREFIX: &str = "TrentService.";
/// The target prefix of hsm-kms's own operations (`Op::extension`).
const EXTENSION_PREFIX: &str = "HsmKms.";
const CONTENT_TYPE: &str = "application/x-amz-json-1.1";

/// The AWS protocol front of one listener.
pub struct Front {
    path: RequestPath,
    signed: Signed,
}

/// The routes of the AWS KMS protocol: every request is `POST /` (anything else is
/// UnknownOperationException, as AWS answers), beside the operator console's static files
/// under `/console/` (`api::console`), which call this front like any other client.
pub fn router(front: Arc<Front>) -> axum::Router {
    let region = front.path.kms().scope.region.clone();
    super::console::router(&region).fallback(
        move |axum::Extension(peer): axum::Extension<Peer>, req: axum::extract::Request| {
            let front = Arc::clone(&front);
            async move { front.handle(req, &peer).await }
        },
    )
}

impl Front {
    pub fn new(path: RequestPath, signed: Signed) -> Front {
        Front { path, signed }
    }

    /// Answers one HTTP request: its operation, then its signature and a request slot
    /// (`Signed::accept`), then the operation on the request path.
    pub async fn handle(&self, req: axum::extract::Request, peer: &Peer) -> Response {
        let op = match operation(&req) {
            Ok(op) => op,
            Err(e) => return error(&e, &super::path::request_id()),
        };
        let accepted = match self.signed.accept(op.name(), req, peer).await {
            Ok(accepted) => accepted,
            Err(Refused::Closing(e)) => return error(&e, &super::path::request_id()),
            // Refused before its caller is known, or without a slot: recorded without its
            // content (the request path limits such lines per source).
            Err(Refused::Unauthenticated(e) | Refused::Busy(e)) => {
                let call = Call::new(op, Err(e), Some(peer.addr));
                return self.answer(&call, &[]).await;
            }
        };
        let _serving = crate::metrics::get().aws_stage("serving");
        let call = Call::new(op, Ok(accepted.caller), Some(peer.addr));
        self.answer(&call, &accepted.body).await
    }

    /// Runs `call` on the request path and writes its answer.
    async fn answer(&self, call: &Call, body: &[u8]) -> Response {
        match super::aws_dispatch(&self.path, call, body).await {
            Ok(json) => answer(StatusCode::OK, json, &call.request_id),
            Err(e) => error(&e, &call.request_id),
        }
    }
}

/// The operation a request names, or UnknownOperationException (no audit line: there is
/// no operation to record, as AWS records none).
fn operation<B>(req: &Request<B>) -> KmsResult<Op> {
    let unknown = || KmsError::new(ErrorKind::UnknownOperation, "");
    if req.method() != axum::http::Method::POST || req.uri().path() != "/" {
        return Err(unknown());
    }
    // A body of another content type is no AWS JSON 1.1 request: AWS answers it as an
    // operation it does not know (Kinesis, sent `application/octet-stream`, answered
    // `<UnknownOperationException/>`: disneystreaming/smithy4s issue 167).
    let json = req
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|t| t.to_str().ok())
        .and_then(|t| t.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case(CONTENT_TYPE));
    if !json {
        return Err(unknown());
    }
    let target = req
        .headers()
        .get("x-amz-target")
        .and_then(|t| t.to_str().ok())
        .ok_or_else(unknown)?;
    // AWS's operations under AWS's prefix, hsm-kms's own under its own: neither is taken
    // for the other.
    let (name, extension) = match target.strip_prefix(TARGET_PREFIX) {
        Some(name) => (name, false),
        None => (
            target.strip_prefix(EXTENSION_PREFIX).ok_or_else(unknown)?,
            true,
        ),
    };
    Op::parse(name)
        .filter(|op| op.extension() == extension && !op.xks())
        .ok_or_else(unknown)
}

/// One operation over the AWS protocol: its JSON request read, run on the shared request
/// path with `handle` (the same mapping gRPC uses), its response written as JSON.
pub(super) async fn call<R, T>(
    path: &RequestPath,
    call: &Call,
    body: &[u8],
    handle: impl AsyncFnOnce(&Arc<Kms>, Gate<'_>, R) -> KmsResult<T>,
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
        .run(call, context, target, async |kms, gate| {
            handle(kms, gate, request?).await
        })
        .await?;
    json::write(&response)
}

/// An operation of the AWS API that hsm-kms does not serve (`Op::unserved`): its required
/// members checked, then, like any other, authorized on the key its KeyId names and checked
/// against the key-state table, and refused as AWS refuses it for a key in a CloudHSM key
/// store. Its other members are not read.
pub(super) async fn unserved(
    path: &RequestPath,
    call: &Call,
    body: &[u8],
    how: Unserved,
) -> KmsResult<Vec<u8>> {
    let op = call.op;
    let request = json::parse::<serde_json::Map<String, serde_json::Value>>(op, body);
    path.run(call, None, None, async |kms, gate| {
        let request = request?;
        let key_ref = match request.get("KeyId") {
            Some(serde_json::Value::String(k)) => k.as_str(),
            _ => {
                return Err(KmsError::new(
                    ErrorKind::Serialization,
                    format!(
                        "The {} request could not be read: KeyId is not a string",
                        op.name()
                    ),
                ))
            }
        };
        let key_ref = KeyId::new("KeyId", key_ref)?.get();
        // Those that take any KeyIdType (alias names too) in the model; the rotation,
        // import and multi-Region operations take a key id or key ARN.
        let named = match how {
            Unserved::KeyUsage => KeyNamed::any(key_ref, &NO_CONTEXT),
            _ if matches!(
                op,
                Op::GenerateDataKeyPair | Op::GenerateDataKeyPairWithoutPlaintext
            ) =>
            {
                KeyNamed::any(key_ref, &NO_CONTEXT)
            }
            _ => KeyNamed::id(key_ref),
        };
        let auth = gate.authorize(kms, Subject::Key(named)).await?;
        kms.unserved(&auth, how).await
    })
    .await?;
    Err(KmsError::internal(format!(
        "{} answered success",
        op.name()
    )))
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

fn answer(status: StatusCode, body: Vec<u8>, request_id: &uuid::Uuid) -> Response {
    let mut id = uuid::Uuid::encode_buffer();
    let id = request_id.hyphenated().encode_lower(&mut id);
    let mut response = Response::new(axum::body::Body::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static(CONTENT_TYPE),
    );
    if let Ok(id) = axum::http::HeaderValue::from_str(id) {
        headers.insert("x-amzn-requestid", id);
    }
    response
}

fn error(e: &KmsError, request_id: &uuid::Uuid) -> Response {
    let mut body = serde_json::Map::new();
    body.insert("__type".into(), e.kind.aws_name().into());
    if !e.message.is_empty() {
        body.insert("message".into(), e.message.clone().into());
    }
    let body = serde_json::to_vec(&body).unwrap_or_default();
    answer(status_of(e.kind), body, request_id)
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
