//! Faults from below a mount: the backing disk full (ENOSPC), the backing
//! disk failing reads (EIO), and the KMS going away and coming back. In each
//! the program gets a clear error, nothing already written is damaged and the
//! mount stays up. These tests need root, FUSE, loop devices and a real
//! OpenBao dev server, and fail (never skip) without them; the tools they
//! use (stress-ng, mkfs.btrfs) are installed with apt-get when missing.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::loop_disk::{ensure_tool, LoopDisk};
use common::{pattern, run, Places};

/// A kmsfs volume (local KMS) whose backing directory and daemon log both
/// live on `disk`; the keyring lives elsewhere.
struct Volume {
    places: Places,
    backing: PathBuf,
    log: PathBuf,
    key_file: PathBuf,
}

impl Volume {
    fn on(disk: &LoopDisk) -> Volume {
        let places = Places::new("kmsfs-faults");
        let backing = disk.top().join("backing");
        let log = disk.top().join("kmsfs.log");
        let key_file = places.dir.path().join("keys");
        common::init_local(&backing, &key_file, &[]);
        let v = Volume {
            places,
            backing,
            log,
            key_file,
        };
        v.mount();
        v
    }

    fn mount(&self) {
        run(
            &[
                "mount",
                self.backing.to_str().unwrap(),
                self.places.mnt.to_str().unwrap(),
                "--log-file",
                self.log.to_str().unwrap(),
            ],
            true,
        );
    }

    fn remount(&self) {
        run(&["umount", self.places.mnt.to_str().unwrap()], true);
        common::wait_for_daemon_exit(&self.places.mnt);
        self.mount();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.places.mnt.join(name)
    }

    fn daemon(&self) -> i32 {
        *common::daemon_pids(&self.places.mnt)
            .first()
            .expect("the mount's daemon is running")
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = &self.key_file;
        common::detach(&self.places.mnt);
    }
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error()
        .unwrap_or_else(|| panic!("not an OS error: {e}"))
}

/// Writes `data` to a new file at `path` and fsyncs it.
fn write_synced(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// Every file under `dir` reads to its end without an error.
fn assert_all_readable(dir: &Path) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            let mut buf = Vec::new();
            File::open(e.path())
                .and_then(|mut f| f.read_to_end(&mut buf))
                .unwrap_or_else(|err| panic!("{} is unreadable: {err}", e.path().display()));
        }
    }
}

fn fallocate(f: &File, offset: i64, len: i64) -> Result<(), i32> {
    match unsafe { libc::fallocate(f.as_raw_fd(), 0, offset, len) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error().raw_os_error().unwrap()),
    }
}

fn ftruncate(f: &File, len: i64) -> Result<(), i32> {
    match unsafe { libc::ftruncate(f.as_raw_fd(), len) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error().raw_os_error().unwrap()),
    }
}

/// Calls `op` until it fails (at most `limit` times) and returns the
/// errno it failed with, which must be ENOSPC.
fn until_full(what: &str, limit: usize, mut op: impl FnMut(usize) -> std::io::Result<()>) {
    for i in 0..limit {
        if let Err(e) = op(i) {
            assert_eq!(errno(&e), libc::ENOSPC, "{what} #{i}: {e}");
            return;
        }
    }
    panic!("{what}: {limit} tries and the disk is still not full");
}

/// The backing disk fills up under writes, creates, renames, appends and
/// truncates, and under fallocate/ftruncate at huge offsets; the daemon's
/// log is on that same full disk. Programs get ENOSPC/EFBIG/EINVAL as on a
/// local filesystem, the daemon stays up, everything fsynced before reads
/// back exactly (also after a remount), and writes work again once space
/// is freed.
#[test]
fn a_full_backing_disk_gives_clean_errors_and_damages_nothing() {
    ensure_tool("stress-ng", "stress-ng");
    let disk = LoopDisk::new("ext4", 64);
    let v = Volume::on(&disk);
    let daemon = v.daemon();
    let mut kept: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..6 {
        let name = format!("kept{i}");
        let data = pattern(300_000 + i * 12_345, i as u64);
        write_synced(&v.path(&name), &data).unwrap();
        kept.push((name, data));
    }
    let appended_to = pattern(50_001, 99);
    write_synced(&v.path("appended"), &appended_to).unwrap();
    let grown_data = pattern(8192, 5);
    write_synced(&v.path("grown"), &grown_data).unwrap();

    // Big writes, each fsynced: with the writeback cache the error comes at
    // write() or at fsync().
    let mut big = File::create(v.path("big")).unwrap();
    let chunk = pattern(1 << 20, 7);
    until_full("1 MiB write to big", 200, |_| {
        big.write_all(&chunk)?;
        big.sync_data()
    });
    drop(big);
    // Many small files.
    until_full("small file", 20_000, |i| {
        write_synced(&v.path(&format!("small{i}")), &pattern(3000, i as u64))
    });
    // An append to a file that was whole before.
    let appended = pattern(200_000, 98);
    let err = OpenOptions::new()
        .append(true)
        .open(v.path("appended"))
        .and_then(|mut f| {
            f.write_all(&appended)?;
            f.sync_all()
        })
        .expect_err("an append of 200 kB to a full disk");
    assert_eq!(errno(&err), libc::ENOSPC, "{err}");
    // Renames on a full disk succeed or fail cleanly.
    for (name, _) in kept.iter_mut() {
        let moved = format!("{name}.moved");
        match fs::rename(v.path(name), v.path(&moved)) {
            Ok(()) => *name = moved,
            Err(e) => assert_eq!(errno(&e), libc::ENOSPC, "rename {name}: {e}"),
        }
    }
    // Sizes: as ext4 answers (its files end at 16 TiB), but for holes.
    let grown = OpenOptions::new()
        .write(true)
        .open(v.path("grown"))
        .unwrap();
    // kmsfs reserves the space of holes (ext4 would not): ENOSPC here.
    assert_eq!(ftruncate(&grown, 1 << 40), Err(libc::ENOSPC));
    assert_eq!(fallocate(&grown, 0, 1 << 40), Err(libc::ENOSPC));
    assert_eq!(fallocate(&grown, 1 << 62, 4096), Err(libc::EFBIG));
    assert_eq!(ftruncate(&grown, 1 << 62), Err(libc::EFBIG));
    assert_eq!(ftruncate(&grown, i64::MAX), Err(libc::EFBIG));
    assert_eq!(fallocate(&grown, i64::MAX - 4096, 4096), Err(libc::EFBIG));
    assert_eq!(fallocate(&grown, i64::MAX - 10, 100), Err(libc::EFBIG));
    assert_eq!(ftruncate(&grown, -1), Err(libc::EINVAL));
    assert_eq!(fallocate(&grown, -4096, 4096), Err(libc::EINVAL));
    assert_eq!(grown.metadata().unwrap().len(), 8192);
    drop(grown);
    kept.push(("grown".into(), grown_data));

    // Log lines that cannot be written (the log's disk is full): the
    // refused-space warning goes out at most once a second, so spread the
    // failures over a few seconds. This is what used to end the mount.
    let f = OpenOptions::new()
        .write(true)
        .open(v.path(&kept[0].0))
        .unwrap();
    for _ in 0..4 {
        assert_eq!(fallocate(&f, 1 << 30, 1 << 30), Err(libc::ENOSPC));
        std::thread::sleep(Duration::from_millis(1100));
    }
    drop(f);
    // stress-ng's fsize and fallocate stressors on the full disk, in a
    // directory made while there was room.
    let stress = Command::new("stress-ng")
        .args(["--fsize", "1", "--fallocate", "1", "-t", "4", "--temp-path"])
        .arg(&v.places.mnt)
        .output()
        .expect("run stress-ng");
    assert_eq!(
        v.daemon(),
        daemon,
        "the daemon changed or died under stress-ng: {}\nlog:\n{}",
        String::from_utf8_lossy(&stress.stderr),
        v.log_text()
    );
    fs::metadata(v.path(&kept[0].0)).expect("the mount is still up");

    for (name, data) in &kept {
        assert_eq!(&fs::read(v.path(name)).unwrap(), data, "{name}");
    }
    let now = fs::read(v.path("appended")).unwrap();
    assert!(
        now.starts_with(&appended_to) && appended.starts_with(&now[appended_to.len()..]),
        "appended: {} bytes, not the old file plus part of the append",
        now.len()
    );
    assert_all_readable(&v.places.mnt);

    // Room again: new writes work.
    fs::remove_file(v.path("big")).unwrap();
    let fresh = pattern(2 << 20, 3);
    write_synced(&v.path("fresh"), &fresh).unwrap();
    assert_eq!(fs::read(v.path("fresh")).unwrap(), fresh);

    // What reached the backing disk, read without the kernel's cache.
    v.remount();
    for (name, data) in &kept {
        assert_eq!(
            &fs::read(v.path(name)).unwrap(),
            data,
            "{name} after remount"
        );
    }
    assert_eq!(fs::read(v.path("fresh")).unwrap(), fresh);
    let now = fs::read(v.path("appended")).unwrap();
    assert!(
        now.starts_with(&appended_to) && appended.starts_with(&now[appended_to.len()..]),
        "appended after remount: {} bytes",
        now.len()
    );
    assert_all_readable(&v.places.mnt);
    assert!(
        v.log_text().contains("refused space"),
        "the log names the full disk:\n{}",
        v.log_text()
    );
}

/// Drops the clean cached pages of `path` (the kernel reads them again).
fn drop_cache(path: &Path) {
    let f = File::open(path).unwrap();
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise {}", path.display());
}

/// The backing disk fails reads of one file with EIO. Device-mapper is
/// not available here (no dm-mod: see docs/ARCHITECTURE.md), so the EIO is
/// real and one layer up: a btrfs backing disk whose data checksum no
/// longer matches (bit rot under the filesystem) fails the read with EIO.
/// The program gets EIO for that file, other files read fine, the mount
/// stays up and the log names the file.
#[test]
fn a_backing_read_error_is_eio_for_that_file_only() {
    ensure_tool("mkfs.btrfs", "btrfs-progs");
    let disk = LoopDisk::new("btrfs", 160);
    let v = Volume::on(&disk);
    let files: Vec<(&str, Vec<u8>)> = ["before", "victim", "after"]
        .iter()
        .enumerate()
        .map(|(i, n)| (*n, pattern(256 * 1024, 40 + i as u64)))
        .collect();
    for (name, data) in &files {
        write_synced(&v.path(name), data).unwrap();
    }
    // The victim's ciphertext, found in the image and changed by one bit.
    let backing_victim = v.backing.join("victim");
    let ciphertext = fs::read(&backing_victim).unwrap();
    let needle = &ciphertext[100_000..100_064];
    let sync = File::open(disk.top()).unwrap();
    assert_eq!(unsafe { libc::syncfs(sync.as_raw_fd()) }, 0);
    let image = fs::read(&disk.image).unwrap();
    let at = image
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("the victim's ciphertext is in the image (btrfs stores data as is)");
    let img = OpenOptions::new().write(true).open(&disk.image).unwrap();
    img.write_all_at(&[image[at] ^ 1], at as u64).unwrap();
    img.sync_all().unwrap();
    drop_cache(&backing_victim);
    for (name, _) in &files {
        drop_cache(&v.path(name));
    }

    let err = fs::read(v.path("victim")).expect_err("a read through a bad checksum");
    assert_eq!(errno(&err), libc::EIO, "{err}");
    for (name, data) in &files {
        if *name != "victim" {
            assert_eq!(&fs::read(v.path(name)).unwrap(), data, "{name}");
        }
    }
    fs::metadata(v.path("victim")).expect("the mount is up and stat works");
    let fresh = pattern(10_000, 1);
    write_synced(&v.path("fresh"), &fresh).unwrap();
    assert_eq!(fs::read(v.path("fresh")).unwrap(), fresh);
    let log = v.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("victim") && l.contains("cannot read it (EIO)")),
        "no log line names the file:\n{log}"
    );
}

#[cfg(feature = "vault")]
mod kms_flaps {
    use super::*;
    use common::kms::vault::Bao;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    /// Files written through the mount, with their contents.
    type Written = Arc<Mutex<Vec<(PathBuf, Vec<u8>)>>>;

    /// Stops the server until dropped.
    struct Paused(i32);

    impl Paused {
        fn new(pid: i32) -> Paused {
            assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "SIGSTOP");
            Paused(pid)
        }
    }

    impl Drop for Paused {
        fn drop(&mut self) {
            unsafe { libc::kill(self.0, libc::SIGCONT) };
        }
    }

    /// Sets `timeout_secs` of the trusted configuration's Vault providers.
    fn set_vault_timeout(secs: i64) {
        let path = common::trusted_config();
        let text = fs::read_to_string(&path).unwrap();
        let mut config: toml::Table = text.parse().unwrap();
        let mut found = false;
        let providers = config.get_mut("providers").and_then(|p| p.as_table_mut());
        for p in providers
            .into_iter()
            .flat_map(|p| p.iter_mut().map(|(_, v)| v))
        {
            if let Some(p) = p.as_table_mut() {
                if p.get("type").and_then(|k| k.as_str()) == Some("vault") {
                    p.insert("timeout_secs".into(), toml::Value::Integer(secs));
                    found = true;
                }
            }
        }
        assert!(found, "no Vault provider in:\n{text}");
        fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    }

    /// A mount on a Vault transit key with no DEK cache, so every open and
    /// create asks the KMS. While a worker creates, writes and reads files,
    /// the server is stopped for 4 s and resumed, three times. Operations
    /// during an outage fail with EIO (the log says the KMS is unreachable)
    /// or wait and succeed; none hangs; afterwards everything works without
    /// a remount and every file written reads back exactly.
    #[test]
    fn a_flapping_kms_fails_cleanly_and_recovers_without_a_remount() {
        let bao = Bao::start();
        let places = Places::new("kmsfs-faults-kms");
        let env = [("VAULT_ADDR", bao.addr()), ("VAULT_TOKEN", bao.token())];
        let kmsfs = |args: &[&str]| {
            let out = common::kmsfs().envs(env).args(args).output().unwrap();
            assert!(out.status.success(), "kmsfs {args:?}: {out:?}");
        };
        let backing = places.backing.to_str().unwrap();
        kmsfs(&["init", backing, "--kms", "vault", "--vault-key", bao.key()]);
        set_vault_timeout(2);
        kmsfs(&[
            "mount",
            backing,
            places.mnt.to_str().unwrap(),
            "--log-file",
            places.log.to_str().unwrap(),
            "--cache-size",
            "0",
        ]);
        struct Detach<'a>(&'a Path);
        impl Drop for Detach<'_> {
            fn drop(&mut self) {
                common::detach(self.0);
            }
        }
        let _detach = Detach(&places.mnt);
        let mnt = places.mnt.clone();
        let written: Written = Arc::default();
        for i in 0..4 {
            let p = mnt.join(format!("before{i}"));
            let data = pattern(20_000 + i, i as u64);
            write_synced(&p, &data).unwrap();
            written.lock().unwrap().push((p, data));
        }

        let stop = Arc::new(AtomicBool::new(false));
        let worker = {
            let (stop, written, mnt) = (stop.clone(), written.clone(), mnt.clone());
            std::thread::spawn(move || {
                let (mut ok, mut failed, mut slowest) = (0, 0, Duration::ZERO);
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let start = Instant::now();
                    let p = mnt.join(format!("during{i}"));
                    let data = pattern(5000 + i as usize, 1000 + i);
                    let created = write_synced(&p, &data);
                    let old = {
                        let w = written.lock().unwrap();
                        w[i as usize % w.len()].clone()
                    };
                    let read = fs::read(&old.0);
                    slowest = slowest.max(start.elapsed());
                    for r in [created.as_ref().err(), read.as_ref().err()]
                        .into_iter()
                        .flatten()
                    {
                        assert_eq!(r.raw_os_error(), Some(libc::EIO), "{r}");
                        failed += 1;
                    }
                    if created.is_ok() {
                        ok += 1;
                        written.lock().unwrap().push((p, data));
                    }
                    if let Ok(got) = read {
                        assert_eq!(got, old.1, "{} read back different", old.0.display());
                    }
                }
                (ok, failed, slowest)
            })
        };
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(700));
            let _paused = Paused::new(bao.pid());
            std::thread::sleep(Duration::from_secs(4));
        }
        std::thread::sleep(Duration::from_millis(700));
        stop.store(true, Ordering::Relaxed);
        let (ok, failed, slowest) = worker.join().unwrap();
        eprintln!("kms flaps: {ok} files created, {failed} operations failed, slowest {slowest:?}");
        assert!(ok > 0, "nothing was created");
        assert!(
            slowest < Duration::from_secs(20),
            "an operation took {slowest:?} during an outage"
        );
        let log = fs::read_to_string(&places.log).unwrap();
        if failed > 0 {
            // Names the KMS, what happened and what to check.
            assert!(
                log.lines().any(|l| l.contains("ERROR")
                    && (l.contains("did not answer within") || l.contains("is unreachable"))
                    && l.contains("check")),
                "{failed} operations failed and no log line says the KMS is unreachable:\n{log}"
            );
        }

        // The KMS is back: everything works, no remount.
        let after = mnt.join("after");
        write_synced(&after, b"after the outage").unwrap();
        assert_eq!(fs::read(&after).unwrap(), b"after the outage");
        for (p, data) in written.lock().unwrap().iter() {
            assert_eq!(&fs::read(p).unwrap(), data, "{}", p.display());
        }
        // No file is left damaged, even one whose create failed.
        for e in fs::read_dir(&mnt).unwrap() {
            let p = e.unwrap().path();
            if let Err(err) = fs::read(&p) {
                panic!("{} is unreadable after the outage: {err}", p.display());
            }
        }
    }
}
