//! The AWS JSON 1.1 body of a KMS request and response, on the proto's own messages.
//!
//! build.rs gives every `kms.v1` message serde derives with AWS's member names (PascalCase,
//! `AWSAccountId`), blobs as standard base64 (`blob`) and dates as epoch seconds (`date`).
//! This module adds what serde alone does not decide the way AWS does: a member of the wrong
//! type or a body that is not JSON is a SerializationException; the model's constraints
//! (`constraints`: required members, lengths, ranges, enums, patterns) are ValidationException
//! in AWS's words; a member that AWS has and
//! hsm-kms does not (`Recipient`, the XKS members) is refused, never silently ignored; and
//! absent optional members are left out of responses rather than written as `null`.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use model::error::{ErrorKind, KmsError, KmsResult};
use model::op::Op;

/// `Vec<u8>` as standard base64 with padding, as AWS writes blobs.
pub mod blob {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(|_| de::Error::custom("a blob member is not valid base64"))
    }
}

/// A date as epoch seconds, with milliseconds as a fraction (AWS's `timestamp` in JSON).
pub mod date {
    use prost_types::Timestamp;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Option<Timestamp>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            // Milliseconds are what the service keeps; whole seconds print without a fraction.
            Some(t) => {
                let ms = t.seconds * 1000 + i64::from(t.nanos / 1_000_000);
                if ms % 1000 == 0 {
                    s.serialize_i64(ms / 1000)
                } else {
                    s.serialize_f64(ms as f64 / 1000.0)
                }
            }
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Timestamp>, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.map(|secs| {
            let ms = (secs * 1000.0).round() as i64;
            Timestamp {
                seconds: ms.div_euclid(1000),
                nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
            }
        }))
    }
}

/// The members each request message has, from the messages themselves (`super::members`).
static KNOWN: LazyLock<HashMap<Op, HashSet<String>>> = LazyLock::new(|| {
    Op::served()
        .map(|op| {
            let members = match crate::api::aws_request_members(op) {
                Value::Object(m) => m.into_iter().map(|(k, _)| k).collect(),
                _ => HashSet::new(),
            };
            (op, members)
        })
        .collect()
});

fn unreadable(op: Op, why: impl std::fmt::Display) -> KmsError {
    KmsError::new(
        ErrorKind::Serialization,
        format!("The {} request could not be read: {why}", op.name()),
    )
}

/// The request of `op` from its JSON body, or the AWS exception that refuses it.
pub fn parse<R: DeserializeOwned>(op: Op, body: &[u8]) -> KmsResult<R> {
    let value: Value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Object(Map::new())
    } else {
        serde_json::from_slice(body).map_err(|_| unreadable(op, "the body is not JSON"))?
    };
    let Value::Object(members) = &value else {
        return Err(unreadable(op, "the body is not a JSON object"));
    };
    if let Some(known) = KNOWN.get(&op) {
        if let Some(other) = members
            .iter()
            .find(|(k, v)| !v.is_null() && !known.contains(k.as_str()))
        {
            return Err(KmsError::new(
                ErrorKind::UnsupportedOperation,
                format!(
                    "hsm-kms does not support the {} member of {} requests",
                    model::error::quoted(other.0),
                    op.name()
                ),
            ));
        }
    }
    // A null member means absent, whatever its type: a list or a map as much as a scalar.
    let mut members = members.clone();
    members.retain(|_, v| !v.is_null());
    let request = serde_json::from_value(Value::Object(members.clone()))
        .map_err(|e| unreadable(op, wrong_member::<R>(&members, &e)))?;
    // Read as its types, the request meets the model's constraints, or is refused in
    // AWS's words with all it breaks.
    super::constraints::check(op, &Value::Object(members))?;
    Ok(request)
}

/// Why a body of known members did not read: the member at fault and what its type wants,
/// never its value (a number sent where a blob belongs may be a card number, and serde's
/// own message would quote it).
fn wrong_member<R: DeserializeOwned>(
    members: &Map<String, Value>,
    e: &serde_json::Error,
) -> String {
    // serde does not say which member it was: it is the one without which the rest reads.
    let culprit = members.keys().find(|name| {
        let mut rest = members.clone();
        rest.remove(name.as_str());
        serde_json::from_value::<R>(Value::Object(rest)).is_ok()
    });
    // serde writes "invalid type: <what was sent>, expected <what the type wants>": only the
    // words after the last "expected " are the type's own, and only when they quote nothing.
    let text = e.to_string();
    let expected = text
        .rsplit_once("expected ")
        .map(|(_, t)| t.split(" at line ").next().unwrap_or(t))
        .filter(|t| t.len() <= 120 && !t.contains(['"', '\'', '\\']));
    let what = match culprit {
        Some(name) => format!("the member '{name}' has the wrong type or form"),
        None => "a member has the wrong type or form".to_string(),
    };
    match expected {
        Some(t) => format!("{what} (expected {t})"),
        None => what,
    }
}

/// The JSON body of a response as AWS writes it: absent optional members left out, never
/// `null`, and an empty map or structure inside the response left out too (a grant with only
/// `EncryptionContextSubset` has no `EncryptionContextEquals: {}`; one with no constraint
/// has no `Constraints`). Lists stay, empty or not (`"Tags": []`), as AWS writes them.
pub fn write<T: Serialize>(response: &T) -> KmsResult<Vec<u8>> {
    let mut value = serde_json::to_value(response).map_err(KmsError::internal)?;
    drop_absent(&mut value);
    serde_json::to_vec(&value).map_err(KmsError::internal)
}

fn drop_absent(value: &mut Value) {
    match value {
        Value::Object(m) => {
            m.values_mut().for_each(drop_absent);
            m.retain(|_, v| !v.is_null() && !matches!(v, Value::Object(o) if o.is_empty()));
        }
        Value::Array(items) => items.iter_mut().for_each(drop_absent),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::*;

    /// A grant with one kind of constraint lists only that one; a grant with none has no
    /// Constraints; empty lists stay.
    #[test]
    fn empty_maps_are_left_out_as_aws_leaves_them_out() {
        let subset = GrantListEntry {
            grant_id: "g".into(),
            constraints: Some(GrantConstraints {
                encryption_context_subset: [("app".to_string(), "x".to_string())].into(),
                encryption_context_equals: Default::default(),
            }),
            ..Default::default()
        };
        let none = GrantListEntry {
            grant_id: "h".into(),
            constraints: Some(GrantConstraints::default()),
            ..Default::default()
        };
        let out = write(&ListGrantsResponse {
            grants: vec![subset, none],
            ..Default::default()
        })
        .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v["Grants"][0]["Constraints"],
            serde_json::json!({"EncryptionContextSubset": {"app": "x"}})
        );
        assert!(v["Grants"][1].get("Constraints").is_none(), "{v}");
        assert_eq!(v["Grants"][1]["Operations"], serde_json::json!([]));
        let out = write(&ListResourceTagsResponse::default()).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&out).unwrap()["Tags"],
            serde_json::json!([])
        );
        assert_eq!(write(&EnableKeyResponse {}).unwrap(), b"{}");
    }

    #[test]
    fn members_are_spelled_as_aws_spells_them() {
        let out = write(&DescribeKeyResponse {
            key_metadata: Some(KeyMetadata {
                aws_account_id: "111122223333".into(),
                creation_date: Some(prost_types::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 250_000_000,
                }),
                ..Default::default()
            }),
        })
        .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        let m = &v["KeyMetadata"];
        assert_eq!(m["AWSAccountId"], "111122223333");
        assert_eq!(m["CreationDate"].as_f64(), Some(1_700_000_000.25));
        // Absent optional members are left out, not null.
        assert!(m.get("DeletionDate").is_none(), "{m}");
        assert!(m.get("PendingDeletionWindowInDays").is_none(), "{m}");
        assert_eq!(write(&EnableKeyResponse {}).unwrap(), b"{}");
    }

    #[test]
    fn blobs_are_base64_both_ways() {
        let r: EncryptRequest = parse(
            Op::Encrypt,
            br#"{"KeyId":"alias/a","Plaintext":"aGVsbG8="}"#,
        )
        .unwrap();
        assert_eq!(r.plaintext, b"hello");
        assert_eq!(r.key_id, "alias/a");
        let out = write(&GenerateRandomResponse {
            plaintext: vec![0xff; 4],
        })
        .unwrap();
        assert_eq!(out, br#"{"Plaintext":"/////w=="}"#);
        let e = parse::<EncryptRequest>(Op::Encrypt, br#"{"KeyId":"k","Plaintext":"%%%"}"#)
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Serialization, "{e}");
    }

    #[test]
    fn refusals_name_what_aws_names() {
        let e = parse::<EncryptRequest>(Op::Encrypt, b"{}").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Validation);
        assert_eq!(
            e.message,
            "2 validation errors detected: Value null at 'keyId' failed to satisfy constraint: \
             Member must not be null; Value null at 'plaintext' failed to satisfy constraint: \
             Member must not be null"
        );
        let e = parse::<DescribeKeyRequest>(Op::DescribeKey, br#"{"KeyId":null}"#).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Validation);
        for body in [&b"{"[..], b"[1]", b"\"KeyId\""] {
            let e = parse::<ListKeysRequest>(Op::ListKeys, body).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Serialization, "{e}");
        }
        let e = parse::<ListKeysRequest>(Op::ListKeys, br#"{"Limit":"ten"}"#).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Serialization, "{e}");
        // A member AWS has and hsm-kms does not: refused, not ignored.
        let e = parse::<DecryptRequest>(
            Op::Decrypt,
            br#"{"CiphertextBlob":"AA==","Recipient":{"AttestationDocument":"AA=="}}"#,
        )
        .unwrap_err();
        assert_eq!(e.kind, ErrorKind::UnsupportedOperation, "{e}");
        assert!(e.message.contains("Recipient"), "{e}");
        // An empty body is an empty request, and null stands for absent.
        let r: ListKeysRequest = parse(Op::ListKeys, b"").unwrap();
        assert_eq!(r.limit, None);
        let r: ListKeysRequest = parse(Op::ListKeys, br#"{"Limit":null}"#).unwrap();
        assert_eq!(r.limit, None);
    }

    /// A value of the wrong type is named by its member and the type it must have, for
    /// every member, never quoted: a number where a blob belongs may be a card number.
    #[test]
    fn wrong_types_name_the_member_never_the_value() {
        let cases: [(Op, &[u8], &str); 5] = [
            (
                Op::Encrypt,
                br#"{"KeyId":"k","Plaintext":4111111111119999}"#,
                "Plaintext",
            ),
            (
                Op::CreateCustomKeyStore,
                br#"{"CustomKeyStoreName":"s","KeyStorePassword":98765432123}"#,
                "KeyStorePassword",
            ),
            (Op::ListKeys, br#"{"Limit":"9988776655"}"#, "Limit"),
            (
                Op::Encrypt,
                br#"{"KeyId":"k","Plaintext":"AA==","EncryptionContext":{"a":55667788}}"#,
                "EncryptionContext",
            ),
            (
                Op::Encrypt,
                br#"{"KeyId":"k","Plaintext":"AA==","GrantTokens":"4111222233334444"}"#,
                "GrantTokens",
            ),
        ];
        for (op, body, member) in cases {
            let e = match op {
                Op::Encrypt => parse::<EncryptRequest>(op, body).unwrap_err(),
                Op::CreateCustomKeyStore => {
                    parse::<CreateCustomKeyStoreRequest>(op, body).unwrap_err()
                }
                _ => parse::<ListKeysRequest>(op, body).unwrap_err(),
            };
            assert_eq!(e.kind, ErrorKind::Serialization, "{e}");
            assert!(e.message.contains(&format!("'{member}'")), "{e}");
            for secret in [
                "4111111111119999",
                "98765432123",
                "9988776655",
                "55667788",
                "4111222233334444",
            ] {
                assert!(!e.message.contains(secret), "{e}");
            }
        }
    }

    /// null stands for absent for every member: lists and maps as much as scalars.
    #[test]
    fn null_lists_and_maps_are_absent() {
        let r: EncryptRequest = parse(
            Op::Encrypt,
            br#"{"KeyId":"k","Plaintext":"AA==","EncryptionContext":null,"GrantTokens":null}"#,
        )
        .unwrap();
        assert!(r.encryption_context.is_empty() && r.grant_tokens.is_empty());
        let r: CreateKeyRequest = parse(Op::CreateKey, br#"{"Tags":null}"#).unwrap();
        assert!(r.tags.is_empty());
    }

    /// The model (../shared/reference, where present): every member a request or response
    /// has is the model's.
    #[test]
    fn members_match_the_aws_model() {
        let Some(model) = crate::api::aws::constraints::full_model() else {
            return;
        };
        let shapes = &model["shapes"];
        // Every operation of the model is routed: an `Op` (served, or answered as AWS
        // answers it for a key in a CloudHSM key store).
        let routed: Vec<&str> = Op::ALL.iter().map(|op| op.name()).collect();
        let mut unrouted: Vec<&str> = model["operations"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .filter(|name| !routed.contains(name))
            .collect();
        unrouted.sort();
        assert!(
            unrouted.is_empty(),
            "operations of the model not routed: {unrouted:?}"
        );
        // (hsm-kms's own operations are not in the model.)
        for op in Op::ALL
            .into_iter()
            .filter(|op| !op.extension() && !op.xks())
        {
            let operation = &model["operations"][op.name()];
            let input = &shapes[operation["input"]["shape"].as_str().unwrap()];
            for member in KNOWN.get(&op).into_iter().flatten() {
                assert!(
                    input["members"].get(member).is_some(),
                    "{op:?}: {member} is not a member of the AWS request"
                );
            }
            if let Some(output) = operation["output"]["shape"].as_str() {
                check_members(shapes, output, &crate::api::aws_response_members(op));
            }
        }
        // The structures inside responses, with every member present.
        let entries = [
            ("KeyMetadata", serde_json::to_value(KeyMetadata::default())),
            (
                "KeyListEntry",
                serde_json::to_value(KeyListEntry::default()),
            ),
            (
                "AliasListEntry",
                serde_json::to_value(AliasListEntry::default()),
            ),
            (
                "GrantListEntry",
                serde_json::to_value(GrantListEntry::default()),
            ),
            (
                "GrantConstraints",
                serde_json::to_value(GrantConstraints::default()),
            ),
            ("Tag", serde_json::to_value(Tag::default())),
            (
                "CustomKeyStoresListEntry",
                serde_json::to_value(CustomKeyStoresListEntry::default()),
            ),
        ];
        for (shape, value) in entries {
            check_members(shapes, shape, &value.unwrap());
        }
    }

    /// Every member of `value` (all members present: a message's default, or a filled
    /// one) is a member of the model's `shape`, recursively through structures and lists.
    fn check_members(shapes: &Value, shape: &str, value: &Value) {
        let s = &shapes[shape];
        match (s["type"].as_str(), value) {
            (Some("structure"), Value::Object(m)) => {
                for (k, v) in m {
                    let member = &s["members"][k];
                    assert!(member.is_object(), "{k} is not a member of {shape}");
                    check_members(shapes, member["shape"].as_str().unwrap(), v);
                }
            }
            (Some("list"), Value::Array(items)) => {
                for v in items {
                    check_members(shapes, s["member"]["shape"].as_str().unwrap(), v);
                }
            }
            _ => {}
        }
    }
}
