//! Fixed test vectors for the on-disk format. The same hex strings appear in
//! docs/FORMAT.md; this test checks both the code and the document.

use hmac::Mac;
use kmsfs::crypto::{open_header, seal_header, Dek};
use kmsfs::format::header::parse;
use kmsfs::format::{CipherSuite, Header, KeyRef, WrappedDek};

fn dek() -> Dek {
    Dek::from_slice(&(0u8..32).collect::<Vec<_>>()).unwrap()
}

fn file_id() -> [u8; 16] {
    core::array::from_fn(|i| 0xA0 + i as u8)
}

fn wrap(key_id: &str, byte: u8) -> WrappedDek {
    WrappedDek {
        key_ref: KeyRef {
            provider: "local".into(),
            key_id: key_id.into(),
            key_version: "1".into(),
        },
        blob: vec![byte; 60],
    }
}

fn header(cipher: CipherSuite) -> Header {
    Header::v1(cipher, 12, file_id(), wrap("default", 0x11)).unwrap()
}

/// The v2 vector's header: the policy's wrap and a second recipient's.
fn header_v2(cipher: CipherSuite) -> Header {
    let wraps = vec![wrap("default", 0x11), wrap("break-glass", 0x22)];
    Header::v2(cipher, 12, file_id(), wraps).unwrap()
}

/// The epoch of the V2 block vectors.
const EPOCH: u64 = 0x0102_0304_0506_0708;

fn sealed_block(cipher: CipherSuite) -> String {
    let (_, c) = seal_header(&header(cipher), &dek()).unwrap();
    let pt = b"kmsfs test vector";
    let mut buf = vec![0u8; pt.len() + 28];
    buf[12..12 + pt.len()].copy_from_slice(pt);
    c.seal_in_place_with_nonce(3, &[0x42; 12], &mut buf);
    let mut out = vec![0u8; pt.len()];
    c.open(3, &buf, &mut out).unwrap();
    assert_eq!(&out, pt);
    hex::encode(buf)
}

fn sealed_block_v2(cipher: CipherSuite) -> String {
    let (_, c) = seal_header(&header_v2(cipher), &dek()).unwrap();
    let pt = b"kmsfs test vector";
    let mut buf = vec![0u8; pt.len() + 36];
    buf[20..20 + pt.len()].copy_from_slice(pt);
    c.seal_in_place_with_epoch_and_nonce(3, EPOCH, &[0x42; 12], &mut buf);
    let mut out = vec![0u8; pt.len()];
    c.open(3, &buf, &mut out).unwrap();
    assert_eq!(&out, pt);
    hex::encode(buf)
}

/// HKDF-SHA256 of the test DEK, salted with the test file ID (FORMAT.md 4.1).
fn hkdf(info: &[u8]) -> [u8; 32] {
    let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(&file_id()), dek().as_bytes());
    let mut key = [0u8; 32];
    hk.expand(info, &mut key).unwrap();
    key
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// Opens `nonce || ciphertext || tag` of block 3 under `key` with
/// RustCrypto's AEADs, independently of the code under test.
fn aead_open(cipher: CipherSuite, key: &[u8; 32], slot: &[u8]) -> Vec<u8> {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    let mut aad = file_id().to_vec();
    aad.extend_from_slice(&3u64.to_be_bytes());
    let payload = Payload {
        msg: &slot[12..],
        aad: &aad,
    };
    match cipher {
        CipherSuite::Aes256Gcm => aes_gcm::Aes256Gcm::new_from_slice(key)
            .unwrap()
            .decrypt(aes_gcm::Nonce::from_slice(&slot[..12]), payload),
        CipherSuite::ChaCha20Poly1305 => chacha20poly1305::ChaCha20Poly1305::new_from_slice(key)
            .unwrap()
            .decrypt(chacha20poly1305::Nonce::from_slice(&slot[..12]), payload),
    }
    .expect("independent implementation opens the vector")
}

/// Re-derives the V1 block key from docs/FORMAT.md's description and opens
/// the sealed block.
fn open_independently(cipher: CipherSuite, sealed_hex: &str) -> Vec<u8> {
    let sealed = hex::decode(sealed_hex).unwrap();
    aead_open(cipher, &hkdf(b"kmsfs v1 block key"), &sealed)
}

/// The same for a V2 block: the root key, then the key of the epoch the
/// block names in its first 8 bytes.
fn open_v2_independently(cipher: CipherSuite, sealed_hex: &str) -> Vec<u8> {
    let sealed = hex::decode(sealed_hex).unwrap();
    assert_eq!(sealed[..8], EPOCH.to_be_bytes());
    let root = hkdf(b"kmsfs v2 block key root");
    let key = hmac_sha256(&root, &[b"kmsfs v2 epoch key", &sealed[..8]]);
    aead_open(cipher, &key, &sealed[8..])
}

#[test]
fn vectors_open_with_an_independent_implementation() {
    for (open, aes, chacha) in [
        (
            open_independently as fn(CipherSuite, &str) -> Vec<u8>,
            BLOCK_AES,
            BLOCK_CHACHA,
        ),
        (open_v2_independently, BLOCK_V2_AES, BLOCK_V2_CHACHA),
    ] {
        assert_eq!(open(CipherSuite::Aes256Gcm, aes), b"kmsfs test vector");
        assert_eq!(
            open(CipherSuite::ChaCha20Poly1305, chacha),
            b"kmsfs test vector"
        );
    }
}

/// Builds the v2 header vector from docs/FORMAT.md's table, field by field,
/// and MACs it with the v2 header MAC key, without the code under test.
#[test]
fn v2_header_vector_follows_the_document() {
    let mut bytes = b"KMSFSHDR".to_vec();
    bytes.extend_from_slice(&2u16.to_be_bytes());
    bytes.extend_from_slice(&[1, 12]); // AES-256-GCM, 4 KiB blocks
    bytes.extend_from_slice(&file_id());
    bytes.extend_from_slice(&[0, 2]); // no flags, two wraps
    for (key_id, byte) in [("default", 0x11), ("break-glass", 0x22)] {
        bytes.push(5);
        bytes.extend_from_slice(b"local");
        bytes.extend_from_slice(&(key_id.len() as u16).to_be_bytes());
        bytes.extend_from_slice(key_id.as_bytes());
        bytes.extend_from_slice(&[1, b'1']);
        bytes.extend_from_slice(&60u16.to_be_bytes());
        bytes.extend_from_slice(&[byte; 60]);
    }
    let mac = hmac_sha256(&hkdf(b"kmsfs v2 header mac key"), &[&bytes]);
    bytes.extend_from_slice(&mac);
    assert_eq!(hex::encode(&bytes), HEADER_V2_AES);
}

const HEADER_AES: &str = "4b4d5346534844520001010ca0a1a2a3a4a5a6a7a8a9aaabacadaeaf056c6f63616c000764656661756c740131003c111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111cd3ba4e77e7f98d1c8f5192a5e858a4f695bc63cec6ce9f78c069519b63b2a33";
const BLOCK_AES: &str =
    "42424242424242424242424266fb9c7a5fdda35eda6766b8ca86fc59aa35bc127ff5a4dc716da3735dad9e172c";
const BLOCK_CHACHA: &str =
    "4242424242424242424242429233cb4ed0d27ec57de106964b78e78a440701bf407e276889ff72443dcaed3f0a";
const HEADER_V2_AES: &str = "4b4d5346534844520002010ca0a1a2a3a4a5a6a7a8a9aaabacadaeaf0002056c6f63616c000764656661756c740131003c111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111056c6f63616c000b627265616b2d676c6173730131003c22222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222244ae589a12b39dc58b625702b21bdff3c758fc4f0254912662a7ac69c7088c47";
const BLOCK_V2_AES: &str = "0102030405060708424242424242424242424242e0cc1f540ca520cae7b56f4f9707a8829c96e121958f960ccc6416f16eebfaad11";
const BLOCK_V2_CHACHA: &str = "010203040506070842424242424242424242424229e52288e5666a6c0b474b84005ec830a5d9138a60fe47b27575a8ca9c298caa81";

#[test]
fn vectors_match_code_and_docs() {
    let (h, _) = seal_header(&header(CipherSuite::Aes256Gcm), &dek()).unwrap();
    let parsed = parse(&h).unwrap();
    open_header(&parsed, &dek()).unwrap();
    let (h2, _) = seal_header(&header_v2(CipherSuite::Aes256Gcm), &dek()).unwrap();
    let parsed = parse(&h2).unwrap();
    assert_eq!(parsed.header.version(), 2);
    assert_eq!(parsed.header.wraps().len(), 2);
    open_header(&parsed, &dek()).unwrap();
    let mut got = vec![
        (
            "header (AES-256-GCM)".to_owned(),
            hex::encode(&h),
            HEADER_AES,
        ),
        (
            "v2 header (AES-256-GCM)".to_owned(),
            hex::encode(&h2),
            HEADER_V2_AES,
        ),
    ];
    // Block 3 of each format, with each cipher suite.
    for (suite, name, v2, v1) in [
        (
            CipherSuite::Aes256Gcm,
            "AES-256-GCM",
            BLOCK_V2_AES,
            BLOCK_AES,
        ),
        (
            CipherSuite::ChaCha20Poly1305,
            "ChaCha20-Poly1305",
            BLOCK_V2_CHACHA,
            BLOCK_CHACHA,
        ),
    ] {
        got.push((format!("V2 block 3 ({name})"), sealed_block_v2(suite), v2));
        got.push((format!("block 3 ({name})"), sealed_block(suite), v1));
    }
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/FORMAT.md")).unwrap();
    for (what, actual, _) in &got {
        println!("{what}: {actual}");
    }
    for (what, actual, expected) in got {
        assert_eq!(
            actual, expected,
            "{what} changed: the on-disk format is not compatible"
        );
        assert!(
            doc.contains(expected),
            "docs/FORMAT.md lacks the {what} vector"
        );
    }
}
