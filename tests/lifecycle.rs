//! Key lifecycle over gRPC on real SoftHSM2 tokens: aliases, tags, key policies, scheduled
//! deletion (with a shifted clock), the AWS key-state table cell by cell, and concurrent
//! changes to one key.

mod common;

use std::collections::HashMap;

use common::*;
use hsm_kms::model::op::Op;
use hsm_kms::model::states::KeyState;
use hsm_kms::proto::*;
use tonic::{Response, Status};

const A: &str = "cluster-alphaclustr";
const B: &str = "cluster-bravoclustr";

fn tag(k: &str, v: &str) -> Tag {
    Tag {
        tag_key: k.into(),
        tag_value: v.into(),
    }
}

async fn alias(
    c: &mut Client,
    name: &str,
    key: &str,
) -> Result<Response<CreateAliasResponse>, Status> {
    c.create_alias(CreateAliasRequest {
        alias_name: name.into(),
        target_key_id: key.into(),
    })
    .await
}

async fn aliases_of(c: &mut Client, key: Option<&str>) -> Vec<AliasListEntry> {
    let mut out = Vec::new();
    let mut marker = None;
    loop {
        let p = c
            .list_aliases(ListAliasesRequest {
                key_id: key.map(String::from),
                limit: Some(7),
                marker: marker.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        out.extend(p.aliases);
        match p.next_marker {
            Some(m) => marker = Some(m),
            None => return out,
        }
    }
}

#[tokio::test]
async fn aliases() {
    let h = Harness::start(&[ClusterSpec::good(A)]).await;
    let mut c = h.client().await;
    let store = h.connected_store(&mut c, 0, "aliases").await;
    let k1 = create_key(&mut c, &store).await;
    let k2 = create_key(&mut c, &store).await;

    alias(&mut c, "alias/app", &k1.key_id).await.unwrap();
    alias(&mut c, "alias/by-arn", &k1.arn).await.unwrap();
    let alias_arn = "arn:aws:kms:us-east-1:111122223333:alias/app";

    // Cryptographic operations and DescribeKey accept the alias name and the alias ARN.
    for r in ["alias/app", alias_arn] {
        assert_eq!(describe_key(&mut c, r).await.key_id, k1.key_id);
        let ct = encrypt(&mut c, r, b"via alias").await;
        let out = c
            .decrypt(DecryptRequest {
                ciphertext_blob: ct.clone(),
                key_id: Some(r.into()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(out.plaintext, b"via alias");
        let re = c
            .re_encrypt(ReEncryptRequest {
                ciphertext_blob: ct,
                source_key_id: Some(r.into()),
                destination_key_id: r.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(re.key_id, k1.arn);
        let dk = c
            .generate_data_key(GenerateDataKeyRequest {
                key_id: r.into(),
                number_of_bytes: Some(16),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(dk.key_id, k1.arn);
    }
    // Tag, policy and state operations take a key id or ARN only, as in AWS.
    let r = c
        .tag_resource(TagResourceRequest {
            key_id: "alias/app".into(),
            tags: vec![tag("a", "b")],
        })
        .await;
    assert_err(r, "NotFoundException");
    assert_err(
        c.disable_key(DisableKeyRequest {
            key_id: "alias/app".into(),
        })
        .await,
        "NotFoundException",
    );
    assert_err(
        alias(&mut c, "alias/chain", "alias/app").await,
        "NotFoundException",
    );

    // Listing: all, per key (by id or ARN), paginated, with ARNs and dates.
    let all = aliases_of(&mut c, None).await;
    assert_eq!(
        all.iter()
            .map(|a| a.alias_name.as_str())
            .collect::<Vec<_>>(),
        ["alias/app", "alias/by-arn"]
    );
    assert_eq!(all[0].alias_arn, alias_arn);
    assert_eq!(all[0].target_key_id, k1.key_id);
    assert!(all[0].creation_date.is_some() && all[0].last_updated_date.is_some());
    assert_eq!(aliases_of(&mut c, Some(&k2.arn)).await.len(), 0);

    // UpdateAlias moves it.
    c.update_alias(UpdateAliasRequest {
        alias_name: "alias/app".into(),
        target_key_id: k2.key_id.clone(),
    })
    .await
    .unwrap();
    assert_eq!(describe_key(&mut c, "alias/app").await.key_id, k2.key_id);
    assert_eq!(aliases_of(&mut c, Some(&k2.key_id)).await.len(), 1);

    // The rules.
    for (name, err) in [
        ("app", "ValidationException"),
        ("alias/", "InvalidAliasNameException"),
        ("alias/aws/s3", "NotAuthorizedException"),
        ("alias/has space", "ValidationException"),
        ("alias/ünïcode", "ValidationException"),
        (
            &*format!("alias/{}", "a".repeat(251)),
            "ValidationException",
        ),
        ("alias/app", "AlreadyExistsException"),
    ] {
        assert_err(alias(&mut c, name, &k1.key_id).await, err);
    }
    assert_err(
        alias(&mut c, "alias/x", "0b0ac0b2-9c8e-4a55-8d2a-2f0c6a1b9e11").await,
        "NotFoundException",
    );
    let r = c
        .update_alias(UpdateAliasRequest {
            alias_name: "alias/none".into(),
            target_key_id: k1.key_id.clone(),
        })
        .await;
    assert_err(r, "NotFoundException");
    assert_err(
        c.delete_alias(DeleteAliasRequest {
            alias_name: "alias/none".into(),
        })
        .await,
        "NotFoundException",
    );
    assert_err(
        c.describe_key(DescribeKeyRequest {
            key_id: "alias/none".into(),
            ..Default::default()
        })
        .await,
        "NotFoundException",
    );
    let r = c
        .list_aliases(ListAliasesRequest {
            key_id: Some("alias/app".into()),
            ..Default::default()
        })
        .await;
    assert_err(r, "NotFoundException");
    for (limit, marker, err) in [
        (Some(0), None, "ValidationException"),
        (Some(101), None, "ValidationException"),
        (None, Some("nope".to_string()), "InvalidMarkerException"),
    ] {
        assert_err(
            c.list_aliases(ListAliasesRequest {
                key_id: None,
                limit,
                marker,
            })
            .await,
            err,
        );
    }

    // At most 50 aliases per key.
    for i in 0..49 {
        alias(&mut c, &format!("alias/many-{i:02}"), &k1.key_id)
            .await
            .unwrap();
    }
    assert_eq!(aliases_of(&mut c, Some(&k1.key_id)).await.len(), 50);
    assert_err(
        alias(&mut c, "alias/one-too-many", &k1.key_id).await,
        "LimitExceededException",
    );
    let r = c
        .update_alias(UpdateAliasRequest {
            alias_name: "alias/app".into(),
            target_key_id: k1.key_id.clone(),
        })
        .await;
    assert_err(r, "LimitExceededException");

    c.delete_alias(DeleteAliasRequest {
        alias_name: "alias/app".into(),
    })
    .await
    .unwrap();
    assert_err(
        c.describe_key(DescribeKeyRequest {
            key_id: "alias/app".into(),
            ..Default::default()
        })
        .await,
        "NotFoundException",
    );
}

#[tokio::test]
async fn tags() {
    let h = Harness::start(&[ClusterSpec::good(A)]).await;
    let mut c = h.client().await;
    let store = h.connected_store(&mut c, 0, "tags").await;
    let k = create_key(&mut c, &store).await;
    let list = |c: &mut Client| {
        let mut c = c.clone();
        let id = k.key_id.clone();
        async move {
            c.list_resource_tags(ListResourceTagsRequest {
                key_id: id,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .tags
        }
    };
    c.tag_resource(TagResourceRequest {
        key_id: k.arn.clone(),
        tags: vec![tag("team", "a"), tag("env", "prod")],
    })
    .await
    .unwrap();
    c.tag_resource(TagResourceRequest {
        key_id: k.key_id.clone(),
        tags: vec![tag("team", "b")],
    })
    .await
    .unwrap();
    assert_eq!(
        list(&mut c).await,
        vec![tag("env", "prod"), tag("team", "b")]
    );
    c.untag_resource(UntagResourceRequest {
        key_id: k.key_id.clone(),
        tag_keys: vec!["env".into(), "absent".into()],
    })
    .await
    .unwrap();
    assert_eq!(list(&mut c).await, vec![tag("team", "b")]);

    for (tags, err) in [
        (vec![], "ValidationException"),
        (vec![tag("aws:x", "v")], "TagException"),
        (vec![tag("d", "1"), tag("d", "2")], "TagException"),
        (vec![tag("", "v")], "ValidationException"),
        (vec![tag("k", &"v".repeat(257))], "ValidationException"),
    ] {
        assert_err(
            c.tag_resource(TagResourceRequest {
                key_id: k.key_id.clone(),
                tags,
            })
            .await,
            err,
        );
    }
    // 50 in all, across calls; the call that would pass 50 changes nothing.
    let many: Vec<Tag> = (0..49).map(|i| tag(&format!("k{i:02}"), "v")).collect();
    c.tag_resource(TagResourceRequest {
        key_id: k.key_id.clone(),
        tags: many,
    })
    .await
    .unwrap();
    let r = c
        .tag_resource(TagResourceRequest {
            key_id: k.key_id.clone(),
            tags: vec![tag("x1", "v"), tag("team", "c")],
        })
        .await;
    assert_err(r, "TagException");
    let now = list(&mut c).await;
    assert_eq!(now.len(), 50);
    assert!(
        now.contains(&tag("team", "b")),
        "a refused TagResource must change nothing"
    );
    let r = c
        .untag_resource(UntagResourceRequest {
            key_id: k.key_id.clone(),
            tag_keys: vec![],
        })
        .await;
    assert_err(r, "ValidationException");
    let r = c
        .untag_resource(UntagResourceRequest {
            key_id: k.key_id.clone(),
            tag_keys: vec!["k".repeat(129)],
        })
        .await;
    assert_err(r, "ValidationException");
}

#[tokio::test]
async fn key_policies() {
    let h = Harness::start(&[ClusterSpec::good(A)]).await;
    let mut c = h.client().await;
    let store = h.connected_store(&mut c, 0, "policies").await;
    let k = create_key(&mut c, &store).await;
    let get = |c: &mut Client, name: Option<&str>| {
        let mut c = c.clone();
        let req = GetKeyPolicyRequest {
            key_id: k.key_id.clone(),
            policy_name: name.map(String::from),
        };
        async move { c.get_key_policy(req).await }
    };
    let default = get(&mut c, None).await.unwrap().into_inner();
    assert_eq!(default.policy_name, "default");
    let doc: serde_json::Value = serde_json::from_str(&default.policy).unwrap();
    assert_eq!(
        doc["Statement"][0]["Principal"]["AWS"],
        "arn:aws:iam::111122223333:root"
    );
    assert_eq!(doc["Statement"][0]["Action"], "kms:*");

    // The account root keeps its rights: a policy that locks the caller out is refused (the
    // lockout safety check; tests/access.rs).
    let mine = r#"{"Version":"2012-10-17","Statement":[{"Sid":"root","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::111122223333:root"},"Action":"kms:*","Resource":"*"},{"Sid":"app","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::111122223333:role/app"},"Action":["kms:Encrypt","kms:Decrypt"],"Resource":"*","Condition":{"StringEquals":{"kms:EncryptionContext:tenant":"blue"}}}]}"#;
    c.put_key_policy(PutKeyPolicyRequest {
        key_id: k.arn.clone(),
        policy: mine.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        get(&mut c, Some("default"))
            .await
            .unwrap()
            .into_inner()
            .policy,
        mine
    );

    for (doc, err) in [
        ("{not json", "MalformedPolicyDocumentException"),
        (r#"{"Statement":[]}"#, "MalformedPolicyDocumentException"),
        (
            r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"kms:Encrypt"}}"#,
            "MalformedPolicyDocumentException",
        ),
        (
            r#"{"Statement":{"Effect":"Permit","Principal":"*","Action":"kms:Encrypt","Resource":"*"}}"#,
            "MalformedPolicyDocumentException",
        ),
        ("", "ValidationException"),
    ] {
        let r = c
            .put_key_policy(PutKeyPolicyRequest {
                key_id: k.key_id.clone(),
                policy: doc.into(),
                ..Default::default()
            })
            .await;
        let msg = assert_err(r, err);
        assert!(!msg.is_empty());
    }
    let huge = format!(
        r#"{{"Id":"{}","Statement":{{"Effect":"Allow","Principal":"*","Action":"*","Resource":"*"}}}}"#,
        "x".repeat(33_000)
    );
    let r = c
        .put_key_policy(PutKeyPolicyRequest {
            key_id: k.key_id.clone(),
            policy: huge,
            ..Default::default()
        })
        .await;
    assert_err(r, "LimitExceededException");
    assert_eq!(
        get(&mut c, None).await.unwrap().into_inner().policy,
        mine,
        "refused puts change nothing"
    );
    assert_err(get(&mut c, Some("other")).await, "NotFoundException");
    let names = c
        .list_key_policies(ListKeyPoliciesRequest {
            key_id: k.key_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (names.policy_names, names.truncated),
        (vec!["default".to_string()], false)
    );

    // CreateKey with a policy stores it; a malformed one creates nothing.
    let with = c
        .create_key(CreateKeyRequest {
            custom_key_store_id: Some(store.clone()),
            origin: Some("AWS_CLOUDHSM".into()),
            policy: Some(mine.into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key_metadata
        .unwrap();
    let p = c
        .get_key_policy(GetKeyPolicyRequest {
            key_id: with.key_id,
            policy_name: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.policy, mine);
    let r = c
        .create_key(CreateKeyRequest {
            custom_key_store_id: Some(store.clone()),
            origin: Some("AWS_CLOUDHSM".into()),
            policy: Some("[]".into()),
            ..Default::default()
        })
        .await;
    assert_err(r, "MalformedPolicyDocumentException");
    assert_eq!(
        c.list_keys(ListKeysRequest::default())
            .await
            .unwrap()
            .into_inner()
            .keys
            .len(),
        2
    );
}

/// Waits (up to 10 s) for the deletion task to remove a key; returns whether it did.
async fn deleted_soon(c: &mut Client, key_id: &str) -> bool {
    for _ in 0..100 {
        let r = c
            .describe_key(DescribeKeyRequest {
                key_id: key_id.into(),
                ..Default::default()
            })
            .await;
        match r {
            // Deleted: the key is not found. Any other error is no sign of deletion.
            Err(e) if aws_error(&e) == "NotFoundException" => return true,
            Err(e) => panic!("DescribeKey while waiting for the deletion: {e:?}"),
            Ok(_) => {}
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    false
}

fn objects_labelled(h: &Harness, label: &str) -> bool {
    let out = std::process::Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", h.softhsm2_conf())
        .args(["--module"])
        .arg(softhsm2_module())
        .args([
            "--token-label",
            &h.cluster(0).token_label,
            "--login",
            "--pin",
            PASSWORD,
            "--list-objects",
        ])
        .output()
        .expect("pkcs11-tool (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).contains(label)
}

#[tokio::test]
async fn scheduled_deletion() {
    let mut h = Harness::start(&[ClusterSpec::good(A)]).await;
    let mut c = h.client().await;
    let store = h.connected_store(&mut c, 0, "deletion").await;
    let doomed = create_key(&mut c, &store).await;
    let kept = create_key(&mut c, &store).await;
    let orphan = create_key(&mut c, &store).await;
    let ct = encrypt(&mut c, &doomed.key_id, b"soon gone").await;
    alias(&mut c, "alias/doomed", &doomed.key_id).await.unwrap();

    for days in [0, 6, 31, 365] {
        let r = c
            .schedule_key_deletion(ScheduleKeyDeletionRequest {
                key_id: doomed.key_id.clone(),
                pending_window_in_days: Some(days),
            })
            .await;
        assert_err(r, "ValidationException");
    }
    // Default window 30 days; cancel brings the key back Disabled.
    let s = c
        .schedule_key_deletion(ScheduleKeyDeletionRequest {
            key_id: kept.key_id.clone(),
            pending_window_in_days: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            s.key_id.as_str(),
            s.key_state.as_str(),
            s.pending_window_in_days
        ),
        (kept.arn.as_str(), "PendingDeletion", 30)
    );
    let days =
        (s.deletion_date.unwrap().seconds - kept.creation_date.unwrap().seconds) as f64 / 86400.0;
    assert!((29.9..30.1).contains(&days), "{days}");
    let r = c
        .schedule_key_deletion(ScheduleKeyDeletionRequest {
            key_id: kept.key_id.clone(),
            pending_window_in_days: None,
        })
        .await;
    assert_err(r, "KMSInvalidStateException");
    let out = c
        .cancel_key_deletion(CancelKeyDeletionRequest {
            key_id: kept.key_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.key_id, kept.arn);
    let m = describe_key(&mut c, &kept.key_id).await;
    assert_eq!(
        (
            m.key_state.as_str(),
            m.deletion_date,
            m.pending_deletion_window_in_days
        ),
        ("Disabled", None, None)
    );
    assert_err(
        c.cancel_key_deletion(CancelKeyDeletionRequest {
            key_id: kept.key_id.clone(),
        })
        .await,
        "KMSInvalidStateException",
    );

    // Pending deletion: visible, with its date; unusable.
    c.schedule_key_deletion(ScheduleKeyDeletionRequest {
        key_id: doomed.key_id.clone(),
        pending_window_in_days: Some(7),
    })
    .await
    .unwrap();
    let m = describe_key(&mut c, &doomed.key_id).await;
    assert_eq!(
        (
            m.key_state.as_str(),
            m.enabled,
            m.pending_deletion_window_in_days
        ),
        ("PendingDeletion", false, Some(7))
    );
    assert!(m.deletion_date.is_some());
    let msg = assert_err(
        c.decrypt(DecryptRequest {
            ciphertext_blob: ct.clone(),
            ..Default::default()
        })
        .await,
        "KMSInvalidStateException",
    );
    assert!(msg.contains("pending deletion"), "{msg}");

    // A key pending deletion in a disconnected store stays PendingDeletion and can be
    // cancelled; schedule one whose store will be disconnected when its date comes.
    c.schedule_key_deletion(ScheduleKeyDeletionRequest {
        key_id: orphan.key_id.clone(),
        pending_window_in_days: Some(7),
    })
    .await
    .unwrap();
    disconnect(&mut c, &store).await;
    assert_eq!(
        describe_key(&mut c, &orphan.key_id).await.key_state,
        "PendingDeletion"
    );
    assert_eq!(
        describe_key(&mut c, &kept.key_id).await.key_state,
        "Unavailable"
    );
    c.cancel_key_deletion(CancelKeyDeletionRequest {
        key_id: orphan.key_id.clone(),
    })
    .await
    .unwrap();
    c.schedule_key_deletion(ScheduleKeyDeletionRequest {
        key_id: orphan.key_id.clone(),
        pending_window_in_days: Some(7),
    })
    .await
    .unwrap();
    assert!(objects_labelled(&h, &orphan.arn));

    // Eight days later (shifted clock) with the store disconnected: the key is deleted, its
    // material is left orphaned in the token (and the log names it).
    h.restart_with(|s| s.lifecycle.clock_offset_seconds = 8 * 86_400)
        .await;
    let mut c = h.client().await;
    let gone = deleted_soon(&mut c, &orphan.key_id).await;
    assert!(gone, "the key due for deletion was not deleted");
    assert_err(
        c.describe_key(DescribeKeyRequest {
            key_id: orphan.key_id.clone(),
            ..Default::default()
        })
        .await,
        "NotFoundException",
    );
    assert!(
        objects_labelled(&h, &orphan.arn),
        "material of a key deleted while disconnected stays"
    );
    // The doomed key (same store) went too.
    assert_err(
        c.describe_key(DescribeKeyRequest {
            key_id: doomed.key_id.clone(),
            ..Default::default()
        })
        .await,
        "NotFoundException",
    );
    assert_eq!(
        describe_key(&mut c, &kept.key_id).await.key_state,
        "Unavailable"
    );

    // With the store connected, deletion destroys the material and removes the aliases.
    assert_eq!(connect(&mut c, &store).await, ("CONNECTED".into(), None));
    alias(&mut c, "alias/kept", &kept.key_id).await.unwrap();
    c.schedule_key_deletion(ScheduleKeyDeletionRequest {
        key_id: kept.key_id.clone(),
        pending_window_in_days: Some(7),
    })
    .await
    .unwrap();
    assert!(objects_labelled(&h, &kept.arn));
    h.restart_with(|s| s.lifecycle.clock_offset_seconds = 16 * 86_400)
        .await;
    let mut c = h.client().await;
    let gone = deleted_soon(&mut c, &kept.key_id).await;
    assert!(gone);
    assert!(
        !objects_labelled(&h, &kept.arn),
        "the token object must be destroyed"
    );
    assert!(
        aliases_of(&mut c, None).await.is_empty(),
        "aliases of deleted keys go with them"
    );
    let r = c
        .decrypt(DecryptRequest {
            ciphertext_blob: ct,
            ..Default::default()
        })
        .await;
    assert_err(r, "InvalidCiphertextException");
}

/// The operations of the key-state table's rows that act on one key, as the server is
/// driven through them here.
const OPS: &[Op] = &[
    Op::DescribeKey,
    Op::ListResourceTags,
    Op::GetKeyPolicy,
    Op::ListKeyPolicies,
    Op::PutKeyPolicy,
    Op::ListAliases,
    Op::CreateAlias,
    Op::UpdateAlias,
    Op::DeleteAlias,
    Op::EnableKey,
    Op::DisableKey,
    Op::ScheduleKeyDeletion,
    Op::CancelKeyDeletion,
    Op::TagResource,
    Op::UntagResource,
    Op::UpdateKeyDescription,
    Op::Encrypt,
    Op::Decrypt,
    Op::ReEncrypt,
    Op::GenerateDataKey,
    Op::GenerateDataKeyWithoutPlaintext,
];

/// The expected outcome of `op` on a key in `state`: the key-state table itself
/// (`KeyState::check`, which crates/model checks against AWS's page), for the key `arn`.
fn expected(op: Op, state: KeyState, arn: &str) -> Option<(&'static str, String)> {
    state.check(op).err().map(|refusal| {
        let e = refusal.error(arn);
        (e.kind.aws_name(), e.message)
    })
}

struct Subject {
    key: KeyMetadata,
    ciphertext: Vec<u8>,
    alias: String,
}

async fn run_op(c: &mut Client, op: Op, s: &Subject, other_alias: &str) -> Result<(), Status> {
    let id = s.key.key_id.clone();
    match op {
        Op::DescribeKey => c
            .describe_key(DescribeKeyRequest {
                key_id: id,
                ..Default::default()
            })
            .await
            .map(drop),
        Op::ListResourceTags => c
            .list_resource_tags(ListResourceTagsRequest {
                key_id: id,
                ..Default::default()
            })
            .await
            .map(drop),
        Op::GetKeyPolicy => c
            .get_key_policy(GetKeyPolicyRequest {
                key_id: id,
                policy_name: None,
            })
            .await
            .map(drop),
        Op::ListKeyPolicies => c
            .list_key_policies(ListKeyPoliciesRequest {
                key_id: id,
                ..Default::default()
            })
            .await
            .map(drop),
        Op::PutKeyPolicy => {
            let policy = hsm_kms::iam::document::default_policy("aws", "111122223333");
            c.put_key_policy(PutKeyPolicyRequest {
                key_id: id,
                policy,
                ..Default::default()
            })
            .await
            .map(drop)
        }
        Op::ListAliases => c
            .list_aliases(ListAliasesRequest {
                key_id: Some(id),
                ..Default::default()
            })
            .await
            .map(drop),
        Op::CreateAlias => alias(c, &format!("{}-new", s.alias), &id).await.map(drop),
        Op::UpdateAlias => c
            .update_alias(UpdateAliasRequest {
                alias_name: other_alias.into(),
                target_key_id: id,
            })
            .await
            .map(drop),
        Op::DeleteAlias => c
            .delete_alias(DeleteAliasRequest {
                alias_name: s.alias.clone(),
            })
            .await
            .map(drop),
        Op::EnableKey => c
            .enable_key(EnableKeyRequest { key_id: id })
            .await
            .map(drop),
        Op::DisableKey => c
            .disable_key(DisableKeyRequest { key_id: id })
            .await
            .map(drop),
        Op::ScheduleKeyDeletion => c
            .schedule_key_deletion(ScheduleKeyDeletionRequest {
                key_id: id,
                pending_window_in_days: Some(7),
            })
            .await
            .map(drop),
        Op::CancelKeyDeletion => c
            .cancel_key_deletion(CancelKeyDeletionRequest { key_id: id })
            .await
            .map(drop),
        Op::TagResource => c
            .tag_resource(TagResourceRequest {
                key_id: id,
                tags: vec![tag("t", "v")],
            })
            .await
            .map(drop),
        Op::UntagResource => c
            .untag_resource(UntagResourceRequest {
                key_id: id,
                tag_keys: vec!["t".into()],
            })
            .await
            .map(drop),
        Op::UpdateKeyDescription => c
            .update_key_description(UpdateKeyDescriptionRequest {
                key_id: id,
                description: "d".into(),
            })
            .await
            .map(drop),
        Op::Encrypt => c
            .encrypt(EncryptRequest {
                key_id: id,
                plaintext: b"x".to_vec(),
                ..Default::default()
            })
            .await
            .map(drop),
        Op::Decrypt => c
            .decrypt(DecryptRequest {
                ciphertext_blob: s.ciphertext.clone(),
                ..Default::default()
            })
            .await
            .map(drop),
        Op::ReEncrypt => c
            .re_encrypt(ReEncryptRequest {
                ciphertext_blob: s.ciphertext.clone(),
                destination_key_id: id,
                ..Default::default()
            })
            .await
            .map(drop),
        Op::GenerateDataKey => c
            .generate_data_key(GenerateDataKeyRequest {
                key_id: id,
                number_of_bytes: Some(8),
                ..Default::default()
            })
            .await
            .map(drop),
        Op::GenerateDataKeyWithoutPlaintext => c
            .generate_data_key_without_plaintext(GenerateDataKeyWithoutPlaintextRequest {
                key_id: id,
                number_of_bytes: Some(8),
                ..Default::default()
            })
            .await
            .map(drop),
        _ => unreachable!("{op:?}"),
    }
}

#[tokio::test]
async fn key_state_table_every_cell() {
    let h = Harness::start(&[ClusterSpec::good(A), ClusterSpec::good(B)]).await;
    let mut c = h.client().await;
    let live = h.connected_store(&mut c, 0, "live").await;
    let away = h.connected_store(&mut c, 1, "away").await;
    let states = [
        KeyState::Enabled,
        KeyState::Disabled,
        KeyState::PendingDeletion,
        KeyState::Unavailable,
    ];

    // A fresh key for every cell, put in the cell's state.
    let mut subjects: HashMap<(usize, usize), Subject> = HashMap::new();
    for (si, state) in states.iter().enumerate() {
        // The target of each cell's second alias (UpdateAlias moves it onto the cell's key).
        let helper = create_key(&mut c, &live).await;
        for (oi, _) in OPS.iter().enumerate() {
            let store = if *state == KeyState::Unavailable {
                &away
            } else {
                &live
            };
            let key = create_key(&mut c, store).await;
            let ciphertext = encrypt(&mut c, &key.key_id, b"cell").await;
            let name = format!("alias/cell-{si}-{oi}");
            alias(&mut c, &name, &key.key_id).await.unwrap();
            alias(&mut c, &format!("{name}-other"), &helper.key_id)
                .await
                .unwrap();
            match *state {
                KeyState::Disabled => {
                    c.disable_key(DisableKeyRequest {
                        key_id: key.key_id.clone(),
                    })
                    .await
                    .unwrap();
                }
                KeyState::PendingDeletion => {
                    c.schedule_key_deletion(ScheduleKeyDeletionRequest {
                        key_id: key.key_id.clone(),
                        pending_window_in_days: Some(30),
                    })
                    .await
                    .unwrap();
                }
                _ => {}
            }
            subjects.insert(
                (si, oi),
                Subject {
                    key,
                    ciphertext,
                    alias: name,
                },
            );
        }
    }
    disconnect(&mut c, &away).await;

    let mut failures = Vec::new();
    for (si, state) in states.iter().enumerate() {
        for (oi, op) in OPS.iter().enumerate() {
            let s = &subjects[&(si, oi)];
            assert_eq!(
                describe_key(&mut c, &s.key.key_id).await.key_state,
                state.as_str()
            );
            let got = run_op(&mut c, *op, s, &format!("{}-other", s.alias)).await;
            let got = got.as_ref().err().map(|st| {
                use tonic_types::StatusExt;
                let name = st
                    .get_details_error_info()
                    .map(|i| i.reason)
                    .unwrap_or_else(|| format!("{st:?}"));
                (name, st.message().to_string())
            });
            let want = expected(*op, *state, &s.key.arn);
            let want = want.map(|(name, message)| (name.to_string(), message));
            if got != want {
                failures.push(format!("{op:?} on {state}: expected {want:?}, got {got:?}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "key-state table mismatches:\n{}",
        failures.join("\n")
    );

    // Enable/Disable on an Unavailable key take effect once the store reconnects.
    let en = &subjects[&(3, OPS.iter().position(|o| *o == Op::DisableKey).unwrap())];
    let sched = &subjects[&(
        3,
        OPS.iter()
            .position(|o| *o == Op::ScheduleKeyDeletion)
            .unwrap(),
    )];
    assert_eq!(connect(&mut c, &away).await, ("CONNECTED".into(), None));
    assert_eq!(
        describe_key(&mut c, &en.key.key_id).await.key_state,
        "Disabled"
    );
    assert_eq!(
        describe_key(&mut c, &sched.key.key_id).await.key_state,
        "PendingDeletion"
    );
}

#[tokio::test]
async fn concurrent_changes_lose_no_update() {
    let h = Harness::start(&[ClusterSpec::good(A)]).await;
    let mut c = h.client().await;
    let store = h.connected_store(&mut c, 0, "race").await;
    let k = create_key(&mut c, &store).await;
    let k2 = create_key(&mut c, &store).await;

    // 40 concurrent TagResource calls, each adding its own tag: all 40 land.
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let mut c = c.clone();
            let id = k.key_id.clone();
            tokio::spawn(async move {
                c.tag_resource(TagResourceRequest {
                    key_id: id,
                    tags: vec![tag(&format!("t{i:02}"), "v")],
                })
                .await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let tags = c
        .list_resource_tags(ListResourceTagsRequest {
            key_id: k.key_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tags.tags.len(), 40);

    // 60 concurrent CreateAlias for one key: exactly 50 succeed.
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let mut c = c.clone();
            let id = k.key_id.clone();
            tokio::spawn(async move { alias(&mut c, &format!("alias/race-{i:02}"), &id).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_err::<CreateAliasResponse>(Err(e), "LimitExceededException");
            }
        }
    }
    assert_eq!(ok, 50);
    assert_eq!(aliases_of(&mut c, Some(&k.key_id)).await.len(), 50);

    // 20 concurrent CreateAlias of one name: exactly one wins.
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let mut c = c.clone();
            let id = k2.key_id.clone();
            tokio::spawn(async move { alias(&mut c, "alias/contested", &id).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_err::<CreateAliasResponse>(Err(e), "AlreadyExistsException");
            }
        }
    }
    assert_eq!(ok, 1);

    // Enable/Disable storms racing one ScheduleKeyDeletion: the deletion is never undone.
    let mut tasks = Vec::new();
    for i in 0..30 {
        let mut cc = c.clone();
        let id = k2.key_id.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                cc.enable_key(EnableKeyRequest { key_id: id })
                    .await
                    .map(|_| ())
            } else {
                cc.disable_key(DisableKeyRequest { key_id: id })
                    .await
                    .map(|_| ())
            }
        }));
        if i == 15 {
            let mut c = c.clone();
            let id = k2.key_id.clone();
            tasks.push(tokio::spawn(async move {
                c.schedule_key_deletion(ScheduleKeyDeletionRequest {
                    key_id: id,
                    pending_window_in_days: Some(7),
                })
                .await
                .map(|_| ())
            }));
        }
    }
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            assert_err::<()>(Err(e), "KMSInvalidStateException");
        }
    }
    assert_eq!(
        describe_key(&mut c, &k2.key_id).await.key_state,
        "PendingDeletion"
    );
}
