//! Redo records of operations that change a file in more than one step and
//! cannot be ordered so that every intermediate state reads whole. Today
//! that is a truncate that cuts or extends a partial block: the boundary
//! block is rewritten at its new length and the file's size set, and a
//! crash between the two would leave a block that fails authentication.
//! The record holds everything needed to finish the operation, so a crash
//! anywhere leaves either the old file or one the next open completes.
//! docs/FORMAT.md, "Truncate records"; docs/ARCHITECTURE.md, "Crash safety".

use super::header::FILE_ID_LEN;
use super::FormatError;

pub const TRUNCATE_MAGIC: &[u8; 8] = b"KMSFSTRC";
pub const TRUNCATE_VERSION: u16 = 1;
/// Longest sealed block a record may carry: a 1 MiB block and its overhead.
pub const MAX_SEALED_BLOCK: usize = (1 << 20) + 64;
/// Length of the digest of the boundary block's old sealed bytes.
pub const DIGEST_LEN: usize = 32;

/// A truncate in flight: block `block_index` of the file with ID `file_id`
/// becomes `sealed_block`, then the data file's size becomes
/// `ciphertext_size`. `old_block_digest` (SHA-256 of that block's sealed
/// bytes before) tells a state before the rewrite from a file changed
/// after the truncate finished.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct TruncateRecord {
    pub file_id: [u8; FILE_ID_LEN],
    pub ciphertext_size: u64,
    pub block_index: u64,
    pub old_block_digest: [u8; DIGEST_LEN],
    pub sealed_block: Vec<u8>,
}

impl TruncateRecord {
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        if self.sealed_block.len() > MAX_SEALED_BLOCK {
            return Err(FormatError::FieldTooLong("sealed block"));
        }
        let mut out = Vec::with_capacity(80 + self.sealed_block.len());
        out.extend_from_slice(TRUNCATE_MAGIC);
        out.extend_from_slice(&TRUNCATE_VERSION.to_be_bytes());
        out.extend_from_slice(&self.file_id);
        out.extend_from_slice(&self.ciphertext_size.to_be_bytes());
        out.extend_from_slice(&self.block_index.to_be_bytes());
        out.extend_from_slice(&self.old_block_digest);
        out.extend_from_slice(&(self.sealed_block.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.sealed_block);
        Ok(out)
    }

    /// Parses a record's bytes (structure only: whether the block belongs
    /// to the file is checked by authenticating it).
    pub fn parse(bytes: &[u8]) -> Result<Self, FormatError> {
        let mut pos = 0usize;
        let mut take = |n: usize| -> Result<&[u8], FormatError> {
            let end = pos.checked_add(n).ok_or(FormatError::Truncated)?;
            let s = bytes.get(pos..end).ok_or(FormatError::Truncated)?;
            pos = end;
            Ok(s)
        };
        if take(TRUNCATE_MAGIC.len()).map_err(|_| FormatError::BadMagic)? != TRUNCATE_MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = u16::from_be_bytes(take(2)?.try_into().expect("2 bytes"));
        if version != TRUNCATE_VERSION {
            return Err(FormatError::UnsupportedVersion(version, TRUNCATE_VERSION));
        }
        let file_id = take(FILE_ID_LEN)?.try_into().expect("file ID length");
        let ciphertext_size = u64::from_be_bytes(take(8)?.try_into().expect("8 bytes"));
        let block_index = u64::from_be_bytes(take(8)?.try_into().expect("8 bytes"));
        let old_block_digest = take(DIGEST_LEN)?.try_into().expect("digest length");
        let len = u32::from_be_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
        if len > MAX_SEALED_BLOCK {
            return Err(FormatError::FieldTooLong("sealed block"));
        }
        let sealed_block = take(len)?.to_vec();
        if pos != bytes.len() {
            return Err(FormatError::TrailingBytes(bytes.len() - pos));
        }
        Ok(Self {
            file_id,
            ciphertext_size,
            block_index,
            old_block_digest,
            sealed_block,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TruncateRecord {
        TruncateRecord {
            file_id: [7; FILE_ID_LEN],
            ciphertext_size: 12_345,
            block_index: 3,
            old_block_digest: [9; DIGEST_LEN],
            sealed_block: vec![1, 2, 3, 4],
        }
    }

    #[test]
    fn round_trip() {
        let r = sample();
        assert_eq!(TruncateRecord::parse(&r.encode().unwrap()).unwrap(), r);
    }

    #[test]
    fn every_cut_and_extension_is_refused() {
        let bytes = sample().encode().unwrap();
        for n in 0..bytes.len() {
            assert!(TruncateRecord::parse(&bytes[..n]).is_err(), "prefix {n}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            TruncateRecord::parse(&longer),
            Err(FormatError::TrailingBytes(1))
        );
        let mut bad = bytes;
        bad[0] ^= 1;
        assert_eq!(TruncateRecord::parse(&bad), Err(FormatError::BadMagic));
    }
}
