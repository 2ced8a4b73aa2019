//! The encryption context: the caller's name-value pairs bound to a ciphertext as
//! additional authenticated data, and the bound on its size.

use std::collections::BTreeMap;

use crate::error::{KmsError, KmsResult};

/// An encryption context, ordered by name (the order its additional data is written in).
pub type Context = BTreeMap<String, String>;

/// The empty encryption context, for operations without one.
pub static NO_CONTEXT: Context = Context::new();

/// The largest encryption context accepted: pairs, and bytes of keys and values (UTF-8).
/// AWS publishes no bound; this one keeps every request's policy evaluation, additional
/// data and audit line small, and is far above what envelope encryption uses.
pub const CONTEXT_MAX_PAIRS: usize = 64;
pub const CONTEXT_MAX_BYTES: usize = 8192;

/// ValidationException when `ctx` is over the bound.
pub fn check_context(field: &str, ctx: &Context) -> KmsResult<()> {
    let bytes: usize = ctx.iter().map(|(k, v)| k.len() + v.len()).sum();
    if ctx.len() > CONTEXT_MAX_PAIRS || bytes > CONTEXT_MAX_BYTES {
        return Err(KmsError::validation(format!(
            "{field} must have at most {CONTEXT_MAX_PAIRS} pairs and {CONTEXT_MAX_BYTES} bytes \
             of keys and values; it has {} pairs and {bytes} bytes",
            ctx.len()
        )));
    }
    Ok(())
}
