//! What every remote provider does the same way with what its service or
//! transport says: one-line error texts cleaned of anything that looks like
//! a credential, and what a malformed answer means.
// Most of this serves the remote providers, each behind a cargo feature.
#![cfg_attr(
    not(any(feature = "vault", feature = "aws", feature = "azure", feature = "gcp")),
    allow(dead_code, unused_imports)
)]

use std::error::Error as StdError;

use super::{KeyProvider, KeyRef, KmsError};

/// Longest service or transport message kept in an error, in characters.
const MESSAGE_MAX: usize = 300;
/// Length of an AWS access key ID (`AKIA`/`ASIA` and 16 more characters).
const ACCESS_KEY_ID_LEN: usize = 20;

/// An optional setting, trimmed; absent when empty.
pub(crate) fn given(setting: &Option<String>) -> Option<&str> {
    setting.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// Which way a KMS call goes: it decides what a malformed answer means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    Wrap,
    Unwrap,
}

/// A service or transport message as it may go into an error: one line
/// (whitespace and control characters become one space), anything shaped
/// like an AWS access key ID masked (services name the caller's key ID; they
/// never echo secret keys or tokens), at most [`MESSAGE_MAX`] characters.
pub(crate) fn clean_message(msg: &str) -> String {
    let chars: Vec<char> = msg.chars().collect();
    let mut out = String::with_capacity(msg.len().min(MESSAGE_MAX + 16));
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if starts_access_key_id(&chars, i) {
            out.push_str("[access key id]");
            i += ACCESS_KEY_ID_LEN;
            while i < chars.len() && chars[i].is_ascii_alphanumeric() {
                i += 1;
            }
            continue;
        }
        if c.is_whitespace() || c.is_control() {
            if !out.ends_with(' ') {
                out.push(' ');
            }
        } else {
            out.push(c);
        }
        i += 1;
    }
    let out = out.trim();
    if out.chars().count() > MESSAGE_MAX {
        format!("{}...", out.chars().take(MESSAGE_MAX).collect::<String>())
    } else {
        out.to_owned()
    }
}

fn starts_access_key_id(chars: &[char], i: usize) -> bool {
    let rest = &chars[i..];
    rest.len() >= ACCESS_KEY_ID_LEN
        && (rest.starts_with(&['A', 'K', 'I', 'A']) || rest.starts_with(&['A', 'S', 'I', 'A']))
        && rest[4..ACCESS_KEY_ID_LEN]
            .iter()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        && (i == 0 || !chars[i - 1].is_ascii_alphanumeric())
}

/// An error's message and its sources' (each once), cleaned as
/// [`clean_message`] does.
pub(crate) fn error_chain(e: &(dyn StdError + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let m = s.to_string();
        if !parts.iter().any(|p| p.contains(&m)) {
            parts.push(m);
        }
        cur = s.source();
    }
    clean_message(&parts.join(": "))
}

/// A malformed answer from `kms` to `operation`: when unwrapping, the DEK
/// cannot be had ([`KmsError::UnwrapFailed`]); when wrapping, the service is
/// not what the configuration says it is ([`KmsError::Config`]).
pub(crate) fn bad_response(
    kms: String, direction: Direction, operation: &str, detail: &str,
) -> KmsError {
    match direction {
        Direction::Unwrap => KmsError::UnwrapFailed {
            kms,
            detail: format!("unexpected {operation} response: {detail}"),
        },
        Direction::Wrap => {
            KmsError::Config(format!("{kms}: unexpected {operation} response: {detail}"))
        }
    }
}

/// Refuses a wrapped DEK whose key reference `provider` does not handle, so
/// that no request is sent for another key's blob.
pub(crate) fn ensure_handles(
    provider: &(impl KeyProvider + ?Sized), key_ref: &KeyRef,
) -> Result<(), KmsError> {
    if provider.handles(key_ref) {
        Ok(())
    } else {
        Err(KmsError::no_provider(key_ref))
    }
}

/// Why a key pinned to `version` is not rotated through kmsfs: new files
/// would still be wrapped under the pinned version. `rotate_there` is the
/// KMS's own command to make a new version; `key` the key as a policy
/// names it.
pub(crate) fn pinned_version_does_not_rotate(
    kms: String, key: &str, version: &str, rotate_there: &str,
) -> KmsError {
    KmsError::Unsupported {
        kms,
        operation: "rotate the key",
        detail: format!(
            "key {key} is pinned to version {version}, and a pinned version does not follow \
             rotation: new files would still be wrapped under {version}. Make a new version \
             (`{rotate_there}`), then point the policy at it (`kmsfs policy set BACKING DIR \
             --provider PROVIDER --key {key} --key-version NEW_VERSION`), or drop the pin (the \
             same without --key-version) so that new files follow the KMS's current version"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_short_line_without_access_key_ids() {
        let m = clean_message("User AKIAIOSFODNN7EXAMPLE is not authorized");
        assert_eq!(m, "User [access key id] is not authorized");
        let m = clean_message("User: u (ASIAIOSFODNN7EXAMPLE) denied");
        assert_eq!(m, "User: u ([access key id]) denied");
        assert_eq!(
            clean_message("1 error occurred:\n\t* denied\n\n"),
            "1 error occurred: * denied"
        );
        let long = clean_message(&"x".repeat(1000));
        assert_eq!(long.chars().count(), MESSAGE_MAX + 3);
    }

    #[test]
    fn chains_name_each_cause_once() {
        let e = Wrapper(std::io::Error::other("connection refused"));
        assert_eq!(error_chain(&e), "wrapped: connection refused");
    }

    #[derive(Debug)]
    struct Wrapper(std::io::Error);
    impl std::fmt::Display for Wrapper {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "wrapped")
        }
    }
    impl StdError for Wrapper {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&self.0)
        }
    }
}
