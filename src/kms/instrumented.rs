//! A wrapper around any provider that adds what every provider needs the
//! same way: the per-call timeout (the one place a KMS call is bounded),
//! bounded retries with backoff for errors a retry can help, and metrics.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{KeyProvider, KeyRef, KeyVersions, KmsError, WrapContext, WrappedDek};
use crate::crypto::Dek;
use crate::metrics::Metrics;

/// How often a call that failed in a way a retry can help is tried.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Attempts in all, first included.
    pub attempts: u32,
    pub first_backoff: Duration,
}

impl RetryPolicy {
    /// One attempt: for one-off calls whose caller reports the failure
    /// (CLI checks), where a retry would only delay the report.
    pub const ONCE: RetryPolicy = RetryPolicy {
        attempts: 1,
        first_backoff: Duration::ZERO,
    };
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 3,
            first_backoff: Duration::from_millis(100),
        }
    }
}

/// Runs `f`, failing with [`KmsError::Timeout`] naming `kms` once `timeout`
/// has passed. Dropping `f` then frees whatever it held (connections,
/// buffers).
pub async fn within<T>(
    timeout: Duration, kms: impl FnOnce() -> String, f: impl Future<Output = Result<T, KmsError>>,
) -> Result<T, KmsError> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => r,
        Err(_) => Err(timed_out(kms(), timeout)),
    }
}

fn timed_out(kms: String, timeout: Duration) -> KmsError {
    KmsError::Timeout {
        kms,
        seconds: timeout.as_secs(),
    }
}

pub struct Instrumented {
    inner: Arc<dyn KeyProvider>,
    metrics: Arc<Metrics>,
    retry: RetryPolicy,
    timeout: Duration,
}

impl Instrumented {
    /// `inner` with each call bounded by `timeout`, retried by `retry`, and
    /// recorded in `metrics`.
    pub fn wrap(
        inner: Arc<dyn KeyProvider>, metrics: Arc<Metrics>, retry: RetryPolicy, timeout: Duration,
    ) -> Arc<dyn KeyProvider> {
        Arc::new(Self {
            inner,
            metrics,
            retry,
            timeout,
        })
    }

    /// `inner` with each call bounded by `timeout`, tried once, recorded
    /// nowhere: for one-off calls (CLI checks, tests).
    pub fn bounded(inner: Arc<dyn KeyProvider>, timeout: Duration) -> Arc<dyn KeyProvider> {
        Self::wrap(
            inner,
            Arc::new(Metrics::default()),
            RetryPolicy::ONCE,
            timeout,
        )
    }

    async fn call<T, F, Fut>(&self, operation: &'static str, f: F) -> Result<T, KmsError>
    where
        F: Fn() -> Fut + Send + Sync,
        Fut: Future<Output = Result<T, KmsError>> + Send,
        T: Send,
    {
        let mut backoff = self.retry.first_backoff;
        let mut attempt = 1;
        loop {
            let start = Instant::now();
            let result = within(self.timeout, || self.inner.describe(), f()).await;
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

impl Instrumented {
    /// A batch call of `n` items: bounded by the timeout as a whole (once
    /// it passes, every item fails with it), recorded as `operation`.
    async fn batch<T>(
        &self, operation: &'static str, n: usize,
        call: impl Future<Output = Vec<Result<T, KmsError>>>,
    ) -> Vec<Result<T, KmsError>> {
        let start = Instant::now();
        let (out, outcome) = match tokio::time::timeout(self.timeout, call).await {
            Ok(out) if out.iter().all(|r| r.is_ok()) => (out, "ok"),
            Ok(out) => (out, "partial_error"),
            Err(_) => {
                let e = timed_out(self.inner.describe(), self.timeout);
                ((0..n).map(|_| Err(e.clone())).collect(), "timeout")
            }
        };
        self.metrics
            .record_kms(self.inner.kind(), operation, outcome, start.elapsed());
        out
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
        // Prefetch batches: one that outlives the timeout is given up (each
        // open then unwraps its own DEK), so its thread does not wait on a
        // stalled KMS for ever.
        self.batch("unwrap_batch", items.len(), self.inner.unwrap_many(items))
            .await
    }
    async fn wrap_many(&self, items: &[(&Dek, WrapContext)]) -> Vec<Result<WrappedDek, KmsError>> {
        // Lifecycle batches: a stalled KMS fails the batch, which the
        // command reports and a rerun retries.
        self.batch("wrap_batch", items.len(), self.inner.wrap_many(items))
            .await
    }
    async fn key_versions(&self) -> Result<KeyVersions, KmsError> {
        self.call("key_versions", || self.inner.key_versions())
            .await
    }
    async fn rotate(&self) -> Result<KeyVersions, KmsError> {
        // Never retried: a rotation that timed out may have happened.
        within(self.timeout, || self.inner.describe(), self.inner.rotate()).await
    }
    async fn check(&self) -> Result<(), KmsError> {
        self.call("check", || self.inner.check()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kms::testing::FakeKms;

    /// `inner` behind `Instrumented` with quick retries and `timeout`, the
    /// metrics it records into, and an item `inner` wrapped.
    fn instrumented(
        inner: Arc<FakeKms>, timeout: Duration,
    ) -> (
        Arc<dyn KeyProvider>,
        Arc<Metrics>,
        (WrappedDek, WrapContext),
    ) {
        let metrics = Arc::new(Metrics::default());
        let ctx = WrapContext::file_v1([0; 16]);
        let (_, w) = block_on(inner.generate_dek(&ctx)).unwrap();
        let p = Instrumented::wrap(
            inner,
            metrics.clone(),
            RetryPolicy {
                attempts: 3,
                first_backoff: Duration::from_millis(1),
            },
            timeout,
        );
        (p, metrics, (w, ctx))
    }

    fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn unreachable() -> KmsError {
        KmsError::Unreachable {
            kms: "fake".into(),
            detail: "down".into(),
        }
    }

    /// Unwraps once through `Instrumented` after the first `failures` calls
    /// fail with `error`: the result, unwrap calls made, and the metrics.
    fn run(failures: u32, error: KmsError) -> (Result<Dek, KmsError>, u32, Arc<Metrics>) {
        let inner = Arc::new(FakeKms::new("k"));
        let (p, metrics, (w, ctx)) = instrumented(inner.clone(), Duration::from_secs(1));
        inner.fail_next(failures, error);
        let r = block_on(p.unwrap(&w, &ctx));
        let calls = metrics.kms_requests("unwrap") as u32;
        (r, calls, metrics)
    }

    #[test]
    fn a_stalled_batch_gives_up_at_the_timeout() {
        let inner = Arc::new(FakeKms::new("k"));
        let (p, metrics, item) = instrumented(inner.clone(), Duration::from_millis(50));
        inner.set_stalled(true);
        let out = block_on(p.unwrap_many(&[item.clone(), item]));
        assert_eq!(out.len(), 2);
        assert!(out
            .iter()
            .all(|r| matches!(r, Err(KmsError::Timeout { .. }))));
        assert_eq!(metrics.kms_requests("unwrap_batch"), 1);
    }

    #[test]
    fn a_stalled_call_gives_up_at_the_timeout_once() {
        let inner = Arc::new(FakeKms::new("k"));
        let (p, metrics, (w, ctx)) = instrumented(inner.clone(), Duration::from_millis(50));
        inner.set_stalled(true);
        let start = Instant::now();
        let r = block_on(p.unwrap(&w, &ctx));
        assert!(matches!(r, Err(KmsError::Timeout { .. })));
        assert!(start.elapsed() < Duration::from_secs(1));
        assert_eq!(
            metrics.kms_requests("unwrap"),
            1,
            "a timeout is not retried"
        );
    }

    #[test]
    fn retries_only_what_a_retry_can_fix() {
        let (r, calls, m) = run(2, unreachable());
        assert!(r.is_ok());
        assert_eq!(calls, 3);
        assert_eq!(m.kms_requests("unwrap"), 3);
        let (r, calls, _) = run(5, unreachable());
        assert!(matches!(r, Err(KmsError::Unreachable { .. })));
        assert_eq!(calls, 3, "bounded");
        let auth = KmsError::AuthFailed {
            kms: "fake".into(),
            detail: "no".into(),
        };
        let (r, calls, _) = run(1, auth);
        assert!(matches!(r, Err(KmsError::AuthFailed { .. })));
        assert_eq!(calls, 1, "auth errors are not retried");
    }
}
