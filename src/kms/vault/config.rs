//! What a Vault provider is configured with, and the HTTP client built
//! from it (address, namespace, CA certificate, client identity, TLS
//! verification).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use zeroize::Zeroizing;

use crate::kms::support::error_chain;
use crate::kms::KmsError;

fn default_mount() -> String {
    "transit".into()
}

/// How to log in to Vault. Secrets are never stored in the configuration:
/// the token comes from VAULT_TOKEN, an AppRole secret ID from a file or
/// VAULT_SECRET_ID, a Kubernetes service-account JWT from a file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "lowercase", deny_unknown_fields)]
pub enum VaultAuth {
    #[default]
    Token,
    Approle {
        role_id: String,
        /// File holding the secret ID; VAULT_SECRET_ID when absent.
        #[serde(default)]
        secret_id_file: Option<PathBuf>,
        #[serde(default = "default_approle_mount")]
        mount: String,
    },
    Kubernetes {
        role: String,
        #[serde(default = "default_jwt_file")]
        jwt_file: PathBuf,
        #[serde(default = "default_kubernetes_mount")]
        mount: String,
    },
}

fn default_approle_mount() -> String {
    "approle".into()
}
fn default_kubernetes_mount() -> String {
    "kubernetes".into()
}
fn default_jwt_file() -> PathBuf {
    "/var/run/secrets/kubernetes.io/serviceaccount/token".into()
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    /// e.g. https://vault.example:8200; empty: VAULT_ADDR (see
    /// [`with_environment`](Self::with_environment)).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    /// Transit secrets engine mount path.
    #[serde(default = "default_mount")]
    pub mount: String,
    /// Transit key name.
    pub key: String,
    /// Vault Enterprise namespace.
    pub namespace: Option<String>,
    #[serde(default)]
    pub auth: VaultAuth,
    pub ca_cert: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Skip TLS verification (prints a warning; for tests only).
    #[serde(default)]
    pub skip_verify: bool,
    /// Allow a plain http:// address (a dev server on loopback). Set only
    /// in the trusted configuration; refused otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_http: bool,
    #[serde(default = "crate::kms::default_timeout_secs")]
    pub timeout_secs: u64,
}

impl VaultConfig {
    /// These settings with those they leave out taken from the standard
    /// Vault environment variables, as the vault CLI reads them:
    /// `address` from VAULT_ADDR, `namespace` from VAULT_NAMESPACE,
    /// `ca_cert` from VAULT_CACERT, and `client_cert`/`client_key` from
    /// VAULT_CLIENT_CERT/VAULT_CLIENT_KEY (both). A setting the trusted
    /// configuration gives wins. VAULT_SKIP_VERIFY is deliberately not
    /// read: turning TLS verification off must be written down
    /// (`skip_verify`). The token (VAULT_TOKEN) and AppRole secret ID
    /// (VAULT_SECRET_ID) are read at login, never kept here.
    pub fn with_environment(&self) -> VaultConfig {
        self.with_variables(|name| std::env::var(name).ok())
    }

    /// [`with_environment`](Self::with_environment) with `var` as the
    /// environment; blank variables count as unset.
    fn with_variables(&self, var: impl Fn(&str) -> Option<String>) -> VaultConfig {
        let var = |name: &str| {
            var(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let mut cfg = self.clone();
        if cfg.address.trim().is_empty() {
            cfg.address = var("VAULT_ADDR").unwrap_or_default();
        }
        if cfg.namespace.is_none() {
            cfg.namespace = var("VAULT_NAMESPACE");
        }
        if cfg.ca_cert.is_none() {
            cfg.ca_cert = var("VAULT_CACERT").map(PathBuf::from);
        }
        if cfg.client_cert.is_none() && cfg.client_key.is_none() {
            cfg.client_cert = var("VAULT_CLIENT_CERT").map(PathBuf::from);
            cfg.client_key = var("VAULT_CLIENT_KEY").map(PathBuf::from);
        }
        cfg
    }

    /// The server, as messages name it.
    pub(crate) fn kms_name(&self) -> String {
        format!("Vault at {}", self.address.trim_end_matches('/'))
    }

    /// The HTTP client's own bound on a request: only a backstop, freeing
    /// a stuck connection, since the timeout layer gives up on the call
    /// after `timeout_secs`.
    pub(super) fn transport_timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs.max(1) + 5)
    }
}

pub(super) fn build_client(cfg: &VaultConfig) -> Result<VaultClient, KmsError> {
    let addr = cfg.address.trim_end_matches('/');
    if addr.trim().is_empty() {
        return Err(KmsError::Config(
            "no Vault address: set `address` in the provider's trusted definition \
             (--vault-addr), or VAULT_ADDR in kmsfs's environment"
                .into(),
        ));
    }
    if !(addr.starts_with("http://") || addr.starts_with("https://"))
        || addr.len() <= "https://".len()
    {
        return Err(KmsError::Config(format!(
            "vault address {:?} must be an http:// or https:// URL, e.g. https://vault.example:8200",
            cfg.address
        )));
    }
    if cfg.key.is_empty() || cfg.key.contains('/') || cfg.mount.trim_matches('/').is_empty() {
        return Err(KmsError::Config(format!(
            "vault transit mount {:?} / key {:?}: both must be non-empty and the key must not contain '/'",
            cfg.mount, cfg.key
        )));
    }
    if cfg.skip_verify {
        tracing::warn!(
            "vault: TLS certificate verification of {addr} is OFF (skip_verify); \
             anyone on the network path can impersonate Vault. Use only for tests"
        );
    }
    match url::Url::parse(addr) {
        Ok(u) if u.host_str().is_some_and(|h| !h.is_empty()) => {}
        _ => {
            return Err(KmsError::Config(format!(
                "vault address {:?} is not a valid URL",
                cfg.address
            )))
        }
    }
    if let Some(ca) = &cfg.ca_cert {
        let pem = std::fs::read(ca).map_err(|e| {
            KmsError::Config(format!(
                "cannot read the vault CA certificate {}: {e}",
                ca.display()
            ))
        })?;
        if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
            return Err(KmsError::Config(format!(
                "the vault CA certificate {} holds no PEM certificate",
                ca.display()
            )));
        }
    }
    let mut b = VaultClientSettingsBuilder::default();
    // Validated above: the builder's setter panics on a malformed URL.
    b.address(addr);
    b.token("")
        .verify(!cfg.skip_verify)
        .timeout(Some(cfg.transport_timeout()))
        .ca_certs(
            cfg.ca_cert
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect(),
        )
        .namespace(cfg.namespace.clone().filter(|n| !n.is_empty()));
    let identity = match (&cfg.client_cert, &cfg.client_key) {
        (None, None) => None,
        (Some(c), Some(k)) => {
            let read = |p: &PathBuf| {
                std::fs::read(p)
                    .map_err(|e| KmsError::Config(format!("cannot read {}: {e}", p.display())))
            };
            let mut pem = Zeroizing::new(read(c)?);
            pem.push(b'\n');
            pem.extend_from_slice(&Zeroizing::new(read(k)?));
            Some(vaultrs::client::Identity::from_pem(&pem).map_err(|e| {
                KmsError::Config(format!(
                    "client certificate {} / key {}: {e} (both must be PEM)",
                    c.display(),
                    k.display()
                ))
            })?)
        }
        _ => {
            return Err(KmsError::Config(
                "vault client_cert and client_key must be given together".into(),
            ))
        }
    };
    b.identity(identity);
    let settings = b
        .build()
        .map_err(|e| KmsError::Config(format!("vault client settings: {e}")))?;
    VaultClient::new(settings)
        .map_err(|e| KmsError::Config(format!("vault client: {}", error_chain(&e))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_are_clear() {
        // The least a configuration file says; the rest are defaults.
        let mut cfg: VaultConfig =
            toml::from_str("address = \"vault.example:8200\"\nkey = \"k\"").unwrap();
        assert_eq!(cfg.mount, "transit");
        assert_eq!(cfg.auth, VaultAuth::Token);
        assert_eq!(cfg.timeout_secs, crate::kms::default_timeout_secs());
        let e = build_client(&cfg).err().unwrap().to_string();
        assert!(e.contains("http:// or https://"), "{e}");
        cfg.address = "http://[::1".into();
        let e = build_client(&cfg).err().unwrap().to_string();
        assert!(e.contains("not a valid URL"), "{e}");
        cfg.address = "http://127.0.0.1:1".into();
        cfg.client_cert = Some("/nonexistent".into());
        let e = build_client(&cfg).err().unwrap().to_string();
        assert!(e.contains("together"), "{e}");
        cfg.address = String::new();
        cfg.client_cert = None;
        let e = build_client(&cfg).err().unwrap().to_string();
        assert!(e.contains("VAULT_ADDR"), "{e}");
    }

    #[test]
    fn the_environment_fills_only_what_the_configuration_leaves_out() {
        let env = |name: &str| {
            Some(
                match name {
                    "VAULT_ADDR" => "https://env.example:8200",
                    "VAULT_NAMESPACE" => "env-ns",
                    "VAULT_CACERT" => "/env/ca.pem",
                    "VAULT_CLIENT_CERT" => "/env/client.pem",
                    "VAULT_CLIENT_KEY" => "/env/client.key",
                    "VAULT_SKIP_VERIFY" => "true",
                    _ => return None,
                }
                .to_owned(),
            )
        };
        let bare: VaultConfig = toml::from_str("key = \"k\"").unwrap();
        let filled = bare.with_variables(env);
        assert_eq!(filled.address, "https://env.example:8200");
        assert_eq!(filled.namespace.as_deref(), Some("env-ns"));
        assert_eq!(filled.ca_cert, Some(PathBuf::from("/env/ca.pem")));
        assert_eq!(filled.client_cert, Some(PathBuf::from("/env/client.pem")));
        assert_eq!(filled.client_key, Some(PathBuf::from("/env/client.key")));
        assert!(
            !filled.skip_verify,
            "TLS verification is never turned off by the environment"
        );
        let explicit: VaultConfig = toml::from_str(
            "key = \"k\"\naddress = \"https://conf.example:8200\"\nnamespace = \"conf-ns\"\n\
             ca_cert = \"/conf/ca.pem\"\nclient_cert = \"/conf/c.pem\"\nclient_key = \"/conf/c.key\"",
        )
        .unwrap();
        assert_eq!(
            explicit.with_variables(env),
            explicit,
            "explicit settings win"
        );
        let blank = |_: &str| Some("  ".to_owned());
        assert_eq!(
            bare.with_variables(blank),
            bare,
            "blank variables count as unset"
        );
    }
}
