//! The trusted configuration: where KMS keys live and how to reach them.
//!
//! It is the mount side's file, `/etc/kmsfs/kmsfs.toml` unless `--config`
//! or `KMSFS_CONFIG` names another, and it is the only place that says
//! which addresses, endpoints, keyring files and credential sources kmsfs
//! may use. The backing directory is untrusted: its volume configuration
//! names providers from here by name, plus a key in them, and nothing else
//! (`config::volume`). So nobody who can write the backing directory can
//! point kmsfs at another server, keyring or credential.
//!
//! ```toml
//! [providers.local]
//! type = "local"
//! key_file = "/etc/kmsfs/keys"
//!
//! [providers.prod-vault]
//! type = "vault"
//! address = "https://vault.example:8200"
//! auth = { method = "approle", role_id = "...", secret_id_file = "/etc/kmsfs/secret-id" }
//! ```
//!
//! `[mount]` holds defaults for `kmsfs mount` (`threads = 16`, `options =
//! ["allow_other"]`); see docs/MOUNTING.md.
//!
//! The file is refused unless it and its directory belong to root or to the
//! user running kmsfs, and neither is writable by group or others. A
//! provider is checked only when a volume uses it, so a stale entry for
//! another volume never stops a mount.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::kms::config::{KeySpec, KmsConfig, ProviderDef};

/// Where the trusted configuration is unless told otherwise.
pub const DEFAULT_PATH: &str = "/etc/kmsfs/kmsfs.toml";
/// The environment variable that names another one.
pub const PATH_ENV: &str = "KMSFS_CONFIG";
/// A trusted configuration is small; anything larger is refused.
const MAX_LEN: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TrustedError {
    #[error("the trusted configuration {0} does not exist; `kmsfs init` creates it (or set {PATH_ENV} / --config to the one you use)")]
    Missing(PathBuf),
    #[error("the trusted configuration {path} is not safe to use: {why}; it says where keys live, so only root or its owner may change it")]
    Unsafe { path: PathBuf, why: String },
    #[error("the trusted configuration {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the trusted configuration {path} is not valid: {detail}")]
    Invalid { path: PathBuf, detail: String },
    #[error("no provider {name:?} in the trusted configuration {path}; define it there as [providers.{name}] (see `kmsfs providers list`), or check the name")]
    UnknownProvider { path: PathBuf, name: String },
    #[error("provider {name:?} in {path}: {detail}")]
    BadProvider {
        path: PathBuf,
        name: String,
        detail: String,
    },
}

/// The parsed trusted configuration.
#[derive(Clone, Debug, Default)]
pub struct TrustedConfig {
    path: PathBuf,
    providers: BTreeMap<String, ProviderDef>,
    /// Where key operations are logged (`audit_log = "/var/log/kmsfs/audit.jsonl"`).
    audit_log: Option<PathBuf>,
    /// `[mount]`: settings for `kmsfs mount` (`threads = 8`, `options =
    /// ["allow_other"]`), checked by the command, which also takes them from
    /// its command line and environment.
    mount: toml::Table,
}

/// The file's layout on disk.
#[derive(serde::Serialize, serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct OnDisk {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    audit_log: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    mount: toml::Table,
    #[serde(default)]
    providers: BTreeMap<String, toml::Table>,
}

/// Whether `name` may name a provider: 1-64 letters, digits, '.', '_', '-'.
pub fn valid_provider_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl TrustedConfig {
    /// The path to use: `explicit` (`--config`), else `$KMSFS_CONFIG`, else
    /// [`DEFAULT_PATH`].
    pub fn locate(explicit: Option<&Path>) -> PathBuf {
        match explicit {
            Some(p) => p.to_owned(),
            None => match std::env::var_os(PATH_ENV) {
                Some(p) if !p.is_empty() => PathBuf::from(p),
                _ => PathBuf::from(DEFAULT_PATH),
            },
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads `path`, refusing a file or directory others could change.
    pub fn load(path: &Path) -> Result<Self, TrustedError> {
        match Self::read(path)? {
            Some(text) => Self::parse(path, &text),
            None => Err(TrustedError::Missing(path.to_owned())),
        }
    }

    /// Like [`load`](Self::load), but an absent file is an empty
    /// configuration (for commands that add providers to it).
    pub fn load_or_empty(path: &Path) -> Result<Self, TrustedError> {
        match Self::read(path)? {
            Some(text) => Self::parse(path, &text),
            None => Ok(Self {
                path: path.to_owned(),
                ..Default::default()
            }),
        }
    }

    /// The file's text after the ownership and mode checks, or None if it
    /// does not exist.
    fn read(path: &Path) -> Result<Option<String>, TrustedError> {
        let io = |source| TrustedError::Io {
            path: path.to_owned(),
            source,
        };
        let unsafe_ = |why: String| TrustedError::Unsafe {
            path: path.to_owned(),
            why,
        };
        let f = match crate::safe_open::open_no_follow(path) {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(unsafe_("it is a symbolic link".into()))
            }
            Err(e) => return Err(io(e)),
        };
        let meta = f.metadata().map_err(io)?;
        check_owner_and_mode(&meta, "the file").map_err(unsafe_)?;
        if !meta.is_file() {
            return Err(unsafe_("it is not a regular file".into()));
        }
        if meta.len() > MAX_LEN {
            return Err(unsafe_(format!("it is larger than {MAX_LEN} bytes")));
        }
        let dir = crate::safe_open::parent_of(path);
        let dir_meta = std::fs::metadata(dir).map_err(io)?;
        check_owner_and_mode(&dir_meta, &format!("its directory {}", dir.display()))
            .map_err(unsafe_)?;
        let mut text = String::new();
        f.take(MAX_LEN).read_to_string(&mut text).map_err(io)?;
        Ok(Some(text))
    }

    /// Parses the text of the trusted configuration found at `path` (no
    /// ownership checks: [`load`](Self::load) makes them).
    pub(crate) fn parse(path: &Path, text: &str) -> Result<Self, TrustedError> {
        let invalid = |detail: String| TrustedError::Invalid {
            path: path.to_owned(),
            detail,
        };
        let file: OnDisk = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let mut providers = BTreeMap::new();
        for (name, mut table) in file.providers {
            if !valid_provider_name(&name) {
                return Err(invalid(format!(
                    "provider name {name:?}: use 1-64 letters, digits, '.', '_' or '-'"
                )));
            }
            let kind = match table.remove("type") {
                Some(toml::Value::String(k)) => k,
                _ => {
                    return Err(invalid(format!(
                        "[providers.{name}] needs type = \"local\", \"vault\", \"aws\", \"azure\" or \"gcp\""
                    )))
                }
            };
            providers.insert(
                name,
                ProviderDef {
                    kind,
                    settings: table,
                },
            );
        }
        if file.audit_log.as_ref().is_some_and(|p| !p.is_absolute()) {
            return Err(invalid("audit_log must be an absolute path".into()));
        }
        Ok(Self {
            path: path.to_owned(),
            providers,
            audit_log: file.audit_log,
            mount: file.mount,
        })
    }

    /// The audit log file this configuration names, if any.
    pub fn audit_log(&self) -> Option<&Path> {
        self.audit_log.as_deref()
    }

    /// The `[mount]` table, as written.
    pub fn mount_settings(&self) -> &toml::Table {
        &self.mount
    }

    /// The provider definitions, by name.
    pub fn providers(&self) -> &BTreeMap<String, ProviderDef> {
        &self.providers
    }

    /// The full settings of key `key`: its provider's definition with the
    /// key filled in. Checked here, when a volume uses it.
    pub fn resolve(&self, key: &KeySpec) -> Result<KmsConfig, TrustedError> {
        let def =
            self.providers
                .get(&key.provider)
                .ok_or_else(|| TrustedError::UnknownProvider {
                    path: self.path.clone(),
                    name: key.provider.clone(),
                })?;
        def.resolve(key)
            .map_err(|detail| TrustedError::BadProvider {
                path: self.path.clone(),
                name: key.provider.clone(),
                detail,
            })
    }

    /// The name of a provider defined exactly as `def`, adding it (as
    /// `preferred`, or a name made from its type) when there is none.
    /// Returns the name and whether it was added.
    pub fn find_or_add(
        &mut self, def: ProviderDef, preferred: Option<&str>,
    ) -> Result<(String, bool), TrustedError> {
        if let Some(name) = preferred {
            if !valid_provider_name(name) {
                return Err(TrustedError::Invalid {
                    path: self.path.clone(),
                    detail: format!(
                        "provider name {name:?}: use 1-64 letters, digits, '.', '_' or '-'"
                    ),
                });
            }
            return match self.providers.get_mut(name) {
                Some(existing) => {
                    if adopt(existing, &def) {
                        Ok((name.to_owned(), false))
                    } else {
                        Err(TrustedError::BadProvider {
                            path: self.path.clone(),
                            name: name.to_owned(),
                            detail: "is already defined with other settings; choose another name, or use it as it is with --provider".into(),
                        })
                    }
                }
                None => {
                    self.providers.insert(name.to_owned(), def);
                    Ok((name.to_owned(), true))
                }
            };
        }
        for (name, existing) in self.providers.iter_mut() {
            if adopt(existing, &def) {
                return Ok((name.clone(), false));
            }
        }
        let name = (1..)
            .map(|i| match i {
                1 => def.kind.clone(),
                i => format!("{}-{i}", def.kind),
            })
            .find(|n| !self.providers.contains_key(n))
            .expect("some suffix is free");
        self.providers.insert(name.clone(), def);
        Ok((name, true))
    }

    /// Writes the configuration back (atomically: a new temporary file,
    /// fsync, rename), creating its directory if missing. Comments in the
    /// old file are not kept.
    pub fn save(&self) -> Result<(), TrustedError> {
        let io = |source| TrustedError::Io {
            path: self.path.clone(),
            source,
        };
        let file = OnDisk {
            audit_log: self.audit_log.clone(),
            mount: self.mount.clone(),
            providers: self
                .providers
                .iter()
                .map(|(name, def)| {
                    let mut t = toml::Table::new();
                    t.insert("type".into(), toml::Value::String(def.kind.clone()));
                    t.extend(def.settings.clone());
                    (name.clone(), t)
                })
                .collect(),
        };
        let text = format!(
            "# kmsfs trusted configuration: where KMS keys live and how to reach them.\n\
             # Only root (or this file's owner) may change it; kmsfs refuses it otherwise.\n\
             # Volumes (backing directories) refer to these providers by name.\n\n{}",
            toml::to_string_pretty(&file).map_err(|e| TrustedError::Invalid {
                path: self.path.clone(),
                detail: e.to_string(),
            })?
        );
        let dir = crate::safe_open::parent_of(&self.path);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(io)?;
        crate::safe_open::write_atomically(&self.path, text.as_bytes(), 0o644).map_err(io)
    }
}

/// Runs `change` on the trusted configuration at `path` (empty if absent)
/// and saves it, holding an exclusive lock so that two commands never lose
/// each other's providers.
pub fn update<T>(
    path: &Path, change: impl FnOnce(&mut TrustedConfig) -> Result<T, TrustedError>,
) -> Result<T, TrustedError> {
    let io = |source| TrustedError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = crate::safe_open::parent_of(path);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(io)?;
    let _lock = crate::safe_open::lock_beside(path).map_err(io)?;
    let mut cfg = TrustedConfig::load_or_empty(path)?;
    let out = change(&mut cfg)?;
    cfg.save()?;
    Ok(out)
}

/// Owned by root or by us, and not writable by group or others.
fn check_owner_and_mode(meta: &std::fs::Metadata, what: &str) -> Result<(), String> {
    let me = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != me {
        return Err(format!(
            "{what} belongs to uid {}, neither root nor you (uid {me})",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{what} is writable by group or others (mode {:o}); run chmod go-w on it",
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Whether `existing` serves as `def`: defined exactly alike, or alike but
/// for the AWS `account` that `def` adds (a definition recorded before
/// accounts were, met again when the operator types a key ARN), which is
/// then filled in.
fn adopt(existing: &mut ProviderDef, def: &ProviderDef) -> bool {
    if existing == def {
        return true;
    }
    let Some(account) = def.settings.get("account") else {
        return false;
    };
    let mut without = def.clone();
    without.settings.remove("account");
    if *existing != without {
        return false;
    }
    existing.settings.insert("account".into(), account.clone());
    true
}

use std::os::unix::fs::DirBuilderExt;

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn local_def(file: &str) -> ProviderDef {
        let mut settings = toml::Table::new();
        settings.insert("key_file".into(), toml::Value::String(file.into()));
        ProviderDef {
            kind: "local".into(),
            settings,
        }
    }

    /// An AWS definition recorded without `account` is reused, and gets
    /// the account, when the operator types a key ARN of that account.
    #[test]
    fn a_definition_without_an_account_adopts_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kmsfs.toml");
        let aws = |account: Option<&str>| {
            let mut settings = toml::Table::new();
            settings.insert("region".into(), "eu-west-1".into());
            if let Some(a) = account {
                settings.insert("account".into(), a.into());
            }
            ProviderDef {
                kind: "aws".into(),
                settings,
            }
        };
        let got = update(&path, |t| {
            let old = t.find_or_add(aws(None), None)?;
            let typed = t.find_or_add(aws(Some("111122223333")), None)?;
            let other = t.find_or_add(aws(Some("999988887777")), None)?;
            Ok((old, typed, other))
        })
        .unwrap();
        assert_eq!(got.0, ("aws".into(), true));
        assert_eq!(got.1, ("aws".into(), false));
        assert_eq!(
            got.2,
            ("aws-2".into(), true),
            "another account is another provider"
        );
        let t = TrustedConfig::load(&path).unwrap();
        assert_eq!(t.providers["aws"], aws(Some("111122223333")));
    }

    #[test]
    fn providers_are_found_added_and_resolved_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kmsfs.toml");
        let added = update(&path, |t| {
            let a = t.find_or_add(local_def("/k/a"), None)?;
            let again = t.find_or_add(local_def("/k/a"), None)?;
            let b = t.find_or_add(local_def("/k/b"), None)?;
            let named = t.find_or_add(local_def("/k/c"), Some("mine"))?;
            Ok((a, again, b, named))
        })
        .unwrap();
        assert_eq!(added.0, ("local".into(), true));
        assert_eq!(
            added.1,
            ("local".into(), false),
            "alike definitions are reused"
        );
        assert_eq!(added.2, ("local-2".into(), true));
        assert_eq!(added.3, ("mine".into(), true));
        let t = TrustedConfig::load(&path).unwrap();
        let key = KeySpec {
            provider: "local-2".into(),
            id: "k".into(),
            version: None,
        };
        assert_eq!(
            t.resolve(&key).unwrap(),
            KmsConfig::Local {
                key_file: "/k/b".into(),
                key: "k".into()
            }
        );
        let missing = KeySpec {
            provider: "nope".into(),
            ..key
        };
        assert!(matches!(
            t.resolve(&missing),
            Err(TrustedError::UnknownProvider { .. })
        ));
        // Another definition under a taken name is refused.
        let taken = update(&path, |t| t.find_or_add(local_def("/k/d"), Some("mine")));
        assert!(matches!(taken, Err(TrustedError::BadProvider { .. })));
    }

    #[test]
    fn the_mount_table_survives_a_rewrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kmsfs.toml");
        std::fs::write(&path, "[mount]\nthreads = 4\noptions = [\"allow_other\"]\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        update(&path, |t| t.find_or_add(local_def("/k/a"), None)).unwrap();
        let t = TrustedConfig::load(&path).unwrap();
        assert_eq!(t.mount_settings()["threads"].as_integer(), Some(4));
        assert!(t.providers().contains_key("local"));
    }

    #[test]
    fn a_provider_may_not_name_a_key_and_bad_entries_wait_until_used() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kmsfs.toml");
        std::fs::write(
            &path,
            "[providers.ok]\ntype = \"local\"\nkey_file = \"/k\"\n\
             [providers.keyed]\ntype = \"local\"\nkey_file = \"/k\"\nkey = \"x\"\n\
             [providers.odd]\ntype = \"local\"\nkey_file = 7\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let t = TrustedConfig::load(&path).unwrap();
        let spec = |p: &str| KeySpec {
            provider: p.into(),
            id: "default".into(),
            version: None,
        };
        assert!(t.resolve(&spec("ok")).is_ok(), "stale entries stop nothing");
        let e = t.resolve(&spec("keyed")).unwrap_err().to_string();
        assert!(e.contains("sets `key`"), "{e}");
        assert!(t.resolve(&spec("odd")).is_err());
    }
}
