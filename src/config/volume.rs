//! The volume configuration: `.kmsfs-config.toml` in the backing directory.
//!
//! It holds what the volume's owner decides (block size, directory
//! policies: which key and cipher protect new files under which directory,
//! and which older keys that directory's files may still be under) and
//! nothing about where keys live: policies name keys as (provider name, key
//! ID), and providers are defined only in the trusted configuration
//! (`config::trusted`).
//!
//! The backing directory is untrusted, so the file is authenticated: an
//! HMAC-SHA256 over its contents under a random 256-bit volume key, which
//! the root policy's KMS key wraps (bound to the volume's ID) and which is
//! stored beside the MAC. Changing a policy, flipping `mandatory`, adding a
//! policy or dropping an old key without that KMS key makes every mount and
//! command refuse the volume; being able to use the root key is what
//! authorises a policy change. See docs/FORMAT.md section 6.

use std::io::Read;
use std::path::{Path, PathBuf};

use base64::Engine;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::ConfigError;
use crate::crypto::Dek;
use crate::format::block::BlockLayout;
use crate::format::names::CONFIG_FILE;
use crate::format::{BlockGeometry, KeyRef, WrappedDek};
use crate::kms::WrapContext;
use crate::policy::{governing, normalize_dir, Policy};
use crate::safe_open::{lock_beside, write_atomically};

/// The configuration format this kmsfs writes and reads.
pub const CONFIG_FORMAT: u32 = 2;
/// A volume configuration is small; anything larger is refused.
const MAX_LEN: u64 = 1 << 20;
const MAC_DOMAIN: &[u8] = b"kmsfs volume config v2\0";
const MAC_KEY_INFO: &[u8] = b"kmsfs volume config mac";

/// Settings that say where a key lives or how to log in to a KMS. Found in a
/// volume configuration, they mean it was written for kmsfs 1 or edited by
/// hand; kmsfs refuses to take them from the backing directory.
const KMS_SETTINGS: &[&str] = &[
    "kms",
    "key_file",
    "address",
    "endpoint",
    "vault_url",
    "region",
    "profile",
    "assume_role_arn",
    "external_id",
    "auth",
    "role_id",
    "secret_id_file",
    "jwt_file",
    "ca_cert",
    "client_cert",
    "client_key",
    "credentials_file",
    "skip_verify",
    "allow_http",
    "namespace",
    "mount",
    "project",
    "location",
    "key_ring",
    "timeout_secs",
];

/// The wrapped volume key: wrapped by the root policy's current key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WrappedVolumeKey {
    /// The key reference the KMS returned with the wrap.
    pub provider: String,
    pub key_id: String,
    #[serde(default)]
    pub key_version: String,
    /// The wrapped key, base64.
    pub wrapped: String,
}

/// The volume configuration as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    pub format_version: u32,
    /// 16 random bytes, hex: bound into every key wrap of this volume.
    pub volume_id: String,
    /// Plaintext block size in bytes, for every file of this volume: a
    /// file's size follows from its ciphertext size without its header.
    pub block_size: u64,
    /// Files of format 1 (created before this volume was upgraded) may be
    /// present; their headers are accepted, their sizes read from them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub legacy_v1_files: bool,
    /// Key policies by directory; exactly one has `dir = "/"`.
    #[serde(rename = "policy")]
    pub policies: Vec<Policy>,
    pub volume_key: WrappedVolumeKey,
    /// HMAC-SHA256 of everything above, hex (see the module documentation).
    pub mac: String,
}

/// Lock `BASE.lock` in the backing root, without waiting.
fn try_lock_root(
    backing: &Path, base: &str, shared: bool,
) -> Result<Option<std::fs::File>, ConfigError> {
    crate::safe_open::try_lock_beside(&backing.join(base), shared).map_err(|source| {
        ConfigError::Io {
            path: backing.join(format!("{base}.lock")),
            source,
        }
    })
}

/// A volume's random ID.
pub type VolumeId = [u8; 16];

impl VolumeConfig {
    pub fn path(backing: &Path) -> PathBuf {
        backing.join(CONFIG_FILE)
    }

    /// An exclusive lock that commands changing `backing`'s configuration
    /// hold from reading it to writing it back, so that two changes never
    /// lose one another (held until the returned file drops).
    pub fn lock(backing: &Path) -> Result<std::fs::File, ConfigError> {
        let path = Self::path(backing);
        lock_beside(&path).map_err(|source| ConfigError::Io { path, source })
    }

    /// The volume lock of `backing` (`names::VOLUME_LOCK_BASE`), without
    /// waiting: shared for a mount, exclusive for `kmsfs fsck --repair`.
    /// `None` when it is held in a way that excludes this one.
    pub fn try_lock_volume(
        backing: &Path, shared: bool,
    ) -> Result<Option<std::fs::File>, ConfigError> {
        try_lock_root(backing, crate::format::names::VOLUME_LOCK_BASE, shared)
    }

    /// Mount lock `base` of `backing` (`names::MOUNT_LOCK_BASE` and its
    /// two companions; see `cli::mount_claim`), without waiting. `None`
    /// when it is held in a way that excludes this one.
    pub fn try_lock_mounts(
        backing: &Path, base: &str, shared: bool,
    ) -> Result<Option<std::fs::File>, ConfigError> {
        try_lock_root(backing, base, shared)
    }

    pub fn id(&self) -> VolumeId {
        let mut id = [0u8; 16];
        hex::decode_to_slice(&self.volume_id, &mut id).expect("validated on load");
        id
    }

    pub fn geometry_shift(&self) -> u8 {
        BlockGeometry::from_size(self.block_size, BlockLayout::V2)
            .expect("validated on load")
            .shift()
    }

    /// The root directory's policy.
    pub fn root(&self) -> &Policy {
        &self.policies[governing(&self.policies, "/")]
    }

    /// The policy governing mount-relative `path`.
    pub fn policy_for(&self, path: &str) -> &Policy {
        &self.policies[governing(&self.policies, path)]
    }

    /// The context the volume key is wrapped under.
    pub fn volume_key_context(&self) -> WrapContext {
        WrapContext::volume_key(self.id())
    }

    /// The wrapped volume key as a KMS takes it back.
    pub fn wrapped_volume_key(&self) -> Result<WrappedDek, ConfigError> {
        let k = &self.volume_key;
        Ok(WrappedDek {
            key_ref: KeyRef {
                provider: k.provider.clone(),
                key_id: k.key_id.clone(),
                key_version: k.key_version.clone(),
            },
            blob: base64::engine::general_purpose::STANDARD
                .decode(&k.wrapped)
                .map_err(|_| self.invalid_here("volume_key.wrapped is not base64"))?,
        })
    }

    /// Records `wrapped` (the volume key as the root key wrapped it).
    pub fn set_wrapped_volume_key(&mut self, wrapped: &WrappedDek) {
        self.volume_key = WrappedVolumeKey {
            provider: wrapped.key_ref.provider.clone(),
            key_id: wrapped.key_ref.key_id.clone(),
            key_version: wrapped.key_ref.key_version.clone(),
            wrapped: base64::engine::general_purpose::STANDARD.encode(&wrapped.blob),
        };
    }

    fn invalid_here(&self, detail: &str) -> ConfigError {
        ConfigError::Invalid {
            path: PathBuf::from(CONFIG_FILE),
            detail: detail.into(),
        }
    }

    /// The bytes the MAC covers: a domain label and the canonical JSON of
    /// every field but the MAC (object keys sorted, no whitespace).
    fn mac_input(&self) -> Vec<u8> {
        let mut v = serde_json::to_value(self).expect("the configuration serializes");
        v.as_object_mut()
            .expect("a struct serializes to an object")
            .remove("mac");
        let mut out = MAC_DOMAIN.to_vec();
        out.extend_from_slice(&canonical_json(&v));
        out
    }

    fn mac_with(&self, volume_key: &Dek) -> Hmac<Sha256> {
        let hk = Hkdf::<Sha256>::new(Some(&self.id()), volume_key.as_bytes());
        let mut key = zeroize::Zeroizing::new([0u8; 32]);
        hk.expand(MAC_KEY_INFO, &mut key[..])
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&key[..]).expect("HMAC takes any key length");
        mac.update(&self.mac_input());
        mac
    }

    /// Computes and records the MAC under `volume_key`.
    pub fn seal(&mut self, volume_key: &Dek) {
        self.mac = hex::encode(self.mac_with(volume_key).finalize().into_bytes());
    }

    /// Checks the MAC under `volume_key` (constant time).
    pub fn verify(&self, volume_key: &Dek, path: &Path) -> Result<(), ConfigError> {
        let tag = hex::decode(&self.mac).map_err(|_| ConfigError::Tampered(path.to_owned()))?;
        self.mac_with(volume_key)
            .verify_slice(&tag)
            .map_err(|_| ConfigError::Tampered(path.to_owned()))
    }

    /// Reads and checks the structure of the volume configuration of
    /// `backing` (not its MAC: that needs the KMS, see `Volume::open`).
    pub fn load(backing: &Path) -> Result<Self, ConfigError> {
        if !backing.is_dir() {
            return Err(ConfigError::NoBacking(backing.to_owned()));
        }
        let path = Self::path(backing);
        let Some(text) = read_untrusted(&path)? else {
            return Err(ConfigError::NotInitialized(backing.to_owned()));
        };
        Self::parse(&path, &text)
    }

    /// Parses the text of a volume configuration found at `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let invalid = |detail: String| ConfigError::Invalid {
            path: path.to_owned(),
            detail,
        };
        let value: toml::Table = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        match value.get("format_version").and_then(toml::Value::as_integer) {
            Some(1) => return Err(ConfigError::FormatOne(path.to_owned())),
            Some(v) if v == i64::from(CONFIG_FORMAT) => {}
            Some(v) => {
                return Err(invalid(format!(
                    "format_version {v} is not supported (this kmsfs reads {CONFIG_FORMAT}); upgrade kmsfs"
                )))
            }
            None => return Err(invalid("no format_version".into())),
        }
        if let Some(field) = find_kms_setting(&toml::Value::Table(value)) {
            return Err(ConfigError::KmsSettingInVolume {
                path: path.to_owned(),
                field,
            });
        }
        let cfg: VolumeConfig = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |detail: String| ConfigError::Invalid {
            path: path.to_owned(),
            detail,
        };
        let mut id = [0u8; 16];
        hex::decode_to_slice(&self.volume_id, &mut id)
            .map_err(|_| invalid("volume_id must be 32 hex digits".into()))?;
        BlockGeometry::from_size(self.block_size, BlockLayout::V2)
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
            for k in std::iter::once(&p.key).chain(&p.retired) {
                if !super::trusted::valid_provider_name(&k.provider) || k.id.is_empty() {
                    return Err(invalid(format!(
                        "policy {:?} names key {k}, which is not a valid provider name and key ID",
                        p.dir
                    )));
                }
            }
        }
        if !dirs.contains("/") {
            return Err(invalid("no policy for the root directory \"/\"".into()));
        }
        Ok(())
    }

    /// Writes the configuration atomically (a temporary file created
    /// exclusively without following symlinks, fsync, rename). `new`: the
    /// volume is being created, so an existing configuration is an error.
    pub fn save(&self, backing: &Path, new: bool) -> Result<(), ConfigError> {
        let path = Self::path(backing);
        self.validate(&path)?;
        if new && std::fs::symlink_metadata(&path).is_ok() {
            return Err(ConfigError::AlreadyInitialized(backing.to_owned()));
        }
        let text = format!(
            "# kmsfs volume configuration, authenticated: change it only with `kmsfs policy`.\n\
             # KMS settings (addresses, keyrings, credentials) live in the trusted\n\
             # configuration (/etc/kmsfs/kmsfs.toml), never here.\n{}",
            toml::to_string_pretty(self).expect("the configuration serializes")
        );
        write_atomically(&path, text.as_bytes(), 0o644).map_err(|source| ConfigError::Io {
            path: path.clone(),
            source,
        })
    }
}

/// The first setting in `v` (at any depth) that belongs in the trusted
/// configuration, not in a volume's.
fn find_kms_setting(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::Table(t) => t.iter().find_map(|(k, v)| {
            if KMS_SETTINGS.contains(&k.as_str()) {
                Some(k.clone())
            } else {
                find_kms_setting(v)
            }
        }),
        toml::Value::Array(a) => a.iter().find_map(find_kms_setting),
        _ => None,
    }
}

/// JSON with object keys sorted and no whitespace, whatever order the
/// serializer keeps: the bytes a MAC covers must not depend on it.
fn canonical_json(v: &serde_json::Value) -> Vec<u8> {
    match v {
        serde_json::Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let mut out = b"{".to_vec();
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(&serde_json::to_vec(k).expect("a string serializes"));
                out.push(b':');
                out.extend_from_slice(&canonical_json(&m[k]));
            }
            out.push(b'}');
            out
        }
        serde_json::Value::Array(a) => {
            let mut out = b"[".to_vec();
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(&canonical_json(x));
            }
            out.push(b']');
            out
        }
        other => serde_json::to_vec(other).expect("a JSON value serializes"),
    }
}

/// The text of a configuration file in the backing directory, or None if
/// there is none: not through a symlink, a regular file, at most 1 MiB.
pub(super) fn read_untrusted(path: &Path) -> Result<Option<String>, ConfigError> {
    let io = |source| ConfigError::Io {
        path: path.to_owned(),
        source,
    };
    let Some(f) = crate::safe_open::open_no_follow(path).map_err(io)? else {
        return Ok(None);
    };
    if !f.metadata().map_err(io)?.is_file() {
        return Err(ConfigError::Invalid {
            path: path.to_owned(),
            detail: "not a regular file".into(),
        });
    }
    let mut text = String::new();
    f.take(MAX_LEN + 1).read_to_string(&mut text).map_err(io)?;
    if text.len() as u64 > MAX_LEN {
        return Err(ConfigError::Invalid {
            path: path.to_owned(),
            detail: format!("larger than {MAX_LEN} bytes"),
        });
    }
    Ok(Some(text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::CipherSuite;

    fn config() -> VolumeConfig {
        VolumeConfig {
            format_version: CONFIG_FORMAT,
            volume_id: hex::encode([3u8; 16]),
            block_size: 4096,
            legacy_v1_files: false,
            policies: vec![Policy::new(
                "/".into(),
                CipherSuite::Aes256Gcm,
                true,
                crate::kms::config::KeySpec {
                    provider: "local".into(),
                    id: "default".into(),
                    version: None,
                },
            )],
            volume_key: WrappedVolumeKey {
                provider: "local".into(),
                key_id: "default".into(),
                key_version: "1".into(),
                wrapped: "AAAA".into(),
            },
            mac: String::new(),
        }
    }

    #[test]
    fn the_mac_covers_every_field_and_survives_a_round_trip() {
        let key = Dek::generate();
        let mut cfg = config();
        cfg.seal(&key);
        let p = Path::new("c");
        cfg.verify(&key, p).unwrap();
        let text = toml::to_string_pretty(&cfg).unwrap();
        let back = VolumeConfig::parse(p, &text).unwrap();
        back.verify(&key, p).unwrap();
        assert!(cfg.verify(&Dek::generate(), p).is_err(), "another key");
        let changes: [fn(&mut VolumeConfig); 8] = [
            |c| c.block_size = 8192,
            |c| c.legacy_v1_files = true,
            |c| c.policies[0].mandatory = false,
            |c| c.policies[0].cipher = CipherSuite::ChaCha20Poly1305,
            |c| c.policies[0].key.id = "other".into(),
            |c| {
                let k = c.policies[0].key.clone();
                c.policies[0].retired.push(k)
            },
            |c| c.volume_id = hex::encode([4u8; 16]),
            |c| c.volume_key.key_version = "2".into(),
        ];
        for change in changes {
            let mut c = cfg.clone();
            change(&mut c);
            assert!(matches!(c.verify(&key, p), Err(ConfigError::Tampered(_))));
        }
    }

    #[test]
    fn kms_settings_and_format_1_are_refused_with_advice() {
        let p = Path::new("c");
        let mut cfg = config();
        cfg.seal(&Dek::generate());
        let text = toml::to_string_pretty(&cfg).unwrap();
        let evil = text.replacen("[policy.key]", "address = \"http://x\"\n[policy.key]", 1);
        assert!(matches!(
            VolumeConfig::parse(p, &evil),
            Err(ConfigError::KmsSettingInVolume { field, .. }) if field == "address"
        ));
        let old = text.replacen("format_version = 2", "format_version = 1", 1);
        assert!(matches!(
            VolumeConfig::parse(p, &old),
            Err(ConfigError::FormatOne(_))
        ));
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_depth() {
        let v = serde_json::json!({"b": 1, "a": {"d": [2, {"f": 3, "e": 4}], "c": "x"}});
        assert_eq!(
            String::from_utf8(canonical_json(&v)).unwrap(),
            r#"{"a":{"c":"x","d":[2,{"e":4,"f":3}]},"b":1}"#
        );
    }
}
