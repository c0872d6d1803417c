//! The filesystem core driven directly, without FUSE: no kernel, no
//! /dev/fuse and no root needed. One in-memory fake KMS per key
//! (`kms::testing::FakeKms`) stands in for the KMS.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kmsfs::cache::DekCache;
use kmsfs::config::volume::{VolumeConfig, CONFIG_FORMAT};
use kmsfs::config::{ActivePolicy, KeySpec};
use kmsfs::format::CipherSuite;
use kmsfs::fs::error::FsError;
use kmsfs::fs::{sidecar, Caller, Core, SetAttr};
use kmsfs::kms::named::NamedKey;
use kmsfs::kms::testing::FakeKms;
use kmsfs::kms::{KeyProvider, KmsError, KmsRuntime};
use kmsfs::metrics::Metrics;
use kmsfs::policy::Policy;

const ROOT: u64 = 1;

/// A backing directory with a `Core` over it: policy "/" under key `root`,
/// and any further (dir, key) policies, each key its own fake KMS.
struct Fixture {
    _tmp: tempfile::TempDir,
    backing: PathBuf,
    core: Arc<Core>,
    kms: Vec<Arc<FakeKms>>,
}

fn caller() -> Caller {
    Caller {
        uid: unsafe { libc::geteuid() },
        gid: unsafe { libc::getegid() },
        pid: std::process::id(),
    }
}

/// A policy for `dir` under key `key` of provider `fake-<key>`.
fn policy(dir: &str, key: &str, mandatory: bool) -> Policy {
    Policy::new(
        dir.into(),
        CipherSuite::Aes256Gcm,
        mandatory,
        KeySpec {
            provider: format!("fake-{key}"),
            id: key.into(),
            version: None,
        },
    )
}

impl Fixture {
    fn new(extra: &[(&str, &str, bool)]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let backing = tmp.path().join("backing");
        std::fs::create_dir(&backing).unwrap();
        let mut policies = vec![policy("/", "root", true)];
        for (dir, key, mandatory) in extra {
            std::fs::create_dir_all(backing.join(dir.trim_start_matches('/'))).unwrap();
            policies.push(policy(dir, key, *mandatory));
        }
        // What Core takes from the volume configuration: its ID, block
        // size and policies (the volume key and MAC are checked before it).
        let volume = VolumeConfig {
            format_version: CONFIG_FORMAT,
            volume_id: hex::encode([7u8; 16]),
            block_size: 4096,
            legacy_v1_files: false,
            policies: policies.clone(),
            volume_key: Default::default(),
            mac: String::new(),
        };
        let mut kms = Vec::new();
        let mut active = Vec::new();
        for p in policies {
            let fake = Arc::new(FakeKms::new(&p.key.id));
            kms.push(fake.clone());
            let key = NamedKey::wrap(&p.key.provider, fake as Arc<dyn KeyProvider>);
            active.push(ActivePolicy {
                policy: p,
                current: key.clone(),
                keys: vec![key],
            });
        }
        let core = Core::new(
            &backing,
            &volume,
            active,
            DekCache::new(1000, Duration::from_secs(3600)),
            KmsRuntime::new().unwrap(),
            Arc::new(Metrics::default()),
            false,
        )
        .unwrap();
        Fixture {
            _tmp: tmp,
            backing,
            core: Arc::new(core),
            kms,
        }
    }

    /// The key reference of fake KMS `i` as a header records it: by the
    /// name of its provider.
    fn key_ref(&self, i: usize) -> kmsfs::format::KeyRef {
        let r = self.kms[i].key_ref();
        kmsfs::format::KeyRef {
            provider: format!("fake-{}", r.key_id),
            ..r
        }
    }

    fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.core.runtime().block_on(f)
    }

    /// Creates `name` in directory `parent` and writes `data`; returns its
    /// inode and the open handle.
    fn create(&self, parent: u64, name: &str, data: &[u8]) -> (u64, u64) {
        let (attr, fh) = self
            .block_on(
                self.core
                    .create_open(parent, OsStr::new(name), 0o644, caller()),
            )
            .unwrap();
        self.core.write(fh, 0, data, false).unwrap();
        (attr.ino.0, fh)
    }

    fn open(&self, ino: u64) -> Result<u64, FsError> {
        self.block_on(self.core.open(ino, true, caller()))
    }

    fn read_all(&self, fh: u64) -> Result<Vec<u8>, FsError> {
        let mut out = Vec::new();
        self.core.read(fh, 0, 1 << 24, &mut out)?;
        Ok(out)
    }

    /// Opens `ino` afresh and reads it whole.
    fn reread(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        let fh = self.open(ino)?;
        let r = self.read_all(fh);
        self.core.release(fh);
        r
    }

    fn lookup(&self, parent: u64, name: &str) -> Result<u64, FsError> {
        self.core.lookup(parent, OsStr::new(name)).map(|a| a.ino.0)
    }

    fn mkdir(&self, parent: u64, name: &str) -> u64 {
        self.core
            .mkdir(parent, OsStr::new(name), 0o755, caller())
            .unwrap()
            .ino
            .0
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.backing.join(rel)
    }
}

fn errno_of(e: &FsError) -> i32 {
    e.to_errno()
}

/// The errno of a result that must be an error.
fn err<T>(r: Result<T, FsError>) -> i32 {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_errno(),
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_be_bytes()[0] ^ seed)
        .collect()
}

/// Whether `needle` appears anywhere in `hay`.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn create_write_read_round_trip_and_no_plaintext_on_disk() {
    let fx = Fixture::new(&[]);
    let data = pattern(100_000, 1);
    let (ino, fh) = fx.create(ROOT, "f", &data);
    assert_eq!(fx.read_all(fh).unwrap(), data);
    assert_eq!(fx.core.getattr(ino).unwrap().size, data.len() as u64);
    fx.core.release(fh);
    // A fresh open state: the header is read back and its DEK comes from the
    // cache, which the create seeded (no unwrap).
    fx.core.forget(ino, 1);
    let ino = fx.lookup(ROOT, "f").unwrap();
    assert_eq!(fx.reread(ino).unwrap(), data);
    assert_eq!(fx.kms[0].wraps(), 1);
    assert_eq!(fx.kms[0].unwraps(), 0);
    let on_disk = std::fs::read(fx.path("f")).unwrap();
    assert_ne!(on_disk.len(), data.len());
    assert!(
        !contains(&on_disk, &data[..64]),
        "plaintext in the backing file"
    );
    let header = sidecar::read_beside(&fx.path("f")).unwrap();
    assert_eq!(header.parsed.header.primary().key_ref, fx.key_ref(0));
    assert_eq!(header.parsed.header.version(), 2, "new files are format 2");
    // Reserved names are neither visible nor creatable.
    assert_eq!(err(fx.lookup(ROOT, ".kmsfs.f")), libc::ENOENT);
    let e = fx
        .block_on(
            fx.core
                .create_open(ROOT, OsStr::new(".kmsfs.x"), 0o644, caller()),
        )
        .unwrap_err();
    assert_eq!(errno_of(&e), libc::EPERM);
}

#[test]
fn rename_moves_data_and_header_and_unlink_while_open_keeps_the_handle() {
    let fx = Fixture::new(&[]);
    let sub = fx.mkdir(ROOT, "sub");
    let data = pattern(9000, 2);
    let (ino, fh) = fx.create(ROOT, "a", &data);
    fx.core
        .rename(ROOT, OsStr::new("a"), sub, OsStr::new("b"), 0)
        .unwrap();
    assert!(!fx.path("a").exists() && !fx.path(".kmsfs.a").exists());
    assert!(fx.path("sub/b").exists() && fx.path("sub/.kmsfs.b").exists());
    assert_eq!(fx.lookup(sub, "b").unwrap(), ino);
    fx.core.release(fh);
    assert_eq!(fx.reread(ino).unwrap(), data);

    // Unlink while open: the handle still reads and writes; the name, data
    // and sidecar are gone.
    let fh = fx.open(ino).unwrap();
    fx.core.unlink(sub, OsStr::new("b")).unwrap();
    assert_eq!(err(fx.lookup(sub, "b")), libc::ENOENT);
    assert!(!fx.path("sub/b").exists() && !fx.path("sub/.kmsfs.b").exists());
    fx.core.write(fh, 9000, b"more", false).unwrap();
    let mut expect = data.clone();
    expect.extend_from_slice(b"more");
    assert_eq!(fx.read_all(fh).unwrap(), expect);
    assert_eq!(fx.core.getattr(ino).unwrap().size, 9004);
    fx.core.release(fh);
}

#[test]
fn truncate_down_and_up_keeps_the_right_bytes() {
    let fx = Fixture::new(&[]);
    let data = pattern(20_000, 3);
    let (ino, fh) = fx.create(ROOT, "t", &data);
    let set = |size| SetAttr {
        size: Some(size),
        fh: Some(fh),
        ..Default::default()
    };
    let attr = fx
        .block_on(fx.core.setattr(ino, set(5000), caller()))
        .unwrap();
    assert_eq!(attr.size, 5000);
    assert_eq!(fx.read_all(fh).unwrap(), data[..5000]);
    let attr = fx
        .block_on(fx.core.setattr(ino, set(12_345), caller()))
        .unwrap();
    assert_eq!(attr.size, 12_345);
    let mut expect = data[..5000].to_vec();
    expect.resize(12_345, 0);
    assert_eq!(fx.read_all(fh).unwrap(), expect);
    fx.core.release(fh);
    assert_eq!(fx.reread(ino).unwrap(), expect);
}

#[test]
fn xattrs_pass_through_except_reserved_and_unsupported_names() {
    let fx = Fixture::new(&[]);
    let (ino, fh) = fx.create(ROOT, "x", b"x");
    fx.core.release(fh);
    let name = OsStr::new("user.colour");
    fx.core.setxattr(ino, name, b"blue", 0).unwrap();
    assert_eq!(fx.core.getxattr(ino, name).unwrap(), b"blue");
    assert!(contains(&fx.core.listxattr(ino).unwrap(), b"user.colour\0"));
    fx.core.removexattr(ino, name).unwrap();
    assert_eq!(err(fx.core.getxattr(ino, name)), libc::ENODATA);
    let reserved = OsStr::new("user.kmsfs.x");
    assert_eq!(err(fx.core.setxattr(ino, reserved, b"1", 0)), libc::EPERM);
    assert_eq!(err(fx.core.getxattr(ino, reserved)), libc::ENODATA);
    let acl = OsStr::new("system.posix_acl_access");
    assert_eq!(
        err(fx.core.setxattr(ino, acl, b"\x02\0\0\0", 0)),
        libc::EOPNOTSUPP
    );
}

#[test]
fn policies_choose_the_key_and_crossing_keys_is_exdev() {
    let fx = Fixture::new(&[("/pii", "pii", true)]);
    let pii = fx.lookup(ROOT, "pii").unwrap();
    let (_, fh) = fx.create(pii, "p", b"secret");
    fx.core.release(fh);
    let (_, fh) = fx.create(ROOT, "r", b"open");
    fx.core.release(fh);
    let key_of = |rel: &str| {
        sidecar::read_beside(&fx.path(rel))
            .unwrap()
            .parsed
            .header
            .primary()
            .key_ref
            .clone()
    };
    assert_eq!(key_of("pii/p"), fx.key_ref(1));
    assert_eq!(key_of("r"), fx.key_ref(0));
    // Across the policy boundary: EXDEV both ways, for rename and link.
    let rename = |from, name: &str, to, new: &str| {
        fx.core
            .rename(from, OsStr::new(name), to, OsStr::new(new), 0)
            .map_err(|e| errno_of(&e))
    };
    assert_eq!(rename(pii, "p", ROOT, "p"), Err(libc::EXDEV));
    assert_eq!(rename(ROOT, "r", pii, "r"), Err(libc::EXDEV));
    let p = fx.lookup(pii, "p").unwrap();
    let e = fx.core.link(p, ROOT, OsStr::new("l")).unwrap_err();
    assert_eq!(errno_of(&e), libc::EXDEV);
    // Moving the policy's own directory would strand its policy.
    let other = fx.mkdir(ROOT, "other");
    assert_eq!(rename(ROOT, "pii", other, "pii"), Err(libc::EXDEV));
    // Within one policy both work, and a hard link gets its own sidecar.
    assert_eq!(rename(pii, "p", pii, "q"), Ok(()));
    let q = fx.lookup(pii, "q").unwrap();
    fx.core.link(q, pii, OsStr::new("q2")).unwrap();
    assert_eq!(
        std::fs::read(fx.path("pii/.kmsfs.q2")).unwrap(),
        std::fs::read(fx.path("pii/.kmsfs.q")).unwrap()
    );
}

/// A plaintext file of a non-mandatory directory (no sidecar) renames like
/// any file, over an encrypted one too, whose header then goes with it;
/// exchanged with an encrypted one, each keeps its own header.
#[test]
fn plaintext_files_rename_without_a_header_and_take_none_over() {
    let fx = Fixture::new(&[("/pub", "pub", false)]);
    let dir = fx.lookup(ROOT, "pub").unwrap();
    std::fs::write(fx.path("pub/plain"), b"legacy bytes").unwrap();
    let rename = |name: &str, new: &str, flags| {
        fx.core
            .rename(dir, OsStr::new(name), dir, OsStr::new(new), flags)
            .map_err(|e| errno_of(&e))
    };
    let read = |name: &str| fx.reread(fx.lookup(dir, name).unwrap());
    assert_eq!(rename("plain", "moved", 0), Ok(()));
    assert_eq!(read("moved").unwrap(), b"legacy bytes");
    let (_, fh) = fx.create(dir, "enc", b"encrypted");
    fx.core.release(fh);
    assert_eq!(rename("moved", "enc", libc::RENAME_EXCHANGE), Ok(()));
    assert_eq!(read("enc").unwrap(), b"legacy bytes");
    assert_eq!(read("moved").unwrap(), b"encrypted");
    assert!(fx.path("pub/.kmsfs.moved").exists() && !fx.path("pub/.kmsfs.enc").exists());
    // Over an encrypted file: its header must not stay as the new one's.
    assert_eq!(rename("enc", "moved", 0), Ok(()));
    assert!(!fx.path("pub/.kmsfs.moved").exists());
    assert_eq!(read("moved").unwrap(), b"legacy bytes");
}

/// Flips one byte of backing file `path` at `offset`.
fn flip(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    f.write_all_at(&[b[0] ^ 0x20], offset).unwrap();
}

#[test]
fn tampering_and_kms_failures_give_the_right_errors() {
    let fx = Fixture::new(&[]);
    let data = pattern(5 * 4096, 4);
    let (ino, fh) = fx.create(ROOT, "d", &data);
    fx.core.release(fh);
    // A flipped ciphertext byte in block 2: that block fails, naming it.
    flip(&fx.path("d"), 2 * 4124 + 40);
    let fh = fx.open(ino).unwrap();
    let mut out = Vec::new();
    let e = fx.core.read(fh, 0, data.len(), &mut out).unwrap_err();
    assert!(
        matches!(&e, FsError::Block { block: 2, .. }),
        "expected a block 2 error, got {e}"
    );
    assert_eq!(errno_of(&e), libc::EIO);
    // The failed block's bytes never reach the caller's buffer.
    assert!(out.len() < 3 * 4096 || out[2 * 4096..3 * 4096].iter().all(|&b| b == 0));
    fx.core.read(fh, 0, 2 * 4096, &mut out).unwrap();
    assert_eq!(out, data[..2 * 4096], "undamaged blocks still read");
    fx.core.release(fh);

    // A flipped header byte (the MAC covers it): open fails with a header
    // error once the open state is gone.
    let (ino, fh) = fx.create(ROOT, "h", b"header");
    fx.core.release(fh);
    fx.core.forget(ino, 1);
    flip(&fx.path(".kmsfs.h"), 11); // block shift: still parses, MAC fails
    let ino = fx.lookup(ROOT, "h").unwrap();
    let e = fx.open(ino).unwrap_err();
    assert!(matches!(&e, FsError::Header { .. }), "got {e}");
    assert_eq!(errno_of(&e), libc::EIO);

    // A missing sidecar under a mandatory policy.
    let (ino, fh) = fx.create(ROOT, "m", b"m");
    fx.core.release(fh);
    fx.core.forget(ino, 1);
    std::fs::remove_file(fx.path(".kmsfs.m")).unwrap();
    let ino = fx.lookup(ROOT, "m").unwrap();
    let e = fx.open(ino).unwrap_err();
    assert!(e.to_string().contains("sidecar is missing"), "got {e}");

    // The KMS refuses to unwrap: a KMS error, EIO, nothing read.
    let (ino, fh) = fx.create(ROOT, "k", b"k");
    fx.core.release(fh);
    fx.core.forget(ino, 1);
    let fx2 = Fixture::new(&[]); // a fresh core with an empty DEK cache
    std::fs::rename(fx.path("k"), fx2.path("k")).unwrap();
    std::fs::rename(fx.path(".kmsfs.k"), fx2.path(".kmsfs.k")).unwrap();
    let ino = fx2.lookup(ROOT, "k").unwrap();
    let e = fx2.open(ino).unwrap_err();
    assert!(matches!(&e, FsError::Kms { .. }), "another key: got {e}");
    // The KMS is down at create: the create fails (EIO), and leaves nothing.
    fx2.kms[0].fail_next(
        1,
        KmsError::Unreachable {
            kms: "fake".into(),
            detail: "down".into(),
        },
    );
    let e = fx2
        .block_on(fx2.core.create_open(ROOT, OsStr::new("n"), 0o644, caller()))
        .unwrap_err();
    assert!(matches!(&e, FsError::Kms { .. }), "got {e}");
    assert!(e.to_string().contains("no DEK could be generated"), "{e}");
    assert!(!fx2.path("n").exists() && !fx2.path(".kmsfs.n").exists());
}

/// A power loss can leave a new, never-synced file as an empty data file
/// beside an empty sidecar: it opens as the empty file it was and is given
/// a header. An empty sidecar beside ciphertext stays EIO (that is damage
/// or tampering, not an unwritten create).
#[test]
fn an_empty_file_whose_header_was_never_written_gets_one_on_open() {
    let fx = Fixture::new(&[]);
    std::fs::write(fx.path("new"), b"").unwrap();
    std::fs::write(fx.path(".kmsfs.new"), b"").unwrap();
    let ino = fx.lookup(ROOT, "new").unwrap();
    let fh = fx.block_on(fx.core.open(ino, false, caller())).unwrap();
    assert_eq!(fx.read_all(fh).unwrap(), b"");
    fx.core.write(fh, 0, b"written after", false).unwrap();
    fx.core.fsync(fh, false).unwrap();
    fx.core.release(fh);
    let header = sidecar::read_beside(&fx.path("new")).unwrap();
    assert_eq!(header.parsed.header.primary().key_ref, fx.key_ref(0));
    fx.core.forget(ino, 1);
    let ino = fx.lookup(ROOT, "new").unwrap();
    assert_eq!(fx.reread(ino).unwrap(), b"written after");

    let (ino, fh) = fx.create(ROOT, "full", b"some bytes");
    fx.core.fsync(fh, false).unwrap();
    fx.core.release(fh);
    fx.core.forget(ino, 1);
    std::fs::write(fx.path(".kmsfs.full"), b"").unwrap();
    let ino = fx.lookup(ROOT, "full").unwrap();
    assert_eq!(err(fx.open(ino)), libc::EIO);
    assert_eq!(std::fs::read(fx.path(".kmsfs.full")).unwrap(), b"");
}
