//! The external key store (XKS) proxy API's operations on hsm-kms's own keys: AWS KMS names
//! a key by its key ID and asks for its metadata, for AES-256-GCM encryption and decryption
//! inside the HSM, and for the health of the HSMs behind the proxy.
//!
//! The additional authenticated data given to the HSM is the specification's (its Encrypt
//! section): the 2-byte big-endian length of additionalAuthenticatedData, the AAD, the
//! 1-byte length of ciphertextMetadata, the metadata. hsm-kms returns no ciphertextMetadata,
//! and takes any it is given back as part of the AAD, so a changed one fails to decrypt.

use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use super::crypto::{fresh_iv, hsm_error};
use super::gate::Authorized;
use super::Kms;
use crate::hsm::IV_LEN;
use model::error::{ErrorKind, KmsError, KmsResult};
use model::op::Op;
use model::states::{HsmState, KeyState};

/// The authentication tag's length: 16 bytes, as the specification requires.
pub const TAG_LEN: usize = 16;

/// The most ciphertextMetadata the specification allows.
pub const MAX_METADATA: usize = 20;

/// The AAD the HSM authenticates: the lengths of the request's additionalAuthenticatedData
/// and of the ciphertextMetadata, each before its bytes.
pub fn hsm_aad(aad: &[u8], metadata: &[u8]) -> KmsResult<Vec<u8>> {
    let aad_len = u16::try_from(aad.len())
        .map_err(|_| KmsError::validation("additionalAuthenticatedData is over 65535 bytes"))?;
    let metadata_len = u8::try_from(metadata.len())
        .ok()
        .filter(|n| usize::from(*n) <= MAX_METADATA)
        .ok_or_else(|| KmsError::validation("ciphertextMetadata is over 20 bytes"))?;
    let mut out = Vec::with_capacity(3 + aad.len() + metadata.len());
    out.extend_from_slice(&aad_len.to_be_bytes());
    out.extend_from_slice(aad);
    out.push(metadata_len);
    out.extend_from_slice(metadata);
    Ok(out)
}

/// The ciphertext data integrity value (SHA-256) over the decoded AAD, ciphertextMetadata,
/// initialization vector, ciphertext and tag, in that order (the specification's Appendix
/// C: no lengths).
pub fn integrity_value(
    aad: &[u8],
    metadata: &[u8],
    iv: &[u8],
    ciphertext: &[u8],
    tag: &[u8],
) -> Vec<u8> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [aad, metadata, iv, ciphertext, tag] {
        ctx.update(part);
    }
    ctx.finish().as_ref().to_vec()
}

/// What XKS Encrypt answers.
pub struct Sealed {
    pub ciphertext: Vec<u8>,
    pub iv: [u8; IV_LEN],
    pub tag: [u8; TAG_LEN],
    /// When asked for (SHA_256), computed before the test decryption.
    pub integrity_value: Option<Vec<u8>>,
}

/// The health check's answer.
#[derive(Clone, Debug)]
pub struct Health {
    pub fleet_size: u32,
    /// (HSM id, model, ACTIVE | DEGRADED | UNAVAILABLE), at most ten.
    pub hsms: Vec<(String, String, &'static str)>,
}

impl Kms {
    /// GetKeyMetadata's keyStatus: ENABLED for a key AWS KMS can use now (Enabled, its store
    /// connected), DISABLED otherwise (Disabled, PendingDeletion, or Unavailable because its
    /// store is not connected).
    pub async fn xks_key_status(&self, auth: &Authorized<'_>) -> KmsResult<&'static str> {
        let key = auth.key()?;
        let store = self.keystore(&key.custom_key_store_id).await?;
        Ok(match key.key_state.seen(store.connection_state) {
            KeyState::Enabled => "ENABLED",
            _ => "DISABLED",
        })
    }

    /// AES-256-GCM in the HSM with the specification's AAD; with `integrity`, the integrity
    /// value is computed over the result, then the result is decrypted in the HSM to show
    /// that it decrypts to the plaintext (Appendix C's order).
    pub async fn xks_encrypt(
        &self,
        auth: &Authorized<'_>,
        plaintext: Zeroizing<Vec<u8>>,
        aad: &[u8],
        integrity: bool,
    ) -> KmsResult<Sealed> {
        let key = self.usable_key(auth.key()?, Op::XksEncrypt).await?;
        self.admit(&key.store_id)?;
        let hsm_aad = hsm_aad(aad, &[])?;
        let iv = fresh_iv(&key)?;
        let expected = integrity.then(|| plaintext.clone());
        let (iv, mut sealed) = key
            .conn
            .encrypt(key.id, iv, hsm_aad.clone(), plaintext)
            .await
            .map_err(|e| hsm_error(&key, e))?;
        if sealed.len() < TAG_LEN {
            return Err(KmsError::internal(
                "the HSM answered a ciphertext without its tag",
            ));
        }
        let tag_at = sealed.len() - TAG_LEN;
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&sealed[tag_at..]);
        let integrity_value = match expected {
            None => None,
            Some(expected) => {
                let value = integrity_value(aad, &[], &iv, &sealed[..tag_at], &tag);
                let opened = key
                    .conn
                    .decrypt(key.id, iv, hsm_aad, sealed.clone())
                    .await
                    .map_err(|e| hsm_error(&key, e))?;
                if opened != expected {
                    return Err(KmsError::internal(
                        "the test decryption of a new ciphertext did not give back its plaintext",
                    ));
                }
                Some(value)
            }
        };
        sealed.truncate(tag_at);
        Ok(Sealed {
            ciphertext: sealed,
            iv,
            tag,
            integrity_value,
        })
    }

    /// AES-256-GCM decryption in the HSM; a ciphertext, IV, tag, AAD or metadata other than
    /// what was encrypted is InvalidCiphertextException.
    pub async fn xks_decrypt(
        &self,
        auth: &Authorized<'_>,
        ciphertext: &[u8],
        iv: &[u8],
        tag: &[u8],
        aad: &[u8],
        metadata: &[u8],
    ) -> KmsResult<Zeroizing<Vec<u8>>> {
        let invalid = |what: &str| {
            KmsError::new(
                ErrorKind::InvalidCiphertext,
                format!("The {what} is not one this proxy made"),
            )
        };
        let key = self.usable_key(auth.key()?, Op::XksDecrypt).await?;
        // hsm-kms makes 12-byte IVs; a 16-byte one (which the specification allows) cannot
        // be one of its ciphertexts.
        let iv: [u8; IV_LEN] = iv
            .try_into()
            .map_err(|_| invalid("initialization vector"))?;
        if tag.len() != TAG_LEN {
            return Err(invalid("authentication tag"));
        }
        self.admit(&key.store_id)?;
        let mut sealed = Vec::with_capacity(ciphertext.len() + TAG_LEN);
        sealed.extend_from_slice(ciphertext);
        sealed.extend_from_slice(tag);
        key.conn
            .decrypt(key.id, iv, hsm_aad(aad, metadata)?, sealed)
            .await
            .map_err(|e| hsm_error(&key, e))
    }

    /// The HSMs behind the proxy and their state: every configured cluster's HSMs (at most
    /// ten), each ACTIVE when its cluster's store is connected on this replica and the HSM
    /// answered a call just now, DEGRADED when the store's connection failed and is being
    /// re-established, UNAVAILABLE otherwise. The HSM calls' outcome is reused for `cache`.
    pub async fn xks_health(&self, cache: Duration) -> Health {
        let mut last = self.xks_health.lock().await;
        if let Some((at, health)) = last.as_ref() {
            if at.elapsed() < cache {
                return health.clone();
            }
        }
        let stores = self.all_keystores().await;
        let mut hsms = Vec::new();
        for cluster in self.clusters.all() {
            let store = stores.iter().find(|s| s.cluster_id == cluster.settings.id);
            let state = match store {
                Some(store) => {
                    let (state, conn) = self.store_state(store);
                    match (state, conn) {
                        ("CONNECTED", Some(conn)) => match conn.random(16).await {
                            Ok(_) => "ACTIVE",
                            Err(_) => "DEGRADED",
                        },
                        ("DEGRADED", _) => "DEGRADED",
                        _ => "UNAVAILABLE",
                    }
                }
                None => "UNAVAILABLE",
            };
            let model = format!(
                "PKCS#11 token {} of cluster {}",
                cluster.settings.token_label, cluster.settings.id
            );
            if cluster.settings.hsms.is_empty() {
                hsms.push((cluster.settings.id.clone(), model, state));
                continue;
            }
            for hsm in &cluster.settings.hsms {
                let hsm_state = match hsm.state {
                    HsmState::Active => state,
                    _ => "UNAVAILABLE",
                };
                hsms.push((hsm.id.clone(), model.clone(), hsm_state));
            }
        }
        hsms.truncate(10);
        let health = Health {
            fleet_size: self.quotas.replicas(),
            hsms,
        };
        *last = Some((Instant::now(), health.clone()));
        health
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn b64(s: &str) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD.decode(s).unwrap()
    }

    /// The specification's Appendix C, byte for byte.
    #[test]
    fn the_integrity_value_is_the_specifications_example() {
        let value = integrity_value(
            &b64("cHJvamVjdD1uaWxlLGRlcGFydG1lbnQ9bWFya2V0aW5n"),
            &b64("a2V5X3ZlcnNpb249MQ=="),
            &b64("HMrlRw85cAJUd5Ax"),
            &b64("ghxkK1txeDNn3q8Y"),
            &b64("vBxN2ncH1oEkR8WVXpmyYQ=="),
        );
        assert_eq!(
            base64::engine::general_purpose::STANDARD.encode(value),
            "qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc="
        );
    }

    /// The lengths come first, so AAD "ab" with metadata "c" is not AAD "abc" without.
    #[test]
    fn the_hsm_aad_carries_both_lengths() {
        assert_eq!(hsm_aad(b"ab", b"c").unwrap(), [0, 2, b'a', b'b', 1, b'c']);
        assert_eq!(hsm_aad(b"", b"").unwrap(), [0, 0, 0]);
        assert_ne!(hsm_aad(b"abc", b"").unwrap(), hsm_aad(b"ab", b"c").unwrap());
        assert_eq!(hsm_aad(&[7; 300], b"").unwrap()[..2], [1, 44]);
        assert!(hsm_aad(b"", &[0; 21]).is_err());
    }
}
