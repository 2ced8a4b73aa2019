//! Key operations (lifecycle, tags, key policies): wire <-> domain.

use std::sync::Arc;

use super::timestamp;
use crate::kms::crypto::SYMMETRIC_DEFAULT;
use crate::kms::fields::check_description;
use crate::kms::fields::{KeyId, KeyStoreId, Marker};
use crate::kms::gate::{Authorized, Gate, KeyNamed, Subject};
use crate::kms::grants::check_grant_tokens;
use crate::kms::keys::check_tags;
use crate::kms::keys::{CreateKey, KeyView};
use crate::kms::Kms;
use crate::proto::*;
use model::context::NO_CONTEXT;
use model::error::KmsResult;

pub(super) async fn create_key(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: CreateKeyRequest,
) -> KmsResult<CreateKeyResponse> {
    if let Some(id) = &r.custom_key_store_id {
        KeyStoreId::new(id)?;
    }
    let bypass = r.bypass_policy_lockout_safety_check.unwrap_or(false);
    let auth = gate
        .authorize(kms, Subject::AccountBypassingLockout(bypass))
        .await?;
    let key = kms
        .create_key(
            &auth,
            CreateKey {
                description: r.description,
                key_usage: r.key_usage,
                customer_master_key_spec: r.customer_master_key_spec,
                key_spec: r.key_spec,
                origin: r.origin,
                custom_key_store_id: r.custom_key_store_id,
                tags: r
                    .tags
                    .into_iter()
                    .map(|t| (t.tag_key, t.tag_value))
                    .collect(),
                multi_region: r.multi_region,
                policy: r.policy,
                bypass_policy_lockout_safety_check: r
                    .bypass_policy_lockout_safety_check
                    .unwrap_or(false),
            },
        )
        .await?;
    Ok(CreateKeyResponse {
        key_metadata: Some(key_metadata(key)),
    })
}

pub(super) async fn describe_key(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: DescribeKeyRequest,
) -> KmsResult<DescribeKeyResponse> {
    check_grant_tokens(&r.grant_tokens)?;
    let key_id = KeyId::new("KeyId", &r.key_id)?.get();
    let auth = gate
        .authorize(kms, Subject::Key(KeyNamed::any(key_id, &NO_CONTEXT)))
        .await?;
    let key = kms.describe_key(&auth).await?;
    Ok(DescribeKeyResponse {
        key_metadata: Some(key_metadata(key)),
    })
}

pub(super) async fn list_keys(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: ListKeysRequest,
) -> KmsResult<ListKeysResponse> {
    let marker = Marker::optional(r.marker.as_deref())?;
    let auth = gate.authorize(kms, Subject::Account).await?;
    let page = kms.list_keys(&auth, r.limit, marker).await?;
    Ok(ListKeysResponse {
        keys: page
            .items
            .into_iter()
            .map(|(id, arn)| KeyListEntry {
                key_id: id.to_string(),
                key_arn: arn,
            })
            .collect(),
        truncated: page.next_marker.is_some(),
        next_marker: page.next_marker,
    })
}

pub(super) async fn list_resource_tags(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: ListResourceTagsRequest,
) -> KmsResult<ListResourceTagsResponse> {
    let marker = Marker::optional(r.marker.as_deref())?;
    let auth = key_named(kms, gate, &r.key_id).await?;
    let page = kms.list_resource_tags(&auth, r.limit, marker).await?;
    Ok(ListResourceTagsResponse {
        tags: page
            .items
            .into_iter()
            .map(|(tag_key, tag_value)| Tag { tag_key, tag_value })
            .collect(),
        truncated: page.next_marker.is_some(),
        next_marker: page.next_marker,
    })
}

pub(super) async fn enable_key(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: EnableKeyRequest,
) -> KmsResult<EnableKeyResponse> {
    kms.set_key_enabled(&key_named(kms, gate, &r.key_id).await?)
        .await?;
    Ok(EnableKeyResponse {})
}

pub(super) async fn disable_key(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: DisableKeyRequest,
) -> KmsResult<DisableKeyResponse> {
    kms.set_key_enabled(&key_named(kms, gate, &r.key_id).await?)
        .await?;
    Ok(DisableKeyResponse {})
}

pub(super) async fn update_key_description(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: UpdateKeyDescriptionRequest,
) -> KmsResult<UpdateKeyDescriptionResponse> {
    check_description(&r.description)?;
    let auth = key_named(kms, gate, &r.key_id).await?;
    kms.update_key_description(&auth, &r.description).await?;
    Ok(UpdateKeyDescriptionResponse {})
}

pub(super) async fn schedule_key_deletion(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: ScheduleKeyDeletionRequest,
) -> KmsResult<ScheduleKeyDeletionResponse> {
    let auth = key_named(kms, gate, &r.key_id).await?;
    let k = kms
        .schedule_key_deletion(&auth, r.pending_window_in_days)
        .await?;
    Ok(ScheduleKeyDeletionResponse {
        key_id: k.arn,
        deletion_date: k.deletion_date_ms.and_then(timestamp),
        key_state: k.key_state.as_str().into(),
        pending_window_in_days: k.pending_window_days.unwrap_or_default(),
    })
}

pub(super) async fn cancel_key_deletion(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: CancelKeyDeletionRequest,
) -> KmsResult<CancelKeyDeletionResponse> {
    let auth = key_named(kms, gate, &r.key_id).await?;
    let id = kms.cancel_key_deletion(&auth).await?;
    Ok(CancelKeyDeletionResponse {
        key_id: kms.scope.key_arn(&id),
    })
}

pub(super) async fn tag_resource(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: TagResourceRequest,
) -> KmsResult<TagResourceResponse> {
    let tags: Vec<(String, String)> = r
        .tags
        .into_iter()
        .map(|t| (t.tag_key, t.tag_value))
        .collect();
    check_tags(&tags)?;
    let auth = key_named(kms, gate, &r.key_id).await?;
    kms.tag_resource(&auth, &tags).await?;
    Ok(TagResourceResponse {})
}

pub(super) async fn untag_resource(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: UntagResourceRequest,
) -> KmsResult<UntagResourceResponse> {
    let auth = key_named(kms, gate, &r.key_id).await?;
    kms.untag_resource(&auth, &r.tag_keys).await?;
    Ok(UntagResourceResponse {})
}

pub(super) async fn put_key_policy(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: PutKeyPolicyRequest,
) -> KmsResult<PutKeyPolicyResponse> {
    let key_id = KeyId::new("KeyId", &r.key_id)?.get();
    let bypass = r.bypass_policy_lockout_safety_check.unwrap_or(false);
    let auth = gate
        .authorize(kms, Subject::KeyPolicy(KeyNamed::id(key_id), bypass))
        .await?;
    kms.put_key_policy(&auth, r.policy_name.as_deref(), &r.policy, bypass)
        .await?;
    Ok(PutKeyPolicyResponse {})
}

pub(super) async fn get_key_policy(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: GetKeyPolicyRequest,
) -> KmsResult<GetKeyPolicyResponse> {
    let auth = key_named(kms, gate, &r.key_id).await?;
    let policy = kms.get_key_policy(&auth, r.policy_name.as_deref()).await?;
    Ok(GetKeyPolicyResponse {
        policy,
        policy_name: "default".into(),
    })
}

pub(super) async fn list_key_policies(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: ListKeyPoliciesRequest,
) -> KmsResult<ListKeyPoliciesResponse> {
    let marker = Marker::optional(r.marker.as_deref())?;
    let auth = key_named(kms, gate, &r.key_id).await?;
    let page = kms.list_key_policies(&auth, r.limit, marker).await?;
    Ok(ListKeyPoliciesResponse {
        policy_names: page.items,
        truncated: false,
        next_marker: None,
    })
}

pub(super) async fn get_key_last_usage(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: GetKeyLastUsageRequest,
) -> KmsResult<GetKeyLastUsageResponse> {
    let auth = key_named(kms, gate, &r.key_id).await?;
    let u = kms.key_last_usage(&auth).await?;
    Ok(GetKeyLastUsageResponse {
        key_id: kms.scope.key_arn(&u.key_id),
        key_last_usage: u.last.map(|l| KeyLastUsageData {
            operation: Some(l.operation),
            timestamp: timestamp(l.used_ms),
            cloud_trail_event_id: Some(l.request_id.clone()),
            kms_request_id: Some(l.request_id),
        }),
        tracking_start_date: timestamp(u.tracking_start_ms),
        key_creation_date: timestamp(u.key_creation_ms),
    })
}

/// Authorizes the gate's operation on the key a KeyId member names (key id or key ARN).
async fn key_named<'c>(kms: &Kms, gate: Gate<'c>, key_id: &str) -> KmsResult<Authorized<'c>> {
    let key_id = KeyId::new("KeyId", key_id)?.get();
    gate.authorize(kms, Subject::Key(KeyNamed::id(key_id)))
        .await
}

fn key_metadata(k: KeyView) -> KeyMetadata {
    KeyMetadata {
        enabled: k.enabled(),
        aws_account_id: k.account_id,
        key_id: k.key_id.to_string(),
        arn: k.arn,
        creation_date: timestamp(k.creation_date_ms),
        description: k.description,
        key_usage: "ENCRYPT_DECRYPT".into(),
        key_state: k.key_state.as_str().into(),
        deletion_date: k.deletion_date_ms.and_then(timestamp),
        origin: "AWS_CLOUDHSM".into(),
        custom_key_store_id: k.custom_key_store_id,
        cloud_hsm_cluster_id: k.cloud_hsm_cluster_id,
        key_manager: "CUSTOMER".into(),
        customer_master_key_spec: SYMMETRIC_DEFAULT.into(),
        key_spec: SYMMETRIC_DEFAULT.into(),
        encryption_algorithms: vec![SYMMETRIC_DEFAULT.into()],
        multi_region: false,
        pending_deletion_window_in_days: k.pending_window_days,
    }
}
