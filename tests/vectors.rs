//! Fixed test vectors for the on-disk format. The same hex strings appear in
//! docs/FORMAT.md; this test checks both the code and the document.

use kmsfs::crypto::{open_header, seal_header, Dek};
use kmsfs::format::header::parse;
use kmsfs::format::{BlockGeometry, CipherSuite, Header, KeyRef, WrappedDek};

fn dek() -> Dek {
    Dek::from_slice(&(0u8..32).collect::<Vec<_>>()).unwrap()
}

fn header(cipher: CipherSuite) -> Header {
    Header {
        cipher,
        geometry: BlockGeometry::from_shift(12).unwrap(),
        file_id: core::array::from_fn(|i| 0xA0 + i as u8),
        wrapped: WrappedDek {
            key_ref: KeyRef {
                provider: "local".into(),
                key_id: "default".into(),
                key_version: "1".into(),
            },
            blob: vec![0x11; 60],
        },
    }
}

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

/// Re-derives the block key from docs/FORMAT.md's description and opens the
/// sealed block with RustCrypto's AEADs, independently of the code under test.
fn open_independently(cipher: CipherSuite, sealed_hex: &str) -> Vec<u8> {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    let file_id: [u8; 16] = core::array::from_fn(|i| 0xA0 + i as u8);
    let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(&file_id), dek().as_bytes());
    let mut key = [0u8; 32];
    hk.expand(b"kmsfs v1 block key", &mut key).unwrap();
    let sealed = hex::decode(sealed_hex).unwrap();
    let mut aad = file_id.to_vec();
    aad.extend_from_slice(&3u64.to_be_bytes());
    let payload = Payload {
        msg: &sealed[12..],
        aad: &aad,
    };
    match cipher {
        CipherSuite::Aes256Gcm => aes_gcm::Aes256Gcm::new_from_slice(&key)
            .unwrap()
            .decrypt(aes_gcm::Nonce::from_slice(&sealed[..12]), payload),
        CipherSuite::ChaCha20Poly1305 => chacha20poly1305::ChaCha20Poly1305::new_from_slice(&key)
            .unwrap()
            .decrypt(chacha20poly1305::Nonce::from_slice(&sealed[..12]), payload),
    }
    .expect("independent implementation opens the vector")
}

#[test]
fn vectors_open_with_an_independent_implementation() {
    assert_eq!(
        open_independently(CipherSuite::Aes256Gcm, BLOCK_AES),
        b"kmsfs test vector"
    );
    assert_eq!(
        open_independently(CipherSuite::ChaCha20Poly1305, BLOCK_CHACHA),
        b"kmsfs test vector"
    );
}

const HEADER_AES: &str = "4b4d5346534844520001010ca0a1a2a3a4a5a6a7a8a9aaabacadaeaf056c6f63616c000764656661756c740131003c111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111cd3ba4e77e7f98d1c8f5192a5e858a4f695bc63cec6ce9f78c069519b63b2a33";
const BLOCK_AES: &str =
    "42424242424242424242424266fb9c7a5fdda35eda6766b8ca86fc59aa35bc127ff5a4dc716da3735dad9e172c";
const BLOCK_CHACHA: &str =
    "4242424242424242424242429233cb4ed0d27ec57de106964b78e78a440701bf407e276889ff72443dcaed3f0a";

#[test]
fn vectors_match_code_and_docs() {
    let (h, _) = seal_header(&header(CipherSuite::Aes256Gcm), &dek()).unwrap();
    let parsed = parse(&h).unwrap();
    open_header(&parsed, &dek()).unwrap();
    let got = [
        ("header (AES-256-GCM)", hex::encode(&h), HEADER_AES),
        (
            "block 3 (AES-256-GCM)",
            sealed_block(CipherSuite::Aes256Gcm),
            BLOCK_AES,
        ),
        (
            "block 3 (ChaCha20-Poly1305)",
            sealed_block(CipherSuite::ChaCha20Poly1305),
            BLOCK_CHACHA,
        ),
    ];
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
