//! Custom key store operations: wire <-> domain.

use std::sync::Arc;

use super::timestamp;
use crate::kms::fields::{KeyStoreId, Marker};
use crate::kms::gate::{Gate, Subject};
use crate::kms::keystores::{CreateStore, Password, StoreView, UpdateStore};
use crate::kms::Kms;
use crate::proto::*;
use model::error::KmsResult;

pub(super) async fn create_custom_key_store(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: CreateCustomKeyStoreRequest,
) -> KmsResult<CreateCustomKeyStoreResponse> {
    let auth = gate.authorize(kms, Subject::KeyStore(None)).await?;
    let id = kms
        .create_custom_key_store(
            &auth,
            CreateStore {
                name: r.custom_key_store_name,
                cluster_id: r.cloud_hsm_cluster_id,
                trust_anchor: r.trust_anchor_certificate,
                password: password(r.key_store_password)?,
                store_type: r.custom_key_store_type,
            },
        )
        .await?;
    Ok(CreateCustomKeyStoreResponse {
        custom_key_store_id: id,
    })
}

pub(super) async fn describe_custom_key_stores(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: DescribeCustomKeyStoresRequest,
) -> KmsResult<DescribeCustomKeyStoresResponse> {
    if let Some(id) = &r.custom_key_store_id {
        KeyStoreId::new(id)?;
    }
    let auth = gate
        .authorize(kms, Subject::KeyStore(r.custom_key_store_id.as_deref()))
        .await?;
    let page = kms
        .describe_custom_key_stores(
            &auth,
            r.custom_key_store_id.as_deref(),
            r.custom_key_store_name.as_deref(),
            r.limit,
            Marker::optional(r.marker.as_deref())?,
        )
        .await?;
    Ok(DescribeCustomKeyStoresResponse {
        custom_key_stores: page.items.into_iter().map(store_entry).collect(),
        truncated: page.next_marker.is_some(),
        next_marker: page.next_marker,
    })
}

pub(super) async fn update_custom_key_store(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: UpdateCustomKeyStoreRequest,
) -> KmsResult<UpdateCustomKeyStoreResponse> {
    KeyStoreId::new(&r.custom_key_store_id)?;
    let auth = gate
        .authorize(kms, Subject::KeyStore(Some(&r.custom_key_store_id)))
        .await?;
    kms.update_custom_key_store(
        &auth,
        UpdateStore {
            id: r.custom_key_store_id,
            new_name: r.new_custom_key_store_name,
            password: password(r.key_store_password)?,
            cluster_id: r.cloud_hsm_cluster_id,
        },
    )
    .await?;
    Ok(UpdateCustomKeyStoreResponse {})
}

pub(super) async fn delete_custom_key_store(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: DeleteCustomKeyStoreRequest,
) -> KmsResult<DeleteCustomKeyStoreResponse> {
    KeyStoreId::new(&r.custom_key_store_id)?;
    let auth = gate
        .authorize(kms, Subject::KeyStore(Some(&r.custom_key_store_id)))
        .await?;
    kms.delete_custom_key_store(&auth, &r.custom_key_store_id)
        .await?;
    Ok(DeleteCustomKeyStoreResponse {})
}

pub(super) async fn connect_custom_key_store(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: ConnectCustomKeyStoreRequest,
) -> KmsResult<ConnectCustomKeyStoreResponse> {
    KeyStoreId::new(&r.custom_key_store_id)?;
    let auth = gate
        .authorize(kms, Subject::KeyStore(Some(&r.custom_key_store_id)))
        .await?;
    kms.connect_custom_key_store(&auth, &r.custom_key_store_id)
        .await?;
    Ok(ConnectCustomKeyStoreResponse {})
}

pub(super) async fn disconnect_custom_key_store(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: DisconnectCustomKeyStoreRequest,
) -> KmsResult<DisconnectCustomKeyStoreResponse> {
    KeyStoreId::new(&r.custom_key_store_id)?;
    let auth = gate
        .authorize(kms, Subject::KeyStore(Some(&r.custom_key_store_id)))
        .await?;
    kms.disconnect_custom_key_store(&auth, &r.custom_key_store_id)
        .await?;
    Ok(DisconnectCustomKeyStoreResponse {})
}

fn store_entry(s: StoreView) -> CustomKeyStoresListEntry {
    CustomKeyStoresListEntry {
        custom_key_store_id: s.id,
        custom_key_store_name: s.name,
        cloud_hsm_cluster_id: s.cluster_id,
        trust_anchor_certificate: s.trust_anchor,
        connection_state: s.connection_state.as_str().into(),
        connection_error_code: s.connection_error_code.map(|c| c.as_str().into()),
        creation_date: timestamp(s.creation_date_ms),
        custom_key_store_type: "AWS_CLOUDHSM".into(),
    }
}

fn password(v: Option<String>) -> KmsResult<Option<Password>> {
    v.map(Password::new).transpose()
}
