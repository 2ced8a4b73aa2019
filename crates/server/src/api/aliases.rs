//! Alias operations: wire <-> domain.

use std::sync::Arc;

use super::timestamp;
use crate::kms::access::Caller;
use crate::kms::aliases::AliasView;
use crate::kms::fields::{KeyId, Marker};
use crate::kms::Kms;
use crate::proto::*;
use model::error::KmsResult;

pub(super) async fn create_alias(
    kms: &Arc<Kms>,
    caller: &Caller,
    r: CreateAliasRequest,
) -> KmsResult<CreateAliasResponse> {
    kms.create_alias(
        caller,
        &r.alias_name,
        KeyId::new("TargetKeyId", &r.target_key_id)?.get(),
    )
    .await?;
    Ok(CreateAliasResponse {})
}

pub(super) async fn update_alias(
    kms: &Arc<Kms>,
    caller: &Caller,
    r: UpdateAliasRequest,
) -> KmsResult<UpdateAliasResponse> {
    kms.update_alias(
        caller,
        &r.alias_name,
        KeyId::new("TargetKeyId", &r.target_key_id)?.get(),
    )
    .await?;
    Ok(UpdateAliasResponse {})
}

pub(super) async fn delete_alias(
    kms: &Arc<Kms>,
    caller: &Caller,
    r: DeleteAliasRequest,
) -> KmsResult<DeleteAliasResponse> {
    kms.delete_alias(caller, &r.alias_name).await?;
    Ok(DeleteAliasResponse {})
}

pub(super) async fn list_aliases(
    kms: &Arc<Kms>,
    caller: &Caller,
    r: ListAliasesRequest,
) -> KmsResult<ListAliasesResponse> {
    let page = kms
        .list_aliases(
            caller,
            KeyId::optional("KeyId", r.key_id.as_deref())?.map(KeyId::get),
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
