//! Alias operations: wire <-> domain.

use std::sync::Arc;

use super::timestamp;
use crate::kms::aliases::{check_alias_name, AliasView};
use crate::kms::fields::{KeyId, Marker};
use crate::kms::gate::{Authorized, Gate, Subject};
use crate::kms::Kms;
use crate::proto::*;
use model::error::KmsResult;

pub(super) async fn create_alias(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: CreateAliasRequest,
) -> KmsResult<CreateAliasResponse> {
    let auth = alias_to(kms, gate, &r.alias_name, &r.target_key_id).await?;
    kms.create_alias(&auth, &r.alias_name).await?;
    Ok(CreateAliasResponse {})
}

pub(super) async fn update_alias(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: UpdateAliasRequest,
) -> KmsResult<UpdateAliasResponse> {
    let auth = alias_to(kms, gate, &r.alias_name, &r.target_key_id).await?;
    kms.update_alias(&auth, &r.alias_name).await?;
    Ok(UpdateAliasResponse {})
}

/// Checks the alias name and the target's KeyId, then authorizes pointing the alias at it.
async fn alias_to<'c>(
    kms: &Kms,
    gate: Gate<'c>,
    name: &str,
    target_key_id: &str,
) -> KmsResult<Authorized<'c>> {
    check_alias_name(name)?;
    let target = KeyId::new("TargetKeyId", target_key_id)?.get();
    gate.authorize(
        kms,
        Subject::Alias {
            name,
            target: Some(target),
        },
    )
    .await
}

pub(super) async fn delete_alias(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: DeleteAliasRequest,
) -> KmsResult<DeleteAliasResponse> {
    check_alias_name(&r.alias_name)?;
    let auth = gate
        .authorize(
            kms,
            Subject::Alias {
                name: &r.alias_name,
                target: None,
            },
        )
        .await?;
    kms.delete_alias(&auth, &r.alias_name).await?;
    Ok(DeleteAliasResponse {})
}

pub(super) async fn list_aliases(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: ListAliasesRequest,
) -> KmsResult<ListAliasesResponse> {
    let key_id = KeyId::optional("KeyId", r.key_id.as_deref())?.map(KeyId::get);
    let auth = gate.authorize(kms, Subject::Account).await?;
    let page = kms
        .list_aliases(
            &auth,
            key_id,
            r.limit,
            Marker::optional(r.marker.as_deref())?,
        )
        .await?;
    Ok(ListAliasesResponse {
        aliases: page.items.into_iter().map(alias_entry).collect(),
        truncated: page.next_marker.is_some(),
        next_marker: page.next_marker,
    })
}

fn alias_entry(a: AliasView) -> AliasListEntry {
    AliasListEntry {
        alias_name: a.name,
        alias_arn: a.arn,
        target_key_id: a.target_key_id.to_string(),
        creation_date: timestamp(a.creation_date_ms),
        last_updated_date: timestamp(a.last_updated_ms),
    }
}
