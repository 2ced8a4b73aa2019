//! The AWS KMS protocol against the real binary, driven by the AWS SDK for Rust as an
//! application would drive AWS KMS: every operation, AWS's exceptions and messages,
//! pagination, SigV4 refusals, the default key store, and callers named by access keys.

mod common;

use std::time::{Duration, SystemTime};

use aws_sdk_kms::operation::RequestId;
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{GrantOperation, Tag};
use common::*;

/// How an Encrypt under `key` is refused.
async fn encrypt_refused(c: &aws_sdk_kms::Client, key: &str) -> (String, String) {
    refusal(
        c.encrypt()
            .key_id(key)
            .plaintext(Blob::new(b"x".to_vec()))
            .send()
            .await,
    )
}

#[tokio::test]
async fn every_operation_through_the_aws_sdk() {
    let h = aws_server(&[
        ClusterSpec::good("cluster-awssdkaaaaaa"),
        ClusterSpec::good("cluster-awssdkbbbbbb"),
    ])
    .await;
    let c = sdk(&h, ROOT_KEY);
    let store = aws_connected_store(&h, &c).await;

    // CreateKey without a store: the default store, Origin AWS_CLOUDHSM.
    let created = c
        .create_key()
        .description("sdk")
        .tags(
            Tag::builder()
                .tag_key("team")
                .tag_value("kms")
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let request_id = created.request_id().unwrap().to_string();
    let meta = created.key_metadata().unwrap();
    let (key_id, arn) = (meta.key_id().to_string(), meta.arn().unwrap().to_string());
    assert_eq!(meta.custom_key_store_id(), Some(store.as_str()));
    assert_eq!(meta.origin().unwrap().as_str(), "AWS_CLOUDHSM");
    assert_eq!(meta.aws_account_id(), Some("111122223333"));
    assert_eq!(meta.key_state().unwrap().as_str(), "Enabled");
    assert!(meta.creation_date().unwrap().secs() > 1_700_000_000);
    // x-amzn-RequestId is the id of the request's audit line.
    let line = audit_line(&h, &request_id).await;
    assert_eq!(line["operation"], "CreateKey");
    assert_eq!(line["principal"], ROOT);

    let d = c.describe_key().key_id(&arn).send().await.unwrap();
    assert_eq!(d.key_metadata().unwrap().description(), Some("sdk"));

    // Encrypt / Decrypt / ReEncrypt name the key by ARN and the algorithm.
    let e = c
        .encrypt()
        .key_id(&key_id)
        .plaintext(Blob::new(b"sdk secret".to_vec()))
        .encryption_context("app", "sdk")
        .send()
        .await
        .unwrap();
    assert_eq!(e.key_id(), Some(arn.as_str()));
    assert_eq!(
        e.encryption_algorithm().unwrap().as_str(),
        "SYMMETRIC_DEFAULT"
    );
    let ct = e.ciphertext_blob().unwrap().clone();
    let p = c
        .decrypt()
        .ciphertext_blob(ct.clone())
        .encryption_context("app", "sdk")
        .send()
        .await
        .unwrap();
    assert_eq!(p.plaintext().unwrap().as_ref(), b"sdk secret");
    assert_eq!(p.key_id(), Some(arn.as_str()));
    assert_eq!(
        p.encryption_algorithm().unwrap().as_str(),
        "SYMMETRIC_DEFAULT"
    );
    let (code, _) = refusal(
        c.decrypt()
            .ciphertext_blob(ct.clone())
            .encryption_context("app", "other")
            .send()
            .await,
    );
    assert_eq!(code, "InvalidCiphertextException");
    let second = c.create_key().send().await.unwrap();
    let arn2 = second.key_metadata().unwrap().arn().unwrap().to_string();
    let r = c
        .re_encrypt()
        .ciphertext_blob(ct)
        .source_encryption_context("app", "sdk")
        .destination_key_id(&arn2)
        .send()
        .await
        .unwrap();
    assert_eq!(r.source_key_id(), Some(arn.as_str()));
    assert_eq!(r.key_id(), Some(arn2.as_str()));
    let p = c
        .decrypt()
        .ciphertext_blob(r.ciphertext_blob().unwrap().clone())
        .send()
        .await
        .unwrap();
    assert_eq!(p.plaintext().unwrap().as_ref(), b"sdk secret");

    // Data keys and randomness.
    let dk = c
        .generate_data_key()
        .key_id(&key_id)
        .key_spec(aws_sdk_kms::types::DataKeySpec::Aes256)
        .send()
        .await
        .unwrap();
    assert_eq!(dk.plaintext().unwrap().as_ref().len(), 32);
    assert_eq!(dk.key_id(), Some(arn.as_str()));
    let back = c
        .decrypt()
        .ciphertext_blob(dk.ciphertext_blob().unwrap().clone())
        .send()
        .await
        .unwrap();
    assert_eq!(back.plaintext(), dk.plaintext());
    let wp = c
        .generate_data_key_without_plaintext()
        .key_id(&key_id)
        .number_of_bytes(16)
        .send()
        .await
        .unwrap();
    assert!(wp.ciphertext_blob().is_some());
    let random = c
        .generate_random()
        .number_of_bytes(24)
        .send()
        .await
        .unwrap();
    assert_eq!(random.plaintext().unwrap().as_ref().len(), 24);

    // Listing and pagination: three keys, one per page.
    c.create_key().send().await.unwrap();
    let mut seen = Vec::new();
    let mut marker = None;
    loop {
        let page = c
            .list_keys()
            .limit(1)
            .set_marker(marker)
            .send()
            .await
            .unwrap();
        seen.extend(page.keys().iter().map(|k| k.key_arn().unwrap().to_string()));
        if !page.truncated() {
            break;
        }
        marker = page.next_marker().map(str::to_string);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    let (code, _) = refusal(c.list_keys().marker("not-a-marker").send().await);
    assert_eq!(code, "InvalidMarkerException");

    // Tags, description, enable and disable.
    c.tag_resource()
        .key_id(&key_id)
        .tags(
            Tag::builder()
                .tag_key("env")
                .tag_value("test")
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    c.untag_resource()
        .key_id(&key_id)
        .tag_keys("team")
        .send()
        .await
        .unwrap();
    let tags = c.list_resource_tags().key_id(&key_id).send().await.unwrap();
    let keys: Vec<&str> = tags.tags().iter().map(|t| t.tag_key()).collect();
    assert_eq!(keys, ["env"]);
    c.update_key_description()
        .key_id(&key_id)
        .description("renamed")
        .send()
        .await
        .unwrap();
    c.disable_key().key_id(&key_id).send().await.unwrap();
    let (code, message) = encrypt_refused(&c, &key_id).await;
    assert_eq!(
        (code.as_str(), message),
        ("DisabledException", format!("{arn} is disabled."))
    );
    c.enable_key().key_id(&key_id).send().await.unwrap();

    // Aliases, with their dates.
    c.create_alias()
        .alias_name("alias/sdk")
        .target_key_id(&key_id)
        .send()
        .await
        .unwrap();
    c.update_alias()
        .alias_name("alias/sdk")
        .target_key_id(&arn2)
        .send()
        .await
        .unwrap();
    let aliases = c.list_aliases().key_id(&arn2).send().await.unwrap();
    let a = &aliases.aliases()[0];
    assert_eq!(a.alias_name(), Some("alias/sdk"));
    assert!(a.creation_date().is_some() && a.last_updated_date().is_some());
    c.delete_alias()
        .alias_name("alias/sdk")
        .send()
        .await
        .unwrap();
    let (code, message) = refusal(
        c.create_alias()
            .alias_name("sdk")
            .target_key_id(&key_id)
            .send()
            .await,
    );
    assert_eq!(code, "ValidationException", "{message}");

    // Key policies.
    let policy = c.get_key_policy().key_id(&key_id).send().await.unwrap();
    let usage = c.get_key_last_usage().key_id(&key_id).send().await.unwrap();
    assert!(usage.tracking_start_date().is_some());
    assert_eq!(policy.policy_name(), Some("default"));
    c.put_key_policy()
        .key_id(&key_id)
        .policy(policy.policy().unwrap())
        .send()
        .await
        .unwrap();
    let names = c.list_key_policies().key_id(&key_id).send().await.unwrap();
    assert_eq!(names.policy_names(), ["default"]);

    // Grants: bob's access key names bob; a grant lets him decrypt, a revoke stops him.
    let bob = sdk(&h, BOB_KEY);
    let ct = c
        .encrypt()
        .key_id(&key_id)
        .plaintext(Blob::new(b"for bob".to_vec()))
        .send()
        .await
        .unwrap()
        .ciphertext_blob
        .unwrap();
    let (code, _) = refusal(bob.decrypt().ciphertext_blob(ct.clone()).send().await);
    assert_eq!(code, "AccessDeniedException");
    let grant = c
        .create_grant()
        .key_id(&key_id)
        .grantee_principal(BOB)
        .retiring_principal(BOB)
        .operations(GrantOperation::Decrypt)
        .send()
        .await
        .unwrap();
    let grant_id = grant.grant_id().unwrap().to_string();
    let plain = bob
        .decrypt()
        .ciphertext_blob(ct.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(plain.plaintext().unwrap().as_ref(), b"for bob");
    let line = audit_line(&h, plain.request_id().unwrap()).await;
    assert_eq!(
        (line["principal"].as_str(), line["outcome"].as_str()),
        (Some(BOB), Some("allowed"))
    );
    let grants = c.list_grants().key_id(&key_id).send().await.unwrap();
    let g = &grants.grants()[0];
    assert_eq!(g.grant_id(), Some(grant_id.as_str()));
    assert!(g.creation_date().is_some());
    let retirable = c
        .list_retirable_grants()
        .retiring_principal(BOB)
        .send()
        .await
        .unwrap();
    assert_eq!(retirable.grants().len(), 1);
    bob.retire_grant()
        .key_id(&arn)
        .grant_id(&grant_id)
        .send()
        .await
        .unwrap();
    let (code, _) = refusal(bob.decrypt().ciphertext_blob(ct.clone()).send().await);
    assert_eq!(code, "AccessDeniedException");
    let again = c
        .create_grant()
        .key_id(&key_id)
        .grantee_principal(BOB)
        .operations(GrantOperation::Decrypt)
        .send()
        .await
        .unwrap();
    c.revoke_grant()
        .key_id(&key_id)
        .grant_id(again.grant_id().unwrap())
        .send()
        .await
        .unwrap();

    // Deletion: scheduled (ARN, state and window answered), refused while pending,
    // cancelled.
    let s = c
        .schedule_key_deletion()
        .key_id(&key_id)
        .pending_window_in_days(7)
        .send()
        .await
        .unwrap();
    assert_eq!(s.key_id(), Some(arn.as_str()));
    assert_eq!(s.key_state().unwrap().as_str(), "PendingDeletion");
    assert_eq!(s.pending_window_in_days(), Some(7));
    assert!(s.deletion_date().is_some());
    let (code, message) = encrypt_refused(&c, &key_id).await;
    assert_eq!(
        (code.as_str(), message),
        (
            "KMSInvalidStateException",
            format!("{arn} is pending deletion.")
        )
    );
    let cancelled = c
        .cancel_key_deletion()
        .key_id(&key_id)
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.key_id(), Some(arn.as_str()));

    // Not found, in AWS's words.
    let missing = arn.replace(&key_id, "00000000-0000-4000-8000-000000000000");
    let (code, message) = refusal(c.describe_key().key_id(&missing).send().await);
    assert_eq!(
        (code.as_str(), message),
        (
            "NotFoundException",
            format!("Key '{missing}' does not exist")
        )
    );

    // The second store's whole life: create, update, connect, disconnect, delete.
    let other = c
        .create_custom_key_store()
        .custom_key_store_name("other")
        .cloud_hsm_cluster_id(&h.cluster(1).id)
        .trust_anchor_certificate(&h.anchors[1])
        .key_store_password(PASSWORD)
        .send()
        .await
        .unwrap()
        .custom_key_store_id
        .unwrap();
    c.update_custom_key_store()
        .custom_key_store_id(&other)
        .new_custom_key_store_name("other-renamed")
        .send()
        .await
        .unwrap();
    c.connect_custom_key_store()
        .custom_key_store_id(&other)
        .send()
        .await
        .unwrap();
    c.disconnect_custom_key_store()
        .custom_key_store_id(&other)
        .send()
        .await
        .unwrap();
    c.delete_custom_key_store()
        .custom_key_store_id(&other)
        .send()
        .await
        .unwrap();
    let (code, _) = refusal(
        c.describe_custom_key_stores()
            .custom_key_store_name("other-renamed")
            .send()
            .await,
    );
    assert_eq!(code, "CustomKeyStoreNotFoundException");

    // Every operation went over the AWS protocol and is in the audit trail.
    let lines = audit_lines(&h);
    // (hsm-kms's own operations are not in the SDK: tests/console.rs and
    // `hsm_kms_own_operations` below call them.)
    for op in hsm_kms::model::op::Op::served().filter(|op| !op.extension()) {
        assert!(
            lines.iter().any(|l| l["operation"] == op.name()),
            "no audit line for {}",
            op.name()
        );
    }
}

/// The operations of the AWS API that a key in a CloudHSM key store cannot do are answered
/// as AWS answers them for such a key, through the SDK as terraform or an application would
/// call them: after NotFoundException for a key that does not exist and the key-state table,
/// UnsupportedOperationException or InvalidKeyUsageException in AWS's words (recorded
/// templates: see `model::op::Unserved`).
#[tokio::test]
async fn unserved_operations_answer_as_aws_does_for_a_key_in_a_cloudhsm_key_store() {
    use aws_sdk_kms::types::{
        AlgorithmSpec, DataKeyPairSpec, KeyAgreementAlgorithmSpec, MacAlgorithmSpec,
        SigningAlgorithmSpec, WrappingKeySpec,
    };
    let h = aws_server(&[ClusterSpec::good("cluster-awsunservedn")]).await;
    let c = sdk(&h, ROOT_KEY);
    let key = aws_connected_key(&h, &c).await;
    let arn = c
        .describe_key()
        .key_id(&key)
        .send()
        .await
        .unwrap()
        .key_metadata
        .unwrap()
        .arn
        .unwrap();
    let blob = || Blob::new(b"0123456789abcdef".to_vec());
    let origin = (
        "UnsupportedOperationException".to_string(),
        format!("{arn} origin is AWS_CLOUDHSM which is not valid for this operation."),
    );
    let usage = |op: &str| {
        (
            "InvalidKeyUsageException".to_string(),
            format!("{arn} key usage is ENCRYPT_DECRYPT which is not valid for {op}."),
        )
    };
    let region = (
        "UnsupportedOperationException".to_string(),
        format!("{arn} is not a multi-region primary key."),
    );
    let k = key.as_str();
    let answers = [
        (
            "GetKeyRotationStatus",
            refusal(c.get_key_rotation_status().key_id(k).send().await),
            origin.clone(),
        ),
        (
            "EnableKeyRotation",
            refusal(c.enable_key_rotation().key_id(k).send().await),
            origin.clone(),
        ),
        (
            "DisableKeyRotation",
            refusal(c.disable_key_rotation().key_id(k).send().await),
            origin.clone(),
        ),
        (
            "RotateKeyOnDemand",
            refusal(c.rotate_key_on_demand().key_id(k).send().await),
            origin.clone(),
        ),
        (
            "ListKeyRotations",
            refusal(c.list_key_rotations().key_id(k).send().await),
            origin.clone(),
        ),
        (
            "GenerateDataKeyPair",
            refusal(
                c.generate_data_key_pair()
                    .key_id(k)
                    .key_pair_spec(DataKeyPairSpec::Rsa2048)
                    .send()
                    .await,
            ),
            origin.clone(),
        ),
        (
            "GenerateDataKeyPairWithoutPlaintext",
            refusal(
                c.generate_data_key_pair_without_plaintext()
                    .key_id(k)
                    .key_pair_spec(DataKeyPairSpec::EccNistP256)
                    .send()
                    .await,
            ),
            origin.clone(),
        ),
        (
            "GetParametersForImport",
            refusal(
                c.get_parameters_for_import()
                    .key_id(k)
                    .wrapping_algorithm(AlgorithmSpec::RsaesOaepSha256)
                    .wrapping_key_spec(WrappingKeySpec::Rsa2048)
                    .send()
                    .await,
            ),
            origin.clone(),
        ),
        (
            "ImportKeyMaterial",
            refusal(
                c.import_key_material()
                    .key_id(k)
                    .import_token(blob())
                    .encrypted_key_material(blob())
                    .send()
                    .await,
            ),
            origin.clone(),
        ),
        (
            "DeleteImportedKeyMaterial",
            refusal(c.delete_imported_key_material().key_id(k).send().await),
            origin.clone(),
        ),
        (
            "Sign",
            refusal(
                c.sign()
                    .key_id(k)
                    .message(blob())
                    .signing_algorithm(SigningAlgorithmSpec::RsassaPssSha256)
                    .send()
                    .await,
            ),
            usage("Sign"),
        ),
        (
            "Verify",
            refusal(
                c.verify()
                    .key_id(k)
                    .message(blob())
                    .signature(blob())
                    .signing_algorithm(SigningAlgorithmSpec::RsassaPssSha256)
                    .send()
                    .await,
            ),
            usage("Verify"),
        ),
        (
            "GetPublicKey",
            refusal(c.get_public_key().key_id(k).send().await),
            usage("GetPublicKey"),
        ),
        (
            "GenerateMac",
            refusal(
                c.generate_mac()
                    .key_id(k)
                    .message(blob())
                    .mac_algorithm(MacAlgorithmSpec::HmacSha256)
                    .send()
                    .await,
            ),
            usage("GenerateMac"),
        ),
        (
            "VerifyMac",
            refusal(
                c.verify_mac()
                    .key_id(k)
                    .message(blob())
                    .mac(blob())
                    .mac_algorithm(MacAlgorithmSpec::HmacSha256)
                    .send()
                    .await,
            ),
            usage("VerifyMac"),
        ),
        (
            "DeriveSharedSecret",
            refusal(
                c.derive_shared_secret()
                    .key_id(k)
                    .key_agreement_algorithm(KeyAgreementAlgorithmSpec::Ecdh)
                    .public_key(blob())
                    .send()
                    .await,
            ),
            usage("DeriveSharedSecret"),
        ),
        (
            "ReplicateKey",
            refusal(
                c.replicate_key()
                    .key_id(k)
                    .replica_region("eu-west-1")
                    .send()
                    .await,
            ),
            region.clone(),
        ),
        (
            "UpdatePrimaryRegion",
            refusal(
                c.update_primary_region()
                    .key_id(k)
                    .primary_region("eu-west-1")
                    .send()
                    .await,
            ),
            region.clone(),
        ),
    ];
    for (op, got, want) in &answers {
        assert_eq!(got, want, "{op}");
    }
    // Every unserved operation was sent.
    assert_eq!(
        answers.len(),
        hsm_kms::model::op::Op::ALL
            .iter()
            .filter(|op| op.unserved().is_some())
            .count()
    );

    // A key that does not exist: NotFoundException first, as for any operation on a key.
    let missing = "11111111-2222-3333-4444-555555555555";
    let (code, _) = refusal(c.get_key_rotation_status().key_id(missing).send().await);
    assert_eq!(code, "NotFoundException");
    // The key-state table before the refusal of the operation: a disabled key.
    c.disable_key().key_id(k).send().await.unwrap();
    let (code, message) = refusal(
        c.sign()
            .key_id(k)
            .message(blob())
            .signing_algorithm(SigningAlgorithmSpec::RsassaPssSha256)
            .send()
            .await,
    );
    assert_eq!(
        (code.as_str(), message),
        ("DisabledException", format!("{arn} is disabled."))
    );
    // A required member missing: AWS's validation text.
    let (code, message) = refusal(c.get_key_rotation_status().send().await);
    assert_eq!(code, "ValidationException", "{message}");

    // Each was recorded, refused, under its own name.
    let lines = audit_lines(&h);
    for (op, _, _) in &answers {
        assert!(
            lines
                .iter()
                .any(|l| l["operation"] == *op && l["outcome"] == "failed"),
            "no audit line for {op}"
        );
    }
}

/// GetKeyLastUsage through the SDK: nothing before the first use, then the last successful
/// cryptographic operation with the request id the caller was answered with (the audit
/// line's), never a refused one; kept across a restart.
#[tokio::test]
async fn get_key_last_usage_reports_the_last_successful_use() {
    let mut h = aws_server(&[ClusterSpec::good("cluster-awslastusage")]).await;
    let c = sdk(&h, ROOT_KEY);
    let key = aws_connected_key(&h, &c).await;
    let fresh = c.get_key_last_usage().key_id(&key).send().await.unwrap();
    assert!(fresh.key_last_usage().is_none(), "{fresh:?}");
    assert!(fresh.key_id().unwrap().ends_with(&key));
    // Made after tracking began: tracking starts at the key's creation.
    assert_eq!(fresh.tracking_start_date(), fresh.key_creation_date());

    let sealed = c
        .encrypt()
        .key_id(&key)
        .plaintext(Blob::new(b"used".to_vec()))
        .send()
        .await
        .unwrap();
    let used = c.get_key_last_usage().key_id(&key).send().await.unwrap();
    let last = used.key_last_usage().expect("a use after Encrypt");
    assert_eq!(last.operation().unwrap().as_str(), "Encrypt");
    assert_eq!(last.kms_request_id(), sealed.request_id());
    assert_eq!(last.cloud_trail_event_id(), sealed.request_id());
    let audit = audit_line(&h, sealed.request_id().unwrap()).await;
    assert_eq!(audit["operation"], "Encrypt");
    let at = last.timestamp().unwrap().secs();
    assert!(at >= fresh.key_creation_date().unwrap().secs(), "{at}");

    let opened = c
        .decrypt()
        .ciphertext_blob(sealed.ciphertext_blob().unwrap().clone())
        .send()
        .await
        .unwrap();
    // A refused use changes nothing: the key disabled, Encrypt fails.
    c.disable_key().key_id(&key).send().await.unwrap();
    encrypt_refused(&c, &key).await;
    let after = |r: aws_sdk_kms::operation::get_key_last_usage::GetKeyLastUsageOutput| {
        let l = r.key_last_usage().unwrap().clone();
        (
            l.operation().unwrap().as_str().to_string(),
            l.kms_request_id().unwrap().to_string(),
        )
    };
    let last = after(c.get_key_last_usage().key_id(&key).send().await.unwrap());
    assert_eq!(
        last,
        (
            "Decrypt".to_string(),
            opened.request_id().unwrap().to_string()
        )
    );
    // Written at shutdown at the latest: a restart keeps it.
    h.restart_with(|_| {}).await;
    let c = sdk(&h, ROOT_KEY);
    assert_eq!(
        after(c.get_key_last_usage().key_id(&key).send().await.unwrap()),
        last
    );
    let (code, _) = refusal(
        c.get_key_last_usage()
            .key_id("11111111-2222-3333-4444-555555555555")
            .send()
            .await,
    );
    assert_eq!(code, "NotFoundException");
}

/// Messages recorded from real AWS (LocalStack's snapshot of its KMS tests, recorded
/// against AWS), answered word for word.
#[tokio::test]
async fn messages_recorded_from_aws_are_answered_word_for_word() {
    let h = aws_server(&[ClusterSpec::good("cluster-awswordsaaaa")]).await;
    let c = sdk(&h, ROOT_KEY);
    let key = aws_connected_key(&h, &c).await;
    let other = c
        .create_key()
        .send()
        .await
        .unwrap()
        .key_metadata
        .unwrap()
        .key_id;
    let tag = |k: &str, v: &str| Tag::builder().tag_key(k).tag_value(v).build().unwrap();
    let tags = |list: Vec<Tag>| c.tag_resource().key_id(&key).set_tags(Some(list));
    let answer = |r: (String, String)| r;
    let long = "k".repeat(129);
    let cases = [
        (
            answer(refusal(tags(vec![tag("aws:x", "v")]).send().await)),
            (
                "TagException",
                "Tags beginning with aws: are reserved".to_string(),
            ),
        ),
        (
            answer(refusal(
                tags(vec![tag("d", "1"), tag("d", "2")]).send().await,
            )),
            ("TagException", "Duplicate tag keys".to_string()),
        ),
        (
            answer(refusal(
                c.create_key()
                    .set_tags(Some((0..51).map(|i| tag(&format!("k{i}"), "v")).collect()))
                    .send()
                    .await,
            )),
            ("TagException", "Too many tags".to_string()),
        ),
        (
            answer(refusal(tags(vec![tag(&long, "v")]).send().await)),
            (
                "ValidationException",
                format!(
                    "1 validation error detected: Value '{long}' at 'tags.1.member.tagKey' \
                     failed to satisfy constraint: Member must have length less than or equal \
                     to 128"
                ),
            ),
        ),
        (
            answer(refusal(
                c.encrypt()
                    .key_id(&key)
                    .plaintext(Blob::new(b"x".to_vec()))
                    .dry_run(true)
                    .send()
                    .await,
            )),
            (
                "DryRunOperationException",
                "The request would have succeeded, but the DryRun option is set.".to_string(),
            ),
        ),
        (
            answer(refusal(c.generate_random().send().await)),
            (
                "ValidationException",
                "NumberOfBytes is required.".to_string(),
            ),
        ),
        (
            answer(refusal(
                c.describe_key()
                    .key_id(format!("arn:aws:kms:eu-west-1:111122223333:key/{key}"))
                    .send()
                    .await,
            )),
            ("NotFoundException", "Invalid arn eu-west-1".to_string()),
        ),
    ];
    for (got, (code, message)) in cases {
        assert_eq!(got, (code.to_string(), message));
    }
    let sealed = c
        .encrypt()
        .key_id(&key)
        .plaintext(Blob::new(b"x".to_vec()))
        .send()
        .await
        .unwrap();
    let got = refusal(
        c.decrypt()
            .key_id(&other)
            .ciphertext_blob(sealed.ciphertext_blob().unwrap().clone())
            .send()
            .await,
    );
    assert_eq!(
        got,
        (
            "IncorrectKeyException".to_string(),
            "The key ID in the request does not identify a CMK that can perform this operation."
                .to_string()
        )
    );
}

/// Without `kms.default_custom_key_store`, CreateKey that names no store is refused with
/// UnsupportedOperationException saying what to set.
#[tokio::test]
async fn create_key_without_a_default_store_says_how_to_set_one() {
    let h = aws_server(&[ClusterSpec::good("cluster-awsdefaultnn")]).await;
    let mut h = h;
    h.restart_with(|s| s.kms.default_custom_key_store = None)
        .await;
    let c = sdk(&h, ROOT_KEY);
    let (code, message) = refusal(c.create_key().send().await);
    assert_eq!(code, "UnsupportedOperationException");
    assert!(message.contains("default_custom_key_store"), "{message}");
}

/// A request signed the way the SDK signs it, sent over HTTP/1.1; `body_sent` replaces the
/// body after signing (a tampered request).
fn raw_post(
    h: &Harness,
    target: &str,
    body: &str,
    key: Option<(&str, &str)>,
    region: &str,
    at: SystemTime,
    body_sent: Option<&str>,
) -> AwsAnswer {
    let headers = aws_headers(&h.aws, target, body.as_bytes(), key, region, at);
    let stream = std::net::TcpStream::connect(&h.aws).unwrap();
    http1_post(stream, &headers, body_sent.unwrap_or(body).as_bytes())
}

#[tokio::test]
async fn sigv4_refusals_are_aws_exceptions_with_audit_lines() {
    let h = aws_server(&[ClusterSpec::good("cluster-awssigvaaaaa")]).await;
    let now = SystemTime::now();

    // The SDK with a wrong secret, an unknown key, another region.
    let (code, _) = refusal(
        sdk(&h, (ROOT_KEY.0, "wrong-secret"))
            .list_keys()
            .send()
            .await,
    );
    assert_eq!(code, "InvalidSignatureException");
    let (code, _) = refusal(
        sdk(&h, ("AKIAUNKNOWNUNKNOWN00", "x"))
            .list_keys()
            .send()
            .await,
    );
    assert_eq!(code, "UnrecognizedClientException");
    let (code, message) = refusal(sdk_in(&h, ROOT_KEY, "eu-west-1").list_keys().send().await);
    assert_eq!(code, "InvalidSignatureException");
    assert!(message.contains("eu-west-1"), "{message}");

    // Unsigned, signed too long ago, and a body changed after signing.
    let (status, headers, body) = raw_post(&h, "ListKeys", "{}", None, REGION, now, None);
    assert_eq!(
        (status, body["__type"].as_str()),
        (400, Some("MissingAuthenticationTokenException"))
    );
    let unsigned_id = headers["x-amzn-requestid"].clone();
    let old = now - Duration::from_secs(6 * 60);
    let (status, _, body) = raw_post(&h, "ListKeys", "{}", Some(ROOT_KEY), REGION, old, None);
    assert_eq!(
        (status, body["__type"].as_str()),
        (400, Some("InvalidSignatureException"))
    );
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("Signature expired"),
        "{body}"
    );
    let good = r#"{"Limit":1}"#;
    let (status, _, body) = raw_post(&h, "ListKeys", good, Some(ROOT_KEY), REGION, now, None);
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = raw_post(
        &h,
        "ListKeys",
        good,
        Some(ROOT_KEY),
        REGION,
        now,
        Some(r#"{"Limit":2}"#),
    );
    assert_eq!(
        (status, body["__type"].as_str()),
        (400, Some("InvalidSignatureException"))
    );

    // Each refusal has its audit line, with no principal.
    let line = audit_line(&h, &unsigned_id).await;
    assert_eq!(line["error"], "MissingAuthenticationTokenException");
    assert!(line["principal"].is_null(), "{line}");
    let refused = audit_lines(&h)
        .iter()
        .filter(|l| l["error"] == "InvalidSignatureException")
        .count();
    // The wrong secret, another region, the expired and the tampered request.
    assert_eq!(refused, 4, "InvalidSignatureException lines");
    assert!(!std::fs::read_to_string(h.log_path())
        .unwrap()
        .contains(ROOT_KEY.1));
}

#[tokio::test]
async fn protocol_errors_are_answered_as_aws_answers_them() {
    let h = aws_server(&[ClusterSpec::good("cluster-awsprotoaaaa")]).await;
    let now = SystemTime::now();
    let post =
        |target: &str, body: &str| raw_post(&h, target, body, Some(ROOT_KEY), REGION, now, None);

    let (status, _, body) = post("NoSuchOperation", "{}");
    assert_eq!(
        (status, body["__type"].as_str()),
        (400, Some("UnknownOperationException"))
    );
    let (status, _, body) = post("ListKeys", "{not json");
    assert_eq!(
        (status, body["__type"].as_str()),
        (400, Some("SerializationException"))
    );
    let (status, _, body) = post("ListKeys", r#"{"Limit":"ten"}"#);
    assert_eq!(
        (status, body["__type"].as_str()),
        (400, Some("SerializationException"))
    );
    let (status, _, body) = post("DescribeKey", "{}");
    assert_eq!(
        (status, body["__type"].as_str()),
        (400, Some("ValidationException"))
    );
    assert_eq!(
        body["message"],
        "1 validation error detected: Value null at 'keyId' failed to satisfy constraint: \
         Member must not be null"
    );
    // A member AWS has and hsm-kms does not: refused, not silently ignored.
    let (status, _, body) = post("GenerateRandom", r#"{"NumberOfBytes":8,"Recipient":{}}"#);
    assert_eq!(
        (status, body["__type"].as_str()),
        (400, Some("UnsupportedOperationException"))
    );
    // Limits are the server's: a Limit over 1000 and a 4097-byte plaintext.
    let (status, _, body) = post("ListKeys", r#"{"Limit":1001}"#);
    assert_eq!(
        (status, body["__type"].as_str()),
        (400, Some("ValidationException")),
        "{body}"
    );
    let big = base64_of(&vec![0u8; 4097]);
    let (status, _, body) = post(
        "Encrypt",
        &format!(r#"{{"KeyId":"alias/x","Plaintext":"{big}"}}"#),
    );
    assert_eq!(
        (status, body["__type"].as_str()),
        (400, Some("ValidationException")),
        "{body}"
    );
    // An empty output is `{}`, and absent members are left out, never null.
    let (status, headers, body) = post("ListAliases", "{}");
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/x-amz-json-1.1");
    assert_eq!(body, serde_json::json!({"Aliases": [], "Truncated": false}));
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// HTTP/2 with prior knowledge on the plaintext listener, as some SDKs speak it.
#[tokio::test]
async fn http2_requests_are_served() {
    let h = aws_server(&[ClusterSpec::good("cluster-awshttp2aaaa")]).await;
    let tcp = tokio::net::TcpStream::connect(&h.aws).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    // Signed over HTTP/2: the host is the request's authority, not a header.
    let body = br#"{"NumberOfBytes":16}"#;
    let headers = aws_headers(
        &h.aws,
        "GenerateRandom",
        body,
        Some(ROOT_KEY),
        REGION,
        SystemTime::now(),
    );
    let mut request = http::Request::post(format!("http://{}/", h.aws));
    for (n, v) in headers.iter().filter(|(n, _)| n != "host") {
        request = request.header(n, v);
    }
    let (response, mut stream) = send.send_request(request.body(()).unwrap(), false).unwrap();
    stream
        .send_data(bytes::Bytes::from_static(body), true)
        .unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        data.extend_from_slice(&chunk.unwrap());
    }
    let v: serde_json::Value = serde_json::from_slice(&data).unwrap();
    assert_eq!(v["Plaintext"].as_str().unwrap().len(), 24, "{v}");
}

/// hsm-kms's own operations (the console's): under `HsmKms.` only, signed like any other,
/// authorized by their declared permissions, and answering what they say.
#[tokio::test]
async fn hsm_kms_own_operations() {
    let h = aws_server(&[ClusterSpec::good("cluster-awsownopsab")]).await;
    let c = sdk(&h, ROOT_KEY);
    let key = aws_connected_key(&h, &c).await;
    let now = SystemTime::now;
    let call =
        |target: &str, body: &str, who| raw_post(&h, target, body, Some(who), REGION, now(), None);

    // Who the caller is: bob needs no permission for that.
    let (status, _, me) = call("HsmKms.GetCallerIdentity", "{}", BOB_KEY);
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["Arn"], BOB);
    assert_eq!(me["Region"], REGION);
    // Neither prefix reaches the other's operations.
    let (status, _, e) = call("TrentService.GetCallerIdentity", "{}", ROOT_KEY);
    assert_eq!(
        (status, e["__type"].as_str()),
        (400, Some("UnknownOperationException"))
    );
    let (_, _, e) = call("HsmKms.ListKeys", "{}", ROOT_KEY);
    assert_eq!(e["__type"], "UnknownOperationException");
    // Unsigned: refused before anything.
    let (_, _, e) = raw_post(
        &h,
        "HsmKms.GetCallerIdentity",
        "{}",
        None,
        REGION,
        now(),
        None,
    );
    assert_eq!(e["__type"], "MissingAuthenticationTokenException", "{e}");

    // Store health counts the store's cryptographic requests on this replica.
    let store = store_id_named(&c, STORE).await;
    let health = |who| {
        let (status, _, h) = call(
            "HsmKms.DescribeCustomKeyStoreHealth",
            &format!("{{\"CustomKeyStoreId\":\"{store}\"}}"),
            who,
        );
        (status, h)
    };
    let (status, before) = health(ROOT_KEY);
    assert_eq!(status, 200, "{before}");
    let entry = &before["CustomKeyStores"][0];
    assert_eq!(entry["CustomKeyStoreName"], STORE);
    assert_eq!(
        (entry["ConnectionState"].as_str(), entry["Health"].as_str()),
        (Some("CONNECTED"), Some("HEALTHY"))
    );
    let count = |v: &serde_json::Value| v["CustomKeyStores"][0]["Requests"].as_u64().unwrap_or(0);
    for _ in 0..3 {
        c.encrypt()
            .key_id(&key)
            .plaintext(Blob::new(b"counted".to_vec()))
            .send()
            .await
            .unwrap();
    }
    let (_, after) = health(ROOT_KEY);
    assert_eq!(count(&after), count(&before) + 3, "{before} {after}");
    let metric = metric(
        &h.metrics(),
        &format!("hsm_kms_store_requests_total{{custom_key_store_id=\"{store}\"}}"),
    );
    assert_eq!(metric, Some(count(&after) as f64));
    // Bob has no kms:DescribeCustomKeyStoreHealth.
    let (status, denied) = health(BOB_KEY);
    assert_eq!(
        (status, denied["__type"].as_str()),
        (400, Some("AccessDeniedException")),
        "{denied}"
    );
    assert!(denied["message"]
        .as_str()
        .unwrap()
        .contains("kms:DescribeCustomKeyStoreHealth"));
    // An unknown store is NotFound, as DescribeCustomKeyStores says it.
    let (_, _, e) = call(
        "HsmKms.DescribeCustomKeyStoreHealth",
        "{\"CustomKeyStoreId\":\"cks-0000000000000000a\"}",
        ROOT_KEY,
    );
    assert_eq!(e["__type"], "CustomKeyStoreNotFoundException", "{e}");

    // A key's newest audit lines, newest first; bob's key policy gives him none.
    let body = format!("{{\"KeyId\":\"{key}\",\"Limit\":3}}");
    let (status, _, events) = call("HsmKms.ListKeyAuditEvents", &body, ROOT_KEY);
    assert_eq!(status, 200, "{events}");
    let ops: Vec<&str> = events["Events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Operation"].as_str().unwrap())
        .collect();
    assert_eq!(ops, ["Encrypt", "Encrypt", "Encrypt"], "{events}");
    assert_eq!(events["Events"][0]["Principal"], ROOT);
    assert_eq!(events["Events"][0]["Outcome"], "allowed");
    let (_, _, e) = call("HsmKms.ListKeyAuditEvents", &body, BOB_KEY);
    assert_eq!(e["__type"], "AccessDeniedException", "{e}");
    let (_, _, e) = call(
        "HsmKms.ListKeyAuditEvents",
        &format!("{{\"KeyId\":\"{key}\",\"Limit\":101}}"),
        ROOT_KEY,
    );
    assert_eq!(e["__type"], "ValidationException", "{e}");

    // The same operations over gRPC.
    let mut g = h.client().await;
    let me = g
        .get_caller_identity(hsm_kms::proto::GetCallerIdentityRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(me.arn, "arn:aws:iam::111122223333:root");
}
