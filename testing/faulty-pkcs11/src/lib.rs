//! A PKCS#11 module for tests only. It loads SoftHSM2 (or `FAULTY_PKCS11_MODULE`), hands out
//! SoftHSM2's own function list with a few entries replaced, and on command makes those entries
//! fail, stall, or behave as AWS CloudHSM's library does.
//!
//! Commands come from the file named by `FAULTY_PKCS11_CONTROL`, read on every wrapped call
//! (no file, or an empty one: plain SoftHSM2). One `key = value` per line:
//!
//! ```text
//! fault = device_error | device_removed | session_handle_invalid | token_not_present | general_error
//!         | key_function_not_permitted
//! functions = C_Encrypt, C_Decrypt      # which wrapped functions fail (default: all of them)
//! count = 1                             # fail only this many calls, counted since the file last changed
//! delay_ms = 3000                       # stall the wrapped calls this long
//! delay_functions = C_Encrypt           # which ones stall (default: all of them)
//! delay_after = true                    # stall after the real call (it acted; the answer is late);
//!                                       # counts then also get "<function> returned"
//! gcm_iv = hsm                          # CloudHSM: refuse caller GCM IVs, write the IV back
//! pin_format = user:password            # CloudHSM: the PIN is `<user>:<password>`
//! after_call = true                     # C_SetPIN: fail only after the real call ran
//! counts_file = /path/counts            # write each wrapped function's call count there
//! duplicate_objects = 2                 # the next 2 C_FindObjects calls that find one object
//!                                       # report it twice (SoftHSM2 2.6.1 did, after a reconnect)
//! ```
//!
//! For benchmarks, a network HSM's latency comes from the environment, read once, so that
//! no file is read per call: `FAULTY_PKCS11_LATENCY_US=500` adds 500 µs to each call of
//! `FAULTY_PKCS11_LATENCY_FUNCTIONS` (default `C_Encrypt,C_Decrypt,C_GenerateRandom`), the
//! calls that cross the network to the HSM. The sleeping thread's timer slack is set to
//! 1 µs so that the latency is what was asked, not 50 µs more. Without
//! `FAULTY_PKCS11_CONTROL` no file is read at all.
//!
//! `C_GetSlotList` never fails; under `token_not_present` it lists no slot with a token.
//! Never use this module outside tests.

#![allow(non_snake_case, clippy::missing_safety_doc)]

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use cryptoki_sys::*;

const DEFAULT_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

struct Real {
    _lib: libloading::Library,
    list: CK_FUNCTION_LIST,
}

static REAL: OnceLock<Result<Real, String>> = OnceLock::new();
static LIST: OnceLock<CK_FUNCTION_LIST> = OnceLock::new();

fn load() -> Result<Real, String> {
    let path = std::env::var("FAULTY_PKCS11_MODULE").unwrap_or_else(|_| DEFAULT_MODULE.into());
    // SAFETY: loading a PKCS#11 module runs its initialisers; that is what the caller asked for.
    let lib = unsafe { libloading::Library::new(&path) }.map_err(|e| format!("{path}: {e}"))?;
    let list = unsafe {
        let get: libloading::Symbol<unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV> =
            lib.get(b"C_GetFunctionList\0").map_err(|e| e.to_string())?;
        let mut ptr: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
        if get(&mut ptr) != CKR_OK || ptr.is_null() {
            return Err(format!("{path}: C_GetFunctionList failed"));
        }
        *ptr
    };
    Ok(Real { _lib: lib, list })
}

/// SoftHSM2's list; wrapped functions are reachable only after it loaded.
fn real() -> Option<&'static CK_FUNCTION_LIST> {
    REAL.get().and_then(|r| r.as_ref().ok()).map(|r| &r.list)
}

#[no_mangle]
pub unsafe extern "C" fn C_GetFunctionList(out: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    if out.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    let real = match REAL.get_or_init(load) {
        Ok(r) => r.list,
        Err(e) => {
            eprintln!("faulty-pkcs11: {e}");
            return CKR_GENERAL_ERROR;
        }
    };
    let list = LIST.get_or_init(|| CK_FUNCTION_LIST {
        C_GetFunctionList: Some(C_GetFunctionList),
        C_GetSlotList: Some(C_GetSlotList),
        C_GetTokenInfo: Some(C_GetTokenInfo),
        C_OpenSession: Some(C_OpenSession),
        C_Login: Some(C_Login),
        C_SetPIN: Some(C_SetPIN),
        C_FindObjectsInit: Some(C_FindObjectsInit),
        C_FindObjects: Some(C_FindObjects),
        C_GenerateKey: Some(C_GenerateKey),
        C_DestroyObject: Some(C_DestroyObject),
        C_EncryptInit: Some(C_EncryptInit),
        C_Encrypt: Some(C_Encrypt),
        C_DecryptInit: Some(C_DecryptInit),
        C_Decrypt: Some(C_Decrypt),
        C_GenerateRandom: Some(C_GenerateRandom),
        ..real
    });
    *out = list as *const CK_FUNCTION_LIST as *mut CK_FUNCTION_LIST;
    CKR_OK
}

/// The commands in force.
#[derive(Default)]
struct Control {
    fault: Option<CK_RV>,
    functions: Option<Vec<String>>,
    count: Option<u64>,
    delay_ms: u64,
    delay_functions: Option<Vec<String>>,
    /// Stall after the real call instead of before it (the wrappers of `plain!` only).
    delay_after: bool,
    hsm_iv: bool,
    user_pin: bool,
    /// Inject the fault after the real call ran, so its effect stays (a crash after the
    /// HSM acted but before the caller heard of it). Only C_SetPIN honours it.
    after_call: bool,
    counts_file: Option<String>,
    /// How many C_FindObjects calls that find one object report it twice.
    duplicate_objects: u64,
}

fn names(v: &str) -> Vec<String> {
    v.split(',').map(|s| s.trim().to_string()).collect()
}

fn applies(list: &Option<Vec<String>>, function: &str) -> bool {
    list.as_ref()
        .is_none_or(|l| l.iter().any(|f| f == function))
}

impl Control {
    fn parse(text: &str) -> Control {
        let mut c = Control::default();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("");
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let v = v.trim();
            match k.trim() {
                "fault" => {
                    c.fault = match v {
                        "device_error" => Some(CKR_DEVICE_ERROR),
                        "device_removed" => Some(CKR_DEVICE_REMOVED),
                        "session_handle_invalid" => Some(CKR_SESSION_HANDLE_INVALID),
                        "token_not_present" => Some(CKR_TOKEN_NOT_PRESENT),
                        "general_error" => Some(CKR_GENERAL_ERROR),
                        "key_function_not_permitted" => Some(CKR_KEY_FUNCTION_NOT_PERMITTED),
                        _ => None,
                    }
                }
                "functions" => c.functions = Some(names(v)),
                "count" => c.count = v.parse().ok(),
                "delay_ms" => c.delay_ms = v.parse().unwrap_or(0),
                "delay_functions" => c.delay_functions = Some(names(v)),
                "delay_after" => c.delay_after = v == "true",
                "gcm_iv" => c.hsm_iv = v == "hsm",
                "pin_format" => c.user_pin = v == "user:password",
                "after_call" => c.after_call = v == "true",
                "counts_file" => c.counts_file = Some(v.to_string()),
                "duplicate_objects" => c.duplicate_objects = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        c
    }
}

/// The last control text seen and how many faults were injected since it changed.
static INJECTED: Mutex<(String, u64)> = Mutex::new((String::new(), 0));

fn control() -> (Control, String) {
    static PATH: OnceLock<Option<std::ffi::OsString>> = OnceLock::new();
    let text = PATH
        .get_or_init(|| std::env::var_os("FAULTY_PKCS11_CONTROL"))
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    (Control::parse(&text), text)
}

/// The modelled network latency: (per call, the functions it applies to), from the
/// environment at the first call.
fn latency() -> &'static Option<(Duration, Vec<String>)> {
    static LATENCY: OnceLock<Option<(Duration, Vec<String>)>> = OnceLock::new();
    LATENCY.get_or_init(|| {
        let us: u64 = std::env::var("FAULTY_PKCS11_LATENCY_US")
            .ok()?
            .parse()
            .ok()?;
        let functions = std::env::var("FAULTY_PKCS11_LATENCY_FUNCTIONS")
            .map(|v| names(&v))
            .unwrap_or_else(|_| names("C_Encrypt,C_Decrypt,C_GenerateRandom"));
        Some((Duration::from_micros(us), functions))
    })
}

/// Sleeps `d`, within a few microseconds: the thread's timer slack (50 µs by default) would
/// otherwise lengthen every sleep.
fn sleep_precisely(d: Duration) {
    thread_local! {
        static SLACK_SET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    SLACK_SET.with(|set| {
        if !set.get() {
            // PR_SET_TIMERSLACK = 29; 1 ns asks for the finest the kernel gives.
            unsafe { prctl(29, 1 as std::ffi::c_ulong) };
            set.set(true);
        }
    });
    let until = Instant::now() + d;
    std::thread::sleep(d);
    // A sleep that returns early (a signal) finishes here.
    while Instant::now() < until {
        std::thread::sleep(until - Instant::now());
    }
}

extern "C" {
    fn prctl(option: std::ffi::c_int, ...) -> std::ffi::c_int;
}

/// How many times each wrapped function was called.
static COUNTS: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());

fn count(function: &'static str, file: Option<&str>) {
    let mut counts = COUNTS.lock().unwrap_or_else(|p| p.into_inner());
    *counts.entry(function).or_default() += 1;
    if let Some(path) = file {
        let text: String = counts.iter().map(|(f, n)| format!("{f} = {n}\n")).collect();
        let _ = std::fs::write(path, text);
    }
}

/// The stall `delay_ms` of `function`, if it is one of `delay_functions`.
fn delay(c: &Control, function: &str) {
    if c.delay_ms > 0 && applies(&c.delay_functions, function) {
        std::thread::sleep(Duration::from_millis(c.delay_ms));
    }
}

/// Applies the delay and decides the fault for one call of `function`.
fn before(function: &'static str) -> (Control, Option<CK_RV>) {
    if let Some((d, functions)) = latency() {
        if functions.iter().any(|f| f == function) {
            sleep_precisely(*d);
        }
    }
    let (c, text) = control();
    count(function, c.counts_file.as_deref());
    if !c.delay_after {
        delay(&c, function);
    }
    let Some(rv) = c.fault.filter(|_| applies(&c.functions, function)) else {
        return (c, None);
    };
    let mut seen = INJECTED.lock().unwrap_or_else(|p| p.into_inner());
    if seen.0 != text {
        *seen = (text, 0);
    }
    if c.count.is_some_and(|n| seen.1 >= n) {
        return (c, None);
    }
    seen.1 += 1;
    (c, Some(rv))
}

macro_rules! call {
    ($name:ident ( $($arg:expr),* )) => {
        match real().and_then(|l| l.$name) {
            Some(f) => f($($arg),*),
            None => CKR_FUNCTION_NOT_SUPPORTED,
        }
    };
}

/// Wrappers that only inject faults and delays.
macro_rules! plain {
    ($( $name:ident ( $($arg:ident : $ty:ty),* ); )*) => {$(
        unsafe extern "C" fn $name($($arg: $ty),*) -> CK_RV {
            let (c, fault) = before(stringify!($name));
            if let Some(rv) = fault {
                return rv;
            }
            let rv = call!($name($($arg),*));
            if c.delay_after {
                // The real call is over (its effects complete) before the stall begins.
                count(concat!(stringify!($name), " returned"), c.counts_file.as_deref());
                delay(&c, stringify!($name));
            }
            rv
        }
    )*};
}

plain! {
    C_GetTokenInfo(slot: CK_SLOT_ID, info: *mut CK_TOKEN_INFO);
    C_OpenSession(slot: CK_SLOT_ID, flags: CK_FLAGS, app: *mut std::ffi::c_void, notify: CK_NOTIFY, out: *mut CK_SESSION_HANDLE);
    C_FindObjectsInit(s: CK_SESSION_HANDLE, t: *mut CK_ATTRIBUTE, n: CK_ULONG);
    C_GenerateKey(s: CK_SESSION_HANDLE, m: *mut CK_MECHANISM, t: *mut CK_ATTRIBUTE, n: CK_ULONG, out: *mut CK_OBJECT_HANDLE);
    C_DestroyObject(s: CK_SESSION_HANDLE, o: CK_OBJECT_HANDLE);
    C_Encrypt(s: CK_SESSION_HANDLE, d: *mut CK_BYTE, n: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_DecryptInit(s: CK_SESSION_HANDLE, m: *mut CK_MECHANISM, k: CK_OBJECT_HANDLE);
    C_Decrypt(s: CK_SESSION_HANDLE, d: *mut CK_BYTE, n: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_GenerateRandom(s: CK_SESSION_HANDLE, out: *mut CK_BYTE, n: CK_ULONG);
}

/// The last control text seen and how many finds were doubled since it changed.
static DOUBLED: Mutex<(String, u64)> = Mutex::new((String::new(), 0));

/// With `duplicate_objects`, a find that returns one object returns it twice.
unsafe extern "C" fn C_FindObjects(
    s: CK_SESSION_HANDLE,
    out: *mut CK_OBJECT_HANDLE,
    max: CK_ULONG,
    found: *mut CK_ULONG,
) -> CK_RV {
    let (c, text) = control();
    count("C_FindObjects", c.counts_file.as_deref());
    let rv = call!(C_FindObjects(s, out, max, found));
    if rv != CKR_OK || c.duplicate_objects == 0 || found.is_null() || out.is_null() {
        return rv;
    }
    if *found != 1 || max < 2 {
        return rv;
    }
    let mut doubled = DOUBLED.lock().unwrap_or_else(|p| p.into_inner());
    if doubled.0 != text {
        *doubled = (text, 0);
    }
    if doubled.1 < c.duplicate_objects {
        doubled.1 += 1;
        *out.add(1) = *out;
        *found = 2;
    }
    rv
}

/// Slots stay; with `token_not_present` their tokens disappear from the tokens-only list.
unsafe extern "C" fn C_GetSlotList(
    present: CK_BBOOL,
    list: *mut CK_SLOT_ID,
    count: *mut CK_ULONG,
) -> CK_RV {
    let (c, _) = control();
    let hidden = c.fault == Some(CKR_TOKEN_NOT_PRESENT) && applies(&c.functions, "C_GetSlotList");
    if hidden && present == CK_TRUE && !count.is_null() {
        *count = 0;
        return CKR_OK;
    }
    call!(C_GetSlotList(present, list, count))
}

unsafe extern "C" fn C_Login(
    s: CK_SESSION_HANDLE,
    user: CK_USER_TYPE,
    pin: *mut CK_UTF8CHAR,
    len: CK_ULONG,
) -> CK_RV {
    let (c, fault) = before("C_Login");
    if let Some(rv) = fault {
        return rv;
    }
    if !c.user_pin || user != CKU_USER || pin.is_null() {
        return call!(C_Login(s, user, pin, len));
    }
    // CloudHSM: `<crypto user>:<password>`; SoftHSM2 below takes the password alone.
    let given = std::slice::from_raw_parts(pin, len as usize);
    match given.iter().position(|b| *b == b':') {
        Some(i) if i > 0 => {
            let rest = &given[i + 1..];
            call!(C_Login(
                s,
                user,
                rest.as_ptr() as *mut _,
                rest.len() as CK_ULONG
            ))
        }
        _ => CKR_PIN_INCORRECT,
    }
}

unsafe extern "C" fn C_SetPIN(
    s: CK_SESSION_HANDLE,
    old: *mut CK_UTF8CHAR,
    old_len: CK_ULONG,
    new: *mut CK_UTF8CHAR,
    new_len: CK_ULONG,
) -> CK_RV {
    match before("C_SetPIN") {
        (c, Some(rv)) if c.after_call => {
            let real = call!(C_SetPIN(s, old, old_len, new, new_len));
            if real == CKR_OK {
                rv
            } else {
                real
            }
        }
        (_, Some(rv)) => rv,
        (_, None) => call!(C_SetPIN(s, old, old_len, new, new_len)),
    }
}

unsafe extern "C" fn C_EncryptInit(
    s: CK_SESSION_HANDLE,
    m: *mut CK_MECHANISM,
    k: CK_OBJECT_HANDLE,
) -> CK_RV {
    let (c, fault) = before("C_EncryptInit");
    if let Some(rv) = fault {
        return rv;
    }
    if c.hsm_iv && !m.is_null() && (*m).mechanism == CKM_AES_GCM {
        let p = (*m).pParameter as *mut CK_GCM_PARAMS;
        if p.is_null() || (*m).ulParameterLen as usize != std::mem::size_of::<CK_GCM_PARAMS>() {
            return CKR_MECHANISM_PARAM_INVALID;
        }
        let (iv, iv_len) = ((*p).pIv, (*p).ulIvLen as usize);
        if iv.is_null() || iv_len != 12 {
            return CKR_MECHANISM_PARAM_INVALID;
        }
        // As CloudHSM: a caller-chosen IV is refused; the HSM picks one and writes it back.
        let iv = std::slice::from_raw_parts_mut(iv, iv_len);
        if iv.iter().any(|b| *b != 0) {
            return CKR_MECHANISM_PARAM_INVALID;
        }
        let rv = call!(C_GenerateRandom(s, iv.as_mut_ptr(), iv_len as CK_ULONG));
        if rv != CKR_OK {
            return rv;
        }
    }
    call!(C_EncryptInit(s, m, k))
}
