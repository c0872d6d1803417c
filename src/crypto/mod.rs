//! Key material and the AEAD operations on blocks and headers.
//!
//! Secrets live in zeroizing types without `Debug`, so they cannot reach a log
//! line by accident. The DEK itself never encrypts data: HKDF derives a block
//! key and a header MAC key from it, salted with the file ID.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, CHACHA20_POLY1305};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::format::block::{block_aad, is_hole, NONCE_LEN, TAG_LEN};
use crate::format::header::{Header, MAC_LEN};

pub const DEK_LEN: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("block {0} failed authentication (tampered, truncated or wrong key)")]
    BlockAuth(u64),
    #[error("header failed authentication (tampered sidecar, or sidecar of another file)")]
    HeaderAuth,
    #[error("key material has length {0}, expected {1}")]
    BadKeyLength(usize, usize),
}

/// A file's 256-bit data encryption key. Zeroized on drop; no Debug/Display.
pub struct Dek(Zeroizing<[u8; DEK_LEN]>);

impl Dek {
    /// A fresh random DEK from the OS-seeded CSPRNG.
    pub fn generate() -> Self {
        let mut k = Zeroizing::new([0u8; DEK_LEN]);
        rand::rngs::OsRng.fill_bytes(&mut k[..]);
        Dek(k)
    }

    pub fn from_slice(bytes: &[u8]) -> Result<Self, CryptoError> {
        if bytes.len() != DEK_LEN {
            return Err(CryptoError::BadKeyLength(bytes.len(), DEK_LEN));
        }
        let mut k = Zeroizing::new([0u8; DEK_LEN]);
        k.copy_from_slice(bytes);
        Ok(Dek(k))
    }

    pub fn as_bytes(&self) -> &[u8; DEK_LEN] {
        &self.0
    }
}

/// Random file ID (also the HKDF salt and part of every block's AAD).
pub fn random_file_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut id);
    id
}

fn derive(dek: &Dek, file_id: &[u8; 16], info: &[u8]) -> Zeroizing<[u8; 32]> {
    let hk = Hkdf::<Sha256>::new(Some(file_id), dek.as_bytes());
    let mut out = Zeroizing::new([0u8; 32]);
    hk.expand(info, &mut out[..])
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

const BLOCK_KEY_INFO: &[u8] = b"kmsfs v1 block key";
const HEADER_MAC_INFO: &[u8] = b"kmsfs v1 header mac key";

fn header_mac(dek: &Dek, file_id: &[u8; 16], authenticated: &[u8]) -> Hmac<Sha256> {
    let key = derive(dek, file_id, HEADER_MAC_INFO);
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(&key[..]).expect("HMAC takes any key length");
    mac.update(authenticated);
    mac
}

/// Seals the header of a new file: encodes `header` and appends its MAC
/// (keyed from `dek`). Returns the sidecar bytes and the file's block cipher.
pub fn seal_header(
    header: &Header,
    dek: &Dek,
) -> Result<(Vec<u8>, BlockCipher), crate::format::FormatError> {
    let mut bytes = header.encode_unauthenticated()?;
    let tag = header_mac(dek, &header.file_id, &bytes)
        .finalize()
        .into_bytes();
    debug_assert_eq!(tag.len(), MAC_LEN);
    bytes.extend_from_slice(&tag);
    Ok((bytes, BlockCipher::new(dek, header)))
}

/// The one way to an existing file's block cipher: checks the parsed
/// header's MAC against the unwrapped DEK (constant time) first, and only
/// then trusts the header's fields (cipher, file ID) to build the cipher.
pub fn open_header(
    parsed: &crate::format::ParsedHeader,
    dek: &Dek,
) -> Result<BlockCipher, CryptoError> {
    header_mac(dek, &parsed.header.file_id, &parsed.authenticated)
        .verify_slice(&parsed.mac)
        .map_err(|_| CryptoError::HeaderAuth)?;
    Ok(BlockCipher::new(dek, &parsed.header))
}

/// Seals and opens the blocks of one file. Holds only the derived block key,
/// inside aws-lc's AEAD context, which cleanses it when dropped; not the DEK.
///
/// aws-lc rather than the pure-Rust RustCrypto crates: on this hardware it
/// seals AES-256-GCM about 7x faster (5.2 vs 0.75 GB/s per core), and the
/// data path is bound by it. tests/vectors.rs cross-checks the output
/// against RustCrypto's implementation.
pub struct BlockCipher {
    key: LessSafeKey,
    file_id: [u8; 16],
}

impl BlockCipher {
    /// Only through [`seal_header`] and [`open_header`], and tests: an
    /// existing file's header must be authenticated first.
    pub(crate) fn new(dek: &Dek, header: &Header) -> Self {
        let key = derive(dek, &header.file_id, BLOCK_KEY_INFO);
        let alg = match header.cipher {
            crate::format::CipherSuite::Aes256Gcm => &AES_256_GCM,
            crate::format::CipherSuite::ChaCha20Poly1305 => &CHACHA20_POLY1305,
        };
        let key =
            LessSafeKey::new(UnboundKey::new(alg, &key[..]).expect("32-byte key fits both suites"));
        BlockCipher {
            key,
            file_id: header.file_id,
        }
    }

    /// Seals block `index` in place. `sealed` is `NONCE_LEN + n + TAG_LEN`
    /// bytes with the plaintext at `[NONCE_LEN..NONCE_LEN + n]`; on return it
    /// holds nonce || ciphertext || tag. A fresh random nonce is drawn per call.
    pub fn seal_in_place(&self, index: u64, sealed: &mut [u8]) {
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        self.seal_with_nonce(index, &nonce, sealed);
    }

    /// As [`Self::seal_in_place`] with a caller-chosen nonce. Only for test
    /// vectors (feature `test-vectors`): reusing a nonce under one key
    /// breaks the AEAD.
    #[cfg(feature = "test-vectors")]
    pub fn seal_in_place_with_nonce(&self, index: u64, nonce: &[u8; NONCE_LEN], sealed: &mut [u8]) {
        self.seal_with_nonce(index, nonce, sealed);
    }

    fn seal_with_nonce(&self, index: u64, nonce: &[u8; NONCE_LEN], sealed: &mut [u8]) {
        let n = sealed.len() - NONCE_LEN - TAG_LEN;
        let (nonce_out, rest) = sealed.split_at_mut(NONCE_LEN);
        nonce_out.copy_from_slice(nonce);
        let (body, tag_out) = rest.split_at_mut(n);
        let aad = block_aad(&self.file_id, index);
        let tag = self
            .key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), body)
            .expect("block is far below the AEAD length limit");
        tag_out.copy_from_slice(tag.as_ref());
    }

    /// Opens sealed block `index` into `out` (`sealed.len() - 28` bytes).
    /// An all-zero sealed block is a hole and reads as zeros.
    pub fn open(&self, index: u64, sealed: &[u8], out: &mut [u8]) -> Result<(), CryptoError> {
        if sealed.len() < NONCE_LEN + TAG_LEN || out.len() != sealed.len() - NONCE_LEN - TAG_LEN {
            return Err(CryptoError::BlockAuth(index));
        }
        if is_hole(sealed) {
            out.fill(0);
            return Ok(());
        }
        let n = out.len();
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&sealed[..NONCE_LEN]);
        let aad = block_aad(&self.file_id, index);
        self.key
            .open_separate_gather(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &sealed[NONCE_LEN..NONCE_LEN + n],
                &sealed[NONCE_LEN + n..],
                out,
            )
            .map_err(|_| {
                // Never hand back unauthenticated bytes.
                out.fill(0);
                CryptoError::BlockAuth(index)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{BlockGeometry, CipherSuite, KeyRef, WrappedDek};

    fn header(cipher: CipherSuite, id: u8) -> Header {
        Header {
            cipher,
            geometry: BlockGeometry::from_shift(12).unwrap(),
            file_id: [id; 16],
            wrapped: WrappedDek {
                key_ref: KeyRef {
                    provider: "local".into(),
                    key_id: "k".into(),
                    key_version: "1".into(),
                },
                blob: vec![1, 2, 3],
            },
        }
    }

    fn seal(c: &BlockCipher, index: u64, pt: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; pt.len() + 28];
        buf[12..12 + pt.len()].copy_from_slice(pt);
        c.seal_in_place(index, &mut buf);
        buf
    }

    #[test]
    fn blocks_round_trip_and_resist_moves_and_flips() {
        for suite in [CipherSuite::Aes256Gcm, CipherSuite::ChaCha20Poly1305] {
            let dek = Dek::generate();
            let c = BlockCipher::new(&dek, &header(suite, 1));
            let pt = b"hello block".to_vec();
            let sealed = seal(&c, 3, &pt);
            let mut out = vec![0u8; pt.len()];
            c.open(3, &sealed, &mut out).unwrap();
            assert_eq!(out, pt);
            // Moved to another index.
            assert_eq!(c.open(4, &sealed, &mut out), Err(CryptoError::BlockAuth(4)));
            assert_eq!(out, vec![0u8; pt.len()], "no unauthenticated bytes leak");
            // Another file (different file ID, same DEK).
            let other = BlockCipher::new(&dek, &header(suite, 2));
            assert!(other.open(3, &sealed, &mut out).is_err());
            // Any flipped bit.
            for i in 0..sealed.len() {
                let mut bad = sealed.clone();
                bad[i] ^= 0x10;
                assert!(c.open(3, &bad, &mut out).is_err(), "flip at {i}");
            }
        }
    }

    #[test]
    fn header_mac_detects_every_flip() {
        let dek = Dek::generate();
        let h = header(CipherSuite::Aes256Gcm, 9);
        let (bytes, _) = seal_header(&h, &dek).unwrap();
        let parsed = crate::format::header::parse(&bytes).unwrap();
        open_header(&parsed, &dek).unwrap();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut bad = bytes.clone();
                bad[i] ^= 1 << bit;
                let ok = crate::format::header::parse(&bad)
                    .map(|p| open_header(&p, &dek).is_ok())
                    .unwrap_or(false);
                assert!(!ok, "flip of bit {bit} in byte {i} went unnoticed");
            }
        }
        let wrong = Dek::generate();
        assert!(matches!(
            open_header(&parsed, &wrong),
            Err(CryptoError::HeaderAuth)
        ));
    }

    #[test]
    fn holes_read_as_zeros() {
        let c = BlockCipher::new(&Dek::generate(), &header(CipherSuite::Aes256Gcm, 1));
        let mut out = vec![1u8; 100];
        c.open(0, &[0u8; 128], &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 0));
    }
}
