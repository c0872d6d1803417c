//! The `kmsfs` command without a mount: its exit codes, which scripts and
//! service managers act on (2: a usage error), and `policy status` on
//! hostile backing trees.

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::process::Output;

const EXIT_USAGE: i32 = 2;

fn said(out: &Output) -> String {
    format!(
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
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
    common::run(
        &[
            "init",
            b,
            "--kms",
            "local",
            "--key-file",
            key_file.to_str().unwrap(),
        ],
        true,
    );
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
