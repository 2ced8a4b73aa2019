//! AWS Signature Version 4: who is calling over the AWS KMS protocol.
//!
//! A request names its access key, the date, region and service of its credential scope,
//! the headers it signed, and the signature. This module checks what the service decides
//! (the scope names this region and `kms`, the request is at most 5 minutes from now, the
//! key is known), then recomputes the signature over the same method, path, query, signed
//! headers and body with the aws-sigv4 crate (no hand-written canonicalisation), and compares
//! the two in constant time. The payload's SHA-256 is part of what is signed, so a changed
//! body fails as a bad signature. Refusals carry AWS's exception names.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use zeroize::Zeroizing;

use model::error::{ErrorKind, KmsError, KmsResult};
use model::principal::Principal;

/// The most a request's signing time may be from the service's clock, as AWS allows.
pub const MAX_SKEW: Duration = Duration::from_secs(5 * 60);

const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// The service name of the AWS KMS protocol.
pub const SERVICE: &str = "kms";

/// An access key: its secret and the principal it stands for. The secret is never printed.
pub struct AccessKey {
    secret: Zeroizing<String>,
    pub principal: Arc<Principal>,
}

impl AccessKey {
    pub fn new(secret: Zeroizing<String>, principal: Arc<Principal>) -> AccessKey {
        AccessKey { secret, principal }
    }
}

impl std::fmt::Debug for AccessKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessKey")
            .field("principal", &self.principal.arn)
            .finish_non_exhaustive()
    }
}

/// The parts of a request that SigV4 covers.
pub struct Request<'a> {
    pub method: &'a str,
    /// Path and query, as sent.
    pub uri: &'a str,
    /// Every header of the request (names in any case; `host` included, taken from the
    /// HTTP/2 authority when there is no Host header).
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

/// Checks SigV4 signatures for one region against the configured access keys.
pub struct Verifier {
    /// The service name requests are signed for: `kms` for the AWS KMS protocol.
    service: String,
    region: String,
    /// The headers every request must sign (lower case, with their spelling in messages).
    required: &'static [(&'static str, &'static str)],
    /// Replaced whole when the configuration is reloaded (credentials rotate).
    keys: std::sync::RwLock<Arc<Keys>>,
}

type Keys = HashMap<String, Arc<AccessKey>>;

fn shared(keys: HashMap<String, AccessKey>) -> Arc<Keys> {
    Arc::new(keys.into_iter().map(|(id, k)| (id, Arc::new(k))).collect())
}

/// What the AWS KMS protocol requires signed: what the request is (its target, where it
/// goes, when it was made), or an on-path attacker can replay a DescribeKey as a
/// ScheduleKeyDeletion.
const KMS_SIGNED: &[(&str, &str)] = &[
    ("host", "Host"),
    ("x-amz-date", "X-Amz-Date"),
    ("x-amz-target", "X-Amz-Target"),
];

/// What the XKS proxy API requires signed (AWS KMS signs exactly these; the operation is
/// in the signed path).
const XKS_SIGNED: &[(&str, &str)] = &[("host", "Host"), ("x-amz-date", "X-Amz-Date")];

/// The service name of the XKS proxy API.
pub const XKS_SERVICE: &str = "kms-xks-proxy";

/// A request whose headers passed every check but the signature itself.
struct Checked<'h> {
    auth: Authorization<'h>,
    key: Arc<AccessKey>,
    /// The signed headers exactly, with their values as sent.
    signed: Vec<(&'h str, &'h str)>,
    signed_at: SystemTime,
}

/// The value of the first header named `name` (in any case).
fn header_of<'h>(headers: &[(&'h str, &'h str)], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| *v)
}

/// What an Authorization header says.
struct Authorization<'a> {
    access_key: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    signed_headers: Vec<&'a str>,
    signature: &'a str,
}

fn incomplete(what: &str) -> KmsError {
    KmsError::new(
        ErrorKind::IncompleteSignature,
        format!("Authorization header requires {what}. Authorization=AWS4-HMAC-SHA256"),
    )
}

/// AWS's answer to a signature that is not the one it computes.
fn mismatch() -> KmsError {
    invalid(
        "The request signature we calculated does not match the signature you provided. \
         Check your AWS Secret Access Key and signing method. Consult the service \
         documentation for details.",
    )
}

fn invalid(message: impl Into<String>) -> KmsError {
    KmsError::new(ErrorKind::InvalidSignature, message)
}

impl Verifier {
    /// The AWS KMS protocol's verifier (service `kms`).
    pub fn new(
        service: impl Into<String>,
        region: impl Into<String>,
        keys: HashMap<String, AccessKey>,
    ) -> Verifier {
        Verifier {
            service: service.into(),
            region: region.into(),
            required: KMS_SIGNED,
            keys: std::sync::RwLock::new(shared(keys)),
        }
    }

    /// The XKS proxy API's verifier (service `kms-xks-proxy`, host and x-amz-date signed).
    pub fn xks(region: impl Into<String>, keys: HashMap<String, AccessKey>) -> Verifier {
        Verifier {
            required: XKS_SIGNED,
            ..Verifier::new(XKS_SERVICE, region, keys)
        }
    }

    /// Takes `keys` in place of the current ones (a reload: credentials rotate).
    pub fn replace_keys(&self, keys: HashMap<String, AccessKey>) {
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = shared(keys);
    }

    /// The access key id a request's Authorization header names, if it parses.
    pub fn access_key_of<'h>(headers: &[(&'h str, &'h str)]) -> Option<&'h str> {
        parse(header_of(headers, "authorization")?)
            .ok()
            .map(|a| a.access_key)
    }

    /// The principal that signed `req`, or the AWS exception that refuses it.
    pub fn verify(&self, req: &Request<'_>, now: SystemTime) -> KmsResult<Arc<Principal>> {
        let checked = self.checked(req.headers, now)?;
        // The payload's hash is in the canonical request; a header that claims another one is
        // refused rather than ignored (S3's words for the same refusal).
        if let Some(claimed) = header_of(req.headers, "x-amz-content-sha256") {
            let actual = hex::encode(ring::digest::digest(&ring::digest::SHA256, req.body));
            if !claimed.eq_ignore_ascii_case(&actual) {
                return Err(invalid(
                    "The provided 'x-amz-content-sha256' header does not match what was computed.",
                ));
            }
        }
        let Checked {
            auth,
            key,
            signed,
            signed_at,
        } = checked;
        let expected = self.signature(&key, auth.access_key, req, &signed, signed_at)?;
        if constant_time_eq(expected.as_bytes(), auth.signature.as_bytes()) {
            Ok(Arc::clone(&key.principal))
        } else {
            Err(mismatch())
        }
    }

    /// Everything `verify` checks that does not need the body: a request that fails here is
    /// refused before its body is read, so an unsigned request holds nothing.
    pub fn precheck(&self, headers: &[(&str, &str)], now: SystemTime) -> KmsResult<()> {
        self.checked(headers, now).map(drop)
    }

    fn checked<'h>(
        &self,
        headers: &'h [(&'h str, &'h str)],
        now: SystemTime,
    ) -> KmsResult<Checked<'h>> {
        let header = |name: &str| header_of(headers, name);
        let Some(authorization) = header("authorization") else {
            return Err(KmsError::new(
                ErrorKind::MissingAuthenticationToken,
                "Missing Authentication Token",
            ));
        };
        // Two Authorization headers: which one a proxy on the way read is anyone's guess.
        let authorizations = headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("authorization"))
            .count();
        if authorizations > 1 {
            return Err(incomplete("exactly one Authorization header"));
        }
        let auth = parse(authorization)?;
        if auth.service != self.service {
            return Err(invalid(format!(
                "Credential should be scoped to correct service: '{}'.",
                self.service
            )));
        }
        if auth.region != self.region {
            return Err(invalid(format!(
                "Credential should be scoped to a valid region, not '{}'.",
                model::error::quoted(auth.region)
            )));
        }
        let stamp = header("x-amz-date").ok_or_else(|| {
            incomplete("a valid X-Amz-Date header (date and time of the signature)")
        })?;
        let signed_at = parse_amz_date(stamp)
            .ok_or_else(|| incomplete("an X-Amz-Date of the form YYYYMMDD'T'HHMMSS'Z'"))?;
        if !stamp.starts_with(auth.date) || auth.date.len() != 8 {
            return Err(invalid(
                "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date \
                 from HTTP.",
            ));
        }
        // AWS's words for a request signed too long ago, or too far ahead.
        let minutes = MAX_SKEW.as_secs() / 60;
        if signed_at + MAX_SKEW < now {
            return Err(invalid(format!(
                "Signature expired: {stamp} is now earlier than {} ({} - {minutes} min.)",
                amz_date(now - MAX_SKEW),
                amz_date(now)
            )));
        }
        if signed_at > now + MAX_SKEW {
            return Err(invalid(format!(
                "Signature not yet current: {stamp} is still later than {} ({} + {minutes} min.)",
                amz_date(now + MAX_SKEW),
                amz_date(now)
            )));
        }
        for &(name, spelled) in self.required {
            if !auth.signed_headers.contains(&name) {
                return Err(invalid(format!(
                    "'{spelled}' must be a 'SignedHeader' in the AWS Authorization."
                )));
            }
        }
        // The canonical request lists its headers sorted, each once; a signature over any
        // other list is not over the canonical request.
        if !auth.signed_headers.windows(2).all(|w| w[0] < w[1]) {
            return Err(mismatch());
        }
        if header("x-amz-security-token").is_some() {
            return Err(KmsError::new(
                ErrorKind::UnrecognizedClient,
                "The security token included in the request is invalid.",
            ));
        }
        let keys = Arc::clone(&self.keys.read().unwrap_or_else(|p| p.into_inner()));
        let Some(key) = keys.get(auth.access_key).cloned() else {
            return Err(KmsError::new(
                ErrorKind::UnrecognizedClient,
                "The security token included in the request is invalid.",
            ));
        };
        // The signed headers exactly, with their values as sent.
        let mut signed = Vec::with_capacity(auth.signed_headers.len());
        for name in &auth.signed_headers {
            let values: Vec<&str> = headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| *v)
                .collect();
            if values.is_empty() {
                return Err(invalid(format!(
                    "The request signature we calculated does not match the signature you \
                     provided: signed header '{}' is missing.",
                    model::error::quoted(name)
                )));
            }
            for v in values {
                signed.push((*name, v));
            }
        }
        Ok(Checked {
            auth,
            key,
            signed,
            signed_at,
        })
    }

    /// The signature of `req` with `key`, over exactly the `signed` headers.
    fn signature(
        &self,
        key: &AccessKey,
        access_key: &str,
        req: &Request<'_>,
        signed: &[(&str, &str)],
        at: SystemTime,
    ) -> KmsResult<String> {
        let identity = Credentials::new(
            access_key,
            key.secret.as_str(),
            None,
            None,
            "hsm-kms access key",
        )
        .into();
        let mut settings = SigningSettings::default();
        // Sign what the client signed, whatever it is: the default would leave some out.
        settings.excluded_headers = Some(Vec::new());
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name(&self.service)
            .time(at)
            .settings(settings)
            .build()
            .map_err(|e| KmsError::internal(format!("SigV4 parameters: {e}")))?
            .into();
        let uri = if req.uri.starts_with('/') {
            format!("https://hsm-kms{}", req.uri)
        } else {
            return Err(invalid("The request's path is not a valid URI path."));
        };
        let signable = SignableRequest::new(
            req.method,
            uri,
            signed.iter().copied(),
            SignableBody::Bytes(req.body),
        )
        .map_err(|_| invalid("The request cannot be signed as sent."))?;
        let out = sign(signable, &params)
            .map_err(|_| invalid("The request cannot be signed as sent."))?;
        Ok(out.signature().to_string())
    }
}

/// The client side, as the AWS SDKs sign a `POST /` to KMS: `headers` (`host` among them)
/// followed by the headers the signature adds. For the bench and the tests; the service
/// itself never signs.
pub fn sign_post(
    headers: &[(&str, &str)],
    body: &[u8],
    access_key: &str,
    secret: &str,
    region: &str,
    at: SystemTime,
) -> anyhow::Result<Vec<(String, String)>> {
    sign_request(SERVICE, "/", headers, body, access_key, secret, region, at)
}

/// As `sign_post`, for `service` and a `POST` to `path` (the XKS proxy API's requests, as
/// AWS KMS signs them).
#[allow(clippy::too_many_arguments)]
pub fn sign_request(
    service: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    access_key: &str,
    secret: &str,
    region: &str,
    at: SystemTime,
) -> anyhow::Result<Vec<(String, String)>> {
    let identity = Credentials::new(access_key, secret, None, None, "hsm-kms client").into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(at)
        .settings(SigningSettings::default())
        .build()?
        .into();
    let host = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("host"))
        .map_or("localhost", |(_, v)| *v);
    let signable = SignableRequest::new(
        "POST",
        format!("https://{host}{path}"),
        headers.iter().copied(),
        SignableBody::Bytes(body),
    )?;
    let (instructions, _) = sign(signable, &params)?.into_parts();
    let mut all: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    for (n, v) in instructions.headers() {
        all.push((n.to_string(), v.to_string()));
    }
    Ok(all)
}

/// `AWS4-HMAC-SHA256 Credential=AKID/20261130/us-east-1/kms/aws4_request,
/// SignedHeaders=host;x-amz-date, Signature=<64 hex>`
fn parse(header: &str) -> KmsResult<Authorization<'_>> {
    let rest = header
        .strip_prefix(ALGORITHM)
        .filter(|r| r.starts_with(' '))
        .ok_or_else(|| incomplete("the algorithm AWS4-HMAC-SHA256"))?;
    let mut credential = None;
    let mut signed_headers = None;
    let mut signature = None;
    for part in rest.split(',') {
        let part = part.trim();
        let slot = if let Some(v) = part.strip_prefix("Credential=") {
            (&mut credential, v)
        } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
            (&mut signed_headers, v)
        } else if let Some(v) = part.strip_prefix("Signature=") {
            (&mut signature, v)
        } else if part.is_empty() {
            continue;
        } else {
            return Err(incomplete("Credential, SignedHeaders and Signature only"));
        };
        // A parameter given twice: the signer and a proxy could each read another one.
        if slot.0.replace(slot.1).is_some() {
            return Err(incomplete(
                "each of Credential, SignedHeaders and Signature once",
            ));
        }
    }
    let credential = credential.ok_or_else(|| incomplete("parameter 'Credential'"))?;
    let signed_headers = signed_headers.ok_or_else(|| incomplete("parameter 'SignedHeaders'"))?;
    let signature = signature.ok_or_else(|| incomplete("parameter 'Signature'"))?;
    let scope: Vec<&str> = credential.split('/').collect();
    let [access_key, date, region, service, "aws4_request"] = scope[..] else {
        return Err(incomplete(
            "a Credential of the form <key id>/<date>/<region>/<service>/aws4_request",
        ));
    };
    if access_key.is_empty() {
        return Err(incomplete("an access key id in Credential"));
    }
    if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(incomplete("a Signature of 64 hexadecimal digits"));
    }
    let signed_headers: Vec<&str> = signed_headers.split(';').collect();
    if signed_headers.iter().any(|h| {
        h.is_empty()
            || h.bytes()
                .any(|b| b.is_ascii_uppercase() || !b.is_ascii_graphic())
    }) {
        return Err(incomplete(
            "SignedHeaders of lower-case header names separated by ;",
        ));
    }
    Ok(Authorization {
        access_key,
        date,
        region,
        service,
        signed_headers,
        signature,
    })
}

/// `YYYYMMDD'T'HHMMSS'Z'` as a time (read as RFC 3339 by prost-types, as the audit trail
/// writes its times).
fn parse_amz_date(s: &str) -> Option<SystemTime> {
    let digits = |r: std::ops::Range<usize>| {
        s.get(r)
            .is_some_and(|t| t.bytes().all(|c| c.is_ascii_digit()))
    };
    if s.len() != 16 || !s.is_char_boundary(8) || &s[8..9] != "T" || !s.ends_with('Z') {
        return None;
    }
    if !digits(0..8) || !digits(9..15) {
        return None;
    }
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[9..11],
        &s[11..13],
        &s[13..15]
    );
    let t: prost_types::Timestamp = rfc3339.parse().ok()?;
    SystemTime::try_from(t).ok()
}

/// A time as `YYYYMMDD'T'HHMMSS'Z'`.
fn amz_date(t: SystemTime) -> String {
    let whole = prost_types::Timestamp {
        seconds: prost_types::Timestamp::from(t).seconds,
        nanos: 0,
    };
    whole.to_string().replace(['-', ':'], "")
}

/// Equal length and equal bytes, in time that depends only on the length.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    const KEY_ID: &str = "AKIDEXAMPLE";

    fn verifier() -> Verifier {
        let principal = Arc::new(Principal::parse("arn:aws:iam::111122223333:user/alice").unwrap());
        let keys = HashMap::from([(
            KEY_ID.to_string(),
            AccessKey::new(Zeroizing::new(SECRET.into()), principal),
        )]);
        Verifier::new(SERVICE, "us-east-1", keys)
    }

    /// A request signed as an AWS SDK would sign it (with aws-sigv4's client side).
    fn signed(
        secret: &str,
        region: &str,
        at: SystemTime,
        body: &[u8],
    ) -> (Vec<(String, String)>, Vec<u8>) {
        let headers = [
            ("host", "kms.example.test:8443"),
            ("content-type", "application/x-amz-json-1.1"),
            ("x-amz-target", "TrentService.ListKeys"),
            ("user-agent", "aws-sdk-rust"),
        ];
        let all = sign_post(&headers, body, KEY_ID, secret, region, at).unwrap();
        (all, body.to_vec())
    }

    fn check(
        v: &Verifier,
        headers: &[(String, String)],
        body: &[u8],
        now: SystemTime,
    ) -> KmsResult<Arc<Principal>> {
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        v.verify(
            &Request {
                method: "POST",
                uri: "/",
                headers: &h,
                body,
            },
            now,
        )
    }

    fn kind(r: KmsResult<Arc<Principal>>) -> &'static str {
        r.err().map(|e| e.kind.aws_name()).unwrap_or("ok")
    }

    #[test]
    fn a_signed_request_names_its_principal() {
        let now = SystemTime::now();
        let (h, body) = signed(SECRET, "us-east-1", now, b"{}");
        let p = check(&verifier(), &h, &body, now).unwrap();
        assert_eq!(p.arn, "arn:aws:iam::111122223333:user/alice");
    }

    #[test]
    fn what_an_attacker_changes_is_refused_with_aws_exceptions() {
        let v = verifier();
        let now = SystemTime::now();
        let (good, body) = signed(SECRET, "us-east-1", now, b"{\"Limit\":5}");

        let (wrong_secret, _) = signed("not-the-secret", "us-east-1", now, &body);
        assert_eq!(
            kind(check(&v, &wrong_secret, &body, now)),
            "InvalidSignatureException"
        );

        assert_eq!(
            kind(check(&v, &good, b"{\"Limit\":6}", now)),
            "InvalidSignatureException",
            "a tampered body"
        );

        let (other_region, _) = signed(SECRET, "eu-west-1", now, &body);
        let e = check(&v, &other_region, &body, now).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidSignature);
        assert!(e.message.contains("valid region"), "{}", e.message);

        let skew = MAX_SKEW + Duration::from_secs(5);
        let late = check(&v, &good, &body, now + skew).unwrap_err().message;
        assert!(late.starts_with("Signature expired: "), "{late}");
        let early = check(&v, &good, &body, now - skew).unwrap_err().message;
        assert!(early.starts_with("Signature not yet current: "), "{early}");
        assert_eq!(
            kind(check(&v, &good, &body, now + skew)),
            "InvalidSignatureException"
        );
        assert_eq!(
            kind(check(&v, &good, &body, now - skew)),
            "InvalidSignatureException"
        );
        assert_eq!(
            kind(check(
                &v,
                &good,
                &body,
                now + MAX_SKEW - Duration::from_secs(5)
            )),
            "ok",
            "within the allowed skew"
        );

        let retarget = |h: &[(String, String)]| -> Vec<(String, String)> {
            h.iter()
                .map(|(n, val)| {
                    let val = if n == "x-amz-target" {
                        "TrentService.ScheduleKeyDeletion".to_string()
                    } else {
                        val.clone()
                    };
                    (n.clone(), val)
                })
                .collect()
        };
        assert_eq!(
            kind(check(&v, &retarget(&good), &body, now)),
            "InvalidSignatureException",
            "a signed header changed"
        );

        let without = |name: &str| -> Vec<(String, String)> {
            good.iter().filter(|(n, _)| n != name).cloned().collect()
        };
        assert_eq!(
            kind(check(&v, &without("authorization"), &body, now)),
            "MissingAuthenticationTokenException"
        );
        assert_eq!(
            kind(check(&v, &without("x-amz-date"), &body, now)),
            "IncompleteSignatureException"
        );

        let with_auth = |auth: String| -> Vec<(String, String)> {
            good.iter()
                .map(|(n, val)| {
                    (
                        n.clone(),
                        if n == "authorization" {
                            auth.clone()
                        } else {
                            val.clone()
                        },
                    )
                })
                .collect()
        };
        let auth = good
            .iter()
            .find(|(n, _)| n == "authorization")
            .unwrap()
            .1
            .clone();
        assert_eq!(
            kind(check(
                &v,
                &with_auth(auth.replace(KEY_ID, "AKIDUNKNOWN")),
                &body,
                now
            )),
            "UnrecognizedClientException"
        );
        for broken in [
            "AWS4-HMAC-SHA256".to_string(),
            auth.replace("Credential=", "Cred="),
            auth.replace("/aws4_request", ""),
            auth.replace("AWS4-HMAC-SHA256", "AWS4-HMAC-SHA1"),
            auth.split(", Signature=").next().unwrap().to_string() + ", Signature=zz",
        ] {
            assert_eq!(
                kind(check(&v, &with_auth(broken.clone()), &body, now)),
                "IncompleteSignatureException",
                "{broken}"
            );
        }
        // Host unsigned: refused, whatever the signature.
        let no_host = auth.replace(
            "SignedHeaders=content-type;host;",
            "SignedHeaders=content-type;",
        );
        assert_eq!(
            kind(check(&v, &with_auth(no_host), &body, now)),
            "InvalidSignatureException"
        );
    }

    /// The lenient readings a proxy and the verifier could disagree on, each refused.
    #[test]
    fn what_must_be_signed_is_signed_and_said_once() {
        let v = verifier();
        let now = SystemTime::now();
        let body = b"{\"KeyId\":\"k\"}";
        // A DescribeKey signed over host and x-amz-date only, replayed as a DisableKey: the
        // target is not covered, so the request is refused before its signature is checked.
        let bare = sign_post(
            &[("host", "kms.example.test:8443")],
            body,
            KEY_ID,
            SECRET,
            "us-east-1",
            now,
        )
        .unwrap();
        let auth = bare.iter().find(|(n, _)| n == "authorization").unwrap();
        assert!(
            auth.1.contains("SignedHeaders=host;x-amz-date,"),
            "{}",
            auth.1
        );
        assert_eq!(
            kind(check(&v, &bare, body, now)),
            "InvalidSignatureException"
        );
        let mut replayed = bare.clone();
        replayed.push(("x-amz-target".into(), "TrentService.DisableKey".into()));
        let e = check(&v, &replayed, body, now).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidSignature);
        assert_eq!(
            e.message,
            "'X-Amz-Target' must be a 'SignedHeader' in the AWS Authorization."
        );

        let (good, body) = signed(SECRET, "us-east-1", now, b"{}");
        assert_eq!(kind(check(&v, &good, &body, now)), "ok");
        let auth = good
            .iter()
            .find(|(n, _)| n == "authorization")
            .unwrap()
            .1
            .clone();
        let with_auth = |auth: &str| -> Vec<(String, String)> {
            good.iter()
                .map(|(n, val)| {
                    let val = if n == "authorization" { auth } else { val };
                    (n.clone(), val.to_string())
                })
                .collect()
        };
        // Two Authorization headers, the good one first or last.
        let forged = auth.replace(KEY_ID, "AKIDOTHER");
        for pair in [[&auth, &forged], [&forged, &auth]] {
            let mut two = with_auth(pair[0]);
            two.push(("authorization".into(), pair[1].clone()));
            assert_eq!(
                kind(check(&v, &two, &body, now)),
                "IncompleteSignatureException"
            );
        }
        // A parameter given twice.
        let twice = format!("{auth}, Signature={}", "0".repeat(64));
        assert_eq!(
            kind(check(&v, &with_auth(&twice), &body, now)),
            "IncompleteSignatureException"
        );
        // SignedHeaders out of order: not the canonical request's list.
        let listed = auth
            .split("SignedHeaders=")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .to_string();
        let mut names: Vec<&str> = listed.split(';').collect();
        names.reverse();
        let unsorted = auth.replace(&listed, &names.join(";"));
        assert_eq!(
            kind(check(&v, &with_auth(&unsorted), &body, now)),
            "InvalidSignatureException"
        );
        // A payload hash header that is not the body's.
        let mut claimed = good.clone();
        claimed.push(("x-amz-content-sha256".into(), "ab".repeat(32)));
        let e = check(&v, &claimed, &body, now).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidSignature);
        assert!(e.message.contains("x-amz-content-sha256"), "{e}");
        let mut honest = good.clone();
        let sha = hex::encode(ring::digest::digest(&ring::digest::SHA256, &body));
        honest.push(("x-amz-content-sha256".into(), sha));
        assert_eq!(kind(check(&v, &honest, &body, now)), "ok");
    }

    #[test]
    fn amz_dates_read_back_as_written() {
        for secs in [0u64, 951_782_400, 1_795_996_800, 4_102_444_799] {
            let t = UNIX_EPOCH + Duration::from_secs(secs);
            assert_eq!(parse_amz_date(&amz_date(t)), Some(t), "{}", amz_date(t));
        }
        assert_eq!(parse_amz_date("20261130T250000Z"), None);
        assert_eq!(parse_amz_date("2026-11-30T00:00:00Z"), None);
        assert_eq!(parse_amz_date("20261130T000000"), None);
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let v = verifier();
        let text = format!("{:?}", v.keys.read().unwrap().get(KEY_ID).unwrap());
        assert!(!text.contains(SECRET), "{text}");
    }
}
