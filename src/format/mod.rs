//! The on-disk format: sidecar header layout, block geometry and backing
//! names. Pure code: parses and builds byte slices, does no I/O and no crypto,
//! so it can be fuzzed and tested against fixed vectors (docs/FORMAT.md).

pub mod block;
pub mod header;
pub mod ik;
pub mod intent;
pub mod names;

pub use block::{BlockGeometry, BlockLayout};
pub use header::{CipherSuite, Header, KeyRef, ParsedHeader, WrappedDek};

/// Errors from parsing or building format structures. None of them can be
/// fixed by retrying: the bytes on disk are what they are.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a kmsfs header (bad magic)")]
    BadMagic,
    /// The version found, and the newest this build reads (it reads every
    /// version from 1 up to that).
    #[error(
        "header format version {0} is not supported by this kmsfs (supports 1 to {1}); upgrade kmsfs"
    )]
    UnsupportedVersion(u16, u16),
    #[error("unknown cipher suite id {0}")]
    UnknownCipher(u8),
    #[error("invalid block size 2^{0}: must be a power of two from 4 KiB to 1 MiB")]
    BadBlockSize(u8),
    #[error("header is truncated")]
    Truncated,
    #[error("header has {0} unexpected trailing bytes")]
    TrailingBytes(usize),
    #[error("header field {0} is too long")]
    FieldTooLong(&'static str),
    #[error("header field {0} is not valid UTF-8")]
    NotUtf8(&'static str),
    #[error("header flags {0:#04x} are not known to this kmsfs; upgrade kmsfs")]
    UnknownFlags(u8),
    #[error(
        "a version {version} header cannot hold {count} wrapped DEKs (version 1 holds one, version 2 one to {max})",
        max = header::MAX_WRAPS
    )]
    BadWrapCount { version: u16, count: usize },
    #[error("intermediate key object: {0}")]
    IkObject(&'static str),
}
