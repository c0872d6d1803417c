//! Filesystem-layer errors and their one mapping to errno.

use crate::crypto::CryptoError;
use crate::format::FormatError;
use crate::kms::KmsError;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Errno(Errno),
    #[error("{file}: block {block}: {reason}")]
    Block {
        file: String,
        block: u64,
        reason: String,
    },
    #[error("{file}: sidecar header: {reason}")]
    Header { file: String, reason: String },
    /// A backing object is not what the mount knows it as (something else
    /// was put in its place): refused rather than opened.
    #[error("{file}: {reason}")]
    Backing { file: String, reason: &'static str },
    /// Refused by a kmsfs rule, with what to do instead (EPERM).
    #[error("{file}: {reason}")]
    Refused { file: String, reason: &'static str },
    #[error("{file}: {action}: {source}")]
    Kms {
        file: String,
        /// What kmsfs was doing, e.g. "the DEK could not be unwrapped".
        action: &'static str,
        #[source]
        source: Box<KmsError>,
    },
}

/// A plain errno value with a name for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

pub type FsResult<T> = Result<T, FsError>;

impl FsError {
    pub fn errno(e: i32) -> Self {
        FsError::Errno(Errno(e))
    }

    pub fn block(file: &str, block: u64, e: CryptoError) -> Self {
        FsError::Block {
            file: file.to_owned(),
            block,
            reason: e.to_string(),
        }
    }

    pub fn header(file: &str, e: impl std::fmt::Display) -> Self {
        FsError::Header {
            file: file.to_owned(),
            reason: e.to_string(),
        }
    }

    /// A KMS failure while `action` for `file`.
    pub fn kms(file: &str, action: &'static str, source: KmsError) -> Self {
        FsError::Kms {
            file: file.to_owned(),
            action,
            source: Box::new(source),
        }
    }

    pub fn backing(file: &str, reason: &'static str) -> Self {
        FsError::Backing {
            file: file.to_owned(),
            reason,
        }
    }

    pub fn refused(file: &str, reason: &'static str) -> Self {
        FsError::Refused {
            file: file.to_owned(),
            reason,
        }
    }

    pub fn header_format(file: &str, e: FormatError) -> Self {
        Self::header(file, e)
    }

    /// The errno the kernel gets. Integrity, header, backing-object and KMS
    /// failures are EIO; refusals EPERM.
    pub fn to_errno(&self) -> i32 {
        match self {
            FsError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            FsError::Errno(Errno(e)) => *e,
            FsError::Refused { .. } => libc::EPERM,
            FsError::Block { .. }
            | FsError::Header { .. }
            | FsError::Backing { .. }
            | FsError::Kms { .. } => libc::EIO,
        }
    }

    /// Logs the error if an operator should hear of it, once, naming the
    /// request `op` that failed: integrity, header, backing-object and KMS
    /// failures (with file and block), refusals, and a full backing
    /// filesystem. Ordinary errors such as ENOENT are not logged. Called
    /// where the reply is made.
    pub fn log(&self, op: &str) {
        match self {
            FsError::Io(e) if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) => {
                // With the writeback cache the writer may only see this at
                // fsync or close; say it where an operator looks.
                tracing::warn!(
                    "{op}: backing filesystem refused space ({e}): the request failed and changed \
                     nothing; free space in the backing directory"
                )
            }
            FsError::Refused { .. } => tracing::warn!("{op}: {self}"),
            FsError::Block { .. }
            | FsError::Header { .. }
            | FsError::Backing { .. }
            | FsError::Kms { .. } => tracing::error!("{op}: {self}"),
            FsError::Io(_) | FsError::Errno(_) => {}
        }
    }
}
