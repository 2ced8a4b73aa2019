//! The external key store (XKS) proxy API as AWS KMS calls it: signed requests (SigV4,
//! service `kms-xks-proxy`) to a real hsm-kms on real SoftHSM2 tokens, every operation and
//! every error of the specification, the AAD layout checked by decrypting in the token
//! directly with an AAD built here, the integrity value computed here, credentials
//! rotating on SIGHUP, and mutual TLS (with curl's --aws-sigv4, as the specification's
//! appendix does).

mod common;

use std::time::SystemTime;

use base64::Engine as _;
use common::*;
use hsm_kms::api::aws::sigv4;
use hsm_kms::config::{Settings, XksCredential};
use hsm_kms::proto::*;
use serde_json::{json, Value};

const CLUSTER: &str = "cluster-xksproxytest";
const PREFIX: &str = "tenant/a";
/// AWS KMS's credential for the tenant, and a second one of the same prefix (rotation).
const CRED_A: (&str, &str) = (
    "XKSAAAAAAAAAAAAAAAAAAAAAA2",
    "xksSecretA0123456789abcdefghijklmnopqrstuvwxyzAB=",
);
const CRED_B: (&str, &str) = (
    "XKSBBBBBBBBBBBBBBBBBBBBBB3",
    "xksSecretB0123456789abcdefghijklmnopqrstuvwxyzAB/",
);
/// Another tenant's credential, whose principal the key's policy allows Encrypt only when
/// AWS KMS says the operation is Encrypt (a condition on xks:KmsOperation).
const CRED_C: (&str, &str) = (
    "XKSCCCCCCCCCCCCCCCCCCCCCC4",
    "xksSecretC0123456789abcdefghijklmnopqrstuvwxyzAB+",
);
const PREFIX_C: &str = "tenant/c";
const XKS_ROLE: &str = "arn:aws:iam::111122223333:role/aws-kms-xks";
const OTHER_ROLE: &str = "arn:aws:iam::111122223333:role/other-xks";

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn unb64(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap_or_else(|| panic!("not base64 text: {v}")))
        .unwrap()
}

fn credential(prefix: &str, key: (&str, &str), var: &str, principal: &str) -> XksCredential {
    XksCredential {
        uri_prefix: prefix.into(),
        access_key_id: key.0.into(),
        secret_file: None,
        secret_env: Some(var.into()),
        principal: principal.into(),
    }
}

fn secrets() -> Vec<(&'static str, String)> {
    vec![
        ("XKS_A", CRED_A.1.into()),
        ("XKS_B", CRED_B.1.into()),
        ("XKS_C", CRED_C.1.into()),
    ]
}

fn with_xks(s: &mut Settings) {
    s.server.xks_listen = Some("127.0.0.1:0".parse().unwrap());
    s.xks.credentials = vec![
        credential(PREFIX, CRED_A, "XKS_A", XKS_ROLE),
        credential(PREFIX_C, CRED_C, "XKS_C", OTHER_ROLE),
    ];
}

/// A server with the XKS API, a connected store, and a key whose policy lets the XKS
/// role use it (and the other role encrypt when AWS KMS's operation is Encrypt).
async fn xks_server(change: impl FnOnce(&mut Settings)) -> (Harness, Client, String, String) {
    xks_server_on(ClusterSpec::good(CLUSTER), change).await
}

/// As `xks_server`, on the cluster `spec`.
async fn xks_server_on(
    spec: ClusterSpec,
    change: impl FnOnce(&mut Settings),
) -> (Harness, Client, String, String) {
    let options = Options {
        env: secrets(),
        ..Default::default()
    };
    let h = Harness::start_opts(&[spec], options, |s| {
        with_xks(s);
        change(s);
    })
    .await;
    let mut c = h.client().await;
    let store = h.connected_store(&mut c, 0, "xks").await;
    let policy = json!({
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::111122223333:root"},
             "Action": "kms:*", "Resource": "*"},
            {"Effect": "Allow", "Principal": {"AWS": XKS_ROLE},
             "Action": ["kms:DescribeKey", "kms:Encrypt", "kms:Decrypt"], "Resource": "*"},
            {"Effect": "Allow", "Principal": {"AWS": OTHER_ROLE},
             "Action": ["kms:Encrypt"], "Resource": "*",
             "Condition": {"StringEquals": {"xks:KmsOperation": "Encrypt"}}}
        ]
    });
    let key = c
        .create_key(CreateKeyRequest {
            custom_key_store_id: Some(store.clone()),
            origin: Some("AWS_CLOUDHSM".into()),
            policy: Some(policy.to_string()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key_metadata
        .unwrap()
        .key_id;
    (h, c, store, key)
}

/// What AWS KMS sends as requestMetadata for `operation`.
fn metadata(operation: &str) -> Value {
    json!({
        "awsPrincipalArn": "arn:aws:iam::123456789012:user/Alice",
        "kmsKeyArn": "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "kmsOperation": operation,
        "kmsRequestId": uuid::Uuid::new_v4().to_string(),
        "kmsViaService": "ebs",
    })
}

/// A request as AWS KMS sends it: `POST <path>` signed with `key` (None: unsigned).
fn send(
    h: &Harness,
    method: &str,
    path: &str,
    body: &Value,
    key: Option<(&str, &str)>,
) -> AwsAnswer {
    let body = body.to_string();
    let base = [
        ("host", h.xks.as_str()),
        ("content-type", "application/json"),
    ];
    let headers: Vec<(String, String)> = match key {
        Some((id, secret)) => sigv4::sign_request(
            sigv4::XKS_SERVICE,
            path,
            &base,
            body.as_bytes(),
            id,
            secret,
            REGION,
            SystemTime::now(),
        )
        .unwrap(),
        None => base
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
    };
    let stream = std::net::TcpStream::connect(&h.xks).unwrap();
    http1_request(stream, method, path, &headers, body.as_bytes())
}

fn post(h: &Harness, route: &str, body: &Value) -> AwsAnswer {
    send(
        h,
        "POST",
        &format!("/{PREFIX}/kms/xks/v1/{route}"),
        body,
        Some(CRED_A),
    )
}

/// (status, errorName) of an answer.
fn refused(a: &AwsAnswer) -> (u16, &str) {
    (a.0, a.2["errorName"].as_str().unwrap_or("(no errorName)"))
}

fn encrypt_body(plaintext: &[u8], aad: Option<&[u8]>) -> Value {
    let mut body = json!({
        "requestMetadata": metadata("Encrypt"),
        "plaintext": b64(plaintext),
        "encryptionAlgorithm": "AES_GCM",
        "ciphertextDataIntegrityValueAlgorithm": "SHA_256",
    });
    if let Some(aad) = aad {
        body["additionalAuthenticatedData"] = b64(aad).into();
    }
    body
}

fn decrypt_body(sealed: &Value, aad: Option<&[u8]>, metadata_bytes: Option<&[u8]>) -> Value {
    let mut body = json!({
        "requestMetadata": metadata("Decrypt"),
        "ciphertext": sealed["ciphertext"],
        "initializationVector": sealed["initializationVector"],
        "authenticationTag": sealed["authenticationTag"],
        "encryptionAlgorithm": "AES_GCM",
    });
    if let Some(aad) = aad {
        body["additionalAuthenticatedData"] = b64(aad).into();
    }
    if let Some(m) = metadata_bytes {
        body["ciphertextMetadata"] = b64(m).into();
    }
    body
}

/// Decrypts in the token itself (PKCS#11, as kmsuser) with AES-GCM and `aad`, built by the
/// caller: an independent check of what hsm-kms gave the HSM.
fn decrypt_in_token(
    h: &Harness,
    key_arn: &str,
    iv: &[u8],
    aad: &[u8],
    sealed: &[u8],
) -> Option<Vec<u8>> {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::mechanism::aead::GcmParams;
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, ObjectClass};
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;
    std::env::set_var("SOFTHSM2_CONF", h.softhsm2_conf());
    let pkcs11 = Pkcs11::new(softhsm2_module()).unwrap();
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let label = token_label(CLUSTER);
    let slot = pkcs11
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| {
            pkcs11
                .get_token_info(*s)
                .map(|t| t.label().trim() == label)
                .unwrap_or(false)
        })
        .expect("the cluster's token");
    let session = pkcs11.open_ro_session(slot).unwrap();
    session
        .login(UserType::User, Some(&AuthPin::new(PASSWORD.into())))
        .unwrap();
    let key = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(key_arn.as_bytes().to_vec()),
        ])
        .unwrap()
        .into_iter()
        .next()
        .expect("the key in the token, labelled with its ARN");
    let mut iv = iv.to_vec();
    let params = GcmParams::new(&mut iv, aad, 128.into()).unwrap();
    session
        .decrypt(&Mechanism::AesGcm(params), key, sealed)
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_and_error_as_the_specification_says() {
    let (h, mut c, store, key) = xks_server(|s| s.xks.health_cache_seconds = 1).await;
    let key_arn = format!("arn:aws:kms:us-east-1:111122223333:key/{key}");

    // GetHealthStatus: the cluster's two HSMs, ACTIVE after an HSM call; one proxy.
    let health = post(
        &h,
        "health",
        &json!({"requestMetadata": {"kmsRequestId": "r", "kmsOperation": "KmsHealthCheck"}}),
    );
    assert_eq!(health.0, 200, "{:?}", health.2);
    assert_eq!(health.2["xksProxyFleetSize"], 1);
    assert_eq!(health.2["xksProxyVendor"], "hsm-kms");
    let fleet = health.2["ekmFleetDetails"].as_array().unwrap();
    assert_eq!(fleet.len(), 2, "{fleet:?}");
    assert!(
        fleet.iter().all(|e| e["healthStatus"] == "ACTIVE"),
        "{fleet:?}"
    );
    assert_eq!(health.1["content-type"], "application/json");

    // GetKeyMetadata: an unknown kmsOperation and unknown members are accepted.
    let mut body =
        json!({"requestMetadata": metadata("SomeFutureOperation"), "someFutureMember": 1});
    body["requestMetadata"]["someFutureField"] = "x".into();
    let meta = post(&h, &format!("keys/{key}/metadata"), &body);
    assert_eq!(meta.0, 200, "{:?}", meta.2);
    assert_eq!(
        meta.2,
        json!({"keySpec": "AES_256", "keyUsage": ["ENCRYPT", "DECRYPT"], "keyStatus": "ENABLED"})
    );

    // Encrypt: 12-byte IV, 16-byte tag apart, the integrity value of Appendix C.
    let plaintext = vec![0x5a; 4300];
    let aad = vec![0xa5; 8192];
    let sealed = post(
        &h,
        &format!("keys/{key}/encrypt"),
        &encrypt_body(&plaintext, Some(&aad)),
    );
    assert_eq!(sealed.0, 200, "{:?}", sealed.2);
    let (ct, iv, tag) = (
        unb64(&sealed.2["ciphertext"]),
        unb64(&sealed.2["initializationVector"]),
        unb64(&sealed.2["authenticationTag"]),
    );
    assert_eq!((ct.len(), iv.len(), tag.len()), (4300, 12, 16));
    assert!(sealed.2.get("ciphertextMetadata").is_none());
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [&aad, &iv, &ct, &tag] {
        digest.update(part);
    }
    assert_eq!(
        unb64(&sealed.2["ciphertextDataIntegrityValue"]),
        digest.finish().as_ref()
    );

    // The AAD the HSM saw is the specification's: 2-byte length, AAD, 1-byte length of
    // the (absent) ciphertextMetadata. Built here, decrypted in the token directly.
    let mut spec_aad = (aad.len() as u16).to_be_bytes().to_vec();
    spec_aad.extend_from_slice(&aad);
    spec_aad.push(0);
    let mut body_and_tag = ct.clone();
    body_and_tag.extend_from_slice(&tag);
    let h2 = &h;
    let opened = tokio::task::block_in_place(|| {
        decrypt_in_token(h2, &key_arn, &iv, &spec_aad, &body_and_tag)
    });
    assert_eq!(
        opened.as_deref(),
        Some(&plaintext[..]),
        "the token did not open it with the specification's AAD"
    );
    let bare =
        tokio::task::block_in_place(|| decrypt_in_token(h2, &key_arn, &iv, &aad, &body_and_tag));
    assert_eq!(bare, None, "the AAD without its lengths opened it too");

    // Decrypt gives the plaintext back; anything changed is InvalidCiphertextException.
    let opened = post(
        &h,
        &format!("keys/{key}/decrypt"),
        &decrypt_body(&sealed.2, Some(&aad), None),
    );
    assert_eq!(opened.0, 200, "{:?}", opened.2);
    assert_eq!(unb64(&opened.2["plaintext"]), plaintext);
    let decrypt = |body: &Value| post(&h, &format!("keys/{key}/decrypt"), body);
    let mut tampered = sealed.2.clone();
    let mut bad_tag = tag.clone();
    bad_tag[0] ^= 1;
    tampered["authenticationTag"] = b64(&bad_tag).into();
    assert_eq!(
        refused(&decrypt(&decrypt_body(&tampered, Some(&aad), None))),
        (400, "InvalidCiphertextException")
    );
    assert_eq!(
        refused(&decrypt(&decrypt_body(&sealed.2, Some(b"other"), None))),
        (400, "InvalidCiphertextException")
    );
    assert_eq!(
        refused(&decrypt(&decrypt_body(&sealed.2, Some(&aad), Some(b"m")))),
        (400, "InvalidCiphertextException")
    );
    // AAD "abc" is not AAD "ab" with metadata "c": the lengths are in.
    let abc = post(
        &h,
        &format!("keys/{key}/encrypt"),
        &encrypt_body(b"x", Some(b"abc")),
    );
    assert_eq!(
        refused(&decrypt(&decrypt_body(&abc.2, Some(b"ab"), Some(b"c")))),
        (400, "InvalidCiphertextException")
    );
    assert_eq!(decrypt(&decrypt_body(&abc.2, Some(b"abc"), None)).0, 200);
    let mut iv16 = sealed.2.clone();
    iv16["initializationVector"] = b64(&[0u8; 16]).into();
    assert_eq!(
        refused(&decrypt(&decrypt_body(&iv16, Some(&aad), None))),
        (400, "InvalidCiphertextException")
    );

    // ValidationException: sizes, encodings, algorithms, missing members.
    let encrypt = |body: &Value| post(&h, &format!("keys/{key}/encrypt"), body);
    for (what, body) in [
        ("plaintext over 4300 bytes", encrypt_body(&[0; 4301], None)),
        ("AAD over 8192 bytes", encrypt_body(b"x", Some(&[0; 8193]))),
        (
            "no plaintext",
            json!({"requestMetadata": metadata("Encrypt"), "encryptionAlgorithm": "AES_GCM"}),
        ),
        (
            "not base64",
            json!({"requestMetadata": metadata("Encrypt"), "plaintext": "%%%", "encryptionAlgorithm": "AES_GCM"}),
        ),
        (
            "another algorithm",
            json!({"requestMetadata": metadata("Encrypt"), "plaintext": "eA==", "encryptionAlgorithm": "AES_CBC"}),
        ),
        (
            "another integrity algorithm",
            json!({"requestMetadata": metadata("Encrypt"), "plaintext": "eA==", "encryptionAlgorithm": "AES_GCM", "ciphertextDataIntegrityValueAlgorithm": "MD5"}),
        ),
        (
            "no requestMetadata",
            json!({"plaintext": "eA==", "encryptionAlgorithm": "AES_GCM"}),
        ),
        (
            "no kmsKeyArn",
            json!({"requestMetadata": {"awsPrincipalArn": "a", "kmsOperation": "Encrypt", "kmsRequestId": "r"}, "plaintext": "eA==", "encryptionAlgorithm": "AES_GCM"}),
        ),
    ] {
        assert_eq!(
            refused(&encrypt(&body)),
            (400, "ValidationException"),
            "{what}"
        );
    }
    let mut long_meta = decrypt_body(&sealed.2, None, Some(&[0; 21]));
    assert_eq!(refused(&decrypt(&long_meta)), (400, "ValidationException"));
    long_meta["initializationVector"] = b64(&[0; 13]).into();
    assert_eq!(refused(&decrypt(&long_meta)), (400, "ValidationException"));
    assert_eq!(
        refused(&post(&h, "health", &json!({}))),
        (400, "ValidationException")
    );

    // Paths, methods, keys.
    let path = |p: &str| format!("/{PREFIX}/kms/xks/v1/{p}");
    assert_eq!(
        send(&h, "GET", &path("health"), &json!({}), Some(CRED_A)).0,
        405
    );
    assert_eq!(
        refused(&send(
            &h,
            "POST",
            &path("keys/k/sign"),
            &json!({}),
            Some(CRED_A)
        )),
        (404, "InvalidUriPathException")
    );
    assert_eq!(
        refused(&send(
            &h,
            "POST",
            "/tenant/z/kms/xks/v1/health",
            &json!({}),
            Some(CRED_A)
        )),
        (404, "InvalidUriPathException")
    );
    let missing = uuid::Uuid::new_v4();
    assert_eq!(
        refused(&post(
            &h,
            &format!("keys/{missing}/metadata"),
            &json!({"requestMetadata": metadata("CreateKey")})
        )),
        (404, "KeyNotFoundException")
    );
    assert_eq!(
        refused(&post(
            &h,
            "keys/not-a-key-id/metadata",
            &json!({"requestMetadata": metadata("CreateKey")})
        )),
        (404, "KeyNotFoundException")
    );

    // AuthenticationFailedException: unsigned, a wrong secret, another prefix's credential.
    let health_body =
        json!({"requestMetadata": {"kmsRequestId": "r", "kmsOperation": "KmsHealthCheck"}});
    assert_eq!(
        refused(&send(&h, "POST", &path("health"), &health_body, None)),
        (401, "AuthenticationFailedException")
    );
    assert_eq!(
        refused(&send(
            &h,
            "POST",
            &path("health"),
            &health_body,
            Some((CRED_A.0, CRED_B.1))
        )),
        (401, "AuthenticationFailedException")
    );
    assert_eq!(
        refused(&send(
            &h,
            "POST",
            &path("health"),
            &health_body,
            Some(CRED_C)
        )),
        (401, "AuthenticationFailedException")
    );

    // Authorization by the key's policy, with the requestMetadata as condition keys.
    let as_c = |route: &str, body: &Value| {
        send(
            &h,
            "POST",
            &format!("/{PREFIX_C}/kms/xks/v1/{route}"),
            body,
            Some(CRED_C),
        )
    };
    assert_eq!(
        as_c(&format!("keys/{key}/encrypt"), &encrypt_body(b"x", None)).0,
        200
    );
    let mut gdk = encrypt_body(b"x", None);
    gdk["requestMetadata"]["kmsOperation"] = "GenerateDataKey".into();
    assert_eq!(
        refused(&as_c(&format!("keys/{key}/encrypt"), &gdk)),
        (403, "AccessDeniedException")
    );
    assert_eq!(
        refused(&as_c(
            &format!("keys/{key}/decrypt"),
            &decrypt_body(&abc.2, Some(b"abc"), None)
        )),
        (403, "AccessDeniedException")
    );

    // The audit trail has each request with its requestMetadata; the metrics count them.
    let lines = audit_lines(&h);
    let encrypts: Vec<&Value> = lines
        .iter()
        .filter(|l| l["operation"] == "XksEncrypt")
        .collect();
    assert!(encrypts.iter().any(|l| l["outcome"] == "allowed"
        && l["principal"] == XKS_ROLE
        && l["request_metadata"]["kmsViaService"] == "ebs"
        && l["resources"][0] == key_arn.as_str()));
    assert!(lines.iter().any(|l| l["operation"] == "XksEncrypt"
        && l["outcome"] == "denied"
        && l["principal"] == OTHER_ROLE));
    assert!(
        !lines
            .iter()
            .any(|l| l.to_string().contains(&b64(&plaintext[..64]))),
        "plaintext in the trail"
    );
    let metrics = h.metrics();
    assert!(
        metrics.contains("operation=\"XksEncrypt\""),
        "no XksEncrypt in the metrics"
    );

    // A disabled key: DISABLED in its metadata, InvalidStateException for cryptography.
    c.disable_key(DisableKeyRequest {
        key_id: key.clone(),
    })
    .await
    .unwrap();
    let meta = post(
        &h,
        &format!("keys/{key}/metadata"),
        &json!({"requestMetadata": metadata("DescribeKey")}),
    );
    assert_eq!(meta.2["keyStatus"], "DISABLED");
    assert_eq!(
        refused(&encrypt(&encrypt_body(b"x", None))),
        (400, "InvalidStateException")
    );
    c.enable_key(EnableKeyRequest {
        key_id: key.clone(),
    })
    .await
    .unwrap();

    // A disconnected store: the key is DISABLED, its cryptography InvalidStateException,
    // and the health check says the HSMs are UNAVAILABLE (after the cache's time).
    disconnect(&mut c, &store).await;
    let meta = post(
        &h,
        &format!("keys/{key}/metadata"),
        &json!({"requestMetadata": metadata("DescribeKey")}),
    );
    assert_eq!(meta.2["keyStatus"], "DISABLED");
    assert_eq!(
        refused(&encrypt(&encrypt_body(b"x", None))),
        (400, "InvalidStateException")
    );
    assert_eq!(
        refused(&decrypt(&decrypt_body(&abc.2, Some(b"abc"), None))),
        (400, "InvalidStateException")
    );
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let health = post(&h, "health", &health_body);
    assert!(
        health.2["ekmFleetDetails"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["healthStatus"] == "UNAVAILABLE"),
        "{:?}",
        health.2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stores_quota_throttles_xks_requests() {
    let (h, _c, _store, key) = xks_server(|s| s.throttling.store_requests_per_second = 3).await;
    let answers: Vec<u16> = (0..12)
        .map(|_| {
            post(
                &h,
                &format!("keys/{key}/encrypt"),
                &encrypt_body(b"x", None),
            )
            .0
        })
        .collect();
    // The attack happened (12 at once), and the quota held: some were refused with 429.
    assert_eq!(answers.len(), 12);
    assert!(answers.contains(&200), "{answers:?}");
    assert!(answers.contains(&429), "{answers:?}");
    let throttled = post(
        &h,
        &format!("keys/{key}/encrypt"),
        &encrypt_body(b"x", None),
    );
    if throttled.0 == 429 {
        assert_eq!(refused(&throttled).1, "ThrottlingException");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_rotate_on_sighup() {
    let (mut h, _c, _store, _key) = xks_server(|s| s.xks.health_cache_seconds = 0).await;
    let health =
        json!({"requestMetadata": {"kmsRequestId": "r", "kmsOperation": "KmsHealthCheck"}});
    let path = format!("/{PREFIX}/kms/xks/v1/health");
    assert_eq!(send(&h, "POST", &path, &health, Some(CRED_A)).0, 200);
    assert_eq!(send(&h, "POST", &path, &health, Some(CRED_B)).0, 401);
    // Step 1: the new credential beside the old one.
    h.reload_with(|s| {
        s.xks
            .credentials
            .push(credential(PREFIX, CRED_B, "XKS_B", XKS_ROLE))
    });
    let both = wait_until(|| send(&h, "POST", &path, &health, Some(CRED_B)).0 == 200);
    assert!(both, "the new credential was not taken");
    assert_eq!(send(&h, "POST", &path, &health, Some(CRED_A)).0, 200);
    // Step 4: the old one removed.
    h.reload_with(|s| s.xks.credentials.retain(|c| c.access_key_id != CRED_A.0));
    let gone = wait_until(|| send(&h, "POST", &path, &health, Some(CRED_A)).0 == 401);
    assert!(gone, "the old credential still works");
    assert_eq!(send(&h, "POST", &path, &health, Some(CRED_B)).0, 200);
    // A reload with a credential the specification does not allow changes nothing.
    h.reload_with(|s| s.xks.credentials[0].access_key_id = "lowercase-is-not-allowed".into());
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(send(&h, "POST", &path, &health, Some(CRED_B)).0, 200);
}

fn wait_until(mut check: impl FnMut() -> bool) -> bool {
    for _ in 0..50 {
        if check() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    false
}

/// Mutual TLS as AWS KMS does it, with curl (`--aws-sigv4`, a client certificate): the
/// configured subject is served; another subject, or no certificate, gets no handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_takes_only_the_configured_subjects() {
    let pki = Pki::new("hsm-kms xks test CA");
    let options = Options {
        env: secrets(),
        ..Default::default()
    };
    let h = Harness::start_opts(&[ClusterSpec::good(CLUSTER)], options, |s| {
        with_xks(s);
        use_tls(s, &pki);
        s.xks.client_subjects = vec!["cks.kms.us-east-1.amazonaws.com".into()];
    })
    .await;
    let dir = h.dir.path();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let ca = write("xks-ca.pem", &pki.ca_pem);
    let (kms_cert, kms_key) = pki.client(None, "cks.kms.us-east-1.amazonaws.com");
    let (other_cert, other_key) = pki.client(None, "cks.kms.eu-west-1.amazonaws.com");
    let kms = (write("kms.pem", &kms_cert), write("kms.key", &kms_key));
    let other = (
        write("other.pem", &other_cert),
        write("other.key", &other_key),
    );
    let port = h.xks.rsplit(':').next().unwrap().to_string();
    let url = format!("https://localhost:{port}/{PREFIX}/kms/xks/v1/health");
    let curl = |cert: Option<&(std::path::PathBuf, std::path::PathBuf)>| {
        let mut cmd = std::process::Command::new("curl");
        cmd.args(["-s", "-o", "-", "-w", "\n%{http_code}", "--cacert"])
            .arg(&ca)
            .args(["--aws-sigv4", "aws:amz:us-east-1:kms-xks-proxy", "--user"])
            .arg(format!("{}:{}", CRED_A.0, CRED_A.1))
            .args(["-H", "Content-Type: application/json", "-d"])
            .arg(r#"{"requestMetadata":{"kmsRequestId":"r","kmsOperation":"KmsHealthCheck"}}"#)
            .arg(&url);
        if let Some((c, k)) = cert {
            cmd.arg("--cert").arg(c).arg("--key").arg(k);
        }
        let out = cmd
            .output()
            .expect("curl is needed (scripts/setup.sh installs it)");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (code, out) = curl(Some(&kms));
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.ends_with("\n200") && out.contains("ekmFleetDetails"),
        "{out}"
    );
    // The attacks reach the listener (curl connects) and end in the handshake.
    let (code, out) = curl(Some(&other));
    assert_ne!(code, Some(0), "another subject was served: {out}");
    assert!(!out.contains("ekmFleetDetails"));
    let (code, out) = curl(None);
    assert_ne!(code, Some(0), "no certificate was served: {out}");
    assert!(!out.contains("ekmFleetDetails"));
}

/// What the HSM answers comes back in the specification's words: a key the HSM refuses for
/// the operation, an HSM that does not answer in time, an HSM error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsm_failures_are_the_specifications_errors() {
    let (h, _c, _store, key) = xks_server_on(ClusterSpec::faulty(CLUSTER), |_| {}).await;
    let encrypt = || {
        post(
            &h,
            &format!("keys/{key}/encrypt"),
            &encrypt_body(b"x", None),
        )
    };
    assert_eq!(encrypt().0, 200);
    h.set_faults("fault = key_function_not_permitted\nfunctions = C_Encrypt\n");
    assert_eq!(refused(&encrypt()), (400, "InvalidKeyUsageException"));
    h.set_faults("fault = general_error\nfunctions = C_Encrypt\n");
    assert_eq!(refused(&encrypt()), (500, "InternalException"));
    h.set_faults("delay_ms = 15000\ndelay_functions = C_Encrypt\n");
    assert_eq!(refused(&encrypt()), (503, "DependencyTimeoutException"));
    h.set_faults("");
}

/// CloudHSM's mode, where the HSM chooses each IV (the faulty module behaves so): the IV
/// the HSM wrote back is answered, and decrypts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsm_generated_ivs_are_answered() {
    let spec = ClusterSpec {
        gcm_iv: hsm_kms::config::GcmIvMode::Hsm,
        ..ClusterSpec::faulty(CLUSTER)
    };
    let (h, _c, _store, key) = xks_server_on(spec, |_| {}).await;
    h.set_faults("gcm_iv = hsm\n");
    let one = post(
        &h,
        &format!("keys/{key}/encrypt"),
        &encrypt_body(b"same", Some(b"aad")),
    );
    let two = post(
        &h,
        &format!("keys/{key}/encrypt"),
        &encrypt_body(b"same", Some(b"aad")),
    );
    assert_eq!((one.0, two.0), (200, 200), "{:?}", one.2);
    let iv = |a: &AwsAnswer| unb64(&a.2["initializationVector"]);
    assert_eq!(iv(&one).len(), 12);
    assert_ne!(iv(&one), vec![0u8; 12], "the HSM's IV was not written back");
    assert_ne!(iv(&one), iv(&two));
    for sealed in [&one, &two] {
        let opened = post(
            &h,
            &format!("keys/{key}/decrypt"),
            &decrypt_body(&sealed.2, Some(b"aad"), None),
        );
        assert_eq!(unb64(&opened.2["plaintext"]), b"same");
    }
    h.set_faults("");
}
