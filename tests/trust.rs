//! The trusted configuration and the authenticated volume configuration,
//! tried as an attacker who can write the backing directory would: key
//! redirection (attack 1 of the security issue), KMS settings smuggled into
//! the backing directory, tampered policies, files under a key their
//! directory does not allow, and a trusted configuration others can change.
//! Also the one-command upgrade of a format 1 volume.

mod common;

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{daemon_pids, pattern, run, run_with, TestFs};
use kmsfs::format::block::BlockLayout;
use kmsfs::format::{CipherSuite, Header};
use kmsfs::kms::local::LocalKms;
use kmsfs::kms::{KeyProvider, WrapContext};

const CONFIG: &str = ".kmsfs-config.toml";

/// `kmsfs mount` of `fs` that must fail; returns its stderr.
fn mount_refused(fs: &TestFs) -> String {
    let out = run(
        &[
            "mount",
            fs.backing.to_str().unwrap(),
            fs.mnt.to_str().unwrap(),
        ],
        false,
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "mount must be refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(daemon_pids(&fs.mnt).is_empty(), "no daemon may run");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A format 1 volume configuration as kmsfs 1 wrote it: a policy per
/// (directory, local keyring), and a retired local keyring, each with key
/// `default`.
fn format_1_config(policies: &[(&str, &Path)], retired: Option<&Path>) -> String {
    let key = |keys: &Path| {
        format!(
            "provider = \"local\"\nkey_file = \"{}\"\nkey = \"default\"\n",
            keys.display()
        )
    };
    let mut text = String::from("format_version = 1\nblock_size = 4096\n");
    for (dir, keys) in policies {
        text += &format!(
            "[[policy]]\ndir = \"{dir}\"\ncipher = \"aes-256-gcm\"\n[policy.kms]\n{}",
            key(keys)
        );
    }
    if let Some(keys) = retired {
        text += &format!("[[retired]]\n{}", key(keys));
    }
    text
}

/// A keyring the attacker controls, with key `default` (they can read it).
fn attacker_keyring(dir: &Path) -> std::path::PathBuf {
    let keys = dir.join("attacker-keys");
    run(
        &["keys", "create", "--key-file", keys.to_str().unwrap()],
        true,
    );
    keys
}

#[test]
fn attack_1_key_redirection_through_the_backing_config_is_refused() {
    let mut fs = TestFs::new(&[]);
    fs::write(fs.path("before"), b"written before the attack").unwrap();
    fs.umount();
    let config = fs.backing_path(CONFIG);
    let genuine = fs::read_to_string(&config).unwrap();
    let evil = attacker_keyring(fs.dir.path());

    // The attack that worked on format 1: the root policy names the
    // attacker's keyring, the real one stays as a retired key so that old
    // files still open and nobody notices.
    let format_one = format_1_config(&[("/", &evil)], Some(&fs.key_file));
    fs::write(&config, &format_one).unwrap();
    let err = mount_refused(&fs);
    assert!(
        err.contains("format 1") && err.contains("kmsfs upgrade"),
        "{err}"
    );

    // The same in format 2: a keyring path where only a provider name may be.
    let smuggled = genuine.replacen(
        "[policy.key]",
        &format!("key_file = \"{}\"\n[policy.key]", evil.display()),
        1,
    );
    assert_ne!(smuggled, genuine);
    fs::write(&config, &smuggled).unwrap();
    let err = mount_refused(&fs);
    assert!(
        err.contains("sets `key_file`") && err.contains("trusted configuration"),
        "{err}"
    );

    // Pointing the root policy at another provider of the trusted
    // configuration (one the attacker can use): the volume key no longer
    // unwraps, or the MAC no longer matches; refused either way.
    let other = fs.dir.path().join("other-keys");
    let other_volume = fs.dir.path().join("other-volume");
    common::init_local(&other_volume, &other, &["--provider", "attacker-reachable"]);
    let redirected = genuine.replace(
        &provider_of_root(&genuine),
        "provider = \"attacker-reachable\"",
    );
    assert_ne!(redirected, genuine);
    fs::write(&config, &redirected).unwrap();
    let err = mount_refused(&fs);
    assert!(
        err.contains("does not unwrap") || err.contains("failed authentication"),
        "{err}"
    );

    // Nothing was created under the attacker's key, and the genuine
    // configuration still mounts and reads.
    fs::write(&config, &genuine).unwrap();
    fs.mount(&[]);
    assert_eq!(
        fs::read(fs.path("before")).unwrap(),
        b"written before the attack"
    );
    fs::write(fs.path("after"), b"new file").unwrap();
    let info = run(&["info", fs.path("after").to_str().unwrap()], true);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_ne!(info["key"]["provider"], "attacker-reachable");
}

/// The `provider = "..."` line of the root policy's key in a configuration.
fn provider_of_root(config: &str) -> String {
    let at = config.find("[policy.key]").expect("a policy key table");
    config[at..]
        .lines()
        .find(|l| l.trim_start().starts_with("provider"))
        .expect("a provider line")
        .trim()
        .to_owned()
}

#[test]
fn kms_addresses_and_credentials_in_the_backing_config_are_never_used() {
    // An "attacker" server: any connection to it counts.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let seen = connections.clone();
    listener.set_nonblocking(true).unwrap();
    let watcher = std::thread::spawn(move || {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < end {
            if listener.accept().is_ok() {
                seen.fetch_add(1, Ordering::SeqCst);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    });
    let mut fs = TestFs::new(&[]);
    fs.umount();
    let config = fs.backing_path(CONFIG);
    let genuine = fs::read_to_string(&config).unwrap();
    // A retired Vault key whose AppRole secret would be read from a local
    // file and sent to the attacker's address.
    let secret = fs.dir.path().join("root-only-secret");
    fs::write(&secret, "s3cret").unwrap();
    let evil = format!(
        "{genuine}\n[[policy.retired]]\nprovider = \"vault\"\nid = \"k\"\naddress = \"http://127.0.0.1:{port}\"\nauth = {{ method = \"approle\", role_id = \"r\", secret_id_file = \"{}\" }}\n",
        secret.display()
    );
    fs::write(&config, &evil).unwrap();
    let err = mount_refused(&fs);
    assert!(err.contains("a KMS setting"), "{err}");
    let out = run(&["kms", "status", fs.backing.to_str().unwrap()], false);
    assert!(!out.status.success());
    watcher.join().unwrap();
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "kmsfs connected to an address from the backing directory"
    );
}

#[test]
fn a_tampered_volume_config_is_refused() {
    let mut fs = TestFs::new(&[]);
    fs.policy_set("/pii", &fs.dir.path().join("pii-keys"), &[], true);
    // Moving /pii to another key leaves the first one retired for it.
    fs.policy_set("/pii", &fs.dir.path().join("pii-keys-2"), &[], true);
    fs.umount();
    let config = fs.backing_path(CONFIG);
    let genuine = fs::read_to_string(&config).unwrap();
    assert!(genuine.contains("[[policy.retired]]"), "{genuine}");
    let tampered = [
        (
            "a mandatory policy made optional",
            genuine.replacen("mandatory = true", "mandatory = false", 1),
        ),
        (
            "a policy added",
            format!(
                "{genuine}\n[[policy]]\ndir = \"/open\"\ncipher = \"aes-256-gcm\"\nmandatory = false\n[policy.key]\n{}\nid = \"default\"\n",
                provider_of_root(&genuine)
            ),
        ),
        (
            "a retired key dropped",
            drop_retired(&genuine),
        ),
        (
            "the cipher changed",
            genuine.replacen("aes-256-gcm", "chacha20-poly1305", 1),
        ),
    ];
    for (what, text) in tampered {
        assert_ne!(text, genuine, "{what}: the edit changed nothing");
        fs::write(&config, &text).unwrap();
        let err = mount_refused(&fs);
        assert!(err.contains("failed authentication"), "{what}: {err}");
    }
    fs::write(&config, &genuine).unwrap();
    fs.mount(&[]);
}

/// `config` without its first `[[policy.retired]]` table.
fn drop_retired(config: &str) -> String {
    let at = config.find("[[policy.retired]]").expect("a retired key");
    let rest = &config[at + 1..];
    let end = rest
        .find("\n[")
        .map(|i| at + 1 + i + 1)
        .unwrap_or(config.len());
    format!("{}{}", &config[..at], &config[end..])
}

#[test]
fn a_file_under_a_key_its_directory_does_not_allow_gives_eio() {
    let mut fs = TestFs::new(&[]);
    fs.policy_set("/scratch", &fs.dir.path().join("weak-keys"), &[], true);
    fs.remount();
    fs::create_dir(fs.path("scratch")).unwrap();
    fs::write(fs.path("scratch/forged"), b"made under the weak key").unwrap();
    fs::write(fs.path("real"), b"made under the root key").unwrap();
    fs.umount();
    // Someone with the weak key's wrap access made a file; moved (with its
    // sidecar) into the strongly protected root, it must not open there.
    fs::rename(fs.backing_path("scratch/forged"), fs.backing_path("forged")).unwrap();
    fs::rename(
        fs.backing_path("scratch/.kmsfs.forged"),
        fs.backing_path(".kmsfs.forged"),
    )
    .unwrap();
    fs.mount(&[]);
    let err = fs::read(fs.path("forged")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert_eq!(
        fs::read(fs.path("real")).unwrap(),
        b"made under the root key"
    );
    fs.assert_logged("forged");
    fs.assert_logged("does not allow");
}

#[test]
fn a_format_1_file_in_a_format_2_volume_gives_eio() {
    let mut fs = TestFs::new(&[]);
    fs.umount();
    plant_v1_file(&fs.backing, "planted", &fs.key_file, "default", b"v1 bytes");
    fs.mount(&[]);
    let err = fs::read(fs.path("planted")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    fs.assert_logged("format 1 file");
}

/// Writes a format 1 file `name` holding `data` (one block at most) into
/// backing directory `dir`, its DEK wrapped by `key` of local keyring
/// `keys`, exactly as kmsfs 1 did.
fn plant_v1_file(dir: &Path, name: &str, keys: &Path, key: &str, data: &[u8]) {
    assert!(data.len() <= 4096);
    let kms = LocalKms::open(keys, key).unwrap();
    let file_id: [u8; 16] = rand::random();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (dek, wrapped) = rt
        .block_on(kms.generate_dek(&WrapContext::file_v1(file_id)))
        .unwrap();
    let header = Header::v1(CipherSuite::Aes256Gcm, 12, file_id, wrapped).unwrap();
    let (raw, cipher) = kmsfs::crypto::seal_header(&header, &dek).unwrap();
    fs::write(dir.join(format!(".kmsfs.{name}")), raw).unwrap();
    let off = BlockLayout::V1.plaintext_offset();
    let mut sealed = vec![0u8; data.len() + BlockLayout::V1.overhead()];
    sealed[off..off + data.len()].copy_from_slice(data);
    cipher.seal_in_place(0, &mut sealed);
    fs::write(dir.join(name), sealed).unwrap();
}

#[test]
fn a_trusted_config_others_can_change_is_refused() {
    let fs = TestFs::new(&[]);
    let dir = tempfile::tempdir().unwrap();
    let trusted = dir.path().join("kmsfs.toml");
    fs::copy(common::trusted_config(), &trusted).unwrap();
    let status = |env_path: &Path| {
        run_with(
            &[("KMSFS_CONFIG", env_path.to_str().unwrap())],
            &["policy", "list", fs.backing.to_str().unwrap()],
            false,
        )
    };
    fs::set_permissions(&trusted, fs::Permissions::from_mode(0o644)).unwrap();
    assert!(status(&trusted).status.success());
    fs::set_permissions(&trusted, fs::Permissions::from_mode(0o666)).unwrap();
    let out = status(&trusted);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("writable by group or others"), "{err}");
    // Owned by someone else.
    fs::set_permissions(&trusted, fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::chown(&trusted, Some(65534), None).unwrap();
    let err = String::from_utf8_lossy(&status(&trusted).stderr).into_owned();
    assert!(err.contains("neither root nor you"), "{err}");
    // A symlink to it, or a directory others may write.
    std::os::unix::fs::chown(&trusted, Some(0), None).unwrap();
    let link = dir.path().join("link.toml");
    std::os::unix::fs::symlink(&trusted, &link).unwrap();
    let err = String::from_utf8_lossy(&status(&link).stderr).into_owned();
    assert!(err.contains("symbolic link"), "{err}");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let err = String::from_utf8_lossy(&status(&trusted).stderr).into_owned();
    assert!(err.contains("its directory"), "{err}");
}

#[test]
fn upgrade_moves_kms_settings_to_the_trusted_config_and_keeps_every_file() {
    common::require_fuse();
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    let sub = backing.join("pii");
    fs::create_dir_all(&sub).unwrap();
    let (root_keys, pii_keys) = (dir.path().join("root-keys"), dir.path().join("pii-keys"));
    for k in [&root_keys, &pii_keys] {
        run(&["keys", "create", "--key-file", k.to_str().unwrap()], true);
    }
    // A format 1 volume as kmsfs 1 left it: KMS settings in the backing
    // directory, files with format 1 headers and blocks.
    fs::write(
        backing.join(CONFIG),
        format_1_config(&[("/", &root_keys), ("/pii", &pii_keys)], None),
    )
    .unwrap();
    plant_v1_file(&backing, "old", &root_keys, "default", b"old root file");
    plant_v1_file(&sub, "old-pii", &pii_keys, "default", b"old pii file");
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let (b, m) = (backing.to_str().unwrap(), mnt.to_str().unwrap());
    // Mounting a format 1 volume is refused, with what to do.
    let out = run(&["mount", b, m], false);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("kmsfs upgrade"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The settings come from the backing directory: shown, and nothing
    // done until the operator confirms (no terminal here, so --yes).
    let v1_text = fs::read_to_string(backing.join(CONFIG)).unwrap();
    let out = run(&["upgrade", b], false);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains(&root_keys.display().to_string()) && said.contains("--yes"),
        "{said}"
    );
    assert_eq!(fs::read_to_string(backing.join(CONFIG)).unwrap(), v1_text);
    let out = run(&["upgrade", b, "--yes"], true);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("[providers.") && said.contains("root-keys"),
        "{said}"
    );
    let text = fs::read_to_string(backing.join(CONFIG)).unwrap();
    assert!(
        !text.contains("key_file") && text.contains("format_version = 2"),
        "{text}"
    );
    assert!(backing.join(".kmsfs-config.v1.toml").exists());
    // Every file opens, with sizes from its own header; new files are
    // format 2.
    run(
        &[
            "mount",
            b,
            m,
            "--log-file",
            dir.path().join("log").to_str().unwrap(),
        ],
        true,
    );
    let read = |p: &str| fs::read(mnt.join(p));
    assert_eq!(read("old").unwrap(), b"old root file");
    assert_eq!(read("pii/old-pii").unwrap(), b"old pii file");
    assert_eq!(fs::metadata(mnt.join("old")).unwrap().len(), 13);
    let fresh = pattern(10_000, 5);
    fs::write(mnt.join("pii/new"), &fresh).unwrap();
    assert_eq!(read("pii/new").unwrap(), fresh);
    let info = run(&["info", mnt.join("pii/new").to_str().unwrap()], true);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format_version"], 2, "{info}");
    let info = run(&["info", mnt.join("old").to_str().unwrap()], true);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format_version"], 1, "{info}");
    // The per-directory binding holds for old files too: the root's old
    // file moved into /pii (by someone with the backing directory) does
    // not open there.
    run(&["umount", m], true);
    common::wait_for_daemon_exit(&mnt);
    fs::rename(backing.join("old"), sub.join("moved")).unwrap();
    fs::rename(backing.join(".kmsfs.old"), sub.join(".kmsfs.moved")).unwrap();
    run(
        &[
            "mount",
            b,
            m,
            "--log-file",
            dir.path().join("log").to_str().unwrap(),
        ],
        true,
    );
    let err = read("pii/moved").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    run(&["umount", m], true);
    common::wait_for_daemon_exit(&mnt);
    // And the keys are in the trusted configuration by name.
    let out = run(&["providers", "list"], true);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let files: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["settings"]["key_file"].as_str().map(str::to_owned))
        .collect();
    assert!(files.contains(&root_keys.display().to_string()), "{list}");
    assert!(files.contains(&pii_keys.display().to_string()), "{list}");
    // A format 1 configuration planted over the format 2 one is never
    // "upgraded" again, whether the old one is kept beside it or not: the
    // volume has format 2 headers.
    let format_2 = fs::read(backing.join(CONFIG)).unwrap();
    fs::write(backing.join(CONFIG), &v1_text).unwrap();
    for kept in [true, false] {
        if !kept {
            fs::remove_file(backing.join(".kmsfs-config.v1.toml")).unwrap();
        }
        let out = run(&["upgrade", b, "--yes"], false);
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains("restore the format 2 configuration") || said.contains("format 2 header"),
            "{said}"
        );
        assert_eq!(fs::read_to_string(backing.join(CONFIG)).unwrap(), v1_text);
    }
    fs::write(backing.join(CONFIG), format_2).unwrap();
}
