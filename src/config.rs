//! The backing directory's configuration file (`.kmsfs-config.toml`): which
//! KMS key protects new files, with which cipher and block size. It holds no
//! secrets: a local keyring is named by path, remote KMSs by address and key.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::format::names::CONFIG_FILE;
#[cfg(test)]
use crate::format::CipherSuite;
use crate::format::{BlockGeometry, BlockLayout};
pub use crate::kms::config::{ConnectError, KmsConfig};
use crate::kms::instrumented::{Instrumented, RetryPolicy};
use crate::kms::{KeyProvider, KmsRuntime, ProviderSet};
use crate::metrics::Metrics;
use crate::policy::{governing, normalize_dir, Policy};

pub const CONFIG_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} is not a kmsfs backing directory (no {CONFIG_FILE}); run `kmsfs init {0} --kms local --key-file FILE` first")]
    NotInitialized(PathBuf),
    #[error("backing directory {0} does not exist or is not a directory")]
    NoBacking(PathBuf),
    #[error("{0} is already initialised; refusing to overwrite its configuration")]
    AlreadyInitialized(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid kmsfs configuration: {detail}")]
    Invalid { path: PathBuf, detail: String },
    #[error(transparent)]
    Connect(#[from] ConnectError),
}

impl ConfigError {
    /// Whether trying again later can help (a KMS was unreachable).
    pub fn is_retryable(&self) -> bool {
        matches!(self, ConfigError::Connect(ConnectError::Kms(e)) if e.is_retryable())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub format_version: u32,
    /// Plaintext block size in bytes, for every file of this backing
    /// directory: it must be known without reading a header, since the
    /// plaintext size of a file is derived from its ciphertext size.
    pub block_size: u64,
    /// Key policies by directory; exactly one has `dir = "/"`.
    #[serde(rename = "policy")]
    pub policies: Vec<Policy>,
    /// KMS keys no policy names any more, kept so that files wrapped under
    /// them before a policy change still open.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<KmsConfig>,
}

/// A policy whose KMS is connected.
pub struct ActivePolicy {
    pub policy: Policy,
    pub provider: Arc<dyn KeyProvider>,
}

/// Every policy of a backing directory with its KMS connected, plus every
/// provider that may unwrap one of its files.
pub struct Connected {
    pub policies: Vec<ActivePolicy>,
    pub providers: ProviderSet,
}

impl Config {
    /// Connects every KMS the configuration names, once per distinct key.
    /// Each provider is wrapped with timeouts, retries and metrics.
    pub fn connect(
        &self,
        rt: &KmsRuntime,
        metrics: &Arc<Metrics>,
    ) -> Result<Connected, ConfigError> {
        let mut built: Vec<(&KmsConfig, Arc<dyn KeyProvider>)> = Vec::new();
        let mut providers = ProviderSet::default();
        for k in self.all_kms() {
            let p = Instrumented::wrap(k.build(rt)?, metrics.clone(), RetryPolicy::default());
            providers.add(p.clone());
            built.push((k, p));
        }
        let policies = self
            .policies
            .iter()
            .map(|pol| ActivePolicy {
                policy: pol.clone(),
                provider: built
                    .iter()
                    .find(|(k, _)| *k == &pol.kms)
                    .expect("built above")
                    .1
                    .clone(),
            })
            .collect();
        Ok(Connected {
            policies,
            providers,
        })
    }

    pub fn path(backing: &Path) -> PathBuf {
        backing.join(CONFIG_FILE)
    }

    /// The root directory's policy.
    pub fn root(&self) -> &Policy {
        &self.policies[governing(&self.policies, "/")]
    }

    /// The policy governing mount-relative `path`.
    pub fn policy_for(&self, path: &str) -> &Policy {
        &self.policies[governing(&self.policies, path)]
    }

    /// Every KMS key a file of this backing directory may be wrapped under,
    /// without duplicates.
    pub fn all_kms(&self) -> Vec<&KmsConfig> {
        let mut out: Vec<&KmsConfig> = Vec::new();
        for k in self
            .policies
            .iter()
            .map(|p| &p.kms)
            .chain(self.retired.iter())
        {
            if !out.contains(&k) {
                out.push(k);
            }
        }
        out
    }

    /// Adds or replaces the policy of `policy.dir`. A key that no policy
    /// names any more is kept in `retired` so its files still open.
    pub fn set_policy(&mut self, policy: Policy) {
        let old = match self.policies.iter_mut().find(|p| p.dir == policy.dir) {
            Some(slot) => Some(std::mem::replace(slot, policy)),
            None => {
                self.policies.push(policy);
                None
            }
        };
        if let Some(old) = old {
            self.retire_if_unused(old.kms);
        }
        self.retired
            .retain(|k| !self.policies.iter().any(|p| &p.kms == k));
        self.policies.sort_by(|a, b| a.dir.cmp(&b.dir));
    }

    /// Removes the policy of `dir` (never the root's). Returns false when
    /// there was none.
    pub fn unset_policy(&mut self, dir: &str) -> bool {
        if dir == "/" {
            return false;
        }
        let Some(i) = self.policies.iter().position(|p| p.dir == dir) else {
            return false;
        };
        let old = self.policies.remove(i);
        self.retire_if_unused(old.kms);
        true
    }

    fn retire_if_unused(&mut self, kms: KmsConfig) {
        if !self.policies.iter().any(|p| p.kms == kms) && !self.retired.contains(&kms) {
            self.retired.push(kms);
        }
        self.retired
            .retain(|k| !self.policies.iter().any(|p| &p.kms == k));
    }

    pub fn geometry(&self) -> BlockGeometry {
        BlockGeometry::from_size(self.block_size, BlockLayout::V1).expect("validated on load")
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |detail: String| ConfigError::Invalid {
            path: path.to_owned(),
            detail,
        };
        if self.format_version != CONFIG_VERSION {
            return Err(invalid(format!(
                "format_version {} is not supported (this kmsfs reads {CONFIG_VERSION})",
                self.format_version
            )));
        }
        BlockGeometry::from_size(self.block_size, BlockLayout::V1)
            .map_err(|e| invalid(e.to_string()))?;
        let mut dirs = std::collections::HashSet::new();
        for p in &self.policies {
            if normalize_dir(&p.dir).as_deref() != Ok(p.dir.as_str()) {
                return Err(invalid(format!(
                    "policy directory {:?} is not a normalized absolute path",
                    p.dir
                )));
            }
            if !dirs.insert(p.dir.as_str()) {
                return Err(invalid(format!("two policies for {:?}", p.dir)));
            }
        }
        if !dirs.contains("/") {
            return Err(invalid("no policy for the root directory \"/\"".into()));
        }
        Ok(())
    }

    pub fn load(backing: &Path) -> Result<Self, ConfigError> {
        if !backing.is_dir() {
            return Err(ConfigError::NoBacking(backing.to_owned()));
        }
        let path = Self::path(backing);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ConfigError::NotInitialized(backing.to_owned()))
            }
            Err(source) => return Err(ConfigError::Io { path, source }),
        };
        let cfg: Config = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        cfg.validate(&path)?;
        Ok(cfg)
    }

    /// Writes the configuration atomically (temp file, fsync, rename).
    pub fn save(&self, backing: &Path) -> Result<(), ConfigError> {
        let path = Self::path(backing);
        self.validate(&path)?;
        let io = |source| ConfigError::Io {
            path: path.clone(),
            source,
        };
        let text = format!(
            "# kmsfs configuration (no secrets). Managed by `kmsfs`; edit with care.\n{}",
            toml::to_string_pretty(self).expect("config serializes")
        );
        let tmp = backing.join(format!("{CONFIG_FILE}.tmp{}", std::process::id()));
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local_policy(dir: &str, key: &str) -> Policy {
        Policy {
            dir: dir.into(),
            cipher: CipherSuite::ChaCha20Poly1305,
            mandatory: true,
            kms: KmsConfig::Local {
                key_file: "/etc/kmsfs/keys".into(),
                key: key.into(),
            },
        }
    }

    #[test]
    fn policies_set_unset_and_retire_old_keys() {
        let mut cfg = Config {
            format_version: 1,
            block_size: 4096,
            policies: vec![local_policy("/", "root")],
            retired: vec![],
        };
        cfg.set_policy(local_policy("/pii", "pii1"));
        assert_eq!(cfg.policy_for("/pii/x").dir, "/pii");
        assert_eq!(cfg.policy_for("/other").dir, "/");
        cfg.set_policy(local_policy("/pii", "pii2"));
        assert_eq!(cfg.retired, vec![local_policy("/", "pii1").kms]);
        assert_eq!(cfg.all_kms().len(), 3);
        assert!(cfg.unset_policy("/pii"));
        assert!(!cfg.unset_policy("/"));
        assert_eq!(cfg.retired.len(), 2);
        cfg.set_policy(local_policy("/again", "pii1"));
        assert_eq!(
            cfg.retired.len(),
            1,
            "a key back in use is no longer retired"
        );
    }

    #[test]
    fn save_load_round_trip_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Config::load(dir.path()),
            Err(ConfigError::NotInitialized(_))
        ));
        let cfg = Config {
            format_version: 1,
            block_size: 4096,
            policies: vec![local_policy("/", "default")],
            retired: vec![],
        };
        cfg.save(dir.path()).unwrap();
        assert_eq!(Config::load(dir.path()).unwrap(), cfg);
        std::fs::write(Config::path(dir.path()), "format_version = 7\n").unwrap();
        let err = Config::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a valid kmsfs configuration"), "{err}");
    }
}
