//! Block geometry: how plaintext offsets map to ciphertext blocks.
//!
//! The ciphertext file is a sequence of sealed blocks, each
//! `nonce (12) || ciphertext (len) || tag (16)`. Every block but the last holds
//! exactly `block_size` plaintext bytes, so the plaintext size follows from the
//! ciphertext size alone (no header read on getattr).

/// AEAD nonce length shared by both suites.
pub const NONCE_LEN: usize = 12;
/// AEAD tag length shared by both suites.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed block adds to its plaintext.
pub const BLOCK_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
/// Length of the per-block associated data.
pub const AAD_LEN: usize = 16 + 8;

/// Smallest and largest supported block sizes (log2).
pub const MIN_BLOCK_SHIFT: u8 = 12;
pub const MAX_BLOCK_SHIFT: u8 = 20;

/// Block layout of one file. Invariant: `block_size` is a power of two in
/// `[4 KiB, 1 MiB]` (checked by [`BlockGeometry::from_shift`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockGeometry {
    shift: u8,
}

impl BlockGeometry {
    pub fn from_shift(shift: u8) -> Result<Self, super::FormatError> {
        if (MIN_BLOCK_SHIFT..=MAX_BLOCK_SHIFT).contains(&shift) {
            Ok(Self { shift })
        } else {
            Err(super::FormatError::BadBlockSize(shift))
        }
    }

    /// Accepts a block size in bytes (must be a power of two in range).
    pub fn from_size(bytes: u64) -> Result<Self, super::FormatError> {
        if !bytes.is_power_of_two() {
            return Err(super::FormatError::BadBlockSize(0));
        }
        Self::from_shift(bytes.trailing_zeros() as u8)
    }

    pub fn shift(&self) -> u8 {
        self.shift
    }

    /// Plaintext bytes in a full block.
    pub fn block_size(&self) -> usize {
        1 << self.shift
    }

    /// Ciphertext bytes of a full block.
    pub fn sealed_block_size(&self) -> usize {
        self.block_size() + BLOCK_OVERHEAD
    }

    /// Plaintext size of a file whose ciphertext is `ct_size` bytes. A trailing
    /// fragment too short to hold a sealed block (torn or truncated) counts
    /// as one byte, so the damage stays visible: reading it gives EIO rather
    /// than a file that silently ends early.
    pub fn plaintext_size(&self, ct_size: u64) -> u64 {
        let sealed = self.sealed_block_size() as u64;
        let full = ct_size / sealed;
        let rem = ct_size % sealed;
        let tail = match rem {
            0 => 0,
            r if r <= BLOCK_OVERHEAD as u64 => 1,
            r => r - BLOCK_OVERHEAD as u64,
        };
        (full << self.shift) + tail
    }

    /// Ciphertext size of a file holding `pt_size` plaintext bytes.
    pub fn ciphertext_size(&self, pt_size: u64) -> u64 {
        let full = pt_size >> self.shift;
        let rem = pt_size & (self.block_size() as u64 - 1);
        let tail = if rem == 0 {
            0
        } else {
            rem + BLOCK_OVERHEAD as u64
        };
        full * self.sealed_block_size() as u64 + tail
    }

    /// True when a ciphertext size cannot have been produced by a whole
    /// number of sealed blocks (a block torn by a crash or truncation).
    pub fn has_torn_tail(&self, ct_size: u64) -> bool {
        let rem = ct_size % self.sealed_block_size() as u64;
        rem != 0 && rem <= BLOCK_OVERHEAD as u64
    }

    /// Index of the block holding plaintext offset `offset`.
    pub fn block_of(&self, offset: u64) -> u64 {
        offset >> self.shift
    }

    /// Plaintext offset where block `index` starts.
    pub fn block_start(&self, index: u64) -> u64 {
        index << self.shift
    }

    /// Ciphertext offset where block `index` starts.
    pub fn sealed_block_start(&self, index: u64) -> u64 {
        index * self.sealed_block_size() as u64
    }

    /// Plaintext length of block `index` in a file of `pt_size` bytes (0 when
    /// the block lies past the end).
    pub fn block_len(&self, index: u64, pt_size: u64) -> usize {
        let start = self.block_start(index);
        if start >= pt_size {
            0
        } else {
            (pt_size - start).min(self.block_size() as u64) as usize
        }
    }

    /// Indices of the blocks lying wholly inside plaintext `[start, end)`:
    /// full-length whatever the file's size.
    pub fn blocks_within(&self, start: u64, end: u64) -> std::ops::Range<u64> {
        let bs = self.block_size() as u64;
        let from = start.div_ceil(bs);
        let to = (end / bs).max(from);
        from..to
    }
}

/// Associated data of block `index` in the file `file_id`: binds each block to
/// its position and its file, so blocks cannot be moved or swapped unnoticed.
pub fn block_aad(file_id: &[u8; 16], index: u64) -> [u8; AAD_LEN] {
    let mut aad = [0u8; AAD_LEN];
    aad[..16].copy_from_slice(file_id);
    aad[16..].copy_from_slice(&index.to_be_bytes());
    aad
}

/// A sealed block of all zero bytes is a hole (left by truncate-up or a
/// sparse write) and reads as zeros. Real sealed blocks are never all zero
/// except with negligible probability (random nonce and tag).
pub fn is_hole(sealed: &[u8]) -> bool {
    // Word-wise check; this runs on every block read.
    let (prefix, words, suffix) = unsafe { sealed.align_to::<u64>() };
    prefix.iter().all(|&b| b == 0)
        && words.iter().all(|&w| w == 0)
        && suffix.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes_round_trip_at_boundaries() {
        let g = BlockGeometry::from_shift(12).unwrap();
        for pt in [0u64, 1, 4095, 4096, 4097, 8192, 8193, 10 << 20] {
            let ct = g.ciphertext_size(pt);
            assert_eq!(g.plaintext_size(ct), pt, "pt={pt}");
            assert!(!g.has_torn_tail(ct));
        }
        assert_eq!(g.ciphertext_size(1), 29);
        assert_eq!(g.ciphertext_size(4096), 4124);
        assert_eq!(g.ciphertext_size(4097), 4124 + 29);
    }

    #[test]
    fn torn_tail_is_detected() {
        let g = BlockGeometry::from_shift(12).unwrap();
        assert!(g.has_torn_tail(4124 + 5));
        assert!(g.has_torn_tail(28));
        assert!(!g.has_torn_tail(29));
        assert_eq!(g.plaintext_size(4124 + 5), 4097);
    }

    #[test]
    fn block_sizes_outside_range_are_refused() {
        assert!(BlockGeometry::from_size(2048).is_err());
        assert!(BlockGeometry::from_size(3 << 12).is_err());
        assert!(BlockGeometry::from_size(2 << 20).is_err());
        assert!(BlockGeometry::from_size(1 << 20).is_ok());
    }

    #[test]
    fn hole_detection() {
        assert!(is_hole(&[0u8; 4124]));
        let mut b = [0u8; 4124];
        b[4123] = 1;
        assert!(!is_hole(&b));
        b[4123] = 0;
        b[0] = 1;
        assert!(!is_hole(&b));
    }

    proptest! {
        #[test]
        fn plaintext_size_inverts_ciphertext_size(shift in 12u8..=20, pt in 0u64..(1u64 << 40)) {
            let g = BlockGeometry::from_shift(shift).unwrap();
            prop_assert_eq!(g.plaintext_size(g.ciphertext_size(pt)), pt);
        }

        #[test]
        fn blocks_within_are_whole_and_all(start in 0u64..100_000, len in 0u64..100_000) {
            let g = BlockGeometry::from_shift(12).unwrap();
            let end = start + len;
            let whole = g.blocks_within(start, end);
            for i in whole.start.saturating_sub(2)..whole.end + 2 {
                let inside = g.block_start(i) >= start && g.block_start(i + 1) <= end;
                prop_assert_eq!(whole.contains(&i), inside, "block {}", i);
            }
        }

        #[test]
        fn block_lens_sum_to_size(pt in 0u64..100_000) {
            let g = BlockGeometry::from_shift(12).unwrap();
            let blocks = pt.div_ceil(4096);
            let sum: u64 = (0..blocks + 1).map(|i| g.block_len(i, pt) as u64).sum();
            prop_assert_eq!(sum, pt);
        }
    }
}
