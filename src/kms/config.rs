//! Where a KMS key lives and how to reach it: the provider settings that
//! `KmsConfig::build` turns into a connected [`KeyProvider`], with
//! connecting and every call bounded by the configured timeout.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::instrumented::{within, Instrumented, RetryPolicy};
use super::local::{KeyringError, LocalKms};
use super::{KeyProvider, KmsError, KmsRuntime};
use crate::metrics::Metrics;

/// Why a KMS could not be connected.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    #[error(transparent)]
    Kms(#[from] KmsError),
}

impl ConnectError {
    /// Whether trying again later can help (the KMS was unreachable).
    pub fn is_retryable(&self) -> bool {
        matches!(self, ConnectError::Kms(e) if e.is_retryable())
    }
}

/// Which KMS key wraps DEKs, by provider.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "provider", rename_all = "lowercase", deny_unknown_fields)]
pub enum KmsConfig {
    Local {
        /// Keyring file, absolute, outside the backing directory.
        key_file: PathBuf,
        /// Key name in the keyring.
        key: String,
    },
    #[cfg(feature = "vault")]
    Vault(super::vault::VaultConfig),
    #[cfg(feature = "aws")]
    Aws(super::aws::AwsConfig),
    #[cfg(feature = "azure")]
    Azure(super::azure::AzureConfig),
    #[cfg(feature = "gcp")]
    Gcp(super::gcp::GcpConfig),
}

/// Connecting makes up to this many calls in a row (a login or credential
/// fetch, then a read of the key), each allowed the per-call timeout.
const CONNECT_CALLS: u32 = 2;

impl KmsConfig {
    /// How long one call to this KMS may take: the provider's `timeout_secs`
    /// (at least 1 s). The local keyring's calls are in-memory, so it keeps
    /// the default, which only guards against a stuck lock.
    pub fn timeout(&self) -> Duration {
        let secs = match self {
            KmsConfig::Local { .. } => super::default_timeout_secs(),
            #[cfg(feature = "vault")]
            KmsConfig::Vault(c) => c.timeout_secs,
            #[cfg(feature = "aws")]
            KmsConfig::Aws(c) => c.timeout_secs,
            #[cfg(feature = "azure")]
            KmsConfig::Azure(c) => c.timeout_secs,
            #[cfg(feature = "gcp")]
            KmsConfig::Gcp(c) => c.timeout_secs,
        };
        Duration::from_secs(secs.max(1))
    }

    /// Connects to (or opens) the KMS this configuration names. Each call of
    /// the provider is bounded by [`timeout`](Self::timeout) and tried once:
    /// what one-off commands (checks) use.
    pub fn build(&self, rt: &KmsRuntime) -> Result<Arc<dyn KeyProvider>, ConnectError> {
        rt.block_on(self.connect())
    }

    /// [`build`](Self::build), for callers already on a runtime.
    pub async fn connect(&self) -> Result<Arc<dyn KeyProvider>, ConnectError> {
        Ok(Instrumented::bounded(self.open().await?, self.timeout()))
    }

    /// Connects; each call of the provider is bounded by
    /// [`timeout`](Self::timeout), retried by `retry` and recorded in
    /// `metrics`: what a mount uses.
    pub fn build_instrumented(
        &self, rt: &KmsRuntime, metrics: &Arc<Metrics>, retry: RetryPolicy,
    ) -> Result<Arc<dyn KeyProvider>, ConnectError> {
        let inner = rt.block_on(self.open())?;
        Ok(Instrumented::wrap(
            inner,
            metrics.clone(),
            retry,
            self.timeout(),
        ))
    }

    /// These settings with what they leave out taken from the provider's
    /// standard environment variables (Vault: see
    /// [`VaultConfig::with_environment`](super::vault::VaultConfig::with_environment));
    /// the other providers' SDKs read theirs themselves.
    pub fn with_environment(&self) -> KmsConfig {
        match self {
            #[cfg(feature = "vault")]
            KmsConfig::Vault(c) => KmsConfig::Vault(c.with_environment()),
            other => other.clone(),
        }
    }

    /// The connected provider, its calls not yet bounded. Connecting is.
    async fn open(&self) -> Result<Arc<dyn KeyProvider>, ConnectError> {
        // Before the transport check: VAULT_ADDR may be the address.
        let this = self.with_environment();
        this.check_transport()?;
        #[cfg_attr(
            not(any(feature = "vault", feature = "aws", feature = "azure", feature = "gcp")),
            allow(unused_variables)
        )]
        let timeout = self.timeout();
        // Every remote provider connects the same way, bounded as a whole.
        #[allow(unused_macros)]
        macro_rules! connect {
            ($config:expr, $provider:ty) => {
                connect_within(
                    timeout,
                    || $config.kms_name(),
                    <$provider>::connect($config),
                )
                .await?
            };
        }
        Ok(match &this {
            KmsConfig::Local { key_file, key } => Arc::new(LocalKms::open(key_file, key)?),
            #[cfg(feature = "vault")]
            KmsConfig::Vault(c) => connect!(c, super::vault::VaultKms),
            #[cfg(feature = "aws")]
            KmsConfig::Aws(c) => connect!(c, super::aws::AwsKms),
            #[cfg(feature = "azure")]
            KmsConfig::Azure(c) => connect!(c, super::azure::AzureKms),
            #[cfg(feature = "gcp")]
            KmsConfig::Gcp(c) => connect!(c, super::gcp::GcpKms),
        })
    }
}

/// Runs a provider's `connect`, bounded by [`CONNECT_CALLS`] calls of
/// `timeout` each: the one bound on connecting (logins, credential
/// discovery, key reads), which providers do not bound themselves.
pub async fn connect_within<T>(
    timeout: Duration, kms: impl FnOnce() -> String,
    connect: impl Future<Output = Result<T, KmsError>>,
) -> Result<T, KmsError> {
    within(timeout * CONNECT_CALLS, kms, connect).await
}

/// Which key protects files: a provider of the trusted configuration, by
/// name, and the key's ID in it (keyring key name, transit key name, AWS key
/// ID/ARN/alias, Key Vault key name, Cloud KMS key name), optionally pinned
/// to one version (Azure, GCP). This is all a volume may say about keys.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    pub provider: String,
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

impl std::fmt::Display for KeySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.provider, self.id)?;
        if let Some(v) = &self.version {
            write!(f, "@{v}")?;
        }
        Ok(())
    }
}

/// A provider of the trusted configuration: its type and its settings
/// (address, auth, TLS, keyring file, ...), everything but the key.
#[derive(Clone, Debug, PartialEq)]
pub struct ProviderDef {
    pub kind: String,
    pub settings: toml::Table,
}

/// The settings that name the key (and its pinned version) in each
/// provider's configuration: a volume supplies them, the trusted
/// configuration supplies the rest.
fn key_fields(kind: &str) -> Option<(&'static str, Option<&'static str>)> {
    Some(match kind {
        "local" => ("key", None),
        "vault" => ("key", None),
        "aws" => ("key_id", None),
        "azure" => ("key_name", Some("key_version")),
        "gcp" => ("key", Some("key_version")),
        _ => return None,
    })
}

impl ProviderDef {
    /// The full settings of `key` under this provider. Fails with what to
    /// fix when the definition is malformed, names a key itself, or is of a
    /// type this build does not have.
    pub fn resolve(&self, key: &KeySpec) -> Result<KmsConfig, String> {
        let Some((id_field, version_field)) = key_fields(&self.kind) else {
            return Err(format!(
                "unknown type {:?}; use local, vault, aws, azure or gcp",
                self.kind
            ));
        };
        let mut t = self.settings.clone();
        for f in std::iter::once(id_field).chain(version_field) {
            if t.contains_key(f) {
                return Err(format!(
                    "sets `{f}`, but keys are chosen by each volume's policies; remove it"
                ));
            }
        }
        if t.contains_key("provider") {
            return Err("sets `provider`; the provider's type is `type`".into());
        }
        t.insert("provider".into(), toml::Value::String(self.kind.clone()));
        t.insert(id_field.into(), toml::Value::String(key.id.clone()));
        match (version_field, &key.version) {
            (Some(f), Some(v)) => {
                t.insert(f.into(), toml::Value::String(v.clone()));
            }
            (None, Some(_)) => {
                return Err(format!(
                    "a {} key cannot be pinned to a version (key {key})",
                    self.kind
                ))
            }
            _ => {}
        }
        let cfg = KmsConfig::deserialize(toml::Value::Table(t)).map_err(|e| {
            let msg = e.to_string();
            if msg.contains("unknown variant") {
                format!(
                    "type {:?} is not available in this build (compiled without its cargo feature)",
                    self.kind
                )
            } else {
                msg.trim().replace('\n', " ")
            }
        })?;
        Ok(cfg)
    }
}

impl KmsConfig {
    /// This configuration as a provider definition and a key, the reverse
    /// of [`ProviderDef::resolve`]; `provider` names the definition.
    pub fn split(&self, provider: &str) -> (ProviderDef, KeySpec) {
        let value = toml::Value::try_from(self).expect("a KMS configuration serializes");
        let toml::Value::Table(mut t) = value else {
            unreachable!("KmsConfig serializes to a table")
        };
        let kind = match t.remove("provider") {
            Some(toml::Value::String(k)) => k,
            _ => unreachable!("KmsConfig is tagged by provider"),
        };
        let (id_field, version_field) = key_fields(&kind).expect("a known provider");
        // A key ARN names its account: the definition records it, for the
        // operator to see (typed by them in `init`, or shown by `upgrade`
        // before they confirm).
        #[cfg(feature = "aws")]
        if let KmsConfig::Aws(c) = self {
            if let (None, Some(account)) = (&c.account, super::aws::arn_account(&c.key_id)) {
                t.insert("account".into(), toml::Value::String(account.to_owned()));
            }
        }
        let take = |t: &mut toml::Table, f: &str| match t.remove(f) {
            Some(toml::Value::String(s)) => Some(s),
            _ => None,
        };
        let id = take(&mut t, id_field).unwrap_or_default();
        let version = version_field.and_then(|f| take(&mut t, f));
        (
            ProviderDef { kind, settings: t },
            KeySpec {
                provider: provider.to_owned(),
                id,
                version,
            },
        )
    }

    /// Refuses plain http to a KMS, or TLS verification turned off, unless
    /// the provider's trusted definition says so explicitly (`allow_http`,
    /// `skip_verify`): key wraps and tokens must not cross a network in
    /// the clear by accident.
    pub fn check_transport(&self) -> Result<(), KmsError> {
        match self.endpoint() {
            Some((u, allowed))
                if u.trim().to_ascii_lowercase().starts_with("http://") && !allowed =>
            {
                Err(KmsError::Config(format!(
                    "{u} is plain http, which sends wrapped keys and credentials in the clear; \
                     use https, or set allow_http = true in this provider's trusted definition \
                     if that is what you want (a dev server on loopback)"
                )))
            }
            _ => Ok(()),
        }
    }

    /// The URL this configuration reaches its KMS at, where it can be set,
    /// and whether plain http is allowed for it.
    fn endpoint(&self) -> Option<(&str, bool)> {
        match self {
            KmsConfig::Local { .. } => None,
            #[cfg(feature = "vault")]
            KmsConfig::Vault(c) => Some((c.address.as_str(), c.allow_http)),
            #[cfg(feature = "aws")]
            KmsConfig::Aws(c) => c.endpoint.as_deref().map(|u| (u, c.allow_http)),
            // https only, checked by the provider.
            #[cfg(feature = "azure")]
            KmsConfig::Azure(_) => None,
            #[cfg(feature = "gcp")]
            KmsConfig::Gcp(c) => c.endpoint.as_deref().map(|u| (u, c.allow_http)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_resolve_are_inverse() {
        let cfg = KmsConfig::Local {
            key_file: "/etc/kmsfs/keys".into(),
            key: "k".into(),
        };
        let (def, key) = cfg.split("p");
        assert_eq!(key.provider, "p");
        assert_eq!(key.id, "k");
        assert!(
            !def.settings.contains_key("key"),
            "the key is not the provider's"
        );
        assert_eq!(def.resolve(&key).unwrap(), cfg);
        let pinned = KeySpec {
            version: Some("3".into()),
            ..key
        };
        assert!(def
            .resolve(&pinned)
            .unwrap_err()
            .contains("cannot be pinned"));
    }

    #[cfg(feature = "vault")]
    #[test]
    fn plain_http_needs_an_explicit_allow() {
        let mut def = ProviderDef {
            kind: "vault".into(),
            settings: toml::Table::new(),
        };
        def.settings.insert(
            "address".into(),
            toml::Value::String("http://vault.example:8200".into()),
        );
        let key = KeySpec {
            provider: "v".into(),
            id: "k".into(),
            version: None,
        };
        let cfg = def.resolve(&key).unwrap();
        let e = cfg.check_transport().unwrap_err().to_string();
        assert!(e.contains("allow_http = true"), "{e}");
        def.settings
            .insert("allow_http".into(), toml::Value::Boolean(true));
        def.resolve(&key).unwrap().check_transport().unwrap();
        def.settings.insert(
            "address".into(),
            toml::Value::String("https://vault.example:8200".into()),
        );
        def.settings.remove("allow_http");
        def.resolve(&key).unwrap().check_transport().unwrap();
    }
}
