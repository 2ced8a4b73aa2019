//! gRPC clients: the calls tests make over and over, and checks of AWS exceptions.

use super::*;

/// Connects a store and waits for the outcome: (state, error code).
pub async fn connect(c: &mut Client, id: &str) -> (String, Option<String>) {
    c.connect_custom_key_store(ConnectCustomKeyStoreRequest {
        custom_key_store_id: id.into(),
    })
    .await
    .expect("ConnectCustomKeyStore");
    wait_settled(c, id).await
}

/// Polls until the store is no longer CONNECTING.
pub async fn wait_settled(c: &mut Client, id: &str) -> (String, Option<String>) {
    for _ in 0..300 {
        let s = describe_store(c, id).await;
        if s.connection_state != "CONNECTING" {
            return (s.connection_state, s.connection_error_code);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("store {id} stayed CONNECTING");
}

pub async fn describe_store(c: &mut Client, id: &str) -> CustomKeyStoresListEntry {
    let mut r = c
        .describe_custom_key_stores(DescribeCustomKeyStoresRequest {
            custom_key_store_id: Some(id.into()),
            ..Default::default()
        })
        .await
        .expect("DescribeCustomKeyStores")
        .into_inner();
    assert_eq!(r.custom_key_stores.len(), 1);
    r.custom_key_stores.remove(0)
}

pub async fn disconnect(c: &mut Client, id: &str) {
    c.disconnect_custom_key_store(DisconnectCustomKeyStoreRequest {
        custom_key_store_id: id.into(),
    })
    .await
    .expect("DisconnectCustomKeyStore");
}

pub async fn create_key(c: &mut Client, store: &str) -> KeyMetadata {
    c.create_key(CreateKeyRequest {
        custom_key_store_id: Some(store.into()),
        origin: Some("AWS_CLOUDHSM".into()),
        ..Default::default()
    })
    .await
    .expect("CreateKey")
    .into_inner()
    .key_metadata
    .unwrap()
}

pub async fn describe_key(c: &mut Client, key: &str) -> KeyMetadata {
    c.describe_key(DescribeKeyRequest {
        key_id: key.into(),
        ..Default::default()
    })
    .await
    .expect("DescribeKey")
    .into_inner()
    .key_metadata
    .unwrap()
}

/// CreateKey in `store`, as a result.
pub async fn try_create_key(
    c: &mut Client,
    store: &str,
) -> Result<tonic::Response<CreateKeyResponse>, tonic::Status> {
    c.create_key(CreateKeyRequest {
        custom_key_store_id: Some(store.into()),
        origin: Some("AWS_CLOUDHSM".into()),
        ..Default::default()
    })
    .await
}

/// Encrypt without context, as a result.
pub async fn try_encrypt(
    c: &mut Client,
    key: &str,
    pt: &[u8],
) -> Result<tonic::Response<EncryptResponse>, tonic::Status> {
    c.encrypt(EncryptRequest {
        key_id: key.into(),
        plaintext: pt.to_vec(),
        ..Default::default()
    })
    .await
}

pub async fn encrypt(c: &mut Client, key: &str, pt: &[u8]) -> Vec<u8> {
    c.encrypt(EncryptRequest {
        key_id: key.into(),
        plaintext: pt.to_vec(),
        ..Default::default()
    })
    .await
    .expect("Encrypt")
    .into_inner()
    .ciphertext_blob
}

/// The AWS exception name a failed call carries (its ErrorInfo reason).
pub fn aws_error(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_else(|| format!("no ErrorInfo: {status:?}"))
}

/// The value of one sample in a Prometheus text exposition (`name{labels}` exactly as
/// printed), if present.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(sample)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Asserts that a call failed with the AWS exception `name` (ErrorInfo reason, domain kms)
/// and the gRPC code of DESIGN.md's table; returns the message.
#[track_caller]
pub fn assert_err<T: std::fmt::Debug>(
    r: Result<tonic::Response<T>, tonic::Status>,
    name: &str,
) -> String {
    let status = match r {
        Ok(v) => panic!("expected {name}, got success: {:?}", v.into_inner()),
        Err(s) => s,
    };
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.reason, name, "status: {status:?}");
    assert_eq!(info.domain, "kms");
    assert_eq!(status.code(), expected_code(name), "code of {name}");
    status.message().to_string()
}

fn expected_code(name: &str) -> tonic::Code {
    use tonic::Code::*;
    match name {
        "ValidationException"
        | "InvalidCiphertextException"
        | "IncorrectKeyException"
        | "InvalidKeyUsageException"
        | "InvalidArnException"
        | "InvalidMarkerException"
        | "TagException"
        | "IncorrectTrustAnchorException"
        | "InvalidAliasNameException"
        | "MalformedPolicyDocumentException" => InvalidArgument,
        "NotFoundException"
        | "CustomKeyStoreNotFoundException"
        | "CloudHsmClusterNotFoundException" => NotFound,
        "CustomKeyStoreNameInUseException"
        | "CloudHsmClusterInUseException"
        | "AlreadyExistsException" => AlreadyExists,
        "UnsupportedOperationException" => Unimplemented,
        "AccessDeniedException" | "NotAuthorizedException" => PermissionDenied,
        "KMSInternalException" => Internal,
        "DependencyTimeoutException" => Unavailable,
        "LimitExceededException" | "ThrottlingException" => ResourceExhausted,
        _ => FailedPrecondition,
    }
}
