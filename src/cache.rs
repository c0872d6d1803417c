//! The DEK cache in front of the KMS: an LRU of unwrapped DEKs with a TTL.
//!
//! Keyed by a hash of the wrapped DEK and its context, so a hit proves the
//! same sidecar was unwrapped before. Concurrent misses on one key make one
//! KMS call: the first caller unwraps while the others wait on its flight.
//! Evicted or expired DEKs are dropped, and `Dek` zeroizes on drop.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;
use sha2::{Digest, Sha256};

use crate::crypto::Dek;
use crate::kms::{KeyProvider, KmsError, WrapContext, WrappedDek};
use crate::metrics::CacheStats;

type CacheKey = [u8; 32];

struct Entry {
    dek: Arc<Dek>,
    inserted: Instant,
}

pub struct DekCache {
    /// Invariant: every entry is younger than `ttl` when handed out.
    entries: Mutex<LruCache<CacheKey, Entry>>,
    /// One async mutex per key being unwrapped right now.
    in_flight: Mutex<HashMap<CacheKey, Arc<tokio::sync::Mutex<()>>>>,
    ttl: Duration,
    pub stats: CacheStats,
}

fn cache_key(wrapped: &WrappedDek, ctx: &WrapContext) -> CacheKey {
    let mut h = Sha256::new();
    let ctx = ctx.canonical_bytes();
    for part in [
        wrapped.key_ref.provider.as_bytes(),
        wrapped.key_ref.key_id.as_bytes(),
        wrapped.key_ref.key_version.as_bytes(),
        &wrapped.blob,
        &ctx,
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}

impl DekCache {
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        let cap = NonZeroUsize::new(capacity.max(1)).expect("max(1) is non-zero");
        Self {
            entries: Mutex::new(LruCache::new(cap)),
            in_flight: Mutex::new(HashMap::new()),
            ttl,
            stats: CacheStats::default(),
        }
    }

    fn lookup(&self, key: &CacheKey) -> Option<Arc<Dek>> {
        let mut entries = self.entries.lock().unwrap();
        match entries.get(key) {
            Some(e) if e.inserted.elapsed() < self.ttl => Some(e.dek.clone()),
            Some(_) => {
                entries.pop(key);
                self.stats.evictions.fetch_add(1, Ordering::Relaxed);
                None
            }
            None => None,
        }
    }

    /// Cached DEK without any KMS call, if present and fresh.
    pub fn get(&self, wrapped: &WrappedDek, ctx: &WrapContext) -> Option<Arc<Dek>> {
        let hit = self.lookup(&cache_key(wrapped, ctx));
        if hit.is_some() {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn capacity(&self) -> usize {
        self.entries.lock().unwrap().cap().get()
    }

    /// Whether a fresh DEK is cached, without counting a hit or touching the
    /// LRU order (a prefetch scan must not reorder what readers use).
    pub fn contains(&self, wrapped: &WrappedDek, ctx: &WrapContext) -> bool {
        let entries = self.entries.lock().unwrap();
        entries
            .peek(&cache_key(wrapped, ctx))
            .is_some_and(|e| e.inserted.elapsed() < self.ttl)
    }

    /// Stores a DEK this process just generated (so the new file's next open
    /// is a hit).
    pub fn insert(&self, wrapped: &WrappedDek, ctx: &WrapContext, dek: Arc<Dek>) {
        let key = cache_key(wrapped, ctx);
        let entry = Entry {
            dek,
            inserted: Instant::now(),
        };
        if let Some((old_key, _)) = self.entries.lock().unwrap().push(key, entry) {
            if old_key != key {
                self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The in-flight lock of `key`: whoever holds it is unwrapping that DEK.
    fn flight(&self, key: CacheKey) -> Arc<tokio::sync::Mutex<()>> {
        self.in_flight
            .lock()
            .unwrap()
            .entry(key)
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
            .clone()
    }

    /// Cached DEK, or one unwrap by `kms` shared by all concurrent callers.
    pub async fn get_or_unwrap(
        &self, wrapped: &WrappedDek, ctx: &WrapContext, kms: &dyn KeyProvider,
    ) -> Result<Arc<Dek>, KmsError> {
        let key = cache_key(wrapped, ctx);
        if let Some(d) = self.lookup(&key) {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(d);
        }
        let flight = self.flight(key);
        let _turn = flight.lock().await;
        // Someone ahead of us in the flight may have filled it.
        if let Some(d) = self.lookup(&key) {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(d);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        self.stats.unwraps.fetch_add(1, Ordering::Relaxed);
        let result = kms.unwrap(wrapped, ctx).await.map(Arc::new);
        if let Ok(dek) = &result {
            self.insert(wrapped, ctx, dek.clone());
        }
        self.in_flight.lock().unwrap().remove(&key);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kms::testing::FakeKms;
    use crate::kms::KeyRef;

    fn wrapped(b: u8) -> WrappedDek {
        WrappedDek {
            key_ref: KeyRef {
                provider: "test".into(),
                key_id: "k".into(),
                key_version: "1".into(),
            },
            blob: vec![b; 32],
        }
    }

    #[test]
    fn concurrent_misses_make_one_call_and_ttl_expires() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        // Slow enough that all 16 callers miss while the first one waits.
        let kms = Arc::new(FakeKms::new("k").with_delay(Duration::from_millis(50)));
        let cache = Arc::new(DekCache::new(10, Duration::from_millis(300)));
        let ctx = WrapContext::file_v1([0; 16]);
        let (dek, w) = rt.block_on(kms.generate_dek(&ctx)).unwrap();
        rt.block_on(async {
            let mut tasks = Vec::new();
            for _ in 0..16 {
                let (cache, kms, w) = (cache.clone(), kms.clone(), w.clone());
                tasks.push(tokio::spawn(async move {
                    cache.get_or_unwrap(&w, &ctx, kms.as_ref()).await.unwrap()
                }));
            }
            for t in tasks {
                assert_eq!(t.await.unwrap().as_bytes(), dek.as_bytes());
            }
        });
        assert_eq!(kms.unwraps(), 1);
        assert!(cache.get(&w, &ctx).is_some());
        std::thread::sleep(Duration::from_millis(350));
        assert!(cache.get(&w, &ctx).is_none(), "expired by TTL");
        rt.block_on(cache.get_or_unwrap(&w, &ctx, kms.as_ref()))
            .unwrap();
        assert_eq!(kms.unwraps(), 2);
    }

    #[test]
    fn capacity_bounds_entries() {
        let cache = DekCache::new(2, Duration::from_secs(60));
        let ctx = WrapContext::file_v1([0; 16]);
        for b in 0..3u8 {
            cache.insert(
                &wrapped(b),
                &ctx,
                Arc::new(Dek::from_slice(&[b; 32]).unwrap()),
            );
        }
        assert!(cache.get(&wrapped(0), &ctx).is_none());
        assert!(cache.get(&wrapped(2), &ctx).is_some());
        assert_eq!(cache.stats.evictions.load(Ordering::Relaxed), 1);
    }
}
