//! The checks behind the fuzz targets (`fuzz/`), one function per target,
//! and the seed inputs of their corpus. `tests/fuzz_corpus.rs` runs the
//! same checks over the committed corpus on stable Rust, so an input that
//! once crashed stays a regression test.
//!
//! Each check takes arbitrary bytes and panics only when kmsfs breaks a
//! promise: a parser that panics, a value that parses but does not encode
//! back to itself, sizes that do not invert, a forged block that opens.
//! Built only with the `fuzzing` feature: tests and the fuzz crate.

use std::path::Path;

use crate::config::trusted::{valid_provider_name, TrustedConfig};
use crate::config::volume::{VolumeConfig, WrappedVolumeKey, CONFIG_FORMAT};
use crate::crypto::{open_header, seal_header, Dek, DEK_LEN};
use crate::format::block::{is_hole, BlockLayout, MAX_BLOCK_SHIFT, MIN_BLOCK_SHIFT};
use crate::format::header::{self, Header, FILE_ID_LEN, MAX_WRAPS};
use crate::format::names::{
    is_reserved, sidecar_name, CONFIG_FILE, LIFECYCLE_TEMP_PREFIX, NAME_MAX, RESERVED_PREFIX,
};
use crate::format::{BlockGeometry, CipherSuite, KeyRef, WrappedDek};
use crate::kms::config::KeySpec;
use crate::policy::{governing, is_within, normalize_dir, Policy};

/// A fuzz target: its name (the fuzz crate's binary and the corpus
/// directory `fuzz/corpus/NAME`) and its check.
pub struct Target {
    pub name: &'static str,
    pub check: fn(&[u8]),
}

/// Every fuzz target. A new one needs an entry here, a binary in
/// `fuzz/fuzz_targets/NAME.rs` calling its check, a `[[bin]]` in
/// `fuzz/Cargo.toml` and at least one seed in [`seeds`].
pub const TARGETS: &[Target] = &[
    Target {
        name: "header",
        check: header,
    },
    Target {
        name: "volume_config",
        check: volume_config,
    },
    Target {
        name: "trusted_config",
        check: trusted_config,
    },
    Target {
        name: "names",
        check: names,
    },
    Target {
        name: "block_geometry",
        check: block_geometry,
    },
    Target {
        name: "block_codec",
        check: block_codec,
    },
    Target {
        name: "intent",
        check: intent,
    },
];

/// `TruncateRecord::parse` never panics; whatever it accepts encodes back
/// to the same bytes, and no cut or extension of it parses.
pub fn intent(data: &[u8]) {
    use crate::format::intent::TruncateRecord;
    let Ok(record) = TruncateRecord::parse(data) else {
        return;
    };
    assert_eq!(record.encode().expect("a parsed record encodes"), data);
    assert!(TruncateRecord::parse(&data[..data.len() - 1]).is_err());
    let mut longer = data.to_vec();
    longer.push(0);
    assert!(TruncateRecord::parse(&longer).is_err());
}

/// Reads fixed-size fields off the front of a fuzz input; past its end
/// every field reads as zeros, so every input means something.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.bytes())
    }
    fn rest(self) -> &'a [u8] {
        self.0
    }
}

/// A geometry from two input bytes: every shift and layout is reachable.
fn geometry_from(input: &mut Input<'_>) -> BlockGeometry {
    let shift = MIN_BLOCK_SHIFT + input.u8() % (MAX_BLOCK_SHIFT - MIN_BLOCK_SHIFT + 1);
    let layout = if input.u8() & 1 == 0 {
        BlockLayout::V1
    } else {
        BlockLayout::V2
    };
    BlockGeometry::new(shift, layout).expect("shift is in range")
}

/// The largest file size Linux allows (`off_t` is signed): the domain of
/// every size and offset the geometry is asked about.
const MAX_FILE_SIZE: u64 = i64::MAX as u64;

fn fixed_dek(byte: u8) -> Dek {
    Dek::from_slice(&[byte; DEK_LEN]).expect("DEK_LEN bytes")
}

/// `header::parse`: whatever parses encodes back to the same bytes, is a
/// header [`Header::new`] accepts, is not a prefix of another header, and
/// seals and opens under a DEK (and only under that DEK).
pub fn header(data: &[u8]) {
    intermediate_key_object(data);
    let Ok(parsed) = header::parse(data) else {
        return;
    };
    let h = &parsed.header;
    assert_eq!(
        h.encode_unauthenticated().as_deref(),
        Ok(&parsed.authenticated[..]),
        "a parsed header encodes back to its bytes"
    );
    assert_eq!([&parsed.authenticated[..], &parsed.mac].concat(), data);
    let rebuilt = Header::new(h.cipher, h.geometry, h.file_id, h.wraps().to_vec());
    assert_eq!(
        rebuilt.as_ref(),
        Ok(h),
        "a parsed header is one new() builds"
    );
    assert!((1..=MAX_WRAPS).contains(&h.wraps().len()));
    assert_eq!(h.primary(), &h.wraps()[0]);
    assert!(header::parse(&data[..data.len() - 1]).is_err());
    assert!(header::parse(&[data, &[0]].concat()).is_err());

    let dek = fixed_dek(0x42);
    let (sealed, cipher) = seal_header(h, &dek).expect("a parsed header seals");
    assert_eq!(cipher.geometry(), h.geometry);
    let resealed = header::parse(&sealed).expect("a sealed header parses");
    assert_eq!(&resealed.header, h);
    assert!(open_header(&resealed, &dek).is_ok());
    assert!(open_header(&resealed, &fixed_dek(0x43)).is_err());
    if sealed != data {
        assert!(
            open_header(&parsed, &dek).is_err(),
            "a header whose MAC differs does not open"
        );
    }
}

/// `format::ik::parse_object` (an intermediate key's object, named by the
/// ID its bytes hold): whatever parses encodes back to the same bytes and
/// is no prefix of another object. Also `split_version` on the input.
fn intermediate_key_object(data: &[u8]) {
    use crate::format::ik;
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok((base, Some(id))) = ik::split_version(text) {
            assert_eq!(
                ik::ik_version(base, &id),
                text,
                "an IK version is canonical"
            );
        }
    }
    let Some(id) = data.get(10..26) else {
        return;
    };
    let id: [u8; 16] = id.try_into().expect("16 bytes");
    let Ok(wrapped) = ik::parse_object(data, &id) else {
        return;
    };
    assert_eq!(ik::encode_object(&id, &wrapped).as_deref(), Ok(data));
    assert!(ik::parse_object(&data[..data.len() - 1], &id).is_err());
    assert!(ik::parse_object(&[data, &[0]].concat(), &id).is_err());
}

/// `VolumeConfig::parse` (the backing directory's `.kmsfs-config.toml`):
/// a configuration that parses answers every query, re-serializes to one
/// that parses to itself, and its MAC survives that round trip. Also the
/// durations it holds (`duration::parse` on the whole input).
pub fn volume_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = crate::duration::parse(text) {
        let shown = crate::duration::format(d);
        assert_eq!(crate::duration::parse(&shown), Ok(d), "{shown:?}");
    }
    let path = Path::new(CONFIG_FILE);
    let Ok(cfg) = VolumeConfig::parse(path, text) else {
        return;
    };
    assert_eq!(cfg.format_version, CONFIG_FORMAT);
    let _ = cfg.id();
    let shift = cfg.geometry_shift();
    assert_eq!(cfg.block_size, 1u64 << shift);
    assert_eq!(cfg.root().dir, "/");
    for p in &cfg.policies {
        assert_eq!(cfg.policy_for(&p.dir).dir, p.dir);
        assert!(is_within(&p.dir, &cfg.root().dir));
    }
    let _ = cfg.wrapped_volume_key();
    let _ = cfg.volume_key_context();

    let text = toml::to_string_pretty(&cfg).expect("a parsed configuration serializes");
    let again = VolumeConfig::parse(path, &text).expect("a re-serialized configuration parses");
    assert_eq!(again, cfg);

    let key = fixed_dek(0x17);
    let mut sealed = cfg.clone();
    sealed.seal(&key);
    let text = toml::to_string_pretty(&sealed).expect("a sealed configuration serializes");
    let again = VolumeConfig::parse(path, &text).expect("a sealed configuration parses");
    assert!(
        again.verify(&key, path).is_ok(),
        "the MAC survives a round trip"
    );
    assert!(again.verify(&fixed_dek(0x18), path).is_err());
    // Hex is read in either case: a MAC that differs only in case is the
    // same MAC.
    if !cfg.mac.eq_ignore_ascii_case(&sealed.mac) {
        assert!(cfg.verify(&key, path).is_err());
    }
}

/// The trusted configuration's parser: provider names are valid, every
/// provider resolves a key to a KMS configuration or says why not, and a
/// resolved configuration splits back into a definition that resolves to
/// it again.
pub fn trusted_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = TrustedConfig::parse(Path::new("/etc/kmsfs/kmsfs.toml"), text) else {
        return;
    };
    assert!(cfg.audit_log().is_none_or(Path::is_absolute));
    for (name, def) in cfg.providers() {
        assert!(valid_provider_name(name), "{name:?}");
        for version in [None, Some("7".to_string())] {
            let key = KeySpec {
                provider: name.clone(),
                id: "key".into(),
                version,
            };
            let Ok(kms) = cfg.resolve(&key) else {
                continue;
            };
            assert!(kms.timeout().as_secs() >= 1);
            let _ = kms.check_transport();
            let (def_again, key_again) = kms.split(name);
            assert_eq!(key_again, key);
            assert_eq!(def_again.kind, def.kind);
            assert_eq!(def_again.resolve(&key_again).as_ref(), Ok(&kms));
        }
    }
}

/// Backing names: `sidecar_name` of any valid name component is a valid
/// component itself (at most NAME_MAX bytes, no '/' or NUL), reserved
/// (hidden from the mount, so never a visible name), none of kmsfs's other
/// files, and different for different names. The input is two names: its
/// first byte is the length of the first. Also `normalize_dir`, the policy
/// directory parser, on the whole input.
pub fn names(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        check_policy_dir(text);
    }
    let Some((&len, rest)) = data.split_first() else {
        return;
    };
    let (a, b) = rest.split_at((len as usize).min(rest.len()));
    for name in [a, b] {
        assert_eq!(is_reserved(name), name.starts_with(RESERVED_PREFIX));
        if !is_component(name) {
            continue;
        }
        let sidecar = sidecar_name(name);
        assert!(is_component(&sidecar), "{sidecar:?}");
        assert!(is_reserved(&sidecar));
        assert_ne!(sidecar, name);
        assert_ne!(sidecar, CONFIG_FILE.as_bytes());
        assert!(!sidecar.starts_with(LIFECYCLE_TEMP_PREFIX));
        assert_ne!(sidecar, [CONFIG_FILE.as_bytes(), b".lock"].concat());
        assert_eq!(sidecar_name(name), sidecar, "deterministic");
    }
    if is_component(a) && is_component(b) && a != b {
        assert_ne!(sidecar_name(a), sidecar_name(b), "{a:?} and {b:?}");
    }
}

/// A name the backing filesystem takes as one directory entry.
fn is_component(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= NAME_MAX
        && name != b"."
        && name != b".."
        && !name.contains(&b'/')
        && !name.contains(&0)
}

/// `normalize_dir`: its output is normalized (a fixed point), absolute,
/// and made of valid unreserved components; it finds the same policy.
fn check_policy_dir(dir: &str) {
    let Ok(normal) = normalize_dir(dir) else {
        return;
    };
    assert_eq!(normalize_dir(&normal).as_ref(), Ok(&normal));
    assert!(normal.starts_with('/'));
    assert!(normal == "/" || !normal.ends_with('/'));
    for c in normal.split('/').skip(1).filter(|_| normal != "/") {
        // Longer than NAME_MAX is allowed: it merely governs nothing.
        assert!(!matches!(c, "" | "." | ".."), "{normal:?}");
        assert!(
            !c.contains('\0') && !is_reserved(c.as_bytes()),
            "{normal:?}"
        );
    }
    let key = KeySpec {
        provider: "p".into(),
        id: "k".into(),
        version: None,
    };
    let policies = [
        Policy::new("/".into(), CipherSuite::Aes256Gcm, true, key.clone()),
        Policy::new(normal.clone(), CipherSuite::Aes256Gcm, true, key),
    ];
    let found = &policies[governing(&policies, &normal)].dir;
    assert_eq!(found, &normal);
    assert!(is_within(&normal, "/"));
}

/// `BlockGeometry`'s size arithmetic, for every layout and block size:
/// plaintext and ciphertext sizes invert, every ciphertext size is whole
/// blocks or a torn tail, and block lengths and offsets agree with sizes.
pub fn block_geometry(data: &[u8]) {
    let mut input = Input(data);
    let g = geometry_from(&mut input);
    let pt = input.u64() % (MAX_FILE_SIZE + 1);
    let any_ct = input.u64();
    let index = input.u64();
    let start = input.u64() % (MAX_FILE_SIZE + 1);
    let end = start + input.u64() % (MAX_FILE_SIZE - start + 1);

    assert_eq!(
        BlockGeometry::from_size(g.block_size() as u64, g.layout()),
        Ok(g)
    );
    assert_eq!(g.sealed_block_size(), g.block_size() + g.overhead());
    let bs = g.block_size() as u64;
    let sealed = g.sealed_block_size() as u64;
    let overhead = g.overhead() as u64;

    let ct = g.ciphertext_size(pt);
    assert!(ct >= pt);
    assert_eq!(g.plaintext_size(ct), pt);
    assert!(!g.has_torn_tail(ct));

    let pt_of_any = g.plaintext_size(any_ct);
    let rem = any_ct % sealed;
    if g.has_torn_tail(any_ct) {
        assert!((1..=overhead).contains(&rem));
        assert_eq!(pt_of_any, g.block_start(any_ct / sealed) + 1);
    } else {
        assert_eq!(g.ciphertext_size(pt_of_any), any_ct);
    }

    if pt > 0 {
        let last = g.block_of(pt - 1);
        let last_len = g.block_len(last, pt) as u64;
        assert!((1..=bs).contains(&last_len));
        assert_eq!(g.block_start(last) + last_len, pt);
        assert_eq!(g.block_len(last + 1, pt), 0);
        let inner = index % (last + 1);
        let want = if inner == last { last_len } else { bs };
        assert_eq!(g.block_len(inner, pt) as u64, want);
        assert_eq!(g.block_of(g.block_start(inner)), inner);
        assert_eq!(
            g.sealed_block_start(last),
            g.ciphertext_size(g.block_start(last))
        );
        assert_eq!(ct, g.sealed_block_start(last) + last_len + overhead);
    } else {
        assert_eq!(ct, 0);
        assert_eq!(g.block_len(index % (g.block_of(MAX_FILE_SIZE) + 1), 0), 0);
    }

    let whole = g.blocks_within(start, end);
    let inside = |i: u64| g.block_start(i) >= start && g.block_start(i) + bs <= end;
    if whole.is_empty() {
        assert!(
            !inside(whole.start),
            "block {} of [{start}, {end})",
            whole.start
        );
    } else {
        assert!(inside(whole.start) && inside(whole.end - 1));
        assert!(
            !inside(whole.end),
            "block {} of [{start}, {end})",
            whole.end
        );
    }
    if whole.start > 0 {
        assert!(!inside(whole.start - 1), "block before [{start}, {end})");
    }
}

/// The block codec: opening arbitrary bytes as a sealed block fails (a
/// hole aside) and leaves nothing in the output; sealing then opening
/// round-trips, in place and run by run; a changed bit, another index or
/// another file's keys refuse the block. The input: suite and layout bits,
/// block shift, DEK, file ID, block index, plaintext length, tamper
/// position, then the bytes (opened as a block, and repeated as plaintext).
pub fn block_codec(data: &[u8]) {
    let mut input = Input(data);
    let flags = input.u8();
    let cipher = if flags & 1 == 0 {
        CipherSuite::Aes256Gcm
    } else {
        CipherSuite::ChaCha20Poly1305
    };
    let g = geometry_from(&mut input);
    let dek = Dek::from_slice(&input.bytes::<DEK_LEN>()).expect("DEK_LEN bytes");
    let file_id = input.bytes::<FILE_ID_LEN>();
    let index = input.u64() % (g.block_of(MAX_FILE_SIZE) + 1);
    let len = input.u16() as usize % (2 * g.block_size() + 2);
    let tamper = input.u16() as usize;
    let bytes = input.rest();

    let wrap = WrappedDek {
        key_ref: KeyRef {
            provider: "local".into(),
            key_id: "fuzz".into(),
            key_version: String::new(),
        },
        blob: vec![0xAA; 8],
    };
    let new_header = |file_id| {
        Header::new(cipher, g, file_id, vec![wrap.clone()]).expect("one wrap fits every version")
    };
    let (_, codec) = seal_header(&new_header(file_id), &dek).expect("the header seals");
    let overhead = g.overhead();

    // Arbitrary bytes as a sealed block.
    let mut out = vec![0x5A; bytes.len().saturating_sub(overhead)];
    match codec.open(index, bytes, &mut out) {
        Ok(()) => assert!(
            bytes.len() >= overhead && is_hole(bytes),
            "only a hole opens without a seal"
        ),
        Err(_) => assert!(out.iter().all(|&b| b == 0), "a refused block leaves zeros"),
    }
    assert!(out.iter().all(|&b| b == 0));
    let mut wrong_len = vec![0u8; out.len() + 1];
    assert!(codec.open(index, bytes, &mut wrong_len).is_err());

    // One block sealed in place and opened.
    let plaintext: Vec<u8> = if bytes.is_empty() {
        vec![0; len]
    } else {
        bytes.iter().copied().cycle().take(len).collect()
    };
    let one = &plaintext[..len.min(g.block_size())];
    let mut block = vec![0u8; one.len() + overhead];
    let off = g.plaintext_offset();
    block[off..off + one.len()].copy_from_slice(one);
    codec.seal_in_place(index, &mut block);
    if !one.is_empty() {
        assert_eq!(block.len() as u64, g.ciphertext_size(one.len() as u64));
    }
    let mut opened = vec![0u8; one.len()];
    codec
        .open(index, &block, &mut opened)
        .expect("a sealed block opens");
    assert_eq!(opened, one);
    let mut tampered = block.clone();
    let at = tamper % tampered.len();
    tampered[at] ^= 1 << (tamper / tampered.len() % 8);
    assert!(codec.open(index, &tampered, &mut opened).is_err());
    assert!(codec.open(index ^ 1, &block, &mut opened).is_err());
    let other_id = {
        let mut id = file_id;
        id[0] ^= 1;
        id
    };
    let (_, other) = seal_header(&new_header(other_id), &dek).expect("the header seals");
    assert!(other.open(index, &block, &mut opened).is_err());

    // A run of blocks sealed at once, opened one by one.
    let count = plaintext.len().div_ceil(g.block_size()) as u64;
    let mut run = vec![0u8; g.ciphertext_size(plaintext.len() as u64) as usize];
    for i in 0..count {
        let start = g.sealed_block_start(i) as usize;
        let n = g.block_len(i, plaintext.len() as u64);
        let from = g.block_start(i) as usize;
        run[start + off..start + off + n].copy_from_slice(&plaintext[from..from + n]);
    }
    codec.seal_blocks(index, &mut run);
    for i in 0..count {
        let start = g.sealed_block_start(i) as usize;
        let n = g.block_len(i, plaintext.len() as u64);
        let mut opened = vec![0u8; n];
        codec
            .open(index + i, &run[start..start + n + overhead], &mut opened)
            .expect("a block sealed in a run opens");
        let from = g.block_start(i) as usize;
        assert_eq!(opened, &plaintext[from..from + n]);
    }
}

/// The seed corpus the code itself makes (`fuzz/corpus/TARGET/seed-NAME`):
/// real headers of both versions, a sealed volume configuration, and
/// inputs reaching every layout, block size and cipher. Hand-written seeds
/// (documentation examples) and inputs the fuzzer found live beside them.
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut seeds = Vec::new();
    let mut add = |target: &'static str, name: String, bytes: Vec<u8>| {
        seeds.push((target, name, bytes));
    };

    let wrap = |provider: &str, key_id: &str, key_version: &str, blob: &[u8]| WrappedDek {
        key_ref: KeyRef {
            provider: provider.into(),
            key_id: key_id.into(),
            key_version: key_version.into(),
        },
        blob: blob.to_vec(),
    };
    let dek = fixed_dek(0x42);
    let headers = [
        (
            "v1-aes-4k",
            Header::v1(
                CipherSuite::Aes256Gcm,
                12,
                [1; FILE_ID_LEN],
                wrap("local", "default", "1", &[0xAB; 60]),
            ),
        ),
        (
            "v2-chacha-64k",
            Header::v2(
                CipherSuite::ChaCha20Poly1305,
                16,
                [2; FILE_ID_LEN],
                vec![wrap("vault", "transit-key", "3", &[0xCD; 90])],
            ),
        ),
        (
            "v2-three-wraps-1m",
            Header::v2(
                CipherSuite::Aes256Gcm,
                20,
                [3; FILE_ID_LEN],
                vec![
                    wrap(
                        "aws",
                        "arn:aws:kms:eu-west-1:111122223333:key/abc",
                        "",
                        &[1; 184],
                    ),
                    wrap("local", "recovery", "2", &[2; 60]),
                    wrap("", "", "", &[]),
                ],
            ),
        ),
        (
            "v2-max-wraps",
            Header::v2(
                CipherSuite::ChaCha20Poly1305,
                13,
                [4; FILE_ID_LEN],
                (0..MAX_WRAPS)
                    .map(|i| wrap("gcp", &format!("k{i}"), "", &[i as u8; 8]))
                    .collect(),
            ),
        ),
    ];
    for (name, h) in headers {
        let h = h.expect("a valid seed header");
        let (bytes, _) = seal_header(&h, &dek).expect("the seed header seals");
        add("header", name.into(), bytes);
    }

    let key = |provider: &str, id: &str| KeySpec {
        provider: provider.into(),
        id: id.into(),
        version: None,
    };
    let mut root = Policy::new(
        "/".into(),
        CipherSuite::Aes256Gcm,
        true,
        key("local", "default"),
    );
    root.retired.push(key("local", "old"));
    root.recipients.push(key("recovery", "offline"));
    root.rotate_after = Some(std::time::Duration::from_secs(90 * 86400));
    let mut pii = Policy::new(
        "/pii/eu".into(),
        CipherSuite::ChaCha20Poly1305,
        false,
        KeySpec {
            version: Some("4".into()),
            ..key("azure-eu", "pii")
        },
    );
    pii.max_key_age = Some(std::time::Duration::from_secs(36 * 3600));
    let mut cfg = VolumeConfig {
        format_version: CONFIG_FORMAT,
        volume_id: "0f1e2d3c4b5a69788796a5b4c3d2e1f0".into(),
        block_size: 4096,
        legacy_v1_files: true,
        policies: vec![root, pii],
        volume_key: WrappedVolumeKey {
            provider: "local".into(),
            key_id: "default".into(),
            key_version: "1".into(),
            wrapped: "AAECAwQFBgcICQ==".into(),
        },
        mac: String::new(),
    };
    cfg.seal(&fixed_dek(0x17));
    let text = toml::to_string_pretty(&cfg).expect("the seed configuration serializes");
    add("volume_config", "two-policies".into(), text.into_bytes());

    for (name, bytes) in [
        ("short", b"\x05a.txtb.txt".to_vec()),
        ("edge", [&[248][..], &[b'y'; 248], &[b'y'; 249]].concat()),
        ("long", [&[255][..], &[b'x'; 255], b".kmsfs.x"].concat()),
        ("policy-dir", b"//pii//eu/".to_vec()),
    ] {
        add("names", name.into(), bytes);
    }

    for shift in [MIN_BLOCK_SHIFT, 16, MAX_BLOCK_SHIFT] {
        for (layout, layout_byte) in [("v1", 0u8), ("v2", 1)] {
            let shift_byte = shift - MIN_BLOCK_SHIFT;
            let bs = 1u64 << shift;
            let geometry: Vec<u8> = [&[shift_byte, layout_byte][..]]
                .into_iter()
                .chain([
                    &(3 * bs + 1).to_be_bytes()[..],
                    &(2 * (bs + 36) + 5).to_be_bytes(),
                    &2u64.to_be_bytes(),
                    &(bs - 1).to_be_bytes(),
                    &(2 * bs + 2).to_be_bytes(),
                ])
                .flatten()
                .copied()
                .collect();
            add("block_geometry", format!("{layout}-{shift}"), geometry);
            for (suite, suite_byte) in [("aes", 0u8), ("chacha", 1)] {
                let codec: Vec<u8> = [&[suite_byte, shift_byte, layout_byte][..]]
                    .into_iter()
                    .chain([
                        &[0x11; DEK_LEN][..],
                        &[0x22; FILE_ID_LEN],
                        &5u64.to_be_bytes(),
                        &((bs + 100) as u16).to_be_bytes(),
                        &77u16.to_be_bytes(),
                        b"block codec seed plaintext",
                    ])
                    .flatten()
                    .copied()
                    .collect();
                add("block_codec", format!("{suite}-{layout}-{shift}"), codec);
            }
        }
    }
    for (name, len) in [("small-block", 4096 + 40), ("empty-block", 0)] {
        let record = crate::format::intent::TruncateRecord {
            file_id: [0x22; FILE_ID_LEN],
            ciphertext_size: 3 * 4124 + len as u64,
            block_index: 3,
            old_block_digest: [0x33; 32],
            sealed_block: vec![0x44; len],
        };
        add("intent", name.into(), record.encode().expect("encodes"));
    }
    seeds
}
