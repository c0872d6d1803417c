//! The DEK pool (`dek_pool`) through the filesystem core, without FUSE: a
//! warm pool creates files with no KMS call, every created file's DEK is
//! bound to its own file ID and the volume, the audit log tells pool
//! wraps from direct ones, and an unreachable KMS still fails a create
//! with its clear error.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kmsfs::audit::AuditLog;
use kmsfs::cache::DekCache;
use kmsfs::config::volume::{VolumeConfig, CONFIG_FORMAT};
use kmsfs::config::{ActivePolicy, KeySpec};
use kmsfs::format::CipherSuite;
use kmsfs::fs::{sidecar, Caller, Core};
use kmsfs::kms::named::NamedKey;
use kmsfs::kms::testing::FakeKms;
use kmsfs::kms::{KeyProvider, KmsError, KmsRuntime, WrapContext};
use kmsfs::metrics::Metrics;
use kmsfs::policy::Policy;

const ROOT: u64 = 1;
const VOLUME_ID: [u8; 16] = [7; 16];

/// A backing directory with a `Core` over it, policy "/" under one fake
/// KMS key, and a DEK pool of `pool` entries.
struct Fixture {
    _tmp: tempfile::TempDir,
    backing: PathBuf,
    audit: PathBuf,
    core: Core,
    kms: Arc<FakeKms>,
}

fn caller() -> Caller {
    Caller {
        uid: unsafe { libc::geteuid() },
        gid: unsafe { libc::getegid() },
        pid: std::process::id(),
    }
}

impl Fixture {
    fn new(kms: FakeKms, pool: usize) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let backing = tmp.path().join("backing");
        std::fs::create_dir(&backing).unwrap();
        let policy = Policy::new(
            "/".into(),
            CipherSuite::Aes256Gcm,
            true,
            KeySpec {
                provider: "fake-root".into(),
                id: "root".into(),
                version: None,
            },
        );
        let volume = VolumeConfig {
            format_version: CONFIG_FORMAT,
            volume_id: hex::encode(VOLUME_ID),
            block_size: 4096,
            legacy_v1_files: false,
            policies: vec![policy.clone()],
            volume_key: Default::default(),
            mac: String::new(),
        };
        let kms = Arc::new(kms);
        let key = NamedKey::wrap("fake-root", kms.clone() as Arc<dyn KeyProvider>);
        let active = ActivePolicy {
            policy,
            current: key.clone(),
            keys: vec![key],
        };
        let core = Core::new(
            &backing,
            &volume,
            vec![active],
            DekCache::new(1000, Duration::from_secs(3600)),
            KmsRuntime::new().unwrap(),
            Arc::new(Metrics::default()),
            false,
        )
        .unwrap();
        let audit = tmp.path().join("audit.log");
        core.set_audit_log(Arc::new(AuditLog::open(&audit).unwrap()));
        core.set_dek_pool(pool);
        Fixture {
            _tmp: tmp,
            backing,
            audit,
            core,
            kms,
        }
    }

    fn create(&self, name: &str) -> Result<u64, kmsfs::fs::error::FsError> {
        let (attr, fh) = self.core.runtime().block_on(self.core.create_open(
            ROOT,
            OsStr::new(name),
            0o644,
            caller(),
        ))?;
        self.core.write(fh, 0, name.as_bytes(), false).unwrap();
        self.core.release(fh);
        Ok(attr.ino.0)
    }

    /// The value of metric `name` (a counter or gauge without labels).
    fn metric(&self, name: &str) -> u64 {
        let text = self.core.render_metrics();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
    }

    /// Waits (without asserting on time) until the pool holds `n` entries.
    fn wait_for_pool(&self, n: u64) {
        let start = Instant::now();
        while self.metric("kmsfs_dek_pool_available") < n {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the pool never filled"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn audit_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

#[test]
fn a_warm_pool_creates_files_without_kms_calls() {
    // 20 ms a wrap: 40 direct creates would wait 800 ms on the KMS.
    let fx = Fixture::new(
        FakeKms::new("root").with_delay(Duration::from_millis(20)),
        64,
    );
    // The first create goes to the KMS and starts the pool's first fill,
    // of a cold pool's 8 entries; the next create takes one, which leaves
    // the pool below its low-water mark (19 of 64): it is filled up in one
    // wrap_many request.
    fx.create("first").unwrap();
    assert_eq!(fx.metric("kmsfs_dek_pool_misses_total"), 1);
    fx.wait_for_pool(8);
    fx.create("second").unwrap();
    fx.wait_for_pool(64);
    assert_eq!(fx.kms.wrap_batches(), 2);
    let requests = fx.kms.requests();

    // 40 creates leave 24 of 64, above the low-water mark: no refill, so
    // the create path makes no KMS call at all.
    let names: Vec<String> = (0..40).map(|i| format!("f{i}")).collect();
    for name in &names {
        fx.create(name).unwrap();
    }
    assert_eq!(fx.kms.requests(), requests, "KMS calls on the create path");
    assert_eq!(fx.metric("kmsfs_dek_pool_hits_total"), 41);
    assert_eq!(fx.metric("kmsfs_dek_pool_misses_total"), 1);
    assert_eq!(fx.metric("kmsfs_dek_pool_available"), 24);

    // Each file has a header of its own, wrapped for its own file ID and
    // this volume, and reads back.
    let mut ids = std::collections::HashSet::new();
    for name in &names {
        let header = sidecar::read_beside(&fx.backing.join(name)).unwrap();
        let h = &header.parsed.header;
        assert!(ids.insert(h.file_id), "{name}: a file ID used twice");
        let ctx = WrapContext::file(h.file_id, VOLUME_ID);
        let mut wrapped = h.primary().clone();
        wrapped.key_ref = fx.kms.key_ref();
        fx.core
            .runtime()
            .block_on(fx.kms.unwrap(&wrapped, &ctx))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }

    // The audit log: each pool wrap once when made ("(dek pool)"), and each
    // create's line says its DEK came from the pool.
    let lines = fx.audit_lines();
    let pool_wraps = lines
        .iter()
        .filter(|l| l["op"] == "wrap" && l["path"] == "(dek pool)")
        .count();
    assert_eq!(pool_wraps, 8 + 57);
    let pooled: Vec<_> = lines
        .iter()
        .filter(|l| l["op"] == "wrap" && l["detail"].as_str().is_some_and(|d| d.contains("pool")))
        .collect();
    assert_eq!(pooled.len(), 41);
    assert_eq!(pooled[0]["path"], "/second");
    assert_eq!(pooled[0]["key"]["provider"], "fake-root");
}

#[test]
fn no_pool_when_turned_off_and_an_unreachable_kms_fails_the_create() {
    let fx = Fixture::new(FakeKms::new("root"), 0);
    for i in 0..3 {
        fx.create(&format!("f{i}")).unwrap();
    }
    assert_eq!(fx.kms.requests(), 3, "one direct call per create");
    assert_eq!(fx.metric("kmsfs_dek_pool_misses_total"), 0);
    assert_eq!(fx.metric("kmsfs_dek_pool_available"), 0);

    let fx = Fixture::new(FakeKms::new("root"), 16);
    fx.kms.fail_next(
        1_000_000,
        KmsError::Unreachable {
            kms: "fake KMS".into(),
            detail: "connection refused".into(),
        },
    );
    let e = fx.create("f").unwrap_err();
    assert!(
        e.to_string().contains("no DEK could be generated")
            && e.to_string().contains("unreachable"),
        "{e}"
    );
    // The refill failed too, and is counted (it runs in the background).
    let start = Instant::now();
    while fx.metric("kmsfs_dek_pool_refill_errors_total") == 0 {
        assert!(start.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(10));
    }
    // The KMS is back: creates work again, directly until the pool refills.
    fx.kms.fail_next(0, KmsError::Config(String::new()));
    fx.create("g").unwrap();
}
