//! The cryptographic operations over gRPC against real SoftHSM2 tokens: round trips, the
//! encryption context, key states and store connection, DryRun, and bad input of every kind.

mod common;

use std::collections::HashMap;

use common::*;
use hsm_kms::proto::*;
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::TestRunner;

const A: &str = "cluster-alphaclustr";

fn ctx(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn setup() -> (Harness, Client, String, KeyMetadata) {
    let h = Harness::start(&[ClusterSpec::good(A)]).await;
    let mut c = h.client().await;
    let store = h.connected_store(&mut c, 0, "crypto").await;
    let key = create_key(&mut c, &store).await;
    (h, c, store, key)
}

fn dec(blob: &[u8], context: HashMap<String, String>) -> DecryptRequest {
    DecryptRequest {
        ciphertext_blob: blob.to_vec(),
        encryption_context: context,
        ..Default::default()
    }
}

#[tokio::test]
async fn round_trips_and_encryption_context() {
    let (h, mut c, store, key) = setup().await;
    let context = ctx(&[("tenant", "blue"), ("purpose", "test")]);
    let enc = c
        .encrypt(EncryptRequest {
            key_id: key.key_id.clone(),
            plaintext: b"attack at dawn".to_vec(),
            encryption_context: context.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(enc.key_id, key.arn);
    assert_eq!(enc.encryption_algorithm, "SYMMETRIC_DEFAULT");
    assert!(!enc.ciphertext_blob.windows(6).any(|w| w == b"attack"));

    // Decrypt needs no KeyId; with one (id or ARN) it must match.
    let out = c
        .decrypt(dec(&enc.ciphertext_blob, context.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.plaintext, b"attack at dawn");
    assert_eq!(out.key_id, key.arn);
    for id in [key.key_id.clone(), key.arn.clone()] {
        let mut r = dec(&enc.ciphertext_blob, context.clone());
        r.key_id = Some(id);
        assert_eq!(
            c.decrypt(r).await.unwrap().into_inner().plaintext,
            b"attack at dawn"
        );
    }
    let other = create_key(&mut c, &store).await;
    let mut r = dec(&enc.ciphertext_blob, context.clone());
    r.key_id = Some(other.key_id.clone());
    assert_err(c.decrypt(r).await, "IncorrectKeyException");

    // The context is bound: a different, missing or extra pair fails.
    for bad in [
        ctx(&[("tenant", "red"), ("purpose", "test")]),
        ctx(&[("tenant", "blue")]),
        HashMap::new(),
        ctx(&[("tenant", "blue"), ("purpose", "test"), ("x", "y")]),
    ] {
        assert_err(
            c.decrypt(dec(&enc.ciphertext_blob, bad)).await,
            "InvalidCiphertextException",
        );
    }

    // ReEncrypt moves the ciphertext to another key and context.
    let new_ctx = ctx(&[("moved", "yes")]);
    let re = c
        .re_encrypt(ReEncryptRequest {
            ciphertext_blob: enc.ciphertext_blob.clone(),
            source_encryption_context: context.clone(),
            destination_key_id: other.arn.clone(),
            destination_encryption_context: new_ctx.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (re.source_key_id.as_str(), re.key_id.as_str()),
        (key.arn.as_str(), other.arn.as_str())
    );
    let out = c
        .decrypt(dec(&re.ciphertext_blob, new_ctx))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (out.plaintext.as_slice(), out.key_id.as_str()),
        (&b"attack at dawn"[..], other.arn.as_str())
    );
    let r = c
        .re_encrypt(ReEncryptRequest {
            ciphertext_blob: enc.ciphertext_blob.clone(),
            source_encryption_context: context.clone(),
            source_key_id: Some(other.key_id.clone()),
            destination_key_id: other.key_id.clone(),
            ..Default::default()
        })
        .await;
    assert_err(r, "IncorrectKeyException");
    let r = c
        .re_encrypt(ReEncryptRequest {
            ciphertext_blob: enc.ciphertext_blob.clone(),
            destination_key_id: other.key_id.clone(),
            ..Default::default()
        })
        .await;
    assert_err(r, "InvalidCiphertextException");
    drop(h);
}

#[tokio::test]
async fn data_keys_and_random() {
    let (h, mut c, store, key) = setup().await;
    for (spec, n, len) in [
        (Some("AES_256"), None, 32),
        (Some("AES_128"), None, 16),
        (None, Some(1), 1),
        (None, Some(1024), 1024),
    ] {
        let dk = c
            .generate_data_key(GenerateDataKeyRequest {
                key_id: key.key_id.clone(),
                key_spec: spec.map(String::from),
                number_of_bytes: n,
                encryption_context: ctx(&[("k", "v")]),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(dk.plaintext.len(), len);
        assert_eq!(dk.key_id, key.arn);
        let back = c
            .decrypt(dec(&dk.ciphertext_blob, ctx(&[("k", "v")])))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(back.plaintext, dk.plaintext);
    }
    let a = c
        .generate_data_key(GenerateDataKeyRequest {
            key_id: key.arn.clone(),
            key_spec: Some("AES_256".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let b = c
        .generate_data_key(GenerateDataKeyRequest {
            key_id: key.arn.clone(),
            key_spec: Some("AES_256".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(a.plaintext, b.plaintext);

    let w = c
        .generate_data_key_without_plaintext(GenerateDataKeyWithoutPlaintextRequest {
            key_id: key.key_id.clone(),
            key_spec: Some("AES_128".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(w.key_id, key.arn);
    let back = c
        .decrypt(dec(&w.ciphertext_blob, HashMap::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.plaintext.len(), 16);

    // Exactly one of KeySpec and NumberOfBytes, within bounds.
    for (spec, n) in [
        (None, None),
        (Some("AES_256"), Some(32)),
        (Some("AES_512"), None),
        (None, Some(0)),
        (None, Some(1025)),
        (None, Some(-1)),
    ] {
        let r = c
            .generate_data_key(GenerateDataKeyRequest {
                key_id: key.key_id.clone(),
                key_spec: spec.map(String::from),
                number_of_bytes: n,
                ..Default::default()
            })
            .await;
        assert_err(r, "ValidationException");
        let r = c
            .generate_data_key_without_plaintext(GenerateDataKeyWithoutPlaintextRequest {
                key_id: key.key_id.clone(),
                key_spec: spec.map(String::from),
                number_of_bytes: n,
                ..Default::default()
            })
            .await;
        assert_err(r, "ValidationException");
    }

    // GenerateRandom: from the OS, or from the named store's token.
    for store_id in [None, Some(store.clone())] {
        let r = c
            .generate_random(GenerateRandomRequest {
                number_of_bytes: Some(64),
                custom_key_store_id: store_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.plaintext.len(), 64);
        assert!(r.plaintext.iter().any(|b| *b != 0));
    }
    for n in [None, Some(0), Some(1025)] {
        let r = c
            .generate_random(GenerateRandomRequest {
                number_of_bytes: n,
                custom_key_store_id: None,
            })
            .await;
        assert_err(r, "ValidationException");
    }
    let r = c
        .generate_random(GenerateRandomRequest {
            number_of_bytes: Some(8),
            custom_key_store_id: Some("cks-00000000000000000".into()),
        })
        .await;
    assert_err(r, "CustomKeyStoreNotFoundException");
    disconnect(&mut c, &store).await;
    let r = c
        .generate_random(GenerateRandomRequest {
            number_of_bytes: Some(8),
            custom_key_store_id: Some(store),
        })
        .await;
    assert_err(r, "CustomKeyStoreInvalidStateException");
    drop(h);
}

#[tokio::test]
async fn key_state_and_store_conditions() {
    let (h, mut c, store, key) = setup().await;
    let ct = encrypt(&mut c, &key.key_id, b"state").await;
    let enc = |k: &str| EncryptRequest {
        key_id: k.to_string(),
        plaintext: b"x".to_vec(),
        ..Default::default()
    };

    // Disabled: DisabledException on every cryptographic operation.
    c.disable_key(DisableKeyRequest {
        key_id: key.key_id.clone(),
    })
    .await
    .unwrap();
    let m = describe_key(&mut c, &key.key_id).await;
    assert_eq!((m.key_state.as_str(), m.enabled), ("Disabled", false));
    let msg = assert_err(c.encrypt(enc(&key.key_id)).await, "DisabledException");
    assert!(msg.contains(&key.arn), "{msg}");
    assert_err(
        c.decrypt(dec(&ct, HashMap::new())).await,
        "DisabledException",
    );
    let gdk = GenerateDataKeyRequest {
        key_id: key.key_id.clone(),
        key_spec: Some("AES_256".into()),
        ..Default::default()
    };
    assert_err(c.generate_data_key(gdk.clone()).await, "DisabledException");
    c.enable_key(EnableKeyRequest {
        key_id: key.key_id.clone(),
    })
    .await
    .unwrap();
    assert_eq!(describe_key(&mut c, &key.key_id).await.key_state, "Enabled");

    // Store disconnected: keys read Unavailable, crypto is KMSInvalidStateException in AWS's
    // words (key-state.md footnote 11); a disabled key comes back Disabled, an enabled one
    // Enabled.
    let other = create_key(&mut c, &store).await;
    c.disable_key(DisableKeyRequest {
        key_id: other.key_id.clone(),
    })
    .await
    .unwrap();
    disconnect(&mut c, &store).await;
    for k in [&key, &other] {
        let m = describe_key(&mut c, &k.key_id).await;
        assert_eq!((m.key_state.as_str(), m.enabled), ("Unavailable", false));
    }
    let msg = assert_err(
        c.encrypt(enc(&key.key_id)).await,
        "KMSInvalidStateException",
    );
    assert_eq!(msg, format!("{} is unavailable.", key.arn));
    assert_err(
        c.decrypt(dec(&ct, HashMap::new())).await,
        "KMSInvalidStateException",
    );
    assert_err(
        c.generate_data_key(gdk.clone()).await,
        "KMSInvalidStateException",
    );
    let r = c
        .create_key(CreateKeyRequest {
            custom_key_store_id: Some(store.clone()),
            origin: Some("AWS_CLOUDHSM".into()),
            ..Default::default()
        })
        .await;
    assert_err(r, "CustomKeyStoreInvalidStateException");
    assert_eq!(connect(&mut c, &store).await, ("CONNECTED".into(), None));
    assert_eq!(describe_key(&mut c, &key.key_id).await.key_state, "Enabled");
    assert_eq!(
        describe_key(&mut c, &other.key_id).await.key_state,
        "Disabled"
    );
    let out = c
        .decrypt(dec(&ct, HashMap::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.plaintext, b"state");
    drop(h);
}

#[tokio::test]
async fn dry_run() {
    let (h, mut c, _store, key) = setup().await;
    let ct = encrypt(&mut c, &key.key_id, b"dry").await;
    let r = c
        .encrypt(EncryptRequest {
            key_id: key.key_id.clone(),
            plaintext: b"x".to_vec(),
            dry_run: Some(true),
            ..Default::default()
        })
        .await;
    assert_err(r, "DryRunOperationException");
    let mut d = dec(&ct, HashMap::new());
    d.dry_run = Some(true);
    assert_err(c.decrypt(d).await, "DryRunOperationException");
    let r = c
        .generate_data_key(GenerateDataKeyRequest {
            key_id: key.key_id.clone(),
            key_spec: Some("AES_256".into()),
            dry_run: Some(true),
            ..Default::default()
        })
        .await;
    assert_err(r, "DryRunOperationException");
    let r = c
        .generate_data_key_without_plaintext(GenerateDataKeyWithoutPlaintextRequest {
            key_id: key.key_id.clone(),
            number_of_bytes: Some(8),
            dry_run: Some(true),
            ..Default::default()
        })
        .await;
    assert_err(r, "DryRunOperationException");
    let r = c
        .re_encrypt(ReEncryptRequest {
            ciphertext_blob: ct.clone(),
            destination_key_id: key.key_id.clone(),
            dry_run: Some(true),
            ..Default::default()
        })
        .await;
    assert_err(r, "DryRunOperationException");
    // A DryRun of Decrypt and ReEncrypt checks the ciphertext as the real call does: a wrong
    // encryption context or a changed byte is InvalidCiphertextException, not "would succeed".
    let wrong_context = HashMap::from([("purpose".to_string(), "other".to_string())]);
    let mut tampered = ct.clone();
    *tampered.last_mut().unwrap() ^= 1;
    for (blob, ctx) in [(&ct, wrong_context), (&tampered, HashMap::new())] {
        let mut d = dec(blob, ctx.clone());
        d.dry_run = Some(true);
        assert_err(c.decrypt(d).await, "InvalidCiphertextException");
        let r = c
            .re_encrypt(ReEncryptRequest {
                ciphertext_blob: blob.clone(),
                source_encryption_context: ctx,
                destination_key_id: key.key_id.clone(),
                dry_run: Some(true),
                ..Default::default()
            })
            .await;
        assert_err(r, "InvalidCiphertextException");
    }
    // DryRun answers the real error when the call would fail.
    c.disable_key(DisableKeyRequest {
        key_id: key.key_id.clone(),
    })
    .await
    .unwrap();
    let r = c
        .encrypt(EncryptRequest {
            key_id: key.key_id.clone(),
            plaintext: b"x".to_vec(),
            dry_run: Some(true),
            ..Default::default()
        })
        .await;
    assert_err(r, "DisabledException");
    let r = c
        .encrypt(EncryptRequest {
            key_id: "alias/nope".into(),
            plaintext: b"x".to_vec(),
            dry_run: Some(true),
            ..Default::default()
        })
        .await;
    assert_err(r, "NotFoundException");
    drop(h);
}

#[tokio::test]
async fn bad_input_gets_aws_errors() {
    let (h, mut c, _store, key) = setup().await;
    let enc = |k: &str, pt: Vec<u8>| EncryptRequest {
        key_id: k.to_string(),
        plaintext: pt,
        ..Default::default()
    };

    // Plaintext bounds: 1..4096.
    assert_err(
        c.encrypt(enc(&key.key_id, vec![])).await,
        "ValidationException",
    );
    assert_err(
        c.encrypt(enc(&key.key_id, vec![7; 4097])).await,
        "ValidationException",
    );
    let big = c
        .encrypt(enc(&key.key_id, vec![7; 4096]))
        .await
        .unwrap()
        .into_inner()
        .ciphertext_blob;
    assert!(big.len() <= 6144);
    assert_eq!(
        c.decrypt(dec(&big, HashMap::new()))
            .await
            .unwrap()
            .into_inner()
            .plaintext,
        vec![7; 4096]
    );

    // Key references.
    let unknown = "0b0ac0b2-9c8e-4a55-8d2a-2f0c6a1b9e11";
    for (k, name) in [
        (unknown.to_string(), "NotFoundException"),
        ("not-a-key-id".to_string(), "NotFoundException"),
        (
            format!("arn:aws:kms:eu-west-1:111122223333:key/{}", key.key_id),
            "NotFoundException",
        ),
        (
            "arn:aws:kms:us-east-1:111122223333:key/garbage".to_string(),
            "InvalidArnException",
        ),
        ("arn:aws:s3".to_string(), "InvalidArnException"),
        (String::new(), "ValidationException"),
        ("k".repeat(2049), "ValidationException"),
    ] {
        assert_err(c.encrypt(enc(&k, b"x".to_vec())).await, name);
        assert_err(
            c.describe_key(DescribeKeyRequest {
                key_id: k.clone(),
                ..Default::default()
            })
            .await,
            name,
        );
    }

    // Enum strings.
    let mut r = enc(&key.key_id, b"x".to_vec());
    r.encryption_algorithm = Some("AES_GCM".into());
    assert_err(c.encrypt(r).await, "ValidationException");
    let mut r = enc(&key.key_id, b"x".to_vec());
    r.encryption_algorithm = Some("RSAES_OAEP_SHA_256".into());
    assert_err(c.encrypt(r).await, "InvalidKeyUsageException");

    // Ciphertext: bounds, truncation, every single-bit flip class, garbage.
    let ct = encrypt(&mut c, &key.key_id, b"integrity matters").await;
    assert_err(
        c.decrypt(dec(&[], HashMap::new())).await,
        "ValidationException",
    );
    assert_err(
        c.decrypt(dec(&vec![1; 6145], HashMap::new())).await,
        "ValidationException",
    );
    for cut in [1, 10, 29, 30, 45, ct.len() - 1] {
        assert_err(
            c.decrypt(dec(&ct[..cut], HashMap::new())).await,
            "InvalidCiphertextException",
        );
    }
    // Version byte, key id, IV, body and tag.
    for pos in [0, 1, 16, 17, 28, 29, ct.len() - 17, ct.len() - 1] {
        let mut bad = ct.clone();
        bad[pos] ^= 0x01;
        assert_err(
            c.decrypt(dec(&bad, HashMap::new())).await,
            "InvalidCiphertextException",
        );
    }
    let mut runner = TestRunner::deterministic();
    let garbage = proptest::collection::vec(proptest::arbitrary::any::<u8>(), 1..300);
    for _ in 0..64 {
        let bytes = garbage.new_tree(&mut runner).unwrap().current();
        assert_err(
            c.decrypt(dec(&bytes, HashMap::new())).await,
            "InvalidCiphertextException",
        );
    }
    // A well-formed blob for a key that does not exist.
    let mut foreign = ct.clone();
    foreign[1..17].copy_from_slice(uuid_bytes(unknown).as_slice());
    assert_err(
        c.decrypt(dec(&foreign, HashMap::new())).await,
        "InvalidCiphertextException",
    );
    drop(h);
}

fn uuid_bytes(s: &str) -> Vec<u8> {
    hex_to_bytes(&s.replace('-', ""))
}

fn hex_to_bytes(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Property test through the real service: arbitrary plaintexts and contexts round-trip.
#[tokio::test]
async fn arbitrary_plaintexts_and_contexts_round_trip() {
    let (h, mut c, _store, key) = setup().await;
    let mut runner = TestRunner::deterministic();
    let strategy = (
        proptest::collection::vec(proptest::arbitrary::any::<u8>(), 1..=4096),
        proptest::collection::hash_map(".{0,16}", ".{0,16}", 0..6),
    );
    for _ in 0..48 {
        let (pt, context) = strategy.new_tree(&mut runner).unwrap().current();
        let blob = c
            .encrypt(EncryptRequest {
                key_id: key.key_id.clone(),
                plaintext: pt.clone(),
                encryption_context: context.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .ciphertext_blob;
        assert_eq!(blob.len(), pt.len() + 45);
        let out = c.decrypt(dec(&blob, context)).await.unwrap().into_inner();
        assert_eq!(out.plaintext, pt);
    }
    drop(h);
}
