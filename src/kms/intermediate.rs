//! Directory key mode: a policy's KMS key wraps an *intermediate key* (IK)
//! now and then, and each new file's DEK is wrapped locally under the
//! current IK. Creating a file then makes no KMS call, and a cold read of a
//! subtree makes one KMS unwrap per IK it meets instead of one per file.
//!
//! [`IntermediateKeys`] is a [`KeyProvider`] around the policy's key (the
//! provider every `ActivePolicy` holds), so the filesystem, the DEK cache
//! and every lifecycle pass work through the trait unchanged:
//!
//! - A DEK under an IK is recorded with the KMS key's reference and key
//!   version `<KMS key version>+ik.<IK ID hex>` (`format::ik`), and sealed
//!   with AES-256-GCM under the IK, bound to the IK's ID and the file's wrap
//!   context (`crypto::wrap_key`).
//! - The IK itself is wrapped by the KMS bound to its ID and the volume
//!   (`WrapContext::IntermediateKey`) and kept in the backing directory
//!   through an [`IntermediateKeyStore`], written durably before any header
//!   names it. The backing directory is untrusted: an object is only ever
//!   unwrapped by the policy's own key, under its own ID's context, so a
//!   swapped, forged or foreign object fails to unwrap.
//! - Unwraps of one IK share one KMS call (single flight); IK plaintexts are
//!   cached, bounded and for [`CACHE_TTL`] at most.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_lc_rs::aead::LessSafeKey;
use rand::RngCore;
use tokio::sync::OnceCell;

use super::config::KeySpec;
use super::{KeyProvider, KeyRef, KeyVersions, KmsError, WrapContext, WrappedDek};
use crate::audit::{AuditEvent, AuditLog, AuditOp, AuditOutcome};
use crate::crypto::{self, Dek};
use crate::format::ik::{self, ID_LEN};
use crate::format::FormatError;

/// A new IK after this many DEKs wrapped under the current one, by default.
pub const DEFAULT_MAX_FILES: u64 = 1_000_000;
/// Most DEKs ever wrapped under one IK, whatever the policy says: the
/// random-nonce AES-GCM budget of one key (NIST SP 800-38D).
pub const MAX_FILES_CAP: u64 = 1 << 32;
/// A new IK once the current one is this old, by default.
pub const DEFAULT_ROTATE_AFTER: Duration = Duration::from_secs(24 * 3600);
/// Most IK plaintexts cached per KMS key.
pub const CACHE_CAPACITY: usize = 4096;
/// How long a cached IK plaintext is used before the KMS unwraps it again
/// (the DEK cache's default TTL).
pub const CACHE_TTL: Duration = Duration::from_secs(3600);
/// Domain label of the AAD of a DEK wrapped under an IK.
const AAD_LABEL: &[u8] = b"kmsfs ik wrap v1\0";
/// Longest key version a header holds (a u8 length).
const MAX_KEY_VERSION: usize = u8::MAX as usize;

/// An IK's ID: creation time (Unix seconds, big-endian) and 8 random bytes.
pub type IkId = [u8; ID_LEN];

/// Where IK objects live (the backing directory's `.kmsfs-keys/`); kept
/// behind a trait so that this module does no filesystem I/O itself.
pub trait IntermediateKeyStore: Send + Sync {
    /// The bytes of IK `id`'s object; None if there is none.
    fn load(&self, id: &IkId) -> std::io::Result<Option<Vec<u8>>>;
    /// Writes IK `id`'s object durably (it survives a power loss once this
    /// returns): headers naming the IK are written only after.
    fn save(&self, id: &IkId, bytes: &[u8]) -> std::io::Result<()>;
    /// Where IK `id`'s object is, for messages.
    fn location(&self, id: &IkId) -> String;
}

/// Why an IK could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum IkError {
    #[error("intermediate key {ik}: its object {location} is missing; restore it from a backup of the backing directory (the files under this key cannot be read without it)")]
    Missing { ik: String, location: String },
    #[error("intermediate key {ik}: its object {location} is not valid ({source}); it was damaged or replaced, restore it from a backup")]
    Corrupt {
        ik: String,
        location: String,
        source: FormatError,
    },
    #[error("intermediate key {ik}: its object {location} is wrapped under {found}, not under the header's key {expected}; it was replaced, restore it from a backup")]
    ForeignKey {
        ik: String,
        location: String,
        found: String,
        expected: String,
    },
    #[error("intermediate key {ik}: {location} could not be read or written: {source}")]
    Io {
        ik: String,
        location: String,
        source: std::io::Error,
    },
    #[error("intermediate key {ik}: the KMS could not unwrap its object {location}: {source}")]
    Kms {
        ik: String,
        location: String,
        source: Box<KmsError>,
    },
    #[error("intermediate key {ik}: the DEK wrapped under it failed authentication ({source}): a tampered header, or one moved from another file")]
    Dek {
        ik: String,
        source: crypto::CryptoError,
    },
    #[error("key version {version:?} names no valid intermediate key: {source}")]
    BadReference {
        version: String,
        source: FormatError,
    },
    #[error("the KMS key version {version:?} is too long to record with an intermediate key (at most {} bytes); use per-file key mode for this key", MAX_KEY_VERSION - ik::SUFFIX_LEN)]
    VersionTooLong { version: String },
}

impl IkError {
    /// As a KMS error of provider `kms`: what callers of the trait see.
    /// Errors a retry can fix (the KMS unreachable) keep their kind, so the
    /// retry and metrics treat them as they do any KMS call.
    fn into_kms(self, kms: String) -> KmsError {
        match self {
            IkError::Kms { source, .. } if source.is_retryable() => *source,
            other => KmsError::UnwrapFailed {
                kms,
                detail: other.to_string(),
            },
        }
    }
}

/// When a policy in directory mode starts a new IK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rotation {
    pub max_files: u64,
    pub max_age: Duration,
}

impl Default for Rotation {
    fn default() -> Self {
        Self {
            max_files: DEFAULT_MAX_FILES,
            max_age: DEFAULT_ROTATE_AFTER,
        }
    }
}

/// An IK's plaintext, as the AEAD context it is used through (aws-lc
/// cleanses it when dropped), and the KMS key reference its object is
/// wrapped under. No Debug.
struct Ik {
    kek: LessSafeKey,
    base: KeyRef,
}

impl Ik {
    fn new(plain: &Dek, base: KeyRef) -> Self {
        Self {
            kek: crypto::key_wrapping_key(plain.as_bytes()),
            base,
        }
    }
}

/// The IK new DEKs are wrapped under.
struct Current {
    id: IkId,
    ik: Arc<Ik>,
    /// The IK as the KMS wrapped it (its object's content).
    wrapped: WrappedDek,
    /// Creation time from the ID, Unix seconds.
    created: u64,
    /// DEKs wrapped under it so far.
    files: u64,
    /// When the KMS last unwrapped (or made) it.
    checked: Instant,
}

/// A cached (or being unwrapped) IK.
struct Slot {
    cell: Arc<OnceCell<Arc<Ik>>>,
    since: Instant,
}

/// What a volume's wrappers share: the store, the audit log, and per KMS
/// key its IKs (the current one and the cached plaintexts). Keyed by key
/// spec, so that an IK unwrapped by one key is never served for another.
pub struct IntermediateKeyRegistry {
    volume_id: [u8; 16],
    store: Arc<dyn IntermediateKeyStore>,
    audit: Arc<OnceLock<Arc<AuditLog>>>,
    keys: Mutex<HashMap<KeySpec, Arc<KeyState>>>,
}

/// The IKs of one KMS key in one volume.
struct KeyState {
    volume_id: [u8; 16],
    store: Arc<dyn IntermediateKeyStore>,
    audit: Arc<OnceLock<Arc<AuditLog>>>,
    /// Held while a new IK is made, so that concurrent first creates make
    /// one IK, not many.
    current: tokio::sync::Mutex<Option<Current>>,
    cache: Mutex<HashMap<IkId, Slot>>,
}

impl IntermediateKeyRegistry {
    pub fn new(volume_id: [u8; 16], store: Arc<dyn IntermediateKeyStore>) -> Self {
        Self {
            volume_id,
            store,
            audit: Arc::new(OnceLock::new()),
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// Logs IK generations and KMS unwraps to `audit` from now on (the
    /// first one set stays).
    pub fn set_audit_log(&self, audit: Arc<AuditLog>) {
        let _ = self.audit.set(audit);
    }

    /// The provider a policy holds for key `spec` (connected as `inner`):
    /// in directory mode (`rotation` set) new file DEKs are wrapped under
    /// an IK; either way DEKs under an IK of this key unwrap.
    pub fn provider(
        &self, spec: &KeySpec, inner: Arc<dyn KeyProvider>, rotation: Option<Rotation>,
    ) -> Arc<dyn KeyProvider> {
        Arc::new(IntermediateKeys {
            inner,
            state: self.state(spec),
            rotation,
        })
    }

    /// The IK state of key `spec`, made on first use.
    fn state(&self, spec: &KeySpec) -> Arc<KeyState> {
        self.keys
            .lock()
            .unwrap()
            .entry(spec.clone())
            .or_insert_with(|| {
                Arc::new(KeyState {
                    volume_id: self.volume_id,
                    store: self.store.clone(),
                    audit: self.audit.clone(),
                    current: tokio::sync::Mutex::new(None),
                    cache: Mutex::new(HashMap::new()),
                })
            })
            .clone()
    }
}

/// See the module documentation.
pub struct IntermediateKeys {
    inner: Arc<dyn KeyProvider>,
    state: Arc<KeyState>,
    /// Directory mode when set; per-file wraps (through `inner`) when not.
    rotation: Option<Rotation>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The AAD of a DEK wrapped under IK `id` with wrap context `ctx`.
fn dek_aad(id: &IkId, ctx: &WrapContext) -> Vec<u8> {
    let mut aad = AAD_LABEL.to_vec();
    aad.extend_from_slice(id);
    aad.extend_from_slice(&ctx.canonical_bytes());
    aad
}

/// `key_ref` at KMS key version `version`.
fn at_version(key_ref: &KeyRef, version: &str) -> KeyRef {
    KeyRef {
        key_version: version.to_owned(),
        ..key_ref.clone()
    }
}

/// The IK a reference names, with the reference of the IK's own wrap;
/// None for a reference without an IK.
fn ik_of(key_ref: &KeyRef) -> Result<Option<(IkId, KeyRef)>, IkError> {
    match ik::split_version(&key_ref.key_version) {
        Ok((_, None)) => Ok(None),
        Ok((base, Some(id))) => Ok(Some((id, at_version(key_ref, base)))),
        Err(source) => Err(IkError::BadReference {
            version: key_ref.key_version.clone(),
            source,
        }),
    }
}

/// Whether a wrap with context `ctx` goes under an IK in directory mode:
/// format 2 file DEKs only (a volume key, or a format 1 header, which
/// older builds must read, is wrapped by the KMS).
fn uses_ik(ctx: &WrapContext) -> bool {
    matches!(ctx, WrapContext::File { .. })
}

impl IntermediateKeys {
    fn audit(&self, event: AuditEvent<'_>) {
        if let Some(log) = self.state.audit.get() {
            log.record(&event);
        }
    }

    /// The IK to wrap `n` more DEKs under, made first if there is none yet
    /// or the current one is due for rotation.
    async fn current(&self, rotation: Rotation, n: u64) -> Result<(IkId, Arc<Ik>), IkError> {
        let mut current = self.state.current.lock().await;
        // A batch larger than `max_files` gets an IK of its own.
        let due = current.as_ref().is_none_or(|c| {
            (c.files > 0 && c.files.saturating_add(n) > rotation.max_files)
                || now_secs().saturating_sub(c.created) >= rotation.max_age.as_secs()
        });
        // New files must stay readable after a restart: once per
        // CACHE_TTL the KMS confirms it still unwraps the current IK (a key
        // version destroyed or disabled since), else a new IK is made.
        let stale = current
            .as_ref()
            .is_some_and(|c| c.checked.elapsed() >= CACHE_TTL);
        let due = due || (stale && !self.still_unwraps(current.as_mut().expect("stale")).await);
        if due {
            *current = Some(self.generate().await?);
        }
        let c = current.as_mut().expect("set above");
        c.files += n;
        Ok((c.id, c.ik.clone()))
    }

    /// Whether the KMS still unwraps the current IK `c` (noted in `c`). A
    /// KMS that cannot be asked right now revoked nothing: the IK stays,
    /// and is checked again a CACHE_TTL later.
    async fn still_unwraps(&self, c: &mut Current) -> bool {
        let ctx = WrapContext::intermediate_key(self.state.volume_id, c.id);
        match self.inner.unwrap(&c.wrapped, &ctx).await {
            Ok(_) => {
                c.checked = Instant::now();
                true
            }
            Err(e) if e.is_retryable() => {
                tracing::warn!(
                    "intermediate key {} could not be checked ({e}); still in use",
                    hex::encode(c.id)
                );
                c.checked = Instant::now();
                true
            }
            Err(e) => {
                tracing::warn!(
                    "intermediate key {} no longer unwraps ({e}); new files go under a new one",
                    hex::encode(c.id)
                );
                false
            }
        }
    }

    /// A new IK: generated and wrapped by the KMS, its object written
    /// durably, its plaintext cached. Audited either way.
    async fn generate(&self) -> Result<Current, IkError> {
        let created = now_secs();
        let mut id = [0u8; ID_LEN];
        id[..8].copy_from_slice(&created.to_be_bytes());
        rand::rngs::OsRng.fill_bytes(&mut id[8..]);
        let hex_id = hex::encode(id);
        let label = format!("(intermediate key {hex_id})");
        let location = self.state.store.location(&id);
        let ctx = WrapContext::intermediate_key(self.state.volume_id, id);
        let made = async {
            let (plain, wrapped) =
                self.inner
                    .generate_dek(&ctx)
                    .await
                    .map_err(|source| IkError::Kms {
                        ik: hex_id.clone(),
                        location: location.clone(),
                        source: Box::new(source),
                    })?;
            let version = &wrapped.key_ref.key_version;
            if version.len() + ik::SUFFIX_LEN > MAX_KEY_VERSION {
                return Err(IkError::VersionTooLong {
                    version: version.clone(),
                });
            }
            let bytes = ik::encode_object(&id, &wrapped).map_err(|source| IkError::Corrupt {
                ik: hex_id.clone(),
                location: location.clone(),
                source,
            })?;
            self.state
                .store
                .save(&id, &bytes)
                .map_err(|source| IkError::Io {
                    ik: hex_id.clone(),
                    location: location.clone(),
                    source,
                })?;
            Ok((Arc::new(Ik::new(&plain, wrapped.key_ref.clone())), wrapped))
        }
        .await;
        match made {
            Ok((ik, wrapped)) => {
                self.audit(
                    AuditEvent::new(AuditOp::Wrap, AuditOutcome::Ok)
                        .key(&wrapped.key_ref)
                        .path(&label)
                        .detail("intermediate key generated"),
                );
                self.state.cache_ready(id, ik.clone());
                Ok(Current {
                    id,
                    ik,
                    wrapped,
                    created,
                    files: 0,
                    checked: Instant::now(),
                })
            }
            Err(e) => {
                let why = e.to_string();
                self.audit(
                    AuditEvent::new(AuditOp::Wrap, AuditOutcome::Failed(&why))
                        .path(&label)
                        .detail("intermediate key generation"),
                );
                Err(e)
            }
        }
    }

    /// The plaintext of IK `id`, whose own wrap a header says is `base`:
    /// cached, or its object loaded and unwrapped by the KMS (once for all
    /// concurrent callers; a failure is not cached).
    async fn ik(&self, id: &IkId, base: &KeyRef) -> Result<Arc<Ik>, IkError> {
        let cell = self.state.slot(id);
        let ik = cell.get_or_try_init(|| self.load(id)).await?.clone();
        if ik.base != *base {
            // A header naming this IK under another key version than its
            // object: not the header kmsfs wrote.
            return Err(IkError::ForeignKey {
                ik: hex::encode(id),
                location: self.state.store.location(id),
                found: key_name(&ik.base),
                expected: key_name(base),
            });
        }
        Ok(ik)
    }

    /// IK `id`'s object, read and unwrapped by this key's KMS (audited).
    async fn load(&self, id: &IkId) -> Result<Arc<Ik>, IkError> {
        let hex_id = hex::encode(id);
        let location = self.state.store.location(id);
        let bytes = self
            .state
            .store
            .load(id)
            .map_err(|source| IkError::Io {
                ik: hex_id.clone(),
                location: location.clone(),
                source,
            })?
            .ok_or_else(|| IkError::Missing {
                ik: hex_id.clone(),
                location: location.clone(),
            })?;
        let wrapped = ik::parse_object(&bytes, id).map_err(|source| IkError::Corrupt {
            ik: hex_id.clone(),
            location: location.clone(),
            source,
        })?;
        // The backing directory cannot steer the unwrap to another key:
        // only this policy key's own KMS is asked.
        if !self.inner.handles(&wrapped.key_ref) {
            return Err(IkError::ForeignKey {
                ik: hex_id,
                location,
                found: key_name(&wrapped.key_ref),
                expected: self.inner.describe(),
            });
        }
        let ctx = WrapContext::intermediate_key(self.state.volume_id, *id);
        let label = format!("(intermediate key {hex_id})");
        let plain = self.inner.unwrap(&wrapped, &ctx).await;
        let failed = plain.as_ref().err().map(|e| e.to_string());
        let outcome = match &failed {
            Some(e) => AuditOutcome::Failed(e),
            None => AuditOutcome::Ok,
        };
        self.audit(
            AuditEvent::new(AuditOp::Unwrap, outcome)
                .key(&wrapped.key_ref)
                .path(&label),
        );
        let plain = plain.map_err(|source| IkError::Kms {
            ik: hex_id,
            location,
            source: Box::new(source),
        })?;
        Ok(Arc::new(Ik::new(&plain, wrapped.key_ref)))
    }

    /// `dek` wrapped under the current IK (directory mode).
    async fn wrap_under_ik(
        &self, rotation: Rotation, dek: &Dek, ctx: &WrapContext,
    ) -> Result<WrappedDek, IkError> {
        let (id, ik) = self.current(rotation, 1).await?;
        Ok(seal(&id, &ik, dek, ctx))
    }

    /// Opens a DEK `wrapped` under IK `id` (whose own wrap is `base`).
    async fn unwrap_under_ik(
        &self, id: &IkId, base: &KeyRef, wrapped: &WrappedDek, ctx: &WrapContext,
    ) -> Result<Dek, IkError> {
        let ik = self.ik(id, base).await?;
        open(id, &ik, wrapped, ctx)
    }
}

fn key_name(k: &KeyRef) -> String {
    format!("{}/{}@{}", k.provider, k.key_id, k.key_version)
}

/// `dek` sealed under IK `id`, recorded under the IK's KMS key.
fn seal(id: &IkId, ik: &Ik, dek: &Dek, ctx: &WrapContext) -> WrappedDek {
    WrappedDek {
        key_ref: at_version(&ik.base, &ik::ik_version(&ik.base.key_version, id)),
        blob: crypto::wrap_key(&ik.kek, dek, &dek_aad(id, ctx)),
    }
}

fn open(id: &IkId, ik: &Ik, wrapped: &WrappedDek, ctx: &WrapContext) -> Result<Dek, IkError> {
    crypto::unwrap_key(&ik.kek, &wrapped.blob, &dek_aad(id, ctx)).map_err(|source| IkError::Dek {
        ik: hex::encode(id),
        source,
    })
}

impl KeyState {
    /// The cache slot of IK `id`: the cached one unless it expired, else a
    /// new empty one (the cache bounded: expired slots go first, then the
    /// oldest).
    fn slot(&self, id: &IkId) -> Arc<OnceCell<Arc<Ik>>> {
        let mut cache = self.cache.lock().unwrap();
        if let Some(s) = cache.get(id) {
            if s.since.elapsed() < CACHE_TTL || !s.cell.initialized() {
                return s.cell.clone();
            }
        }
        let cell = Arc::new(OnceCell::new());
        Self::insert(&mut cache, *id, cell.clone());
        cell
    }

    /// Caches IK `id` as known (a new IK: its plaintext is at hand).
    fn cache_ready(&self, id: IkId, ik: Arc<Ik>) {
        let cell = Arc::new(OnceCell::new_with(Some(ik)));
        Self::insert(&mut self.cache.lock().unwrap(), id, cell);
    }

    fn insert(cache: &mut HashMap<IkId, Slot>, id: IkId, cell: Arc<OnceCell<Arc<Ik>>>) {
        if cache.len() >= CACHE_CAPACITY && !cache.contains_key(&id) {
            cache.retain(|_, s| s.since.elapsed() < CACHE_TTL);
            if cache.len() >= CACHE_CAPACITY {
                let oldest = cache
                    .iter()
                    .min_by_key(|(_, s)| s.since)
                    .map(|(k, _)| *k)
                    .expect("the cache is full");
                cache.remove(&oldest);
            }
        }
        cache.insert(
            id,
            Slot {
                cell,
                since: Instant::now(),
            },
        );
    }
}

#[async_trait]
impl KeyProvider for IntermediateKeys {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn wraps_locally(&self) -> bool {
        self.rotation.is_some() || self.inner.wraps_locally()
    }

    fn handles(&self, key_ref: &KeyRef) -> bool {
        match ik_of(key_ref) {
            Ok(Some((_, base))) => self.inner.handles(&base),
            Ok(None) => self.inner.handles(key_ref),
            Err(_) => false,
        }
    }

    fn is_current_key(&self, key_ref: &KeyRef) -> bool {
        match ik_of(key_ref) {
            Ok(Some((_, base))) => self.inner.is_current_key(&base),
            Ok(None) => self.inner.is_current_key(key_ref),
            Err(_) => false,
        }
    }

    async fn generate_dek(&self, ctx: &WrapContext) -> Result<(Dek, WrappedDek), KmsError> {
        match self.rotation {
            Some(_) if uses_ik(ctx) => {
                let dek = Dek::generate();
                let wrapped = self.wrap(&dek, ctx).await?;
                Ok((dek, wrapped))
            }
            _ => self.inner.generate_dek(ctx).await,
        }
    }

    async fn wrap(&self, dek: &Dek, ctx: &WrapContext) -> Result<WrappedDek, KmsError> {
        match self.rotation {
            Some(rotation) if uses_ik(ctx) => self
                .wrap_under_ik(rotation, dek, ctx)
                .await
                .map_err(|e| e.into_kms(self.describe())),
            _ => self.inner.wrap(dek, ctx).await,
        }
    }

    async fn wrap_many(&self, items: &[(&Dek, WrapContext)]) -> Vec<Result<WrappedDek, KmsError>> {
        let Some(rotation) = self.rotation else {
            return self.inner.wrap_many(items).await;
        };
        if !items.iter().all(|(_, ctx)| uses_ik(ctx)) {
            let mut out = Vec::with_capacity(items.len());
            for (dek, ctx) in items {
                out.push(self.wrap(dek, ctx).await);
            }
            return out;
        }
        // One IK for the whole batch.
        match self.current(rotation, items.len() as u64).await {
            Ok((id, ik)) => items
                .iter()
                .map(|(dek, ctx)| Ok(seal(&id, &ik, dek, ctx)))
                .collect(),
            Err(e) => {
                let e = e.into_kms(self.describe());
                items.iter().map(|_| Err(e.clone())).collect()
            }
        }
    }

    async fn unwrap(&self, wrapped: &WrappedDek, ctx: &WrapContext) -> Result<Dek, KmsError> {
        match ik_of(&wrapped.key_ref) {
            Ok(None) => self.inner.unwrap(wrapped, ctx).await,
            Ok(Some((id, base))) => self
                .unwrap_under_ik(&id, &base, wrapped, ctx)
                .await
                .map_err(|e| e.into_kms(self.describe())),
            Err(e) => Err(e.into_kms(self.describe())),
        }
    }

    /// DEKs under IKs are grouped by IK, so the KMS sees at most one unwrap
    /// per IK; the others go to the KMS in one batch.
    async fn unwrap_many(&self, items: &[(WrappedDek, WrapContext)]) -> Vec<Result<Dek, KmsError>> {
        use futures_util::stream::{self, StreamExt};
        let mut out: Vec<Option<Result<Dek, KmsError>>> = items.iter().map(|_| None).collect();
        let mut direct: Vec<usize> = Vec::new();
        let mut groups: Vec<(IkId, KeyRef, Vec<usize>)> = Vec::new();
        for (i, (w, _)) in items.iter().enumerate() {
            match ik_of(&w.key_ref) {
                Ok(None) => direct.push(i),
                Ok(Some((id, base))) => {
                    match groups.iter_mut().find(|(g, b, _)| *g == id && *b == base) {
                        Some((_, _, idx)) => idx.push(i),
                        None => groups.push((id, base, vec![i])),
                    }
                }
                Err(e) => out[i] = Some(Err(e.into_kms(self.describe()))),
            }
        }
        if !direct.is_empty() {
            let batch: Vec<_> = direct.iter().map(|&i| items[i].clone()).collect();
            for (&i, dek) in direct.iter().zip(self.inner.unwrap_many(&batch).await) {
                out[i] = Some(dek);
            }
        }
        let calls: Vec<_> = groups
            .iter()
            .map(|(id, base, _)| self.ik(id, base))
            .collect();
        let iks: Vec<_> = stream::iter(calls)
            .buffered(super::PARALLEL_CALLS)
            .collect()
            .await;
        for ((id, _, idx), ik) in groups.iter().zip(iks) {
            let ik = ik.map_err(|e| e.into_kms(self.describe()));
            for &i in idx {
                let (w, ctx) = &items[i];
                out[i] = Some(match &ik {
                    Ok(ik) => open(id, ik, w, ctx).map_err(|e| e.into_kms(self.describe())),
                    Err(e) => Err(e.clone()),
                });
            }
        }
        out.into_iter()
            .map(|r| r.expect("every item answered"))
            .collect()
    }

    async fn key_versions(&self) -> Result<KeyVersions, KmsError> {
        self.inner.key_versions().await
    }

    async fn rotate(&self) -> Result<KeyVersions, KmsError> {
        self.inner.rotate().await
    }

    async fn check(&self) -> Result<(), KmsError> {
        self.inner.check().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kms::testing::FakeKms;

    /// IK objects in memory.
    #[derive(Default)]
    struct MemoryStore(Mutex<HashMap<IkId, Vec<u8>>>);

    impl IntermediateKeyStore for MemoryStore {
        fn load(&self, id: &IkId) -> std::io::Result<Option<Vec<u8>>> {
            Ok(self.0.lock().unwrap().get(id).cloned())
        }
        fn save(&self, id: &IkId, bytes: &[u8]) -> std::io::Result<()> {
            self.0.lock().unwrap().insert(*id, bytes.to_vec());
            Ok(())
        }
        fn location(&self, id: &IkId) -> String {
            format!("memory/{}", hex::encode(id))
        }
    }

    impl MemoryStore {
        fn ids(&self) -> Vec<IkId> {
            self.0.lock().unwrap().keys().copied().collect()
        }
    }

    const VOLUME: [u8; 16] = [5; 16];

    fn spec() -> KeySpec {
        KeySpec {
            provider: "fake".into(),
            id: "k".into(),
            version: None,
        }
    }

    /// A provider over `kms` and `store` as a fresh process would have it.
    fn provider(
        kms: &Arc<FakeKms>, store: &Arc<MemoryStore>, rotation: Option<Rotation>,
    ) -> Arc<dyn KeyProvider> {
        IntermediateKeyRegistry::new(VOLUME, store.clone()).provider(&spec(), kms.clone(), rotation)
    }

    fn ctx(i: u32) -> WrapContext {
        let mut file_id = [0u8; 16];
        file_id[..4].copy_from_slice(&i.to_be_bytes());
        WrapContext::file(file_id, VOLUME)
    }

    fn directory() -> Option<Rotation> {
        Some(Rotation::default())
    }

    #[tokio::test]
    async fn round_trip_names_the_ik_in_the_key_version() {
        let kms = Arc::new(FakeKms::new("k"));
        let store = Arc::new(MemoryStore::default());
        let p = provider(&kms, &store, directory());
        let (dek, wrapped) = p.generate_dek(&ctx(1)).await.unwrap();
        let (base, id) = ik::split_version(&wrapped.key_ref.key_version).unwrap();
        assert_eq!(base, "1");
        assert_eq!(store.ids(), vec![id.unwrap()]);
        assert_eq!(wrapped.blob.len(), crypto::WRAPPED_KEY_LEN);
        assert!(p.handles(&wrapped.key_ref));
        let back = p.unwrap(&wrapped, &ctx(1)).await.unwrap();
        assert_eq!(back.as_bytes(), dek.as_bytes());
        // Bound to the file's context.
        assert!(p.unwrap(&wrapped, &ctx(2)).await.is_err());
        // The volume key is never under an IK.
        let vk = p
            .wrap(&dek, &WrapContext::volume_key(VOLUME))
            .await
            .unwrap();
        assert_eq!(ik::split_version(&vk.key_ref.key_version).unwrap().1, None);
    }

    #[tokio::test]
    async fn creates_and_cold_reads_make_one_kms_call_per_ik() {
        let kms = Arc::new(FakeKms::new("k"));
        let store = Arc::new(MemoryStore::default());
        let p = provider(&kms, &store, directory());
        let mut files = Vec::new();
        for i in 0..1000 {
            files.push(p.generate_dek(&ctx(i)).await.unwrap());
        }
        assert_eq!(kms.requests(), 1, "one KMS call for 1000 creates");
        // A fresh process: nothing cached.
        let cold = provider(&kms, &store, None);
        for (i, (dek, wrapped)) in files.iter().enumerate() {
            let back = cold.unwrap(wrapped, &ctx(i as u32)).await.unwrap();
            assert_eq!(back.as_bytes(), dek.as_bytes());
        }
        assert_eq!(kms.unwraps(), 1, "one KMS unwrap for 1000 cold reads");
        let batch = provider(&kms, &store, None);
        let items: Vec<_> = files
            .iter()
            .enumerate()
            .map(|(i, (_, w))| (w.clone(), ctx(i as u32)))
            .collect();
        let deks = batch.unwrap_many(&items).await;
        assert!(deks.iter().all(Result::is_ok));
        assert_eq!(kms.unwraps(), 2, "one more for a batch in another process");
    }

    #[tokio::test]
    async fn per_file_mode_uses_the_kms_and_still_reads_iks() {
        let kms = Arc::new(FakeKms::new("k"));
        let store = Arc::new(MemoryStore::default());
        let dir = provider(&kms, &store, directory());
        let (_, under_ik) = dir.generate_dek(&ctx(1)).await.unwrap();
        let per_file = provider(&kms, &store, None);
        let (_, plain) = per_file.generate_dek(&ctx(2)).await.unwrap();
        assert_eq!(plain.key_ref, kms.key_ref());
        assert_eq!(kms.wraps(), 2);
        assert!(per_file.unwrap(&under_ik, &ctx(1)).await.is_ok());
        assert!(dir.unwrap(&plain, &ctx(2)).await.is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_first_creates_make_one_ik() {
        let kms = Arc::new(FakeKms::new("k").with_delay(Duration::from_millis(50)));
        let store = Arc::new(MemoryStore::default());
        let p = provider(&kms, &store, directory());
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let p = p.clone();
                tokio::spawn(async move { p.generate_dek(&ctx(i)).await.map(|_| ()) })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(kms.wraps(), 1);
        assert_eq!(store.ids().len(), 1);
        // And concurrent cold reads of it make one unwrap.
        let (_, w) = p.generate_dek(&ctx(99)).await.unwrap();
        let cold = provider(&kms, &store, None);
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (cold, w) = (cold.clone(), w.clone());
                tokio::spawn(async move { cold.unwrap(&w, &ctx(99)).await.map(|_| ()) })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(kms.unwraps(), 1);
    }

    #[tokio::test]
    async fn rotation_by_count_and_by_wrap_many() {
        let kms = Arc::new(FakeKms::new("k"));
        let store = Arc::new(MemoryStore::default());
        let rotation = Rotation {
            max_files: 10,
            max_age: DEFAULT_ROTATE_AFTER,
        };
        let p = provider(&kms, &store, Some(rotation));
        for i in 0..25 {
            p.generate_dek(&ctx(i)).await.unwrap();
        }
        assert_eq!(store.ids().len(), 3);
        assert_eq!(kms.wraps(), 3);
        // A KMS key rotation reaches new files with the next IK.
        kms.rotate().await.unwrap();
        let deks: Vec<Dek> = (0..10).map(|_| Dek::generate()).collect();
        let items: Vec<_> = deks.iter().zip(0..).map(|(d, i)| (d, ctx(i))).collect();
        let wrapped = p.wrap_many(&items).await;
        assert_eq!(kms.wraps(), 4, "a full IK, then one new for the batch");
        for w in wrapped {
            assert_eq!(ik::base_version(&w.unwrap().key_ref.key_version), "2");
        }
    }

    /// A KMS key version destroyed under a mount's current IK: within
    /// CACHE_TTL new files go under a new IK, so they stay readable.
    #[tokio::test]
    async fn a_current_ik_the_kms_no_longer_unwraps_is_replaced() {
        let kms = Arc::new(FakeKms::new("k"));
        let store = Arc::new(MemoryStore::default());
        let registry = IntermediateKeyRegistry::new(VOLUME, store.clone());
        let p = IntermediateKeys {
            inner: kms.clone(),
            state: registry.state(&spec()),
            rotation: directory(),
        };
        p.generate_dek(&ctx(1)).await.unwrap();
        kms.rotate().await.unwrap();
        assert!(kms.destroy_version(1));
        let (_, w) = p.generate_dek(&ctx(2)).await.unwrap();
        assert_eq!(
            ik::base_version(&w.key_ref.key_version),
            "1",
            "not checked yet"
        );
        let Some(past) = Instant::now().checked_sub(CACHE_TTL) else {
            return; // the host booted less than CACHE_TTL ago
        };
        p.state.current.lock().await.as_mut().unwrap().checked = past;
        let (dek, w) = p.generate_dek(&ctx(3)).await.unwrap();
        assert_eq!(ik::base_version(&w.key_ref.key_version), "2");
        assert_eq!(store.ids().len(), 2);
        let cold = provider(&kms, &store, None);
        assert_eq!(
            cold.unwrap(&w, &ctx(3)).await.ok().unwrap().as_bytes(),
            dek.as_bytes()
        );
    }

    #[tokio::test]
    async fn tampering_fails_and_never_gives_wrong_bytes() {
        let kms = Arc::new(FakeKms::new("k"));
        let store = Arc::new(MemoryStore::default());
        let p = provider(&kms, &store, directory());
        let (_, a) = p.generate_dek(&ctx(1)).await.unwrap();
        let id_a = ik::split_version(&a.key_ref.key_version)
            .unwrap()
            .1
            .unwrap();
        // Another IK (another process), whose DEK the test moves around.
        let q = provider(&kms, &store, directory());
        let (_, b) = q.generate_dek(&ctx(1)).await.unwrap();
        let id_b = ik::split_version(&b.key_ref.key_version)
            .unwrap()
            .1
            .unwrap();
        let fresh = || provider(&kms, &store, None);

        // Ciphertext tampered.
        let mut t = a.clone();
        t.blob[20] ^= 1;
        assert!(fresh().unwrap(&t, &ctx(1)).await.is_err());
        // The reference names another IK than the DEK was wrapped under.
        let mut t = a.clone();
        t.key_ref.key_version = ik::ik_version("1", &id_b);
        assert!(fresh().unwrap(&t, &ctx(1)).await.is_err());
        // An ID that is not 32 lowercase hex digits.
        let mut t = a.clone();
        t.key_ref.key_version = "1+ik.../../x".into();
        assert!(!fresh().handles(&t.key_ref));
        assert!(fresh().unwrap(&t, &ctx(1)).await.is_err());
        // A different base version than the IK object's.
        let mut t = a.clone();
        t.key_ref.key_version = ik::ik_version("2", &id_a);
        assert!(fresh().unwrap(&t, &ctx(1)).await.is_err());

        let object_a = store.load(&id_a).unwrap().unwrap();
        let object_b = store.load(&id_b).unwrap().unwrap();
        // IK B's wrap planted as IK A's object: the KMS context (IK ID)
        // does not match, so it does not unwrap.
        let wrapped_b = ik::parse_object(&object_b, &id_b).unwrap();
        store
            .save(&id_a, &ik::encode_object(&id_a, &wrapped_b).unwrap())
            .unwrap();
        let e = fresh().unwrap(&a, &ctx(1)).await.err().expect("refused");
        assert!(e.to_string().contains(&hex::encode(id_a)), "{e}");
        // The object's bytes tampered.
        let mut bad = object_a.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        store.save(&id_a, &bad).unwrap();
        assert!(fresh().unwrap(&a, &ctx(1)).await.is_err());
        // Wrapped under another key of the same KMS kind: refused without
        // asking that key.
        let other = Arc::new(FakeKms::new("other"));
        let (_, foreign) = other
            .generate_dek(&WrapContext::intermediate_key(VOLUME, id_a))
            .await
            .unwrap();
        store
            .save(&id_a, &ik::encode_object(&id_a, &foreign).unwrap())
            .unwrap();
        let e = fresh().unwrap(&a, &ctx(1)).await.err().expect("refused");
        assert!(e.to_string().contains("not under the header's key"), "{e}");
        // Missing.
        store.0.lock().unwrap().remove(&id_a);
        let e = fresh().unwrap(&a, &ctx(1)).await.err().expect("refused");
        assert!(e.to_string().contains("missing"), "{e}");
        // The genuine object again: it opens.
        store.save(&id_a, &object_a).unwrap();
        assert!(fresh().unwrap(&a, &ctx(1)).await.is_ok());
        // Another volume's provider over the same objects does not.
        let elsewhere = IntermediateKeyRegistry::new([6; 16], store.clone()).provider(
            &spec(),
            kms.clone(),
            None,
        );
        assert!(elsewhere.unwrap(&a, &ctx(1)).await.is_err());
    }

    #[tokio::test]
    async fn failures_are_not_cached() {
        let kms = Arc::new(FakeKms::new("k"));
        let store = Arc::new(MemoryStore::default());
        let (_, w) = provider(&kms, &store, directory())
            .generate_dek(&ctx(1))
            .await
            .unwrap();
        let cold = provider(&kms, &store, None);
        kms.fail_next(
            1,
            KmsError::Unreachable {
                kms: "fake".into(),
                detail: "down".into(),
            },
        );
        let e = cold.unwrap(&w, &ctx(1)).await.err().expect("refused");
        assert!(e.is_retryable(), "keeps its kind: {e}");
        assert!(cold.unwrap(&w, &ctx(1)).await.is_ok());
    }
}
