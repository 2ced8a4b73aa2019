//! Generated protobuf and gRPC code for `kms.v1`, and redacting Debug impls for the messages
//! that carry secrets (their generated Debug is switched off in build.rs).

#![allow(clippy::all, missing_docs)]

use std::fmt;

tonic::include_proto!("kms.v1");

/// The encoded file descriptor set, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kms_descriptor");

/// Debug for a message with secrets: every field must be named, as shown or as secret. The
/// exhaustive destructuring makes a field added to the proto a compile error here until it
/// is placed (EncryptRequest's grant_tokens had been left out of the hand-written list).
macro_rules! redacted_debug {
    ($ty:ident { $($field:ident),* } secret { $($secret:ident),* }) => {
        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let $ty { $($field,)* $($secret: _,)* } = self;
                let mut d = f.debug_struct(stringify!($ty));
                $( d.field(stringify!($field), $field); )*
                $( d.field(stringify!($secret), &"<redacted>"); )*
                d.finish()
            }
        }
    };
}

redacted_debug!(CreateCustomKeyStoreRequest {
    custom_key_store_name, cloud_hsm_cluster_id, trust_anchor_certificate, custom_key_store_type
} secret { key_store_password });
redacted_debug!(UpdateCustomKeyStoreRequest {
    custom_key_store_id, new_custom_key_store_name, cloud_hsm_cluster_id
} secret { key_store_password });
redacted_debug!(EncryptRequest {
    key_id, encryption_context, encryption_algorithm, dry_run, grant_tokens
} secret { plaintext });
redacted_debug!(DecryptResponse { key_id, encryption_algorithm } secret { plaintext });
redacted_debug!(GenerateDataKeyResponse { key_id, ciphertext_blob } secret { plaintext });
redacted_debug!(GenerateRandomResponse {} secret { plaintext });

#[cfg(test)]
mod tests {
    #[test]
    fn secrets_are_redacted_and_every_other_field_shown() {
        let r = super::EncryptRequest {
            key_id: "alias/k".into(),
            plaintext: b"top secret".to_vec(),
            grant_tokens: vec!["token-1".into()],
            ..Default::default()
        };
        let shown = format!("{r:?}");
        assert!(
            shown.contains("token-1") && shown.contains("alias/k"),
            "{shown}"
        );
        assert!(
            shown.contains("<redacted>") && !shown.contains("top secret"),
            "{shown}"
        );
    }
}
