//! The embedded local KMS: a keyring file of versioned 256-bit KEKs kept
//! outside the backing directory.
//!
//! Keyring file (mode 0600, refused if group/others can read it):
//! ```text
//! kmsfs-keyring v1
//! key NAME VERSION BASE64(32 bytes)
//! ```
//! Wrapped DEK = nonce (12) || AES-256-GCM(KEK, DEK) (32) || tag (16), with the
//! key name, version and wrap context as associated data.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use async_trait::async_trait;
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use base64::Engine;
use rand::RngCore;
use zeroize::Zeroizing;

use super::support::ensure_handles;
use super::{KeyProvider, KeyRef, KmsError, WrapContext, WrappedDek};
use crate::crypto::{Dek, DEK_LEN};

const HEADER_LINE: &str = "kmsfs-keyring v1";
const PROVIDER: &str = "local";

/// Errors reading or writing a keyring file.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("key file {0} does not exist; create it with `kmsfs keys create --key-file {0}` (or `kmsfs init`)")]
    Missing(PathBuf),
    #[error("key file {path} is readable or writable by group/others (mode {mode:o}); run `chmod 600 {path}`")]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("key file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("key file {path} line {line}: {what}")]
    Malformed {
        path: PathBuf,
        line: usize,
        what: String,
    },
    #[error("key file {path} has no key named {name:?}; create it with `kmsfs keys create --key-file {path} --name {name}`")]
    NoSuchKey { path: PathBuf, name: String },
    #[error("key file {path} already has a key named {name:?}; use `kmsfs keys rotate` to add a version")]
    KeyExists { path: PathBuf, name: String },
}

/// One key-encryption key. Zeroized on drop; no Debug.
struct Kek {
    /// The key bytes, kept only to write the keyring back.
    raw: Zeroizing<[u8; 32]>,
    /// Its AEAD context (key schedule), built once rather than per wrap and
    /// unwrap; aws-lc cleanses it when dropped.
    cipher: LessSafeKey,
}

impl Kek {
    fn new(raw: Zeroizing<[u8; 32]>) -> Self {
        let cipher =
            LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &raw[..]).expect("32-byte KEK"));
        Self { raw, cipher }
    }
}

/// The parsed keyring: key name -> version -> KEK.
pub struct Keyring {
    path: PathBuf,
    keys: BTreeMap<String, BTreeMap<u32, Kek>>,
}

/// A key's public facts, for `kmsfs keys list`.
#[derive(Debug, serde::Serialize)]
pub struct KeyInfo {
    pub name: String,
    pub versions: Vec<u32>,
}

impl Keyring {
    /// Loads `path`, refusing a file that group or others may read.
    pub fn load(path: &Path) -> Result<Self, KeyringError> {
        let io = |source| KeyringError::Io {
            path: path.to_owned(),
            source,
        };
        let meta = match fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(KeyringError::Missing(path.to_owned()))
            }
            Err(e) => return Err(io(e)),
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyringError::TooOpen {
                path: path.to_owned(),
                mode,
            });
        }
        let text = Zeroizing::new(fs::read_to_string(path).map_err(io)?);
        Self::parse(path, &text)
    }

    fn parse(path: &Path, text: &str) -> Result<Self, KeyringError> {
        let bad = |line: usize, what: &str| KeyringError::Malformed {
            path: path.to_owned(),
            line,
            what: what.to_owned(),
        };
        let mut lines = text.lines().enumerate();
        match lines.next() {
            Some((_, l)) if l.trim() == HEADER_LINE => {}
            _ => {
                return Err(bad(
                    1,
                    "not a kmsfs keyring (first line must be `kmsfs-keyring v1`)",
                ))
            }
        }
        let mut keys: BTreeMap<String, BTreeMap<u32, Kek>> = BTreeMap::new();
        for (i, line) in lines {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let parts: Vec<&str> = line.split_whitespace().collect();
            if parts.len() != 4 || parts[0] != "key" {
                return Err(bad(i + 1, "expected `key NAME VERSION BASE64`"));
            }
            let version: u32 = parts[2]
                .parse()
                .map_err(|_| bad(i + 1, "version is not a number"))?;
            let mut raw = Zeroizing::new(Vec::with_capacity(48));
            base64::engine::general_purpose::STANDARD
                .decode_vec(parts[3], &mut raw)
                .map_err(|_| bad(i + 1, "key is not valid base64"))?;
            if raw.len() != 32 {
                return Err(bad(i + 1, "key is not 32 bytes"));
            }
            let mut k = Zeroizing::new([0u8; 32]);
            k.copy_from_slice(&raw);
            if keys
                .entry(parts[1].to_owned())
                .or_default()
                .insert(version, Kek::new(k))
                .is_some()
            {
                return Err(bad(i + 1, "duplicate key version"));
            }
        }
        Ok(Keyring {
            path: path.to_owned(),
            keys,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn list(&self) -> Vec<KeyInfo> {
        self.keys
            .iter()
            .map(|(name, v)| KeyInfo {
                name: name.clone(),
                versions: v.keys().copied().collect(),
            })
            .collect()
    }

    pub fn has_key(&self, name: &str) -> bool {
        self.keys.contains_key(name)
    }

    fn latest(&self, name: &str) -> Option<(u32, &Kek)> {
        self.keys
            .get(name)
            .and_then(|v| v.iter().next_back())
            .map(|(v, k)| (*v, k))
    }

    /// Creates an empty keyring file (0600). Fails if it exists.
    pub fn create_empty(path: &Path) -> Result<Self, KeyringError> {
        let kr = Keyring {
            path: path.to_owned(),
            keys: BTreeMap::new(),
        };
        kr.write(true)?;
        Ok(kr)
    }

    /// Adds a new key `name` at version 1.
    pub fn create_key(&mut self, name: &str) -> Result<(), KeyringError> {
        if self.keys.contains_key(name) {
            return Err(KeyringError::KeyExists {
                path: self.path.clone(),
                name: name.to_owned(),
            });
        }
        check_key_name(name).map_err(|what| KeyringError::Malformed {
            path: self.path.clone(),
            line: 0,
            what,
        })?;
        self.keys
            .entry(name.to_owned())
            .or_default()
            .insert(1, random_kek());
        self.write(false)
    }

    /// Adds the next version of key `name`; old versions still unwrap.
    pub fn rotate(&mut self, name: &str) -> Result<u32, KeyringError> {
        let Some(versions) = self.keys.get_mut(name) else {
            return Err(KeyringError::NoSuchKey {
                path: self.path.clone(),
                name: name.to_owned(),
            });
        };
        let next = versions.keys().next_back().copied().unwrap_or(0) + 1;
        versions.insert(next, random_kek());
        self.write(false)?;
        Ok(next)
    }

    /// Writes the keyring atomically (temp file 0600, fsync, rename).
    fn write(&self, create_new: bool) -> Result<(), KeyringError> {
        let io = |source| KeyringError::Io {
            path: self.path.clone(),
            source,
        };
        let mut text = Zeroizing::new(String::new());
        text.push_str(HEADER_LINE);
        text.push('\n');
        text.push_str("# kmsfs local keyring: these are secret keys. Keep this file mode 0600 and back it up;\n");
        text.push_str("# without it, files encrypted under these keys cannot be read.\n");
        for (name, versions) in &self.keys {
            for (v, k) in versions {
                let b64 =
                    Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&k.raw[..]));
                text.push_str(&format!("key {name} {v} {}\n", b64.as_str()));
            }
        }
        if create_new && self.path.exists() {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "file exists",
            )));
        }
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(io)?;
        let tmp = dir.join(format!(
            ".{}.tmp{}",
            self.path
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default(),
            std::process::id()
        ));
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        let r = f.write_all(text.as_bytes()).and_then(|_| f.sync_all());
        if let Err(e) = r {
            let _ = fs::remove_file(&tmp);
            return Err(io(e));
        }
        fs::rename(&tmp, &self.path).map_err(io)?;
        Ok(())
    }
}

fn check_key_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 128
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "invalid key name {name:?}: use 1-128 letters, digits, '-', '_' or '.'"
        ));
    }
    Ok(())
}

fn random_kek() -> Kek {
    let mut k = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(&mut k[..]);
    Kek::new(k)
}

fn wrap_aad(name: &str, version: u32, ctx: &WrapContext) -> Vec<u8> {
    let mut aad = b"kmsfs local wrap v1\0".to_vec();
    aad.extend_from_slice(name.as_bytes());
    aad.push(0);
    aad.extend_from_slice(&version.to_be_bytes());
    aad.extend_from_slice(&ctx.canonical_bytes());
    aad
}

/// The local provider: wraps new DEKs under the newest version of `key_name`.
pub struct LocalKms {
    keyring: RwLock<Keyring>,
    key_name: String,
}

impl LocalKms {
    /// Opens the keyring and checks that `key_name` exists.
    pub fn open(path: &Path, key_name: &str) -> Result<Self, KeyringError> {
        let keyring = Keyring::load(path)?;
        if !keyring.has_key(key_name) {
            return Err(KeyringError::NoSuchKey {
                path: path.to_owned(),
                name: key_name.to_owned(),
            });
        }
        Ok(Self {
            keyring: RwLock::new(keyring),
            key_name: key_name.to_owned(),
        })
    }

    fn kms_name(&self) -> String {
        format!(
            "local keyring {}",
            self.keyring.read().unwrap().path.display()
        )
    }

    /// Re-reads the keyring, so a version added by `kmsfs keys rotate` while
    /// mounted becomes usable without a remount.
    fn reload(&self) {
        let path = self.keyring.read().unwrap().path.clone();
        if let Ok(k) = Keyring::load(&path) {
            *self.keyring.write().unwrap() = k;
        }
    }

    fn seal(kek: &Kek, dek: &Dek, aad: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let mut out = vec![0u8; 12 + DEK_LEN + 16];
        out[..12].copy_from_slice(&nonce);
        let (body, tag_out) = out[12..].split_at_mut(DEK_LEN);
        body.copy_from_slice(dek.as_bytes());
        let tag = kek
            .cipher
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), body)
            .expect("DEK fits the AEAD limits");
        tag_out.copy_from_slice(tag.as_ref());
        out
    }
}

#[async_trait]
impl KeyProvider for LocalKms {
    fn describe(&self) -> String {
        format!("{} (key {})", self.kms_name(), self.key_name)
    }

    fn kind(&self) -> &'static str {
        PROVIDER
    }

    fn handles(&self, key_ref: &KeyRef) -> bool {
        // Only the configured key: the keyring may hold others, for other
        // policies, and a file must be under its own policy's key.
        key_ref.provider == PROVIDER && key_ref.key_id == self.key_name
    }

    async fn wrap(&self, dek: &Dek, ctx: &WrapContext) -> Result<WrappedDek, KmsError> {
        let kr = self.keyring.read().unwrap();
        let (version, kek) = kr
            .latest(&self.key_name)
            .ok_or_else(|| KmsError::KeyNotFound {
                kms: self.kms_name(),
                key: self.key_name.clone(),
            })?;
        let blob = Self::seal(kek, dek, &wrap_aad(&self.key_name, version, ctx));
        Ok(WrappedDek {
            key_ref: KeyRef {
                provider: PROVIDER.into(),
                key_id: self.key_name.clone(),
                key_version: version.to_string(),
            },
            blob,
        })
    }

    async fn unwrap(&self, wrapped: &WrappedDek, ctx: &WrapContext) -> Result<Dek, KmsError> {
        ensure_handles(self, &wrapped.key_ref)?;
        let kr_ref = &wrapped.key_ref;
        let version: u32 = kr_ref
            .key_version
            .parse()
            .map_err(|_| KmsError::UnwrapFailed {
                kms: self.kms_name(),
                detail: format!("key version {:?} is not a number", kr_ref.key_version),
            })?;
        let have = |kr: &Keyring| {
            kr.keys
                .get(&kr_ref.key_id)
                .map(|v| v.contains_key(&version))
                .unwrap_or(false)
        };
        if !have(&self.keyring.read().unwrap()) {
            self.reload();
        }
        let kr = self.keyring.read().unwrap();
        let Some(versions) = kr.keys.get(&kr_ref.key_id) else {
            return Err(KmsError::KeyNotFound {
                kms: self.kms_name(),
                key: kr_ref.key_id.clone(),
            });
        };
        let Some(kek) = versions.get(&version) else {
            return Err(KmsError::KeyVersionUnusable {
                kms: self.kms_name(),
                key: kr_ref.key_id.clone(),
                version: kr_ref.key_version.clone(),
                detail: "this keyring does not hold that version (wrong key file?)".into(),
            });
        };
        let blob = &wrapped.blob;
        if blob.len() != 12 + DEK_LEN + 16 {
            return Err(KmsError::UnwrapFailed {
                kms: self.kms_name(),
                detail: format!("wrapped DEK has {} bytes, expected 60", blob.len()),
            });
        }
        let mut body = Zeroizing::new([0u8; DEK_LEN]);
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&blob[..12]);
        kek.cipher
            .open_separate_gather(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(wrap_aad(&kr_ref.key_id, version, ctx)),
                &blob[12..12 + DEK_LEN],
                &blob[12 + DEK_LEN..],
                &mut body[..],
            )
            .map_err(|_| KmsError::UnwrapFailed {
                kms: self.kms_name(),
                detail: "authentication of the wrapped DEK failed".into(),
            })?;
        Dek::from_slice(&body[..]).map_err(|e| KmsError::UnwrapFailed {
            kms: self.kms_name(),
            detail: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn wrap_unwrap_rotate_and_context() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let mut kr = Keyring::create_empty(&path).unwrap();
        kr.create_key("default").unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let kms = LocalKms::open(&path, "default").unwrap();
        let ctx = WrapContext::file_v1([1; 16]);
        let (dek, w1) = block_on(kms.generate_dek(&ctx)).unwrap();
        assert_eq!(w1.key_ref.key_version, "1");
        assert_eq!(
            block_on(kms.unwrap(&w1, &ctx)).unwrap().as_bytes(),
            dek.as_bytes()
        );
        // Another file's context does not unwrap.
        let other = WrapContext::file_v1([2; 16]);
        assert!(matches!(
            block_on(kms.unwrap(&w1, &other)),
            Err(KmsError::UnwrapFailed { .. })
        ));
        // Rotation on disk is picked up; old versions still unwrap.
        let mut kr = Keyring::load(&path).unwrap();
        assert_eq!(kr.rotate("default").unwrap(), 2);
        assert_eq!(
            block_on(kms.unwrap(&w1, &ctx)).unwrap().as_bytes(),
            dek.as_bytes()
        );
        let kms = LocalKms::open(&path, "default").unwrap();
        let (_, w2) = block_on(kms.generate_dek(&ctx)).unwrap();
        assert_eq!(w2.key_ref.key_version, "2");
        // Tampered blob.
        let mut bad = w1.clone();
        bad.blob[20] ^= 1;
        assert!(matches!(
            block_on(kms.unwrap(&bad, &ctx)),
            Err(KmsError::UnwrapFailed { .. })
        ));
    }

    #[test]
    fn refuses_open_keyring_and_wrong_keyring() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let mut kr = Keyring::create_empty(&path).unwrap();
        kr.create_key("default").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Keyring::load(&path),
            Err(KeyringError::TooOpen { .. })
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let kms = LocalKms::open(&path, "default").unwrap();
        let ctx = WrapContext::file_v1([1; 16]);
        let (_, w) = block_on(kms.generate_dek(&ctx)).unwrap();
        let path2 = dir.path().join("keys2");
        let mut kr2 = Keyring::create_empty(&path2).unwrap();
        kr2.create_key("default").unwrap();
        let kms2 = LocalKms::open(&path2, "default").unwrap();
        let Err(err) = block_on(kms2.unwrap(&w, &ctx)) else {
            panic!("a foreign keyring unwrapped the DEK")
        };
        assert!(matches!(err, KmsError::UnwrapFailed { .. }), "{err}");
        assert!(!err.is_retryable());
    }
}
