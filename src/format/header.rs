//! The sidecar header: everything needed to decrypt one file, except the KEK.
//!
//! Layout (all integers big-endian; see docs/FORMAT.md section 2):
//! ```text
//! magic "KMSFSHDR" (8) | version u16 | cipher u8 | block shift u8 | file id (16)
//! version 1: wrap
//! version 2: flags u8 (0) | wrap count u8 (1..=8) | count x wrap
//! HMAC-SHA256 over everything before it (32)
//!
//! wrap = provider (u8 len + bytes) | key id (u16 len + bytes)
//!        | key version (u8 len + bytes) | wrapped DEK (u16 len + bytes)
//! ```
//! The version also fixes the block layout (1: V1, 2: V2). The MAC key is
//! derived from the DEK (`crypto::open_header`), so the header is
//! authenticated once the DEK is unwrapped; parsing here only checks
//! structure.

use super::block::{BlockGeometry, BlockLayout};
use super::FormatError;

pub const MAGIC: &[u8; 8] = b"KMSFSHDR";
/// Header versions this build reads and writes.
pub const VERSION_1: u16 = 1;
pub const VERSION_2: u16 = 2;
pub const FILE_ID_LEN: usize = 16;
pub const MAC_LEN: usize = 32;
/// Most wrapped DEKs a version 2 header holds.
pub const MAX_WRAPS: usize = 8;

/// The block layout a header version implies: the one place that pairs them.
fn layout_of(version: u16) -> Option<BlockLayout> {
    match version {
        VERSION_1 => Some(BlockLayout::V1),
        VERSION_2 => Some(BlockLayout::V2),
        _ => None,
    }
}

fn version_of(layout: BlockLayout) -> u16 {
    match layout {
        BlockLayout::V1 => VERSION_1,
        BlockLayout::V2 => VERSION_2,
    }
}

/// AEAD used for the blocks of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CipherSuite {
    #[serde(rename = "aes-256-gcm")]
    Aes256Gcm,
    #[serde(rename = "chacha20-poly1305")]
    ChaCha20Poly1305,
}

impl CipherSuite {
    pub fn id(self) -> u8 {
        match self {
            CipherSuite::Aes256Gcm => 1,
            CipherSuite::ChaCha20Poly1305 => 2,
        }
    }

    pub fn from_id(id: u8) -> Result<Self, FormatError> {
        match id {
            1 => Ok(CipherSuite::Aes256Gcm),
            2 => Ok(CipherSuite::ChaCha20Poly1305),
            other => Err(FormatError::UnknownCipher(other)),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CipherSuite::Aes256Gcm => "aes-256-gcm",
            CipherSuite::ChaCha20Poly1305 => "chacha20-poly1305",
        }
    }
}

impl std::str::FromStr for CipherSuite {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "aes-256-gcm" => Ok(CipherSuite::Aes256Gcm),
            "chacha20-poly1305" => Ok(CipherSuite::ChaCha20Poly1305),
            other => Err(format!(
                "unknown cipher {other:?}: use aes-256-gcm or chacha20-poly1305"
            )),
        }
    }
}

/// Which KMS key wrapped a DEK. Not secret.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct KeyRef {
    /// Provider kind, e.g. "local", "vault", "aws".
    pub provider: String,
    /// Provider-specific key name (keyring key, transit key, ARN, ...).
    pub key_id: String,
    /// Version of the key that wrapped the DEK; empty when the provider
    /// embeds it in the wrapped blob.
    pub key_version: String,
}

/// A DEK as a KMS wrapped it (opaque ciphertext), with the key that did so.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WrappedDek {
    pub key_ref: KeyRef,
    pub blob: Vec<u8>,
}

/// Parsed, not yet authenticated, header of one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub cipher: CipherSuite,
    /// Block size and layout. The layout is the header's version (see
    /// [`Header::version`]), so a header can never disagree with itself.
    pub geometry: BlockGeometry,
    pub file_id: [u8; FILE_ID_LEN],
    /// The file's DEK, wrapped by each KMS key its key references name: the
    /// first by the key of the file's policy, any others for further
    /// recipients. Never empty; exactly one in a version 1 header.
    wraps: Vec<WrappedDek>,
}

/// A header together with the bytes its MAC covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedHeader {
    pub header: Header,
    /// The header bytes before the MAC.
    pub authenticated: Vec<u8>,
    pub mac: [u8; MAC_LEN],
}

/// Whether a header of `version` can hold `count` wrapped DEKs.
fn check_wrap_count(version: u16, count: usize) -> Result<(), FormatError> {
    let fits = match version {
        VERSION_1 => count == 1,
        _ => (1..=MAX_WRAPS).contains(&count),
    };
    if fits {
        Ok(())
    } else {
        Err(FormatError::BadWrapCount { version, count })
    }
}

impl Header {
    /// A header whose version follows `geometry`'s layout (V1: version 1,
    /// V2: version 2), holding `wraps` (the policy's wrap first).
    pub fn new(
        cipher: CipherSuite, geometry: BlockGeometry, file_id: [u8; FILE_ID_LEN],
        wraps: Vec<WrappedDek>,
    ) -> Result<Self, FormatError> {
        check_wrap_count(version_of(geometry.layout()), wraps.len())?;
        Ok(Self {
            cipher,
            geometry,
            file_id,
            wraps,
        })
    }

    /// A version 1 header (block layout V1): one wrapped DEK.
    pub fn v1(
        cipher: CipherSuite, block_shift: u8, file_id: [u8; FILE_ID_LEN], wrapped: WrappedDek,
    ) -> Result<Self, FormatError> {
        let geometry = BlockGeometry::new(block_shift, BlockLayout::V1)?;
        Self::new(cipher, geometry, file_id, vec![wrapped])
    }

    /// A version 2 header (block layout V2): 1 to [`MAX_WRAPS`] wrapped
    /// DEKs, the policy's first.
    pub fn v2(
        cipher: CipherSuite, block_shift: u8, file_id: [u8; FILE_ID_LEN], wraps: Vec<WrappedDek>,
    ) -> Result<Self, FormatError> {
        let geometry = BlockGeometry::new(block_shift, BlockLayout::V2)?;
        Self::new(cipher, geometry, file_id, wraps)
    }

    /// The header format version: 1 or 2.
    pub fn version(&self) -> u16 {
        version_of(self.geometry.layout())
    }

    /// Every wrapped DEK, the primary first.
    pub fn wraps(&self) -> &[WrappedDek] {
        &self.wraps
    }

    /// The DEK as the file's policy wrapped it at creation.
    pub fn primary(&self) -> &WrappedDek {
        &self.wraps[0]
    }

    /// Encodes the header without its MAC; the caller appends the MAC.
    pub fn encode_unauthenticated(&self) -> Result<Vec<u8>, FormatError> {
        let version = self.version();
        // `geometry` is public and may have been changed since `new`.
        check_wrap_count(version, self.wraps.len())?;
        let wraps_len: usize = self
            .wraps
            .iter()
            .map(|w| {
                let k = &w.key_ref;
                6 + k.provider.len() + k.key_id.len() + k.key_version.len() + w.blob.len()
            })
            .sum();
        let mut out = Vec::with_capacity(30 + wraps_len + MAC_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&version.to_be_bytes());
        out.push(self.cipher.id());
        out.push(self.geometry.shift());
        out.extend_from_slice(&self.file_id);
        if version == VERSION_2 {
            out.push(0); // flags: none defined
            out.push(self.wraps.len() as u8); // at most MAX_WRAPS, checked above
        }
        for w in &self.wraps {
            put_wrap(&mut out, w)?;
        }
        Ok(out)
    }
}

/// Appends the wrap encoding of `w` (see the module documentation): the
/// one encoding of a wrapped key, in headers and intermediate key objects.
pub(super) fn put_wrap(out: &mut Vec<u8>, w: &WrappedDek) -> Result<(), FormatError> {
    put_u8_field(out, "provider", w.key_ref.provider.as_bytes())?;
    put_u16_field(out, "key id", w.key_ref.key_id.as_bytes())?;
    put_u8_field(out, "key version", w.key_ref.key_version.as_bytes())?;
    put_u16_field(out, "wrapped DEK", &w.blob)
}

/// The wrap encoded at the start of `bytes`, and the bytes after it.
pub(super) fn take_wrap(bytes: &[u8]) -> Result<(WrappedDek, &[u8]), FormatError> {
    let mut r = Reader { buf: bytes, pos: 0 };
    let w = read_wrap(&mut r)?;
    Ok((w, &bytes[r.pos..]))
}

fn put_u8_field(out: &mut Vec<u8>, what: &'static str, v: &[u8]) -> Result<(), FormatError> {
    let len = u8::try_from(v.len()).map_err(|_| FormatError::FieldTooLong(what))?;
    out.push(len);
    out.extend_from_slice(v);
    Ok(())
}

fn put_u16_field(out: &mut Vec<u8>, what: &'static str, v: &[u8]) -> Result<(), FormatError> {
    let len = u16::try_from(v.len()).map_err(|_| FormatError::FieldTooLong(what))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(v);
    Ok(())
}

/// Cursor over the header bytes; every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let end = self.pos.checked_add(n).ok_or(FormatError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(FormatError::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FormatError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn string(&mut self, what: &'static str, len: usize) -> Result<String, FormatError> {
        let b = self.take(len)?;
        String::from_utf8(b.to_vec()).map_err(|_| FormatError::NotUtf8(what))
    }
}

/// Parses a sidecar's bytes. Checks structure only; authenticate with
/// `crypto::open_header` once the DEK is known.
pub fn parse(bytes: &[u8]) -> Result<ParsedHeader, FormatError> {
    let mut r = Reader { buf: bytes, pos: 0 };
    if r.take(MAGIC.len()).map_err(|_| FormatError::BadMagic)? != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let version = r.u16()?;
    let layout = layout_of(version).ok_or(FormatError::UnsupportedVersion(version, VERSION_2))?;
    let cipher = CipherSuite::from_id(r.u8()?)?;
    let geometry = BlockGeometry::new(r.u8()?, layout)?;
    let mut file_id = [0u8; FILE_ID_LEN];
    file_id.copy_from_slice(r.take(FILE_ID_LEN)?);
    let count = match layout {
        BlockLayout::V1 => 1,
        BlockLayout::V2 => {
            let flags = r.u8()?;
            if flags != 0 {
                return Err(FormatError::UnknownFlags(flags));
            }
            let count = r.u8()? as usize;
            check_wrap_count(version, count)?;
            count
        }
    };
    let wraps = (0..count)
        .map(|_| read_wrap(&mut r))
        .collect::<Result<Vec<_>, _>>()?;
    let authenticated = bytes[..r.pos].to_vec();
    let mut mac = [0u8; MAC_LEN];
    mac.copy_from_slice(r.take(MAC_LEN)?);
    if r.pos != bytes.len() {
        return Err(FormatError::TrailingBytes(bytes.len() - r.pos));
    }
    Ok(ParsedHeader {
        header: Header {
            cipher,
            geometry,
            file_id,
            wraps,
        },
        authenticated,
        mac,
    })
}

fn read_wrap(r: &mut Reader<'_>) -> Result<WrappedDek, FormatError> {
    let n = r.u8()? as usize;
    let provider = r.string("provider", n)?;
    let n = r.u16()? as usize;
    let key_id = r.string("key id", n)?;
    let n = r.u8()? as usize;
    let key_version = r.string("key version", n)?;
    let n = r.u16()? as usize;
    let blob = r.take(n)?.to_vec();
    Ok(WrappedDek {
        key_ref: KeyRef {
            provider,
            key_id,
            key_version,
        },
        blob,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn wrap(provider: &str, key_id: &str, key_version: &str, blob: &[u8]) -> WrappedDek {
        WrappedDek {
            key_ref: KeyRef {
                provider: provider.into(),
                key_id: key_id.into(),
                key_version: key_version.into(),
            },
            blob: blob.to_vec(),
        }
    }

    fn sample() -> Header {
        let w = wrap("local", "default", "1", &[0xAB; 60]);
        Header::v1(CipherSuite::Aes256Gcm, 12, [7u8; 16], w).unwrap()
    }

    fn sample_v2(count: usize) -> Header {
        let wraps = (0..count)
            .map(|i| wrap("vault", &format!("key-{i}"), "", &[i as u8; 40]))
            .collect();
        Header::v2(CipherSuite::ChaCha20Poly1305, 16, [9u8; 16], wraps).unwrap()
    }

    /// The header's bytes with a dummy MAC, as a sidecar would hold them.
    fn with_mac(h: &Header) -> Vec<u8> {
        let mut bytes = h.encode_unauthenticated().unwrap();
        bytes.extend_from_slice(&[0x55; MAC_LEN]);
        bytes
    }

    #[test]
    fn encode_parse_round_trip() {
        for h in [sample(), sample_v2(1), sample_v2(3), sample_v2(MAX_WRAPS)] {
            let bytes = with_mac(&h);
            let p = parse(&bytes).unwrap();
            assert_eq!(p.header, h);
            assert_eq!(p.authenticated, bytes[..bytes.len() - MAC_LEN]);
            assert_eq!(p.mac, [0x55; MAC_LEN]);
        }
    }

    #[test]
    fn versions_and_layouts_go_together() {
        let h = sample();
        assert_eq!((h.version(), h.geometry.layout()), (1, BlockLayout::V1));
        assert_eq!(h.wraps().len(), 1);
        let h = sample_v2(3);
        assert_eq!((h.version(), h.geometry.layout()), (2, BlockLayout::V2));
        assert_eq!(h.primary().key_ref.key_id, "key-0");
        assert_eq!(h.wraps()[2].key_ref.key_id, "key-2");
        let g = BlockGeometry::new(13, BlockLayout::V2).unwrap();
        let h = Header::new(
            CipherSuite::Aes256Gcm,
            g,
            [1; 16],
            vec![sample().primary().clone()],
        );
        assert_eq!(h.unwrap().version(), 2);
    }

    #[test]
    fn v2_layout_is_as_documented() {
        let h = sample_v2(2);
        let bytes = with_mac(&h);
        assert_eq!(&bytes[..8], MAGIC);
        assert_eq!(&bytes[8..10], &[0, 2]);
        assert_eq!(bytes[10], 2, "cipher");
        assert_eq!(bytes[11], 16, "block shift");
        assert_eq!(&bytes[12..28], &[9u8; 16]);
        assert_eq!(bytes[28], 0, "flags");
        assert_eq!(bytes[29], 2, "wrap count");
        // Each wrap: 1 + 5 ("vault") + 2 + 5 ("key-i") + 1 + 0 + 2 + 40.
        assert_eq!(&bytes[30..36], b"\x05vault");
        assert_eq!(bytes.len(), 30 + 2 * 56 + MAC_LEN);
    }

    #[test]
    fn wrap_counts_outside_the_version_are_refused() {
        let w = sample().primary().clone();
        let v1 = BlockGeometry::new(12, BlockLayout::V1).unwrap();
        let two = vec![w.clone(), w.clone()];
        assert_eq!(
            Header::new(CipherSuite::Aes256Gcm, v1, [0; 16], two),
            Err(FormatError::BadWrapCount {
                version: 1,
                count: 2
            })
        );
        assert_eq!(
            Header::v2(CipherSuite::Aes256Gcm, 12, [0; 16], vec![]),
            Err(FormatError::BadWrapCount {
                version: 2,
                count: 0
            })
        );
        assert_eq!(
            Header::v2(CipherSuite::Aes256Gcm, 12, [0; 16], vec![w; MAX_WRAPS + 1]),
            Err(FormatError::BadWrapCount {
                version: 2,
                count: 9
            })
        );
        // A public geometry switched to V1 under a multi-wrap header.
        let mut h = sample_v2(2);
        h.geometry = BlockGeometry::new(16, BlockLayout::V1).unwrap();
        assert_eq!(
            h.encode_unauthenticated(),
            Err(FormatError::BadWrapCount {
                version: 1,
                count: 2
            })
        );
    }

    #[test]
    fn unknown_version_is_a_clear_error() {
        for version in [0u8, 3, 9] {
            let mut bytes = with_mac(&sample());
            bytes[9] = version;
            assert_eq!(
                parse(&bytes),
                Err(FormatError::UnsupportedVersion(version as u16, 2))
            );
        }
    }

    #[test]
    fn v2_parse_errors_are_distinct() {
        let good = with_mac(&sample_v2(2));
        let with = |at: usize, val: u8| {
            let mut b = good.clone();
            b[at] = val;
            parse(&b)
        };
        assert_eq!(with(0, b'X'), Err(FormatError::BadMagic));
        assert_eq!(with(10, 7), Err(FormatError::UnknownCipher(7)));
        assert_eq!(with(11, 21), Err(FormatError::BadBlockSize(21)));
        assert_eq!(with(28, 1), Err(FormatError::UnknownFlags(1)));
        assert_eq!(with(28, 0x80), Err(FormatError::UnknownFlags(0x80)));
        let count = |count| Err(FormatError::BadWrapCount { version: 2, count });
        assert_eq!(with(29, 0), count(0));
        assert_eq!(with(29, 9), count(9));
        assert_eq!(with(29, 255), count(255));
        // One wrap more than the bytes hold, or one less than they do.
        assert_eq!(with(29, 3), Err(FormatError::Truncated));
        assert_eq!(with(29, 1), Err(FormatError::TrailingBytes(56)));
        // Invalid UTF-8 in each string field of the second wrap (at 86).
        assert_eq!(with(87, 0xFF), Err(FormatError::NotUtf8("provider")));
        assert_eq!(with(94, 0xFF), Err(FormatError::NotUtf8("key id")));
        let mut b = with_mac(
            &Header::v2(
                CipherSuite::Aes256Gcm,
                12,
                [0; 16],
                vec![wrap("a", "b", "c", &[1]), wrap("a", "b", "c", &[1])],
            )
            .unwrap(),
        );
        // Second wrap starts at 30 + 10: len, "a", len (2), "b", len, "c".
        assert_eq!(&b[40..47], b"\x01a\x00\x01b\x01c");
        b[46] = 0xC0;
        assert_eq!(parse(&b), Err(FormatError::NotUtf8("key version")));
    }

    #[test]
    fn truncation_and_trailing_bytes_are_refused() {
        for h in [sample(), sample_v2(1), sample_v2(3)] {
            let mut bytes = with_mac(&h);
            for cut in 0..bytes.len() {
                let expected = if cut < MAGIC.len() {
                    FormatError::BadMagic
                } else {
                    FormatError::Truncated
                };
                assert_eq!(parse(&bytes[..cut]), Err(expected), "cut at {cut}");
            }
            bytes.push(0);
            assert_eq!(parse(&bytes), Err(FormatError::TrailingBytes(1)));
        }
    }

    #[test]
    fn overlong_fields_are_refused_when_encoding() {
        let mut h = sample_v2(2);
        h.wraps[1].key_ref.provider = "p".repeat(256);
        assert_eq!(
            h.encode_unauthenticated(),
            Err(FormatError::FieldTooLong("provider"))
        );
        let mut h = sample_v2(1);
        h.wraps[0].blob = vec![0; 65536];
        assert_eq!(
            h.encode_unauthenticated(),
            Err(FormatError::FieldTooLong("wrapped DEK"))
        );
    }

    fn any_wrap() -> impl Strategy<Value = WrappedDek> {
        (
            "[a-z]{0,12}",
            "\\PC{0,40}",
            "[0-9]{0,3}",
            proptest::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(|(p, k, v, blob)| wrap(&p, &k, &v, &blob))
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse(&bytes);
        }

        /// Random bytes behind a valid v2 prefix reach the flags, the wrap
        /// count and the wraps.
        #[test]
        fn parse_never_panics_past_a_v2_prefix(
            rest in proptest::collection::vec(any::<u8>(), 0..400),
            count in 0u8..=9,
        ) {
            let mut bytes = with_mac(&sample_v2(1))[..28].to_vec();
            bytes.extend_from_slice(&[0, count]);
            bytes.extend_from_slice(&rest);
            let _ = parse(&bytes);
        }

        #[test]
        fn parse_never_panics_near_valid(
            v2 in any::<bool>(), pos in any::<usize>(), val in any::<u8>()
        ) {
            let mut bytes = with_mac(&if v2 { sample_v2(3) } else { sample() });
            let p = pos % bytes.len();
            bytes[p] = val;
            let _ = parse(&bytes);
        }

        #[test]
        fn v2_round_trips(
            wraps in proptest::collection::vec(any_wrap(), 1..=MAX_WRAPS),
            shift in 12u8..=20,
            id in any::<[u8; 16]>(),
        ) {
            let h = Header::v2(CipherSuite::Aes256Gcm, shift, id, wraps).unwrap();
            prop_assert_eq!(parse(&with_mac(&h)).unwrap().header, h);
        }
    }
}
