//! An in-memory KMS for tests (feature `test-support`): a versioned key of
//! random KEKs that wrap DEKs with AES-256-GCM bound to the wrap context,
//! counters of the calls it answered, and faults on demand (latency,
//! failures, a stall, disabled or destroyed versions). Every test that
//! needs a provider without a server uses this one.
//!
//! The key starts at version 1. [`KeyProvider::rotate`] adds a version that
//! new wraps use (and record in `KeyRef::key_version`); older versions keep
//! unwrapping until a test disables or destroys them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use rand::RngCore;
use zeroize::Zeroizing;

use super::{KeyProvider, KeyRef, KeyVersion, KeyVersions, KmsError, WrapContext, WrappedDek};
use crate::crypto::{Dek, DEK_LEN};

/// Provider kind written in the key references of fake wraps.
pub const FAKE_PROVIDER: &str = "fake";

/// One version of the fake key.
struct FakeVersion {
    /// `None` once destroyed.
    kek: Option<LessSafeKey>,
    enabled: bool,
    created: i64,
}

/// The fake key's versions and the one new wraps use.
struct Versions {
    current: u32,
    all: BTreeMap<u32, FakeVersion>,
}

/// See the module documentation.
pub struct FakeKms {
    key_id: String,
    versions: RwLock<Versions>,
    delay: Duration,
    wraps: AtomicU64,
    unwraps: AtomicU64,
    batches: AtomicU64,
    wrap_batches: AtomicU64,
    requests: AtomicU64,
    rotations: AtomicU64,
    /// The next `failures` calls fail with `failure`.
    failures: AtomicU32,
    failure: Mutex<Option<KmsError>>,
    stalled: AtomicBool,
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn random_version() -> FakeVersion {
    let mut raw = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(&mut raw[..]);
    FakeVersion {
        kek: Some(LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &raw[..]).expect("32-byte key"),
        )),
        enabled: true,
        created: now_secs(),
    }
}

impl FakeKms {
    /// A fake key `key_id` at version 1, with a fresh random KEK.
    pub fn new(key_id: &str) -> Self {
        Self {
            key_id: key_id.to_owned(),
            versions: RwLock::new(Versions {
                current: 1,
                all: BTreeMap::from([(1, random_version())]),
            }),
            delay: Duration::ZERO,
            wraps: AtomicU64::new(0),
            unwraps: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            wrap_batches: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            rotations: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            failure: Mutex::new(None),
            stalled: AtomicBool::new(false),
        }
    }

    /// Every call first waits `delay` (to expose duplicate calls).
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// The next `n` calls fail with `error` (each item of a batch counts as
    /// a call).
    pub fn fail_next(&self, n: u32, error: KmsError) {
        *self.failure.lock().unwrap() = Some(error);
        self.failures.store(n, Ordering::SeqCst);
    }

    /// While set, calls never answer.
    pub fn set_stalled(&self, stalled: bool) {
        self.stalled.store(stalled, Ordering::SeqCst);
    }

    /// Wrap calls answered (generate and each item of a batch included).
    pub fn wraps(&self) -> u64 {
        self.wraps.load(Ordering::SeqCst)
    }

    /// Unwrap calls answered (each item of a batch counts).
    pub fn unwraps(&self) -> u64 {
        self.unwraps.load(Ordering::SeqCst)
    }

    /// Batch unwrap requests answered.
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::SeqCst)
    }

    /// Batch wrap requests (`wrap_many`) answered.
    pub fn wrap_batches(&self) -> u64 {
        self.wrap_batches.load(Ordering::SeqCst)
    }

    /// Wrap and unwrap requests as a remote KMS would see them: each single
    /// wrap, unwrap or generate is one, each batch is one whatever its size.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Rotations made through [`KeyProvider::rotate`].
    pub fn rotations(&self) -> u64 {
        self.rotations.load(Ordering::SeqCst)
    }

    /// The version new wraps use.
    pub fn current_version(&self) -> u32 {
        self.versions.read().unwrap().current
    }

    /// A key reference of this key's current version (for building headers
    /// in tests).
    pub fn key_ref(&self) -> KeyRef {
        self.key_ref_at(self.current_version())
    }

    /// A key reference of version `version` of this key.
    pub fn key_ref_at(&self, version: u32) -> KeyRef {
        KeyRef {
            provider: FAKE_PROVIDER.into(),
            key_id: self.key_id.clone(),
            key_version: version.to_string(),
        }
    }

    /// Destroys version `version`: its KEK is dropped, what it wrapped no
    /// longer unwraps, and if it is the current version nothing wraps until
    /// a rotation. Returns whether there was such a version to destroy.
    pub fn destroy_version(&self, version: u32) -> bool {
        let mut v = self.versions.write().unwrap();
        match v.all.get_mut(&version) {
            Some(fv) if fv.kek.is_some() => {
                fv.kek = None;
                true
            }
            _ => false,
        }
    }

    /// Disables (or enables again) version `version`, as KMSs that can
    /// disable a version do: while disabled it neither wraps nor unwraps.
    /// Returns whether there is such a version.
    pub fn set_version_enabled(&self, version: u32, enabled: bool) -> bool {
        let mut v = self.versions.write().unwrap();
        match v.all.get_mut(&version) {
            Some(fv) => {
                fv.enabled = enabled;
                true
            }
            None => false,
        }
    }

    /// Sets when version `version` was created, in seconds since the Unix
    /// epoch (for tests of rotation schedules). Returns whether there is
    /// such a version.
    pub fn set_version_created(&self, version: u32, created: i64) -> bool {
        let mut v = self.versions.write().unwrap();
        match v.all.get_mut(&version) {
            Some(fv) => {
                fv.created = created;
                true
            }
            None => false,
        }
    }

    /// Latency, stall and injected failures, in that order.
    async fn enter(&self) -> Result<(), KmsError> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if self.stalled.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let failing = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        match self.failure.lock().unwrap().clone() {
            Some(e) if failing => Err(e),
            _ => Ok(()),
        }
    }

    fn name(&self) -> String {
        format!("fake KMS key {}", self.key_id)
    }

    fn unusable(&self, version: u32, detail: &str) -> KmsError {
        KmsError::KeyVersionUnusable {
            kms: self.name(),
            key: self.key_id.clone(),
            version: version.to_string(),
            detail: detail.into(),
        }
    }

    /// The KEK of `version` if it may be used, else why not.
    fn with_kek<T>(
        &self, version: u32, use_it: impl FnOnce(&LessSafeKey) -> Result<T, KmsError>,
    ) -> Result<T, KmsError> {
        let v = self.versions.read().unwrap();
        let Some(fv) = v.all.get(&version) else {
            return Err(self.unusable(version, "the key has no such version"));
        };
        let Some(kek) = &fv.kek else {
            return Err(self.unusable(version, "the version was destroyed"));
        };
        if !fv.enabled {
            return Err(self.unusable(version, "the version is disabled"));
        }
        use_it(kek)
    }

    /// One wrap, not counted as a request.
    async fn wrap_item(&self, dek: &Dek, ctx: &WrapContext) -> Result<WrappedDek, KmsError> {
        self.enter().await?;
        self.wraps.fetch_add(1, Ordering::SeqCst);
        let version = self.current_version();
        let blob = self.with_kek(version, |kek| {
            let mut nonce = [0u8; 12];
            rand::rngs::OsRng.fill_bytes(&mut nonce);
            let mut blob = nonce.to_vec();
            blob.extend_from_slice(dek.as_bytes());
            let tag = kek
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(ctx.canonical_bytes()),
                    &mut blob[12..],
                )
                .expect("a DEK fits the AEAD limits");
            blob.extend_from_slice(tag.as_ref());
            Ok(blob)
        })?;
        Ok(WrappedDek {
            key_ref: self.key_ref_at(version),
            blob,
        })
    }

    /// One unwrap, not counted as a request.
    async fn unwrap_item(&self, wrapped: &WrappedDek, ctx: &WrapContext) -> Result<Dek, KmsError> {
        self.enter().await?;
        self.unwraps.fetch_add(1, Ordering::SeqCst);
        let failed = |detail: &str| KmsError::UnwrapFailed {
            kms: self.name(),
            detail: detail.into(),
        };
        if !self.handles(&wrapped.key_ref) {
            return Err(failed("the DEK was wrapped by another key"));
        }
        let version: u32 = match wrapped.key_ref.key_version.as_str() {
            "" => 1,
            v => v
                .parse()
                .map_err(|_| failed("the key version is not a number"))?,
        };
        let blob = &wrapped.blob;
        if blob.len() != 12 + DEK_LEN + 16 {
            return Err(failed("wrong length"));
        }
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&blob[..12]);
        let mut body = Zeroizing::new([0u8; DEK_LEN]);
        self.with_kek(version, |kek| {
            kek.open_separate_gather(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(ctx.canonical_bytes()),
                &blob[12..12 + DEK_LEN],
                &blob[12 + DEK_LEN..],
                &mut body[..],
            )
            .map_err(|_| failed("authentication failed"))
        })?;
        Dek::from_slice(&body[..]).map_err(|e| failed(&e.to_string()))
    }

    fn versions_now(&self) -> KeyVersions {
        let v = self.versions.read().unwrap();
        KeyVersions {
            current: Some(v.current.to_string()),
            current_created: v.all.get(&v.current).map(|fv| fv.created),
            versions: v
                .all
                .iter()
                .map(|(n, fv)| KeyVersion {
                    version: n.to_string(),
                    created: Some(fv.created),
                    can_unwrap: fv.kek.is_some() && fv.enabled,
                })
                .collect(),
        }
    }
}

#[async_trait]
impl KeyProvider for FakeKms {
    fn describe(&self) -> String {
        self.name()
    }

    fn kind(&self) -> &'static str {
        FAKE_PROVIDER
    }

    fn handles(&self, key_ref: &KeyRef) -> bool {
        key_ref.provider == FAKE_PROVIDER && key_ref.key_id == self.key_id
    }

    async fn wrap(&self, dek: &Dek, ctx: &WrapContext) -> Result<WrappedDek, KmsError> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.wrap_item(dek, ctx).await
    }

    async fn unwrap(&self, wrapped: &WrappedDek, ctx: &WrapContext) -> Result<Dek, KmsError> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.unwrap_item(wrapped, ctx).await
    }

    async fn wrap_many(&self, items: &[(&Dek, WrapContext)]) -> Vec<Result<WrappedDek, KmsError>> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.wrap_batches.fetch_add(1, Ordering::SeqCst);
        let mut out = Vec::with_capacity(items.len());
        for (dek, ctx) in items {
            out.push(self.wrap_item(dek, ctx).await);
        }
        out
    }

    async fn unwrap_many(&self, items: &[(WrappedDek, WrapContext)]) -> Vec<Result<Dek, KmsError>> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.batches.fetch_add(1, Ordering::SeqCst);
        let mut out = Vec::with_capacity(items.len());
        for (w, ctx) in items {
            out.push(self.unwrap_item(w, ctx).await);
        }
        out
    }

    async fn key_versions(&self) -> Result<KeyVersions, KmsError> {
        self.enter().await?;
        Ok(self.versions_now())
    }

    async fn rotate(&self) -> Result<KeyVersions, KmsError> {
        self.enter().await?;
        {
            let mut v = self.versions.write().unwrap();
            let next = v.all.keys().next_back().copied().unwrap_or(0) + 1;
            v.all.insert(next, random_version());
            v.current = next;
        }
        self.rotations.fetch_add(1, Ordering::SeqCst);
        Ok(self.versions_now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn versions_rotate_and_destroy() {
        let kms = FakeKms::new("k");
        let ctx = WrapContext::file_v1([1; 16]);
        let v = block_on(kms.key_versions()).unwrap();
        assert_eq!(v.current.as_deref(), Some("1"));
        assert_eq!(v.versions.len(), 1);
        let (d1, w1) = block_on(kms.generate_dek(&ctx)).unwrap();
        assert_eq!(w1.key_ref, kms.key_ref_at(1));

        let v = block_on(kms.rotate()).unwrap();
        assert_eq!(v.current.as_deref(), Some("2"));
        assert_eq!(kms.key_ref().key_version, "2");
        assert_eq!(kms.rotations(), 1);
        let (d2, w2) = block_on(kms.generate_dek(&ctx)).unwrap();
        assert_eq!(w2.key_ref.key_version, "2");
        for (d, w) in [(&d1, &w1), (&d2, &w2)] {
            assert_eq!(
                block_on(kms.unwrap(w, &ctx)).unwrap().as_bytes(),
                d.as_bytes()
            );
        }
        // A header naming the wrong version does not unwrap.
        let mut lying = w2.clone();
        lying.key_ref.key_version = "1".into();
        assert!(matches!(
            block_on(kms.unwrap(&lying, &ctx)),
            Err(KmsError::UnwrapFailed { .. })
        ));

        assert!(kms.set_version_enabled(1, false));
        assert!(matches!(
            block_on(kms.unwrap(&w1, &ctx)),
            Err(KmsError::KeyVersionUnusable { .. })
        ));
        assert!(kms.set_version_enabled(1, true));
        assert!(block_on(kms.unwrap(&w1, &ctx)).is_ok());

        assert!(kms.set_version_created(1, 1000));
        assert!(kms.destroy_version(1));
        assert!(!kms.destroy_version(1));
        assert!(!kms.destroy_version(9));
        match block_on(kms.unwrap(&w1, &ctx)) {
            Err(e @ KmsError::KeyVersionUnusable { .. }) => {
                assert!(e.to_string().contains("destroyed"), "{e}")
            }
            other => panic!("unwrapped under a destroyed version: {:?}", other.err()),
        }
        let v = block_on(kms.key_versions()).unwrap();
        let states: Vec<_> = v
            .versions
            .iter()
            .map(|k| (k.version.as_str(), k.created == Some(1000), k.can_unwrap))
            .collect();
        assert_eq!(states, [("1", true, false), ("2", false, true)]);

        // The current version destroyed: nothing wraps until a rotation.
        assert!(kms.destroy_version(2));
        assert!(matches!(
            block_on(kms.wrap(&Dek::generate(), &ctx)),
            Err(KmsError::KeyVersionUnusable { .. })
        ));
        block_on(kms.rotate()).unwrap();
        assert_eq!(
            block_on(kms.wrap(&Dek::generate(), &ctx))
                .unwrap()
                .key_ref
                .key_version,
            "3"
        );
    }

    #[test]
    fn counters_tell_requests_from_items() {
        let kms = FakeKms::new("k");
        let ctx = WrapContext::file_v1([2; 16]);
        let deks: Vec<Dek> = (0..5).map(|_| Dek::generate()).collect();
        let items: Vec<(&Dek, WrapContext)> = deks.iter().map(|d| (d, ctx)).collect();
        let wrapped: Vec<WrappedDek> = block_on(kms.wrap_many(&items))
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!((kms.wraps(), kms.wrap_batches(), kms.requests()), (5, 1, 1));
        let back = block_on(
            kms.unwrap_many(&wrapped.iter().map(|w| (w.clone(), ctx)).collect::<Vec<_>>()),
        );
        for (d, b) in deks.iter().zip(back) {
            assert_eq!(b.unwrap().as_bytes(), d.as_bytes());
        }
        assert_eq!((kms.unwraps(), kms.batches(), kms.requests()), (5, 1, 2));
        block_on(kms.unwrap(&wrapped[0], &ctx)).unwrap();
        assert_eq!((kms.unwraps(), kms.requests()), (6, 3));
    }
}
