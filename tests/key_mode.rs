//! Directory key mode (`--key-mode directory`) through the library and
//! the commands: new files' DEKs wrapped under an intermediate key the KMS
//! wraps once, `kmsfs rewrap` moving files between the modes, and key
//! objects planted in the backing directory refused.
//!
//! Tests named `nofuse_*` need no /dev/fuse and no root; the others mount.

mod common;

use std::path::{Path, PathBuf};

use common::{free_port, run, TestFs};
use kmsfs::format::ik;
use kmsfs::volume::{Options, Volume};

/// A local-keyring volume in directory key mode, in a temp dir.
struct Plain {
    dir: tempfile::TempDir,
    backing: PathBuf,
    key_file: PathBuf,
}

impl Plain {
    fn new(key_file: Option<&Path>) -> Self {
        let dir = common::tempdir("kmsfs-ik");
        let backing = dir.path().join("backing");
        let key_file = key_file.map_or_else(|| dir.path().join("keys"), Path::to_path_buf);
        common::init_local(&backing, &key_file, &["--key-mode", "directory"]);
        Plain {
            dir,
            backing,
            key_file,
        }
    }

    fn b(&self) -> &str {
        self.backing.to_str().unwrap()
    }

    fn open(&self) -> Volume {
        let options = Options {
            config: Some(common::trusted_config()),
            audit_log: Some(self.dir.path().join("audit.log")),
            ..Options::default()
        };
        Volume::open_with(&self.backing, &options).expect("open the volume")
    }

    /// The intermediate key objects, by ID.
    fn iks(&self) -> Vec<[u8; 16]> {
        let dir = self.backing.join(".kmsfs-keys");
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut ids: Vec<_> = entries
            .map(|e| e.unwrap().file_name())
            .filter_map(|n| kmsfs::format::names::ik_object_id(n.as_encoded_bytes()))
            .collect();
        ids.sort();
        ids
    }

    /// The primary key version of file `rel`'s header.
    fn key_version(&self, rel: &str) -> String {
        let out = run(&["info", self.backing.join(rel).to_str().unwrap()], true);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["key"]["key_version"].as_str().unwrap().to_owned()
    }

    fn set_mode(&self, mode: &str) {
        run(
            &[
                "policy",
                "set",
                self.b(),
                "/",
                "--kms",
                "local",
                "--key-file",
                self.key_file.to_str().unwrap(),
                "--key-mode",
                mode,
            ],
            true,
        );
    }
}

const FILES: usize = 40;

fn content(i: usize) -> Vec<u8> {
    common::pattern(1000 + i * 37, i as u64)
}

fn read_all(v: &Volume) {
    for i in 0..FILES {
        assert_eq!(v.read(format!("/d/f{i}")).unwrap(), content(i), "file {i}");
    }
}

#[test]
fn nofuse_directory_mode_round_trip_and_rewrap_between_modes() {
    let p = Plain::new(None);
    let out = run(&["policy", "list", p.b()], true);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["key_mode"], "directory", "{list}");
    {
        let v = p.open();
        v.create_dir_all("/d").unwrap();
        for i in 0..FILES {
            v.write(format!("/d/f{i}"), &content(i)).unwrap();
        }
    }
    let first = p.iks();
    assert_eq!(first.len(), 1, "one intermediate key for every create");
    let version = p.key_version("d/f0");
    assert_eq!(
        ik::split_version(&version).unwrap(),
        ("1", Some(first[0])),
        "{version}"
    );
    let audit = std::fs::read_to_string(p.dir.path().join("audit.log")).unwrap();
    assert!(
        audit.contains(&format!("intermediate key {}", hex::encode(first[0]))),
        "{audit}"
    );
    // A fresh process reads them all back.
    read_all(&p.open());

    let out = run(&["keys", "status", p.b(), "--json"], true);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let root = &status[0];
    assert_eq!(root["files_current"], FILES as u64, "{status}");
    assert_eq!(root["key_mode"], "directory", "{status}");
    let by_version = root["by_version"].as_object().unwrap();
    assert_eq!(by_version.len(), 1, "counted by KMS key version: {status}");
    assert!(by_version.keys().all(|k| k.ends_with("@1")), "{status}");

    // To per-file: rewrap takes every file off the intermediate key.
    p.set_mode("per-file");
    run(&["rewrap", p.b()], true);
    for i in 0..FILES {
        let v = p.key_version(&format!("d/f{i}"));
        assert_eq!(ik::split_version(&v).unwrap(), ("1", None), "{v}");
    }
    read_all(&p.open());

    // Back to directory mode: the rewrap's own intermediate key, one.
    p.set_mode("directory");
    run(&["rewrap", p.b()], true);
    let now = p.iks();
    assert_eq!(now.len(), 2, "{now:?}");
    let second = *now.iter().find(|id| **id != first[0]).unwrap();
    for i in 0..FILES {
        let v = p.key_version(&format!("d/f{i}"));
        assert_eq!(ik::split_version(&v).unwrap(), ("1", Some(second)), "{v}");
    }
    read_all(&p.open());
    // Nothing left to move.
    let out = run(&["keys", "status", p.b(), "--json"], true);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status[0]["files_stale"], 0, "{status}");

    // A key rotation moves files to a new intermediate key under the new
    // KMS key version.
    run(
        &[
            "keys",
            "rotate",
            "--key-file",
            p.key_file.to_str().unwrap(),
            "--name",
            "default",
        ],
        true,
    );
    run(&["rewrap", p.b()], true);
    let v = p.key_version("d/f0");
    let (base, id) = ik::split_version(&v).unwrap();
    assert_eq!(base, "2", "{v}");
    assert!(!now.contains(&id.unwrap()));
    read_all(&p.open());
    // fsck knows the key directory as kmsfs's own.
    run(&["fsck", p.b()], true);
}

#[test]
fn nofuse_planted_key_object_does_not_open() {
    let a = Plain::new(None);
    // Another volume under the very same KMS key.
    let b = Plain::new(Some(&a.key_file));
    for p in [&a, &b] {
        let v = p.open();
        v.write("/secret", b"the real contents").unwrap();
    }
    let (ik_a, ik_b) = (a.iks()[0], b.iks()[0]);
    let object = |p: &Plain, id: &[u8; 16]| {
        p.backing
            .join(".kmsfs-keys")
            .join(kmsfs::format::names::ik_object_name(id))
    };
    let genuine = std::fs::read(object(&a, &ik_a)).unwrap();
    // B's intermediate key, planted as A's (re-labelled with A's ID so that
    // it parses): the KMS unwrap is bound to the IK's ID and the volume.
    let wrapped_b = ik::parse_object(&std::fs::read(object(&b, &ik_b)).unwrap(), &ik_b).unwrap();
    std::fs::write(
        object(&a, &ik_a),
        ik::encode_object(&ik_a, &wrapped_b).unwrap(),
    )
    .unwrap();
    let e = a.open().read("/secret").unwrap_err();
    assert_eq!(e.errno(), Some(libc::EIO), "{e}");
    // B's object bytes as they are, under A's name.
    std::fs::copy(object(&b, &ik_b), object(&a, &ik_a)).unwrap();
    assert!(a.open().read("/secret").is_err());
    // A symlink at the name.
    std::fs::remove_file(object(&a, &ik_a)).unwrap();
    std::os::unix::fs::symlink(object(&b, &ik_b), object(&a, &ik_a)).unwrap();
    assert!(a.open().read("/secret").is_err());
    // Missing.
    std::fs::remove_file(object(&a, &ik_a)).unwrap();
    assert!(a.open().read("/secret").is_err());
    // The genuine object restored: it opens again.
    std::fs::write(object(&a, &ik_a), genuine).unwrap();
    assert_eq!(a.open().read("/secret").unwrap(), b"the real contents");
}

fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// KMS requests of `operation` so far, from the mount's metrics.
fn kms_requests(port: u16, operation: &str) -> u64 {
    let filter = format!("operation=\"{operation}\"");
    scrape(port)
        .lines()
        .filter(|l| l.starts_with("kmsfs_kms_requests_total") && l.contains(&filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Through a mount: creates make one KMS call, a cold read of the tree
/// one unwrap (both counted in the KMS metrics), and renames between
/// policies of one key but different modes stay allowed.
#[test]
fn mount_creates_and_cold_reads_cost_one_kms_call_per_intermediate_key() {
    let mut fs = TestFs::new(&["--key-mode", "directory"]);
    fs.umount();
    let port = free_port();
    fs.mount(&["--metrics-addr", &format!("127.0.0.1:{port}")]);
    std::fs::create_dir(fs.path("d")).unwrap();
    for i in 0..30 {
        std::fs::write(fs.path(&format!("d/f{i}")), format!("file {i}")).unwrap();
    }
    assert_eq!(
        kms_requests(port, "generate") + kms_requests(port, "wrap"),
        1,
        "one intermediate key for 30 creates"
    );
    fs.umount();
    let port = free_port();
    fs.mount(&["--metrics-addr", &format!("127.0.0.1:{port}")]);
    let at_mount = kms_requests(port, "unwrap");
    assert_eq!(at_mount, 1, "the volume key");
    for i in 0..30 {
        assert_eq!(
            std::fs::read_to_string(fs.path(&format!("d/f{i}"))).unwrap(),
            format!("file {i}")
        );
    }
    assert_eq!(kms_requests(port, "unwrap") - at_mount, 1, "cold reads");

    // A per-file policy under the same key: renames across stay allowed,
    // and each side opens the other's files.
    fs.set_policy("/plain", "default", &["--key-mode", "per-file"]);
    fs.remount();
    std::fs::create_dir(fs.path("plain")).unwrap();
    std::fs::write(fs.path("plain/p"), b"per file").unwrap();
    std::fs::rename(fs.path("d/f0"), fs.path("plain/f0")).unwrap();
    std::fs::rename(fs.path("plain/p"), fs.path("d/p")).unwrap();
    fs.remount();
    assert_eq!(std::fs::read(fs.path("plain/f0")).unwrap(), b"file 0");
    assert_eq!(std::fs::read(fs.path("d/p")).unwrap(), b"per file");
}
