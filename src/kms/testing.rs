//! An in-memory KMS for tests (feature `test-support`): one random KEK that
//! wraps DEKs with AES-256-GCM bound to the wrap context, counters of the
//! calls it answered, and faults on demand (latency, failures, a stall).
//! Every test that needs a provider without a server uses this one.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use rand::RngCore;
use zeroize::Zeroizing;

use super::{KeyProvider, KeyRef, KmsError, WrapContext, WrappedDek};
use crate::crypto::{Dek, DEK_LEN};

/// Provider kind written in the key references of fake wraps.
pub const FAKE_PROVIDER: &str = "fake";

/// See the module documentation.
pub struct FakeKms {
    key_id: String,
    kek: LessSafeKey,
    delay: Duration,
    wraps: AtomicU64,
    unwraps: AtomicU64,
    batches: AtomicU64,
    /// The next `failures` calls fail with `failure`.
    failures: AtomicU32,
    failure: Mutex<Option<KmsError>>,
    stalled: AtomicBool,
}

impl FakeKms {
    /// A fake key `key_id` with a fresh random KEK.
    pub fn new(key_id: &str) -> Self {
        let mut raw = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(&mut raw[..]);
        Self {
            key_id: key_id.to_owned(),
            kek: LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &raw[..]).expect("32-byte key")),
            delay: Duration::ZERO,
            wraps: AtomicU64::new(0),
            unwraps: AtomicU64::new(0),
            batches: AtomicU64::new(0),
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

    /// The next `n` calls fail with `error`.
    pub fn fail_next(&self, n: u32, error: KmsError) {
        *self.failure.lock().unwrap() = Some(error);
        self.failures.store(n, Ordering::SeqCst);
    }

    /// While set, calls never answer.
    pub fn set_stalled(&self, stalled: bool) {
        self.stalled.store(stalled, Ordering::SeqCst);
    }

    /// Wrap calls answered (generate included).
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

    /// A key reference of this key (for building headers in tests).
    pub fn key_ref(&self) -> KeyRef {
        KeyRef {
            provider: FAKE_PROVIDER.into(),
            key_id: self.key_id.clone(),
            key_version: "1".into(),
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
        self.enter().await?;
        self.wraps.fetch_add(1, Ordering::SeqCst);
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(dek.as_bytes());
        let tag = self
            .kek
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(ctx.canonical_bytes()),
                &mut blob[12..],
            )
            .expect("a DEK fits the AEAD limits");
        blob.extend_from_slice(tag.as_ref());
        Ok(WrappedDek {
            key_ref: self.key_ref(),
            blob,
        })
    }

    async fn unwrap(&self, wrapped: &WrappedDek, ctx: &WrapContext) -> Result<Dek, KmsError> {
        self.enter().await?;
        self.unwraps.fetch_add(1, Ordering::SeqCst);
        let failed = |detail: &str| KmsError::UnwrapFailed {
            kms: self.name(),
            detail: detail.into(),
        };
        if !self.handles(&wrapped.key_ref) {
            return Err(failed("the DEK was wrapped by another key"));
        }
        let blob = &wrapped.blob;
        if blob.len() != 12 + DEK_LEN + 16 {
            return Err(failed("wrong length"));
        }
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&blob[..12]);
        let mut body = Zeroizing::new([0u8; DEK_LEN]);
        self.kek
            .open_separate_gather(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(ctx.canonical_bytes()),
                &blob[12..12 + DEK_LEN],
                &blob[12 + DEK_LEN..],
                &mut body[..],
            )
            .map_err(|_| failed("authentication failed"))?;
        Dek::from_slice(&body[..]).map_err(|e| failed(&e.to_string()))
    }

    async fn unwrap_many(&self, items: &[(WrappedDek, WrapContext)]) -> Vec<Result<Dek, KmsError>> {
        self.batches.fetch_add(1, Ordering::SeqCst);
        let mut out = Vec::with_capacity(items.len());
        for (w, ctx) in items {
            out.push(self.unwrap(w, ctx).await);
        }
        out
    }
}
