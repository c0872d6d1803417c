//! End-to-end tests on a real FUSE mount with the local KMS.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};

use common::{daemon_pids, pattern, run, TestFs};
use rand::{Rng, SeedableRng};

const B: usize = 4096;
/// What sealing adds to a block of a new (format 2) file.
const OVERHEAD: u64 = kmsfs::format::block::BlockLayout::V2.overhead() as u64;
const SEALED: u64 = B as u64 + OVERHEAD;

fn ct_size(pt: u64) -> u64 {
    let full = pt / B as u64;
    let rem = pt % B as u64;
    full * SEALED + if rem == 0 { 0 } else { rem + OVERHEAD }
}

#[test]
fn round_trips_around_block_boundaries() {
    let fs = TestFs::new(&[]);
    for (i, len) in [0, 1, B - 1, B, B + 1, 3 * B + 5, 5 << 20]
        .into_iter()
        .enumerate()
    {
        let name = format!("f{i}");
        let data = pattern(len, i as u64);
        fs::write(fs.path(&name), &data).unwrap();
        assert_eq!(fs::read(fs.path(&name)).unwrap(), data, "len {len}");
        assert_eq!(fs::metadata(fs.path(&name)).unwrap().len(), len as u64);
        assert_eq!(
            fs::metadata(fs.backing_path(&name)).unwrap().len(),
            ct_size(len as u64)
        );
    }
}

#[test]
fn chacha_and_large_blocks_round_trip() {
    let fs = TestFs::new(&["--cipher", "chacha20-poly1305", "--block-size", "65536"]);
    let data = pattern(300_001, 9);
    fs::write(fs.path("c"), &data).unwrap();
    assert_eq!(fs::read(fs.path("c")).unwrap(), data);
    let info = run(&["info", fs.path("c").to_str().unwrap()], true);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["cipher"], "chacha20-poly1305");
    assert_eq!(v["block_size"], 65536);
}

/// A long random sequence of writes, truncates and reads at random offsets,
/// on an open file in the mount and on a plain file, must agree throughout.
#[test]
fn random_operations_match_a_plain_file() {
    let fs = TestFs::new(&[]);
    let seed: u64 = std::env::var("KMSFS_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (set KMSFS_TEST_SEED to replay)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let plain_path = fs.dir.path().join("plain");
    let open = |p: &std::path::Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(p)
            .unwrap()
    };
    let mut enc = open(&fs.path("r"));
    let plain = open(&plain_path);
    for step in 0..600 {
        match rng.gen_range(0..10) {
            0..=4 => {
                let off = rng.gen_range(0..200_000u64);
                let len = rng.gen_range(1..20_000usize);
                let data = pattern(len, rng.gen());
                enc.write_all_at(&data, off).unwrap();
                plain.write_all_at(&data, off).unwrap();
            }
            5 | 6 => {
                let n = rng.gen_range(0..220_000u64);
                enc.set_len(n).unwrap();
                plain.set_len(n).unwrap();
            }
            7 => {
                // Reopen: state must survive the last handle closing.
                enc = open(&fs.path("r"));
            }
            _ => {
                let off = rng.gen_range(0..220_000u64);
                let len = rng.gen_range(0..70_000usize);
                let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
                let na = read_full_at(&enc, &mut a, off);
                let nb = read_full_at(&plain, &mut b, off);
                assert_eq!(na, nb, "step {step}: read length at {off}");
                assert!(
                    a[..na] == b[..nb],
                    "step {step}: bytes differ at {off}+{len}"
                );
            }
        }
        assert_eq!(
            enc.metadata().unwrap().len(),
            plain.metadata().unwrap().len(),
            "step {step}: size"
        );
    }
    drop(enc);
    assert_eq!(
        fs::read(fs.path("r")).unwrap(),
        fs::read(&plain_path).unwrap()
    );
}

fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> usize {
    let mut done = 0;
    while done < buf.len() {
        let n = f.read_at(&mut buf[done..], off + done as u64).unwrap();
        if n == 0 {
            break;
        }
        done += n;
    }
    done
}

#[test]
fn tampering_gives_eio_and_a_log_line() {
    let mut fs = TestFs::new(&[]);
    let data = pattern(3 * B + 100, 1);
    fs::write(fs.path("victim.bin"), &data).unwrap();
    fs::write(fs.path("other.bin"), pattern(B, 2)).unwrap();
    fs::write(fs.path("torn.bin"), pattern(2 * B, 3)).unwrap();
    fs::write(fs.path("hdr.bin"), pattern(10, 4)).unwrap();
    fs.umount();

    // One flipped bit in block 1.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(fs.backing_path("victim.bin"))
        .unwrap();
    let at = SEALED + 500;
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, at).unwrap();
    f.write_all_at(&[byte[0] ^ 0x04], at).unwrap();
    // Ciphertext cut in the middle of block 1's nonce.
    let t = OpenOptions::new()
        .write(true)
        .open(fs.backing_path("torn.bin"))
        .unwrap();
    t.set_len(SEALED + 5).unwrap();
    // A flipped bit in a sidecar.
    let sc = fs.backing_path(".kmsfs.hdr.bin");
    let mut raw = fs::read(&sc).unwrap();
    let last = raw.len() - 1;
    raw[last] ^= 1; // in the header MAC
    fs::write(&sc, raw).unwrap();
    fs.mount(&[]);

    let mut v = File::open(fs.path("victim.bin")).unwrap();
    let mut first = vec![0u8; B];
    v.read_exact(&mut first).unwrap();
    assert_eq!(first, data[..B], "blocks before the damage still read");
    let mut rest = Vec::new();
    let err = v.read_to_end(&mut rest).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EIO),
        "tampered block must be EIO, got {err}"
    );
    v.seek(SeekFrom::Start(2 * B as u64)).unwrap();
    let mut after = vec![0u8; B];
    v.read_exact(&mut after).unwrap();
    assert_eq!(
        after,
        data[2 * B..3 * B],
        "blocks after the damage still read"
    );

    let err = fs::read(fs.path("torn.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    let err = fs::read(fs.path("hdr.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));

    // The log names each file and its damaged block, or its header.
    fs.assert_logged("victim.bin: block 1");
    fs.assert_logged("torn.bin: block 1");
    fs.assert_logged("hdr.bin: sidecar header");
}

#[test]
fn swapped_or_moved_ciphertext_is_detected() {
    let mut fs = TestFs::new(&[]);
    fs::write(fs.path("a"), pattern(2 * B, 10)).unwrap();
    fs::write(fs.path("b"), pattern(2 * B, 11)).unwrap();
    fs.umount();
    // Swap the sidecars of a and b; swap the two blocks within... a copy of b.
    let (sa, sb) = (fs.backing_path(".kmsfs.a"), fs.backing_path(".kmsfs.b"));
    let (ra, rb) = (fs::read(&sa).unwrap(), fs::read(&sb).unwrap());
    fs::write(&sa, &rb).unwrap();
    fs::write(&sb, &ra).unwrap();
    fs.mount(&[]);
    for n in ["a", "b"] {
        let err = fs::read(fs.path(n)).unwrap_err();
        assert_eq!(
            err.raw_os_error(),
            Some(libc::EIO),
            "swapped sidecar on {n}"
        );
    }
    fs.umount();
    fs::write(&sa, &ra).unwrap();
    fs::write(&sb, &rb).unwrap();
    // Swap blocks 0 and 1 inside a.
    let ct = fs::read(fs.backing_path("a")).unwrap();
    let mut swapped = ct[SEALED as usize..].to_vec();
    swapped.extend_from_slice(&ct[..SEALED as usize]);
    fs::write(fs.backing_path("a"), swapped).unwrap();
    fs.mount(&[]);
    assert_eq!(fs::read(fs.path("b")).unwrap(), pattern(2 * B, 11));
    let err = fs::read(fs.path("a")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "moved block");
}

#[test]
fn persists_across_remount_and_backing_holds_no_plaintext() {
    let mut fs = TestFs::new(&[]);
    let marker = b"PLAINTEXT-MARKER-0123456789-kmsfs";
    let mut content = Vec::new();
    for _ in 0..2000 {
        content.extend_from_slice(marker);
    }
    fs::create_dir_all(fs.path("d1/d2")).unwrap();
    fs::write(fs.path("d1/d2/file.txt"), &content).unwrap();
    fs::write(fs.path("small"), marker).unwrap();
    std::os::unix::fs::symlink("d1/d2/file.txt", fs.path("link")).unwrap();
    fs::hard_link(fs.path("small"), fs.path("small-hard")).unwrap();
    let mut f = OpenOptions::new()
        .append(true)
        .open(fs.path("small"))
        .unwrap();
    f.write_all(b"+appended").unwrap();
    drop(f);
    fs.remount();
    assert_eq!(fs::read(fs.path("d1/d2/file.txt")).unwrap(), content);
    assert_eq!(fs::read(fs.path("link")).unwrap(), content);
    let mut expect = marker.to_vec();
    expect.extend_from_slice(b"+appended");
    assert_eq!(fs::read(fs.path("small")).unwrap(), expect);
    assert_eq!(fs::read(fs.path("small-hard")).unwrap(), expect);
    assert_eq!(fs::metadata(fs.path("small-hard")).unwrap().nlink(), 2);
    // Nothing in the backing directory contains the plaintext.
    let mut scanned = 0;
    for entry in walk(&fs.backing) {
        if entry.is_file() {
            let bytes = fs::read(&entry).unwrap();
            assert!(
                !bytes.windows(16).any(|w| w == &marker[..16]),
                "plaintext found in backing file {}",
                entry.display()
            );
            scanned += 1;
        }
    }
    assert!(scanned >= 5, "scanned {scanned} files");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn posix_behaviour_of_a_local_disk() {
    let fs = TestFs::new(&[]);
    // Sidecars and config are invisible and their names cannot be used.
    fs::write(fs.path("visible"), b"x").unwrap();
    let names: Vec<String> = fs::read_dir(&fs.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["visible".to_string()]);
    let err = fs::write(fs.path(".kmsfs.visible"), b"y").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    assert!(fs::metadata(fs.path(".kmsfs-config.toml")).is_err());
    let err = fs::rename(fs.path("visible"), fs.path(".kmsfs-x")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));

    // Unlinked while open: still readable and writable.
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(fs.path("tmp"))
        .unwrap();
    f.write_all(b"before").unwrap();
    fs::remove_file(fs.path("tmp")).unwrap();
    assert!(
        !fs.backing_path(".kmsfs.tmp").exists(),
        "sidecar removed with the name"
    );
    f.write_all(b"-after").unwrap();
    let mut s = String::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "before-after");
    f.set_len(3).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 3);
    drop(f);

    // Rename over an existing file, also while the source is open.
    fs::write(fs.path("src"), b"new").unwrap();
    fs::write(fs.path("dst"), b"old contents").unwrap();
    let held = File::open(fs.path("src")).unwrap();
    fs::rename(fs.path("src"), fs.path("dst")).unwrap();
    assert_eq!(fs::read(fs.path("dst")).unwrap(), b"new");
    assert!(!fs.backing_path(".kmsfs.src").exists());
    let mut s = String::new();
    (&held).read_to_string(&mut s).unwrap();
    assert_eq!(s, "new");
    // Directory rename keeps its files readable.
    fs::create_dir(fs.path("dir")).unwrap();
    fs::write(fs.path("dir/in"), b"inside").unwrap();
    fs::rename(fs.path("dir"), fs.path("dir2")).unwrap();
    assert_eq!(fs::read(fs.path("dir2/in")).unwrap(), b"inside");
    assert!(fs::remove_dir(fs.path("dir2")).is_err());
    fs::remove_file(fs.path("dir2/in")).unwrap();
    fs::remove_dir(fs.path("dir2")).unwrap();

    // Metadata operations.
    fs::set_permissions(fs.path("dst"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(fs::metadata(fs.path("dst")).unwrap().mode() & 0o777, 0o640);
    std::os::unix::fs::chown(fs.path("dst"), Some(1234), Some(5678)).unwrap();
    let m = fs::metadata(fs.path("dst")).unwrap();
    assert_eq!((m.uid(), m.gid()), (1234, 5678));
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
    File::options()
        .write(true)
        .open(fs.path("dst"))
        .unwrap()
        .set_modified(t)
        .unwrap();
    assert_eq!(fs::metadata(fs.path("dst")).unwrap().mtime(), 1_000_000_000);

    // Extended attributes, with kmsfs's own namespace refused.
    let p = std::ffi::CString::new(fs.path("dst").to_str().unwrap()).unwrap();
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            c"user.color".as_ptr(),
            b"blue".as_ptr().cast(),
            4,
            0,
        )
    };
    assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
    let mut buf = [0u8; 16];
    let n = unsafe {
        libc::getxattr(
            p.as_ptr(),
            c"user.color".as_ptr(),
            buf.as_mut_ptr().cast(),
            16,
        )
    };
    assert_eq!(&buf[..n as usize], b"blue");
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            c"user.kmsfs.x".as_ptr(),
            b"1".as_ptr().cast(),
            1,
            0,
        )
    };
    assert_eq!(r, -1);
    // ACLs (not enforced on a FUSE mount without FUSE_POSIX_ACL) and SELinux
    // labels (the security module's business) are refused, not stored.
    // A valid ACL value: user::rw-, group::r--, other::r--.
    let acl = acl_xattr(&[
        (0x01, 6, u32::MAX),
        (0x04, 4, u32::MAX),
        (0x20, 4, u32::MAX),
    ]);
    fs::create_dir(fs.path("acl-dir")).unwrap();
    let dir = std::ffi::CString::new(fs.path("acl-dir").to_str().unwrap()).unwrap();
    let mut refused = vec![
        (&p, c"system.posix_acl_access"),
        (&dir, c"system.posix_acl_default"),
    ];
    // With SELinux active the security module answers for the label before
    // kmsfs is asked.
    if !std::path::Path::new("/sys/fs/selinux/enforce").exists() {
        refused.push((&p, c"security.selinux"));
    }
    for (path, name) in refused {
        let (v, n) = (acl.as_ptr().cast(), acl.len());
        let r = unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), v, n, 0) };
        let e = std::io::Error::last_os_error().raw_os_error();
        assert_eq!((r, e), (-1, Some(libc::EOPNOTSUPP)), "setxattr {name:?}");
        let r =
            unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), 16) };
        let e = std::io::Error::last_os_error().raw_os_error();
        assert_eq!((r, e), (-1, Some(libc::EOPNOTSUPP)), "getxattr {name:?}");
    }
    // An ACL an earlier version stored on the backing file is hidden, and
    // removing it through the mount clears it. Not one the mode bits can
    // express, or ext4 keeps none: user::rw-, user:65534:r--, group::r--,
    // mask::r--, other::r--.
    let extended = acl_xattr(&[
        (0x01, 6, u32::MAX),
        (0x02, 4, 65534),
        (0x04, 4, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 4, u32::MAX),
    ]);
    let bp = std::ffi::CString::new(fs.backing_path("dst").to_str().unwrap()).unwrap();
    let access = c"system.posix_acl_access";
    let (v, n) = (extended.as_ptr().cast(), extended.len());
    let r = unsafe { libc::setxattr(bp.as_ptr(), access.as_ptr(), v, n, 0) };
    assert_eq!(
        r,
        0,
        "ACL on the backing file: {}",
        std::io::Error::last_os_error()
    );
    let stored = unsafe { libc::getxattr(bp.as_ptr(), access.as_ptr(), std::ptr::null_mut(), 0) };
    assert!(stored > 0, "ext4 kept no ACL to remove");
    let mut names = [0u8; 256];
    let n = unsafe { libc::listxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert_eq!(&names[..n.max(0) as usize], b"user.color\0");
    assert_eq!(unsafe { libc::removexattr(p.as_ptr(), access.as_ptr()) }, 0);
    let n = unsafe { libc::getxattr(bp.as_ptr(), access.as_ptr(), std::ptr::null_mut(), 0) };
    assert_eq!(n, -1, "the backing file kept its ACL");

    // statfs answers.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let mp = std::ffi::CString::new(fs.mnt.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::statvfs(mp.as_ptr(), &mut st) }, 0);
    assert!(st.f_blocks > 0);

    // Sparse file: a hole reads as zeros.
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(fs.path("sparse"))
        .unwrap();
    f.write_all_at(b"end", 1 << 20).unwrap();
    let all = fs::read(fs.path("sparse")).unwrap();
    assert_eq!(all.len(), (1 << 20) + 3);
    assert!(all[..1 << 20].iter().all(|&b| b == 0));
}

#[test]
fn mmap_reads_and_writes() {
    let fs = TestFs::new(&[]);
    let len = 3 * B + 17;
    fs::write(fs.path("m"), pattern(len, 5)).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(fs.path("m"))
        .unwrap();
    use std::os::fd::AsRawFd;
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        let s = std::slice::from_raw_parts_mut(p as *mut u8, len);
        assert_eq!(s, &pattern(len, 5)[..]);
        s[B + 1] = 0xAA;
        s[len - 1] = 0xBB;
        assert_eq!(libc::msync(p, len, libc::MS_SYNC), 0);
        libc::munmap(p, len);
    }
    drop(f);
    let mut expect = pattern(len, 5);
    expect[B + 1] = 0xAA;
    expect[len - 1] = 0xBB;
    // Bypass the page cache: read through a fresh mount.
    let mut fs = fs;
    fs.remount();
    assert_eq!(fs::read(fs.path("m")).unwrap(), expect);
}

#[test]
fn many_threads_on_one_file() {
    let fs = TestFs::new(&[]);
    let path = fs.path("shared");
    File::create(&path).unwrap();
    let chunk = 10_000usize;
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let path = path.clone();
            s.spawn(move || {
                let f = OpenOptions::new().write(true).open(&path).unwrap();
                for round in 0..10u64 {
                    let off = (round * 8 + t) * chunk as u64;
                    f.write_all_at(&pattern(chunk, round * 8 + t), off).unwrap();
                }
            });
        }
        for _ in 0..2 {
            let path = path.clone();
            s.spawn(move || {
                for _ in 0..50 {
                    let _ = fs::read(&path).unwrap();
                }
            });
        }
    });
    let all = fs::read(&path).unwrap();
    assert_eq!(all.len(), 80 * chunk);
    for i in 0..80u64 {
        let at = i as usize * chunk;
        assert!(all[at..at + chunk] == pattern(chunk, i)[..], "chunk {i}");
    }
}

#[test]
fn fsynced_files_survive_kill_9() {
    let mut fs = TestFs::new(&[]);
    let mut expected = Vec::new();
    for i in 0..20u64 {
        let name = format!("synced{i}");
        let data = pattern(1000 + i as usize * 3000, i);
        let mut f = File::create(fs.path(&name)).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        expected.push((name, data));
    }
    // Keep writing in the background while the daemon dies.
    let pid = fs.daemon_pid().expect("daemon pid");
    let busy = fs.path("busy");
    let writer = std::thread::spawn(move || {
        if let Ok(mut f) = File::create(&busy) {
            for i in 0..1000u64 {
                if f.write_all(&pattern(8192, i)).is_err() {
                    break;
                }
            }
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(20));
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = writer.join();
    common::detach(&fs.mnt);
    fs.set_mounted(false);
    fs.mount(&[]);
    for (name, data) in expected {
        assert_eq!(
            fs::read(fs.path(&name)).unwrap(),
            data,
            "{name} after kill -9"
        );
    }
}

#[test]
fn wrong_keyring_is_refused_at_mount_with_a_clear_error() {
    let mut fs = TestFs::new(&[]);
    fs::write(fs.path("secret"), b"top secret").unwrap();
    fs.umount();
    // Replace the keyring with another one holding a key of the same name.
    fs::remove_file(&fs.key_file).unwrap();
    run(
        &[
            "keys",
            "create",
            "--key-file",
            fs.key_file.to_str().unwrap(),
        ],
        true,
    );
    // The volume's key (wrapped by the root policy's key) no longer
    // unwraps: the mount is refused, naming the key, before anything is
    // served.
    let out = run(
        &[
            "mount",
            fs.backing.to_str().unwrap(),
            fs.mnt.to_str().unwrap(),
        ],
        false,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not unwrap under"), "{err}");
    assert!(err.contains("/default"), "names the root key: {err}");
    assert!(!err.contains("top secret"));
    assert!(daemon_pids(&fs.mnt).is_empty());
}

#[test]
fn key_rotation_keeps_old_files_readable() {
    let mut fs = TestFs::new(&[]);
    fs::write(fs.path("v1"), b"one").unwrap();
    fs.umount();
    run(
        &[
            "keys",
            "rotate",
            "--key-file",
            fs.key_file.to_str().unwrap(),
        ],
        true,
    );
    fs.mount(&[]);
    fs::write(fs.path("v2"), b"two").unwrap();
    assert_eq!(fs::read(fs.path("v1")).unwrap(), b"one");
    let version = |n: &str| {
        let out = run(&["info", fs.path(n).to_str().unwrap()], true);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["key"]["key_version"].as_str().unwrap().to_owned()
    };
    assert_eq!(version("v1"), "1");
    assert_eq!(version("v2"), "2");
}

#[test]
fn cli_errors_are_clear_and_nonzero() {
    common::require_fuse();
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_str().unwrap().to_owned();
    fs::create_dir(dir.path().join("mnt")).unwrap();
    fs::create_dir(dir.path().join("plain")).unwrap();
    let expect_err = |args: &[&str], needle: &str| {
        let out = run(args, false);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in: {err}"
        );
    };
    expect_err(&["mount", &d("nope"), &d("mnt")], "does not exist");
    expect_err(
        &["mount", &d("plain"), &d("mnt")],
        "not a kmsfs backing directory",
    );
    run(
        &["init", &d("b"), "--kms", "local", "--key-file", &d("keys")],
        true,
    );
    expect_err(
        &["init", &d("b"), "--kms", "local", "--key-file", &d("keys")],
        "already",
    );
    expect_err(
        &[
            "init",
            &d("c"),
            "--kms",
            "local",
            "--key-file",
            &d("c/keys"),
        ],
        "inside the backing directory",
    );
    expect_err(
        &[
            "init",
            &d("e"),
            "--kms",
            "local",
            "--key-file",
            &d("k2"),
            "--block-size",
            "3000",
        ],
        "power of two",
    );
    expect_err(&["mount", &d("b"), &d("missing-mnt")], "mountpoint");
    fs::write(dir.path().join("file"), b"").unwrap();
    expect_err(&["mount", &d("b"), &d("file")], "not a directory");
    fs::set_permissions(dir.path().join("keys"), fs::Permissions::from_mode(0o644)).unwrap();
    expect_err(&["mount", &d("b"), &d("mnt")], "chmod 600");
    fs::set_permissions(dir.path().join("keys"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::rename(dir.path().join("keys"), dir.path().join("keys.moved")).unwrap();
    expect_err(&["mount", &d("b"), &d("mnt")], "does not exist");
    fs::rename(dir.path().join("keys.moved"), dir.path().join("keys")).unwrap();
    // Busy mountpoint.
    run(&["mount", &d("b"), &d("mnt")], true);
    expect_err(&["mount", &d("b"), &d("mnt")], "busy");
    // A second mount of the same backing directory elsewhere: refused,
    // naming the first, read-only or not.
    fs::create_dir(dir.path().join("mnt2")).unwrap();
    let first = format!(
        "already mounted read-write without -o shared on this machine at {}",
        d("mnt")
    );
    expect_err(&["mount", &d("b"), &d("mnt2")], &first);
    expect_err(&["mount", &d("b"), &d("mnt2"), "-o", "ro"], &first);
    expect_err(&["mount", &d("b"), &d("mnt2"), "-o", "shared"], &first);
    // ... and says how to serve it from several mounts (docs/MOUNTING.md,
    // "Shared mounts").
    expect_err(&["mount", &d("b"), &d("mnt2")], "-o shared");
    run(&["umount", &d("mnt")], true);
    common::wait_for_daemon_exit(&dir.path().join("mnt"));
    // Read-only mounts share it; a read-write one beside them is refused.
    run(&["mount", &d("b"), &d("mnt"), "-o", "ro"], true);
    run(&["mount", &d("b"), &d("mnt2"), "-o", "ro"], true);
    fs::create_dir(dir.path().join("mnt3")).unwrap();
    expect_err(
        &["mount", &d("b"), &d("mnt3")],
        "must be the only one: mount this one with -o shared",
    );
    // A shared writer beside caching read-only mounts would leave them
    // serving stale pages.
    expect_err(
        &["mount", &d("b"), &d("mnt3"), "-o", "shared"],
        "-o ro,shared",
    );
    run(&["umount", &d("mnt2")], true);
    common::wait_for_daemon_exit(&dir.path().join("mnt2"));
    run(&["umount", &d("mnt")], true);
    common::wait_for_daemon_exit(&dir.path().join("mnt"));
    expect_err(&["umount", &d("mnt")], "not a FUSE mount");
}

/// The daemon keeps a descriptor per inode the kernel remembers; it must not
/// run out even when started with a small open-files limit.
#[test]
fn many_files_do_not_exhaust_descriptors() {
    common::require_fuse();
    // Children (the daemon) inherit this soft limit.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_cur.min(1024);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    let fs = TestFs::new(&[]);
    fs::create_dir(fs.path("many")).unwrap();
    for i in 0..4000 {
        fs::write(fs.path(&format!("many/f{i}")), b"x").unwrap_or_else(|e| panic!("file {i}: {e}"));
    }
    assert_eq!(fs::read_dir(fs.path("many")).unwrap().count(), 4000);
}

/// The mount takes over clearing set-ID bits (FUSE_HANDLE_KILLPRIV_V2): a
/// write or truncate by a user without CAP_FSETID must clear them, as on a
/// local disk, while root's writes keep them.
#[test]
fn unprivileged_write_and_truncate_clear_set_id_bits() {
    use std::os::unix::process::CommandExt;
    use std::process::Command;
    let mut fs = TestFs::new(&[]);
    fs.umount();
    fs.mount(&["-o", "allow_other"]);
    // Let an unprivileged user reach the mountpoint.
    std::fs::set_permissions(fs.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mode_of = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let as_nobody = |script: &str| {
        let st = Command::new("sh")
            .args(["-c", script])
            .uid(65534)
            .gid(65534)
            .status()
            .unwrap();
        assert!(st.success(), "{script} failed as nobody");
    };
    let cases = [
        // (mode before, how nobody changes it, mode after)
        (0o4777, "write", 0o0777),
        (0o2777, "write", 0o0777),
        (0o6777, "truncate", 0o0777),
        // set-group-ID without group execute marks mandatory locking: kept.
        (0o2767, "write", 0o2767),
    ];
    for (i, (before, how, after)) in cases.into_iter().enumerate() {
        let p = fs.path(&format!("setid-{i}"));
        std::fs::write(&p, b"0123456789").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(before)).unwrap();
        assert_eq!(mode_of(&p), before);
        // Root (CAP_FSETID) writes without clearing anything.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(b"root")
            .unwrap();
        assert_eq!(mode_of(&p), before, "root's write changed the mode");
        let path = p.to_str().unwrap();
        match how {
            "write" => as_nobody(&format!("printf more >> '{path}'")),
            _ => as_nobody(&format!("truncate -s 3 '{path}'")),
        }
        assert_eq!(
            mode_of(&p),
            after,
            "{how} by nobody on a {before:o} file left {:o}",
            mode_of(&p)
        );
        // The backing file carries the same mode.
        assert_eq!(
            std::fs::metadata(fs.backing_path(&format!("setid-{i}")))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777,
            after
        );
    }
}

/// A full backing filesystem: the writer gets ENOSPC (at the latest from
/// fsync, as the kernel caches writes), the daemon says what to do, and the
/// file holds consistent ciphertext afterwards: no block reads as damage,
/// and files written before are intact.
#[test]
fn full_backing_disk_gives_enospc_and_no_damage() {
    common::require_fuse();
    let dir = common::tempdir("kmsfs-full");
    let small = dir.path().join("small");
    fs::create_dir(&small).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "cannot mount a 16 MiB tmpfs for the full-disk test"
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _small_guard = Unmount(small.clone());
    let (backing, mnt, keys, log) = (
        small.join("backing"),
        dir.path().join("mnt"),
        dir.path().join("keys"),
        dir.path().join("kmsfs.log"),
    );
    fs::create_dir(&mnt).unwrap();
    let (b, m, k, l) = (
        backing.to_str().unwrap(),
        mnt.to_str().unwrap(),
        keys.to_str().unwrap(),
        log.to_str().unwrap(),
    );
    run(&["init", b, "--kms", "local", "--key-file", k], true);
    run(&["mount", b, m, "--log-file", l], true);
    // Declared after the tmpfs guard, so it is dropped (unmounted) first.
    struct Detach(std::path::PathBuf);
    impl Drop for Detach {
        fn drop(&mut self) {
            common::detach(&self.0);
        }
    }
    let _mount_guard = Detach(mnt.clone());
    let before = pattern(100_000, 1);
    fs::write(mnt.join("before"), &before).unwrap();

    let mut f = File::create(mnt.join("big")).unwrap();
    let chunk = pattern(1 << 20, 2);
    let mut err = None;
    for _ in 0..32 {
        if let Err(e) = f.write_all(&chunk) {
            err = Some(e);
            break;
        }
    }
    let err = err.or_else(|| f.sync_all().err());
    let err = err.expect("32 MiB into a 16 MiB filesystem reported no error");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    drop(f);
    run(&["umount", m], true);
    common::wait_for_daemon_exit(&mnt);
    let text = fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("free space in the backing directory"),
        "{text}"
    );

    run(&["mount", b, m, "--log-file", l], true);
    assert_eq!(fs::read(mnt.join("before")).unwrap(), before);
    // Whatever part of big made it is whole chunks of the pattern.
    let got = fs::read(mnt.join("big")).expect("the cut-short file reads without EIO");
    assert!(
        got.len() >= chunk.len(),
        "only {} bytes of big made it",
        got.len()
    );
    for (i, c) in got.chunks(chunk.len()).enumerate() {
        assert_eq!(c, &chunk[..c.len()], "chunk {i} differs");
    }
    run(&["umount", m], true);
    common::wait_for_daemon_exit(&mnt);
}

/// A POSIX ACL in its xattr form (version 2), from (tag, permissions, id)
/// entries.
fn acl_xattr(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut out = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}
