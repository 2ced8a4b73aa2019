//! Cryptographic operations: wire <-> domain.

use std::sync::Arc;

use super::context;
use crate::kms::crypto::{check_algorithm, data_key_len, SYMMETRIC_DEFAULT};
use crate::kms::fields::{CiphertextBlob, KeyId, KeyStoreId, Plaintext};
use crate::kms::gate::{Gate, KeyNamed, Subject};
use crate::kms::grants::check_grant_tokens;
use crate::kms::Kms;
use crate::proto::*;
use model::error::KmsResult;

pub(super) async fn encrypt(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: EncryptRequest,
) -> KmsResult<EncryptResponse> {
    check_grant_tokens(&r.grant_tokens)?;
    let key_id = KeyId::new("KeyId", &r.key_id)?.get();
    let plaintext = Plaintext::new(r.plaintext)?.into_inner();
    let ctx = context("EncryptionContext", r.encryption_context)?;
    check_algorithm("EncryptionAlgorithm", r.encryption_algorithm.as_deref())?;
    let auth = gate
        .authorize(kms, Subject::Key(KeyNamed::any(key_id, &ctx)))
        .await?;
    let out = kms
        .encrypt(
            &auth,
            plaintext,
            &ctx,
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
    gate: Gate<'_>,
    r: DecryptRequest,
) -> KmsResult<DecryptResponse> {
    check_grant_tokens(&r.grant_tokens)?;
    let blob = CiphertextBlob::new(&r.ciphertext_blob)?.get();
    let ctx = context("EncryptionContext", r.encryption_context)?;
    let named = KeyId::optional("KeyId", r.key_id.as_deref())?.map(KeyId::get);
    check_algorithm("EncryptionAlgorithm", r.encryption_algorithm.as_deref())?;
    let auth = gate
        .authorize(
            kms,
            Subject::Ciphertext {
                blob,
                named,
                ctx: &ctx,
            },
        )
        .await?;
    let out = kms
        .decrypt(
            &auth,
            blob,
            &ctx,
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
    gate: Gate<'_>,
    r: ReEncryptRequest,
) -> KmsResult<ReEncryptResponse> {
    check_grant_tokens(&r.grant_tokens)?;
    let blob = CiphertextBlob::new(&r.ciphertext_blob)?.get();
    let source_ctx = context("SourceEncryptionContext", r.source_encryption_context)?;
    let named = KeyId::optional("SourceKeyId", r.source_key_id.as_deref())?.map(KeyId::get);
    let destination = KeyId::new("DestinationKeyId", &r.destination_key_id)?.get();
    let destination_ctx = context(
        "DestinationEncryptionContext",
        r.destination_encryption_context,
    )?;
    check_algorithm(
        "SourceEncryptionAlgorithm",
        r.source_encryption_algorithm.as_deref(),
    )?;
    check_algorithm(
        "DestinationEncryptionAlgorithm",
        r.destination_encryption_algorithm.as_deref(),
    )?;
    let auth = gate
        .authorize(
            kms,
            Subject::ReEncrypt {
                blob,
                named,
                source_ctx: &source_ctx,
                destination: KeyNamed::any(destination, &destination_ctx),
            },
        )
        .await?;
    let out = kms
        .re_encrypt(
            &auth,
            blob,
            &source_ctx,
            &destination_ctx,
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
    gate: Gate<'_>,
    r: GenerateDataKeyRequest,
) -> KmsResult<GenerateDataKeyResponse> {
    let out = data_key(kms, gate, r).await?;
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
    gate: Gate<'_>,
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
    let out = data_key(kms, gate, r).await?;
    Ok(GenerateDataKeyWithoutPlaintextResponse {
        ciphertext_blob: out.ciphertext_blob,
        key_id: out.key_arn,
    })
}

async fn data_key(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: GenerateDataKeyRequest,
) -> KmsResult<crate::kms::crypto::DataKey> {
    check_grant_tokens(&r.grant_tokens)?;
    let key_id = KeyId::new("KeyId", &r.key_id)?.get();
    let len = data_key_len(r.key_spec.as_deref(), r.number_of_bytes)?;
    let ctx = context("EncryptionContext", r.encryption_context)?;
    let auth = gate
        .authorize(kms, Subject::Key(KeyNamed::any(key_id, &ctx)))
        .await?;
    kms.generate_data_key(&auth, &ctx, len, r.dry_run.unwrap_or(false))
        .await
}

pub(super) async fn generate_random(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: GenerateRandomRequest,
) -> KmsResult<GenerateRandomResponse> {
    if let Some(id) = &r.custom_key_store_id {
        KeyStoreId::new(id)?;
    }
    let store_id = r.custom_key_store_id.as_deref();
    let auth = gate.authorize(kms, Subject::KeyStore(store_id)).await?;
    let bytes = kms
        .generate_random(&auth, r.number_of_bytes, store_id)
        .await?;
    Ok(GenerateRandomResponse {
        plaintext: bytes.0.to_vec(),
    })
}
