//! A bounded soak: mixed concurrent operations over several keys in two stores, every
//! response checked. Short by default (CI); longer on demand:
//! `HSM_KMS_SOAK_SECONDS=600 cargo test --release --test soak -- --nocapture`.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use hsm_kms::proto::*;

const A: &str = "cluster-soakaaaaaaaa";
const B: &str = "cluster-soakbbbbbbbb";
const WORKERS: usize = 8;
const KINDS: [&str; 7] = [
    "Encrypt+Decrypt",
    "GenerateDataKey",
    "ReEncrypt",
    "DescribeKey",
    "GenerateRandom",
    "Decrypt(wrong context)",
    "TagResource",
];

fn context(w: usize, n: usize) -> HashMap<String, String> {
    [
        ("worker".to_string(), w.to_string()),
        ("n".to_string(), n.to_string()),
    ]
    .into()
}

async fn decrypt(c: &mut Client, blob: Vec<u8>, ctx: HashMap<String, String>) -> DecryptResponse {
    c.decrypt(DecryptRequest {
        ciphertext_blob: blob,
        encryption_context: ctx,
        ..Default::default()
    })
    .await
    .expect("Decrypt")
    .into_inner()
}

/// One operation of kind `n % KINDS.len()`, checked; panics on any wrong answer.
async fn one(c: &mut Client, keys: &[KeyMetadata], stores: &[String], w: usize, n: usize) {
    let key = &keys[(w + n) % keys.len()];
    // A key of the other store, for ReEncrypt.
    let other = keys
        .iter()
        .cycle()
        .skip(n % keys.len())
        .find(|k| k.custom_key_store_id != key.custom_key_store_id)
        .unwrap();
    let ctx = context(w, n);
    match n % KINDS.len() {
        0 => {
            let pt = format!("soak {w}/{n}").into_bytes();
            let e = c
                .encrypt(EncryptRequest {
                    key_id: key.key_id.clone(),
                    plaintext: pt.clone(),
                    encryption_context: ctx.clone(),
                    ..Default::default()
                })
                .await
                .expect("Encrypt")
                .into_inner();
            assert_eq!(e.key_id, key.arn);
            let d = decrypt(c, e.ciphertext_blob, ctx).await;
            assert_eq!(d.plaintext, pt);
            assert_eq!(d.key_id, key.arn);
        }
        1 => {
            let dk = c
                .generate_data_key(GenerateDataKeyRequest {
                    key_id: key.arn.clone(),
                    key_spec: Some("AES_256".into()),
                    encryption_context: ctx.clone(),
                    ..Default::default()
                })
                .await
                .expect("GenerateDataKey")
                .into_inner();
            assert_eq!(dk.plaintext.len(), 32);
            assert_eq!(
                decrypt(c, dk.ciphertext_blob, ctx).await.plaintext,
                dk.plaintext
            );
        }
        2 => {
            let pt = vec![(n % 251) as u8; 1 + n % 300];
            let ct = encrypt(c, &key.key_id, &pt).await;
            let r = c
                .re_encrypt(ReEncryptRequest {
                    ciphertext_blob: ct,
                    destination_key_id: other.key_id.clone(),
                    destination_encryption_context: ctx.clone(),
                    ..Default::default()
                })
                .await
                .expect("ReEncrypt")
                .into_inner();
            assert_eq!(r.source_key_id, key.arn);
            assert_eq!(r.key_id, other.arn);
            let d = decrypt(c, r.ciphertext_blob, ctx).await;
            assert_eq!((d.plaintext, d.key_id), (pt, other.arn.clone()));
        }
        3 => {
            let m = describe_key(c, &key.arn).await;
            assert_eq!(
                (m.key_id.as_str(), m.key_state.as_str()),
                (key.key_id.as_str(), "Enabled")
            );
        }
        4 => {
            let store = &stores[n % stores.len()];
            let r = c
                .generate_random(GenerateRandomRequest {
                    number_of_bytes: Some(64),
                    custom_key_store_id: Some(store.clone()),
                })
                .await
                .expect("GenerateRandom")
                .into_inner();
            assert_eq!(r.plaintext.len(), 64);
        }
        5 => {
            let ct = encrypt(c, &key.key_id, b"bound to nothing").await;
            let r = c
                .decrypt(DecryptRequest {
                    ciphertext_blob: ct,
                    encryption_context: ctx,
                    ..Default::default()
                })
                .await;
            assert_err(r, "InvalidCiphertextException");
        }
        _ => {
            let tag_key = format!("worker-{w}");
            let value = n.to_string();
            c.tag_resource(TagResourceRequest {
                key_id: key.key_id.clone(),
                tags: vec![Tag {
                    tag_key: tag_key.clone(),
                    tag_value: value.clone(),
                }],
            })
            .await
            .expect("TagResource");
            let tags = c
                .list_resource_tags(ListResourceTagsRequest {
                    key_id: key.key_id.clone(),
                    ..Default::default()
                })
                .await
                .expect("ListResourceTags")
                .into_inner()
                .tags;
            // Only this worker writes this tag key, so its last value must be visible.
            assert!(
                tags.iter()
                    .any(|t| t.tag_key == tag_key && t.tag_value == value),
                "tag {tag_key}={value} missing: {tags:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mixed_operations_across_two_stores() {
    let seconds: u64 = std::env::var("HSM_KMS_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let h = Harness::start(&[ClusterSpec::good(A), ClusterSpec::good(B)]).await;
    let mut c = h.client().await;
    let stores = vec![
        h.connected_store(&mut c, 0, "soak-a").await,
        h.connected_store(&mut c, 1, "soak-b").await,
    ];
    let mut keys = Vec::new();
    for store in &stores {
        for _ in 0..3 {
            keys.push(create_key(&mut c, store).await);
        }
    }

    let end = Instant::now() + Duration::from_secs(seconds);
    let mut set = tokio::task::JoinSet::new();
    for w in 0..WORKERS {
        let (mut c, keys, stores) = (c.clone(), keys.clone(), stores.clone());
        set.spawn(async move {
            let mut counts = [0usize; KINDS.len()];
            let mut n = w; // workers start on different kinds
            while Instant::now() < end {
                one(&mut c, &keys, &stores, w, n).await;
                counts[n % KINDS.len()] += 1;
                n += 1;
            }
            counts
        });
    }
    let mut totals = [0usize; KINDS.len()];
    while let Some(r) = set.join_next().await {
        for (t, n) in totals.iter_mut().zip(r.expect("a soak worker failed")) {
            *t += n;
        }
    }
    println!("soak: {seconds} s, {WORKERS} workers, 6 keys in 2 stores");
    for (kind, n) in KINDS.iter().zip(totals) {
        println!("  {kind:<24} {n}");
        assert!(n > 0, "{kind} never ran");
    }

    // Nothing leaked or changed state underneath: both stores healthy, every key intact.
    for store in &stores {
        assert_eq!(h.health(store).await, 1, "store {store} SERVING");
        let m = h.metrics();
        let busy = format!(r#"hsm_kms_session_pool_in_use{{custom_key_store_id="{store}"}}"#);
        assert_eq!(metric(&m, &busy), Some(0.0), "{m}");
    }
    for k in &keys {
        assert_eq!(describe_key(&mut c, &k.key_id).await.key_state, "Enabled");
    }
    assert_eq!(h.token_secret_keys(0) + h.token_secret_keys(1), keys.len());
}
