//! The external key store (XKS) proxy API (aws/aws-kms-xksproxy-api-spec v1), the front
//! AWS KMS calls to use keys in this HSM: `POST /<prefix>/kms/xks/v1/health` and
//! `POST /<prefix>/kms/xks/v1/keys/<externalKeyId>/{metadata,encrypt,decrypt}`, JSON with
//! camelCase members, SigV4 for service `kms-xks-proxy` with a credential of the path's
//! prefix, errors as `{"errorName", "errorMessage"}` with the specification's HTTP codes.
//!
//! An externalKeyId is an hsm-kms key ID. Each credential stands for a principal, and the
//! request runs the same path as every other (audit line with the requestMetadata,
//! metrics, the key's policy and grants through the gate, the store's quota); the
//! requestMetadata members are condition keys (`xks:AwsPrincipalArn`, `xks:KmsKeyArn`,
//! `xks:KmsOperation`, `xks:KmsRequestId`, `xks:KmsViaService`, `xks:AwsSourceVpc`,
//! `xks:AwsSourceVpce`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::{Method, StatusCode};
use axum::response::Response;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::aws::signed::{Refused, Signed};
use super::aws::sigv4::{AccessKey, Verifier};
use super::path::{Call, RequestPath};
use crate::config::Settings;
use crate::http::Peer;
use crate::kms::gate::{KeyNamed, Subject};
use model::error::{ErrorKind, KmsError, KmsResult};
use model::op::Op;

/// The path every route has after its prefix.
const API: &str = "/kms/xks/v1/";

/// The most plaintext (and ciphertext) the specification requires, and what is taken.
const MAX_PLAINTEXT: usize = 4300;
/// The most additional authenticated data.
const MAX_AAD: usize = 8192;

/// The XKS front of one listener.
pub struct Front {
    path: RequestPath,
    signed: Signed,
    /// Which URI prefix each access key id belongs to (replaced on reload).
    prefixes: RwLock<Arc<HashMap<String, String>>>,
    health_cache: Duration,
    ekm_vendor: String,
}

/// The credentials of `settings.xks`: the access keys, and each one's URI prefix.
pub fn credentials(
    settings: &Settings,
) -> anyhow::Result<(HashMap<String, AccessKey>, HashMap<String, String>)> {
    use anyhow::Context as _;
    let mut keys = HashMap::new();
    let mut prefixes = HashMap::new();
    for c in &settings.xks.credentials {
        let (key, secret) = c.access_key()?;
        let principal = model::principal::Principal::parse(&key.principal)
            .with_context(|| format!("{} is not an IAM principal ARN", key.principal))?;
        if keys
            .insert(
                key.access_key_id.clone(),
                AccessKey::new(secret, Arc::new(principal)),
            )
            .is_some()
        {
            anyhow::bail!("xks credential {} is listed twice", key.access_key_id);
        }
        prefixes.insert(key.access_key_id, c.uri_prefix.clone());
    }
    Ok((keys, prefixes))
}

/// The routes: every path; what is not an XKS route is InvalidUriPathException.
pub fn router(front: Arc<Front>) -> axum::Router {
    axum::Router::new().fallback(
        move |axum::Extension(peer): axum::Extension<Peer>, req: axum::extract::Request| {
            let front = Arc::clone(&front);
            async move { front.handle(req, &peer).await }
        },
    )
}

/// What a path asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route<'a> {
    Health,
    Key(&'a str, Op),
}

/// The URI prefix and route of `path`, or None when it is no XKS route.
fn route(path: &str) -> Option<(&str, Route<'_>)> {
    let path = path.strip_prefix('/')?;
    let (prefix, rest) = match path.strip_prefix(&API[1..]) {
        Some(rest) => ("", rest),
        None => {
            let at = path.find(API)?;
            (&path[..at], &path[at + API.len()..])
        }
    };
    if rest == "health" {
        return Some((prefix, Route::Health));
    }
    let rest = rest.strip_prefix("keys/")?;
    let (id, op) = rest.rsplit_once('/')?;
    let valid_id = (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
    let op = match op {
        "metadata" => Op::XksGetKeyMetadata,
        "encrypt" => Op::XksEncrypt,
        "decrypt" => Op::XksDecrypt,
        _ => return None,
    };
    valid_id.then_some((prefix, Route::Key(id, op)))
}

/// An XKS request body: every operation's members (each takes what it needs). Members the
/// specification may add later are accepted and not read.
#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct Body {
    request_metadata: Option<Metadata>,
    plaintext: Option<String>,
    ciphertext: Option<String>,
    encryption_algorithm: Option<String>,
    additional_authenticated_data: Option<String>,
    ciphertext_data_integrity_value_algorithm: Option<String>,
    ciphertext_metadata: Option<String>,
    initialization_vector: Option<String>,
    authentication_tag: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct Metadata {
    aws_principal_arn: Option<String>,
    kms_key_arn: Option<String>,
    kms_operation: Option<String>,
    kms_request_id: Option<String>,
    kms_via_service: Option<String>,
    aws_source_vpc: Option<String>,
    aws_source_vpce: Option<String>,
}

impl Metadata {
    /// (member, condition key, value) of each member present.
    fn members(&self) -> Vec<(&'static str, &'static str, &str)> {
        [
            (
                "awsPrincipalArn",
                "xks:AwsPrincipalArn",
                &self.aws_principal_arn,
            ),
            ("kmsKeyArn", "xks:KmsKeyArn", &self.kms_key_arn),
            ("kmsOperation", "xks:KmsOperation", &self.kms_operation),
            ("kmsRequestId", "xks:KmsRequestId", &self.kms_request_id),
            ("kmsViaService", "xks:KmsViaService", &self.kms_via_service),
            ("awsSourceVpc", "xks:AwsSourceVpc", &self.aws_source_vpc),
            ("awsSourceVpce", "xks:AwsSourceVpce", &self.aws_source_vpce),
        ]
        .into_iter()
        .filter_map(|(member, key, v)| v.as_deref().map(|v| (member, key, v)))
        .collect()
    }
}

/// A base64 member's bytes, at most `max` of them (`required`: absent is invalid).
fn bytes_of(
    name: &str,
    value: Option<&str>,
    max: usize,
    required: bool,
) -> KmsResult<Option<Zeroizing<Vec<u8>>>> {
    let Some(text) = value else {
        return match required {
            true => Err(KmsError::validation(format!("{name} is required"))),
            false => Ok(None),
        };
    };
    let bytes = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|_| KmsError::validation(format!("{name} is not valid base64")))?,
    );
    if bytes.len() > max {
        return Err(KmsError::validation(format!(
            "{name} is {} bytes; at most {max} are taken",
            bytes.len()
        )));
    }
    Ok(Some(bytes))
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

impl Front {
    pub fn new(
        path: RequestPath,
        signed: Signed,
        prefixes: HashMap<String, String>,
        settings: &Settings,
    ) -> Front {
        Front {
            path,
            signed,
            prefixes: RwLock::new(Arc::new(prefixes)),
            health_cache: Duration::from_secs(settings.xks.health_cache_seconds.min(300)),
            ekm_vendor: settings.xks.ekm_vendor.clone(),
        }
    }

    /// Takes the credentials of a reloaded configuration (they rotate without a restart).
    pub fn reload(&self, settings: &Settings) -> anyhow::Result<()> {
        let (keys, prefixes) = credentials(settings)?;
        self.signed.verifier().replace_keys(keys);
        *self.prefixes.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(prefixes);
        Ok(())
    }

    async fn handle(&self, req: axum::extract::Request, peer: &Peer) -> Response {
        let Some((prefix, route)) = route(req.uri().path()) else {
            return error_answer(&KmsError::new(
                ErrorKind::UnknownOperation,
                "The request URI path is not an XKS proxy API path",
            ));
        };
        if req.method() != Method::POST {
            let mut r = Response::new(axum::body::Body::empty());
            *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            r.headers_mut()
                .insert(axum::http::header::ALLOW, "POST".parse().expect("a header"));
            return r;
        }
        let (op, key_id) = match route {
            Route::Health => (Op::XksGetHealthStatus, None),
            Route::Key(id, op) => (op, Some(id.to_string())),
        };
        // A prefix no credential serves is no path of this proxy.
        let known = self
            .prefixes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .any(|p| p == prefix);
        if !known {
            return error_answer(&KmsError::new(
                ErrorKind::UnknownOperation,
                "The request URI path prefix is not one this proxy serves",
            ));
        }
        let prefix = prefix.to_string();
        // Whose credential signed it, for its prefix (the signature itself is checked next).
        let signer = {
            let headers: Vec<(&str, &str)> = req
                .headers()
                .iter()
                .filter_map(|(n, v)| v.to_str().ok().map(|v| (n.as_str(), v)))
                .collect();
            Verifier::access_key_of(&headers).map(str::to_string)
        };
        let accepted = match self.signed.accept(op.name(), req, peer).await {
            Ok(accepted) => accepted,
            Err(Refused::Closing(e)) => return error_answer(&e),
            Err(Refused::Unauthenticated(e) | Refused::Busy(e)) => {
                let call = Call::new(op, Err(e), Some(peer.addr));
                let outcome = self
                    .path
                    .run(&call, None, None, async |_, _| Ok(Value::Null))
                    .await;
                return answer(outcome);
            }
        };
        // A credential answers for its own prefix only.
        let own_prefix = signer.as_deref().is_some_and(|id| {
            self.prefixes
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(id)
                .is_some_and(|p| *p == prefix)
        });
        let caller = match own_prefix {
            true => Ok(accepted.caller),
            false => Err(KmsError::new(
                ErrorKind::UnrecognizedClient,
                "The access key is not one of this URI path prefix",
            )),
        };
        let call = Call::new(op, caller, Some(peer.addr));
        let body = serde_json::from_slice::<Body>(&accepted.body).map_err(|_| {
            KmsError::validation("The request body is not a JSON object of the XKS API")
        });
        let metadata = body
            .as_ref()
            .ok()
            .and_then(|b| b.request_metadata.as_ref())
            .map(|m| {
                m.members()
                    .into_iter()
                    .map(|(member, _, v)| (member.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>()
            });
        let outcome = self
            .path
            .run(&call, metadata, key_id.clone(), async |kms, gate| {
                let body = body?;
                let meta = body.request_metadata.as_ref();
                // The requestMetadata members KMS always sends.
                let meta =
                    meta.ok_or_else(|| KmsError::validation("requestMetadata is required"))?;
                for (name, v) in [
                    ("kmsOperation", &meta.kms_operation),
                    ("kmsRequestId", &meta.kms_request_id),
                ] {
                    if v.is_none() {
                        return Err(KmsError::validation(format!(
                            "requestMetadata.{name} is required"
                        )));
                    }
                }
                match key_id {
                    None => {
                        gate.authorize(kms, Subject::Caller).await?;
                        let health = kms.xks_health(self.health_cache).await;
                        Ok(self.health_answer(health))
                    }
                    Some(id) => {
                        // And for a key: who called AWS KMS, and (but for metadata) which key.
                        if meta.aws_principal_arn.is_none() {
                            return Err(KmsError::validation(
                                "requestMetadata.awsPrincipalArn is required",
                            ));
                        }
                        if op != Op::XksGetKeyMetadata && meta.kms_key_arn.is_none() {
                            return Err(KmsError::validation(
                                "requestMetadata.kmsKeyArn is required",
                            ));
                        }
                        // An externalKeyId is a key ID: anything else names no key here.
                        if uuid::Uuid::try_parse(&id).is_err() {
                            return Err(KmsError::new(
                                ErrorKind::NotFound,
                                format!("No key has the id {}", model::error::quoted(&id)),
                            ));
                        }
                        let facts: Vec<(&'static str, &str)> =
                            meta.members().into_iter().map(|(_, k, v)| (k, v)).collect();
                        self.key_operation(kms, gate, op, &id, &facts, &body).await
                    }
                }
            })
            .await;
        answer(outcome)
    }

    async fn key_operation(
        &self,
        kms: &Arc<crate::kms::Kms>,
        gate: crate::kms::gate::Gate<'_>,
        op: Op,
        id: &str,
        facts: &[(&'static str, &str)],
        body: &Body,
    ) -> KmsResult<Value> {
        let algorithm_checked = || match body.encryption_algorithm.as_deref() {
            Some("AES_GCM") => Ok(()),
            Some(other) => Err(KmsError::validation(format!(
                "encryptionAlgorithm {} is not AES_GCM",
                model::error::quoted(other)
            ))),
            None => Err(KmsError::validation("encryptionAlgorithm is required")),
        };
        match op {
            Op::XksGetKeyMetadata => {
                let auth = gate
                    .authorize(kms, Subject::XksKey(KeyNamed::id(id), facts))
                    .await?;
                let status = kms.xks_key_status(&auth).await?;
                Ok(json!({
                    "keySpec": "AES_256",
                    "keyUsage": ["ENCRYPT", "DECRYPT"],
                    "keyStatus": status,
                }))
            }
            Op::XksEncrypt => {
                let plaintext =
                    bytes_of("plaintext", body.plaintext.as_deref(), MAX_PLAINTEXT, true)?
                        .unwrap_or_default();
                algorithm_checked()?;
                let aad = bytes_of(
                    "additionalAuthenticatedData",
                    body.additional_authenticated_data.as_deref(),
                    MAX_AAD,
                    false,
                )?
                .unwrap_or_default();
                let integrity = match body.ciphertext_data_integrity_value_algorithm.as_deref() {
                    None => false,
                    Some("SHA_256") => true,
                    Some(other) => {
                        return Err(KmsError::validation(format!(
                            "ciphertextDataIntegrityValueAlgorithm {} is not SHA_256",
                            model::error::quoted(other)
                        )))
                    }
                };
                let auth = gate
                    .authorize(kms, Subject::XksKey(KeyNamed::id(id), facts))
                    .await?;
                let sealed = kms.xks_encrypt(&auth, plaintext, &aad, integrity).await?;
                let mut out = json!({
                    "ciphertext": b64(&sealed.ciphertext),
                    "initializationVector": b64(&sealed.iv),
                    "authenticationTag": b64(&sealed.tag),
                });
                if let Some(v) = sealed.integrity_value {
                    out["ciphertextDataIntegrityValue"] = b64(&v).into();
                }
                Ok(out)
            }
            Op::XksDecrypt => {
                let ciphertext = bytes_of(
                    "ciphertext",
                    body.ciphertext.as_deref(),
                    MAX_PLAINTEXT,
                    true,
                )?
                .unwrap_or_default();
                algorithm_checked()?;
                let iv = bytes_of(
                    "initializationVector",
                    body.initialization_vector.as_deref(),
                    16,
                    true,
                )?
                .unwrap_or_default();
                if iv.len() != 12 && iv.len() != 16 {
                    return Err(KmsError::validation(
                        "initializationVector is 12 or 16 bytes",
                    ));
                }
                let tag = bytes_of(
                    "authenticationTag",
                    body.authentication_tag.as_deref(),
                    16,
                    true,
                )?
                .unwrap_or_default();
                if tag.len() != 16 {
                    return Err(KmsError::validation("authenticationTag is 16 bytes"));
                }
                let aad = bytes_of(
                    "additionalAuthenticatedData",
                    body.additional_authenticated_data.as_deref(),
                    MAX_AAD,
                    false,
                )?
                .unwrap_or_default();
                let metadata = bytes_of(
                    "ciphertextMetadata",
                    body.ciphertext_metadata.as_deref(),
                    crate::kms::xks::MAX_METADATA,
                    false,
                )?
                .unwrap_or_default();
                let auth = gate
                    .authorize(kms, Subject::XksKey(KeyNamed::id(id), facts))
                    .await?;
                let plaintext = kms
                    .xks_decrypt(&auth, &ciphertext, &iv, &tag, &aad, &metadata)
                    .await?;
                Ok(json!({ "plaintext": b64(&plaintext) }))
            }
            other => Err(KmsError::internal(format!(
                "{} is not a key operation of the XKS API",
                other.name()
            ))),
        }
    }

    fn health_answer(&self, health: crate::kms::xks::Health) -> Value {
        json!({
            "xksProxyFleetSize": health.fleet_size,
            "xksProxyVendor": "hsm-kms",
            "xksProxyModel": format!("hsm-kms {}", env!("CARGO_PKG_VERSION")),
            "ekmVendor": self.ekm_vendor,
            "ekmFleetDetails": health.hsms.iter().map(|(id, model, status)| json!({
                "id": id,
                "model": model,
                "healthStatus": status,
            })).collect::<Vec<_>>(),
        })
    }
}

/// The specification's error name and HTTP status of an exception.
fn xks_error(kind: ErrorKind) -> (StatusCode, &'static str) {
    use ErrorKind::*;
    match kind {
        Validation | Serialization | InvalidArn => (StatusCode::BAD_REQUEST, "ValidationException"),
        KmsInvalidState | Disabled | CustomKeyStoreInvalidState => {
            (StatusCode::BAD_REQUEST, "InvalidStateException")
        }
        InvalidCiphertext => (StatusCode::BAD_REQUEST, "InvalidCiphertextException"),
        InvalidKeyUsage => (StatusCode::BAD_REQUEST, "InvalidKeyUsageException"),
        MissingAuthenticationToken
        | IncompleteSignature
        | UnrecognizedClient
        | InvalidSignature => (StatusCode::UNAUTHORIZED, "AuthenticationFailedException"),
        AccessDenied | NotAuthorized => (StatusCode::FORBIDDEN, "AccessDeniedException"),
        NotFound | CustomKeyStoreNotFound => (StatusCode::NOT_FOUND, "KeyNotFoundException"),
        UnknownOperation => (StatusCode::NOT_FOUND, "InvalidUriPathException"),
        Throttling => (StatusCode::TOO_MANY_REQUESTS, "ThrottlingException"),
        UnsupportedOperation => (StatusCode::NOT_IMPLEMENTED, "UnsupportedOperationException"),
        DependencyTimeout => (
            StatusCode::SERVICE_UNAVAILABLE,
            "DependencyTimeoutException",
        ),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "InternalException"),
    }
}

fn answer(outcome: KmsResult<Value>) -> Response {
    match outcome {
        Ok(v) => json_answer(StatusCode::OK, &v),
        Err(e) => error_answer(&e),
    }
}

fn error_answer(e: &KmsError) -> Response {
    let (status, name) = xks_error(e.kind);
    let mut body = json!({ "errorName": name });
    if !e.message.is_empty() {
        body["errorMessage"] = e.message.clone().into();
    }
    json_answer(status, &body)
}

/// A single-line JSON answer.
fn json_answer(status: StatusCode, v: &Value) -> Response {
    let mut r = Response::new(axum::body::Body::from(
        serde_json::to_vec(v).unwrap_or_default(),
    ));
    *r.status_mut() = status;
    r.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        "application/json".parse().expect("a header"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_their_prefix_and_route() {
        assert_eq!(route("/kms/xks/v1/health"), Some(("", Route::Health)));
        assert_eq!(
            route("/a/b-c_d/kms/xks/v1/keys/k.1-2_3/encrypt"),
            Some(("a/b-c_d", Route::Key("k.1-2_3", Op::XksEncrypt)))
        );
        assert_eq!(
            route("/p/kms/xks/v1/keys/k/metadata"),
            Some(("p", Route::Key("k", Op::XksGetKeyMetadata)))
        );
        for bad in [
            "/",
            "/kms/xks/v1/",
            "/p/kms/xks/v1/keys/k/sign",
            "/p/kms/xks/v1/keys/k",
            "/p/kms/xks/v1/keys/k/x/encrypt",
            "/p/kms/xks/v2/health",
            "/p/kms/xks/v1/keys/k%20/decrypt",
        ] {
            assert_eq!(route(bad), None, "{bad}");
        }
        let long = format!("/kms/xks/v1/keys/{}/decrypt", "k".repeat(129));
        assert_eq!(route(&long), None);
    }

    #[test]
    fn errors_are_the_specifications_names_and_codes() {
        for (kind, status, name) in [
            (ErrorKind::Validation, 400, "ValidationException"),
            (ErrorKind::Disabled, 400, "InvalidStateException"),
            (
                ErrorKind::InvalidCiphertext,
                400,
                "InvalidCiphertextException",
            ),
            (
                ErrorKind::InvalidSignature,
                401,
                "AuthenticationFailedException",
            ),
            (ErrorKind::AccessDenied, 403, "AccessDeniedException"),
            (ErrorKind::NotFound, 404, "KeyNotFoundException"),
            (ErrorKind::UnknownOperation, 404, "InvalidUriPathException"),
            (ErrorKind::Throttling, 429, "ThrottlingException"),
            (ErrorKind::KmsInternal, 500, "InternalException"),
            (
                ErrorKind::UnsupportedOperation,
                501,
                "UnsupportedOperationException",
            ),
            (
                ErrorKind::DependencyTimeout,
                503,
                "DependencyTimeoutException",
            ),
        ] {
            assert_eq!(
                xks_error(kind),
                (StatusCode::from_u16(status).unwrap(), name)
            );
        }
    }
}
