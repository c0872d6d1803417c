//! kmsfs without FUSE: the library (`kmsfs::Volume`) and the commands on it
//! (`cat`, `export`, `import`) read and write a volume, and a mount reads
//! what they wrote, and the reverse.
//!
//! Tests named `nofuse_*` need no /dev/fuse and no root:
//! scripts/test-core-unprivileged.sh runs them again as `nobody` in a
//! namespace without /dev/fuse.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kmsfs::volume::{errno_of, FileKind, Options, Volume};

/// A fresh local-keyring volume in a temp dir (no mount).
struct Plain {
    dir: tempfile::TempDir,
    backing: PathBuf,
}

impl Plain {
    fn new() -> Self {
        let dir = common::tempdir("kmsfs-lib");
        let backing = dir.path().join("backing");
        common::init_local(&backing, &dir.path().join("keys"), &[]);
        Plain { dir, backing }
    }

    fn open(&self) -> Volume {
        Volume::open_with(&self.backing, &options()).expect("open the volume")
    }

    fn b(&self) -> &str {
        self.backing.to_str().unwrap()
    }
}

fn options() -> Options {
    Options {
        config: Some(common::trusted_config()),
        ..Options::default()
    }
}

const BIG: usize = 5 * 1024 * 1024 + 123;

/// Writes a small tree through the library.
fn write_tree(v: &Volume) {
    v.create_dir_all("/data/deep/er").unwrap();
    v.write("/data/empty", b"").unwrap();
    v.write("/data/small.txt", b"hello, library").unwrap();
    let mut f = v.create("/data/deep/er/big.bin").unwrap();
    // Written in uneven pieces, as a program would.
    for piece in common::pattern(BIG, 7).chunks(100_003) {
        f.write_all(piece).unwrap();
    }
    f.sync_all().unwrap();
    f.close().unwrap();
    v.symlink("small.txt", "/data/link").unwrap();
    v.hard_link("/data/small.txt", "/data/also.txt").unwrap();
    v.set_xattr("/data/small.txt", "user.origin", b"library")
        .unwrap();
    v.set_permissions("/data/small.txt", 0o640).unwrap();
    let t = UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    v.set_times("/data/small.txt", t, t).unwrap();
}

/// Checks the tree of [`write_tree`] through a mount at `mnt`.
fn check_tree_in_mount(mnt: &Path) {
    let d = mnt.join("data");
    assert_eq!(
        std::fs::read(d.join("small.txt")).unwrap(),
        b"hello, library"
    );
    assert_eq!(std::fs::read(d.join("empty")).unwrap(), b"");
    assert_eq!(
        std::fs::read(d.join("deep/er/big.bin")).unwrap(),
        common::pattern(BIG, 7)
    );
    assert_eq!(
        std::fs::read_link(d.join("link")).unwrap(),
        Path::new("small.txt")
    );
    let (a, b) = (
        std::fs::metadata(d.join("small.txt")).unwrap(),
        std::fs::metadata(d.join("also.txt")).unwrap(),
    );
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    assert_eq!(a.permissions().mode() & 0o7777, 0o640);
    assert_eq!(a.mtime(), 1_600_000_000);
    let c = std::ffi::CString::new(d.join("small.txt").to_str().unwrap()).unwrap();
    let mut buf = [0u8; 64];
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            c"user.origin".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert_eq!(&buf[..n.max(0) as usize], b"library");
}

#[test]
fn nofuse_library_round_trip_and_errors() {
    let p = Plain::new();
    let v = p.open();
    write_tree(&v);

    // Whole, streamed and positional reads.
    assert_eq!(v.read("/data/small.txt").unwrap(), b"hello, library");
    let want = common::pattern(BIG, 7);
    assert_eq!(v.read("/data/deep/er/big.bin").unwrap(), want);
    let mut f = v.open_file("/data/deep/er/big.bin").unwrap();
    f.seek(SeekFrom::Start(4095)).unwrap();
    let mut two = [0u8; 2];
    f.read_exact(&mut two).unwrap();
    assert_eq!(two, want[4095..4097]);
    assert_eq!(f.seek(SeekFrom::End(-10)).unwrap(), BIG as u64 - 10);
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).unwrap();
    assert_eq!(tail, want[BIG - 10..]);
    let mut at = vec![0u8; 70_000];
    assert_eq!(f.read_at(&mut at, 1_000_000).unwrap(), 70_000);
    assert_eq!(at, want[1_000_000..1_070_000]);

    // Listing and walking.
    let mut names: Vec<_> = v
        .read_dir("/data")
        .unwrap()
        .into_iter()
        .map(|e| e.name.into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["also.txt", "deep", "empty", "link", "small.txt"]);
    let walked: Vec<_> = v.walk("/").map(|e| e.unwrap().path).collect();
    assert!(walked.contains(&PathBuf::from("/data/deep/er/big.bin")));
    assert!(
        walked.iter().position(|p| p == Path::new("/data/deep"))
            < walked.iter().position(|p| p == Path::new("/data/deep/er")),
        "a directory comes before its contents: {walked:?}"
    );
    let m = v.metadata("/data/deep/er/big.bin").unwrap();
    assert_eq!((m.kind, m.size), (FileKind::File, BIG as u64));
    assert_eq!(v.metadata("/data/link").unwrap().kind, FileKind::Symlink);
    assert_eq!(v.read_link("/data/link").unwrap(), Path::new("small.txt"));
    assert_eq!(
        v.get_xattr("/data/small.txt", "user.origin").unwrap(),
        b"library"
    );

    // Overwrite, rename, remove.
    v.write("/data/small.txt", b"v2").unwrap();
    assert_eq!(v.read("/data/also.txt").unwrap(), b"v2");
    v.rename("/data/empty", "/data/renamed").unwrap();
    assert!(!v.exists("/data/empty").unwrap());
    v.remove_file("/data/renamed").unwrap();

    // Errors carry their errno and say which path.
    let e = v.read("/data/missing").unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENOENT));
    assert!(e.to_string().contains("/data/missing"), "{e}");
    assert_eq!(v.read("relative").unwrap_err().errno(), Some(libc::EINVAL));
    assert_eq!(
        v.read("/data/../etc/passwd").unwrap_err().errno(),
        Some(libc::EINVAL)
    );
    assert_eq!(
        v.read("/data/link/x").unwrap_err().errno(),
        Some(libc::ENOTDIR),
        "no symlink is followed"
    );
    assert_eq!(v.read("/data").unwrap_err().errno(), Some(libc::EISDIR));

    // The backing directory holds ciphertext only.
    let backing_big = std::fs::read(p.backing.join("data/deep/er/big.bin")).unwrap();
    assert!(backing_big.len() > BIG);
    assert!(!backing_big.windows(64).any(|w| w == &want[..64]));
    assert!(p.backing.join("data/deep/er/.kmsfs.big.bin").exists());
}

#[test]
fn nofuse_tampered_block_is_eio_never_wrong_bytes() {
    let p = Plain::new();
    let v = p.open();
    v.write("/f", &common::pattern(200_000, 3)).unwrap();
    drop(v);
    // Flip one byte in the third block's ciphertext.
    let path = p.backing.join("f");
    let mut raw = std::fs::read(&path).unwrap();
    raw[3 * 4096 + 100] ^= 1;
    std::fs::write(&path, raw).unwrap();
    let v = p.open();
    let e = v.read("/f").unwrap_err();
    assert_eq!(e.errno(), Some(libc::EIO), "{e}");
    assert!(e.to_string().contains("block"), "names the block: {e}");
    // Through `Read`, the io::Error keeps the errno.
    let mut f = v.open_file("/f").unwrap();
    let mut buf = vec![0u8; 200_000];
    let io = f.read(&mut buf).unwrap_err();
    assert_eq!(errno_of(&io), Some(libc::EIO), "{io}");
    // The blocks before it are fine.
    let mut first = vec![0u8; 8192];
    assert_eq!(f.read_at(&mut first, 0).unwrap(), 8192);
    assert_eq!(first, common::pattern(200_000, 3)[..8192]);
}

#[test]
fn nofuse_read_only_volume_refuses_changes() {
    let p = Plain::new();
    p.open().write("/f", b"x").unwrap();
    let v = Volume::open_with(
        &p.backing,
        &Options {
            read_only: true,
            ..options()
        },
    )
    .unwrap();
    assert_eq!(v.read("/f").unwrap(), b"x");
    assert_eq!(v.write("/g", b"y").unwrap_err().errno(), Some(libc::EROFS));
}

#[test]
fn nofuse_open_errors_say_what_to_do() {
    let dir = common::tempdir("kmsfs-lib");
    let e = Volume::open_with(dir.path(), &options())
        .err()
        .expect("not a volume");
    assert!(e.to_string().contains("kmsfs init"), "{e}");
}

/// A plaintext tree with what import and export must keep.
fn plaintext_tree(root: &Path) {
    use std::os::unix::fs::symlink;
    std::fs::create_dir_all(root.join("a/b")).unwrap();
    std::fs::write(root.join("a/x.txt"), b"x contents").unwrap();
    std::fs::write(root.join("a/b/big"), common::pattern(1_500_000, 9)).unwrap();
    std::fs::write(root.join("a/b/zero"), b"").unwrap();
    std::fs::hard_link(root.join("a/x.txt"), root.join("a/x-link.txt")).unwrap();
    symlink("../x.txt", root.join("a/b/sym")).unwrap();
    std::fs::set_permissions(root.join("a/x.txt"), PermissionsExt::from_mode(0o600)).unwrap();
    std::fs::set_permissions(root.join("a/b"), PermissionsExt::from_mode(0o750)).unwrap();
    let c = std::ffi::CString::new(root.join("a/b/big").to_str().unwrap()).unwrap();
    assert_eq!(
        unsafe { libc::setxattr(c.as_ptr(), c"user.k".as_ptr(), b"v".as_ptr().cast(), 1, 0) },
        0,
        "the temp filesystem takes user xattrs"
    );
    for p in ["a/b/big", "a/b", "a"] {
        let t = filetime(1_500_000_000);
        set_mtime(&root.join(p), t);
    }
}

fn filetime(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs as u64)
}

fn set_mtime(p: &Path, t: SystemTime) {
    std::fs::File::open(p).unwrap().set_modified(t).unwrap();
}

/// (relative path, kind, mode, size, mtime, content or link target, link
/// count) of one entry.
type Entry = (PathBuf, String, u32, u64, i64, Vec<u8>, u64);

/// Every entry below `root`.
fn snapshot(root: &Path) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            let m = std::fs::symlink_metadata(&path).unwrap();
            let (kind, content) = if m.is_dir() {
                pending.push(path.clone());
                ("dir", Vec::new())
            } else if m.is_symlink() {
                (
                    "symlink",
                    std::fs::read_link(&path)
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                )
            } else {
                ("file", std::fs::read(&path).unwrap())
            };
            let mtime = if m.is_symlink() { 0 } else { m.mtime() };
            let mode = if m.is_symlink() { 0 } else { m.mode() & 0o7777 };
            out.push((
                path.strip_prefix(root).unwrap().to_owned(),
                kind.to_owned(),
                mode,
                if m.is_dir() { 0 } else { m.len() },
                mtime,
                content,
                if m.is_dir() { 0 } else { m.nlink() },
            ));
        }
    }
    out.sort();
    out
}

#[test]
fn nofuse_import_export_cat_keep_the_tree() {
    let p = Plain::new();
    let src = p.dir.path().join("src");
    plaintext_tree(&src);
    let out = common::run(
        &["import", src.to_str().unwrap(), p.b(), "/in", "--json"],
        true,
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["failed"], 0);
    assert_eq!(summary["hard_links"], 1);
    assert_eq!(summary["symlinks"], 1);
    // Ciphertext in the backing directory.
    let raw = std::fs::read(p.backing.join("in/a/b/big")).unwrap();
    assert_ne!(raw[..4096], common::pattern(1_500_000, 9)[..4096]);

    let cat = common::run(&["cat", p.b(), "/in/a/x.txt", "/in/a/b/zero"], true);
    assert_eq!(cat.stdout, b"x contents");

    let exported = p.dir.path().join("out");
    common::run(
        &["export", p.b(), "/in", exported.to_str().unwrap(), "--json"],
        true,
    );
    assert_eq!(snapshot(&exported), snapshot(&src));
    let c = std::ffi::CString::new(exported.join("a/b/big").to_str().unwrap()).unwrap();
    let mut v = [0u8; 4];
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            c"user.k".as_ptr(),
            v.as_mut_ptr().cast(),
            v.len(),
        )
    };
    assert_eq!(&v[..n.max(0) as usize], b"v");

    // Failures: exit 1 with the path; an export never writes into a
    // non-empty directory.
    let missing = common::run(&["cat", p.b(), "/in/nope"], false);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/in/nope"));
    let again = common::run(&["export", p.b(), exported.to_str().unwrap()], false);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));
}

#[test]
fn library_writes_a_mount_reads_and_the_reverse() {
    let mut fs = common::TestFs::new(&[]);
    fs.umount();
    {
        let v = Volume::open_with(&fs.backing, &options()).unwrap();
        write_tree(&v);
    }
    fs.mount(&[]);
    check_tree_in_mount(&fs.mnt);
    // Written through the mount, read by the library and the CLI.
    let data = common::pattern(3 * 1024 * 1024 + 5, 11);
    std::fs::create_dir(fs.path("m")).unwrap();
    std::fs::write(fs.path("m/from-mount.bin"), &data).unwrap();
    std::fs::write(fs.path("m/note"), b"mounted").unwrap();
    fs.umount();
    let v = Volume::open_with(&fs.backing, &options()).unwrap();
    assert_eq!(v.read("/m/from-mount.bin").unwrap(), data);
    let cat = common::run(&["cat", fs.backing.to_str().unwrap(), "/m/note"], true);
    assert_eq!(cat.stdout, b"mounted");
    // Import refuses a mounted backing directory (two filesystems over
    // one backing directory would not see each other's changes).
    fs.mount(&[]);
    let src = fs.dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let refused = common::run(
        &[
            "import",
            src.to_str().unwrap(),
            fs.backing.to_str().unwrap(),
        ],
        false,
    );
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is mounted at"));
}
