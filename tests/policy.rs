//! Directory key policies, the DEK cache in front of the KMS, and metrics,
//! on a real mount with two local keys.

mod common;

use std::fs;
use std::fs::OpenOptions;
use std::io::Read;

use common::{find_by, free_port, pattern, run, TestFs};

fn info(fs: &TestFs, rel: &str) -> serde_json::Value {
    let out = run(&["info", fs.path(rel).to_str().unwrap()], true);
    serde_json::from_slice(&out.stdout).unwrap()
}

fn key_of(fs: &TestFs, rel: &str) -> String {
    info(fs, rel)["key"]["key_id"].as_str().unwrap().to_owned()
}

fn policy_status(fs: &TestFs) -> serde_json::Value {
    let out = run(&["policy", "status", fs.backing.to_str().unwrap()], true);
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn nearest_policy_applies_and_crossing_keys_is_exdev() {
    let mut fs = TestFs::new(&[]);
    fs.set_policy("/pii", "pii", &[]);
    fs.remount();
    fs::create_dir_all(fs.path("pii/deep")).unwrap();
    fs::create_dir(fs.path("other")).unwrap();
    fs::write(fs.path("pii/deep/a"), b"pii data").unwrap();
    fs::write(fs.path("other/b"), b"other data").unwrap();
    assert_eq!(
        key_of(&fs, "pii/deep/a"),
        "pii",
        "inherited by subdirectories"
    );
    assert_eq!(key_of(&fs, "other/b"), "default");

    let exdev =
        |r: std::io::Result<()>| assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EXDEV));
    exdev(fs::rename(fs.path("pii/deep/a"), fs.path("other/a")));
    exdev(fs::hard_link(fs.path("pii/deep/a"), fs.path("other/a")));
    exdev(fs::rename(fs.path("other/b"), fs.path("pii/b")));
    exdev(fs::rename(fs.path("pii"), fs.path("moved")));
    // Within one policy, renames and links work.
    fs::rename(fs.path("pii/deep/a"), fs.path("pii/a")).unwrap();
    fs::hard_link(fs.path("pii/a"), fs.path("pii/a2")).unwrap();
    // mv falls back to copy + delete: the copy is under the destination key.
    let st = std::process::Command::new("mv")
        .arg(fs.path("pii/a2"))
        .arg(fs.path("other/a2"))
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(fs::read(fs.path("other/a2")).unwrap(), b"pii data");
    assert_eq!(key_of(&fs, "other/a2"), "default");

    // Policy CLI.
    let out = run(&["policy", "list", fs.backing.to_str().unwrap()], true);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    let out = run(
        &[
            "policy",
            "show",
            fs.backing.to_str().unwrap(),
            "/pii/deep/x",
        ],
        true,
    );
    let show: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(show["dir"], "/pii");

    // Changing the policy: old files keep their key and stay readable.
    fs.set_policy("/pii", "pii2", &[]);
    fs.remount();
    fs::write(fs.path("pii/new"), b"n").unwrap();
    assert_eq!(key_of(&fs, "pii/new"), "pii2");
    assert_eq!(fs::read(fs.path("pii/a")).unwrap(), b"pii data");
    let status = policy_status(&fs);
    let pii = find_by(&status, "dir", "/pii");
    assert_eq!(pii["files_on_current_key"], 1, "{status}");
    assert_eq!(pii["files_on_other_keys"], 1, "{status}");
    // Unset: files under the removed policy still open.
    run(
        &["policy", "unset", fs.backing.to_str().unwrap(), "/pii"],
        true,
    );
    fs.remount();
    assert_eq!(fs::read(fs.path("pii/new")).unwrap(), b"n");
    let out = run(
        &["policy", "unset", fs.backing.to_str().unwrap(), "/"],
        false,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("root policy cannot be removed") && err.contains("kmsfs policy set"),
        "{err}"
    );
    assert_eq!(policy_dirs(&fs), ["/"]);
}

/// The directories that have a policy, from `kmsfs policy list`.
fn policy_dirs(fs: &TestFs) -> Vec<String> {
    let out = run(&["policy", "list", fs.backing.to_str().unwrap()], true);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|p| p["dir"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn non_mandatory_policy_lets_plaintext_files_through() {
    let fs = TestFs::with_plaintext_dir("legacy", |fs| {
        fs::write(fs.backing_path("legacy/old.txt"), b"plain old data").unwrap();
        fs::write(fs.backing_path("stray.txt"), b"no sidecar here").unwrap();
    });
    assert_eq!(
        fs::read(fs.path("legacy/old.txt")).unwrap(),
        b"plain old data"
    );
    assert_eq!(fs::metadata(fs.path("legacy/old.txt")).unwrap().len(), 14);
    // New user data never lands in a plaintext file: opening it for writing
    // and truncating it are refused (EPERM), reading stays allowed, and the
    // log says how to encrypt it.
    let old = fs.path("legacy/old.txt");
    let eperm = |r: std::io::Result<fs::File>| {
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EPERM));
    };
    eperm(OpenOptions::new().write(true).open(&old));
    eperm(OpenOptions::new().append(true).open(&old));
    eperm(OpenOptions::new().read(true).write(true).open(&old));
    eperm(OpenOptions::new().write(true).truncate(true).open(&old));
    let c = std::ffi::CString::new(old.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::truncate(c.as_ptr(), 3) }, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EPERM)
    );
    assert_eq!(
        fs::read(fs.backing_path("legacy/old.txt")).unwrap(),
        b"plain old data"
    );
    assert_eq!(fs::read(&old).unwrap(), b"plain old data");
    fs.assert_logged("legacy/old.txt");
    fs.assert_logged("copy it to a new name");
    // Copying it encrypts it.
    fs::copy(&old, fs.path("legacy/old.enc")).unwrap();
    assert!(fs.backing_path("legacy/.kmsfs.old.enc").exists());
    assert_eq!(
        fs::read(fs.path("legacy/old.enc")).unwrap(),
        b"plain old data"
    );
    fs::write(fs.path("legacy/new.txt"), b"secret new data").unwrap();
    assert!(
        fs.backing_path("legacy/.kmsfs.new.txt").exists(),
        "new files are encrypted"
    );
    let raw = fs::read(fs.backing_path("legacy/new.txt")).unwrap();
    assert!(!raw.windows(6).any(|w| w == b"secret"));
    // The mandatory root refuses a file without sidecar.
    let err = fs::read(fs.path("stray.txt")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    fs.assert_logged("stray.txt: sidecar header: sidecar is missing");
    let status = policy_status(&fs);
    let legacy = find_by(&status, "dir", "/legacy");
    assert_eq!(legacy["files_without_sidecar"], 1);
    assert_eq!(legacy["files_on_current_key"], 2);
}

fn scrape(port: u16) -> String {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Sum of a metric's samples whose labels contain `filter`.
fn metric(text: &str, name: &str, filter: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[test]
fn dek_cache_keeps_the_kms_off_the_hot_path() {
    let mut fs = TestFs::new(&[]);
    for i in 0..30 {
        fs::write(fs.path(&format!("f{i}")), format!("file {i}")).unwrap();
    }
    fs.umount();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    fs.mount(&["--metrics-addr", &addr]);
    let unwraps = || {
        metric(
            &scrape(port),
            "kmsfs_kms_requests_total",
            "operation=\"unwrap\"",
        )
    };
    // Mounting unwrapped the volume key (to authenticate the volume's
    // configuration), and nothing else.
    let at_mount = unwraps();
    assert_eq!(at_mount, 1, "mounting unwraps the volume key once");
    for i in 0..30 {
        assert_eq!(
            fs::read_to_string(fs.path(&format!("f{i}"))).unwrap(),
            format!("file {i}")
        );
    }
    assert_eq!(unwraps() - at_mount, 30, "cold: one unwrap per file");
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    for i in 0..30 {
        assert_eq!(
            fs::read_to_string(fs.path(&format!("f{i}"))).unwrap(),
            format!("file {i}")
        );
    }
    assert_eq!(
        unwraps() - at_mount,
        30,
        "warm: no KMS call for cached DEKs"
    );
    let text = scrape(port);
    assert!(
        metric(&text, "kmsfs_dek_cache_hits_total", "") >= 30,
        "{text}"
    );
    // Plaintext reached the kernel, by READ requests or filled at open.
    let served = metric(&text, "kmsfs_read_bytes_total", "")
        + metric(&text, "kmsfs_open_fill_bytes_total", "");
    let sizes: u64 = (0..30).map(|i| format!("file {i}").len() as u64).sum();
    assert!(served >= sizes, "{text}");

    // Concurrent opens of one uncached file make one unwrap.
    fs::write(fs.path("hot"), b"hot file").unwrap();
    fs.umount();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    fs.mount(&["--metrics-addr", &addr]);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| assert_eq!(fs::read(fs.path("hot")).unwrap(), b"hot file"));
        }
    });
    assert_eq!(
        metric(
            &scrape(port),
            "kmsfs_kms_requests_total",
            "operation=\"unwrap\""
        ),
        2,
        "the volume key at mount, then one unwrap for the file"
    );
}

/// The bytes READ requests were served, and the bytes filled at open.
fn served(port: u16) -> (u64, u64) {
    let text = scrape(port);
    (
        metric(&text, "kmsfs_read_bytes_total", ""),
        metric(&text, "kmsfs_open_fill_bytes_total", ""),
    )
}

#[test]
fn first_open_for_reading_fills_the_page_cache() {
    const FILL: u64 = 128 * 1024;
    let mut fs = TestFs::new(&[]);
    let small = pattern(10_000, 1);
    let big = pattern(300 * 1024 + 5, 2);
    fs::write(fs.path("small"), &small).unwrap();
    fs::write(fs.path("big"), &big).unwrap();
    fs::write(fs.path("rw"), &small).unwrap();
    fs.umount();
    let port = free_port();
    fs.mount(&["--metrics-addr", &format!("127.0.0.1:{port}")]);

    // A small file: all of it is filled at open, and reading it makes no
    // READ request.
    assert_eq!(fs::read(fs.path("small")).unwrap(), small);
    assert_eq!(served(port), (0, small.len() as u64));
    // Opened again while the kernel keeps its pages: nothing more.
    assert_eq!(fs::read(fs.path("small")).unwrap(), small);
    assert_eq!(served(port), (0, small.len() as u64));
    // A larger file: its head is filled, the rest comes by READ.
    assert_eq!(fs::read(fs.path("big")).unwrap(), big);
    assert_eq!(
        served(port),
        (big.len() as u64 - FILL, small.len() as u64 + FILL)
    );
    // Opened for writing: no fill (a store must not meet dirty pages).
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(fs.path("rw"))
        .unwrap();
    let mut got = Vec::new();
    f.read_to_end(&mut got).unwrap();
    assert_eq!(got, small);
    drop(f);
    assert_eq!(
        served(port),
        (
            big.len() as u64 - FILL + small.len() as u64,
            small.len() as u64 + FILL
        )
    );
}

/// A reader's first open fills the page cache while a writer opens the
/// same file and writes it: the writer's bytes must win every time. A fill
/// that landed on the writer's dirty pages would put the old bytes back,
/// and the writer's close would write those out.
#[test]
fn page_cache_fill_never_undoes_a_concurrent_write() {
    use std::io::Write;
    let mut fs = TestFs::new(&[]);
    let path = fs.path("contended");
    fs::write(&path, pattern(64 * 1024, 0)).unwrap();
    fs.umount();
    let port = free_port();
    fs.mount(&["--metrics-addr", &format!("127.0.0.1:{port}")]);
    for round in 1..=30u64 {
        // Usually makes the kernel forget the inode, so that the next open
        // fills again.
        fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
        let new = pattern(64 * 1024, round);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut f = fs::File::open(&path).unwrap();
                let _ = f.read(&mut [0u8; 4096]).unwrap();
            });
            s.spawn(|| {
                // Open just after the reader, and keep the written pages
                // dirty in the kernel for a while before the close.
                std::thread::sleep(std::time::Duration::from_micros(200));
                let mut f = fs::OpenOptions::new().write(true).open(&path).unwrap();
                f.write_all(&new).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(2));
            });
        });
        assert!(
            fs::read(&path).unwrap() == new,
            "round {round}: the write was undone"
        );
    }
    let (_, filled) = served(port);
    assert!(
        filled > 0,
        "no open filled the page cache: the race was not run"
    );
}

#[test]
fn kms_test_and_status_report_health() {
    let fs = TestFs::new(&[]);
    let out = run(
        &["kms", "test", fs.backing.to_str().unwrap(), "/any/dir"],
        true,
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with("ok: local")
            && said.contains("local keyring")
            && said.contains("(policy of /): wrap/unwrap round trip"),
        "{said}"
    );
    let out = run(
        &["kms", "status", fs.backing.to_str().unwrap(), "--json"],
        true,
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1, "one KMS: {v}");
    assert_eq!(v[0]["ok"], true, "{v}");
    assert!(
        v[0]["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
        "{v}"
    );
    assert_eq!(v[0]["policies"], serde_json::json!(["/"]), "{v}");
    // A policy on a new keyring creates it (owner-only), and the round trip
    // check passes.
    let new_keys = fs.dir.path().join("other-keys");
    assert!(!new_keys.exists());
    let out = fs.policy_set("/x", &new_keys, &["--key-name", "k"], true);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("policy for /x saved"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = fs::metadata(&new_keys).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    assert_eq!(policy_dirs(&fs), ["/", "/x"]);
    // A keyring others can read is refused, and nothing is saved.
    let open_keys = fs.dir.path().join("open-keys");
    run(
        &["keys", "create", "--key-file", open_keys.to_str().unwrap()],
        true,
    );
    fs::set_permissions(
        &open_keys,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let out = fs.policy_set("/y", &open_keys, &[], false);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("readable or writable by group/others")
            && err.contains(&format!("chmod 600 {}", open_keys.display())),
        "{err}"
    );
    assert_eq!(
        policy_dirs(&fs),
        ["/", "/x"],
        "the refused policy is not saved"
    );
}
