//! The cryptographic operations: Encrypt, Decrypt, ReEncrypt, GenerateDataKey(WithoutPlaintext)
//! and GenerateRandom. AES-256-GCM runs inside the token; the encryption context is bound as
//! additional data (see `ciphertext`).

use zeroize::Zeroizing;

use super::ciphertext;
use super::gate::Authorized;
use super::keys::{store_hsm_error, timed_out, UsableKey};
use super::Kms;
use crate::config::GcmIvMode;
use crate::hsm::{HsmError, IV_LEN};
use model::context::Context;
use model::error::{ErrorKind, KmsError, KmsResult};
use model::op::Op;
use model::states::ConnectionState;

pub const SYMMETRIC_DEFAULT: &str = "SYMMETRIC_DEFAULT";
const ALGORITHMS: &[&str] = &[
    "SYMMETRIC_DEFAULT",
    "RSAES_OAEP_SHA_1",
    "RSAES_OAEP_SHA_256",
    "SM2PKE",
];

/// A secret byte string (plaintext, data key, random bytes): zeroized on drop, never printed.
pub struct Secret(pub Zeroizing<Vec<u8>>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

pub struct Encrypted {
    pub ciphertext_blob: Vec<u8>,
    pub key_arn: String,
}

pub struct Decrypted {
    pub plaintext: Secret,
    pub key_arn: String,
}

pub struct ReEncrypted {
    pub ciphertext_blob: Vec<u8>,
    pub source_key_arn: String,
    pub key_arn: String,
}

pub struct DataKey {
    pub ciphertext_blob: Vec<u8>,
    pub plaintext: Secret,
    pub key_arn: String,
}

/// The algorithm of a symmetric key: SYMMETRIC_DEFAULT only.
pub fn check_algorithm(field: &str, alg: Option<&str>) -> KmsResult<()> {
    match alg {
        None | Some(SYMMETRIC_DEFAULT) => Ok(()),
        Some(a) if ALGORITHMS.contains(&a) => Err(KmsError::new(
            ErrorKind::InvalidKeyUsage,
            format!(
                "{field} {a} is not valid for a symmetric encryption key; use SYMMETRIC_DEFAULT"
            ),
        )),
        Some(a) => Err(KmsError::validation(format!(
            "{field} '{a}' is not one of {}",
            ALGORITHMS.join(", ")
        ))),
    }
}

/// The data key length: exactly one of KeySpec (AES_256, AES_128) and NumberOfBytes (1..1024).
pub fn data_key_len(key_spec: Option<&str>, number_of_bytes: Option<i32>) -> KmsResult<usize> {
    match (key_spec, number_of_bytes) {
        (Some(_), Some(_)) => Err(KmsError::validation(
            "Specify KeySpec or NumberOfBytes, not both",
        )),
        (None, None) => Err(KmsError::validation("Specify KeySpec or NumberOfBytes")),
        (Some("AES_256"), None) => Ok(32),
        (Some("AES_128"), None) => Ok(16),
        (Some(s), None) => Err(KmsError::validation(format!(
            "KeySpec '{s}' is not one of AES_256, AES_128"
        ))),
        (None, Some(n)) => random_len(n),
    }
}

fn random_len(n: i32) -> KmsResult<usize> {
    if (1..=1024).contains(&n) {
        Ok(n as usize)
    } else {
        Err(KmsError::validation(format!(
            "NumberOfBytes must be between 1 and 1024, got {n}"
        )))
    }
}

/// DryRunOperationException in AWS's words (recorded from real AWS: LocalStack's KMS
/// snapshot, test_generate_data_key_pair_dry_run).
pub(super) fn dry_run() -> KmsError {
    KmsError::new(
        ErrorKind::DryRunOperation,
        "The request would have succeeded, but the DryRun option is set.",
    )
}

/// The IV of a new encryption under `key`: random from the operating system, or None when
/// the HSM chooses it (CloudHSM's mode).
pub(super) fn fresh_iv(key: &UsableKey) -> KmsResult<Option<[u8; IV_LEN]>> {
    match key.iv_mode {
        GcmIvMode::Service => {
            let mut iv = [0u8; IV_LEN];
            getrandom::fill(&mut iv).map_err(KmsError::internal)?;
            Ok(Some(iv))
        }
        GcmIvMode::Hsm => Ok(None),
    }
}

/// Maps an HSM failure on a key's operation to the AWS exception the caller gets.
pub(super) fn hsm_error(key: &UsableKey, e: HsmError) -> KmsError {
    match e {
        HsmError::BadCiphertext => KmsError::new(
            ErrorKind::InvalidCiphertext,
            "The ciphertext or its encryption context is invalid",
        ),
        HsmError::KeyUsage => KmsError::new(
            ErrorKind::InvalidKeyUsage,
            format!("{} in the HSM does not allow this operation", key.arn),
        ),
        HsmError::KeyMaterialMissing => KmsError::invalid_state(format!(
            "{} is unusable: its key material is missing from cluster {}",
            key.arn, key.cluster_id
        )),
        HsmError::Unavailable(detail) => {
            crate::metrics::get().store_hsm_error(&key.store_id);
            tracing::warn!(key_arn = %key.arn, custom_key_store_id = %key.store_id, %detail, "HSM unavailable");
            KmsError::invalid_state(format!(
                "{} is unavailable: the HSM of custom key store {} is not answering",
                key.arn, key.store_id
            ))
        }
        HsmError::Timeout(limit) => {
            crate::metrics::get().store_hsm_error(&key.store_id);
            timed_out(&key.store_id, limit)
        }
        HsmError::Internal(detail) => {
            crate::metrics::get().store_hsm_error(&key.store_id);
            KmsError::internal(format!("HSM operation on {}: {detail}", key.arn))
        }
    }
}

impl Kms {
    /// Encrypts under the key in its HSM and assembles the ciphertext blob.
    async fn encrypt_with(
        &self,
        key: &UsableKey,
        plaintext: Zeroizing<Vec<u8>>,
        ctx: &Context,
    ) -> KmsResult<Vec<u8>> {
        let iv = fresh_iv(key)?;
        let prefix = ciphertext::prefix(&key.id);
        let aad = ciphertext::additional_data(&prefix, ctx);
        let (iv, body) = key
            .conn
            .encrypt(key.id, iv, aad, plaintext)
            .await
            .map_err(|e| hsm_error(key, e))?;
        Ok(ciphertext::assemble(&prefix, &iv, &body))
    }

    /// Decrypts a parsed blob under the key in its HSM.
    async fn decrypt_with(
        &self,
        key: &UsableKey,
        blob: &ciphertext::Blob<'_>,
        ctx: &Context,
    ) -> KmsResult<Zeroizing<Vec<u8>>> {
        let aad = ciphertext::additional_data(blob.aad_prefix, ctx);
        key.conn
            .decrypt(key.id, blob.iv, aad, blob.body.to_vec())
            .await
            .map_err(|e| hsm_error(key, e))
    }

    pub async fn encrypt(
        &self,
        auth: &Authorized<'_>,
        plaintext: Zeroizing<Vec<u8>>,
        ctx: &Context,
        algorithm: Option<&str>,
        dry: bool,
    ) -> KmsResult<Encrypted> {
        check_algorithm("EncryptionAlgorithm", algorithm)?;
        let key = self.usable_key(auth.key()?, Op::Encrypt).await?;
        if dry {
            return Err(dry_run());
        }
        self.admit(&key.store_id)?;
        let blob = self.encrypt_with(&key, plaintext, ctx).await?;
        Ok(Encrypted {
            ciphertext_blob: blob,
            key_arn: key.arn,
        })
    }

    /// Decrypts `blob`, whose key the authorization found (and checked against the KeyId
    /// the request named).
    pub async fn decrypt(
        &self,
        auth: &Authorized<'_>,
        blob: &[u8],
        ctx: &Context,
        algorithm: Option<&str>,
        dry: bool,
    ) -> KmsResult<Decrypted> {
        check_algorithm("EncryptionAlgorithm", algorithm)?;
        let blob = ciphertext::parse(blob)?;
        let key = self.usable_key(auth.key()?, Op::Decrypt).await?;
        self.admit(&key.store_id)?;
        let plaintext = self.decrypt_with(&key, &blob, ctx).await?;
        // A DryRun checks the ciphertext as the real call does (in the token, against its
        // encryption context), so that it never says a call would succeed that would fail.
        if dry {
            return Err(dry_run());
        }
        Ok(Decrypted {
            plaintext: Secret(plaintext),
            key_arn: key.arn,
        })
    }

    /// Decrypts `blob` under its key (`auth.key`) and encrypts the plaintext under the
    /// destination (`auth.other_key`).
    #[allow(clippy::too_many_arguments)]
    pub async fn re_encrypt(
        &self,
        auth: &Authorized<'_>,
        blob: &[u8],
        source_ctx: &Context,
        destination_ctx: &Context,
        source_algorithm: Option<&str>,
        destination_algorithm: Option<&str>,
        dry: bool,
    ) -> KmsResult<ReEncrypted> {
        check_algorithm("SourceEncryptionAlgorithm", source_algorithm)?;
        check_algorithm("DestinationEncryptionAlgorithm", destination_algorithm)?;
        let blob = ciphertext::parse(blob)?;
        let source = self.usable_key(auth.key()?, Op::ReEncrypt).await?;
        let destination = self.usable_key(auth.other_key()?, Op::ReEncrypt).await?;
        // As in AWS, ReEncrypt counts against the quota of each store it uses.
        self.admit(&source.store_id)?;
        if destination.store_id != source.store_id {
            self.admit(&destination.store_id)?;
        }
        let plaintext = self.decrypt_with(&source, &blob, source_ctx).await?;
        // A DryRun checks the source ciphertext as the real call does (see `decrypt`).
        if dry {
            return Err(dry_run());
        }
        let blob = self
            .encrypt_with(&destination, plaintext, destination_ctx)
            .await?;
        Ok(ReEncrypted {
            ciphertext_blob: blob,
            source_key_arn: source.arn,
            key_arn: destination.arn,
        })
    }

    /// A data key from the key's own token, and its ciphertext under the key.
    pub async fn generate_data_key(
        &self,
        auth: &Authorized<'_>,
        ctx: &Context,
        len: usize,
        dry: bool,
    ) -> KmsResult<DataKey> {
        let key = self.usable_key(auth.key()?, auth.op()).await?;
        if dry {
            return Err(dry_run());
        }
        self.admit(&key.store_id)?;
        let plaintext = key
            .conn
            .data_key_bytes(len)
            .await
            .map_err(|e| hsm_error(&key, e))?;
        let blob = self.encrypt_with(&key, plaintext.clone(), ctx).await?;
        Ok(DataKey {
            ciphertext_blob: blob,
            plaintext: Secret(plaintext),
            key_arn: key.arn,
        })
    }

    /// Random bytes: from the custom key store's token when one is named, else from the OS.
    pub async fn generate_random(
        &self,
        _: &Authorized<'_>,
        number_of_bytes: Option<i32>,
        store_id: Option<&str>,
    ) -> KmsResult<Secret> {
        let n = random_len(
            // AWS's words (recorded: test_generate_random_invalid_number_of_bytes[None]).
            number_of_bytes.ok_or_else(|| KmsError::validation("NumberOfBytes is required."))?,
        )?;
        let Some(store_id) = store_id else {
            let mut buf = Zeroizing::new(vec![0u8; n]);
            getrandom::fill(&mut buf).map_err(KmsError::internal)?;
            return Ok(Secret(buf));
        };
        let store = self.keystore(store_id).await?;
        let conn = if store.connection_state == ConnectionState::Connected {
            self.connection_or_attach(&store.id).await
        } else {
            None
        };
        let conn = conn.ok_or_else(|| {
            KmsError::new(
                ErrorKind::CustomKeyStoreInvalidState,
                format!(
                    "Custom key store {} is {}; GenerateRandom requires it to be CONNECTED",
                    store.id, store.connection_state
                ),
            )
        })?;
        self.admit(&store.id)?;
        conn.random(n)
            .await
            .map(Secret)
            .map_err(|e| store_hsm_error(store_id, "GenerateRandom", e))
    }
}
