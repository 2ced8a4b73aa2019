use std::path::{Path, PathBuf};
use std::process::Command;

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
        .field_attribute("counting_since_date", DATE)
        .field_attribute("KeyLastUsageData.timestamp", DATE)
        .file_descriptor_set_path(out.join("kms_descriptor.bin"))
        .compile_protos(&["../../proto/kms/v1/kms.proto"], &["../../proto"])?;
    console(&out.join("console"))?;
    Ok(())
}

/// The operator console (console/, TypeScript bundled with esbuild) built into `dir` for
/// `api::console` to embed. Without Node or without `npm ci` in console/ (scripts/setup.sh
/// runs it) the binary still builds, and /console/ answers a page that says how to build it.
fn console(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let console = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../console");
    std::fs::create_dir_all(dir)?;
    for input in ["src", "static", "build.mjs", "package-lock.json"] {
        println!("cargo:rerun-if-changed={}", console.join(input).display());
    }
    let packages = console.join("node_modules/.package-lock.json");
    if packages.exists() {
        println!("cargo:rerun-if-changed={}", packages.display());
        match Command::new("node")
            .arg(console.join("build.mjs"))
            .arg(dir)
            .status()
        {
            Ok(s) if s.success() => {
                println!("cargo:rustc-env=HSM_KMS_CONSOLE=built");
                return Ok(());
            }
            // A console that does not build is a broken build, as a Rust error would be.
            Ok(s) => {
                return Err(
                    format!("building the console (node console/build.mjs) failed: {s}").into(),
                )
            }
            Err(e) => println!("cargo:warning=the console is not built: node did not run ({e})"),
        }
    } else {
        // Watch the directory, so that the build after `npm ci` builds the console.
        println!("cargo:rerun-if-changed={}", console.display());
    }
    println!("cargo:rustc-env=HSM_KMS_CONSOLE=missing");
    std::fs::write(dir.join("index.html"), NOT_BUILT)?;
    std::fs::write(dir.join("app.js"), "")?;
    std::fs::write(dir.join("console.css"), "")?;
    Ok(())
}

const NOT_BUILT: &str = "<!doctype html>
<html lang=\"en\">
<head><meta charset=\"utf-8\"><title>hsm-kms console: not built</title></head>
<body>
<main>
<h1>The hsm-kms console is not built into this binary</h1>
<p>This hsm-kms was built without Node.js, or before the console's packages were installed, so
it carries no console. To build it in, on the machine that builds hsm-kms:</p>
<pre>scripts/setup.sh        # installs Node.js 20 or later and runs npm ci in console/
cargo build --release   # crates/server/build.rs bundles console/ with esbuild and embeds it</pre>
<p>The AWS KMS API on this listener works without the console.</p>
</main>
</body>
</html>
";
