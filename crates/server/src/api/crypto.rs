//! Cryptographic operations: wire <-> domain.

use std::sync::Arc;

use super::context;
use crate::kms::access::Caller;
use crate::kms::crypto::{data_key_len, SYMMETRIC_DEFAULT};
use crate::kms::fields::{CiphertextBlob, KeyId, KeyStoreId, Plaintext};
use crate::kms::grants::check_grant_tokens;
use crate::kms::Kms;
use crate::proto::*;
use model::error::KmsResult;
use model::op::Op;

pub(super) async fn encrypt(
    kms: &Arc<Kms>,
    caller: &Caller,
    r: EncryptRequest,
) -> KmsResult<EncryptResponse> {
    check_grant_tokens(&r.grant_tokens)?;
    let out = kms
        .encrypt(
            caller,
            KeyId::new("KeyId", &r.key_id)?.get(),
            Plaintext::new(r.plaintext)?.into_inner(),
            &context("EncryptionContext", r.encryption_context)?,
            r.encryption_algorithm.as_deref(),
            r.dry_run.unwrap_or(false),
        )
        .await?;
    Ok(EncryptResponse {
        ciphertext_blob: out.ciphertext_blob,
        key_id: out.key_arn,
        encryption_algorithm: SYMMETRIC_DEFAULT.into(),
    })
}

pub(super) async fn decrypt(
    kms: &Arc<Kms>,
    caller: &Caller,
    r: DecryptRequest,
) -> KmsResult<DecryptResponse> {
    check_grant_tokens(&r.grant_tokens)?;
    let out = kms
        .decrypt(
            caller,
            CiphertextBlob::new(&r.ciphertext_blob)?.get(),
            &context("EncryptionContext", r.encryption_context)?,
            KeyId::optional("KeyId", r.key_id.as_deref())?.map(KeyId::get),
            r.encryption_algorithm.as_deref(),
            r.dry_run.unwrap_or(false),
        )
        .await?;
    Ok(DecryptResponse {
        key_id: out.key_arn,
        plaintext: out.plaintext.0.to_vec(),
        encryption_algorithm: SYMMETRIC_DEFAULT.into(),
    })
}

pub(super) async fn re_encrypt(
    kms: &Arc<Kms>,
    caller: &Caller,
    r: ReEncryptRequest,
) -> KmsResult<ReEncryptResponse> {
    check_grant_tokens(&r.grant_tokens)?;
    let out = kms
        .re_encrypt(
            caller,
            CiphertextBlob::new(&r.ciphertext_blob)?.get(),
            &context("SourceEncryptionContext", r.source_encryption_context)?,
            KeyId::optional("SourceKeyId", r.source_key_id.as_deref())?.map(KeyId::get),
            KeyId::new("DestinationKeyId", &r.destination_key_id)?.get(),
            &context(
                "DestinationEncryptionContext",
                r.destination_encryption_context,
            )?,
            r.source_encryption_algorithm.as_deref(),
            r.destination_encryption_algorithm.as_deref(),
            r.dry_run.unwrap_or(false),
        )
        .await?;
    Ok(ReEncryptResponse {
        ciphertext_blob: out.ciphertext_blob,
        source_key_id: out.source_key_arn,
        key_id: out.key_arn,
        source_encryption_algorithm: SYMMETRIC_DEFAULT.into(),
        destination_encryption_algorithm: SYMMETRIC_DEFAULT.into(),
    })
}

pub(super) async fn generate_data_key(
    kms: &Arc<Kms>,
    caller: &Caller,
    r: GenerateDataKeyRequest,
) -> KmsResult<GenerateDataKeyResponse> {
    let out = data_key(kms, caller, Op::GenerateDataKey, r).await?;
    Ok(GenerateDataKeyResponse {
        ciphertext_blob: out.ciphertext_blob,
        plaintext: out.plaintext.0.to_vec(),
        key_id: out.key_arn,
    })
}

/// GenerateDataKey without the plaintext in the answer: the same request, the same domain
/// call; the plaintext is zeroized here.
pub(super) async fn generate_data_key_without_plaintext(
    kms: &Arc<Kms>,
    caller: &Caller,
    r: GenerateDataKeyWithoutPlaintextRequest,
) -> KmsResult<GenerateDataKeyWithoutPlaintextResponse> {
    let r = GenerateDataKeyRequest {
        key_id: r.key_id,
        encryption_context: r.encryption_context,
        number_of_bytes: r.number_of_bytes,
        key_spec: r.key_spec,
        dry_run: r.dry_run,
        grant_tokens: r.grant_tokens,
    };
    let out = data_key(kms, caller, Op::GenerateDataKeyWithoutPlaintext, r).await?;
    Ok(GenerateDataKeyWithoutPlaintextResponse {
        ciphertext_blob: out.ciphertext_blob,
        key_id: out.key_arn,
    })
}

async fn data_key(
    kms: &Arc<Kms>,
    caller: &Caller,
    op: Op,
    r: GenerateDataKeyRequest,
) -> KmsResult<crate::kms::crypto::DataKey> {
    check_grant_tokens(&r.grant_tokens)?;
    let key_id = KeyId::new("KeyId", &r.key_id)?.get();
    let len = data_key_len(r.key_spec.as_deref(), r.number_of_bytes)?;
    kms.generate_data_key(
        caller,
        op,
        key_id,
        &context("EncryptionContext", r.encryption_context)?,
        len,
        r.dry_run.unwrap_or(false),
    )
    .await
}

pub(super) async fn generate_random(
    kms: &Arc<Kms>,
    caller: &Caller,
    r: GenerateRandomRequest,
) -> KmsResult<GenerateRandomResponse> {
    if let Some(id) = &r.custom_key_store_id {
        KeyStoreId::new(id)?;
    }
    let bytes = kms
        .generate_random(caller, r.number_of_bytes, r.custom_key_store_id.as_deref())
        .await?;
    Ok(GenerateRandomResponse {
        plaintext: bytes.0.to_vec(),
    })
}
