//! The sidecar header: everything needed to decrypt one file, except the KEK.
//!
//! Layout (all integers big-endian; see docs/FORMAT.md):
//! ```text
//! magic "KMSFSHDR" (8) | version u16 | cipher u8 | block shift u8 | file id (16)
//! provider (u8 len + bytes) | key id (u16 len + bytes) | key version (u8 len + bytes)
//! wrapped DEK (u16 len + bytes) | HMAC-SHA256 over everything before it (32)
//! ```
//! The MAC key is derived from the DEK (crypto::FileKeys), so the header is
//! authenticated once the DEK is unwrapped; parsing here only checks structure.

use super::block::BlockGeometry;
use super::FormatError;

pub const MAGIC: &[u8; 8] = b"KMSFSHDR";
pub const VERSION: u16 = 1;
pub const FILE_ID_LEN: usize = 16;
pub const MAC_LEN: usize = 32;

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
    pub geometry: BlockGeometry,
    pub file_id: [u8; FILE_ID_LEN],
    /// The file's DEK, wrapped by the KMS key its key reference names.
    pub wrapped: WrappedDek,
}

/// A header together with the bytes its MAC covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedHeader {
    pub header: Header,
    /// The header bytes before the MAC.
    pub authenticated: Vec<u8>,
    pub mac: [u8; MAC_LEN],
}

impl Header {
    /// Encodes the header without its MAC; the caller appends the MAC.
    pub fn encode_unauthenticated(&self) -> Result<Vec<u8>, FormatError> {
        let key_ref = &self.wrapped.key_ref;
        let mut out = Vec::with_capacity(64 + self.wrapped.blob.len() + key_ref.key_id.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.push(self.cipher.id());
        out.push(self.geometry.shift());
        out.extend_from_slice(&self.file_id);
        put_u8_field(&mut out, "provider", key_ref.provider.as_bytes())?;
        put_u16_field(&mut out, "key id", key_ref.key_id.as_bytes())?;
        put_u8_field(&mut out, "key version", key_ref.key_version.as_bytes())?;
        put_u16_field(&mut out, "wrapped DEK", &self.wrapped.blob)?;
        Ok(out)
    }
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
/// `crypto::FileKeys::verify_header` once the DEK is known.
pub fn parse(bytes: &[u8]) -> Result<ParsedHeader, FormatError> {
    let mut r = Reader { buf: bytes, pos: 0 };
    if r.take(MAGIC.len()).map_err(|_| FormatError::BadMagic)? != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let version = r.u16()?;
    if version != VERSION {
        return Err(FormatError::UnsupportedVersion(version, VERSION));
    }
    let cipher = CipherSuite::from_id(r.u8()?)?;
    let geometry = BlockGeometry::from_shift(r.u8()?)?;
    let mut file_id = [0u8; FILE_ID_LEN];
    file_id.copy_from_slice(r.take(FILE_ID_LEN)?);
    let n = r.u8()? as usize;
    let provider = r.string("provider", n)?;
    let n = r.u16()? as usize;
    let key_id = r.string("key id", n)?;
    let n = r.u8()? as usize;
    let key_version = r.string("key version", n)?;
    let n = r.u16()? as usize;
    let blob = r.take(n)?.to_vec();
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
            wrapped: WrappedDek {
                key_ref: KeyRef {
                    provider,
                    key_id,
                    key_version,
                },
                blob,
            },
        },
        authenticated,
        mac,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Header {
        Header {
            cipher: CipherSuite::Aes256Gcm,
            geometry: BlockGeometry::from_shift(12).unwrap(),
            file_id: [7u8; 16],
            wrapped: WrappedDek {
                key_ref: KeyRef {
                    provider: "local".into(),
                    key_id: "default".into(),
                    key_version: "1".into(),
                },
                blob: vec![0xAB; 60],
            },
        }
    }

    #[test]
    fn encode_parse_round_trip() {
        let h = sample();
        let mut bytes = h.encode_unauthenticated().unwrap();
        let n = bytes.len();
        bytes.extend_from_slice(&[0x55; MAC_LEN]);
        let p = parse(&bytes).unwrap();
        assert_eq!(p.header, h);
        assert_eq!(p.authenticated, bytes[..n]);
        assert_eq!(p.mac, [0x55; MAC_LEN]);
    }

    #[test]
    fn unknown_version_is_a_clear_error() {
        let mut bytes = sample().encode_unauthenticated().unwrap();
        bytes.extend_from_slice(&[0; MAC_LEN]);
        bytes[9] = 9;
        assert_eq!(parse(&bytes), Err(FormatError::UnsupportedVersion(9, 1)));
    }

    #[test]
    fn truncation_and_trailing_bytes_are_refused() {
        let mut bytes = sample().encode_unauthenticated().unwrap();
        bytes.extend_from_slice(&[0; MAC_LEN]);
        for cut in 0..bytes.len() {
            assert!(parse(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        bytes.push(0);
        assert_eq!(parse(&bytes), Err(FormatError::TrailingBytes(1)));
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn parse_never_panics_near_valid(pos in 0usize..140, val in any::<u8>()) {
            let mut bytes = sample().encode_unauthenticated().unwrap();
            bytes.extend_from_slice(&[0; MAC_LEN]);
            let p = pos % bytes.len();
            bytes[p] = val;
            let _ = parse(&bytes);
        }
    }
}
