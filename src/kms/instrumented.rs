//! A wrapper around any provider that adds what every provider needs the
//! same way: a per-call timeout, bounded retries with backoff for errors a
//! retry can help, and metrics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{KeyProvider, KeyRef, KmsError, WrapContext, WrappedDek};
use crate::crypto::Dek;
use crate::metrics::Metrics;

/// Retry and timeout settings.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Attempts in all, first included.
    pub attempts: u32,
    pub first_backoff: Duration,
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 3,
            first_backoff: Duration::from_millis(100),
            timeout: Duration::from_secs(30),
        }
    }
}

pub struct Instrumented {
    inner: Arc<dyn KeyProvider>,
    metrics: Arc<Metrics>,
    retry: RetryPolicy,
}

impl Instrumented {
    pub fn wrap(
        inner: Arc<dyn KeyProvider>,
        metrics: Arc<Metrics>,
        retry: RetryPolicy,
    ) -> Arc<dyn KeyProvider> {
        Arc::new(Self {
            inner,
            metrics,
            retry,
        })
    }

    fn timed_out(&self) -> KmsError {
        KmsError::Timeout {
            kms: self.inner.describe(),
            seconds: self.retry.timeout.as_secs(),
        }
    }

    async fn call<T, F, Fut>(&self, operation: &'static str, f: F) -> Result<T, KmsError>
    where
        F: Fn() -> Fut + Send + Sync,
        Fut: std::future::Future<Output = Result<T, KmsError>> + Send,
        T: Send,
    {
        let mut backoff = self.retry.first_backoff;
        let mut attempt = 1;
        loop {
            let start = Instant::now();
            let result = match tokio::time::timeout(self.retry.timeout, f()).await {
                Ok(r) => r,
                Err(_) => Err(self.timed_out()),
            };
            let outcome = match &result {
                Ok(_) => "ok",
                Err(e) => e.kind(),
            };
            self.metrics
                .record_kms(self.inner.kind(), operation, outcome, start.elapsed());
            match result {
                // A timeout already cost the user `timeout`; only quick
                // failures (refused, reset, 5xx) are worth trying again here.
                Err(e)
                    if e.is_retryable()
                        && !matches!(e, KmsError::Timeout { .. })
                        && attempt < self.retry.attempts =>
                {
                    tracing::warn!(
                        "{operation} attempt {attempt} failed, retrying in {backoff:?}: {e}"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    attempt += 1;
                }
                r => return r,
            }
        }
    }
}

#[async_trait]
impl KeyProvider for Instrumented {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn handles(&self, key_ref: &KeyRef) -> bool {
        self.inner.handles(key_ref)
    }
    fn is_current_key(&self, key_ref: &KeyRef) -> bool {
        self.inner.is_current_key(key_ref)
    }
    async fn generate_dek(&self, ctx: &WrapContext) -> Result<(Dek, WrappedDek), KmsError> {
        self.call("generate", || self.inner.generate_dek(ctx)).await
    }
    async fn wrap(&self, dek: &Dek, ctx: &WrapContext) -> Result<WrappedDek, KmsError> {
        self.call("wrap", || self.inner.wrap(dek, ctx)).await
    }
    async fn unwrap(&self, wrapped: &WrappedDek, ctx: &WrapContext) -> Result<Dek, KmsError> {
        self.call("unwrap", || self.inner.unwrap(wrapped, ctx))
            .await
    }
    async fn unwrap_many(&self, items: &[(WrappedDek, WrapContext)]) -> Vec<Result<Dek, KmsError>> {
        let start = Instant::now();
        // Batches only prefetch: one that outlives the timeout is given up
        // (each open then unwraps its own DEK), so its thread does not wait
        // on a stalled KMS for ever.
        let (out, outcome) =
            match tokio::time::timeout(self.retry.timeout, self.inner.unwrap_many(items)).await {
                Ok(out) if out.iter().all(|r| r.is_ok()) => (out, "ok"),
                Ok(out) => (out, "partial_error"),
                Err(_) => (
                    items.iter().map(|_| Err(self.timed_out())).collect(),
                    "timeout",
                ),
            };
        self.metrics
            .record_kms(self.inner.kind(), "unwrap_batch", outcome, start.elapsed());
        out
    }
    async fn check(&self) -> Result<(), KmsError> {
        self.call("check", || self.inner.check()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Fails the first `failures` calls (retryably or not), then succeeds;
    /// with `stalls`, never answers at all.
    struct Flaky {
        calls: AtomicU32,
        failures: u32,
        retryable: bool,
        stalls: bool,
    }

    #[async_trait]
    impl KeyProvider for Flaky {
        fn describe(&self) -> String {
            "flaky".into()
        }
        fn kind(&self) -> &'static str {
            "flaky"
        }
        fn handles(&self, _: &KeyRef) -> bool {
            true
        }
        async fn wrap(&self, _: &Dek, _: &WrapContext) -> Result<WrappedDek, KmsError> {
            unreachable!()
        }
        async fn unwrap(&self, _: &WrappedDek, _: &WrapContext) -> Result<Dek, KmsError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            if self.stalls {
                std::future::pending::<()>().await;
            }
            if n < self.failures {
                return Err(if self.retryable {
                    KmsError::Unreachable {
                        kms: "flaky".into(),
                        detail: "down".into(),
                    }
                } else {
                    KmsError::AuthFailed {
                        kms: "flaky".into(),
                        detail: "no".into(),
                    }
                });
            }
            Ok(Dek::from_slice(&[7; 32]).unwrap())
        }
    }

    /// `inner` behind `Instrumented` with quick retries and `timeout`, the
    /// metrics it records into, and an item to unwrap.
    fn instrumented(
        inner: Arc<Flaky>,
        timeout: Duration,
    ) -> (
        Arc<dyn KeyProvider>,
        Arc<Metrics>,
        (WrappedDek, WrapContext),
    ) {
        let metrics = Arc::new(Metrics::default());
        let p = Instrumented::wrap(
            inner,
            metrics.clone(),
            RetryPolicy {
                attempts: 3,
                first_backoff: Duration::from_millis(1),
                timeout,
            },
        );
        let w = WrappedDek {
            key_ref: KeyRef {
                provider: "flaky".into(),
                key_id: "k".into(),
                key_version: "".into(),
            },
            blob: vec![],
        };
        (p, metrics, (w, WrapContext { file_id: [0; 16] }))
    }

    fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn flaky(failures: u32, retryable: bool, stalls: bool) -> Arc<Flaky> {
        Arc::new(Flaky {
            calls: AtomicU32::new(0),
            failures,
            retryable,
            stalls,
        })
    }

    fn run(failures: u32, retryable: bool) -> (Result<Dek, KmsError>, u32, Arc<Metrics>) {
        let inner = flaky(failures, retryable, false);
        let (p, metrics, (w, ctx)) = instrumented(inner.clone(), Duration::from_secs(1));
        let r = block_on(p.unwrap(&w, &ctx));
        (r, inner.calls.load(Ordering::SeqCst), metrics)
    }

    #[test]
    fn a_stalled_batch_gives_up_at_the_timeout() {
        let (p, metrics, item) = instrumented(flaky(0, false, true), Duration::from_millis(50));
        let out = block_on(p.unwrap_many(&[item.clone(), item]));
        assert_eq!(out.len(), 2);
        assert!(out
            .iter()
            .all(|r| matches!(r, Err(KmsError::Timeout { .. }))));
        assert_eq!(metrics.kms_requests("unwrap_batch"), 1);
    }

    #[test]
    fn retries_only_what_a_retry_can_fix() {
        let (r, calls, m) = run(2, true);
        assert!(r.is_ok());
        assert_eq!(calls, 3);
        assert_eq!(m.kms_requests("unwrap"), 3);
        let (r, calls, _) = run(5, true);
        assert!(matches!(r, Err(KmsError::Unreachable { .. })));
        assert_eq!(calls, 3, "bounded");
        let (r, calls, _) = run(1, false);
        assert!(matches!(r, Err(KmsError::AuthFailed { .. })));
        assert_eq!(calls, 1, "auth errors are not retried");
    }
}
