//! PKCS#11: module contexts, login, the session pool, the key template and AES-GCM.
//!
//! Rules (DESIGN.md section 4) this module keeps:
//! * one `Pkcs11` context per module path per process, initialised with CKF_OS_LOCKING_OK;
//! * one anchor session per connected store, logged in as the crypto user and kept open while
//!   connected (closing a token's last session logs the application out);
//! * sessions are owned by a bounded pool of worker threads, so no PKCS#11 call runs on an
//!   async worker, and every operation has a deadline;
//! * error tiers: a session-tier error replaces the session and retries once, a device-tier
//!   error degrades the connection (the domain then reconnects);
//! * key handles are cached by key id; `C_FindObjects` runs only on a cache miss and must find
//!   exactly one object.
//!
//! It never logs or returns a PIN, a plaintext or a data key.

pub mod error;
pub mod single;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use uuid::Uuid;
use zeroize::{Zeroize, Zeroizing};

use error::{is_stale_handle, short, tier, Tier};
pub use error::{HsmError, LoginFailure};
use single::OneCall;

/// How many times a key's token object is looked up before it is given up for this request,
/// and the pause before the second (the third waits twice as long).
const LOOKUPS: u32 = 3;
const LOOKUP_PAUSE: Duration = Duration::from_millis(20);
/// How long an object found twice keeps the replica unready.
const AMBIGUITY_SHOWS: Duration = Duration::from_secs(30);

/// GCM tag length in bits.
const GCM_TAG_BITS: u64 = 128;
const GCM_TAG_LEN: usize = 16;
/// Token random bytes fetched at once for data keys: 128 AES-256 keys per C_GenerateRandom.
const RANDOM_BLOCK: usize = 4096;
/// GCM IV length in bytes.
pub const IV_LEN: usize = 12;

/// The process-wide PKCS#11 contexts, one per module path.
#[derive(Default)]
pub struct Modules {
    loaded: Mutex<HashMap<PathBuf, (Pkcs11, Arc<OneCall>)>>,
}

impl Modules {
    /// The context for `module`, loading and initialising it on first use.
    pub fn get(&self, module: &Path) -> Result<Pkcs11, String> {
        self.get_with_calls(module).map(|(ctx, _)| ctx)
    }

    /// The context and the single-call C_Encrypt / C_Decrypt of `module`.
    pub fn get_with_calls(&self, module: &Path) -> Result<(Pkcs11, Arc<OneCall>), String> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((ctx, calls)) = loaded.get(module) {
            return Ok((ctx.clone(), Arc::clone(calls)));
        }
        let ctx = Pkcs11::new(module)
            .map_err(|e| format!("loading PKCS#11 module {}: {}", module.display(), short(&e)))?;
        // Never initialise with empty flags: SoftHSM2 then drops its own locking.
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(|e| format!("C_Initialize {}: {}", module.display(), short(&e)))?;
        let calls = Arc::new(OneCall::load(module)?);
        loaded.insert(module.to_path_buf(), (ctx.clone(), Arc::clone(&calls)));
        Ok((ctx, calls))
    }

    /// Loads `module` if need be, then opens a connection to its token `label` (see
    /// `Connection::open`). Blocking.
    pub fn open(
        &self,
        module: &Path,
        label: &str,
        pin: &Pin,
        options: Options,
    ) -> Result<Arc<Connection>, LoginFailure> {
        let (ctx, calls) = self.get_with_calls(module).map_err(|e| {
            tracing::error!(error = %e, "PKCS#11 module unusable");
            LoginFailure::Internal
        })?;
        Connection::open(ctx, calls, label, pin, options)
    }
}

/// The crypto user's PIN: `user:password` for modules that take the user in the PIN (AWS
/// CloudHSM's), else the password alone. Built in one allocation that moves into the
/// zeroizing AuthPin, so that no stray copy is left in freed memory. Never printed.
pub struct Pin(AuthPin);

impl Pin {
    /// `None` if the password is not UTF-8 (PKCS#11 PINs are text here).
    pub fn new(user: Option<&str>, password: &[u8]) -> Option<Pin> {
        let password = std::str::from_utf8(password).ok()?;
        let user_len = user.map_or(0, |u| u.len() + 1);
        let mut pin = String::with_capacity(user_len + password.len());
        if let Some(u) = user {
            pin.push_str(u);
            pin.push(':');
        }
        pin.push_str(password);
        Some(Pin(AuthPin::from(pin)))
    }
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pin(<redacted>)")
    }
}

/// The slot whose token carries `label`, if any.
pub fn find_token(ctx: &Pkcs11, label: &str) -> Result<Option<Slot>, cryptoki::error::Error> {
    for slot in ctx.get_slots_with_token()? {
        if ctx.get_token_info(slot)?.label() == label {
            return Ok(Some(slot));
        }
    }
    Ok(None)
}

/// Initialises a fresh token with `label` on a free slot and sets the crypto user's PIN.
/// For `hsm-kms dev` (SoftHSM2 always offers one uninitialised slot).
pub fn init_token(ctx: &Pkcs11, label: &str, so_pin: &str, user_pin: &str) -> anyhow::Result<()> {
    let so = AuthPin::from(so_pin);
    let free = ctx
        .get_slots_with_token()?
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .map(|t| !t.token_initialized())
                .unwrap_or(false)
        })
        .ok_or_else(|| anyhow::anyhow!("no free slot to initialise a token in"))?;
    ctx.init_token(free, &so, label)?;
    let slot = find_token(ctx, label)?
        .ok_or_else(|| anyhow::anyhow!("token {label} vanished after initialisation"))?;
    let session = ctx.open_rw_session(slot)?;
    session.login(UserType::So, Some(&so))?;
    session.init_pin(&AuthPin::from(user_pin))?;
    session.logout()?;
    Ok(())
}

/// The PKCS#11 attributes of a KMS key's token object. **Contract** (DESIGN.md section 3).
pub fn key_template(key_id: &Uuid, arn: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::Label(arn.as_bytes().to_vec()),
        Attribute::Id(key_id.to_string().into_bytes()),
    ]
}

fn key_search(key_id: &Uuid) -> [Attribute; 3] {
    [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Token(true),
        Attribute::Id(key_id.to_string().into_bytes()),
    ]
}

/// Work for a session worker: runs on the worker's thread with its session slot.
type Work = Box<dyn FnOnce(&Connection, &mut Option<Session>) + Send>;

/// How a connection behaves; set by the domain when it connects a store.
pub struct Options {
    /// Most sessions (worker threads); also bounded by the token's own limit.
    pub pool_size: usize,
    /// Deadline of one operation, queueing included.
    pub call_timeout: Duration,
    /// Called once, from a worker thread, on the first device-tier failure.
    pub on_device_failure: Box<dyn Fn(&str) + Send + Sync>,
    /// The custom key store the connection serves, for its metrics and log lines.
    pub store_id: String,
}

/// A logged-in connection to one cluster's token, serving one custom key store.
///
/// PKCS#11 work runs on a dedicated pool of threads, one per session: each worker owns its
/// session (exclusive by construction) and takes jobs from one shared queue, so a busy worker
/// goes from job to job without being woken. No PKCS#11 call runs on an async worker.
///
/// After a device-tier failure the connection is *degraded*: every later operation fails at
/// once with `HsmError::Unavailable` and the domain replaces the connection.
pub struct Connection {
    ctx: Pkcs11,
    /// C_Encrypt and C_Decrypt, called once per operation.
    calls: Arc<OneCall>,
    slot: Slot,
    /// Holds the login. Taken (and logged out) by `close`.
    anchor: Mutex<Option<Session>>,
    /// The job queue; `None` once closing.
    jobs: std::sync::RwLock<Option<std::sync::mpsc::Sender<Work>>>,
    workers: Mutex<Vec<std::thread::JoinHandle<()>>>,
    handles: std::sync::RwLock<HashMap<Uuid, ObjectHandle>>,
    /// Serialises token object creation and destruction: concurrent C_GenerateKey on
    /// SoftHSM2's file store intermittently failed (GeneralError, TemplateInconsistent) in
    /// the bench's 10,000-key set-up at 16 concurrent CreateKey calls. Rare next to crypto.
    objects: Mutex<()>,
    call_timeout: Duration,
    degraded: AtomicBool,
    /// When a key's token object was last still ambiguous (found more than once) after every
    /// lookup: the token, as this process sees it, is inconsistent (`lookup_trouble`).
    ambiguous_at: Mutex<Option<Instant>>,
    on_device_failure: Box<dyn Fn(&str) + Send + Sync>,
    /// Set when a newer connection to the same token replaced this one: its close must then
    /// not log out, which would log the newer connection out too (the login is per token).
    superseded: AtomicBool,
    capacity: usize,
    busy: AtomicUsize,
    queueing: Queueing,
    /// Token random bytes not yet handed out (`data_key_bytes`), and the refill in progress.
    random_pool: Mutex<Zeroizing<Vec<u8>>>,
    refill: tokio::sync::Mutex<()>,
}

impl Connection {
    /// Finds the token, logs in as the crypto user and starts the session workers. Blocking.
    pub fn open(
        ctx: Pkcs11,
        calls: Arc<OneCall>,
        token_label: &str,
        pin: &Pin,
        options: Options,
    ) -> Result<Arc<Connection>, LoginFailure> {
        let slot = match find_token(&ctx, token_label) {
            Ok(Some(slot)) => slot,
            Ok(None) => return Err(LoginFailure::TokenNotFound),
            Err(e) => {
                tracing::warn!(token = token_label, error = %short(&e), "token lookup failed");
                return Err(LoginFailure::from_error(&e));
            }
        };
        let anchor = ctx.open_rw_session(slot).map_err(|e| {
            tracing::warn!(token = token_label, error = %short(&e), "opening the anchor session failed");
            LoginFailure::from_error(&e)
        })?;
        match anchor.login(UserType::User, Some(&pin.0)) {
            Ok(()) => {}
            // Another session of this process already holds the login: that is fine.
            Err(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::UserAlreadyLoggedIn,
                _,
            )) => {}
            Err(e) => {
                tracing::warn!(token = token_label, error = %short(&e), "login failed");
                return Err(LoginFailure::from_error(&e));
            }
        }
        // The pool is bounded by the token's own session limit, less the anchor session.
        let token_max = ctx
            .get_token_info(slot)
            .ok()
            .and_then(|t| match t.max_session_count() {
                cryptoki::slot::Limit::Max(m) => usize::try_from(m).ok(),
                _ => None,
            })
            .map(|m| m.saturating_sub(1).max(1))
            .unwrap_or(usize::MAX);
        let capacity = options.pool_size.min(token_max).max(1);
        let (tx, rx) = std::sync::mpsc::channel::<Work>();
        let conn = Arc::new(Connection {
            ctx,
            calls,
            slot,
            anchor: Mutex::new(Some(anchor)),
            jobs: std::sync::RwLock::new(Some(tx)),
            workers: Mutex::new(Vec::new()),
            handles: std::sync::RwLock::new(HashMap::new()),
            objects: Mutex::new(()),
            call_timeout: options.call_timeout,
            degraded: AtomicBool::new(false),
            ambiguous_at: Mutex::new(None),
            on_device_failure: options.on_device_failure,
            superseded: AtomicBool::new(false),
            capacity,
            busy: AtomicUsize::new(0),
            queueing: Queueing::new(options.store_id, capacity),
            random_pool: Mutex::new(Zeroizing::new(Vec::with_capacity(2 * RANDOM_BLOCK))),
            refill: tokio::sync::Mutex::new(()),
        });
        let rx = Arc::new(Mutex::new(rx));
        let mut workers = Vec::with_capacity(capacity);
        for i in 0..capacity {
            let (conn, rx) = (Arc::downgrade(&conn), Arc::clone(&rx));
            let spawned = std::thread::Builder::new()
                .name(format!("pkcs11-{i}"))
                .spawn(move || worker(conn, rx));
            match spawned {
                Ok(h) => workers.push(h),
                Err(e) => {
                    tracing::error!(error = %e, "starting a PKCS#11 worker failed");
                    break;
                }
            }
        }
        if workers.is_empty() {
            return Err(LoginFailure::Internal);
        }
        *conn.workers.lock().unwrap_or_else(|p| p.into_inner()) = workers;
        Ok(conn)
    }

    /// Changes the crypto user's PIN (C_SetPIN on the logged-in anchor session). Blocking.
    pub fn set_pin(&self, old: &Pin, new: &Pin) -> Result<(), HsmError> {
        let anchor = self.anchor.lock().unwrap_or_else(|p| p.into_inner());
        let session = anchor
            .as_ref()
            .ok_or_else(|| HsmError::Internal("the connection is closed".into()))?;
        session
            .set_pin(&old.0, &new.0)
            .map_err(|e| HsmError::from_pkcs11(&e))
    }

    /// Whether a device-tier failure has put this connection out of service.
    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    /// Why this connection should not be trusted with requests now, if a key's token object
    /// was found more than once, after every lookup, within `AMBIGUITY_SHOWS`.
    pub fn lookup_trouble(&self) -> Option<String> {
        let at = (*self.ambiguous_at.lock().unwrap_or_else(|p| p.into_inner()))?;
        let ago = at.elapsed();
        (ago < AMBIGUITY_SHOWS).then(|| {
            format!(
                "a key's token object was found more than once, after {LOOKUPS} lookups, {}s ago",
                ago.as_secs()
            )
        })
    }

    /// (sessions, sessions busy with an operation).
    pub fn pool(&self) -> (usize, usize) {
        (self.capacity, self.busy.load(Ordering::Relaxed))
    }

    /// Marks the connection as replaced by a newer one to the same token.
    pub fn supersede(&self) {
        self.superseded.store(true, Ordering::Release);
    }

    fn degrade(&self, detail: &str) {
        if !self.degraded.swap(true, Ordering::AcqRel) {
            tracing::error!(%detail, "HSM device failure; the store is degraded until it reconnects");
            (self.on_device_failure)(detail);
        }
    }

    fn unavailable() -> HsmError {
        HsmError::Unavailable("the HSM failed and the store is reconnecting".into())
    }

    /// Runs `op` on a session worker within the call deadline. A session-tier failure
    /// replaces the worker's session and the operation is retried once on the fresh one; a
    /// device-tier failure degrades the connection. `function` names the operation's main
    /// PKCS#11 function for metrics.
    async fn run<T, F>(self: &Arc<Self>, function: &'static str, op: F) -> Result<T, HsmError>
    where
        T: Send + 'static,
        F: Fn(&Connection, &Session) -> Result<T, OpError> + Send + 'static,
    {
        if self.is_degraded() {
            return Err(Self::unavailable());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let queued = Instant::now();
        let work: Work = Box::new(move |conn, slot| {
            let waited = queued.elapsed();
            // The caller's deadline passed while this waited in the queue: no HSM work for it.
            if tx.is_closed() {
                conn.queueing.note(waited, Duration::ZERO);
                return;
            }
            let _ = tx.send(conn.run_on(slot, function, waited, op));
        });
        {
            let jobs = self.jobs.read().unwrap_or_else(|p| p.into_inner());
            let sent = jobs.as_ref().map(|q| q.send(work).is_ok()).unwrap_or(false);
            if !sent {
                return Err(HsmError::Unavailable("the connection is closed".into()));
            }
        }
        match tokio::time::timeout(self.call_timeout, rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(HsmError::Internal("a PKCS#11 worker stopped".into())),
            Err(_) => {
                crate::metrics::get().hsm_error(function, "Timeout".into());
                Err(HsmError::Timeout(self.call_timeout))
            }
        }
    }

    fn run_on<T, F>(
        &self,
        slot: &mut Option<Session>,
        function: &'static str,
        waited: Duration,
        op: F,
    ) -> Result<T, HsmError>
    where
        F: Fn(&Connection, &Session) -> Result<T, OpError>,
    {
        if self.is_degraded() {
            return Err(Self::unavailable());
        }
        self.busy.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let outcome = self.attempt(slot, op);
        self.busy.fetch_sub(1, Ordering::Relaxed);
        let took = started.elapsed();
        crate::metrics::get().hsm_call(function, took);
        self.queueing.note(waited, took);
        outcome.map_err(|e| match e {
            OpError::Pkcs11(e) => {
                crate::metrics::get().hsm_error(function, error::rv_name(&e));
                if matches!(tier(&e), Tier::Session | Tier::Device) {
                    *slot = None;
                }
                if tier(&e) == Tier::Device {
                    self.degrade(&short(&e));
                }
                HsmError::from_pkcs11(&e)
            }
            OpError::Hsm(e) => e,
        })
    }

    fn attempt<T, F>(&self, slot: &mut Option<Session>, op: F) -> Result<T, OpError>
    where
        F: Fn(&Connection, &Session) -> Result<T, OpError>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let session = match slot {
                Some(s) => s,
                None => slot.insert(self.ctx.open_rw_session(self.slot)?),
            };
            match op(self, session) {
                Err(OpError::Pkcs11(e)) if tier(&e) == Tier::Session && attempt == 1 => {
                    tracing::warn!(error = %short(&e), "replacing a PKCS#11 session and retrying");
                    crate::metrics::get().session_replaced();
                    *slot = None;
                }
                other => return other,
            }
        }
    }

    /// The token object of `key_id`: from the cache, else a `C_FindObjects` search that
    /// must find exactly one. A search that finds none or several is made again, at most
    /// `LOOKUPS` times in all, a little later each time: a token can show a new key's
    /// label before its value, or (SoftHSM2 2.6.1, after a reconnect) an object twice. What
    /// stays wrong is counted (`hsm_kms_key_lookup_failures`), and an object still found
    /// twice makes the replica unready for a while (`lookup_trouble`).
    fn handle(&self, session: &Session, key_id: &Uuid) -> Result<ObjectHandle, OpError> {
        if let Some(h) = self.cached(key_id) {
            return Ok(h);
        }
        let mut found = Vec::new();
        for attempt in 0..LOOKUPS {
            if attempt > 0 {
                std::thread::sleep(LOOKUP_PAUSE * attempt);
            }
            found = session.find_objects(&key_search(key_id))?;
            if let [h] = found.as_slice() {
                self.remember(*key_id, *h);
                return Ok(*h);
            }
        }
        if found.is_empty() {
            crate::metrics::get().key_lookup_failed("missing");
            return Err(OpError::Hsm(HsmError::KeyMaterialMissing));
        }
        crate::metrics::get().key_lookup_failed("ambiguous");
        *self.ambiguous_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        Err(OpError::Hsm(HsmError::Internal(format!(
            "{} token objects carry key id {key_id}, after {LOOKUPS} lookups",
            found.len()
        ))))
    }

    fn cached(&self, key_id: &Uuid) -> Option<ObjectHandle> {
        self.handles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key_id)
            .copied()
    }

    fn remember(&self, key_id: Uuid, h: ObjectHandle) {
        self.handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key_id, h);
    }

    fn forget(&self, key_id: &Uuid) {
        self.handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key_id);
    }

    /// Runs `f` with the key's handle; a stale cached handle is dropped and looked up again.
    fn with_key<T>(
        &self,
        session: &Session,
        key_id: &Uuid,
        f: impl Fn(ObjectHandle) -> cryptoki::error::Result<T>,
    ) -> Result<T, OpError> {
        let h = self.handle(session, key_id)?;
        match f(h) {
            Err(e) if is_stale_handle(&e) => {
                self.forget(key_id);
                let h = self.handle(session, key_id)?;
                Ok(f(h)?)
            }
            other => Ok(other?),
        }
    }

    /// Generates the key's token object. Fails if one with this key id already exists.
    pub async fn generate_key(self: &Arc<Self>, key_id: Uuid, arn: String) -> Result<(), HsmError> {
        self.run("C_GenerateKey", move |conn, session| {
            let _one_at_a_time = conn.objects.lock().unwrap_or_else(|p| p.into_inner());
            if !session.find_objects(&key_search(&key_id))?.is_empty() {
                return Err(OpError::Hsm(HsmError::Internal(format!(
                    "key material for {key_id} already exists"
                ))));
            }
            let h = session.generate_key(&Mechanism::AesKeyGen, &key_template(&key_id, &arn))?;
            conn.remember(key_id, h);
            Ok(())
        })
        .await
    }

    /// Destroys the key's token object if there is one.
    pub async fn destroy_key(self: &Arc<Self>, key_id: Uuid) -> Result<(), HsmError> {
        self.destroy_key_before(key_id, None).await
    }

    /// `destroy_key`, but only if the destroy can start before `deadline`: a caller whose
    /// claim on the key runs out then (a scheduled deletion's lease) must not destroy after
    /// another replica may have taken the key over. The check is made after the objects are
    /// found, right before C_DestroyObject.
    pub async fn destroy_key_before(
        self: &Arc<Self>,
        key_id: Uuid,
        deadline: Option<std::time::Instant>,
    ) -> Result<(), HsmError> {
        self.run("C_DestroyObject", move |conn, session| {
            let _one_at_a_time = conn.objects.lock().unwrap_or_else(|p| p.into_inner());
            conn.forget(&key_id);
            let found = session.find_objects(&key_search(&key_id))?;
            if deadline.is_some_and(|d| std::time::Instant::now() > d) && !found.is_empty() {
                return Err(OpError::Hsm(HsmError::Internal(
                    "the claim on the key ran out before its material could be destroyed".into(),
                )));
            }
            for h in found {
                session.destroy_object(h)?;
            }
            Ok(())
        })
        .await
    }

    /// AES-256-GCM encryption inside the token. With `iv` the caller's IV is used; without,
    /// the HSM chooses one and writes it back (AWS CloudHSM). Returns the IV and the
    /// ciphertext followed by the tag.
    pub async fn encrypt(
        self: &Arc<Self>,
        key_id: Uuid,
        iv: Option<[u8; IV_LEN]>,
        aad: Vec<u8>,
        plaintext: Zeroizing<Vec<u8>>,
    ) -> Result<([u8; IV_LEN], Vec<u8>), HsmError> {
        self.run("C_Encrypt", move |conn, session| {
            let (used_iv, sealed) = conn.with_key(session, &key_id, |h| {
                let mut iv_buf = iv.unwrap_or([0u8; IV_LEN]);
                let params = GcmParams::new(&mut iv_buf, &aad, GCM_TAG_BITS.into())?;
                session.encrypt_init(&Mechanism::AesGcm(params), h)?;
                // The output of AES-GCM: the ciphertext (as long as the input) and the tag.
                let mut out = vec![0u8; plaintext.len() + GCM_TAG_LEN];
                conn.calls.encrypt(session, &plaintext, &mut out)?;
                Ok((iv_buf, out))
            })?;
            // An HSM that was to choose the IV but left zeros would make every ciphertext
            // share one IV: refuse rather than return it.
            if iv.is_none() && iv_buf_is_zero(&used_iv) {
                return Err(OpError::Hsm(HsmError::Internal(
                    "the HSM did not return a GCM IV; check the cluster's gcm_iv setting".into(),
                )));
            }
            Ok((used_iv, sealed))
        })
        .await
    }

    /// AES-256-GCM decryption inside the token; a bad tag is `HsmError::BadCiphertext`.
    pub async fn decrypt(
        self: &Arc<Self>,
        key_id: Uuid,
        iv: [u8; 12],
        aad: Vec<u8>,
        sealed: Vec<u8>,
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        self.run("C_Decrypt", move |conn, session| {
            conn.with_key(session, &key_id, |h| {
                let mut iv = iv;
                let params = GcmParams::new(&mut iv, &aad, GCM_TAG_BITS.into())?;
                session.decrypt_init(&Mechanism::AesGcm(params), h)?;
                // Room for the whole input: some tokens ask for it before they have checked
                // the tag, though the plaintext is 16 bytes shorter.
                let mut out = Zeroizing::new(vec![0u8; sealed.len()]);
                conn.calls.decrypt(session, &sealed, &mut out)?;
                Ok(out)
            })
        })
        .await
    }

    /// Key material for data keys: the token's random bytes, fetched `RANDOM_BLOCK` at a
    /// time so that a GenerateDataKey costs one HSM round trip (its C_Encrypt), not two. Each
    /// byte is handed out once, and zeroed in the pool as it leaves. One caller refills at a
    /// time; the others wait for its block rather than each fetching one.
    pub async fn data_key_bytes(
        self: &Arc<Self>,
        len: usize,
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        if let Some(out) = self.take_random(len) {
            return Ok(out);
        }
        let _refilling = self.refill.lock().await;
        if let Some(out) = self.take_random(len) {
            return Ok(out);
        }
        let block = self.random(len.max(RANDOM_BLOCK)).await?;
        self.random_pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(&block);
        self.take_random(len)
            .ok_or_else(|| HsmError::Internal("the random block fell short".into()))
    }

    fn take_random(&self, len: usize) -> Option<Zeroizing<Vec<u8>>> {
        let mut pool = self.random_pool.lock().unwrap_or_else(|p| p.into_inner());
        let start = pool.len().checked_sub(len)?;
        let out = Zeroizing::new(pool[start..].to_vec());
        pool[start..].zeroize();
        pool.truncate(start);
        Some(out)
    }

    /// Random bytes from the token's generator.
    pub async fn random(self: &Arc<Self>, len: usize) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        self.run("C_GenerateRandom", move |_, session| {
            let mut buf = Zeroizing::new(vec![0u8; len]);
            session.generate_random_slice(&mut buf)?;
            Ok(buf)
        })
        .await
    }

    /// Lets queued operations finish, stops the workers (closing their sessions), then logs
    /// out and closes the anchor session. Waits at most `limit`: a worker stuck in a hung HSM
    /// call finishes (and closes its session) in the background when the call returns.
    pub async fn close(self: &Arc<Self>, limit: Duration) {
        // Dropping the sender ends each worker once the queue is empty.
        self.jobs.write().unwrap_or_else(|p| p.into_inner()).take();
        let workers: Vec<_> = self
            .workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        let conn = Arc::clone(self);
        let closing = tokio::task::spawn_blocking(move || {
            for w in workers {
                let _ = w.join();
            }
            conn.handles
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            if let Some(anchor) = conn.anchor.lock().unwrap_or_else(|p| p.into_inner()).take() {
                if !conn.superseded.load(Ordering::Acquire) {
                    if let Err(e) = anchor.logout() {
                        tracing::debug!(error = %short(&e), "logout");
                    }
                }
                drop(anchor);
            }
        });
        if tokio::time::timeout(limit, closing).await.is_err() {
            tracing::warn!(
                ?limit,
                "an HSM call is still running; its session closes when the call returns"
            );
        }
    }
}

fn iv_buf_is_zero(iv: &[u8; IV_LEN]) -> bool {
    iv.iter().all(|b| *b == 0)
}

/// A session worker: takes jobs until the queue closes; its session closes with it.
fn worker(conn: std::sync::Weak<Connection>, jobs: Arc<Mutex<std::sync::mpsc::Receiver<Work>>>) {
    let mut session: Option<Session> = None;
    loop {
        let job = {
            let rx = jobs.lock().unwrap_or_else(|p| p.into_inner());
            rx.recv()
        };
        let Ok(job) = job else { break };
        let Some(conn) = conn.upgrade() else { break };
        job(&conn, &mut session);
    }
    drop(session);
}

/// What an operation closure can fail with: a raw PKCS#11 error still to be classified, or
/// an already-decided outcome.
enum OpError {
    Pkcs11(cryptoki::error::Error),
    Hsm(HsmError),
}

impl From<cryptoki::error::Error> for OpError {
    fn from(e: cryptoki::error::Error) -> Self {
        OpError::Pkcs11(e)
    }
}

/// How long operations wait for a session, for sizing the pool: each wait goes to a
/// histogram, and every `Queueing::EVERY` (with traffic) the sessions the load needed, by
/// Little's law the average number of operations waiting or running (throughput x (wait +
/// HSM time)), go to a gauge, and to a warning when operations waited noticeably.
struct Queueing {
    store_id: String,
    capacity: usize,
    wait: prometheus_client::metrics::histogram::Histogram,
    needed: prometheus_client::metrics::gauge::Gauge,
    jobs: std::sync::atomic::AtomicU64,
    wait_ns: std::sync::atomic::AtomicU64,
    busy_ns: std::sync::atomic::AtomicU64,
    since: Mutex<Instant>,
}

impl Queueing {
    const EVERY: Duration = Duration::from_secs(10);

    fn new(store_id: String, capacity: usize) -> Queueing {
        let (wait, needed) = crate::metrics::get().session_queue(&store_id);
        Queueing {
            store_id,
            capacity,
            wait,
            needed,
            jobs: Default::default(),
            wait_ns: Default::default(),
            busy_ns: Default::default(),
            since: Mutex::new(Instant::now()),
        }
    }

    fn note(&self, waited: Duration, busy: Duration) {
        self.wait.observe(waited.as_secs_f64());
        self.jobs.fetch_add(1, Ordering::Relaxed);
        self.wait_ns
            .fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
        self.busy_ns
            .fetch_add(busy.as_nanos() as u64, Ordering::Relaxed);
        let Ok(mut since) = self.since.try_lock() else {
            return;
        };
        let window = since.elapsed();
        if window < Self::EVERY {
            return;
        }
        *since = Instant::now();
        drop(since);
        let jobs = self.jobs.swap(0, Ordering::Relaxed);
        let wait = self.wait_ns.swap(0, Ordering::Relaxed) as f64 / 1e9;
        let busy = self.busy_ns.swap(0, Ordering::Relaxed) as f64 / 1e9;
        if jobs == 0 {
            return;
        }
        let needed = ((wait + busy) / window.as_secs_f64()).ceil() as usize;
        self.needed.set(needed as i64);
        let (mean_wait, mean_busy) = (wait / jobs as f64, busy / jobs as f64);
        // Waiting that matters: over a millisecond, and over a fifth of the HSM time.
        if mean_wait > 0.001 && mean_wait > mean_busy / 5.0 {
            tracing::warn!(
                custom_key_store_id = %self.store_id,
                operations_per_second = (jobs as f64 / window.as_secs_f64()).round(),
                mean_wait_ms = format!("{:.2}", mean_wait * 1000.0),
                mean_hsm_ms = format!("{:.2}", mean_busy * 1000.0),
                sessions = self.capacity,
                sessions_needed = needed,
                "HSM operations are queueing for PKCS#11 sessions: hsm.session_pool_size = \
                 {needed} would serve this load without waiting (if the token allows that many \
                 sessions)"
            );
        }
    }
}
