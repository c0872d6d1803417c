//! Filesystem-layer errors and their one mapping to errno.

use crate::crypto::CryptoError;
use crate::kms::KmsError;
use std::sync::atomic::{AtomicU64, Ordering};

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
    /// Whether trying again later may succeed (a KMS unreachable or slow).
    pub fn is_retryable(&self) -> bool {
        matches!(self, FsError::Kms { source, .. } if source.is_retryable())
    }

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
                // fsync or close; say it where an operator looks. A full
                // disk fails every write, so at most a line a second.
                if let Some(more) = SPACE_WARNINGS.due(monotonic_secs()) {
                    let more = if more > 0 {
                        format!(
                            " ({more} more requests failed the same way since the last such line)"
                        )
                    } else {
                        String::new()
                    };
                    tracing::warn!(
                        "{op}: backing filesystem refused space ({e}): the request failed and \
                         changed nothing; free space in the backing directory{more}"
                    )
                }
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

/// Seconds on a clock that never steps back, from 1 at its first use.
fn monotonic_secs() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_secs()
        + 1
}

/// The "refused space" warnings: one a second at most.
static SPACE_WARNINGS: OncePerSecond = OncePerSecond::new();

/// Lets one event a second through and counts the ones it holds back.
pub(crate) struct OncePerSecond {
    /// The second (of [`monotonic_secs`]) of the last event let through.
    last: AtomicU64,
    held_back: AtomicU64,
}

impl OncePerSecond {
    pub(crate) const fn new() -> Self {
        Self {
            last: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
        }
    }

    /// [`Self::due`] for an event now.
    pub(crate) fn due_now(&self) -> Option<u64> {
        self.due(monotonic_secs())
    }

    /// For an event at second `now`: Some(events held back since the last
    /// one let through) if this one goes through, None if it is held back.
    fn due(&self, now: u64) -> Option<u64> {
        let last = self.last.load(Ordering::Relaxed);
        if now > last
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.held_back.swap(0, Ordering::Relaxed))
        } else {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::OncePerSecond;

    #[test]
    fn one_event_a_second_and_a_count_of_the_rest() {
        let limit = OncePerSecond::new();
        assert_eq!(limit.due(100), Some(0));
        assert_eq!(limit.due(100), None);
        assert_eq!(limit.due(100), None);
        assert_eq!(limit.due(101), Some(2));
        assert_eq!(limit.due(101), None);
        assert_eq!(limit.due(105), Some(1));
    }
}
