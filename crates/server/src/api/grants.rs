//! Grant operations: wire <-> domain.

use std::sync::Arc;

use std::collections::{BTreeMap, HashMap};

use super::timestamp;
use crate::kms::fields::{KeyId, Marker};
use crate::kms::gate::{Gate, KeyNamed, Subject};
use crate::kms::grants::{check_grant_tokens, CreateGrant, GrantView};
use crate::kms::Kms;
use crate::kms::Page;
use crate::proto::*;
use model::error::KmsResult;

pub(super) async fn create_grant(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: CreateGrantRequest,
) -> KmsResult<CreateGrantResponse> {
    check_grant_tokens(&r.grant_tokens)?;
    let constraints = r.constraints.unwrap_or_default();
    let nonempty = |m: HashMap<String, String>| (!m.is_empty()).then(|| m.into_iter().collect());
    let key_id = KeyId::new("KeyId", &r.key_id)?.get();
    let record = kms.new_grant(CreateGrant {
        grantee_principal: r.grantee_principal,
        retiring_principal: r.retiring_principal,
        operations: r.operations,
        context_subset: nonempty(constraints.encryption_context_subset),
        context_equals: nonempty(constraints.encryption_context_equals),
        name: r.name,
    })?;
    let auth = gate
        .authorize(kms, Subject::NewGrant(key_id, &record))
        .await?;
    let (grant_id, grant_token) = kms
        .create_grant(&auth, record, r.dry_run.unwrap_or(false))
        .await?;
    Ok(CreateGrantResponse {
        grant_token,
        grant_id,
    })
}

pub(super) async fn list_grants(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: ListGrantsRequest,
) -> KmsResult<ListGrantsResponse> {
    let key_id = KeyId::new("KeyId", &r.key_id)?.get();
    let marker = Marker::optional(r.marker.as_deref())?;
    let auth = gate
        .authorize(kms, Subject::Key(KeyNamed::id(key_id)))
        .await?;
    let page = kms
        .list_grants(
            &auth,
            r.grant_id.as_deref(),
            r.grantee_principal.as_deref(),
            r.limit,
            marker,
        )
        .await?;
    Ok(grant_page(page))
}

pub(super) async fn list_retirable_grants(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: ListRetirableGrantsRequest,
) -> KmsResult<ListGrantsResponse> {
    let marker = Marker::optional(r.marker.as_deref())?;
    let auth = gate.authorize(kms, Subject::Account).await?;
    let page = kms
        .list_retirable_grants(&auth, &r.retiring_principal, r.limit, marker)
        .await?;
    Ok(grant_page(page))
}

pub(super) async fn retire_grant(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: RetireGrantRequest,
) -> KmsResult<RetireGrantResponse> {
    let key_ref = KeyId::optional("KeyId", r.key_id.as_deref())?.map(KeyId::get);
    let auth = gate
        .authorize(
            kms,
            Subject::Grant {
                token: r.grant_token.as_deref(),
                key_ref,
                grant_id: r.grant_id.as_deref(),
            },
        )
        .await?;
    kms.retire_grant(&auth, r.dry_run.unwrap_or(false)).await?;
    Ok(RetireGrantResponse {})
}

pub(super) async fn revoke_grant(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: RevokeGrantRequest,
) -> KmsResult<RevokeGrantResponse> {
    let key_id = KeyId::new("KeyId", &r.key_id)?.get();
    let auth = gate
        .authorize(kms, Subject::Key(KeyNamed::id(key_id)))
        .await?;
    kms.revoke_grant(&auth, &r.grant_id, r.dry_run.unwrap_or(false))
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
