//! Small filesystems on loop devices for tests that need a real disk
//! under the backing directory (one that fills up, fails, or is copied as
//! a power loss would leave it).

use std::fs::{self, File};
use std::path::PathBuf;
use std::process::Command;

/// Installs Debian package `package` when `tool` is not on PATH (one
/// install at a time: tests run in parallel, and dpkg takes a lock; the
/// package lists are fetched if the first try finds none).
pub fn ensure_tool(tool: &str, package: &str) {
    static APT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let found = |t: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if found(tool) {
        return;
    }
    let _one = APT.lock().unwrap_or_else(|e| e.into_inner());
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(["-o", "DPkg::Lock::Timeout=600"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
    };
    let install = || apt(&["install", "-y", "-q", package]);
    let mut out = install();
    if !out.as_ref().is_ok_and(|o| o.status.success()) {
        let _ = apt(&["update", "-q"]);
        out = install();
    }
    assert!(
        found(tool),
        "{tool} is missing and `apt-get install {package}` did not provide it: {out:?}"
    );
}

/// A small filesystem of `kind` ("ext4", "btrfs") in a sparse image on a
/// loop device, mounted on a fresh directory; unmounted when dropped. The
/// machine's own disk is never filled: only the image's size can be.
pub struct LoopDisk {
    dir: tempfile::TempDir,
    pub image: PathBuf,
}

impl LoopDisk {
    pub fn new(kind: &str, size_mib: u64) -> LoopDisk {
        Self::with_options(kind, size_mib, "loop")
    }

    /// Like `new`, mounted with `options` (which must include "loop").
    pub fn with_options(kind: &str, size_mib: u64, options: &str) -> LoopDisk {
        super::require_fuse();
        let dir = super::tempdir("kmsfs-faults-disk");
        let image = dir.path().join("image");
        File::create(&image)
            .unwrap()
            .set_len(size_mib << 20)
            .unwrap();
        let mkfs = Command::new(format!("mkfs.{kind}"))
            .args(if kind == "btrfs" {
                &["-q", "-f"][..]
            } else {
                &["-q", "-F"][..]
            })
            .arg(&image)
            .output()
            .unwrap_or_else(|e| panic!("run mkfs.{kind}: {e}"));
        assert!(mkfs.status.success(), "mkfs.{kind}: {mkfs:?}");
        let top = dir.path().join("fs");
        fs::create_dir(&top).unwrap();
        let mount = Command::new("mount")
            .args(["-o", options])
            .arg(&image)
            .arg(&top)
            .output()
            .unwrap();
        assert!(
            mount.status.success(),
            "cannot loop-mount a {kind} image (these tests run as root with loop devices): {mount:?}"
        );
        LoopDisk { dir, image }
    }

    pub fn top(&self) -> PathBuf {
        self.dir.path().join("fs")
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.top()).status();
    }
}
