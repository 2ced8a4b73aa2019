//! The ciphertext blob: self-describing, versioned, and parsed by a total function.
//!
//! ```text
//! offset  size  field
//! 0       1     format version (1)
//! 1       16    key id (UUID bytes): Decrypt needs no KeyId
//! 17      12    GCM IV
//! 29      n+16  AES-256-GCM ciphertext of the n-byte plaintext, then the 128-bit tag
//! ```
//!
//! The GCM additional data is the 29-byte header followed by the canonical encryption context,
//! so neither the key id, the IV nor the context can be altered or swapped without the tag
//! failing. Nothing here ever panics on caller bytes: every input is either a `Blob` or an
//! InvalidCiphertextException.

use std::collections::BTreeMap;

use uuid::Uuid;

use super::error::{ErrorKind, KmsError, KmsResult};

pub const VERSION: u8 = 1;
pub const IV_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
pub const HEADER_LEN: usize = 1 + 16 + IV_LEN;
/// The smallest blob: a header and a tag around a one-byte ciphertext.
pub const MIN_LEN: usize = HEADER_LEN + 1 + TAG_LEN;

/// A parsed ciphertext blob, borrowing the caller's bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Blob<'a> {
    pub key_id: Uuid,
    pub iv: [u8; IV_LEN],
    /// The header bytes, part of the additional data.
    pub header: &'a [u8],
    /// GCM ciphertext followed by the tag, as PKCS#11 C_Decrypt takes it.
    pub sealed: &'a [u8],
}

/// Parses a blob. Total: any byte string yields a `Blob` or InvalidCiphertextException.
pub fn parse(bytes: &[u8]) -> KmsResult<Blob<'_>> {
    if bytes.len() < MIN_LEN {
        return Err(invalid("the ciphertext is too short"));
    }
    let (header, sealed) = bytes.split_at(HEADER_LEN);
    if header[0] != VERSION {
        return Err(invalid("the ciphertext has an unknown format version"));
    }
    let key_id = Uuid::from_slice(&header[1..17]).map_err(|_| invalid("bad key id"))?;
    let mut iv = [0u8; IV_LEN];
    iv.copy_from_slice(&header[17..HEADER_LEN]);
    Ok(Blob {
        key_id,
        iv,
        header,
        sealed,
    })
}

/// The header for a new blob.
pub fn header(key_id: &Uuid, iv: &[u8; IV_LEN]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = VERSION;
    h[1..17].copy_from_slice(key_id.as_bytes());
    h[17..].copy_from_slice(iv);
    h
}

/// Joins a header and the GCM output (ciphertext and tag) into a blob.
pub fn assemble(header: &[u8; HEADER_LEN], sealed: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + sealed.len());
    out.extend_from_slice(header);
    out.extend_from_slice(sealed);
    out
}

/// The GCM additional data: the header, then the encryption context in canonical form
/// (entry count, then each key and value length-prefixed, sorted by key).
pub fn additional_data(header: &[u8], context: &BTreeMap<String, String>) -> Vec<u8> {
    let size = header.len()
        + 4
        + context
            .iter()
            .map(|(k, v)| 8 + k.len() + v.len())
            .sum::<usize>();
    let mut aad = Vec::with_capacity(size);
    aad.extend_from_slice(header);
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
    fn seal(
        key: &[u8; 32],
        id: &Uuid,
        iv: [u8; 12],
        pt: &[u8],
        ctx: &BTreeMap<String, String>,
    ) -> Vec<u8> {
        let h = header(id, &iv);
        let aad = additional_data(&h, ctx);
        let c = Aes256Gcm::new(key.into());
        let sealed = c
            .encrypt(Nonce::from_slice(&iv), Payload { msg: pt, aad: &aad })
            .unwrap();
        assemble(&h, &sealed)
    }

    fn open(key: &[u8; 32], blob: &[u8], ctx: &BTreeMap<String, String>) -> KmsResult<Vec<u8>> {
        let b = parse(blob)?;
        let aad = additional_data(b.header, ctx);
        let c = Aes256Gcm::new(key.into());
        c.decrypt(
            Nonce::from_slice(&b.iv),
            Payload {
                msg: b.sealed,
                aad: &aad,
            },
        )
        .map_err(|_| invalid("tag mismatch"))
    }

    #[test]
    fn layout() {
        let id = Uuid::new_v4();
        let blob = seal(&[7; 32], &id, [1; 12], b"hello", &BTreeMap::new());
        assert_eq!(blob.len(), HEADER_LEN + 5 + TAG_LEN);
        let b = parse(&blob).unwrap();
        assert_eq!(b.key_id, id);
        assert_eq!(b.iv, [1; 12]);
        assert_eq!(
            parse(&blob[..MIN_LEN - 1]).unwrap_err().kind,
            ErrorKind::InvalidCiphertext
        );
        let mut v2 = blob.clone();
        v2[0] = 2;
        assert_eq!(parse(&v2).unwrap_err().kind, ErrorKind::InvalidCiphertext);
    }

    #[test]
    fn context_is_canonical_and_unambiguous() {
        let h = [0u8; HEADER_LEN];
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
            let blob = seal(&key, &id, iv, &pt, &ctx);
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
            let blob = seal(&key, &Uuid::new_v4(), [5; 12], &pt, &ctx);
            let mut bad = blob.clone();
            let i = pos.index(bad.len());
            bad[i] ^= 1 << bit;
            prop_assert!(open(&key, &bad, &ctx).is_err());
            let other: BTreeMap<_, _> = [("purpose".to_string(), "other".to_string())].into();
            prop_assert!(open(&key, &blob, &other).is_err());
        }
    }
}
