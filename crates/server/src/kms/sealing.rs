//! Sealing of kmsuser passwords at rest: AES-256-GCM under a local sealing key.
//!
//! The sealing key comes from a file of 32 raw bytes readable by its owner only (created on
//! first start), or from the environment (`HSM_KMS_SEALING_KEY`, 64 hex digits), which the
//! binary takes out of its environment as it starts (`take_env_key`). The store id is
//! the additional data, so a sealed password cannot be moved to another store's row.
//! Neither the key nor a password ever reaches a log, an error or Debug output.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use zeroize::Zeroizing;

use model::error::{KmsError, KmsResult};

pub const SEALING_KEY_ENV: &str = "HSM_KMS_SEALING_KEY";

/// What the service's sealing check value holds (not a secret), and its sealing context.
const CHECK_TEXT: &[u8] = b"hsm-kms sealing key check";
const CHECK_CONTEXT: &str = "sealing-key-check";

/// The key taken out of the environment by `take_env_key`.
static ENV_KEY: std::sync::Mutex<Option<Zeroizing<String>>> = std::sync::Mutex::new(None);

/// Takes `HSM_KMS_SEALING_KEY` out of the process environment: keeps its value for `load`,
/// overwrites it where the environment block holds it (so that /proc/PID/environ, child
/// processes and crash dumps no longer show it), and removes the variable. Call at the
/// start of `main`, before any other thread exists: the environment is not thread-safe.
/// The key file (`security.sealing_key_file`) remains the better way to give the key.
pub fn take_env_key() {
    let Ok(name) = std::ffi::CString::new(SEALING_KEY_ENV) else {
        return;
    };
    // SAFETY: single-threaded at this point (see above); getenv's pointer is valid until
    // the environment is changed, and the bytes up to its NUL are the value's.
    unsafe {
        let value = libc::getenv(name.as_ptr());
        if value.is_null() {
            return;
        }
        let bytes = std::ffi::CStr::from_ptr(value).to_bytes();
        let kept = Zeroizing::new(String::from_utf8_lossy(bytes).into_owned());
        for i in 0..bytes.len() {
            std::ptr::write_volatile(value.add(i), b'x' as libc::c_char);
        }
        std::env::remove_var(SEALING_KEY_ENV);
        *ENV_KEY.lock().unwrap_or_else(|p| p.into_inner()) = Some(kept);
    }
}

pub struct Sealer {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(<redacted>)")
    }
}

impl Sealer {
    /// Loads the sealing key from the environment, else from `path`, creating the file
    /// (mode 0600) with a fresh random key if it does not exist and `create` allows it
    /// (never with several replicas: each would make its own key).
    pub fn load(path: &Path, create: bool) -> anyhow::Result<Self> {
        let from_env = ENV_KEY
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .or_else(|| std::env::var(SEALING_KEY_ENV).ok().map(Zeroizing::new));
        let key: Zeroizing<Vec<u8>> = if let Some(hex_key) = from_env {
            let key = Zeroizing::new(
                hex::decode(hex_key.trim())
                    .map_err(|_| anyhow::anyhow!("{SEALING_KEY_ENV} is not hex"))?,
            );
            anyhow::ensure!(key.len() == 32, "{SEALING_KEY_ENV} must be 64 hex digits");
            key
        } else if path.exists() {
            let mode = fs::metadata(path)?.permissions().mode();
            anyhow::ensure!(
                mode & 0o077 == 0,
                "sealing key file {} must be readable by its owner only (mode {:o})",
                path.display(),
                mode & 0o777
            );
            let key = Zeroizing::new(fs::read(path)?);
            anyhow::ensure!(
                key.len() == 32,
                "sealing key file {} must hold 32 bytes",
                path.display()
            );
            key
        } else if !create {
            anyhow::bail!(
                "sealing key file {} does not exist: with [database] (several replicas) it is \
                 never created; give every replica a copy of the same key (or set {SEALING_KEY_ENV})",
                path.display()
            );
        } else {
            let mut key = Zeroizing::new(vec![0u8; 32]);
            getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("randomness: {e}"))?;
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir)?;
            }
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)?;
            f.write_all(&key)?;
            f.sync_all()?;
            tracing::info!(path = %path.display(), "created a new sealing key file");
            key
        };
        anyhow::ensure!(key.len() == 32, "the sealing key must be 32 bytes");
        let mut fixed = Zeroizing::new([0u8; 32]);
        fixed.copy_from_slice(&key);
        Ok(Sealer::with_key(&fixed))
    }

    /// Checks this key against the service's record: the first start records a value sealed
    /// with it (`record`, which returns the value recorded, whoever recorded it), and any
    /// later start must be able to open that value, or it would not open the kmsuser
    /// passwords either.
    pub fn matches(&self, recorded: &[u8]) -> bool {
        self.unseal(CHECK_CONTEXT, recorded)
            .is_ok_and(|text| text.as_slice() == CHECK_TEXT)
    }

    /// The value to record for `matches`.
    pub fn check_value(&self) -> KmsResult<Vec<u8>> {
        self.seal(CHECK_CONTEXT, CHECK_TEXT)
    }

    pub fn with_key(key: &[u8; 32]) -> Sealer {
        Sealer {
            cipher: Aes256Gcm::new(key.into()),
        }
    }

    /// Seals `secret` for the record `context`: IV (12 bytes) then ciphertext and tag.
    pub fn seal(&self, context: &str, secret: &[u8]) -> KmsResult<Vec<u8>> {
        let mut iv = [0u8; 12];
        getrandom::fill(&mut iv).map_err(KmsError::internal)?;
        let sealed = self
            .cipher
            .encrypt(
                Nonce::from_slice(&iv),
                Payload {
                    msg: secret,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| KmsError::internal("sealing failed"))?;
        let mut out = iv.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    pub fn unseal(&self, context: &str, sealed: &[u8]) -> KmsResult<Zeroizing<Vec<u8>>> {
        if sealed.len() < 12 + 16 {
            return Err(KmsError::internal(format!(
                "sealed secret of {context} is truncated"
            )));
        }
        let (iv, body) = sealed.split_at(12);
        self.cipher
            .decrypt(
                Nonce::from_slice(iv),
                Payload {
                    msg: body,
                    aad: context.as_bytes(),
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| {
                KmsError::internal(format!(
                    "the sealed secret of {context} does not open with this sealing key"
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trip_and_binding() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sealing.key");
        // Where the key must be shared (replicas), a missing file is an error, not a new key.
        let e = Sealer::load(&path, false).unwrap_err().to_string();
        assert!(e.contains("never created"), "{e}");
        assert!(!path.exists());
        let s = Sealer::load(&path, true).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let sealed = s.seal("cks-1", b"kmsuser-password").unwrap();
        assert_eq!(&*s.unseal("cks-1", &sealed).unwrap(), b"kmsuser-password");
        assert!(s.unseal("cks-2", &sealed).is_err());
        // Reloading reads the same key.
        let again = Sealer::load(&path, false).unwrap();
        assert_eq!(
            &*again.unseal("cks-1", &sealed).unwrap(),
            b"kmsuser-password"
        );
        assert!(format!("{s:?}").contains("redacted"));
        // The check value opens with the same key only.
        let recorded = s.check_value().unwrap();
        assert!(again.matches(&recorded));
        assert!(!Sealer::with_key(&[7u8; 32]).matches(&recorded));
    }
}
