//! CreateKey, DescribeKey, ListKeys and tags: metadata, validation, pagination.

mod common;

use common::*;
use hsm_kms::proto::*;

const A: &str = "cluster-alphaclustr";

fn create(store: &str) -> CreateKeyRequest {
    CreateKeyRequest {
        custom_key_store_id: Some(store.into()),
        origin: Some("AWS_CLOUDHSM".into()),
        ..Default::default()
    }
}

/// An edit to a valid CreateKey request that makes it invalid.
type Change = Box<dyn Fn(&mut CreateKeyRequest)>;

fn tag(k: &str, v: &str) -> Tag {
    Tag {
        tag_key: k.into(),
        tag_value: v.into(),
    }
}

#[tokio::test]
async fn metadata_is_complete() {
    let h = Harness::start(&[ClusterSpec::good(A)]).await;
    let mut c = h.client().await;
    let store = h.connected_store(&mut c, 0, "meta").await;
    let mut req = create(&store);
    req.description = Some("payments key".into());
    req.key_spec = Some("SYMMETRIC_DEFAULT".into());
    req.key_usage = Some("ENCRYPT_DECRYPT".into());
    req.tags = vec![tag("team", "payments"), tag("env", "")];
    let m = c
        .create_key(req)
        .await
        .unwrap()
        .into_inner()
        .key_metadata
        .unwrap();
    assert_eq!(m.aws_account_id, "111122223333");
    assert_eq!(
        m.arn,
        format!("arn:aws:kms:us-east-1:111122223333:key/{}", m.key_id)
    );
    assert!(m.creation_date.is_some());
    assert!(m.enabled);
    assert_eq!(m.description, "payments key");
    assert_eq!(m.key_usage, "ENCRYPT_DECRYPT");
    assert_eq!(m.key_state, "Enabled");
    assert_eq!(m.origin, "AWS_CLOUDHSM");
    assert_eq!(m.custom_key_store_id, store);
    assert_eq!(m.cloud_hsm_cluster_id, A);
    assert_eq!(m.key_manager, "CUSTOMER");
    assert_eq!(m.key_spec, "SYMMETRIC_DEFAULT");
    assert_eq!(m.customer_master_key_spec, "SYMMETRIC_DEFAULT");
    assert_eq!(m.encryption_algorithms, vec!["SYMMETRIC_DEFAULT"]);
    assert!(!m.multi_region);
    // DescribeKey by id and by ARN says the same.
    for r in [m.key_id.clone(), m.arn.clone()] {
        let d = describe_key(&mut c, &r).await;
        assert_eq!(
            (d.key_id.as_str(), d.arn.as_str(), d.creation_date),
            (m.key_id.as_str(), m.arn.as_str(), m.creation_date)
        );
    }
    let tags = c
        .list_resource_tags(ListResourceTagsRequest {
            key_id: m.key_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tags.tags, vec![tag("env", ""), tag("team", "payments")]);
    assert!(!tags.truncated);
}

#[tokio::test]
async fn create_key_validation() {
    let h = Harness::start(&[ClusterSpec::good(A)]).await;
    let mut c = h.client().await;
    let store = h.connected_store(&mut c, 0, "val").await;
    let cases: Vec<(Change, &str)> = vec![
        (
            Box::new(|r| {
                r.custom_key_store_id = None;
                r.origin = None;
            }),
            "UnsupportedOperationException",
        ),
        (
            Box::new(|r| r.custom_key_store_id = None),
            "ValidationException",
        ),
        (
            Box::new(|r| r.origin = Some("AWS_KMS".into())),
            "ValidationException",
        ),
        (
            Box::new(|r| r.origin = Some("EXTERNAL".into())),
            "UnsupportedOperationException",
        ),
        (
            Box::new(|r| r.origin = Some("EXTERNAL_KEY_STORE".into())),
            "UnsupportedOperationException",
        ),
        (
            Box::new(|r| r.origin = Some("CLOUDHSM".into())),
            "ValidationException",
        ),
        (
            Box::new(|r| r.key_spec = Some("RSA_2048".into())),
            "UnsupportedOperationException",
        ),
        (
            Box::new(|r| r.key_spec = Some("HMAC_256".into())),
            "UnsupportedOperationException",
        ),
        (
            Box::new(|r| r.key_spec = Some("AES_256".into())),
            "ValidationException",
        ),
        (
            Box::new(|r| r.customer_master_key_spec = Some("ECC_NIST_P256".into())),
            "UnsupportedOperationException",
        ),
        (
            Box::new(|r| {
                r.key_spec = Some("SYMMETRIC_DEFAULT".into());
                r.customer_master_key_spec = Some("SYMMETRIC_DEFAULT".into());
            }),
            "ValidationException",
        ),
        (
            Box::new(|r| r.key_usage = Some("SIGN_VERIFY".into())),
            "UnsupportedOperationException",
        ),
        (
            Box::new(|r| r.key_usage = Some("ENCRYPT".into())),
            "ValidationException",
        ),
        (
            Box::new(|r| r.multi_region = Some(true)),
            "UnsupportedOperationException",
        ),
        (
            Box::new(|r| r.description = Some("d".repeat(8193))),
            "ValidationException",
        ),
        (
            Box::new(|r| r.custom_key_store_id = Some("cks-00000000000000000".into())),
            "CustomKeyStoreNotFoundException",
        ),
        (
            Box::new(|r| r.custom_key_store_id = Some("x".repeat(65))),
            "ValidationException",
        ),
        (
            Box::new(|r| r.tags = vec![tag("aws:reserved", "v")]),
            "TagException",
        ),
        (
            Box::new(|r| r.tags = vec![tag("dup", "1"), tag("dup", "2")]),
            "TagException",
        ),
        // Lengths are the model's constraints: ValidationException, as in AWS.
        (
            Box::new(|r| r.tags = vec![tag("", "v")]),
            "ValidationException",
        ),
        (
            Box::new(|r| r.tags = vec![tag(&"k".repeat(129), "v")]),
            "ValidationException",
        ),
        (
            Box::new(|r| r.tags = vec![tag("k", &"v".repeat(257))]),
            "ValidationException",
        ),
        (
            Box::new(|r| r.tags = vec![tag("bad{char}", "v")]),
            "TagException",
        ),
        (
            Box::new(|r| r.tags = (0..51).map(|i| tag(&format!("k{i}"), "v")).collect()),
            "TagException",
        ),
    ];
    for (change, name) in cases {
        let mut r = create(&store);
        change(&mut r);
        assert_err(c.create_key(r).await, name);
    }
    // None of them left a key behind.
    let keys = c
        .list_keys(ListKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(keys.keys.is_empty(), "{:?}", keys.keys);
    // 50 tags and the longest key and value are fine.
    let mut r = create(&store);
    r.tags = (0..49).map(|i| tag(&format!("k{i}"), "v")).collect();
    r.tags.push(tag(&"k".repeat(128), &"v".repeat(256)));
    let m = c
        .create_key(r)
        .await
        .unwrap()
        .into_inner()
        .key_metadata
        .unwrap();
    let mut all = Vec::new();
    let mut marker = None;
    loop {
        let p = c
            .list_resource_tags(ListResourceTagsRequest {
                key_id: m.arn.clone(),
                limit: Some(20),
                marker: marker.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        all.extend(p.tags);
        match p.next_marker {
            Some(mk) => marker = Some(mk),
            None => break,
        }
    }
    assert_eq!(all.len(), 50);
}

#[tokio::test]
async fn list_keys_paginates() {
    let h = Harness::start(&[ClusterSpec::good(A)]).await;
    let mut c = h.client().await;
    let store = h.connected_store(&mut c, 0, "list").await;
    let mut ids = Vec::new();
    for _ in 0..7 {
        ids.push(create_key(&mut c, &store).await.key_id);
    }
    ids.sort();
    let mut seen = Vec::new();
    let mut marker = None;
    loop {
        let p = c
            .list_keys(ListKeysRequest {
                limit: Some(3),
                marker: marker.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(p.keys.len() <= 3);
        assert_eq!(p.truncated, p.next_marker.is_some());
        for k in p.keys {
            assert_eq!(
                k.key_arn,
                format!("arn:aws:kms:us-east-1:111122223333:key/{}", k.key_id)
            );
            seen.push(k.key_id);
        }
        match p.next_marker {
            Some(m) => marker = Some(m),
            None => break,
        }
    }
    assert_eq!(seen, ids);
    for (limit, marker, name) in [
        (Some(0), None, "ValidationException"),
        (Some(1001), None, "ValidationException"),
        (
            None,
            Some("not-a-marker".to_string()),
            "InvalidMarkerException",
        ),
        (None, Some(String::new()), "ValidationException"),
    ] {
        assert_err(c.list_keys(ListKeysRequest { limit, marker }).await, name);
    }
}

/// Concurrent CreateKey calls all succeed, each with its own token object. SoftHSM2 makes
/// token objects one at a time (tens of ms each on a slow disk), so the HSM deadline here is
/// long enough for 48 queued creations: the point is correctness under concurrency.
#[tokio::test]
async fn concurrent_create_key() {
    let h = Harness::start_with(&[ClusterSpec::good(A)], |s| s.hsm.call_timeout_ms = 20_000).await;
    let mut c = h.client().await;
    let store = h.connected_store(&mut c, 0, "many").await;
    let tasks: Vec<_> = (0..48)
        .map(|_| {
            let mut c = c.clone();
            let store = store.clone();
            tokio::spawn(async move { create_key(&mut c, &store).await.key_id })
        })
        .collect();
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        ids.insert(t.await.unwrap());
    }
    assert_eq!(ids.len(), 48);
    for id in &ids {
        encrypt(&mut c, id, b"each key works").await;
    }
}

/// CreateKey without a store: refused with the setting to use when none is configured;
/// with `kms.default_custom_key_store` (by name or id), the key is made there, as tools
/// that know only AWS KMS expect.
#[tokio::test]
async fn keys_without_a_store_go_to_the_default_store() {
    let mut h = Harness::start(&[ClusterSpec::good(A)]).await;
    let mut c = h.client().await;
    let store = h.connected_store(&mut c, 0, "the-default").await;
    let msg = assert_err(
        c.create_key(CreateKeyRequest::default()).await,
        "UnsupportedOperationException",
    );
    assert!(msg.contains("kms.default_custom_key_store"), "{msg}");

    for named in ["the-default".to_string(), store.clone()] {
        h.restart_with(|s| s.kms.default_custom_key_store = Some(named.clone()))
            .await;
        let mut c = h.client().await;
        // The store reconnects by itself after the restart.
        assert_eq!(wait_settled(&mut c, &store).await.0, "CONNECTED");
        for origin in [None, Some("AWS_KMS"), Some("AWS_CLOUDHSM")] {
            let m = c
                .create_key(CreateKeyRequest {
                    origin: origin.map(String::from),
                    description: Some("from a tool that names no store".into()),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .key_metadata
                .unwrap();
            assert_eq!(
                (m.custom_key_store_id.as_str(), m.origin.as_str()),
                (store.as_str(), "AWS_CLOUDHSM"),
                "default store named {named}, Origin {origin:?}"
            );
            let ct = encrypt(&mut c, &m.key_id, b"default store").await;
            assert!(!ct.is_empty());
        }
    }

    h.restart_with(|s| s.kms.default_custom_key_store = Some("no-such-store".into()))
        .await;
    let mut c = h.client().await;
    let msg = assert_err(
        c.create_key(CreateKeyRequest::default()).await,
        "CustomKeyStoreNotFoundException",
    );
    assert!(msg.contains("no-such-store"), "{msg}");
}
