//! The vocabulary every layer of hsm-kms shares: the operations (`op`), the states and
//! AWS's key-state table (`states`), key ids and ARNs (`ids`), principals (`principal`),
//! the encryption context (`context`) and the AWS exception kinds (`error`).
//!
//! This crate depends on no other part of hsm-kms. The configuration, the metadata
//! database, the HSM layer, the domain and the fronts all depend on it, so the direction of
//! the project's imports is one the compiler checks.

pub mod context;
pub mod error;
pub mod ids;
pub mod op;
pub mod principal;
pub mod states;

/// Milliseconds since the Unix epoch by this machine's clock (0 if the clock is before it).
#[inline]
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
