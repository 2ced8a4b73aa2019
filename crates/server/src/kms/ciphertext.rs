//! The ciphertext blob: self-describing, versioned, and parsed by a total function.
//!
//! ```text
//! offset  size  field
//! 0       1     format version (2; version 1 is still read)
//! 1       16    key id (UUID bytes): Decrypt needs no KeyId
//! 17      12    GCM IV
//! 29      n+16  AES-256-GCM ciphertext of the n-byte plaintext, then the 128-bit tag
//! ```
//!
//! The GCM additional data is the version byte and key id (version 2) followed by the
//! canonical encryption context, so neither the key id nor the context can be altered or
//! swapped without the tag failing; GCM authenticates the IV by itself. The IV is not part of
//! the additional data because an HSM in CloudHSM's IV mode chooses it during the encryption.
//! Version 1 blobs bound the whole 29-byte header (IV included) and still decrypt.
//! Nothing here ever panics on caller bytes: every input is either a `Blob` or an
//! InvalidCiphertextException.

use std::collections::BTreeMap;

use uuid::Uuid;

use model::error::{ErrorKind, KmsError, KmsResult};

/// The version new blobs carry.
pub const VERSION: u8 = 2;
/// The first format: its additional data includes the IV.
const VERSION_1: u8 = 1;
pub const IV_LEN: usize = crate::hsm::IV_LEN;
pub const TAG_LEN: usize = 16;
/// Version byte and key id: what precedes the IV.
pub const PREFIX_LEN: usize = 1 + 16;
pub const HEADER_LEN: usize = PREFIX_LEN + IV_LEN;
/// The smallest blob: a header and a tag around a one-byte ciphertext.
pub const MIN_LEN: usize = HEADER_LEN + 1 + TAG_LEN;

/// A parsed ciphertext blob, borrowing the caller's bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Blob<'a> {
    pub key_id: Uuid,
    pub iv: [u8; IV_LEN],
    /// The header bytes that lead the additional data (version dependent).
    pub aad_prefix: &'a [u8],
    /// GCM ciphertext followed by the tag, as PKCS#11 C_Decrypt takes it.
    pub body: &'a [u8],
}

/// Parses a blob. Total: any byte string yields a `Blob` or InvalidCiphertextException.
pub fn parse(bytes: &[u8]) -> KmsResult<Blob<'_>> {
    if bytes.len() < MIN_LEN {
        return Err(invalid("the ciphertext is too short"));
    }
    let (header, body) = bytes.split_at(HEADER_LEN);
    let aad_prefix = match header[0] {
        VERSION => &header[..PREFIX_LEN],
        VERSION_1 => header,
        _ => return Err(invalid("the ciphertext has an unknown format version")),
    };
    let key_id = Uuid::from_slice(&header[1..PREFIX_LEN]).map_err(|_| invalid("bad key id"))?;
    let mut iv = [0u8; IV_LEN];
    iv.copy_from_slice(&header[PREFIX_LEN..HEADER_LEN]);
    Ok(Blob {
        key_id,
        iv,
        aad_prefix,
        body,
    })
}

/// The version byte and key id of a new blob: the start of its additional data.
pub fn prefix(key_id: &Uuid) -> [u8; PREFIX_LEN] {
    let mut p = [0u8; PREFIX_LEN];
    p[0] = VERSION;
    p[1..].copy_from_slice(key_id.as_bytes());
    p
}

/// Joins the prefix, the IV and the GCM output (ciphertext and tag) into a blob.
pub fn assemble(prefix: &[u8; PREFIX_LEN], iv: &[u8; IV_LEN], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(prefix);
    out.extend_from_slice(iv);
    out.extend_from_slice(body);
    out
}

/// The GCM additional data: the blob's prefix, then the encryption context in canonical form
/// (entry count, then each key and value length-prefixed, sorted by key).
pub fn additional_data(prefix: &[u8], context: &BTreeMap<String, String>) -> Vec<u8> {
    let size = prefix.len()
        + 4
        + context
            .iter()
            .map(|(k, v)| 8 + k.len() + v.len())
            .sum::<usize>();
    let mut aad = Vec::with_capacity(size);
    aad.extend_from_slice(prefix);
    aad.extend_from_slice(&(context.len() as u32).to_be_bytes());
    for (k, v) in context {
        aad.extend_from_slice(&(k.len() as u32).to_be_bytes());
        aad.extend_from_slice(k.as_bytes());
        aad.extend_from_slice(&(v.len() as u32).to_be_bytes());
        aad.extend_from_slice(v.as_bytes());
    }
    aad
}

fn invalid(why: &str) -> KmsError {
    KmsError::new(
        ErrorKind::InvalidCiphertext,
        format!("The ciphertext is invalid: {why}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    use aes_gcm::{Aes256Gcm, Nonce};
    use proptest::prelude::*;

    /// Software AES-GCM with the same layout as the HSM path, to test the format on its own.
    fn encrypt_blob(
        key: &[u8; 32],
        id: &Uuid,
        iv: [u8; 12],
        pt: &[u8],
        ctx: &BTreeMap<String, String>,
    ) -> Vec<u8> {
        let p = prefix(id);
        let aad = additional_data(&p, ctx);
        let c = Aes256Gcm::new(key.into());
        let body = c
            .encrypt(Nonce::from_slice(&iv), Payload { msg: pt, aad: &aad })
            .unwrap();
        assemble(&p, &iv, &body)
    }

    /// A version 1 blob: the whole header, IV included, leads the additional data.
    fn encrypt_blob_v1(key: &[u8; 32], id: &Uuid, iv: [u8; 12], pt: &[u8]) -> Vec<u8> {
        let mut h = vec![VERSION_1];
        h.extend_from_slice(id.as_bytes());
        h.extend_from_slice(&iv);
        let aad = additional_data(&h, &BTreeMap::new());
        let c = Aes256Gcm::new(key.into());
        let body = c
            .encrypt(Nonce::from_slice(&iv), Payload { msg: pt, aad: &aad })
            .unwrap();
        [h, body].concat()
    }

    fn open(key: &[u8; 32], blob: &[u8], ctx: &BTreeMap<String, String>) -> KmsResult<Vec<u8>> {
        let b = parse(blob)?;
        let aad = additional_data(b.aad_prefix, ctx);
        let c = Aes256Gcm::new(key.into());
        c.decrypt(
            Nonce::from_slice(&b.iv),
            Payload {
                msg: b.body,
                aad: &aad,
            },
        )
        .map_err(|_| invalid("tag mismatch"))
    }

    #[test]
    fn layout() {
        let id = Uuid::new_v4();
        let blob = encrypt_blob(&[7; 32], &id, [1; 12], b"hello", &BTreeMap::new());
        assert_eq!(blob.len(), HEADER_LEN + 5 + TAG_LEN);
        let b = parse(&blob).unwrap();
        assert_eq!(b.key_id, id);
        assert_eq!(b.iv, [1; 12]);
        assert_eq!(
            parse(&blob[..MIN_LEN - 1]).unwrap_err().kind,
            ErrorKind::InvalidCiphertext
        );
        for version in [0, 3, 255] {
            let mut other = blob.clone();
            other[0] = version;
            assert_eq!(
                parse(&other).unwrap_err().kind,
                ErrorKind::InvalidCiphertext
            );
        }
    }

    #[test]
    fn version_1_blobs_still_open() {
        let (key, id) = ([4u8; 32], Uuid::new_v4());
        let blob = encrypt_blob_v1(&key, &id, [6; 12], b"legacy");
        assert_eq!(parse(&blob).unwrap().aad_prefix.len(), HEADER_LEN);
        assert_eq!(open(&key, &blob, &BTreeMap::new()).unwrap(), b"legacy");
        // The version byte is bound: relabelling a v1 blob as v2 fails the tag.
        let mut relabelled = blob.clone();
        relabelled[0] = VERSION;
        assert!(open(&key, &relabelled, &BTreeMap::new()).is_err());
    }

    #[test]
    fn context_is_canonical_and_unambiguous() {
        let h = [0u8; PREFIX_LEN];
        let a: BTreeMap<_, _> = [("a".to_string(), "bc".to_string())].into();
        let b: BTreeMap<_, _> = [("ab".to_string(), "c".to_string())].into();
        assert_ne!(additional_data(&h, &a), additional_data(&h, &b));
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn round_trip(
            pt in proptest::collection::vec(any::<u8>(), 1..600),
            ctx in proptest::collection::btree_map(".{0,12}", ".{0,12}", 0..5),
            iv in any::<[u8; 12]>(),
        ) {
            let key = [9u8; 32];
            let id = Uuid::new_v4();
            let blob = encrypt_blob(&key, &id, iv, &pt, &ctx);
            prop_assert_eq!(open(&key, &blob, &ctx).unwrap(), pt);
        }

        #[test]
        fn any_flip_or_context_change_is_rejected(
            pt in proptest::collection::vec(any::<u8>(), 1..100),
            pos in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let key = [3u8; 32];
            let ctx: BTreeMap<_, _> = [("purpose".to_string(), "test".to_string())].into();
            let blob = encrypt_blob(&key, &Uuid::new_v4(), [5; 12], &pt, &ctx);
            let mut bad = blob.clone();
            let i = pos.index(bad.len());
            bad[i] ^= 1 << bit;
            prop_assert!(open(&key, &bad, &ctx).is_err());
            let other: BTreeMap<_, _> = [("purpose".to_string(), "other".to_string())].into();
            prop_assert!(open(&key, &blob, &other).is_err());
        }
    }
}
