use std::path::PathBuf;

const BLOB: &str = "#[serde(with = \"crate::api::aws::json::blob\")]";
const DATE: &str = "#[serde(with = \"crate::api::aws::json::date\")]";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Secrets travel in these messages: keep them out of Debug output; the API layer
        // provides redacting Debug impls where a message is ever logged.
        .skip_debug([
            "kms.v1.CreateCustomKeyStoreRequest",
            "kms.v1.UpdateCustomKeyStoreRequest",
            "kms.v1.EncryptRequest",
            "kms.v1.DecryptResponse",
            "kms.v1.GenerateDataKeyResponse",
            "kms.v1.GenerateRandomResponse",
        ])
        // The AWS KMS JSON protocol (api/aws.rs) reads and writes the same messages: the
        // proto's fields are AWS's members in snake case, so serde spells them back in
        // PascalCase; absent members take their defaults (required ones are checked against
        // the model before this). Blobs travel as base64 and dates as epoch seconds.
        .type_attribute(
            ".kms.v1",
            "#[derive(serde::Serialize, serde::Deserialize)] \
             #[serde(default, rename_all = \"PascalCase\")]",
        )
        .field_attribute(
            ".kms.v1.KeyMetadata.aws_account_id",
            "#[serde(rename = \"AWSAccountId\")]",
        )
        .field_attribute("plaintext", BLOB)
        .field_attribute("ciphertext_blob", BLOB)
        .field_attribute("creation_date", DATE)
        .field_attribute("deletion_date", DATE)
        .field_attribute("last_updated_date", DATE)
        .field_attribute("tracking_start_date", DATE)
        .field_attribute("key_creation_date", DATE)
        .field_attribute("KeyLastUsageData.timestamp", DATE)
        .file_descriptor_set_path(out.join("kms_descriptor.bin"))
        .compile_protos(&["../../proto/kms/v1/kms.proto"], &["../../proto"])?;
    Ok(())
}
