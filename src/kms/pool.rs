//! A pool of pre-wrapped DEKs for one remote key, so that creating a file
//! makes no KMS call (issue 14; HDFS's EDEK queue is the model).
//!
//! Each entry is a fresh file ID, a DEK made locally, and that DEK wrapped
//! by the key bound to `WrapContext::file(file_id, volume_id)`: exactly
//! what a create would have asked the KMS for. [`DekPool::take`] never
//! waits: it hands out an entry (each exactly once) or none, and when the
//! pool runs below its low-water mark it starts one background refill,
//! which wraps in batches through `wrap_many` (one Vault `batch_input`
//! request per batch; [`PARALLEL_CALLS`](super::PARALLEL_CALLS) concurrent
//! single calls elsewhere). Entries older than the pool's maximum age are
//! dropped unused, so a key rotation reaches new files within that age.
//!
//! DEKs stay in the zeroizing [`Dek`] until used; dropping the pool drops
//! (zeroizes) every entry. Nothing is ever written to disk.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::{KeyProvider, KmsError, WrapContext, WrappedDek};
use crate::audit::{AuditEvent, AuditLog, AuditOp, AuditOutcome};
use crate::crypto::{self, Dek};

/// Entries per key when the mount does not say (`dek_pool=N`).
pub const DEFAULT_CAPACITY: usize = 512;
/// A refill starts when fewer than this share (percent) of the capacity
/// is left.
pub const LOW_WATER_PERCENT: usize = 30;
/// DEKs wrapped per `wrap_many` call of a refill.
pub const REFILL_BATCH: usize = 128;
/// Entries a cold pool (new, drained or expired) is given: enough for a
/// burst to start warming it, few enough that a mount creating a file now
/// and then costs a KMS without a batch API (AWS) a handful of calls, not
/// a batch, each time.
pub const COLD_BATCH: usize = 8;
/// How long an entry may wait to be used: bounds how long files are still
/// created under a key version after a rotation.
pub const MAX_AGE: Duration = Duration::from_secs(600);
/// How long a failed refill keeps the next one from starting, so that an
/// unreachable KMS costs one batch per this long, not one per create.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);
/// The audit log's path label of the wraps a refill makes (no file has
/// them yet).
pub const AUDIT_LABEL: &str = "(dek pool)";

/// The pools' counters, shared by every pool of a mount and rendered with
/// its metrics.
#[derive(Default)]
pub struct PoolStats {
    /// Entries held now, in all pools.
    pub available: AtomicU64,
    /// Creates served from a pool.
    pub hits: AtomicU64,
    /// Creates under a pooled key that found it empty and called the KMS.
    pub misses: AtomicU64,
    /// Refills run (each wraps one batch or more).
    pub refills: AtomicU64,
    /// Refill batches that failed, wholly or in part.
    pub refill_errors: AtomicU64,
}

/// A pre-wrapped DEK for one new file. Deliberately no Debug: it holds a
/// DEK.
pub struct PooledDek {
    pub file_id: [u8; 16],
    pub dek: Dek,
    /// `dek` wrapped by the pool's key, bound to `file_id` and the volume.
    pub wrapped: WrappedDek,
}

struct Entry {
    made: Instant,
    dek: PooledDek,
}

/// How a pool is sized and paced; the defaults are the constants above.
#[derive(Clone, Copy)]
pub struct PoolSettings {
    pub capacity: usize,
    pub batch: usize,
    pub max_age: Duration,
    pub retry_after: Duration,
}

impl PoolSettings {
    pub fn new(capacity: usize) -> Self {
        PoolSettings {
            capacity,
            batch: REFILL_BATCH,
            max_age: MAX_AGE,
            retry_after: RETRY_AFTER,
        }
    }

    fn low_water(&self) -> usize {
        (self.capacity * LOW_WATER_PERCENT).div_ceil(100)
    }
}

/// What the pool and its refill task share.
struct Shared {
    /// Weak: a pool must not keep a key replaced by a policy reload alive;
    /// its refill stops once the key is gone.
    key: Weak<dyn KeyProvider>,
    volume_id: [u8; 16],
    settings: PoolSettings,
    /// Oldest first.
    entries: Mutex<VecDeque<Entry>>,
    /// Set while a refill runs: one at a time.
    refilling: AtomicBool,
    /// When the last refill failed, while failures go on.
    failed_at: Mutex<Option<Instant>>,
    /// The pool was dropped: a refill still running keeps nothing.
    closed: AtomicBool,
    stats: Arc<PoolStats>,
    audit: Option<Arc<AuditLog>>,
}

/// See the module documentation. Share it with an `Arc`.
pub struct DekPool {
    shared: Arc<Shared>,
}

/// Clears the refill flag however the refill task ends (also when the
/// runtime drops it unfinished).
struct RefillTurn(Arc<Shared>);

impl Drop for RefillTurn {
    fn drop(&mut self) {
        self.0.refilling.store(false, Ordering::Release);
    }
}

impl DekPool {
    /// An empty pool of DEKs wrapped by `key` for volume `volume_id`. Its
    /// refills log their wraps to `audit` and count into `stats`.
    pub fn new(
        key: &Arc<dyn KeyProvider>, volume_id: [u8; 16], settings: PoolSettings,
        stats: Arc<PoolStats>, audit: Option<Arc<AuditLog>>,
    ) -> Self {
        DekPool {
            shared: Arc::new(Shared {
                key: Arc::downgrade(key),
                volume_id,
                settings,
                entries: Mutex::new(VecDeque::new()),
                refilling: AtomicBool::new(false),
                failed_at: Mutex::new(None),
                closed: AtomicBool::new(false),
                stats,
                audit,
            }),
        }
    }

    /// Whether this pool serves `key` (the same provider object).
    pub fn is_for(&self, key: &Arc<dyn KeyProvider>) -> bool {
        Weak::ptr_eq(&self.shared.key, &Arc::downgrade(key))
    }

    /// Whether its key is gone (a policy reload replaced it).
    pub fn is_orphaned(&self) -> bool {
        self.shared.key.strong_count() == 0
    }

    /// Entries held now (expired ones included until a take drops them).
    pub fn len(&self) -> usize {
        self.shared.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a refill is running.
    pub fn is_refilling(&self) -> bool {
        self.shared.refilling.load(Ordering::Acquire)
    }

    /// A fresh entry, or `None` (the caller then calls the KMS itself).
    /// Never waits on the KMS. Below the low-water mark it starts a refill
    /// on the current tokio runtime, if there is one.
    pub fn take(&self) -> Option<PooledDek> {
        let s = &self.shared;
        let (got, left) = {
            let mut q = s.lock();
            let mut expired = 0;
            while q
                .front()
                .is_some_and(|e| e.made.elapsed() >= s.settings.max_age)
            {
                q.pop_front();
                expired += 1;
            }
            let got = q.pop_front();
            s.stats
                .available
                .fetch_sub(expired + u64::from(got.is_some()), Ordering::Relaxed);
            (got, q.len())
        };
        if left < s.settings.low_water() {
            self.start_refill();
        }
        got.map(|e| e.dek)
    }

    /// Starts a background refill unless one runs, a recent one failed, or
    /// there is no tokio runtime to run it on.
    pub fn start_refill(&self) {
        let s = &self.shared;
        let backing_off = s
            .failed_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() < s.settings.retry_after);
        if backing_off || s.closed.load(Ordering::Acquire) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if s.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let turn = RefillTurn(s.clone());
        runtime.spawn(async move {
            turn.0.refill().await;
            drop(turn);
        });
    }

    /// Runs a refill now and waits for it (unless one runs already): for
    /// tests and for warming a pool up front.
    pub async fn fill(&self) {
        let s = &self.shared;
        if s.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let turn = RefillTurn(s.clone());
        s.refill().await;
        drop(turn);
    }
}

impl Drop for DekPool {
    fn drop(&mut self) {
        let s = &self.shared;
        s.closed.store(true, Ordering::Release);
        // Dropping the entries zeroizes their DEKs.
        let dropped = std::mem::take(&mut *s.lock()).len() as u64;
        s.stats.available.fetch_sub(dropped, Ordering::Relaxed);
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Entry>> {
        // The queue stays consistent even if a holder panicked.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wraps fresh DEKs in batches until the pool is full; a cold pool
    /// (empty: new, drained or expired) gets `COLD_BATCH` only, so a mount
    /// that creates a file now and then does not wrap a full pool each
    /// time for nothing. Stops at the first failed batch.
    async fn refill(&self) {
        self.stats.refills.fetch_add(1, Ordering::Relaxed);
        let target = if self.lock().is_empty() {
            COLD_BATCH
                .min(self.settings.batch)
                .min(self.settings.capacity)
        } else {
            self.settings.capacity
        };
        loop {
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            let missing = target.saturating_sub(self.lock().len());
            if missing == 0 {
                return;
            }
            let Some(key) = self.key.upgrade() else {
                return;
            };
            let n = missing.min(self.settings.batch);
            match self.wrap_batch(key.as_ref(), n).await {
                Ok(made) => self.add(made),
                Err((made, e)) => {
                    self.add(made);
                    self.failed(key.as_ref(), &e);
                    return;
                }
            }
            self.recovered(key.as_ref());
        }
    }

    /// `n` fresh entries wrapped in one `wrap_many`, each wrap audited.
    /// On a failure, the entries that were wrapped and the first error.
    async fn wrap_batch(
        &self, key: &dyn KeyProvider, n: usize,
    ) -> Result<Vec<PooledDek>, (Vec<PooledDek>, KmsError)> {
        let ids: Vec<[u8; 16]> = (0..n).map(|_| crypto::random_file_id()).collect();
        let deks: Vec<Dek> = (0..n).map(|_| Dek::generate()).collect();
        let items: Vec<(&Dek, WrapContext)> = deks
            .iter()
            .zip(&ids)
            .map(|(dek, id)| (dek, WrapContext::file(*id, self.volume_id)))
            .collect();
        let wrapped = key.wrap_many(&items).await;
        drop(items);
        let mut made = Vec::with_capacity(n);
        let mut failures = 0usize;
        let mut first_error = None;
        for ((file_id, dek), w) in ids.into_iter().zip(deks).zip(wrapped) {
            match w {
                Ok(wrapped) => {
                    self.audit(
                        AuditEvent::new(AuditOp::Wrap, AuditOutcome::Ok)
                            .key(&wrapped.key_ref)
                            .file(file_id),
                    );
                    made.push(PooledDek {
                        file_id,
                        dek,
                        wrapped,
                    });
                }
                Err(e) => {
                    failures += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            None => Ok(made),
            Some(e) => {
                // One line per failed batch, not per DEK: nothing was lost
                // but pre-made keys, and an outage would flood the log.
                let why = e.to_string();
                let detail = format!("{failures} of {n} wraps of a DEK pool refill failed");
                self.audit(
                    AuditEvent::new(AuditOp::Wrap, AuditOutcome::Failed(&why)).detail(&detail),
                );
                Err((made, e))
            }
        }
    }

    fn audit(&self, event: AuditEvent<'_>) {
        if let Some(log) = &self.audit {
            log.record(&event.path(AUDIT_LABEL));
        }
    }

    /// Adds `made` to the pool, unless it was dropped meanwhile (then they
    /// are dropped, zeroized, here).
    fn add(&self, made: Vec<PooledDek>) {
        let now = Instant::now();
        let mut q = self.lock();
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let n = made.len() as u64;
        q.extend(made.into_iter().map(|dek| Entry { made: now, dek }));
        self.stats.available.fetch_add(n, Ordering::Relaxed);
    }

    /// A refill failed: counted, backed off, and logged once per streak.
    fn failed(&self, key: &dyn KeyProvider, e: &KmsError) {
        self.stats.refill_errors.fetch_add(1, Ordering::Relaxed);
        let first = self
            .failed_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(Instant::now())
            .is_none();
        if first {
            tracing::warn!(
                "cannot refill the DEK pool of {}: {e}; new files call the KMS directly until \
                 it answers again (retried every {} s at most)",
                key.describe(),
                self.settings.retry_after.as_secs()
            );
        }
    }

    /// A refill batch worked: ends a failure streak.
    fn recovered(&self, key: &dyn KeyProvider) {
        let was_failing = self
            .failed_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .is_some();
        if was_failing {
            tracing::info!("the DEK pool of {} refills again", key.describe());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kms::testing::FakeKms;
    use std::collections::HashSet;

    const VOLUME: [u8; 16] = [9; 16];

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    /// A pool of `settings` over `kms`, with the provider handle it is
    /// keyed by (the pool holds it weakly) and its stats.
    fn pool(
        kms: &Arc<FakeKms>, settings: PoolSettings,
    ) -> (DekPool, Arc<dyn KeyProvider>, Arc<PoolStats>) {
        let key: Arc<dyn KeyProvider> = kms.clone();
        let stats = Arc::new(PoolStats::default());
        let pool = DekPool::new(&key, VOLUME, settings, stats.clone(), None);
        (pool, key, stats)
    }

    /// Fills `pool` to its capacity (a cold pool gets `COLD_BATCH` a refill).
    async fn fill_up(pool: &DekPool, capacity: usize) {
        while pool.len() < capacity {
            pool.fill().await;
        }
    }

    async fn wait_refill(pool: &DekPool) {
        while pool.is_refilling() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn unreachable() -> KmsError {
        KmsError::Unreachable {
            kms: "fake".into(),
            detail: "down".into(),
        }
    }

    #[test]
    fn a_warm_pool_serves_without_kms_calls_and_entries_unwrap() {
        let rt = runtime();
        let kms = Arc::new(FakeKms::new("k"));
        let (pool, key, stats) = pool(&kms, PoolSettings::new(64));
        rt.block_on(fill_up(&pool, 64));
        assert!(!pool.is_for(&(Arc::new(FakeKms::new("k")) as Arc<dyn KeyProvider>)));
        assert!(pool.is_for(&key));
        assert_eq!(
            kms.requests(),
            2,
            "8 while cold, then the other 56 in one batch"
        );
        assert_eq!(stats.available.load(Ordering::Relaxed), 64);
        // 64 - 44 = 20 left, above the low-water mark (20 of 64): no refill.
        let taken: Vec<PooledDek> =
            rt.block_on(async { (0..44).map_while(|_| pool.take()).collect() });
        assert_eq!(taken.len(), 44);
        assert_eq!(kms.requests(), 2, "no KMS call on the take path");
        assert!(!pool.is_refilling());
        assert_eq!(stats.available.load(Ordering::Relaxed), 20);
        for e in taken.iter().take(3) {
            let ctx = WrapContext::file(e.file_id, VOLUME);
            let back = rt.block_on(kms.unwrap(&e.wrapped, &ctx)).unwrap();
            assert_eq!(back.as_bytes(), e.dek.as_bytes());
        }
        drop(pool);
        assert_eq!(stats.available.load(Ordering::Relaxed), 0, "dropped");
    }

    #[test]
    fn file_ids_are_unique() {
        let rt = runtime();
        let kms = Arc::new(FakeKms::new("k"));
        let (pool, _key, _) = pool(&kms, PoolSettings::new(512));
        rt.block_on(fill_up(&pool, 512));
        assert_eq!(kms.wrap_batches(), 5, "8 while cold, then batches of 128");
        let mut ids = HashSet::new();
        rt.block_on(async {
            while let Some(e) = pool.take() {
                assert!(ids.insert(e.file_id), "a file ID handed out twice");
                if ids.len() == 2000 {
                    break;
                }
                // Refills run as the pool drains; let them.
                if pool.is_empty() {
                    wait_refill(&pool).await;
                }
            }
        });
        assert!(ids.len() >= 512, "{}", ids.len());
    }

    #[test]
    fn refill_starts_below_low_water_one_at_a_time() {
        let rt = runtime();
        let kms = Arc::new(FakeKms::new("k").with_delay(Duration::from_millis(20)));
        let settings = PoolSettings {
            batch: 4,
            ..PoolSettings::new(10)
        };
        let (pool, _key, stats) = pool(&kms, settings);
        rt.block_on(fill_up(&pool, 10));
        assert_eq!(kms.wrap_batches(), 3, "4 (cold), then 4 + 2");
        let refills = stats.refills.load(Ordering::Relaxed);
        rt.block_on(async {
            // Low water is 3 of 10: 7 takes leave 3, no refill yet.
            for _ in 0..7 {
                assert!(pool.take().is_some());
            }
            assert!(!pool.is_refilling());
            // The 8th leaves 2: a refill starts; the next takes start none.
            assert!(pool.take().is_some());
            assert!(pool.is_refilling());
            assert!(pool.take().is_some());
            pool.start_refill();
            wait_refill(&pool).await;
        });
        assert_eq!(stats.refills.load(Ordering::Relaxed), refills + 1);
        assert_eq!(pool.len(), 10, "a warm pool refills to capacity");
    }

    #[test]
    fn a_cold_pool_gets_one_batch() {
        let rt = runtime();
        let kms = Arc::new(FakeKms::new("k"));
        let settings = PoolSettings {
            batch: 4,
            ..PoolSettings::new(10)
        };
        let (pool, _key, _) = pool(&kms, settings);
        rt.block_on(async {
            assert!(pool.take().is_none(), "nothing yet; a refill starts");
            wait_refill(&pool).await;
        });
        assert_eq!((pool.len(), kms.wrap_batches()), (4, 1));
    }

    #[test]
    fn old_entries_expire_unused() {
        let rt = runtime();
        let kms = Arc::new(FakeKms::new("k"));
        let settings = PoolSettings {
            max_age: Duration::from_millis(100),
            ..PoolSettings::new(8)
        };
        let (pool, _key, stats) = pool(&kms, settings);
        rt.block_on(fill_up(&pool, 8));
        std::thread::sleep(Duration::from_millis(150));
        let before = kms.wraps();
        rt.block_on(async {
            assert!(pool.take().is_none(), "expired entries are not handed out");
            wait_refill(&pool).await;
        });
        assert!(kms.wraps() > before, "the take started a refill");
        assert_eq!(stats.available.load(Ordering::Relaxed) as usize, pool.len());
        assert!(rt.block_on(async { pool.take() }).is_some());
    }

    #[test]
    fn failures_back_off_and_the_pool_recovers() {
        let rt = runtime();
        let kms = Arc::new(FakeKms::new("k"));
        let settings = PoolSettings {
            retry_after: Duration::from_millis(200),
            ..PoolSettings::new(8)
        };
        let (pool, _key, stats) = pool(&kms, settings);
        kms.fail_next(1000, unreachable());
        rt.block_on(pool.fill());
        assert_eq!(stats.refill_errors.load(Ordering::Relaxed), 1);
        let batches = kms.wrap_batches();
        rt.block_on(async {
            // Empty: the caller falls back; no new refill while backing off.
            for _ in 0..10 {
                assert!(pool.take().is_none());
            }
            assert!(!pool.is_refilling());
        });
        assert_eq!(kms.wrap_batches(), batches, "no refill storm");
        kms.fail_next(0, unreachable());
        std::thread::sleep(Duration::from_millis(250));
        rt.block_on(async {
            assert!(pool.take().is_none());
            wait_refill(&pool).await;
            assert!(pool.take().is_some(), "refilled once the KMS answers");
        });
        assert_eq!(stats.refill_errors.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_dropped_key_stops_its_pool() {
        let rt = runtime();
        let key: Arc<dyn KeyProvider> = Arc::new(FakeKms::new("k"));
        let stats = Arc::new(PoolStats::default());
        let pool = DekPool::new(&key, VOLUME, PoolSettings::new(8), stats.clone(), None);
        rt.block_on(pool.fill());
        assert_eq!(pool.len(), 8);
        assert!(!pool.is_orphaned());
        drop(key);
        assert!(pool.is_orphaned());
        rt.block_on(async {
            while pool.take().is_some() {}
            pool.fill().await;
        });
        assert!(pool.is_empty(), "no refill without its key");
        assert_eq!(stats.available.load(Ordering::Relaxed), 0);
    }
}
