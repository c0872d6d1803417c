//! Format 1 volume configurations, read only to upgrade them: they kept
//! every KMS setting (keyring path, Vault address and auth, endpoints) in
//! the backing directory itself, where whoever can write it could point
//! kmsfs at their own keys (`kmsfs upgrade`, `config::upgrade`).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::volume::read_untrusted;
use super::ConfigError;
use crate::format::block::BlockLayout;
use crate::format::names::CONFIG_FILE;
use crate::format::{BlockGeometry, CipherSuite};
use crate::kms::config::KmsConfig;
use crate::policy::{governing_by, normalize_dir};

fn yes() -> bool {
    true
}

/// A format 1 policy: the key as full KMS settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegacyPolicy {
    pub dir: String,
    pub cipher: CipherSuite,
    #[serde(default = "yes")]
    pub mandatory: bool,
    pub kms: KmsConfig,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegacyConfig {
    pub format_version: u32,
    /// Plaintext block size in bytes, for every file of this backing
    /// directory: it must be known without reading a header, since the
    /// plaintext size of a file is derived from its ciphertext size.
    pub block_size: u64,
    /// Key policies by directory; exactly one has `dir = "/"`.
    #[serde(rename = "policy")]
    pub policies: Vec<LegacyPolicy>,
    /// KMS keys no policy names any more, kept so that files wrapped under
    /// them before a policy change still open.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<KmsConfig>,
}

impl LegacyConfig {
    /// Reads `backing`'s configuration if it is format 1.
    pub fn load(backing: &Path) -> Result<Self, ConfigError> {
        let path = backing.join(CONFIG_FILE);
        let Some(text) = read_untrusted(&path)? else {
            return Err(ConfigError::NotInitialized(backing.to_owned()));
        };
        let invalid = |detail: String| ConfigError::Invalid {
            path: path.clone(),
            detail,
        };
        let cfg: LegacyConfig = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if cfg.format_version != 1 {
            return Err(invalid(format!(
                "format_version {} is not format 1",
                cfg.format_version
            )));
        }
        BlockGeometry::from_size(cfg.block_size, BlockLayout::V1)
            .map_err(|e| invalid(e.to_string()))?;
        if !cfg.policies.iter().any(|p| p.dir == "/")
            || cfg
                .policies
                .iter()
                .any(|p| normalize_dir(&p.dir).as_deref() != Ok(p.dir.as_str()))
        {
            return Err(invalid(
                "policies are not valid (no root policy, or a bad directory)".into(),
            ));
        }
        Ok(cfg)
    }

    /// Index of the policy governing mount-relative `path`.
    pub fn governing(&self, path: &str) -> usize {
        governing_by(self.policies.iter().map(|p| p.dir.as_str()), path)
    }

    /// Every KMS key the configuration names, without duplicates, policies'
    /// keys first.
    pub fn all_kms(&self) -> Vec<&KmsConfig> {
        let mut out: Vec<&KmsConfig> = Vec::new();
        for k in self.policies.iter().map(|p| &p.kms).chain(&self.retired) {
            if !out.contains(&k) {
                out.push(k);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_format_1_configuration() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            r#"format_version = 1
block_size = 4096
[[policy]]
dir = "/"
cipher = "aes-256-gcm"
[policy.kms]
provider = "local"
key_file = "/etc/kmsfs/keys"
key = "default"
[[retired]]
provider = "local"
key_file = "/etc/kmsfs/keys"
key = "old"
"#,
        )
        .unwrap();
        let cfg = LegacyConfig::load(dir.path()).unwrap();
        assert_eq!(cfg.all_kms().len(), 2);
        assert_eq!(cfg.governing("/x"), 0);
        assert!(cfg.policies[0].mandatory);
    }
}
