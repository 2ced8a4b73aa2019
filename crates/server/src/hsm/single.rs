//! One C_Encrypt (C_Decrypt) per operation.
//!
//! cryptoki's `Session::encrypt` and `decrypt` call C_Encrypt (C_Decrypt) twice: first with
//! no buffer to learn the output's size, then to do the work. On a network HSM every call is
//! a round trip, so that halves what a session can do. AES-GCM's output size is known (the
//! input and the 16-byte tag, or the input less it), and PKCS#11 lets the caller pass a
//! buffer of that size directly (v3.1 section 5.2, "Conventions for functions returning
//! output in a variable-length buffer"). So these functions call once; should a token still
//! answer CKR_BUFFER_TOO_SMALL, they call once more with the size it reported, which the
//! standard allows because that answer does not end the operation.
//!
//! The operation is started with cryptoki (`encrypt_init`, `decrypt_init`); only the one
//! call goes through the module's function list, which cryptoki does not expose.

use std::path::Path;

use cryptoki::context::Function;
use cryptoki::error::{Error, Rv, RvError};
use cryptoki::session::Session;
use cryptoki_sys::{CK_FUNCTION_LIST, CK_RV, CK_SESSION_HANDLE, CK_ULONG};

/// The signature C_Encrypt and C_Decrypt share.
type OneShot =
    unsafe extern "C" fn(CK_SESSION_HANDLE, *mut u8, CK_ULONG, *mut u8, *mut CK_ULONG) -> CK_RV;

/// A module's C_Encrypt and C_Decrypt, from its own function list.
pub struct OneCall {
    /// Keeps the module mapped while the function pointers are used.
    _lib: cryptoki_sys::Pkcs11,
    encrypt: OneShot,
    decrypt: OneShot,
}

impl OneCall {
    /// Loads the module (already loaded by cryptoki: the loader shares it) and takes the two
    /// functions from its C_GetFunctionList.
    pub fn load(module: &Path) -> Result<OneCall, String> {
        let fail = |what: &str| format!("{}: {what}", module.display());
        // SAFETY: the module is a PKCS#11 library cryptoki loaded and initialised already;
        // loading it again only takes a reference to the same mapping.
        let lib = unsafe { cryptoki_sys::Pkcs11::new(module) }.map_err(|e| fail(&e.to_string()))?;
        let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
        // SAFETY: C_GetFunctionList writes a pointer to the module's static function list.
        let rv = unsafe { lib.C_GetFunctionList(&mut list) };
        if rv != cryptoki_sys::CKR_OK || list.is_null() {
            return Err(fail("C_GetFunctionList failed"));
        }
        // SAFETY: `list` points to the module's function list, valid while it is loaded.
        let list = unsafe { *list };
        Ok(OneCall {
            encrypt: list.C_Encrypt.ok_or_else(|| fail("no C_Encrypt"))?,
            decrypt: list.C_Decrypt.ok_or_else(|| fail("no C_Decrypt"))?,
            _lib: lib,
        })
    }

    /// C_Encrypt of the operation `session.encrypt_init` started, into `out` (sized by the
    /// caller to the expected output, truncated to the actual).
    pub fn encrypt(&self, session: &Session, data: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
        call(self.encrypt, Function::Encrypt, session, data, out)
    }

    /// C_Decrypt of the operation `session.decrypt_init` started; as `encrypt`.
    pub fn decrypt(&self, session: &Session, data: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
        call(self.decrypt, Function::Decrypt, session, data, out)
    }
}

fn call(
    f: OneShot,
    function: Function,
    session: &Session,
    data: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), Error> {
    let data_len = CK_ULONG::try_from(data.len())?;
    for attempt in 0..2 {
        let mut len = CK_ULONG::try_from(out.len())?;
        // SAFETY: `data` and `out` are valid for their lengths; the token writes at most
        // `len` bytes to `out` and the length it wrote (or needs) to `len`. C_Encrypt does
        // not write through its input pointer, whatever its signature says.
        let rv = unsafe {
            f(
                session.handle(),
                data.as_ptr() as *mut u8,
                data_len,
                out.as_mut_ptr(),
                &mut len,
            )
        };
        let len = usize::try_from(len)?;
        match Rv::from(rv) {
            Rv::Ok => {
                out.truncate(len);
                return Ok(());
            }
            Rv::Error(RvError::BufferTooSmall) if attempt == 0 && len > out.len() => {
                out.resize(len, 0);
            }
            other => return other.into_result(function),
        }
    }
    Rv::Error(RvError::BufferTooSmall).into_result(function)
}
