//! Grant operations: wire <-> domain.

use std::sync::Arc;

use std::collections::{BTreeMap, HashMap};

use super::timestamp;
use crate::kms::access::Caller;
use crate::kms::fields::{KeyId, Marker};
use crate::kms::grants::{check_grant_tokens, CreateGrant, GrantView};
use crate::kms::Kms;
use crate::kms::Page;
use crate::proto::*;
use model::error::KmsResult;

pub(super) async fn create_grant(
    kms: &Arc<Kms>,
    caller: &Caller,
    r: CreateGrantRequest,
) -> KmsResult<CreateGrantResponse> {
    check_grant_tokens(&r.grant_tokens)?;
    let constraints = r.constraints.unwrap_or_default();
    let nonempty = |m: HashMap<String, String>| (!m.is_empty()).then(|| m.into_iter().collect());
    let (grant_id, grant_token) = kms
        .create_grant(
            caller,
            CreateGrant {
                key_id: KeyId::new("KeyId", &r.key_id)?.get().to_string(),
                grantee_principal: r.grantee_principal,
                retiring_principal: r.retiring_principal,
                operations: r.operations,
                context_subset: nonempty(constraints.encryption_context_subset),
                context_equals: nonempty(constraints.encryption_context_equals),
                name: r.name,
                dry_run: r.dry_run.unwrap_or(false),
            },
        )
        .await?;
    Ok(CreateGrantResponse {
        grant_token,
        grant_id,
    })
}

pub(super) async fn list_grants(
    kms: &Arc<Kms>,
    caller: &Caller,
    r: ListGrantsRequest,
) -> KmsResult<ListGrantsResponse> {
    let page = kms
        .list_grants(
            caller,
            KeyId::new("KeyId", &r.key_id)?.get(),
            r.grant_id.as_deref(),
            r.grantee_principal.as_deref(),
            r.limit,
            Marker::optional(r.marker.as_deref())?,
        )
        .await?;
    Ok(grant_page(page))
}

pub(super) async fn list_retirable_grants(
    kms: &Arc<Kms>,
    caller: &Caller,
    r: ListRetirableGrantsRequest,
) -> KmsResult<ListGrantsResponse> {
    let page = kms
        .list_retirable_grants(
            caller,
            &r.retiring_principal,
            r.limit,
            Marker::optional(r.marker.as_deref())?,
        )
        .await?;
    Ok(grant_page(page))
}

pub(super) async fn retire_grant(
    kms: &Arc<Kms>,
    caller: &Caller,
    r: RetireGrantRequest,
) -> KmsResult<RetireGrantResponse> {
    kms.retire_grant(
        caller,
        r.grant_token.as_deref(),
        KeyId::optional("KeyId", r.key_id.as_deref())?.map(KeyId::get),
        r.grant_id.as_deref(),
        r.dry_run.unwrap_or(false),
    )
    .await?;
    Ok(RetireGrantResponse {})
}

pub(super) async fn revoke_grant(
    kms: &Arc<Kms>,
    caller: &Caller,
    r: RevokeGrantRequest,
) -> KmsResult<RevokeGrantResponse> {
    kms.revoke_grant(
        caller,
        KeyId::new("KeyId", &r.key_id)?.get(),
        &r.grant_id,
        r.dry_run.unwrap_or(false),
    )
    .await?;
    Ok(RevokeGrantResponse {})
}

fn grant_page(page: Page<GrantView>) -> ListGrantsResponse {
    let entry = |g: GrantView| {
        let r = g.record;
        let map = |m: Option<BTreeMap<String, String>>| -> HashMap<String, String> {
            m.unwrap_or_default().into_iter().collect()
        };
        let constraints =
            (r.context_subset.is_some() || r.context_equals.is_some()).then(|| GrantConstraints {
                encryption_context_subset: map(r.context_subset),
                encryption_context_equals: map(r.context_equals),
            });
        GrantListEntry {
            key_id: g.key_arn,
            grant_id: r.grant_id,
            name: r.name,
            creation_date: timestamp(r.creation_date_ms),
            grantee_principal: r.grantee_principal,
            retiring_principal: r.retiring_principal,
            issuing_account: r.issuing_account,
            operations: r.operations,
            constraints,
        }
    };
    ListGrantsResponse {
        grants: page.items.into_iter().map(entry).collect(),
        truncated: page.next_marker.is_some(),
        next_marker: page.next_marker,
    }
}
