//! Identifiers: key ids, key ARNs, custom key store ids and cluster ids, in AWS formats.

use uuid::Uuid;

use crate::error::{ErrorKind, KmsError, KmsResult};

/// Where this service's ARNs live: `arn:<partition>:kms:<region>:<account>:...`.
#[derive(Clone, Debug)]
pub struct ArnScope {
    pub partition: String,
    pub region: String,
    pub account_id: String,
}

/// What a KeyId parameter names: a key (by id or ARN) or an alias (by name or ARN).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyRef {
    Key(Uuid),
    /// The alias name, `alias/...`.
    Alias(String),
}

impl ArnScope {
    pub fn alias_arn(&self, name: &str) -> String {
        format!(
            "arn:{}:kms:{}:{}:{}",
            self.partition, self.region, self.account_id, name
        )
    }

    /// Parses a key id, key ARN, alias name or alias ARN, for a caller of `caller_account`.
    ///
    /// As in AWS, a bare key id or alias name is resolved in the caller's own account: a
    /// caller of another account must name this account's keys by ARN.
    pub fn parse_ref(&self, key_ref: &str, caller_account: &str) -> KmsResult<KeyRef> {
        if key_ref.starts_with("alias/") {
            if caller_account != self.account_id {
                return Err(KmsError::new(
                    ErrorKind::NotFound,
                    format!(
                        "Alias arn:{}:kms:{}:{caller_account}:{} is not found.",
                        self.partition,
                        self.region,
                        crate::error::quoted(key_ref)
                    ),
                ));
            }
            return Ok(KeyRef::Alias(key_ref.to_string()));
        }
        if key_ref.starts_with("arn:") {
            let parts: Vec<&str> = key_ref.splitn(6, ':').collect();
            if let [_, partition, "kms", region, account, resource] = parts[..] {
                if resource.starts_with("alias/") {
                    if partition != self.partition
                        || region != self.region
                        || account != self.account_id
                    {
                        return Err(KmsError::new(
                            ErrorKind::NotFound,
                            format!("Alias {} is not found.", crate::error::quoted(key_ref)),
                        ));
                    }
                    return Ok(KeyRef::Alias(resource.to_string()));
                }
            }
        }
        self.parse_key_ref(key_ref, caller_account).map(KeyRef::Key)
    }

    pub fn key_arn(&self, key_id: &Uuid) -> String {
        format!(
            "arn:{}:kms:{}:{}:key/{}",
            self.partition, self.region, self.account_id, key_id
        )
    }

    /// Resolves a key id or key ARN to the key id it names, for a caller of `caller_account`.
    ///
    /// A well-formed ARN for another partition, region or account names no key here
    /// (NotFoundException); a malformed ARN is InvalidArnException. A bare key id names a key
    /// of the caller's own account only.
    pub fn parse_key_ref(&self, key_ref: &str, caller_account: &str) -> KmsResult<Uuid> {
        if let Some(rest) = key_ref.strip_prefix("arn:") {
            // Messages quote the caller's input cut short, as every message does.
            let quoted = crate::error::quoted(key_ref);
            let parts: Vec<&str> = rest.splitn(5, ':').collect();
            let [partition, service, region, account, resource] = parts[..] else {
                return Err(KmsError::new(
                    ErrorKind::InvalidArn,
                    format!("{quoted} is not a valid ARN"),
                ));
            };
            if service != "kms" || partition.is_empty() || region.is_empty() || account.is_empty() {
                return Err(KmsError::new(
                    ErrorKind::InvalidArn,
                    format!("{quoted} is not a valid KMS ARN"),
                ));
            }
            let Some(id) = resource.strip_prefix("key/") else {
                return Err(KmsError::new(
                    ErrorKind::NotFound,
                    format!("Invalid keyId '{quoted}': this operation takes a key id or key ARN"),
                ));
            };
            let id = parse_uuid(id).ok_or_else(|| {
                KmsError::new(
                    ErrorKind::InvalidArn,
                    format!("{quoted} does not contain a valid key id"),
                )
            })?;
            // Another region's key: AWS's words (recorded: test_get_key_in_different_region).
            if region != self.region {
                return Err(KmsError::new(
                    ErrorKind::NotFound,
                    format!("Invalid arn {}", crate::error::quoted(region)),
                ));
            }
            if partition != self.partition || account != self.account_id {
                return Err(KmsError::new(
                    ErrorKind::NotFound,
                    format!("Key '{quoted}' does not exist"),
                ));
            }
            return Ok(id);
        }
        let id = parse_uuid(key_ref).ok_or_else(|| {
            let hint = if key_ref.starts_with("alias/") {
                ": this operation takes a key id or key ARN, not an alias"
            } else {
                ""
            };
            KmsError::new(
                ErrorKind::NotFound,
                format!("Invalid keyId '{}'{hint}", crate::error::quoted(key_ref)),
            )
        })?;
        if caller_account != self.account_id {
            return Err(KmsError::new(
                ErrorKind::NotFound,
                format!(
                    "Key 'arn:{}:kms:{}:{caller_account}:key/{id}' does not exist",
                    self.partition, self.region
                ),
            ));
        }
        Ok(id)
    }
}

/// A key id: a UUID in its canonical hyphenated lower-case form.
fn parse_uuid(s: &str) -> Option<Uuid> {
    if s.len() != 36 {
        return None;
    }
    let id = Uuid::try_parse(s).ok()?;
    (id.hyphenated().to_string() == s.to_ascii_lowercase()).then_some(id)
}

/// A new custom key store id: `cks-` and 17 hex digits.
pub fn new_store_id() -> KmsResult<String> {
    let mut bytes = [0u8; 9];
    getrandom::fill(&mut bytes).map_err(KmsError::internal)?;
    let hex = hex::encode(bytes);
    Ok(format!("cks-{}", &hex[..17]))
}

pub fn is_store_id(s: &str) -> bool {
    s.len() == 21
        && s.starts_with("cks-")
        && s[4..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// AWS cluster ids: `cluster-[2-7a-zA-Z]{11,16}`.
pub fn is_cluster_id(s: &str) -> bool {
    let Some(tail) = s.strip_prefix("cluster-") else {
        return false;
    };
    (11..=16).contains(&tail.len())
        && tail
            .bytes()
            .all(|b| b.is_ascii_alphabetic() || (b'2'..=b'7').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope() -> ArnScope {
        ArnScope {
            partition: "aws".into(),
            region: "us-east-1".into(),
            account_id: "111122223333".into(),
        }
    }

    const HOME: &str = "111122223333";

    #[test]
    fn key_refs() {
        let s = scope();
        let id = Uuid::new_v4();
        assert_eq!(s.parse_key_ref(&id.to_string(), HOME).unwrap(), id);
        assert_eq!(s.parse_key_ref(&s.key_arn(&id), HOME).unwrap(), id);
        let other = format!("arn:aws:kms:eu-west-1:111122223333:key/{id}");
        assert_eq!(
            s.parse_key_ref(&other, HOME).unwrap_err().kind,
            ErrorKind::NotFound
        );
        assert_eq!(
            s.parse_key_ref("nope", HOME).unwrap_err().kind,
            ErrorKind::NotFound
        );
        assert_eq!(
            s.parse_key_ref("arn:aws:kms", HOME).unwrap_err().kind,
            ErrorKind::InvalidArn
        );
        let bad = "arn:aws:kms:us-east-1:111122223333:key/not-a-uuid";
        assert_eq!(
            s.parse_key_ref(bad, HOME).unwrap_err().kind,
            ErrorKind::InvalidArn
        );
        // Only the canonical hyphenated form is a key id.
        let simple = id.simple().to_string();
        assert_eq!(
            s.parse_key_ref(&simple, HOME).unwrap_err().kind,
            ErrorKind::NotFound
        );
    }

    #[test]
    fn bare_ids_and_alias_names_resolve_in_the_callers_account() {
        let s = scope();
        let id = Uuid::new_v4();
        let other = "444455556666";
        let e = s.parse_key_ref(&id.to_string(), other).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert_eq!(
            e.message,
            format!("Key 'arn:aws:kms:us-east-1:444455556666:key/{id}' does not exist")
        );
        // By ARN, another account may name the key (its policy then decides).
        assert_eq!(s.parse_key_ref(&s.key_arn(&id), other).unwrap(), id);
        let e = s.parse_ref("alias/app", other).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert_eq!(
            s.parse_ref("alias/app", HOME).unwrap(),
            KeyRef::Alias("alias/app".into())
        );
    }

    #[test]
    fn store_and_cluster_ids() {
        let id = new_store_id().unwrap();
        assert!(is_store_id(&id), "{id}");
        assert!(!is_store_id("cks-123"));
        assert!(is_cluster_id("cluster-234abcdefgh"));
        assert!(!is_cluster_id("cluster-1234abcdefgh"));
        assert!(!is_cluster_id("cluster-abc"));
    }
}
