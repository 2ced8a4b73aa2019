//! Bounded request fields. Each AWS limit (aws-kms-api-fields.txt) is written here once, as
//! the constructor of a type or as a constant its checks share; a transport builds these
//! from its wire request, so an out-of-bounds field never reaches an operation.

use std::ops::RangeInclusive;

use zeroize::Zeroizing;

use model::error::{KmsError, KmsResult};

/// KeyId, TargetKeyId, SourceKeyId, DestinationKeyId: a key id, key ARN, alias name or
/// alias ARN, 1 to 2048 characters.
#[derive(Clone, Copy, Debug)]
pub struct KeyId<'a>(&'a str);

impl<'a> KeyId<'a> {
    pub const CHARS: RangeInclusive<usize> = 1..=2048;

    pub fn new(field: &str, v: &'a str) -> KmsResult<KeyId<'a>> {
        if !Self::CHARS.contains(&v.chars().count()) {
            return Err(KmsError::validation(format!(
                "{field} must be 1 to 2048 characters long"
            )));
        }
        Ok(KeyId(v))
    }

    /// An optional KeyId field.
    pub fn optional(field: &str, v: Option<&'a str>) -> KmsResult<Option<KeyId<'a>>> {
        v.map(|s| KeyId::new(field, s)).transpose()
    }

    pub fn get(self) -> &'a str {
        self.0
    }
}

/// A custom key store id as a request gives it: 1 to 64 characters.
#[derive(Clone, Copy, Debug)]
pub struct KeyStoreId<'a>(&'a str);

impl<'a> KeyStoreId<'a> {
    pub const CHARS: RangeInclusive<usize> = 1..=64;

    pub fn new(v: &'a str) -> KmsResult<KeyStoreId<'a>> {
        if !Self::CHARS.contains(&v.chars().count()) {
            return Err(KmsError::validation(
                "CustomKeyStoreId must be 1 to 64 characters long",
            ));
        }
        Ok(KeyStoreId(v))
    }

    pub fn get(self) -> &'a str {
        self.0
    }
}

/// A pagination marker: 1 to 1024 characters (what it says is checked by the List
/// operation that issued it).
pub struct Marker;

impl Marker {
    pub const CHARS: RangeInclusive<usize> = 1..=1024;

    pub fn optional(v: Option<&str>) -> KmsResult<Option<&str>> {
        match v {
            Some(s) if !Self::CHARS.contains(&s.chars().count()) => Err(KmsError::validation(
                "Marker must be 1 to 1024 characters long",
            )),
            other => Ok(other),
        }
    }
}

/// Plaintext to encrypt: 1 to 4096 bytes. Zeroized when dropped.
pub struct Plaintext(Zeroizing<Vec<u8>>);

impl Plaintext {
    pub const BYTES: RangeInclusive<usize> = 1..=4096;

    pub fn new(v: Vec<u8>) -> KmsResult<Plaintext> {
        let v = Zeroizing::new(v);
        if !Self::BYTES.contains(&v.len()) {
            return Err(KmsError::validation(format!(
                "Plaintext must be 1 to 4096 bytes long, got {}",
                v.len()
            )));
        }
        Ok(Plaintext(v))
    }

    pub fn into_inner(self) -> Zeroizing<Vec<u8>> {
        self.0
    }
}

impl std::fmt::Debug for Plaintext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Plaintext(<redacted>)")
    }
}

/// A ciphertext blob: 1 to 6144 bytes.
#[derive(Clone, Copy, Debug)]
pub struct CiphertextBlob<'a>(&'a [u8]);

impl<'a> CiphertextBlob<'a> {
    pub const BYTES: RangeInclusive<usize> = 1..=6144;

    pub fn new(v: &'a [u8]) -> KmsResult<CiphertextBlob<'a>> {
        if !Self::BYTES.contains(&v.len()) {
            return Err(KmsError::validation(format!(
                "CiphertextBlob must be 1 to 6144 bytes long, got {}",
                v.len()
            )));
        }
        Ok(CiphertextBlob(v))
    }

    pub fn get(self) -> &'a [u8] {
        self.0
    }
}

/// A key description: at most 8,192 characters (CreateKey and UpdateKeyDescription).
pub fn check_description(d: &str) -> KmsResult<()> {
    if d.chars().count() > 8192 {
        return Err(KmsError::validation(
            "Description is longer than 8192 characters",
        ));
    }
    Ok(())
}

/// A custom key store name (and NewCustomKeyStoreName): 1 to 256 characters.
pub fn check_keystore_name(name: &str, field: &str) -> KmsResult<()> {
    if !(1..=256).contains(&name.chars().count()) {
        return Err(KmsError::validation(format!(
            "{field} must be 1 to 256 characters long"
        )));
    }
    Ok(())
}

/// Tag keys are 1 to 128 characters, tag values at most 256; a key has at most 50 tags.
pub const TAG_KEY_CHARS: RangeInclusive<usize> = 1..=128;
pub const TAG_VALUE_MAX_CHARS: usize = 256;
pub const TAGS_PER_KEY: usize = 50;

/// GranteePrincipal and RetiringPrincipal: 1 to 256 characters.
pub const PRINCIPAL_CHARS: RangeInclusive<usize> = 1..=256;
/// A grant's Name: 1 to 256 characters.
pub const GRANT_NAME_CHARS: RangeInclusive<usize> = 1..=256;
/// A grant token: 1 to 8192 characters; at most 10 per request.
pub const GRANT_TOKEN_CHARS: RangeInclusive<usize> = 1..=8192;
pub const GRANT_TOKENS_PER_REQUEST: usize = 10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_hold_at_their_edges() {
        assert!(KeyId::new("KeyId", &"k".repeat(2048)).is_ok());
        let e = KeyId::new("TargetKeyId", &"k".repeat(2049)).unwrap_err();
        assert_eq!(e.message, "TargetKeyId must be 1 to 2048 characters long");
        assert!(KeyId::new("KeyId", "").is_err());
        assert!(KeyStoreId::new(&"c".repeat(65)).is_err());
        assert!(Marker::optional(Some(&"m".repeat(1025))).is_err());
        assert_eq!(Marker::optional(None).unwrap(), None);
        assert!(Plaintext::new(vec![0; 4097]).is_err());
        assert!(Plaintext::new(vec![]).is_err());
        assert!(CiphertextBlob::new(&[0; 6144]).is_ok());
        assert!(check_description(&"é".repeat(8192)).is_ok());
        assert!(check_description(&"é".repeat(8193)).is_err());
        assert!(check_keystore_name("", "CustomKeyStoreName").is_err());
        assert_eq!(
            format!("{:?}", Plaintext::new(vec![1]).unwrap()),
            "Plaintext(<redacted>)"
        );
    }
}
