//! Shared harness for tests that mount a real kmsfs filesystem.
//! A test that needs FUSE fails (never skips) when it cannot mount.
#![allow(dead_code)]

pub mod kms;
pub mod loop_disk;
pub mod nodes;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// `kmsfs`, with this test process's own trusted configuration (see
/// [`trusted_config`]).
pub fn kmsfs() -> Command {
    let mut c = Command::new(kmsfs_bin());
    c.env("KMSFS_CONFIG", trusted_config());
    c
}

/// The `kmsfs` binary under test: this build's, unless `KMSFS_TEST_BIN`
/// names a copy (scripts/test-core-unprivileged.sh runs tests as a user
/// who cannot reach the build directory).
pub fn kmsfs_bin() -> PathBuf {
    std::env::var_os("KMSFS_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_kmsfs")))
}

/// The trusted configuration every kmsfs command of this test process
/// uses: a file in a directory of its own (0700, removed at exit by no one:
/// it lives in the system temp directory), so tests never touch
/// /etc/kmsfs. Tests running in parallel add their providers to it under
/// its lock, with names of their own.
pub fn trusted_config() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| tempdir("kmsfs-trusted").keep().join("kmsfs.toml"))
        .clone()
}

/// Runs `kmsfs ARGS`, returning its output; panics with stderr on failure
/// when `expect_ok`.
pub fn run(args: &[&str], expect_ok: bool) -> Output {
    run_with(&[], args, expect_ok)
}

/// [`run`] with extra environment variables.
pub fn run_with(env: &[(&str, &str)], args: &[&str], expect_ok: bool) -> Output {
    let out = kmsfs()
        .envs(env.iter().copied())
        .args(args)
        .output()
        .expect("run kmsfs");
    if expect_ok && !out.status.success() {
        panic!(
            "kmsfs {:?} failed ({}): {}",
            args,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// A fresh temporary directory whose name starts with `prefix`, removed
/// when dropped.
pub fn tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("a temporary directory")
}

/// `kmsfs init BACKING` with the local KMS and keyring `key_file`, plus
/// `extra` init flags.
pub fn init_local(backing: &Path, key_file: &Path, extra: &[&str]) {
    let mut args = vec![
        "init",
        backing.to_str().unwrap(),
        "--kms",
        "local",
        "--key-file",
        key_file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(&args, true);
}

/// A loopback TCP port that was free a moment ago: nothing listens on it.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The element of JSON array `list` whose `field` is `value`.
pub fn find_by<'a>(list: &'a serde_json::Value, field: &str, value: &str) -> &'a serde_json::Value {
    list.as_array()
        .unwrap_or_else(|| panic!("not a JSON array: {list}"))
        .iter()
        .find(|e| e[field] == value)
        .unwrap_or_else(|| panic!("no element with {field} = {value:?} in {list}"))
}

pub fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: these tests mount a real FUSE filesystem (install fuse3, run as root)"
    );
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "mount tests must run as root"
    );
}

/// A temp dir (removed on drop) with the paths of a backing directory, a
/// mountpoint (created) and a daemon log file in it, for a test that mounts:
/// FUSE must be usable.
pub struct Places {
    pub dir: tempfile::TempDir,
    pub backing: PathBuf,
    pub mnt: PathBuf,
    pub log: PathBuf,
}

impl Places {
    pub fn new(prefix: &str) -> Places {
        require_fuse();
        let dir = tempdir(prefix);
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        Places {
            backing: dir.path().join("backing"),
            log: dir.path().join("kmsfs.log"),
            mnt,
            dir,
        }
    }
}

/// Unmounts `mnt` lazily (whatever state its daemon is in) and waits for
/// the daemon to exit: what a test's mount does when dropped.
pub fn detach(mnt: &Path) {
    let c = std::ffi::CString::new(mnt.to_str().unwrap()).unwrap();
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    wait_for_daemon_exit(mnt);
}

/// A backing directory, a keyring and a mountpoint in a temp dir.
pub struct TestFs {
    pub dir: tempfile::TempDir,
    pub backing: PathBuf,
    pub mnt: PathBuf,
    pub key_file: PathBuf,
    pub log: PathBuf,
    mounted: bool,
}

impl TestFs {
    /// `kmsfs init` with the local KMS plus `extra` init flags, then mount.
    pub fn new(extra_init: &[&str]) -> Self {
        let Places {
            dir,
            backing,
            mnt,
            log,
        } = Places::new("kmsfs-test");
        let key_file = dir.path().join("keys");
        init_local(&backing, &key_file, extra_init);
        let mut fs = TestFs {
            dir,
            backing,
            mnt,
            key_file,
            log,
            mounted: false,
        };
        fs.mount(&[]);
        fs
    }

    /// A volume whose directory `dir` has a non-mandatory policy (under the
    /// default key) and holds what `plant` puts in the backing directory
    /// before the mount: plaintext files, typically.
    pub fn with_plaintext_dir(dir: &str, plant: impl FnOnce(&TestFs)) -> Self {
        let mut fs = TestFs::new(&[]);
        fs.umount();
        std::fs::create_dir(fs.backing_path(dir)).unwrap();
        plant(&fs);
        fs.set_policy(&format!("/{dir}"), "default", &["--not-mandatory"]);
        fs.mount(&[]);
        fs
    }

    pub fn mount(&mut self, extra: &[&str]) {
        let mut args = vec![
            "mount",
            self.backing.to_str().unwrap(),
            self.mnt.to_str().unwrap(),
            "--log-file",
            self.log.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        run(&args, true);
        self.mounted = true;
    }

    pub fn umount(&mut self) {
        if self.mounted {
            run(&["umount", self.mnt.to_str().unwrap()], true);
            self.mounted = false;
            wait_for_daemon_exit(&self.mnt);
        }
    }

    pub fn remount(&mut self) {
        self.umount();
        self.mount(&[]);
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn backing_path(&self, rel: &str) -> PathBuf {
        self.backing.join(rel)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Asserts that the daemon's log contains `needle`.
    pub fn assert_logged(&self, needle: &str) {
        let log = self.log_text();
        assert!(log.contains(needle), "the log lacks {needle:?}:\n{log}");
    }

    /// PID of this mount's daemon.
    pub fn daemon_pid(&self) -> Option<i32> {
        daemon_pids(&self.mnt).into_iter().next()
    }

    pub fn set_mounted(&mut self, m: bool) {
        self.mounted = m;
    }

    /// `kmsfs policy set` for `dir` under key `key` of this keyring, plus
    /// `extra` flags; takes effect at the next mount.
    pub fn set_policy(&self, dir: &str, key: &str, extra: &[&str]) {
        let mut flags = vec!["--key-name", key];
        flags.extend_from_slice(extra);
        self.policy_set(dir, &self.key_file, &flags, true);
    }

    /// `kmsfs policy set` for `dir` under local keyring `key_file` (its key
    /// `default` unless `extra` names another), plus `extra` flags; returns
    /// its output, and panics on failure when `expect_ok`.
    pub fn policy_set(
        &self, dir: &str, key_file: &Path, extra: &[&str], expect_ok: bool,
    ) -> Output {
        let mut args = vec![
            "policy",
            "set",
            self.backing.to_str().unwrap(),
            dir,
            "--kms",
            "local",
            "--key-file",
            key_file.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        run(&args, expect_ok)
    }
}

impl Drop for TestFs {
    fn drop(&mut self) {
        if self.mounted {
            detach(&self.mnt);
        }
    }
}

/// PIDs of `kmsfs mount` daemons serving `mnt`.
pub fn daemon_pids(mnt: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    let needle = mnt.to_str().unwrap();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a == "mount")
            && args.iter().any(|a| a == needle)
            && args.iter().any(|a| a == "--foreground")
        {
            pids.push(pid);
        }
    }
    pids
}

pub fn wait_for_daemon_exit(mnt: &Path) {
    let start = Instant::now();
    while !daemon_pids(mnt).is_empty() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
