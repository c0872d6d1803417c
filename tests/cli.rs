//! The `kmsfs` command's contract with scripts and service managers: its
//! exit codes (75, temporary failure, means a retry may help; 1 that it
//! will not; 2 a usage error), `policy status` on hostile backing trees, and
//! the daemon's clean unmount on SIGTERM, SIGINT and SIGHUP.

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Output;

const EXIT_FAILURE: i32 = 1;
const EXIT_USAGE: i32 = 2;
const EXIT_TEMPFAIL: i32 = 75;

/// A backing directory whose policy for /v names a Vault nobody listens on
/// (port 1 refuses connections at once), and an empty mountpoint.
struct UnreachableVault {
    _dir: tempfile::TempDir,
    backing: PathBuf,
    mnt: PathBuf,
}

impl UnreachableVault {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing");
        let mnt = dir.path().join("mnt");
        let key_file = dir.path().join("keys");
        std::fs::create_dir(&mnt).unwrap();
        let b = backing.to_str().unwrap();
        common::init_local(&backing, &key_file, &[]);
        common::run(
            &[
                "policy",
                "set",
                b,
                "/v",
                "--kms",
                "vault",
                "--vault-addr",
                "http://127.0.0.1:1",
                "--vault-key",
                "kmsfs",
                "--no-check",
            ],
            true,
        );
        UnreachableVault {
            _dir: dir,
            backing,
            mnt,
        }
    }

    /// Every command that connects to the backing directory's KMSs.
    fn connecting_commands(&self) -> Vec<Vec<&str>> {
        let (b, m) = (self.backing.to_str().unwrap(), self.mnt.to_str().unwrap());
        vec![
            vec!["mount", b, m],
            vec!["policy", "status", b],
            vec!["kms", "test", b, "/v"],
            vec!["kms", "status", b],
        ]
    }
}

/// Runs kmsfs with VAULT_TOKEN set or unset, and no VAULT_ADDR.
fn kmsfs(args: &[&str], vault_token: Option<&str>) -> Output {
    let mut cmd = common::kmsfs();
    cmd.args(args).env_remove("VAULT_ADDR");
    match vault_token {
        Some(t) => cmd.env("VAULT_TOKEN", t),
        None => cmd.env_remove("VAULT_TOKEN"),
    };
    cmd.output().expect("run kmsfs")
}

fn said(out: &Output) -> String {
    format!(
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn an_unreachable_kms_is_a_temporary_failure() {
    let fs = UnreachableVault::new();
    for args in fs.connecting_commands() {
        let out = kmsfs(&args, Some("any-token"));
        let said = said(&out);
        assert_eq!(
            out.status.code(),
            Some(EXIT_TEMPFAIL),
            "kmsfs {args:?}: {said}"
        );
        assert!(
            said.contains("is unreachable") && said.contains("127.0.0.1:1"),
            "kmsfs {args:?}: {said}"
        );
    }
    assert!(
        fs.mnt.read_dir().unwrap().next().is_none(),
        "nothing was mounted"
    );
}

#[test]
fn a_kms_misconfiguration_is_a_lasting_failure() {
    // Without VAULT_TOKEN, no retry can help.
    let fs = UnreachableVault::new();
    for args in fs.connecting_commands() {
        let out = kmsfs(&args, None);
        let said = said(&out);
        assert_eq!(
            out.status.code(),
            Some(EXIT_FAILURE),
            "kmsfs {args:?}: {said}"
        );
        assert!(said.contains("VAULT_TOKEN"), "kmsfs {args:?}: {said}");
    }
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["init", "b", "--kms", "nope"][..],
        &["init", "b", "--kms", "local", "--cipher", "nope"],
        &["init", "b", "--kms", "vault", "--vault-auth", "nope"],
        &["mount", "b"],
    ] {
        let out = common::run(args, false);
        assert_eq!(
            out.status.code(),
            Some(EXIT_USAGE),
            "kmsfs {args:?}: {}",
            said(&out)
        );
    }
}

#[test]
fn policy_status_counts_regular_files_and_follows_no_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    let outside = dir.path().join("outside");
    let key_file = dir.path().join("keys");
    let b = backing.to_str().unwrap();
    common::init_local(&backing, &key_file, &[]);
    // Two plaintext files count; nothing else does.
    std::fs::create_dir_all(backing.join("sub/deep")).unwrap();
    std::fs::write(backing.join("a"), b"a").unwrap();
    std::fs::write(backing.join("sub/deep/b"), b"b").unwrap();
    std::fs::create_dir(&outside).unwrap();
    for name in ["x", "y", "z"] {
        std::fs::write(outside.join(name), name).unwrap();
    }
    symlink(&outside, backing.join("linked-dir")).unwrap();
    symlink(&outside, backing.join("sub/linked-dir")).unwrap();
    symlink(outside.join("x"), backing.join("linked-file")).unwrap();
    // Opening a FIFO to read would block.
    let fifo = CString::new(backing.join("sub/fifo").as_os_str().as_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);

    let out = common::run(&["policy", "status", b], true);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
    assert_eq!(rows[0]["dir"], "/", "{rows}");
    assert_eq!(rows[0]["files_without_sidecar"], 2, "{rows}");
    assert_eq!(rows[0]["files_on_current_key"], 0, "{rows}");
    assert_eq!(rows[0]["files_on_other_keys"], 0, "{rows}");
}

fn is_mounted(mnt: &Path) -> bool {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mnt = mnt.to_str().unwrap();
    mountinfo.lines().any(|l| l.split(' ').nth(4) == Some(mnt))
}

#[test]
fn termination_signals_unmount_cleanly() {
    let mut fs = common::TestFs::new(&[]);
    std::fs::write(fs.path("f"), b"data").unwrap();
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        let pid = fs.daemon_pid().expect("a daemon serves the mount");
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
        common::wait_for_daemon_exit(&fs.mnt);
        assert!(common::daemon_pids(&fs.mnt).is_empty(), "signal {signal}");
        fs.set_mounted(is_mounted(&fs.mnt));
        assert!(
            !is_mounted(&fs.mnt),
            "signal {signal} left the mount behind; log:\n{}",
            fs.log_text()
        );
        fs.assert_logged(&format!("signal {signal}: unmounting"));
        fs.mount(&[]);
        assert_eq!(std::fs::read(fs.path("f")).unwrap(), b"data");
    }
}
