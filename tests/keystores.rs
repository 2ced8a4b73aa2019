//! Custom key store lifecycle and every precondition of the AWS model, over gRPC against real
//! SoftHSM2 tokens.

mod common;

use common::*;
use hsm_kms::proto::*;

const A: &str = "cluster-alphaclustr";
const B: &str = "cluster-bravoclustr";

fn create_req(h: &Harness, i: usize, name: &str) -> CreateCustomKeyStoreRequest {
    CreateCustomKeyStoreRequest {
        custom_key_store_name: name.into(),
        cloud_hsm_cluster_id: Some(h.cluster(i).id.clone()),
        trust_anchor_certificate: Some(h.anchors[i].clone()),
        key_store_password: Some(PASSWORD.into()),
        custom_key_store_type: None,
    }
}

#[tokio::test]
async fn lifecycle_connect_disconnect_delete() {
    let h = Harness::start(&[ClusterSpec::good(A)]).await;
    let mut c = h.client().await;
    let id = h.create_store(&mut c, 0, "store-one", PASSWORD).await;
    assert!(id.starts_with("cks-") && id.len() == 21, "{id}");

    let s = describe_store(&mut c, &id).await;
    assert_eq!(s.custom_key_store_name, "store-one");
    assert_eq!(s.cloud_hsm_cluster_id, A);
    assert_eq!(s.connection_state, "DISCONNECTED");
    assert_eq!(s.custom_key_store_type, "AWS_CLOUDHSM");
    assert_eq!(s.trust_anchor_certificate, h.anchors[0]);
    assert!(s.creation_date.is_some());

    // Connect is asynchronous: CONNECTING, then CONNECTED.
    assert_eq!(connect(&mut c, &id).await, ("CONNECTED".into(), None));
    // Connecting a connected store succeeds and changes nothing.
    c.connect_custom_key_store(ConnectCustomKeyStoreRequest {
        custom_key_store_id: id.clone(),
    })
    .await
    .unwrap();
    assert_eq!(
        describe_store(&mut c, &id).await.connection_state,
        "CONNECTED"
    );

    // Delete only when disconnected.
    let r = c
        .delete_custom_key_store(DeleteCustomKeyStoreRequest {
            custom_key_store_id: id.clone(),
        })
        .await;
    assert_err(r, "CustomKeyStoreInvalidStateException");

    disconnect(&mut c, &id).await;
    assert_eq!(
        describe_store(&mut c, &id).await.connection_state,
        "DISCONNECTED"
    );
    let r = c
        .disconnect_custom_key_store(DisconnectCustomKeyStoreRequest {
            custom_key_store_id: id.clone(),
        })
        .await;
    assert_err(r, "CustomKeyStoreInvalidStateException");

    c.delete_custom_key_store(DeleteCustomKeyStoreRequest {
        custom_key_store_id: id.clone(),
    })
    .await
    .unwrap();
    let r = c
        .describe_custom_key_stores(DescribeCustomKeyStoresRequest {
            custom_key_store_id: Some(id.clone()),
            ..Default::default()
        })
        .await;
    assert_err(r, "CustomKeyStoreNotFoundException");
    // The cluster is free again.
    h.create_store(&mut c, 0, "store-two", PASSWORD).await;
}

#[tokio::test]
async fn create_preconditions() {
    let mut two_in_one_zone = ClusterSpec::good("cluster-onezoneclstr");
    two_in_one_zone.hsms = vec![
        ("us-east-1a", HsmState::Active),
        ("us-east-1a", HsmState::Active),
    ];
    let mut one_active = ClusterSpec::good("cluster-oneactivecls");
    one_active.hsms = vec![
        ("us-east-1a", HsmState::Active),
        ("us-east-1b", HsmState::Degraded),
    ];
    let mut inactive = ClusterSpec::good("cluster-uninitclustr");
    inactive.state = ClusterState::Uninitialized;
    let h = Harness::start(&[
        ClusterSpec::good(A),
        ClusterSpec::good(B),
        two_in_one_zone,
        one_active,
        inactive,
    ])
    .await;
    let mut c = h.client().await;

    // Unknown cluster.
    let mut r = create_req(&h, 0, "x");
    r.cloud_hsm_cluster_id = Some("cluster-unknownclstr".into());
    assert_err(
        c.create_custom_key_store(r).await,
        "CloudHsmClusterNotFoundException",
    );
    // Malformed cluster id.
    let mut r = create_req(&h, 0, "x");
    r.cloud_hsm_cluster_id = Some("cluster-1".into());
    assert_err(c.create_custom_key_store(r).await, "ValidationException");
    // A trust anchor that is not the cluster's (B's anchor for A), and garbage.
    let mut r = create_req(&h, 0, "x");
    r.trust_anchor_certificate = Some(h.anchors[1].clone());
    assert_err(
        c.create_custom_key_store(r).await,
        "IncorrectTrustAnchorException",
    );
    let mut r = create_req(&h, 0, "x");
    r.trust_anchor_certificate = Some("not a certificate".into());
    assert_err(
        c.create_custom_key_store(r).await,
        "IncorrectTrustAnchorException",
    );
    // Fewer than two active HSMs in different zones.
    assert_err(
        c.create_custom_key_store(create_req(&h, 2, "x")).await,
        "CloudHsmClusterInvalidConfigurationException",
    );
    assert_err(
        c.create_custom_key_store(create_req(&h, 3, "x")).await,
        "CloudHsmClusterInvalidConfigurationException",
    );
    // Cluster not active.
    assert_err(
        c.create_custom_key_store(create_req(&h, 4, "x")).await,
        "CloudHsmClusterNotActiveException",
    );
    // Password bounds (7..32), name bounds, missing fields, store types.
    for pw in ["short", &"p".repeat(33)] {
        let mut r = create_req(&h, 0, "x");
        r.key_store_password = Some(pw.to_string());
        assert_err(c.create_custom_key_store(r).await, "ValidationException");
    }
    let mut r = create_req(&h, 0, "");
    r.custom_key_store_name = String::new();
    assert_err(c.create_custom_key_store(r).await, "ValidationException");
    let r = create_req(&h, 0, &"n".repeat(257));
    assert_err(c.create_custom_key_store(r).await, "ValidationException");
    let mut r = create_req(&h, 0, "x");
    r.key_store_password = None;
    assert_err(c.create_custom_key_store(r).await, "ValidationException");
    let mut r = create_req(&h, 0, "x");
    r.custom_key_store_type = Some("EXTERNAL_KEY_STORE".into());
    assert_err(
        c.create_custom_key_store(r).await,
        "UnsupportedOperationException",
    );
    let mut r = create_req(&h, 0, "x");
    r.custom_key_store_type = Some("CLOUDHSM".into());
    assert_err(c.create_custom_key_store(r).await, "ValidationException");

    // Nothing above left a store behind.
    let all = c
        .describe_custom_key_stores(DescribeCustomKeyStoresRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(all.custom_key_stores.is_empty());

    // Name in use; cluster in use.
    h.create_store(&mut c, 0, "taken", PASSWORD).await;
    assert_err(
        c.create_custom_key_store(create_req(&h, 1, "taken")).await,
        "CustomKeyStoreNameInUseException",
    );
    assert_err(
        c.create_custom_key_store(create_req(&h, 0, "other-name"))
            .await,
        "CloudHsmClusterInUseException",
    );
}

#[tokio::test]
async fn connect_failures_and_recovery() {
    let mut absent = ClusterSpec::good("cluster-notokenclstr");
    absent.token = false;
    let h = Harness::start(&[ClusterSpec::good(A), absent]).await;
    let mut c = h.client().await;

    // Wrong password: FAILED with INVALID_CREDENTIALS.
    let id = h
        .create_store(&mut c, 0, "wrong-pw", "not-the-password")
        .await;
    assert_eq!(
        connect(&mut c, &id).await,
        ("FAILED".into(), Some("INVALID_CREDENTIALS".into()))
    );
    // Connect is refused while FAILED; so are password changes.
    let r = c
        .connect_custom_key_store(ConnectCustomKeyStoreRequest {
            custom_key_store_id: id.clone(),
        })
        .await;
    assert_err(r, "CustomKeyStoreInvalidStateException");
    let r = c
        .update_custom_key_store(UpdateCustomKeyStoreRequest {
            custom_key_store_id: id.clone(),
            key_store_password: Some(PASSWORD.into()),
            ..Default::default()
        })
        .await;
    assert_err(r, "CustomKeyStoreInvalidStateException");
    // Disconnect, fix the password, connect.
    disconnect(&mut c, &id).await;
    let s = describe_store(&mut c, &id).await;
    assert_eq!(
        (s.connection_state.as_str(), s.connection_error_code),
        ("DISCONNECTED", None)
    );
    c.update_custom_key_store(UpdateCustomKeyStoreRequest {
        custom_key_store_id: id.clone(),
        key_store_password: Some(PASSWORD.into()),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(connect(&mut c, &id).await, ("CONNECTED".into(), None));

    // Token absent: CLUSTER_NOT_FOUND.
    let id2 = h.create_store(&mut c, 1, "no-token", PASSWORD).await;
    assert_eq!(
        connect(&mut c, &id2).await,
        ("FAILED".into(), Some("CLUSTER_NOT_FOUND".into()))
    );
}

#[tokio::test]
async fn connect_needs_an_active_hsm_and_reconnects_after_restart() {
    let mut h = Harness::start(&[ClusterSpec::good(A)]).await;
    let mut c = h.client().await;
    let id = h.connected_store(&mut c, 0, "s").await;
    let key = create_key(&mut c, &id).await;
    let ct = encrypt(&mut c, &key.key_id, b"survives restarts").await;

    // A CONNECTED store reconnects by itself after a restart, and old ciphertexts decrypt.
    h.restart_with(|_| {}).await;
    let mut c = h.client().await;
    assert_eq!(wait_settled(&mut c, &id).await, ("CONNECTED".into(), None));
    let pt = c
        .decrypt(DecryptRequest {
            ciphertext_blob: ct.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .plaintext;
    assert_eq!(pt, b"survives restarts");

    // No active HSM: connecting ends FAILED / INSUFFICIENT_CLOUDHSM_HSMS, and cryptographic
    // operations fail with KMSInvalidStateException naming the store.
    h.restart_with(|s| {
        for hsm in &mut s.clusters[0].hsms {
            hsm.state = HsmState::Degraded;
        }
    })
    .await;
    let mut c = h.client().await;
    // A restart changes no shared state: the store stays CONNECTED (other replicas may be
    // serving it); this process cannot log in, so its health says NOT_SERVING and its
    // requests find the keys unavailable.
    assert_eq!(wait_settled(&mut c, &id).await, ("CONNECTED".into(), None));
    assert_eq!(
        h.health(&id).await,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );
    // Nor is it ready for a load balancer, and /readyz says why.
    let (status, why) = h.admin_get("/readyz");
    assert_eq!(status, 503, "{why}");
    assert!(why.contains(&id), "{why}");
    let msg = assert_err(
        c.decrypt(DecryptRequest {
            ciphertext_blob: ct.clone(),
            ..Default::default()
        })
        .await,
        "KMSInvalidStateException",
    );
    assert!(msg.contains("has no active HSM"), "{msg}");
    // A connect is what decides the shared state: it needs an active HSM, so it ends FAILED.
    disconnect(&mut c, &id).await;
    assert_eq!(
        connect(&mut c, &id).await,
        ("FAILED".into(), Some("INSUFFICIENT_CLOUDHSM_HSMS".into()))
    );

    // One active HSM: crypto works, CreateKey does not.
    h.restart_with(|s| {
        s.clusters[0].hsms[0].state = HsmState::Active;
    })
    .await;
    let mut c = h.client().await;
    disconnect(&mut c, &id).await;
    assert_eq!(connect(&mut c, &id).await, ("CONNECTED".into(), None));
    let pt = c
        .decrypt(DecryptRequest {
            ciphertext_blob: ct,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .plaintext;
    assert_eq!(pt, b"survives restarts");
    let r = c
        .create_key(CreateKeyRequest {
            custom_key_store_id: Some(id.clone()),
            origin: Some("AWS_CLOUDHSM".into()),
            ..Default::default()
        })
        .await;
    assert_err(r, "CloudHsmClusterInvalidConfigurationException");
}

#[tokio::test]
async fn update_rules() {
    // A, R and R2 share backup history (lineage "a"); Z is related but has one HSM; B is not.
    let related = |id: &str| {
        let mut c = ClusterSpec::good(id);
        c.lineage = Some("lineage-a".into());
        c
    };
    let mut one_zone = related("cluster-onezonelinea");
    one_zone.hsms = vec![("us-east-1a", HsmState::Active)];
    let h = Harness::start(&[
        related(A),
        ClusterSpec::good(B),
        related("cluster-relatedclstr"),
        one_zone,
        related("cluster-relatedtwooo"),
    ])
    .await;
    let mut c = h.client().await;
    let id = h.connected_store(&mut c, 0, "upd").await;
    h.create_store(&mut c, 1, "other", PASSWORD).await;
    h.create_store(&mut c, 4, "third", PASSWORD).await;

    // The name can change while connected; a name in use cannot be taken.
    c.update_custom_key_store(UpdateCustomKeyStoreRequest {
        custom_key_store_id: id.clone(),
        new_custom_key_store_name: Some("renamed".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        describe_store(&mut c, &id).await.custom_key_store_name,
        "renamed"
    );
    let r = c
        .update_custom_key_store(UpdateCustomKeyStoreRequest {
            custom_key_store_id: id.clone(),
            new_custom_key_store_name: Some("other".into()),
            ..Default::default()
        })
        .await;
    assert_err(r, "CustomKeyStoreNameInUseException");

    // Cluster and password changes need DISCONNECTED.
    let upd_cluster = |cl: &str| UpdateCustomKeyStoreRequest {
        custom_key_store_id: id.clone(),
        cloud_hsm_cluster_id: Some(cl.into()),
        ..Default::default()
    };
    assert_err(
        c.update_custom_key_store(upd_cluster("cluster-relatedclstr"))
            .await,
        "CustomKeyStoreInvalidStateException",
    );
    let r = c
        .update_custom_key_store(UpdateCustomKeyStoreRequest {
            custom_key_store_id: id.clone(),
            key_store_password: Some("another-password".into()),
            ..Default::default()
        })
        .await;
    assert_err(r, "CustomKeyStoreInvalidStateException");
    disconnect(&mut c, &id).await;

    for (cluster, name) in [
        (B, "CloudHsmClusterNotRelatedException"),
        ("cluster-unknownclstr", "CloudHsmClusterNotFoundException"),
        (
            "cluster-onezonelinea",
            "CloudHsmClusterInvalidConfigurationException",
        ),
        ("cluster-relatedtwooo", "CloudHsmClusterInUseException"),
        ("bad-cluster-id", "ValidationException"),
    ] {
        assert_err(c.update_custom_key_store(upd_cluster(cluster)).await, name);
    }
    // A rejected update changes nothing, not even the fields that were valid.
    let mut r = upd_cluster(B);
    r.new_custom_key_store_name = Some("half-applied".into());
    assert_err(
        c.update_custom_key_store(r).await,
        "CloudHsmClusterNotRelatedException",
    );
    let s = describe_store(&mut c, &id).await;
    assert_eq!(
        (
            s.custom_key_store_name.as_str(),
            s.cloud_hsm_cluster_id.as_str()
        ),
        ("renamed", A)
    );

    // A related cluster, and it connects there.
    c.update_custom_key_store(upd_cluster("cluster-relatedclstr"))
        .await
        .unwrap();
    assert_eq!(
        describe_store(&mut c, &id).await.cloud_hsm_cluster_id,
        "cluster-relatedclstr"
    );
    assert_eq!(connect(&mut c, &id).await, ("CONNECTED".into(), None));

    // Nothing to change; unknown store.
    let r = c
        .update_custom_key_store(UpdateCustomKeyStoreRequest {
            custom_key_store_id: id.clone(),
            ..Default::default()
        })
        .await;
    assert_err(r, "ValidationException");
    let r = c
        .update_custom_key_store(UpdateCustomKeyStoreRequest {
            custom_key_store_id: "cks-00000000000000000".into(),
            new_custom_key_store_name: Some("n".into()),
            ..Default::default()
        })
        .await;
    assert_err(r, "CustomKeyStoreNotFoundException");
}

#[tokio::test]
async fn delete_refused_while_holding_keys() {
    let h = Harness::start(&[ClusterSpec::good(A)]).await;
    let mut c = h.client().await;
    let id = h.connected_store(&mut c, 0, "keys").await;
    create_key(&mut c, &id).await;
    disconnect(&mut c, &id).await;
    let r = c
        .delete_custom_key_store(DeleteCustomKeyStoreRequest {
            custom_key_store_id: id.clone(),
        })
        .await;
    assert_err(r, "CustomKeyStoreHasCMKsException");
}

#[tokio::test]
async fn describe_by_name_pagination_and_bad_input() {
    let clusters: Vec<ClusterSpec> = [
        "cluster-pageaaaaaaa",
        "cluster-pagebbbbbbb",
        "cluster-pageccccccc",
    ]
    .iter()
    .map(|id| ClusterSpec::good(id))
    .collect();
    let h = Harness::start(&clusters).await;
    let mut c = h.client().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            h.create_store(&mut c, i, &format!("page-{i}"), PASSWORD)
                .await,
        );
    }
    ids.sort();
    let by_name = c
        .describe_custom_key_stores(DescribeCustomKeyStoresRequest {
            custom_key_store_name: Some("page-1".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_name.custom_key_stores[0].custom_key_store_name, "page-1");

    let mut seen = Vec::new();
    let mut marker = None;
    loop {
        let page = c
            .describe_custom_key_stores(DescribeCustomKeyStoresRequest {
                limit: Some(2),
                marker: marker.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.custom_key_stores.len() <= 2);
        seen.extend(
            page.custom_key_stores
                .into_iter()
                .map(|s| s.custom_key_store_id),
        );
        assert_eq!(page.truncated, page.next_marker.is_some());
        match page.next_marker {
            Some(m) => marker = Some(m),
            None => break,
        }
    }
    assert_eq!(seen, ids);

    let bad = |r: DescribeCustomKeyStoresRequest| r;
    for (req, name) in [
        (
            bad(DescribeCustomKeyStoresRequest {
                limit: Some(0),
                ..Default::default()
            }),
            "ValidationException",
        ),
        (
            bad(DescribeCustomKeyStoresRequest {
                limit: Some(1001),
                ..Default::default()
            }),
            "ValidationException",
        ),
        (
            bad(DescribeCustomKeyStoresRequest {
                marker: Some("zz-not-ours".into()),
                ..Default::default()
            }),
            "InvalidMarkerException",
        ),
        (
            bad(DescribeCustomKeyStoresRequest {
                custom_key_store_id: Some("cks-bad".into()),
                ..Default::default()
            }),
            "CustomKeyStoreNotFoundException",
        ),
        (
            bad(DescribeCustomKeyStoresRequest {
                custom_key_store_name: Some("nope".into()),
                ..Default::default()
            }),
            "CustomKeyStoreNotFoundException",
        ),
        (
            bad(DescribeCustomKeyStoresRequest {
                custom_key_store_id: Some(ids[0].clone()),
                custom_key_store_name: Some("page-0".into()),
                ..Default::default()
            }),
            "ValidationException",
        ),
    ] {
        assert_err(c.describe_custom_key_stores(req).await, name);
    }
    for op in ["connect", "disconnect", "delete"] {
        let id = "cks-0123456789abcdef0".to_string();
        let r = match op {
            "connect" => c
                .connect_custom_key_store(ConnectCustomKeyStoreRequest {
                    custom_key_store_id: id,
                })
                .await
                .map(|_| ()),
            "disconnect" => c
                .disconnect_custom_key_store(DisconnectCustomKeyStoreRequest {
                    custom_key_store_id: id,
                })
                .await
                .map(|_| ()),
            _ => c
                .delete_custom_key_store(DeleteCustomKeyStoreRequest {
                    custom_key_store_id: id,
                })
                .await
                .map(|_| ()),
        };
        assert_err(
            r.map(tonic::Response::new),
            "CustomKeyStoreNotFoundException",
        );
    }
}

/// deploy/hsm-kms.example.toml parses and spells out every setting with its default.
#[test]
fn example_config_parses_and_matches_defaults() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/hsm-kms.example.toml");
    let s = hsm_kms::config::Settings::load(&path).unwrap();
    let file: toml::Table = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let defaults: hsm_kms::config::Settings = toml::from_str("").unwrap();
    let defaults = toml::Table::try_from(&defaults).unwrap();
    for (section, keys) in &defaults {
        let Some(keys) = keys.as_table() else {
            continue;
        };
        for (key, value) in keys {
            // The host name: the example shows it commented out, with a sample.
            if (section.as_str(), key.as_str()) == ("audit", "replica") {
                continue;
            }
            assert_eq!(
                file.get(section).and_then(|t| t.get(key)),
                Some(value),
                "[{section}] {key} must be in the example with its default"
            );
        }
    }
    assert_eq!(s.clusters.len(), 1);
    let c = &s.clusters[0];
    assert_eq!(c.pin_format, hsm_kms::config::PinFormat::UserPassword);
    assert_eq!(c.gcm_iv, hsm_kms::config::GcmIvMode::Hsm);
    assert_eq!(c.hsms.len(), 2);
}
