//! The embedded local KMS: a keyring file of versioned 256-bit KEKs kept
//! outside the backing directory.
//!
//! Keyring file (mode 0600; refused if group/others can read it, if it is a
//! symlink or not a regular file, or if neither root nor the current user
//! owns it):
//! ```text
//! kmsfs-keyring v1
//! key NAME VERSION BASE64(32 bytes) [created=UNIX_SECONDS]
//! destroyed NAME VERSION [created=UNIX_SECONDS] [at=UNIX_SECONDS]
//! ```
//! `created=` is when the version was made (versions written by kmsfs
//! before it recorded times have none). A `destroyed` line is what is left
//! of a version [`Keyring::destroy`] removed (crypto-shredding): its key
//! bytes are gone, so what it wrapped cannot be unwrapped any more, and its
//! number is never given to a new version. Older kmsfs releases refuse
//! keyrings with either.
//!
//! Wrapped DEK = nonce (12) || AES-256-GCM(KEK, DEK) (32) || tag (16), with the
//! key name, version and wrap context as associated data.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_lc_rs::aead::LessSafeKey;
use base64::Engine;
use rand::RngCore;
use zeroize::Zeroizing;

use super::support::ensure_handles;
use super::{KeyProvider, KeyRef, KeyVersion, KeyVersions, KmsError, WrapContext, WrappedDek};
use crate::crypto::{self, CryptoError, Dek};

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
    #[error("key file {path}: key {name:?} has no version {version}{}", if *.destroyed { " (it was destroyed already)" } else { "" })]
    NoSuchVersion {
        path: PathBuf,
        name: String,
        version: u32,
        destroyed: bool,
    },
}

/// One key-encryption key. Zeroized on drop; no Debug.
struct Kek {
    /// The key bytes, kept only to write the keyring back.
    raw: Zeroizing<[u8; 32]>,
    /// Its AEAD context (key schedule), built once rather than per wrap and
    /// unwrap; aws-lc cleanses it when dropped.
    cipher: LessSafeKey,
    /// When the version was made, in seconds since the Unix epoch, if the
    /// keyring says.
    created: Option<i64>,
}

impl Kek {
    fn new(raw: Zeroizing<[u8; 32]>, created: Option<i64>) -> Self {
        let cipher = crypto::key_wrapping_key(&raw);
        Self {
            raw,
            cipher,
            created,
        }
    }
}

/// What is left of a destroyed version: no key bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Destroyed {
    /// When the version was made, if known.
    created: Option<i64>,
    /// When it was destroyed, if known.
    at: Option<i64>,
}

/// The parsed keyring: key name -> version -> KEK, and the versions
/// destroyed. Every name in `destroyed` is in `keys`, maybe with no
/// versions left.
pub struct Keyring {
    path: PathBuf,
    keys: BTreeMap<String, BTreeMap<u32, Kek>>,
    destroyed: BTreeMap<String, BTreeMap<u32, Destroyed>>,
    /// Which file this is (see [`file_id`]), if it was read or written.
    identity: Option<FileId>,
}

/// A keyring file's device, inode, size and modification time: every change
/// kmsfs makes replaces the file (a new inode), and an edit in place
/// changes its size or time.
type FileId = (u64, u64, u64, i64, i64);

fn file_id(meta: &fs::Metadata) -> FileId {
    (
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
    )
}

/// The identity of the file at `path` now, if there is one.
fn file_id_of(path: &Path) -> Option<FileId> {
    fs::symlink_metadata(path).ok().map(|m| file_id(&m))
}

/// A key's public facts, for `kmsfs keys list`.
#[derive(Debug, serde::Serialize)]
pub struct KeyInfo {
    pub name: String,
    /// The versions that unwrap, oldest first; new wraps use the last.
    pub versions: Vec<u32>,
    /// When each of `versions` was made (same order), in seconds since the
    /// Unix epoch; `None` for versions made before kmsfs recorded it.
    pub created: Vec<Option<i64>>,
    /// Versions destroyed (crypto-shredded): what they wrapped cannot be
    /// unwrapped any more.
    pub destroyed: Vec<u32>,
}

/// Now, in seconds since the Unix epoch.
fn now_secs() -> Option<i64> {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_secs()).ok())
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
        let mut file = open_checked(path)?;
        file.read_to_string(&mut text)
            .map_err(|e| io_error(path, e))?;
        let mut keyring = Self::parse(path, &text)?;
        keyring.identity = file.metadata().ok().map(|m| file_id(&m));
        Ok(keyring)
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
        let mut destroyed: BTreeMap<String, BTreeMap<u32, Destroyed>> = BTreeMap::new();
        for (i, line) in lines {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let parts: Vec<&str> = line.split_whitespace().collect();
            let (fixed, attrs) = match parts.first() {
                Some(&"key") if parts.len() >= 4 => parts.split_at(4),
                Some(&"destroyed") if parts.len() >= 3 => parts.split_at(3),
                _ => {
                    return Err(bad(
                        i + 1,
                        "expected `key NAME VERSION BASE64 [created=SECONDS]` or \
                         `destroyed NAME VERSION [created=SECONDS] [at=SECONDS]`",
                    ))
                }
            };
            let name = fixed[1];
            let version: u32 = fixed[2]
                .parse()
                .map_err(|_| bad(i + 1, "version is not a number"))?;
            let mut created = None;
            let mut at = None;
            for attr in attrs {
                let (field, slot) = match attr.split_once('=') {
                    Some(("created", v)) => (v, &mut created),
                    Some(("at", v)) if fixed[0] == "destroyed" => (v, &mut at),
                    _ => return Err(bad(i + 1, &format!("unknown field {attr:?}"))),
                };
                if slot.is_some() {
                    return Err(bad(i + 1, &format!("duplicate field {attr:?}")));
                }
                *slot = Some(
                    field
                        .parse::<i64>()
                        .map_err(|_| bad(i + 1, "a time is not a number of seconds"))?,
                );
            }
            let duplicate = keys.get(name).is_some_and(|v| v.contains_key(&version))
                || destroyed
                    .get(name)
                    .is_some_and(|v| v.contains_key(&version));
            if duplicate {
                return Err(bad(i + 1, "duplicate key version"));
            }
            let versions = keys.entry(name.to_owned()).or_default();
            if fixed[0] == "destroyed" {
                destroyed
                    .entry(name.to_owned())
                    .or_default()
                    .insert(version, Destroyed { created, at });
                continue;
            }
            let mut raw = Zeroizing::new(Vec::with_capacity(48));
            base64::engine::general_purpose::STANDARD
                .decode_vec(fixed[3], &mut raw)
                .map_err(|_| bad(i + 1, "key is not valid base64"))?;
            if raw.len() != 32 {
                return Err(bad(i + 1, "key is not 32 bytes"));
            }
            let mut k = Zeroizing::new([0u8; 32]);
            k.copy_from_slice(&raw);
            versions.insert(version, Kek::new(k, created));
        }
        Ok(Keyring {
            path: path.to_owned(),
            keys,
            destroyed,
            identity: None,
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
                created: v.values().map(|k| k.created).collect(),
                destroyed: self
                    .destroyed
                    .get(name)
                    .map(|d| d.keys().copied().collect())
                    .unwrap_or_default(),
            })
            .collect()
    }

    /// Key `name`'s versions, destroyed ones included (which no longer
    /// unwrap), oldest first; `current` is the newest that is left, `None`
    /// when every version was destroyed. `None` if there is no such key.
    pub fn key_versions(&self, name: &str) -> Option<KeyVersions> {
        let live = self.keys.get(name)?;
        let mut versions: Vec<(u32, KeyVersion)> = live
            .iter()
            .map(|(v, k)| (*v, k.created, true))
            .chain(
                self.destroyed
                    .get(name)
                    .into_iter()
                    .flatten()
                    .map(|(v, d)| (*v, d.created, false)),
            )
            .map(|(v, created, can_unwrap)| {
                let version = v.to_string();
                (
                    v,
                    KeyVersion {
                        version,
                        created,
                        can_unwrap,
                    },
                )
            })
            .collect();
        versions.sort_by_key(|(v, _)| *v);
        let latest = live.iter().next_back();
        Some(KeyVersions {
            current: latest.map(|(v, _)| v.to_string()),
            current_created: latest.and_then(|(_, k)| k.created),
            versions: versions.into_iter().map(|(_, k)| k).collect(),
        })
    }

    /// Whether version `version` of key `name` was destroyed, and when.
    fn destroyed_at(&self, name: &str, version: u32) -> Option<Option<i64>> {
        self.destroyed.get(name)?.get(&version).map(|d| d.at)
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
        let mut kr = Keyring {
            path: path.to_owned(),
            keys: BTreeMap::new(),
            destroyed: BTreeMap::new(),
            identity: None,
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
            kr.destroyed.remove(name);
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
            // Never the number of a destroyed version: a header naming it
            // must not meet another key.
            let destroyed = kr.destroyed.get(name).and_then(|d| d.keys().next_back());
            let newest = versions.keys().next_back().max(destroyed);
            let next = newest.copied().unwrap_or(0) + 1;
            versions.insert(next, random_kek());
            Ok(next)
        })
    }

    /// Destroys version `version` of key `name`, or with `None` every
    /// version and the key itself (crypto-shredding): the key bytes are
    /// dropped from the keyring, which is rewritten (atomically, under its
    /// lock, like every change), so what those versions wrapped can no
    /// longer be unwrapped by anyone. A destroyed version is remembered, so
    /// that unwrapping under it says so and its number is not reused; a
    /// destroyed key is forgotten. Returns the versions destroyed.
    ///
    /// Copies of the keyring (backups, older versions of its blocks on
    /// disk) are beyond kmsfs's reach. A running mount keeps the versions it
    /// holds in memory until it re-reads the keyring (remount).
    pub fn destroy(&mut self, name: &str, version: Option<u32>) -> Result<Vec<u32>, KeyringError> {
        self.change(|kr| {
            let Some(versions) = kr.keys.get_mut(name) else {
                return Err(KeyringError::NoSuchKey {
                    path: kr.path.clone(),
                    name: name.to_owned(),
                });
            };
            match version {
                Some(v) => {
                    let Some(kek) = versions.remove(&v) else {
                        return Err(KeyringError::NoSuchVersion {
                            path: kr.path.clone(),
                            name: name.to_owned(),
                            version: v,
                            destroyed: kr.destroyed_at(name, v).is_some(),
                        });
                    };
                    let gone = Destroyed {
                        created: kek.created,
                        at: now_secs(),
                    };
                    kr.destroyed
                        .entry(name.to_owned())
                        .or_default()
                        .insert(v, gone);
                    Ok(vec![v])
                }
                None => {
                    let gone = versions.keys().copied().collect();
                    kr.keys.remove(name);
                    kr.destroyed.remove(name);
                    Ok(gone)
                }
            }
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
    fn write(&mut self) -> Result<(), KeyringError> {
        let io = |source| io_error(&self.path, source);
        let mut text = Zeroizing::new(String::new());
        text.push_str(HEADER_LINE);
        text.push('\n');
        text.push_str("# kmsfs local keyring: these are secret keys. Keep this file mode 0600 and back it up;\n");
        text.push_str("# without it, files encrypted under these keys cannot be read.\n");
        let time = |field: &str, t: Option<i64>| match t {
            Some(t) => format!(" {field}={t}"),
            None => String::new(),
        };
        for (name, versions) in &self.keys {
            for (v, k) in versions {
                let b64 =
                    Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&k.raw[..]));
                // Pieces straight into `text`, so that no other string
                // holds the key.
                text.push_str(&format!("key {name} {v} "));
                text.push_str(&b64);
                text.push_str(&time("created", k.created));
                text.push('\n');
            }
            for (v, d) in self.destroyed.get(name).into_iter().flatten() {
                text.push_str(&format!(
                    "destroyed {name} {v}{}{}\n",
                    time("created", d.created),
                    time("at", d.at)
                ));
            }
        }
        crate::safe_open::write_atomically(&self.path, text.as_bytes(), 0o600).map_err(io)?;
        self.identity = file_id_of(&self.path);
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
    Kek::new(k, now_secs())
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
    /// The keyring file (also `keyring.path`; kept here so that naming the
    /// KMS takes no lock).
    path: PathBuf,
    keyring: RwLock<Keyring>,
    key_name: String,
    /// Serializes this provider's changes of the keyring (rotate, destroy),
    /// so that the in-memory keyring ends as the last change left the file.
    /// (Other processes' changes are serialized by the keyring's lock.)
    changing: Mutex<()>,
    /// The keyring file last seen: when the file differs, it is read again
    /// before a wrap or unwrap, so that a version another process destroyed
    /// stops being used at once (and one it added is used).
    seen: Mutex<Option<FileId>>,
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
            path: path.to_owned(),
            seen: Mutex::new(keyring.identity),
            keyring: RwLock::new(keyring),
            key_name: key_name.to_owned(),
            changing: Mutex::new(()),
        })
    }

    /// Destroys version `version` of this provider's key, or with `None`
    /// every version and the key itself, as [`Keyring::destroy`] does, and
    /// forgets them here too. Returns the versions destroyed.
    pub fn destroy(&self, version: Option<u32>) -> Result<Vec<u32>, KeyringError> {
        self.change(|kr| kr.destroy(&self.key_name, version))
    }

    /// Applies `edit` (a [`Keyring`] change, which re-reads the file under
    /// the keyring's lock) to a fresh copy of the keyring, then makes that
    /// copy this provider's; wraps and unwraps go on meanwhile.
    fn change<T>(
        &self, edit: impl FnOnce(&mut Keyring) -> Result<T, KeyringError>,
    ) -> Result<T, KeyringError> {
        let _one_at_a_time = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let mut fresh = Keyring::load(&self.path)?;
        let out = edit(&mut fresh)?;
        self.adopt(fresh);
        Ok(out)
    }

    /// Makes `keyring` this provider's.
    fn adopt(&self, keyring: Keyring) {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = keyring.identity;
        *self.keyring.write().unwrap() = keyring;
    }

    /// Re-reads the keyring if the file changed since it was last seen (one
    /// `stat`). A file that cannot be read (missing, too open, malformed)
    /// leaves the keyring in memory as it is, and is tried again once it
    /// changes again.
    fn refresh(&self) {
        let now = file_id_of(&self.path);
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if now.is_none() || now == *seen {
                return;
            }
            *seen = now;
        }
        match Keyring::load(&self.path) {
            Ok(k) => *self.keyring.write().unwrap() = k,
            Err(e) => tracing::warn!("{}: not re-read: {e}", self.kms_name()),
        }
    }

    /// A keyring error as the KMS layer reports it.
    fn keyring_error(&self, e: KeyringError) -> KmsError {
        match e {
            KeyringError::NoSuchKey { name, .. } => KmsError::KeyNotFound {
                kms: self.kms_name(),
                key: name,
            },
            e => KmsError::Config(e.to_string()),
        }
    }

    /// This key's versions as the keyring file has them now.
    fn versions_now(&self) -> Result<KeyVersions, KmsError> {
        let fresh = Keyring::load(&self.path).map_err(|e| self.keyring_error(e))?;
        self.adopt(fresh);
        self.versions_held()
    }

    /// This key's versions as the keyring held here has them.
    fn versions_held(&self) -> Result<KeyVersions, KmsError> {
        self.keyring
            .read()
            .unwrap()
            .key_versions(&self.key_name)
            .ok_or_else(|| KmsError::KeyNotFound {
                kms: self.kms_name(),
                key: self.key_name.clone(),
            })
    }

    /// Why no version of the key can wrap: the key is gone, or every
    /// version of it was destroyed.
    fn no_version(&self, kr: &Keyring) -> KmsError {
        match kr
            .destroyed
            .get(&self.key_name)
            .and_then(|d| d.keys().next_back())
        {
            Some(newest) if kr.has_key(&self.key_name) => KmsError::KeyVersionUnusable {
                kms: self.kms_name(),
                key: self.key_name.clone(),
                version: newest.to_string(),
                detail: format!(
                    "every version of the key was destroyed, so nothing can be wrapped; \
                     add a version with `kmsfs keys rotate --key-file {} --name {}`",
                    kr.path.display(),
                    self.key_name
                ),
            },
            _ => KmsError::KeyNotFound {
                kms: self.kms_name(),
                key: self.key_name.clone(),
            },
        }
    }

    fn kms_name(&self) -> String {
        format!("local keyring {}", self.path.display())
    }

    /// Re-reads the keyring, so a version added by `kmsfs keys rotate` while
    /// mounted becomes usable without a remount (also when the file looks
    /// unchanged to [`refresh`](Self::refresh)).
    fn reload(&self) {
        if let Ok(k) = Keyring::load(&self.path) {
            self.adopt(k);
        }
    }

    fn seal(kek: &Kek, dek: &Dek, aad: &[u8]) -> Vec<u8> {
        crypto::wrap_key(&kek.cipher, dek, aad)
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
        self.refresh();
        if self
            .keyring
            .read()
            .unwrap()
            .latest(&self.key_name)
            .is_none()
        {
            // Maybe a version was added since (`kmsfs keys rotate`).
            self.reload();
        }
        let kr = self.keyring.read().unwrap();
        let (version, kek) = kr
            .latest(&self.key_name)
            .ok_or_else(|| self.no_version(&kr))?;
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
        self.refresh();
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
            let detail = match kr.destroyed_at(&kr_ref.key_id, version) {
                Some(at) => format!(
                    "that version was destroyed{} (crypto-shredded): \
                     what it wrapped cannot be unwrapped any more",
                    at.map(|t| format!(" at {t} (seconds since the Unix epoch)"))
                        .unwrap_or_default()
                ),
                None => "this keyring does not hold that version (wrong key file?)".into(),
            };
            return Err(KmsError::KeyVersionUnusable {
                kms: self.kms_name(),
                key: kr_ref.key_id.clone(),
                version: kr_ref.key_version.clone(),
                detail,
            });
        };
        crypto::unwrap_key(
            &kek.cipher,
            &wrapped.blob,
            &wrap_aad(&kr_ref.key_id, version, ctx),
        )
        .map_err(|e| KmsError::UnwrapFailed {
            kms: self.kms_name(),
            detail: match e {
                CryptoError::WrappedKeyAuth => "authentication of the wrapped DEK failed".into(),
                other => other.to_string(),
            },
        })
    }

    /// The versions in the keyring file now (destroyed ones included, which
    /// do not unwrap); `current` is `None` when every version was destroyed.
    async fn key_versions(&self) -> Result<KeyVersions, KmsError> {
        self.versions_now()
    }

    /// Adds a version, as `kmsfs keys rotate` does (under the keyring's
    /// lock, so concurrent rotations each add one); new wraps use it.
    async fn rotate(&self) -> Result<KeyVersions, KmsError> {
        self.change(|kr| kr.rotate(&self.key_name))
            .map_err(|e| self.keyring_error(e))?;
        self.versions_held()
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

    /// Writes `text` as a keyring file (0600) at `dir/name`.
    fn keyring_file(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    const OLD_KEY_1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const OLD_KEY_2: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

    #[test]
    fn old_keyrings_without_times_load_and_gain_times_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "kmsfs-keyring v1\n# comment\nkey default 1 {OLD_KEY_1}\nkey default 2 {OLD_KEY_2}\n"
        );
        let path = keyring_file(dir.path(), "keys", &text);
        let mut kr = Keyring::load(&path).unwrap();
        let info = &kr.list()[0];
        assert_eq!(info.versions, [1, 2]);
        assert_eq!(info.created, [None, None]);
        assert!(info.destroyed.is_empty());
        let json = serde_json::to_value(kr.list()).unwrap();
        assert_eq!(json[0]["name"], "default");
        assert_eq!(json[0]["versions"], serde_json::json!([1, 2]));

        let before = now_secs().unwrap();
        assert_eq!(kr.rotate("default").unwrap(), 3);
        let info = &Keyring::load(&path).unwrap().list()[0];
        assert_eq!(info.versions, [1, 2, 3]);
        assert_eq!(info.created[..2], [None, None]);
        let t = info.created[2].expect("a new version records its creation time");
        assert!(t >= before && t <= now_secs().unwrap() + 1, "{t}");
        // The old versions' lines are as they were; the new one has a time.
        let written = fs::read_to_string(&path).unwrap();
        assert!(
            written.contains(&format!("key default 1 {OLD_KEY_1}\n")),
            "{written}"
        );
        assert!(written.contains(&format!(" created={t}\n")), "{written}");

        let v = kr.key_versions("default").unwrap();
        assert_eq!(v.current.as_deref(), Some("3"));
        assert_eq!(v.current_created, Some(t));
        let got: Vec<_> = v
            .versions
            .iter()
            .map(|k| (k.version.as_str(), k.created, k.can_unwrap))
            .collect();
        assert_eq!(
            got,
            [("1", None, true), ("2", None, true), ("3", Some(t), true)]
        );
        assert!(kr.key_versions("other").is_none());
    }

    #[test]
    fn malformed_times_and_tombstones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for (i, line) in [
            format!("key default 1 {OLD_KEY_1} created=soon"),
            format!("key default 1 {OLD_KEY_1} colour=blue"),
            format!("key default 1 {OLD_KEY_1} at=5"),
            format!("key default 1 {OLD_KEY_1} created=1 created=2"),
            "destroyed default".to_owned(),
            "destroyed default x".to_owned(),
            format!("key default 1 {OLD_KEY_1}\ndestroyed default 1"),
            "destroyed default 1\ndestroyed default 1".to_owned(),
        ]
        .iter()
        .enumerate()
        {
            let path = keyring_file(
                dir.path(),
                &format!("k{i}"),
                &format!("kmsfs-keyring v1\n{line}\n"),
            );
            let e = Keyring::load(&path)
                .err()
                .unwrap_or_else(|| panic!("{line}"));
            assert!(matches!(e, KeyringError::Malformed { .. }), "{line}: {e}");
        }
        let path = keyring_file(
            dir.path(),
            "good",
            &format!(
                "kmsfs-keyring v1\nkey default 2 {OLD_KEY_1} created=7\n\
                 destroyed default 1 created=5 at=6\n"
            ),
        );
        let kr = Keyring::load(&path).unwrap();
        let v = kr.key_versions("default").unwrap();
        assert_eq!(v.versions[0].created, Some(5));
        assert!(!v.versions[0].can_unwrap);
        assert_eq!(v.current_created, Some(7));
        assert_eq!(kr.destroyed_at("default", 1), Some(Some(6)));
    }

    #[test]
    fn provider_reports_and_rotates_versions() {
        let dir = tempfile::tempdir().unwrap();
        let path = keyring_in(dir.path(), "keys");
        let kms = LocalKms::open(&path, "default").unwrap();
        let v = block_on(kms.key_versions()).unwrap();
        assert_eq!(v.current.as_deref(), Some("1"));
        assert_eq!(v.versions.len(), 1);
        assert!(v.versions[0].can_unwrap && v.versions[0].created.is_some());
        assert_eq!(v.current_created, v.versions[0].created);

        let ctx = WrapContext::file_v1([5; 16]);
        let (d1, w1) = block_on(kms.generate_dek(&ctx)).unwrap();
        let v = block_on(kms.rotate()).unwrap();
        assert_eq!(v.current.as_deref(), Some("2"));
        assert_eq!(v.versions.len(), 2);
        let (d2, w2) = block_on(kms.generate_dek(&ctx)).unwrap();
        assert_eq!(w2.key_ref.key_version, "2");
        for (d, w) in [(&d1, &w1), (&d2, &w2)] {
            assert_eq!(
                block_on(kms.unwrap(w, &ctx)).unwrap().as_bytes(),
                d.as_bytes()
            );
        }
        // A rotation by another process shows in key_versions, and new
        // wraps use it at once.
        Keyring::load(&path).unwrap().rotate("default").unwrap();
        let (_, w3) = block_on(kms.generate_dek(&ctx)).unwrap();
        assert_eq!(w3.key_ref.key_version, "3");
        // A keyring made unreadable (too open) is not re-read; what is in
        // memory keeps working, and it is read again once fixed.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        Keyring::load(&path).err().unwrap();
        assert_eq!(
            block_on(kms.unwrap(&w1, &ctx)).unwrap().as_bytes(),
            d1.as_bytes()
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            block_on(kms.unwrap(&w2, &ctx)).unwrap().as_bytes(),
            d2.as_bytes()
        );
        assert_eq!(
            block_on(kms.key_versions()).unwrap().current.as_deref(),
            Some("3")
        );
        // Concurrent rotations through several providers all land.
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let kms = LocalKms::open(&path, "default").unwrap();
                    block_on(kms.rotate()).unwrap()
                })
            })
            .collect();
        let mut currents: Vec<u32> = threads
            .into_iter()
            .map(|t| t.join().unwrap().current.unwrap().parse().unwrap())
            .collect();
        currents.sort();
        assert_eq!(currents, (4..=9).collect::<Vec<u32>>());
        assert_eq!(
            Keyring::load(&path).unwrap().list()[0].versions,
            (1..=9).collect::<Vec<u32>>()
        );
        // A keyring that vanished is an error, not a stale answer.
        fs::remove_file(&path).unwrap();
        assert!(matches!(
            block_on(kms.key_versions()),
            Err(KmsError::Config(_))
        ));
        assert!(block_on(kms.rotate()).is_err());
    }

    #[test]
    fn destroying_versions_shreds_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = keyring_in(dir.path(), "keys");
        let mut kr = Keyring::load(&path).unwrap();
        kr.create_key("other").unwrap();
        kr.rotate("default").unwrap();
        let kms = LocalKms::open(&path, "default").unwrap();
        let ctx = WrapContext::file_v1([6; 16]);
        // v2 wraps; a DEK wrapped under v1 is made through a pinned copy.
        let (d2, w2) = block_on(kms.generate_dek(&ctx)).unwrap();
        assert_eq!(w2.key_ref.key_version, "2");
        let v1_line = |text: &str| {
            text.lines()
                .find(|l| l.starts_with("key default 1 "))
                .map(|l| l.split_whitespace().nth(3).unwrap().to_owned())
        };
        let v1_b64 = v1_line(&fs::read_to_string(&path).unwrap()).unwrap();
        let w1 = {
            let kr = Keyring::load(&path).unwrap();
            let kek = &kr.keys["default"][&1];
            let d = Dek::generate();
            let blob = LocalKms::seal(kek, &d, &wrap_aad("default", 1, &ctx));
            let w = WrappedDek {
                key_ref: KeyRef {
                    provider: PROVIDER.into(),
                    key_id: "default".into(),
                    key_version: "1".into(),
                },
                blob,
            };
            assert_eq!(
                block_on(kms.unwrap(&w, &ctx)).unwrap().as_bytes(),
                d.as_bytes()
            );
            w
        };

        // Destroy v1 through the keyring: its bytes leave the file.
        assert_eq!(kr.destroy("default", Some(1)).unwrap(), [1]);
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains(&v1_b64),
            "v1's key bytes are still in the file"
        );
        assert!(v1_line(&text).is_none());
        assert!(text.contains("destroyed default 1 created="), "{text}");
        // A fresh provider cannot unwrap under v1, and says why.
        let fresh = LocalKms::open(&path, "default").unwrap();
        match block_on(fresh.unwrap(&w1, &ctx)) {
            Err(e @ KmsError::KeyVersionUnusable { .. }) => {
                assert!(e.to_string().contains("destroyed"), "{e}")
            }
            other => panic!("unwrapped under a destroyed version: {:?}", other.err()),
        }
        assert_eq!(
            block_on(fresh.unwrap(&w2, &ctx)).unwrap().as_bytes(),
            d2.as_bytes()
        );
        let v = block_on(fresh.key_versions()).unwrap();
        let states: Vec<_> = v
            .versions
            .iter()
            .map(|k| (k.version.as_str(), k.can_unwrap))
            .collect();
        assert_eq!(states, [("1", false), ("2", true)]);
        assert_eq!(v.current.as_deref(), Some("2"));
        let info = Keyring::load(&path).unwrap().list();
        assert_eq!(
            (info[0].versions.clone(), info[0].destroyed.clone()),
            (vec![2], vec![1])
        );

        // Destroying it again, or a version that never was, is refused.
        let e = kr.destroy("default", Some(1)).unwrap_err();
        assert!(e.to_string().contains("destroyed already"), "{e}");
        assert!(matches!(
            kr.destroy("default", Some(7)),
            Err(KeyringError::NoSuchVersion {
                version: 7,
                destroyed: false,
                ..
            })
        ));
        assert!(matches!(
            kr.destroy("nope", None),
            Err(KeyringError::NoSuchKey { .. })
        ));

        // The provider destroys its last version: nothing wraps any more.
        assert_eq!(kms.destroy(Some(2)).unwrap(), [2]);
        match block_on(kms.unwrap(&w2, &ctx)) {
            Err(e @ KmsError::KeyVersionUnusable { .. }) => {
                assert!(e.to_string().contains("destroyed"), "{e}")
            }
            other => panic!("unwrapped under a destroyed version: {:?}", other.err()),
        }
        match block_on(kms.wrap(&Dek::generate(), &ctx)) {
            Err(e @ KmsError::KeyVersionUnusable { .. }) => {
                let m = e.to_string();
                assert!(
                    m.contains("every version") && m.contains("keys rotate"),
                    "{m}"
                )
            }
            other => panic!("wrapped with no version left: {:?}", other.err()),
        }
        let v = block_on(kms.key_versions()).unwrap();
        assert_eq!(v.current, None);
        assert!(v.versions.iter().all(|k| !k.can_unwrap));
        // The key survives, still openable; a rotation never reuses a
        // destroyed number, and wrapping works again.
        let kms = LocalKms::open(&path, "default").unwrap();
        assert_eq!(
            block_on(kms.rotate()).unwrap().current.as_deref(),
            Some("3")
        );
        let (d3, w3) = block_on(kms.generate_dek(&ctx)).unwrap();
        assert_eq!(w3.key_ref.key_version, "3");
        assert_eq!(
            block_on(kms.unwrap(&w3, &ctx)).unwrap().as_bytes(),
            d3.as_bytes()
        );

        // Destroying the whole key removes it and its history; the other
        // key is untouched.
        let other_line = |text: &str| {
            text.lines()
                .find(|l| l.starts_with("key other 1 "))
                .map(str::to_owned)
        };
        let other_before = other_line(&fs::read_to_string(&path).unwrap());
        let mut kr = Keyring::load(&path).unwrap();
        assert_eq!(kr.destroy("default", None).unwrap(), [3]);
        assert!(!kr.has_key("default"));
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains(" default "), "{text}");
        assert_eq!(other_line(&text), other_before);
        assert!(matches!(
            block_on(kms.unwrap(&w3, &ctx)),
            Err(KmsError::KeyNotFound { .. })
        ));
        assert!(matches!(
            LocalKms::open(&path, "default"),
            Err(KeyringError::NoSuchKey { .. })
        ));
        assert!(matches!(
            block_on(kms.key_versions()),
            Err(KmsError::KeyNotFound { .. })
        ));
        // The name can be used again, from version 1.
        kr.create_key("default").unwrap();
        assert_eq!(kr.list()[0].versions, [1]);
        assert!(kr.list()[0].destroyed.is_empty());
    }
}
