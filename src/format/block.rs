//! Block geometry: how plaintext offsets map to ciphertext blocks.
//!
//! The ciphertext file is a sequence of sealed blocks. A block of layout V1
//! is `nonce (12) || ciphertext (len) || tag (16)`; layout V2 puts the
//! 8-byte epoch of its key in front: `epoch (8) || nonce (12) || ciphertext
//! || tag (16)`. Every block but the last holds exactly `block_size`
//! plaintext bytes, so the plaintext size follows from the ciphertext size
//! and the layout alone (no header read on getattr).

/// AEAD nonce length shared by both suites.
pub const NONCE_LEN: usize = 12;
/// AEAD tag length shared by both suites.
pub const TAG_LEN: usize = 16;
/// Length of the epoch field in front of a V2 block.
pub const EPOCH_LEN: usize = 8;
/// Length of the per-block associated data.
pub const AAD_LEN: usize = 16 + 8;

/// Smallest and largest supported block sizes (log2).
pub const MIN_BLOCK_SHIFT: u8 = 12;
pub const MAX_BLOCK_SHIFT: u8 = 20;

/// How a sealed block is laid out. A file's header version decides it
/// (version 1: V1, version 2: V2), and every size and offset depends on it,
/// so it is part of [`BlockGeometry`] rather than a constant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockLayout {
    /// `nonce (12) || ciphertext || tag (16)`, one block key per file.
    V1,
    /// `epoch (8) || nonce (12) || ciphertext || tag (16)`, one key per epoch.
    V2,
}

impl BlockLayout {
    /// Where the AEAD ciphertext (the plaintext, before sealing) starts in a
    /// sealed block.
    pub const fn plaintext_offset(self) -> usize {
        match self {
            BlockLayout::V1 => NONCE_LEN,
            BlockLayout::V2 => EPOCH_LEN + NONCE_LEN,
        }
    }

    /// Bytes a sealed block adds to its plaintext.
    pub const fn overhead(self) -> usize {
        self.plaintext_offset() + TAG_LEN
    }
}

/// Block size and layout of one file. Invariant: `block_size` is a power of
/// two in `[4 KiB, 1 MiB]` (checked by [`BlockGeometry::new`]). There is no
/// constructor without a layout: a V1 geometry used on V2 blocks (or the
/// reverse) would misplace every block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockGeometry {
    shift: u8,
    layout: BlockLayout,
}

impl BlockGeometry {
    /// Blocks of `2^shift` plaintext bytes laid out as `layout`.
    pub fn new(shift: u8, layout: BlockLayout) -> Result<Self, super::FormatError> {
        if (MIN_BLOCK_SHIFT..=MAX_BLOCK_SHIFT).contains(&shift) {
            Ok(Self { shift, layout })
        } else {
            Err(super::FormatError::BadBlockSize(shift))
        }
    }

    /// As [`Self::new`] with the block size in bytes (a power of two in
    /// range).
    pub fn from_size(bytes: u64, layout: BlockLayout) -> Result<Self, super::FormatError> {
        if !bytes.is_power_of_two() {
            return Err(super::FormatError::BadBlockSize(0));
        }
        Self::new(bytes.trailing_zeros() as u8, layout)
    }

    pub fn shift(&self) -> u8 {
        self.shift
    }

    pub fn layout(&self) -> BlockLayout {
        self.layout
    }

    /// Bytes a sealed block adds to its plaintext (28 for V1, 36 for V2).
    pub fn overhead(&self) -> usize {
        self.layout.overhead()
    }

    /// Offset of the plaintext inside a sealed-block slot (12 for V1, 20
    /// for V2): where the data path lays bytes to be sealed and where
    /// opened bytes come from.
    pub fn plaintext_offset(&self) -> usize {
        self.layout.plaintext_offset()
    }

    /// Plaintext bytes in a full block.
    pub fn block_size(&self) -> usize {
        1 << self.shift
    }

    /// Ciphertext bytes of a full block.
    pub fn sealed_block_size(&self) -> usize {
        self.block_size() + self.overhead()
    }

    /// Plaintext size of a file whose ciphertext is `ct_size` bytes. A trailing
    /// fragment too short to hold a sealed block (torn or truncated) counts
    /// as one byte, so the damage stays visible: reading it gives EIO rather
    /// than a file that silently ends early.
    pub fn plaintext_size(&self, ct_size: u64) -> u64 {
        let sealed = self.sealed_block_size() as u64;
        let overhead = self.overhead() as u64;
        let full = ct_size / sealed;
        let rem = ct_size % sealed;
        let tail = match rem {
            0 => 0,
            r if r <= overhead => 1,
            r => r - overhead,
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
            rem + self.overhead() as u64
        };
        full * self.sealed_block_size() as u64 + tail
    }

    /// True when a ciphertext size cannot have been produced by a whole
    /// number of sealed blocks (a block torn by a crash or truncation).
    pub fn has_torn_tail(&self, ct_size: u64) -> bool {
        let rem = ct_size % self.sealed_block_size() as u64;
        rem != 0 && rem <= self.overhead() as u64
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

    const LAYOUTS: [BlockLayout; 2] = [BlockLayout::V1, BlockLayout::V2];

    fn v1(shift: u8) -> BlockGeometry {
        BlockGeometry::new(shift, BlockLayout::V1).unwrap()
    }

    fn v2(shift: u8) -> BlockGeometry {
        BlockGeometry::new(shift, BlockLayout::V2).unwrap()
    }

    #[test]
    fn layout_overheads() {
        assert_eq!((v1(12).plaintext_offset(), v1(12).overhead()), (12, 28));
        assert_eq!((v2(12).plaintext_offset(), v2(12).overhead()), (20, 36));
        assert_eq!(v2(12).sealed_block_size(), 4132);
        assert_ne!(v1(12), v2(12));
    }

    #[test]
    fn sizes_round_trip_at_boundaries() {
        for g in [v1(12), v2(12)] {
            for pt in [0u64, 1, 4095, 4096, 4097, 8192, 8193, 10 << 20] {
                let ct = g.ciphertext_size(pt);
                assert_eq!(g.plaintext_size(ct), pt, "pt={pt} {:?}", g.layout());
                assert!(!g.has_torn_tail(ct));
            }
        }
        let g = v1(12);
        assert_eq!(g.ciphertext_size(1), 29);
        assert_eq!(g.ciphertext_size(4096), 4124);
        assert_eq!(g.ciphertext_size(4097), 4124 + 29);
        // The V2 examples of docs/FORMAT.md section 3.3.
        let g = v2(12);
        assert_eq!(g.ciphertext_size(1), 37);
        assert_eq!(g.ciphertext_size(4096), 4132);
        assert_eq!(g.ciphertext_size(4097), 4132 + 37);
        assert_eq!(g.ciphertext_size(10_000), 10_108);
        assert_eq!(g.ciphertext_size(1 << 20), 1_057_792);
        assert_eq!(g.sealed_block_start(3), 3 * 4132);
    }

    #[test]
    fn torn_tail_is_detected() {
        let g = v1(12);
        assert!(g.has_torn_tail(4124 + 5));
        assert!(g.has_torn_tail(28));
        assert!(!g.has_torn_tail(29));
        assert_eq!(g.plaintext_size(4124 + 5), 4097);
        let g = v2(12);
        assert!(g.has_torn_tail(4132 + 5));
        assert!(g.has_torn_tail(36));
        assert!(!g.has_torn_tail(37));
        assert_eq!(g.plaintext_size(36), 1);
        assert_eq!(g.plaintext_size(37), 1);
        assert_eq!(g.plaintext_size(4132 + 36), 4097);
    }

    #[test]
    fn block_sizes_outside_range_are_refused() {
        for layout in LAYOUTS {
            assert!(BlockGeometry::from_size(2048, layout).is_err());
            assert!(BlockGeometry::from_size(3 << 12, layout).is_err());
            assert!(BlockGeometry::from_size(2 << 20, layout).is_err());
            assert!(BlockGeometry::from_size(1 << 20, layout).is_ok());
            assert!(BlockGeometry::new(11, layout).is_err());
            assert!(BlockGeometry::new(21, layout).is_err());
        }
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

    fn layout() -> impl Strategy<Value = BlockLayout> {
        prop_oneof![Just(BlockLayout::V1), Just(BlockLayout::V2)]
    }

    proptest! {
        #[test]
        fn plaintext_size_inverts_ciphertext_size(
            shift in 12u8..=20, layout in layout(), pt in 0u64..(1u64 << 40)
        ) {
            let g = BlockGeometry::new(shift, layout).unwrap();
            prop_assert_eq!(g.plaintext_size(g.ciphertext_size(pt)), pt);
        }

        /// Every ciphertext size maps to a plaintext size whose ciphertext is
        /// the same, except torn tails, which count as one byte.
        #[test]
        fn ciphertext_sizes_are_whole_blocks_or_torn(
            shift in 12u8..=20, layout in layout(), ct in 0u64..(1u64 << 40)
        ) {
            let g = BlockGeometry::new(shift, layout).unwrap();
            let pt = g.plaintext_size(ct);
            let rem = ct % g.sealed_block_size() as u64;
            if g.has_torn_tail(ct) {
                prop_assert!(rem >= 1 && rem <= g.overhead() as u64);
                prop_assert_eq!(pt, g.block_start(ct / g.sealed_block_size() as u64) + 1);
            } else {
                prop_assert_eq!(g.ciphertext_size(pt), ct);
            }
        }

        /// Block `i` starts where the sealed blocks before it end, and the
        /// last block's sealed length is its plaintext length plus overhead.
        #[test]
        fn offsets_agree_with_sizes(
            shift in 12u8..=20, layout in layout(), pt in 1u64..(1u64 << 32)
        ) {
            let g = BlockGeometry::new(shift, layout).unwrap();
            let last = g.block_of(pt - 1);
            prop_assert_eq!(g.sealed_block_start(last), g.ciphertext_size(g.block_start(last)));
            prop_assert_eq!(
                g.ciphertext_size(pt) - g.sealed_block_start(last),
                (g.block_len(last, pt) + g.overhead()) as u64
            );
        }

        #[test]
        fn blocks_within_are_whole_and_all(start in 0u64..100_000, len in 0u64..100_000) {
            let g = v1(12);
            let end = start + len;
            let whole = g.blocks_within(start, end);
            for i in whole.start.saturating_sub(2)..whole.end + 2 {
                let inside = g.block_start(i) >= start && g.block_start(i + 1) <= end;
                prop_assert_eq!(whole.contains(&i), inside, "block {}", i);
            }
        }

        #[test]
        fn block_lens_sum_to_size(pt in 0u64..100_000) {
            let g = v2(12);
            let blocks = pt.div_ceil(4096);
            let sum: u64 = (0..blocks + 1).map(|i| g.block_len(i, pt) as u64).sum();
            prop_assert_eq!(sum, pt);
        }
    }
}
