//! The embedded local KMS: a keyring file of versioned 256-bit KEKs kept
//! outside the backing directory.
//!
//! Keyring file (mode 0600; refused if group/others can read it, if it is a
//! symlink or not a regular file, or if neither root nor the current user
//! owns it):
//! ```text
//! kmsfs-keyring v1
//! key NAME VERSION BASE64(32 bytes)
//! ```
//! Wrapped DEK = nonce (12) || AES-256-GCM(KEK, DEK) (32) || tag (16), with the
//! key name, version and wrap context as associated data.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
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
    #[error("key file {0} is a symlink, which kmsfs does not follow (it could point the keyring anywhere); give the path of the file itself")]
    Symlink(PathBuf),
    #[error("key file {0} is not a regular file")]
    NotRegular(PathBuf),
    #[error("key file {path} is owned by uid {uid}, neither root nor the user running kmsfs (uid {euid}); run `chown {euid} {path}`")]
    WrongOwner { path: PathBuf, uid: u32, euid: u32 },
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

/// Flags for every open of the keyring and the files beside it.
const OPEN_FLAGS: i32 = crate::safe_open::NO_FOLLOW_FLAGS;

fn io_error(path: &Path, source: std::io::Error) -> KeyringError {
    match source.raw_os_error() {
        Some(libc::ELOOP) => KeyringError::Symlink(path.to_owned()),
        _ => KeyringError::Io {
            path: path.to_owned(),
            source,
        },
    }
}

/// Opens the keyring at `path` for reading and checks it on the open
/// descriptor, so the file checked is the file read: a regular file (not
/// a symlink), owned by root or the current user, and no access for group
/// or others.
fn open_checked(path: &Path) -> Result<File, KeyringError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(OPEN_FLAGS)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => KeyringError::Missing(path.to_owned()),
            _ => io_error(path, e),
        })?;
    let meta = file.metadata().map_err(|e| io_error(path, e))?;
    if !meta.file_type().is_file() {
        return Err(KeyringError::NotRegular(path.to_owned()));
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != euid {
        return Err(KeyringError::WrongOwner {
            path: path.to_owned(),
            uid: meta.uid(),
            euid,
        });
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyringError::TooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(file)
}

/// `path`'s directory ("." for a bare name).
/// `path` with `suffix` appended to its file name, in the same directory.
fn beside(path: &Path, prefix: &str, suffix: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    crate::safe_open::parent_of(path).join(format!("{prefix}{name}{suffix}"))
}

/// An exclusive lock on `KEYRING.lock` beside the keyring, held while a
/// change re-reads the keyring, changes it and writes it back, so that two
/// concurrent changes (`kmsfs keys rotate` twice) both land. Released when
/// dropped.
struct KeyringLock {
    _file: File,
}

impl KeyringLock {
    fn take(path: &Path) -> Result<Self, KeyringError> {
        let dir = crate::safe_open::parent_of(path);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io_error(path, e))?;
        let file = crate::safe_open::lock_beside(path)
            .map_err(|e| io_error(&beside(path, "", ".lock"), e))?;
        Ok(Self { _file: file })
    }
}

impl Keyring {
    /// Loads `path`, refusing a symlink, a file that is not regular, one
    /// owned by someone other than root or the current user, and one that
    /// group or others may access.
    pub fn load(path: &Path) -> Result<Self, KeyringError> {
        let mut text = Zeroizing::new(String::new());
        open_checked(path)?
            .read_to_string(&mut text)
            .map_err(|e| io_error(path, e))?;
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

    /// Creates an empty keyring file (0600). Fails if it exists, also if
    /// another process created it a moment ago.
    pub fn create_empty(path: &Path) -> Result<Self, KeyringError> {
        let _lock = KeyringLock::take(path)?;
        match fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(path, e)),
            Ok(_) => {
                return Err(io_error(
                    path,
                    std::io::Error::new(std::io::ErrorKind::AlreadyExists, "file exists"),
                ))
            }
        }
        let kr = Keyring {
            path: path.to_owned(),
            keys: BTreeMap::new(),
        };
        kr.write()?;
        Ok(kr)
    }

    /// Adds a new key `name` at version 1.
    pub fn create_key(&mut self, name: &str) -> Result<(), KeyringError> {
        check_key_name(name).map_err(|what| KeyringError::Malformed {
            path: self.path.clone(),
            line: 0,
            what,
        })?;
        self.change(|kr| {
            if kr.keys.contains_key(name) {
                return Err(KeyringError::KeyExists {
                    path: kr.path.clone(),
                    name: name.to_owned(),
                });
            }
            kr.keys
                .entry(name.to_owned())
                .or_default()
                .insert(1, random_kek());
            Ok(())
        })
    }

    /// Adds the next version of key `name`; old versions still unwrap.
    pub fn rotate(&mut self, name: &str) -> Result<u32, KeyringError> {
        self.change(|kr| {
            let Some(versions) = kr.keys.get_mut(name) else {
                return Err(KeyringError::NoSuchKey {
                    path: kr.path.clone(),
                    name: name.to_owned(),
                });
            };
            let next = versions.keys().next_back().copied().unwrap_or(0) + 1;
            versions.insert(next, random_kek());
            Ok(next)
        })
    }

    /// Applies `edit` to the keyring as it is on disk now and writes the
    /// result back, all under the keyring's lock, so that a change another
    /// process made since this one was loaded is kept; `self` becomes what
    /// was written.
    fn change<T>(
        &mut self, edit: impl FnOnce(&mut Keyring) -> Result<T, KeyringError>,
    ) -> Result<T, KeyringError> {
        let _lock = KeyringLock::take(&self.path)?;
        let mut current = Self::load(&self.path)?;
        let out = edit(&mut current)?;
        current.write()?;
        *self = current;
        Ok(out)
    }

    /// Writes the keyring atomically: a temporary file with a random name
    /// (created O_EXCL|O_NOFOLLOW, mode 0600, so nothing planted at a name
    /// can redirect the write), fsync, rename over the keyring, fsync of the
    /// directory. The caller holds the keyring's lock.
    fn write(&self) -> Result<(), KeyringError> {
        let io = |source| io_error(&self.path, source);
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
        crate::safe_open::write_atomically(&self.path, text.as_bytes(), 0o600).map_err(io)
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
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// A keyring file `name` in `dir` holding key "default" (version 1).
    fn keyring_in(dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        let mut kr = Keyring::create_empty(&path).unwrap();
        kr.create_key("default").unwrap();
        path
    }

    #[test]
    fn wrap_unwrap_rotate_and_context() {
        let dir = tempfile::tempdir().unwrap();
        let path = keyring_in(dir.path(), "keys");
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
        let path = keyring_in(dir.path(), "keys");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Keyring::load(&path),
            Err(KeyringError::TooOpen { .. })
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let kms = LocalKms::open(&path, "default").unwrap();
        let ctx = WrapContext::file_v1([1; 16]);
        let (_, w) = block_on(kms.generate_dek(&ctx)).unwrap();
        let kms2 = LocalKms::open(&keyring_in(dir.path(), "keys2"), "default").unwrap();
        let Err(err) = block_on(kms2.unwrap(&w, &ctx)) else {
            panic!("a foreign keyring unwrapped the DEK")
        };
        assert!(matches!(err, KmsError::UnwrapFailed { .. }), "{err}");
        assert!(!err.is_retryable());
    }

    #[test]
    fn refuses_symlinks_fifos_and_foreign_owners() {
        let dir = tempfile::tempdir().unwrap();
        let path = keyring_in(dir.path(), "keys");
        let link = dir.path().join("link");
        symlink(&path, &link).unwrap();
        let e = Keyring::load(&link).err().unwrap();
        assert!(matches!(e, KeyringError::Symlink(_)), "{e}");
        assert!(e.to_string().contains("symlink"), "{e}");
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            Keyring::load(&fifo),
            Err(KeyringError::NotRegular(_))
        ));
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&path, Some(4321), None).unwrap();
            let e = Keyring::load(&path).err().unwrap();
            assert!(
                matches!(e, KeyringError::WrongOwner { uid: 4321, .. }),
                "{e}"
            );
        }
    }

    #[test]
    fn concurrent_changes_keep_every_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = keyring_in(dir.path(), "keys");
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let mut kr = Keyring::load(&path).unwrap();
                    kr.rotate("default").unwrap()
                })
            })
            .collect();
        let mut got: Vec<u32> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        got.sort();
        assert_eq!(got, (2..=9).collect::<Vec<u32>>());
        let kr = Keyring::load(&path).unwrap();
        assert_eq!(kr.list()[0].versions, (1..=9).collect::<Vec<u32>>());
        // A loaded copy that missed those changes does not undo them.
        let mut stale = Keyring::load(&path).unwrap();
        Keyring::load(&path).unwrap().rotate("default").unwrap();
        assert_eq!(stale.rotate("default").unwrap(), 11);
        // Only the keyring and its lock are left: no temporary files.
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["keys", "keys.lock"]);
        assert!(matches!(
            Keyring::create_empty(&path),
            Err(KeyringError::Io { .. })
        ));
    }
}
