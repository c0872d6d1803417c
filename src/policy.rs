//! Directory-level key policies: which KMS key (and cipher) protects new
//! files in a subtree, and which older keys its files may still be under.
//! The nearest enclosing policy applies, as in fscrypt. Paths here are
//! mount-relative and normalized: "/" or "/a/b".

use serde::{Deserialize, Serialize};

use crate::format::names::is_reserved;
use crate::format::CipherSuite;
use crate::kms::config::KeySpec;

fn yes() -> bool {
    true
}

/// How new files' DEKs are wrapped under a policy's key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyMode {
    /// The KMS wraps every new file's DEK (one KMS call per create).
    #[default]
    PerFile,
    /// The KMS wraps an intermediate key now and then; each new file's DEK
    /// is wrapped under it locally (no KMS call per create; a cold read
    /// makes one KMS call per intermediate key). docs/KEY_LIFECYCLE.md.
    Directory,
}

impl KeyMode {
    pub fn is_per_file(&self) -> bool {
        *self == KeyMode::PerFile
    }

    pub fn name(self) -> &'static str {
        match self {
            KeyMode::PerFile => "per-file",
            KeyMode::Directory => "directory",
        }
    }
}

impl std::str::FromStr for KeyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "per-file" | "per_file" => Ok(KeyMode::PerFile),
            "directory" => Ok(KeyMode::Directory),
            other => Err(format!(
                "unknown key mode {other:?}: use per-file or directory"
            )),
        }
    }
}

/// One policy: the directory it governs, the key for new files there, and
/// the keys files there may be under besides it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Mount-relative directory, normalized ("/" for the root).
    pub dir: String,
    pub cipher: CipherSuite,
    /// When false, files without a sidecar in this subtree (plaintext files
    /// already there) stay readable as they are; new files are encrypted.
    #[serde(default = "yes")]
    pub mandatory: bool,
    /// The key that wraps new files' DEKs.
    pub key: KeySpec,
    /// Keys that wrapped files here before a policy change, and still may
    /// unwrap them. A file under any other key does not open here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<KeySpec>,
    /// Further keys each new header also wraps the DEK under (break-glass:
    /// an offline recovery keyring beside a cloud KMS, say). Any one of
    /// them unwraps; `kmsfs rewrap` adds or drops them on existing files.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<KeySpec>,
    /// Rotate the current key once its current version is this old
    /// (`kmsfs rotate --due`).
    #[serde(
        default,
        with = "crate::duration::serde_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub rotate_after: Option<std::time::Duration>,
    /// A current key version older than this is an error for
    /// `kmsfs rotate --due` (and a warning for `kmsfs keys status`).
    #[serde(
        default,
        with = "crate::duration::serde_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_key_age: Option<std::time::Duration>,
    /// How new files' DEKs are wrapped (absent: per file, so configurations
    /// from before key modes read, and seal, as they were).
    #[serde(default, skip_serializing_if = "KeyMode::is_per_file")]
    pub key_mode: KeyMode,
    /// Directory mode: a new intermediate key once the current one is this
    /// old (default 24 h).
    #[serde(
        default,
        with = "crate::duration::serde_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub intermediate_rotate_after: Option<std::time::Duration>,
    /// Directory mode: a new intermediate key once the current one wrapped
    /// this many DEKs (default 1,000,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intermediate_max_files: Option<u64>,
}

impl Policy {
    /// A policy of `dir` with only a current key.
    pub fn new(dir: String, cipher: CipherSuite, mandatory: bool, key: KeySpec) -> Self {
        Policy {
            dir,
            cipher,
            mandatory,
            key,
            retired: Vec::new(),
            recipients: Vec::new(),
            rotate_after: None,
            max_key_age: None,
            key_mode: KeyMode::PerFile,
            intermediate_rotate_after: None,
            intermediate_max_files: None,
        }
    }

    /// Whether files may move between the subtrees of `self` and `other`
    /// without changing how they are checked: the same key, cipher and
    /// retired keys and recipients (rename and link stay within one
    /// protection). The key mode does not count: a DEK wrapped under an
    /// intermediate key is still under the same KMS key (only that key
    /// unwraps the intermediate one), and every policy with that key opens
    /// it, whatever its mode.
    pub fn same_protection(&self, other: &Policy) -> bool {
        let sorted = |keys: &[KeySpec]| {
            let mut r = keys.to_vec();
            r.sort();
            r
        };
        self.key == other.key
            && self.cipher == other.cipher
            && sorted(&self.retired) == sorted(&other.retired)
            && sorted(&self.recipients) == sorted(&other.recipients)
    }

    /// Every key a file here may be under: the current one first, then the
    /// recipients, then the retired ones.
    pub fn keys(&self) -> impl Iterator<Item = &KeySpec> {
        std::iter::once(&self.key)
            .chain(&self.recipients)
            .chain(&self.retired)
    }

    /// The keys a new header here is wrapped under: the current one first,
    /// then the recipients.
    pub fn wrapping_keys(&self) -> impl Iterator<Item = &KeySpec> {
        std::iter::once(&self.key).chain(&self.recipients)
    }

    /// Adds `keys` to the retired ones (not a key that wraps new files, no
    /// repeats).
    pub fn retire<'a>(&mut self, keys: impl IntoIterator<Item = &'a KeySpec>) {
        for k in keys {
            if *k != self.key && !self.recipients.contains(k) && !self.retired.contains(k) {
                self.retired.push(k.clone());
            }
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("policy directory {0:?} must be an absolute path inside the mount, like /pii")]
    NotAbsolute(String),
    #[error(
        "policy directory {0:?} must not contain '.', '..', kmsfs-reserved names or NUL bytes"
    )]
    BadComponent(String),
}

/// Normalizes a mount-relative directory: "/pii/" -> "/pii", "//" -> "/".
pub fn normalize_dir(dir: &str) -> Result<String, PolicyError> {
    if !dir.starts_with('/') {
        return Err(PolicyError::NotAbsolute(dir.to_owned()));
    }
    let mut out = String::new();
    for c in dir.split('/').filter(|c| !c.is_empty()) {
        // No directory can be named with a NUL byte (a TOML string can hold one).
        if c == "." || c == ".." || is_reserved(c.as_bytes()) || c.contains('\0') {
            return Err(PolicyError::BadComponent(dir.to_owned()));
        }
        out.push('/');
        out.push_str(c);
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// True when `path` is `dir` or lies below it (component-wise).
pub fn is_within(path: &str, dir: &str) -> bool {
    dir == "/"
        || path == dir
        || (path.starts_with(dir) && path.as_bytes().get(dir.len()) == Some(&b'/'))
}

/// Index of the policy governing `path`: the one with the longest `dir`
/// enclosing it. `policies` must contain a root ("/") policy.
pub fn governing(policies: &[Policy], path: &str) -> usize {
    governing_by(policies.iter().map(|p| p.dir.as_str()), path)
}

/// Same, over any list of policy directories.
pub fn governing_by<'a>(dirs: impl Iterator<Item = &'a str>, path: &str) -> usize {
    let mut best: Option<(usize, usize)> = None;
    for (i, d) in dirs.enumerate() {
        if is_within(path, d) && best.is_none_or(|(_, len)| d.len() > len) {
            best = Some((i, d.len()));
        }
    }
    best.map(|(i, _)| i)
        .expect("a root policy encloses every path")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization() {
        assert_eq!(normalize_dir("/").unwrap(), "/");
        assert_eq!(normalize_dir("//pii//x/").unwrap(), "/pii/x");
        assert!(normalize_dir("pii").is_err());
        assert!(normalize_dir("/a/../b").is_err());
        assert!(normalize_dir("/.kmsfs.x").is_err());
        assert!(normalize_dir("/a\0b").is_err());
    }

    #[test]
    fn nearest_enclosing_policy_wins() {
        let dirs = ["/", "/pii", "/pii/deep", "/piiX"];
        let g = |p: &str| governing_by(dirs.iter().copied(), p);
        assert_eq!(g("/"), 0);
        assert_eq!(g("/other/file"), 0);
        assert_eq!(g("/pii"), 1);
        assert_eq!(g("/pii/a/b"), 1);
        assert_eq!(g("/pii/deep/x"), 2);
        assert_eq!(g("/piix"), 0);
        assert_eq!(g("/piiX/y"), 3);
    }
}
