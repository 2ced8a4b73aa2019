use std::path::PathBuf;

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
        .file_descriptor_set_path(out.join("kms_descriptor.bin"))
        .compile_protos(&["proto/kms/v1/kms.proto"], &["proto"])?;
    Ok(())
}
