//! Whether the KMS keys a volume names answer now: one probe per key, all
//! at once, each bounded by one deadline. `kmsfs kms status` and a mount's
//! `/ready` both ask through [`probe_all`].
//!
//! A probe is the provider's own [`KeyProvider::check`], a real round trip
//! to the KMS (Vault and AWS read the key's metadata; the others wrap and
//! unwrap a DEK bound to an all-zero file ID, which no file has). It never
//! touches a file or the audit log.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde::Serialize;

use super::config::{ConnectError, KeySpec, KmsConfig};
use super::{KeyProvider, KeyVersions, KmsError};

/// What a probe starts from.
pub enum ProbeTarget {
    /// A provider already connected (a mount's).
    Connected(Arc<dyn KeyProvider>),
    /// Settings to connect with first (a one-off command): connecting is
    /// part of the probe.
    Settings(Box<KmsConfig>),
    /// The key could not even be resolved to settings; why.
    Unresolved(String),
}

/// One key's answer.
#[derive(Clone, Debug, Serialize)]
pub struct KeyHealth {
    /// The key as volumes name it: `PROVIDER/ID[@VERSION]`.
    pub key: String,
    /// The KMS and key, as messages name them (absent when not connected).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kms: Option<String>,
    pub ok: bool,
    /// Time the probe took, connecting included, in milliseconds.
    pub latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Short label of the failure (`unreachable`, `timeout`, `auth_failed`,
    /// `key_not_found`, `config`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<&'static str>,
    /// Whether trying again later may succeed (the KMS was unreachable or
    /// slow), as opposed to a configuration or permission to fix.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub retryable: bool,
    /// The key's versions, when asked for and the KMS reports them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub versions: Option<KeyVersions>,
}

/// Probes every key at once; each probe (connecting, checking and, with
/// `with_versions`, reading the key's versions) must end within
/// `deadline` or counts as a timeout. Answers in the order of `targets`.
pub async fn probe_all(
    targets: Vec<(KeySpec, ProbeTarget)>, deadline: Duration, with_versions: bool,
) -> Vec<KeyHealth> {
    join_all(
        targets
            .into_iter()
            .map(|(key, target)| probe(key, target, deadline, with_versions)),
    )
    .await
}

async fn probe(
    key: KeySpec, target: ProbeTarget, deadline: Duration, with_versions: bool,
) -> KeyHealth {
    let start = Instant::now();
    let mut health = KeyHealth {
        key: key.to_string(),
        kms: None,
        ok: false,
        latency_ms: 0.0,
        error: None,
        error_kind: None,
        retryable: false,
        versions: None,
    };
    let provider = match target {
        ProbeTarget::Connected(p) => Ok(p),
        ProbeTarget::Settings(cfg) => match tokio::time::timeout(deadline, cfg.connect()).await {
            Ok(connected) => connected,
            Err(_) => Err(ConnectError::Kms(timed_out(&key, deadline))),
        },
        ProbeTarget::Unresolved(why) => {
            health.error = Some(why);
            health.error_kind = Some("config");
            return health;
        }
    };
    let outcome = match provider {
        Err(ConnectError::Keyring(e)) => Err((e.to_string(), "keyring", false)),
        Err(ConnectError::Kms(e)) => Err(failure(&e)),
        Ok(provider) => {
            health.kms = Some(provider.describe());
            let left = deadline.saturating_sub(start.elapsed());
            match tokio::time::timeout(left, provider.check()).await {
                Err(_) => Err(failure(&timed_out(&key, deadline))),
                Ok(Err(e)) => Err(failure(&e)),
                Ok(Ok(())) => {
                    if with_versions {
                        // Versions are extra information: a KMS that does
                        // not report them (or a policy that may not read
                        // them) leaves the key healthy.
                        let left = deadline.saturating_sub(start.elapsed());
                        if let Ok(Ok(v)) = tokio::time::timeout(left, provider.key_versions()).await
                        {
                            health.versions = Some(v);
                        }
                    }
                    Ok(())
                }
            }
        }
    };
    health.latency_ms = start.elapsed().as_secs_f64() * 1000.0;
    match outcome {
        Ok(()) => health.ok = true,
        Err((error, kind, retryable)) => {
            health.error = Some(error);
            health.error_kind = Some(kind);
            health.retryable = retryable;
        }
    }
    health
}

fn failure(e: &KmsError) -> (String, &'static str, bool) {
    (e.to_string(), e.kind(), e.is_retryable())
}

fn timed_out(key: &KeySpec, deadline: Duration) -> KmsError {
    KmsError::Timeout {
        kms: format!("the KMS of key {key}"),
        seconds: deadline.as_secs_f64().ceil() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kms::testing::FakeKms;

    fn spec(id: &str) -> KeySpec {
        KeySpec {
            provider: "p".into(),
            id: id.into(),
            version: None,
        }
    }

    #[test]
    fn answers_each_key_in_order() {
        let rt = crate::kms::KmsRuntime::new().unwrap();
        let good: Arc<dyn KeyProvider> = Arc::new(FakeKms::new("good"));
        let targets = vec![
            (spec("a"), ProbeTarget::Connected(good)),
            (spec("b"), ProbeTarget::Unresolved("no provider p".into())),
        ];
        let out = rt.block_on(probe_all(targets, Duration::from_secs(2), true));
        assert_eq!(out.len(), 2);
        assert!(out[0].ok && out[0].error.is_none(), "{out:?}");
        assert_eq!(out[0].key, "p/a");
        assert!(!out[1].ok && !out[1].retryable, "{out:?}");
        assert_eq!(out[1].error_kind, Some("config"));
    }

    #[test]
    fn a_stalled_kms_times_out_at_the_deadline_as_retryable() {
        let rt = crate::kms::KmsRuntime::new().unwrap();
        let stalled = FakeKms::new("slow");
        stalled.set_stalled(true);
        let targets = vec![(spec("s"), ProbeTarget::Connected(Arc::new(stalled)))];
        let start = Instant::now();
        let out = rt.block_on(probe_all(targets, Duration::from_millis(300), false));
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "the deadline bounds the probe"
        );
        assert!(!out[0].ok && out[0].retryable, "{out:?}");
        assert_eq!(out[0].error_kind, Some("timeout"));
    }
}
