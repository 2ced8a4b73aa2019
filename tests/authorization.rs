//! Every operation refuses a caller that no policy and no grant allows, before it acts.
//!
//! The attacker here holds a valid access key (bob's) and no permission at all: no identity
//! policy, no grant, and the default key policy (which allows the account only through its
//! principals' identity policies). Bob sends every operation of `Op::ALL`, each a request
//! that the account root could make, at the store, key, alias, grant and ciphertext the
//! root set up. Each must answer AccessDeniedException, be recorded as denied, and change
//! nothing. The request table is an exhaustive match on `Op`: a new operation does not
//! compile here until its unauthorized request is written.

mod common;

use std::time::SystemTime;

use aws_sdk_kms::primitives::Blob;
use common::*;
use hsm_kms::model::op::{Op, Scope};
use serde_json::{json, Value};

const CLUSTER: &str = "cluster-authzaaaaaaa";

/// What the root set up for bob to go at.
struct Targets {
    store: String,
    key: String,
    alias: String,
    grant_id: String,
    grant_token: String,
    ciphertext: String,
}

/// Bob's request for `op`: one that would succeed (or fail on its own merits) for the root.
fn request(op: Op, t: &Targets) -> Value {
    let key = &t.key;
    match op {
        Op::CreateCustomKeyStore => json!({
            "CustomKeyStoreName": "bobs-store",
            "CloudHsmClusterId": CLUSTER,
            "TrustAnchorCertificate": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
            "KeyStorePassword": "a-password"
        }),
        Op::DescribeCustomKeyStores => json!({}),
        Op::UpdateCustomKeyStore => {
            json!({"CustomKeyStoreId": t.store, "NewCustomKeyStoreName": "renamed"})
        }
        Op::DeleteCustomKeyStore => json!({"CustomKeyStoreId": t.store}),
        Op::ConnectCustomKeyStore => json!({"CustomKeyStoreId": t.store}),
        Op::DisconnectCustomKeyStore => json!({"CustomKeyStoreId": t.store}),
        Op::CreateKey => json!({"CustomKeyStoreId": t.store, "Origin": "AWS_CLOUDHSM"}),
        Op::DescribeKey => json!({"KeyId": key}),
        Op::ListKeys => json!({}),
        Op::ListResourceTags => json!({"KeyId": key}),
        Op::EnableKey => json!({"KeyId": key}),
        Op::DisableKey => json!({"KeyId": key}),
        Op::UpdateKeyDescription => json!({"KeyId": key, "Description": "bob was here"}),
        Op::ScheduleKeyDeletion => json!({"KeyId": key, "PendingWindowInDays": 7}),
        Op::CancelKeyDeletion => json!({"KeyId": key}),
        Op::TagResource => json!({"KeyId": key, "Tags": [{"TagKey": "owner", "TagValue": "bob"}]}),
        Op::UntagResource => json!({"KeyId": key, "TagKeys": ["team"]}),
        Op::CreateAlias => json!({"AliasName": "alias/bobs", "TargetKeyId": key}),
        Op::UpdateAlias => json!({"AliasName": t.alias, "TargetKeyId": key}),
        Op::DeleteAlias => json!({"AliasName": t.alias}),
        Op::ListAliases => json!({}),
        Op::CreateGrant => {
            json!({"KeyId": key, "GranteePrincipal": BOB, "Operations": ["Decrypt"]})
        }
        Op::ListGrants => json!({"KeyId": key}),
        Op::ListRetirableGrants => json!({"RetiringPrincipal": ROOT}),
        Op::RetireGrant => json!({"KeyId": key, "GrantId": t.grant_id}),
        Op::RevokeGrant => json!({"KeyId": key, "GrantId": t.grant_id}),
        Op::PutKeyPolicy => json!({
            "KeyId": key,
            "PolicyName": "default",
            "Policy": json!({"Version": "2012-10-17", "Statement": [{
                "Effect": "Allow", "Principal": {"AWS": BOB}, "Action": "kms:*", "Resource": "*"
            }]}).to_string()
        }),
        Op::GetKeyPolicy => json!({"KeyId": key, "PolicyName": "default"}),
        Op::ListKeyPolicies => json!({"KeyId": key}),
        Op::Encrypt => json!({"KeyId": key, "Plaintext": "aGVsbG8="}),
        Op::Decrypt => json!({"CiphertextBlob": t.ciphertext}),
        Op::ReEncrypt => json!({"CiphertextBlob": t.ciphertext, "DestinationKeyId": key}),
        Op::GenerateDataKey => json!({"KeyId": key, "KeySpec": "AES_256"}),
        Op::GenerateDataKeyWithoutPlaintext => json!({"KeyId": key, "KeySpec": "AES_256"}),
        Op::GenerateRandom => json!({"NumberOfBytes": 16, "CustomKeyStoreId": t.store}),
        Op::GetKeyLastUsage => json!({"KeyId": key}),
        Op::DescribeCustomKeyStoreHealth => json!({"CustomKeyStoreId": t.store}),
        Op::ListKeyAuditEvents => json!({"KeyId": key, "Limit": 10}),
        // Needs no permission (Scope::Caller): bob learns only who he is (below).
        Op::GetCallerIdentity => json!({}),
        // Not on the AWS front: tests/xks.rs sends them as a credential without permission.
        Op::XksGetHealthStatus | Op::XksGetKeyMetadata | Op::XksEncrypt | Op::XksDecrypt => {
            json!({})
        }
        // Not served: bob hears AccessDeniedException before the refusal of the operation.
        Op::EnableKeyRotation
        | Op::DisableKeyRotation
        | Op::GetKeyRotationStatus
        | Op::RotateKeyOnDemand
        | Op::ListKeyRotations
        | Op::GetPublicKey
        | Op::DeleteImportedKeyMaterial => json!({"KeyId": key}),
        Op::GenerateDataKeyPair | Op::GenerateDataKeyPairWithoutPlaintext => {
            json!({"KeyId": key, "KeyPairSpec": "RSA_2048"})
        }
        Op::Sign => {
            json!({"KeyId": key, "Message": "aGVsbG8=", "SigningAlgorithm": "RSASSA_PSS_SHA_256"})
        }
        Op::Verify => json!({
            "KeyId": key, "Message": "aGVsbG8=", "Signature": "aGVsbG8=",
            "SigningAlgorithm": "RSASSA_PSS_SHA_256"
        }),
        Op::GenerateMac => {
            json!({"KeyId": key, "Message": "aGVsbG8=", "MacAlgorithm": "HMAC_SHA_256"})
        }
        Op::VerifyMac => json!({
            "KeyId": key, "Message": "aGVsbG8=", "Mac": "aGVsbG8=", "MacAlgorithm": "HMAC_SHA_256"
        }),
        Op::DeriveSharedSecret => json!({
            "KeyId": key, "KeyAgreementAlgorithm": "ECDH", "PublicKey": "aGVsbG8="
        }),
        Op::GetParametersForImport => json!({
            "KeyId": key, "WrappingAlgorithm": "RSAES_OAEP_SHA_256", "WrappingKeySpec": "RSA_2048"
        }),
        Op::ImportKeyMaterial => json!({
            "KeyId": key, "ImportToken": "aGVsbG8=", "EncryptedKeyMaterial": "aGVsbG8="
        }),
        Op::ReplicateKey => json!({"KeyId": key, "ReplicaRegion": "eu-west-1"}),
        Op::UpdatePrimaryRegion => json!({"KeyId": key, "PrimaryRegion": "eu-west-1"}),
    }
}

/// What bob could have changed, as the root reads it.
async fn state(c: &aws_sdk_kms::Client, t: &Targets) -> Value {
    let meta = c.describe_key().key_id(&t.key).send().await.unwrap();
    let meta = meta.key_metadata().unwrap();
    let tags = c.list_resource_tags().key_id(&t.key).send().await.unwrap();
    let aliases = c.list_aliases().send().await.unwrap();
    let grants = c.list_grants().key_id(&t.key).send().await.unwrap();
    let policy = c
        .get_key_policy()
        .key_id(&t.key)
        .policy_name("default")
        .send()
        .await
        .unwrap();
    let stores = c.describe_custom_key_stores().send().await.unwrap();
    let keys = c.list_keys().send().await.unwrap();
    json!({
        "key_state": meta.key_state().map(|s| s.as_str().to_string()),
        "description": meta.description(),
        "deletion_date": meta.deletion_date().map(|d| d.secs()),
        "tags": tags.tags().iter().map(|t| (t.tag_key().to_string(), t.tag_value().to_string())).collect::<Vec<_>>(),
        "aliases": aliases.aliases().iter().map(|a| (a.alias_name().map(str::to_string), a.target_key_id().map(str::to_string))).collect::<Vec<_>>(),
        "grants": grants.grants().iter().map(|g| g.grant_id().map(str::to_string)).collect::<Vec<_>>(),
        "policy": policy.policy(),
        "stores": stores.custom_key_stores().iter().map(|s| (
            s.custom_key_store_name().map(str::to_string),
            s.connection_state().map(|c| c.as_str().to_string()),
        )).collect::<Vec<_>>(),
        "keys": keys.keys().len(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_refuses_a_caller_without_permission() {
    let h = aws_server(&[ClusterSpec::good(CLUSTER)]).await;
    let root = sdk(&h, ROOT_KEY);
    let key = aws_connected_key(&h, &root).await;
    let store = store_id_named(&root, STORE).await;
    let alias = "alias/roots".to_string();
    root.create_alias()
        .alias_name(&alias)
        .target_key_id(&key)
        .send()
        .await
        .unwrap();
    root.tag_resource()
        .key_id(&key)
        .tags(
            aws_sdk_kms::types::Tag::builder()
                .tag_key("team")
                .tag_value("payments")
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let grant = root
        .create_grant()
        .key_id(&key)
        .grantee_principal("arn:aws:iam::111122223333:role/app")
        .retiring_principal(ROOT)
        .operations(aws_sdk_kms::types::GrantOperation::Decrypt)
        .send()
        .await
        .unwrap();
    let sealed = root
        .encrypt()
        .key_id(&key)
        .plaintext(Blob::new(b"the root's secret".to_vec()))
        .send()
        .await
        .unwrap();
    use base64::Engine as _;
    let t = Targets {
        store,
        key,
        alias,
        grant_id: grant.grant_id().unwrap().to_string(),
        grant_token: grant.grant_token().unwrap().to_string(),
        ciphertext: base64::engine::general_purpose::STANDARD
            .encode(sealed.ciphertext_blob().unwrap().as_ref()),
    };
    assert!(!t.grant_token.is_empty());
    let before = state(&root, &t).await;

    let mut refused = Vec::new();
    let decided = Op::ALL
        .into_iter()
        .filter(|op| op.scope() != Scope::Caller && !op.xks());
    for op in decided.clone() {
        let body = request(op, &t).to_string();
        let headers = aws_headers(
            &h.aws,
            &target_of(op),
            body.as_bytes(),
            Some(BOB_KEY),
            REGION,
            SystemTime::now(),
        );
        let stream = std::net::TcpStream::connect(&h.aws).unwrap();
        let (status, answer_headers, answer) = http1_post(stream, &headers, body.as_bytes());
        // The attack happened: bob's signed request reached the operation and was answered.
        let request_id = answer_headers
            .get("x-amzn-requestid")
            .unwrap_or_else(|| panic!("{}: no request id in {answer_headers:?}", op.name()))
            .clone();
        assert_eq!(
            (status, answer["__type"].as_str()),
            (400, Some("AccessDeniedException")),
            "{}: {answer}",
            op.name()
        );
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(BOB) && message.contains("is not authorized to perform"),
            "{}: {message}",
            op.name()
        );
        let line = audit_line(&h, &request_id).await;
        assert_eq!(
            (
                line["operation"].as_str(),
                line["outcome"].as_str(),
                line["principal"].as_str()
            ),
            (Some(op.name()), Some("denied"), Some(BOB)),
            "{line}"
        );
        refused.push(op);
    }
    assert_eq!(refused.len(), decided.count());
    assert_eq!(
        refused.len(),
        Op::ALL.iter().filter(|op| !op.xks()).count() - 1,
        "only GetCallerIdentity needs no permission"
    );

    // GetCallerIdentity answers bob, and tells him only who he is.
    let body = request(Op::GetCallerIdentity, &t).to_string();
    let headers = aws_headers(
        &h.aws,
        &target_of(Op::GetCallerIdentity),
        body.as_bytes(),
        Some(BOB_KEY),
        REGION,
        SystemTime::now(),
    );
    let stream = std::net::TcpStream::connect(&h.aws).unwrap();
    let (status, _, answer) = http1_post(stream, &headers, body.as_bytes());
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer,
        json!({"Arn": BOB, "Account": "111122223333", "Region": REGION})
    );

    // The defence held: nothing bob asked for was done.
    assert_eq!(state(&root, &t).await, before);
    let plain = root
        .decrypt()
        .ciphertext_blob(Blob::new(
            base64::engine::general_purpose::STANDARD
                .decode(&t.ciphertext)
                .unwrap(),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(plain.plaintext().unwrap().as_ref(), b"the root's secret");
}
