//! The key lifecycle end to end, through the CLI binary and real FUSE
//! mounts: `kmsfs rewrap`, `rekey`, `keys rotate/status/destroy`, live
//! policy changes, break-glass recipients, crypto-shredding and the audit
//! log, on the local keyring, a real OpenBao dev server and moto. Tests
//! fail (never skip) when FUSE or a dev server is missing.
#![cfg_attr(
    not(all(feature = "vault", feature = "aws")),
    allow(dead_code, unused_imports)
)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{pattern, Places};
use rand::{Rng, SeedableRng};
use serde_json::Value;
use sha2::{Digest, Sha256};

const TEMP_PREFIX: &str = ".kmsfs-lifecycle-tmp.";

// ------------------------------------------------------------------ harness

/// A volume in a temp dir, with the environment every kmsfs command of it
/// gets (a Vault token, another trusted configuration), mounted or not;
/// detached when dropped.
struct Vol {
    places: Places,
    /// The local keyring of the root policy (if it has one).
    key_file: PathBuf,
    env: Vec<(String, String)>,
    mounted: bool,
}

impl Vol {
    fn new(prefix: &str, env: &[(&str, &str)]) -> Vol {
        let places = Places::new(prefix);
        Vol {
            key_file: places.dir.path().join("keys"),
            places,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            mounted: false,
        }
    }

    /// A volume whose root policy is a local keyring (`self.key_file`).
    fn local(prefix: &str, env: &[(&str, &str)]) -> Vol {
        let v = Vol::new(prefix, env);
        let (b, k) = (v.backing_str(), v.key_file.to_str().unwrap().to_owned());
        v.ok(&["init", &b, "--kms", "local", "--key-file", &k]);
        v
    }

    fn dir(&self) -> &Path {
        self.places.dir.path()
    }

    fn backing(&self) -> &Path {
        &self.places.backing
    }

    fn backing_str(&self) -> String {
        self.places.backing.to_str().unwrap().to_owned()
    }

    fn key_file_str(&self) -> String {
        self.key_file.to_str().unwrap().to_owned()
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = common::kmsfs();
        c.args(args).env_remove("VAULT_ADDR");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.places.log).unwrap_or_default()
    }

    /// `kmsfs ARGS`, whatever its exit status.
    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run kmsfs")
    }

    /// `kmsfs ARGS`, which must succeed.
    fn ok(&self, args: &[&str]) -> Output {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "kmsfs {args:?} failed ({}):\n{}\ndaemon log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        out
    }

    /// `kmsfs ARGS`, which must succeed and print JSON.
    fn json(&self, args: &[&str]) -> Value {
        let out = self.ok(args);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "kmsfs {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    fn mount_with(&mut self, extra: &[&str]) {
        let (b, m, l) = (
            self.backing_str(),
            self.places.mnt.to_str().unwrap().to_owned(),
            self.places.log.to_str().unwrap().to_owned(),
        );
        let mut args = vec!["mount", &b, &m, "--log-file", &l];
        args.extend_from_slice(extra);
        self.ok(&args);
        self.mounted = true;
    }

    fn mount(&mut self) {
        self.mount_with(&[]);
    }

    fn umount(&mut self) {
        if self.mounted {
            self.ok(&["umount", self.places.mnt.to_str().unwrap()]);
            self.mounted = false;
            common::wait_for_daemon_exit(&self.places.mnt);
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.places.mnt.join(rel)
    }

    /// `kmsfs info` of the backing file `rel` (mounted or not).
    fn info(&self, rel: &str) -> Value {
        let p = self.backing().join(rel);
        self.json(&["info", p.to_str().unwrap()])
    }

    /// The `kmsfs keys status --json` line of policy `dir`.
    fn status(&self, dir: &str) -> Value {
        let rows = self.json(&["keys", "status", &self.backing_str(), "--json"]);
        common::find_by(&rows, "dir", dir).clone()
    }

    /// A lifecycle command's `--json` summary and exit code.
    fn pass(&self, args: &[&str]) -> (Value, Option<i32>) {
        let out = self.run(args);
        let summary = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "kmsfs {args:?} ({}) printed no JSON summary ({e}):\nstdout: {}\nstderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (summary, out.status.code())
    }

    /// A lifecycle command that must end with every file done (exit 0).
    fn pass_ok(&self, args: &[&str]) -> Value {
        let (s, code) = self.pass(args);
        assert_eq!(code, Some(0), "kmsfs {args:?}: {s:#}");
        assert_eq!(s["failed"], 0, "{s:#}");
        s
    }
}

impl Drop for Vol {
    fn drop(&mut self) {
        if self.mounted {
            common::detach(&self.places.mnt);
        }
    }
}

/// The regular files below `root`, relative, without kmsfs's own
/// (sidecars, configuration, lock, temporaries): a backing directory's data
/// files, or a mount's files.
fn files_below(root: &Path) -> Vec<String> {
    fn walk(root: &Path, rel: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(root.join(rel)).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".kmsfs") {
                continue;
            }
            let t = e.file_type().unwrap();
            if t.is_dir() {
                walk(root, &rel.join(&name), out);
            } else if t.is_file() {
                out.push(rel.join(&name).to_str().unwrap().to_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(root, Path::new(""), &mut out);
    out.sort();
    out
}

/// Every leftover lifecycle temporary below `root`.
fn temps_below(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                out.push(e.path());
            } else if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            }
        }
    }
    out
}

/// SHA-256 and mtime (ns) of every backing data file.
fn data_fingerprints(backing: &Path) -> BTreeMap<String, (Vec<u8>, i64)> {
    files_below(backing)
        .into_iter()
        .map(|rel| {
            let p = backing.join(&rel);
            let m = std::fs::metadata(&p).unwrap();
            let hash = Sha256::digest(std::fs::read(&p).unwrap()).to_vec();
            (rel, (hash, m.mtime() * 1_000_000_000 + m.mtime_nsec()))
        })
        .collect()
}

/// The content of test file `i`: its number, then `len` pseudo-random bytes.
fn content(i: usize, len: usize) -> Vec<u8> {
    let mut v = format!("#{i}\n").into_bytes();
    v.extend(pattern(len, i as u64 + 1));
    v
}

/// Writes `files` (relative path, content) below `root` on `threads`
/// threads, creating their directories.
fn write_all(root: &Path, files: &[(String, Vec<u8>)], threads: usize) {
    for (rel, _) in files {
        std::fs::create_dir_all(root.join(rel).parent().unwrap()).unwrap();
    }
    let chunk = files.len().div_ceil(threads);
    std::thread::scope(|s| {
        for part in files.chunks(chunk.max(1)) {
            s.spawn(move || {
                for (rel, data) in part {
                    std::fs::write(root.join(rel), data)
                        .unwrap_or_else(|e| panic!("write {rel}: {e}"));
                }
            });
        }
    });
}

/// Asserts that the mount holds exactly `files`, with their contents.
fn assert_mount_holds(vol: &Vol, files: &[(String, Vec<u8>)]) {
    let want: BTreeSet<&str> = files.iter().map(|(r, _)| r.as_str()).collect();
    let listed = files_below(&vol.places.mnt);
    let got: BTreeSet<&str> = listed.iter().map(String::as_str).collect();
    assert_eq!(got, want, "the mount's files differ");
    let mut bad = Vec::new();
    for (rel, data) in files {
        match std::fs::read(vol.path(rel)) {
            Ok(d) if d == *data => {}
            Ok(d) => bad.push(format!("{rel}: {} bytes differ", d.len())),
            Err(e) => bad.push(format!("{rel}: {e}")),
        }
    }
    assert!(
        bad.is_empty(),
        "{} files read wrong, e.g. {:?}\ndaemon log:\n{}",
        bad.len(),
        &bad[..bad.len().min(5)],
        tail(&vol.log_text(), 30)
    );
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

// ------------------------------------------------------------ 1. Vault rewrap

/// Requests of the OpenBao audit log under `paths` made with tokens whose
/// display name is `who` (all tokens: None).
#[cfg(feature = "vault")]
fn vault_requests(audit: &Path, paths: &[&str], who: Option<&str>) -> usize {
    std::fs::read_to_string(audit)
        .expect("read the OpenBao audit log")
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == "request")
        .filter(|v| who.is_none_or(|w| v["auth"]["display_name"] == w))
        .filter(|v| {
            let p = v["request"]["path"].as_str().unwrap_or("");
            paths.iter().any(|x| p.starts_with(x))
        })
        .count()
}

/// Counts of a reader looping over every file of a mount.
#[derive(Default)]
struct ReadStats {
    passes: AtomicU64,
    reads: AtomicU64,
    errors: AtomicU64,
    mismatches: AtomicU64,
    first: Mutex<Vec<String>>,
}

#[cfg(feature = "vault")]
#[test]
fn rewrap_on_vault_during_reads() {
    const N: usize = 2000;
    let bao = common::kms::vault::Bao::start();
    let key = bao.key().to_owned();
    let mut vol = Vol::new("kmsfs-lc-vault", &[("VAULT_TOKEN", bao.token())]);
    let b = vol.backing_str();
    vol.ok(&[
        "init",
        &b,
        "--kms",
        "vault",
        "--vault-addr",
        bao.addr(),
        "--vault-key",
        &key,
    ]);
    vol.mount();
    let files: Vec<(String, Vec<u8>)> = (0..N)
        .map(|i| (format!("d{}/f{i}", i % 8), content(i, 64 + i * 37 % 900)))
        .collect();
    let t = Instant::now();
    write_all(&vol.places.mnt, &files, 4);
    eprintln!("wrote {N} files through the mount in {:?}", t.elapsed());
    assert_eq!(vol.info("d0/f0")["key"]["key_version"], "1");
    let before = data_fingerprints(vol.backing());
    assert_eq!(before.len(), N);

    // Rotate in OpenBao itself; kmsfs learns of it from the key.
    bao.cli(&["write", "-f", &format!("transit/keys/{key}/rotate")]);
    let status = vol.status("/");
    assert_eq!(status["current_version"], "2", "{status:#}");
    assert_eq!(u(&status["files_stale"]), N as u64, "{status:#}");

    // A reader loops over every file through the mount meanwhile.
    let stats = Arc::new(ReadStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stats, stop) = (stats.clone(), stop.clone());
        let files: Vec<(PathBuf, Vec<u8>)> = files
            .iter()
            .map(|(r, d)| (vol.path(r), d.clone()))
            .collect();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for (p, want) in &files {
                    let note = |what: String| {
                        let mut first = stats.first.lock().unwrap();
                        if first.len() < 5 {
                            first.push(what);
                        }
                    };
                    match std::fs::read(p) {
                        Ok(d) if d == *want => {}
                        Ok(_) => {
                            stats.mismatches.fetch_add(1, Ordering::Relaxed);
                            note(format!("{}: wrong content", p.display()));
                        }
                        Err(e) => {
                            stats.errors.fetch_add(1, Ordering::Relaxed);
                            note(format!("{}: {e}", p.display()));
                        }
                    }
                    stats.reads.fetch_add(1, Ordering::Relaxed);
                }
                stats.passes.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    wait_for("the reader's first 200 reads", || {
        stats.reads.load(Ordering::Relaxed) >= 200 || reader.is_finished()
    });

    // The rewrap authenticates with a token of its own, so that the
    // server's audit log tells its requests from the mount's.
    let token = bao.cli(&["token", "create", "-display-name=rewrap", "-field=token"]);
    let transit = [
        format!("transit/encrypt/{key}"),
        format!("transit/decrypt/{key}"),
    ];
    let transit: Vec<&str> = transit.iter().map(String::as_str).collect();
    let all0 = vault_requests(&bao.audit(), &transit, None);
    let reads0 = stats.reads.load(Ordering::Relaxed);
    let t = Instant::now();
    let out = vol
        .cmd(&["rewrap", &b, "--json"])
        .env("VAULT_TOKEN", &token)
        .output()
        .unwrap();
    let took = t.elapsed();
    let reads_during = stats.reads.load(Ordering::Relaxed) - reads0;
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "rewrap ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(out.status.code(), Some(0), "{summary:#}");
    let by_rewrap = vault_requests(&bao.audit(), &transit, Some("token-rewrap"));
    let all = vault_requests(&bao.audit(), &transit, None) - all0;
    eprintln!(
        "rewrap of {N} files: {took:?}, {} KMS batches, {by_rewrap} transit requests by the rewrap \
         ({all} by rewrap and mount together), {reads_during} reads through the mount meanwhile",
        summary["kms_batches"]
    );
    assert_eq!(u(&summary["changed"]), N as u64, "{summary:#}");
    assert_eq!(u(&summary["failed"]), 0, "{summary:#}");

    // The reader goes on for a whole pass after the rewrap, then stops.
    let passes = stats.passes.load(Ordering::Relaxed);
    wait_for("two more passes of the reader", || {
        stats.passes.load(Ordering::Relaxed) >= passes + 2 || reader.is_finished()
    });
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    let (errors, mismatches) = (
        stats.errors.load(Ordering::Relaxed),
        stats.mismatches.load(Ordering::Relaxed),
    );
    assert!(
        errors == 0 && mismatches == 0,
        "{errors} errors and {mismatches} wrong contents in {} reads during and after the rewrap, e.g. {:?}\ndaemon log:\n{}",
        stats.reads.load(Ordering::Relaxed),
        stats.first.lock().unwrap(),
        tail(&vol.log_text(), 30)
    );
    assert!(
        reads_during > 0,
        "the reader read nothing while the rewrap ran"
    );
    assert!(
        by_rewrap <= N / 100 + 5,
        "the rewrap of {N} files made {by_rewrap} transit requests"
    );

    // Every header on version 2; data files untouched.
    let status = vol.status("/");
    assert_eq!(u(&status["files_current"]), N as u64, "{status:#}");
    assert_eq!(u(&status["files_stale"]), 0, "{status:#}");
    assert_eq!(u(&status["files_unreadable"]), 0, "{status:#}");
    for rel in ["d0/f0", "d7/f1999", "d3/f1003"] {
        assert_eq!(vol.info(rel)["key"]["key_version"], "2", "{rel}");
    }
    let after = data_fingerprints(vol.backing());
    let changed: Vec<&String> = before
        .iter()
        .filter(|(rel, fp)| after.get(*rel) != Some(fp))
        .map(|(rel, _)| rel)
        .collect();
    assert!(
        changed.is_empty() && after.len() == N,
        "{} data files changed (SHA-256 or mtime), e.g. {:?}",
        changed.len(),
        &changed[..changed.len().min(5)]
    );
    assert!(temps_below(vol.backing()).is_empty());

    // Version 1 can no longer decrypt: a new daemon, cold, reads every file.
    bao.cli(&[
        "write",
        &format!("transit/keys/{key}/config"),
        "min_decryption_version=2",
    ]);
    vol.umount();
    vol.mount();
    assert_mount_holds(&vol, &files);
    vol.umount();
}

// ------------------------------------------------- 2. live policy moves

/// A local volume with files in its root and in a subdirectory, mounted
/// with `env`; its root policy moved by `policy set / KMS_ARGS` while
/// mounted; then rewrapped: every file names the new key (`provider`
/// prefix, `key_id`) and reads, before and after a remount.
fn policy_move(env: &[(&str, &str)], kms_args: &[&str], provider: &str, key_id: &str) {
    let mut vol = Vol::local("kmsfs-lc-move", env);
    vol.mount();
    let mut files: Vec<(String, Vec<u8>)> = (0..30)
        .map(|i| {
            let rel = if i % 3 == 0 {
                format!("sub/deep/g{i}")
            } else {
                format!("f{i}")
            };
            (rel, content(i, 100 + i * 1000))
        })
        .collect();
    write_all(&vol.places.mnt, &files, 2);
    let local = vol.info("f1")["key"]["provider"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(local.starts_with("local"), "{local}");

    let b = vol.backing_str();
    let mut args = vec!["policy", "set", &b, "/"];
    args.extend_from_slice(kms_args);
    vol.ok(&args);
    // The same mount, at once: new files take the new key.
    for (i, rel) in ["new-root", "sub/deep/new-sub"].into_iter().enumerate() {
        let data = content(100 + i, 5000);
        std::fs::write(vol.path(rel), &data).unwrap();
        let k = vol.info(rel)["key"].clone();
        assert!(
            k["provider"].as_str().unwrap().starts_with(provider) && k["key_id"] == key_id,
            "{rel} created after the policy change is under {k}"
        );
        assert_eq!(std::fs::read(vol.path(rel)).unwrap(), data);
        files.push((rel.to_owned(), data));
    }
    // Old files are still under the local key and read.
    assert_eq!(vol.info("f1")["key"]["provider"], local.as_str());
    assert_mount_holds(&vol, &files);
    let status = vol.status("/");
    assert_eq!(u(&status["files_stale"]), 30, "{status:#}");

    let s = vol.pass_ok(&["rewrap", &b, "--json"]);
    assert_eq!(u(&s["changed"]), 30, "{s:#}");
    assert_eq!(u(&s["up_to_date"]), 2, "{s:#}");
    for (rel, _) in &files {
        let k = vol.info(rel)["key"].clone();
        assert!(
            k["provider"].as_str().unwrap().starts_with(provider) && k["key_id"] == key_id,
            "{rel} after rewrap: {k}"
        );
    }
    let status = vol.status("/");
    assert_eq!(u(&status["files_current"]), 32, "{status:#}");
    assert_eq!(u(&status["files_stale"]), 0, "{status:#}");
    // Through the same mount, then a new daemon.
    assert_mount_holds(&vol, &files);
    vol.umount();
    vol.mount();
    assert_mount_holds(&vol, &files);
    vol.umount();
}

#[cfg(feature = "vault")]
#[test]
fn policy_move_local_to_vault() {
    let bao = common::kms::vault::Bao::start();
    let key = bao.key().to_owned();
    policy_move(
        &[("VAULT_TOKEN", bao.token())],
        &[
            "--kms",
            "vault",
            "--vault-addr",
            bao.addr(),
            "--vault-key",
            &key,
        ],
        "vault",
        &format!("transit/{key}"),
    );
}

#[cfg(feature = "aws")]
#[test]
fn policy_move_local_to_aws() {
    use common::kms::aws::{Moto, REGION};
    let moto = Moto::start();
    policy_move(
        &[
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_REGION", REGION),
        ],
        &[
            "--kms",
            "aws",
            "--aws-key-id",
            moto.alias(),
            "--aws-region",
            REGION,
            "--aws-endpoint",
            moto.url(),
        ],
        "aws",
        moto.key_arn(),
    );
}

/// Waits until `done`, failing the test after two minutes (never hangs).
fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ------------------------------------------------------- 3. kill -9, rerun

/// What the kills of one command did.
#[derive(Default, Debug)]
struct Kills {
    /// Killed while running, with some files done and some not.
    partial: usize,
    /// Finished before the kill came.
    finished: usize,
    /// Killed before any file was done.
    early: usize,
    /// Kills that left temporaries behind.
    left_temps: usize,
}

/// Runs `kmsfs ARGS` `rounds` times, each after `prepare` (which makes
/// every file stale again) and SIGKILLed after a random delay within the
/// middle of a full run (`full` long, `startup` of it before the first
/// file); `stale` counts the files not yet done.
#[allow(clippy::too_many_arguments)]
fn kill_runs(
    vol: &Vol, args: &[&str], rounds: usize, startup: Duration, full: Duration,
    rng: &mut rand::rngs::StdRng, prepare: &dyn Fn(&Vol), stale: &dyn Fn(&Vol) -> u64, total: u64,
) -> Kills {
    let mut k = Kills::default();
    let work = full.saturating_sub(startup);
    for round in 0..rounds {
        prepare(vol);
        assert_eq!(stale(vol), total);
        let delay = startup + work.mul_f64(rng.gen_range(0.1..0.9));
        let mut child = vol
            .cmd(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let exited = child.try_wait().unwrap();
        child.kill().unwrap();
        let status = child.wait().unwrap();
        let left = stale(vol);
        let temps = temps_below(vol.backing()).len();
        if temps > 0 {
            k.left_temps += 1;
        }
        match exited {
            Some(st) => {
                assert!(st.success(), "kmsfs {args:?} failed on its own: {st}");
                k.finished += 1;
            }
            None if left == total => k.early += 1,
            None if left == 0 => k.finished += 1,
            None => k.partial += 1,
        }
        eprintln!(
            "kill {round} of {args:?} after {delay:?}: {status}, {left}/{total} left, {temps} temporaries"
        );
    }
    k
}

#[test]
fn kill_9_rewrap_and_rekey_then_rerun() {
    const N: usize = 500;
    let seed: u64 = std::env::var("KMSFS_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("KMSFS_TEST_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let mut vol = Vol::local("kmsfs-lc-kill", &[]);
    let files: Vec<(String, Vec<u8>)> = (0..N)
        .map(|i| {
            let dir = ["", "a/", "b/c/"][i % 3];
            // One in ten is multi-block (100 KiB and more).
            let len = if i % 10 == 0 {
                100 * 1024 + i
            } else {
                200 + i * 131 % 3000
            };
            (format!("{dir}f{i}"), content(i, len))
        })
        .collect();
    vol.mount();
    write_all(&vol.places.mnt, &files, 2);
    vol.umount();
    let b = vol.backing_str();
    let kf = vol.key_file_str();
    let rotate = |v: &Vol| {
        v.ok(&["keys", "rotate", "--key-file", &kf, "--name", "default"]);
    };
    let stale = |v: &Vol| u(&v.status("/")["files_stale"]);
    let ids_before: Vec<Value> = ["f0", "a/f1", "b/c/f2", "f30"]
        .iter()
        .map(|r| vol.info(r)["file_id"].clone())
        .collect();

    // rewrap: a full timed run first, then killed runs.
    let rewrap = ["rewrap", &b, "--concurrency", "1", "--json"];
    let t = Instant::now();
    vol.ok(&["rewrap", &b, "--dry-run", "--concurrency", "1"]);
    let startup = t.elapsed();
    rotate(&vol);
    let t = Instant::now();
    let s = vol.pass_ok(&rewrap);
    let full = t.elapsed();
    assert_eq!(u(&s["changed"]), N as u64, "{s:#}");
    eprintln!("rewrap of {N} files: {full:?} (a dry run {startup:?})");
    let kills = kill_runs(
        &vol, &rewrap, 5, startup, full, &mut rng, &rotate, &stale, N as u64,
    );
    eprintln!("rewrap kills: {kills:?}");
    // The rerun takes what is left, and only that.
    let left = stale(&vol);
    let s = vol.pass_ok(&rewrap);
    assert_eq!(u(&s["changed"]), left, "{s:#}");
    assert_eq!(u(&s["up_to_date"]), N as u64 - left, "{s:#}");
    assert_eq!(stale(&vol), 0);
    assert!(temps_below(vol.backing()).is_empty());
    vol.mount();
    assert_mount_holds(&vol, &files);
    vol.umount();

    // rekey: the same (a rotation first, so that status tells rekeyed
    // files, now on the new version, from the others).
    let rekey = ["rekey", &b, "--concurrency", "1", "--json"];
    rotate(&vol);
    let t = Instant::now();
    let s = vol.pass_ok(&rekey);
    let rekey_full = t.elapsed();
    assert_eq!(u(&s["changed"]), N as u64, "{s:#}");
    eprintln!("rekey of {N} files: {rekey_full:?}");
    let rekey_kills = kill_runs(
        &vol, &rekey, 5, startup, rekey_full, &mut rng, &rotate, &stale, N as u64,
    );
    eprintln!("rekey kills: {rekey_kills:?}");
    let s = vol.pass_ok(&rekey);
    assert_eq!(u(&s["changed"]), N as u64, "{s:#}");
    assert_eq!(stale(&vol), 0);
    let leftovers = temps_below(vol.backing());
    assert!(leftovers.is_empty(), "{leftovers:?}");
    for (i, r) in ["f0", "a/f1", "b/c/f2", "f30"].iter().enumerate() {
        assert_ne!(
            vol.info(r)["file_id"],
            ids_before[i],
            "{r} kept its file ID"
        );
    }
    assert_eq!(files_below(vol.backing()).len(), N);
    vol.mount();
    assert_mount_holds(&vol, &files);
    vol.umount();

    // Delays are drawn inside a measured full run, so most kills land
    // mid-run; a loaded machine may make a few miss.
    assert!(
        kills.partial + rekey_kills.partial >= 2,
        "too few kills landed mid-run (rewrap {kills:?}, rekey {rekey_kills:?})"
    );
}

// -------------------------------------------------------------- 4. audit log

/// Whether `s` holds a run of at least `min` characters of `alphabet`.
fn has_run(s: &str, min: usize, alphabet: impl Fn(char) -> bool) -> bool {
    let mut run = 0;
    for c in s.chars() {
        run = if alphabet(c) { run + 1 } else { 0 };
        if run >= min {
            return true;
        }
    }
    false
}

/// Every string in `v`, recursively, with its key.
fn strings<'a>(v: &'a Value, key: &str, out: &mut Vec<(String, &'a str)>) {
    match v {
        Value::String(s) => out.push((key.to_owned(), s)),
        Value::Object(m) => m.iter().for_each(|(k, v)| strings(v, k, out)),
        Value::Array(a) => a.iter().for_each(|v| strings(v, key, out)),
        _ => {}
    }
}

#[test]
fn audit_log_holds_every_operation() {
    // A trusted configuration of this test's own, naming the audit log.
    let scratch = common::tempdir("kmsfs-lc-audit-cfg");
    let trusted_dir = scratch.path().join("etc");
    std::fs::create_dir(&trusted_dir).unwrap();
    let trusted = trusted_dir.join("kmsfs.toml");
    let audit = scratch.path().join("audit.jsonl");
    std::fs::write(
        &trusted,
        format!("audit_log = {:?}\n", audit.to_str().unwrap()),
    )
    .unwrap();
    let mut vol = Vol::local(
        "kmsfs-lc-audit",
        &[("KMSFS_CONFIG", trusted.to_str().unwrap())],
    );
    let b = vol.backing_str();
    let kf = vol.key_file_str();
    let a = audit.to_str().unwrap().to_owned();

    vol.mount_with(&["--audit-log", &a]);
    std::fs::create_dir(vol.path("sub")).unwrap();
    std::fs::write(vol.path("one"), b"first file").unwrap();
    std::fs::write(vol.path("sub/two"), content(2, 20_000)).unwrap();
    for _ in 0..3 {
        assert_eq!(std::fs::read(vol.path("one")).unwrap(), b"first file");
    }
    vol.umount();
    vol.mount_with(&["--audit-log", &a]);
    assert_eq!(
        std::fs::read(vol.path("sub/two")).unwrap(),
        content(2, 20_000)
    );
    // Policy changes (logged through the trusted configuration's log).
    vol.ok(&[
        "policy",
        "set",
        &b,
        "/pii",
        "--kms",
        "local",
        "--key-file",
        &kf,
        "--key-name",
        "pii",
    ]);
    std::fs::create_dir(vol.path("pii")).unwrap();
    std::fs::write(vol.path("pii/secret"), b"pii").unwrap();
    vol.ok(&["policy", "unset", &b, "/pii"]);
    // Rotate the root key where it lives, which rewraps too.
    vol.ok(&["keys", "rotate", &b, "/"]);
    vol.umount();
    vol.pass_ok(&["rekey", &b, "--json", "--audit-log", &a]);
    vol.ok(&[
        "keys",
        "rotate",
        "--key-file",
        &kf,
        "--name",
        "pii",
        "--audit-log",
        &a,
    ]);
    vol.ok(&[
        "keys",
        "destroy",
        "--key-file",
        &kf,
        "--name",
        "pii",
        "--version",
        "1",
        "--yes",
    ]);

    let text = std::fs::read_to_string(&audit).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| {
            let v: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            assert!(v.is_object(), "{l}");
            v
        })
        .collect();
    eprintln!("{} audit lines", lines.len());
    let of = |op: &str| -> Vec<&Value> { lines.iter().filter(|l| l["op"] == op).collect() };
    for l in &lines {
        assert!(l["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{l}");
        assert!(l["outcome"].is_string(), "{l}");
    }
    let key_ok = |l: &Value, version: bool| {
        let k = &l["key"];
        assert!(
            k["provider"]
                .as_str()
                .is_some_and(|p| p.starts_with("local"))
                && k["key"].is_string()
                && (!version || k["version"].is_string()),
            "{l}"
        );
    };
    // Paths must be mount-relative from the root ("/sub/two") whoever
    // logs them; lines that differ are listed, and fail the test at the end.
    let unrooted = Mutex::new(Vec::new());
    let file_ok = |l: &Value| {
        assert!(
            l["file_id"]
                .as_str()
                .is_some_and(|f| f.len() == 32 && f.chars().all(|c| c.is_ascii_hexdigit())),
            "{l}"
        );
        let p = l["path"].as_str().unwrap_or_else(|| panic!("no path: {l}"));
        assert!(!p.is_empty(), "{l}");
        if !p.starts_with('/') {
            unrooted.lock().unwrap().push(format!("{} {p}", l["op"]));
        }
    };
    let path_is = |l: &Value, want: &str| {
        l["path"]
            .as_str()
            .is_some_and(|p| p.trim_start_matches('/') == want.trim_start_matches('/'))
    };

    let wraps = of("wrap");
    assert!(wraps.len() >= 3, "{text}");
    for l in &wraps {
        key_ok(l, true);
        file_ok(l);
        assert!(l["uid"] == 0 && u(&l["pid"]) > 0, "{l}");
    }
    assert!(wraps
        .iter()
        .any(|l| path_is(l, "/pii/secret") && l["key"]["key"] == "pii"));
    let unwraps = of("unwrap");
    assert!(
        unwraps
            .iter()
            .any(|l| path_is(l, "/sub/two") && l["outcome"] == "ok"),
        "{text}"
    );
    for l in &unwraps {
        key_ok(l, true);
        file_ok(l);
        assert!(l["uid"].is_u64() && l["pid"].is_u64(), "{l}");
    }
    let cached = of("cached_unwrap");
    assert!(!cached.is_empty(), "no cached_unwrap line:\n{text}");
    for l in &cached {
        key_ok(l, true);
        assert!(u(&l["count"]) >= 1, "{l}");
    }
    let rotates = of("rotate");
    assert!(rotates.len() >= 2, "{text}");
    for l in &rotates {
        key_ok(l, false);
        assert!(l["detail"].is_string(), "{l}");
    }
    for op in ["rewrap", "rekey"] {
        let ls = of(op);
        // The volume key's own rewrap names no file.
        let (volume_key, ls): (Vec<&Value>, Vec<&Value>) = ls.into_iter().partition(|l| {
            l["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("volume key"))
        });
        assert!(ls.len() >= 3, "{op}: {text}");
        for l in volume_key.iter().chain(&ls) {
            assert_eq!(l["outcome"], "ok", "{l}");
            key_ok(l, true);
            assert!(l["detail"].is_string(), "{l}");
        }
        ls.iter().for_each(|l| file_ok(l));
    }
    let set = of("policy_set");
    assert!(
        set.iter()
            .any(|l| l["path"] == "/pii" && l["detail"].is_string()),
        "{text}"
    );
    assert!(
        of("policy_unset").iter().any(|l| l["path"] == "/pii"),
        "{text}"
    );
    let destroyed = of("destroy");
    assert!(
        destroyed
            .iter()
            .any(|l| l["key"]["key"] == "pii" && l["key"]["version"] == "1"),
        "{text}"
    );

    // No key material: no long strings, no base64 of 32 bytes, no hex of
    // 32 bytes, and none of the keyring's keys in any form.
    let keyring = std::fs::read_to_string(&vol.key_file).unwrap();
    let keys: Vec<&str> = keyring
        .lines()
        .filter(|l| l.starts_with("key "))
        .map(|l| l.split_whitespace().nth(3).unwrap())
        .collect();
    assert!(keys.len() >= 3, "{}", keys.len());
    use base64::Engine;
    for k in &keys {
        let raw = base64::engine::general_purpose::STANDARD.decode(k).unwrap();
        for form in [
            k.to_string(),
            hex::encode(&raw),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw),
        ] {
            assert!(!text.contains(&form[..40]), "a key is in the audit log");
        }
    }
    let b64 = |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '-' | '_' | '=');
    for l in &lines {
        let mut all = Vec::new();
        strings(l, "", &mut all);
        for (k, s) in all {
            let limit = if k == "detail" || k == "reason" {
                400
            } else {
                256
            };
            assert!(s.len() <= limit, "{k} is {} long: {l}", s.len());
            // Paths and details may hold long names, but not a run of 43+
            // base64 characters (outside a path) or 64 hex digits.
            let without_paths: String = s.split('/').collect::<Vec<_>>().join(" ");
            assert!(!has_run(&without_paths, 43, b64), "{k}: {l}");
            assert!(!has_run(s, 64, |c| c.is_ascii_hexdigit()), "{k}: {l}");
        }
    }
    let unrooted = unrooted.into_inner().unwrap();
    assert!(
        unrooted.is_empty(),
        "audit paths not rooted at the mount's \"/\" (as rewrap and rekey write them): {unrooted:?}"
    );
}

// --------------------------------------------- 5. break-glass, crypto-shred

/// A volume whose /vault directory has its own keyring (`primary.keys`)
/// and a recipient `recovery-N:default` (`recovery.keys`), with files made
/// before (rewrapped to gain the recipient) and after the policy; mounted.
/// Returns it and the files of /vault.
fn break_glass_volume() -> (Vol, Vec<(String, Vec<u8>)>, String) {
    // Tests of this process share a trusted configuration: a name each.
    static N: AtomicU64 = AtomicU64::new(0);
    let name = format!("recovery-{}", N.fetch_add(1, Ordering::Relaxed));
    let mut vol = Vol::local("kmsfs-lc-glass", &[]);
    let d = vol.dir().to_path_buf();
    let b = vol.backing_str();
    // The recovery provider, defined in the trusted configuration (by an
    // init of a scratch volume).
    let recovery = d.join("recovery.keys");
    vol.ok(&[
        "init",
        d.join("scratch").to_str().unwrap(),
        "--kms",
        "local",
        "--key-file",
        recovery.to_str().unwrap(),
        "--provider",
        &name,
    ]);
    vol.mount();
    std::fs::create_dir(vol.path("vault")).unwrap();
    let mut files: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| (format!("vault/old{i}"), content(i, 9000 * i)))
        .collect();
    write_all(&vol.places.mnt, &files, 1);
    std::fs::write(vol.path("outside"), b"root policy").unwrap();
    vol.ok(&[
        "policy",
        "set",
        &b,
        "/vault",
        "--kms",
        "local",
        "--key-file",
        d.join("primary.keys").to_str().unwrap(),
        "--recipient",
        &format!("{name}:default"),
    ]);
    let new: Vec<(String, Vec<u8>)> = (3..8)
        .map(|i| (format!("vault/new{i}"), content(i, 7000 * i)))
        .collect();
    write_all(&vol.places.mnt, &new, 1);
    for (rel, _) in &new {
        let keys = vol.info(rel)["keys"].clone();
        assert_eq!(keys.as_array().unwrap().len(), 2, "{rel}: {keys}");
        assert_eq!(keys[1]["provider"], name.as_str(), "{rel}: {keys}");
    }
    files.extend(new);
    let status = vol.status("/vault");
    assert_eq!(u(&status["files_stale"]), 3, "{status:#}");
    assert_eq!(u(&status["files_current"]), 5, "{status:#}");
    // Rewrap adds the recipient to the files made before.
    let s = vol.pass_ok(&["rewrap", &b, "/vault", "--json"]);
    assert_eq!(u(&s["changed"]), 3, "{s:#}");
    for (rel, _) in &files {
        let keys = vol.info(rel)["keys"].clone();
        assert_eq!(keys.as_array().unwrap().len(), 2, "{rel}: {keys}");
        assert_eq!(keys[1]["provider"], name.as_str(), "{rel}: {keys}");
    }
    assert_mount_holds_some(&vol, &files);
    (vol, files, name)
}

/// Asserts that every one of `files` reads through the mount.
fn assert_mount_holds_some(vol: &Vol, files: &[(String, Vec<u8>)]) {
    for (rel, data) in files {
        let got = std::fs::read(vol.path(rel))
            .unwrap_or_else(|e| panic!("{rel}: {e}\ndaemon log:\n{}", tail(&vol.log_text(), 20)));
        assert_eq!(&got, data, "{rel}");
    }
}

#[test]
fn break_glass_recipient() {
    let (mut vol, files, recovery) = break_glass_volume();
    let d = vol.dir().to_path_buf();
    let b = vol.backing_str();
    let primary = d.join("primary.keys");
    vol.umount();
    // Break the primary keyring: same key name, other key bytes.
    let other = d.join("other.keys");
    vol.ok(&["keys", "create", "--key-file", other.to_str().unwrap()]);
    std::fs::rename(&primary, d.join("primary.keys.good")).unwrap();
    std::fs::rename(&other, &primary).unwrap();
    vol.mount();
    assert_mount_holds_some(&vol, &files);
    assert_eq!(std::fs::read(vol.path("outside")).unwrap(), b"root policy");
    let log = vol.log_text();
    assert!(
        log.contains("unwrapped with recipient"),
        "{}",
        tail(&log, 20)
    );
    vol.umount();
    std::fs::rename(d.join("primary.keys.good"), &primary).unwrap();

    // Without the recipient in the policy, rewrap drops it.
    vol.ok(&[
        "policy",
        "set",
        &b,
        "/vault",
        "--kms",
        "local",
        "--key-file",
        primary.to_str().unwrap(),
    ]);
    let status = vol.status("/vault");
    assert_eq!(u(&status["files_stale"]), 8, "{status:#}");
    let s = vol.pass_ok(&["rewrap", &b, "/vault", "--json"]);
    assert_eq!(u(&s["changed"]), 8, "{s:#}");
    for (rel, _) in &files {
        let keys = vol.info(rel)["keys"].clone();
        assert_eq!(keys.as_array().unwrap().len(), 1, "{rel}: {keys}");
        assert_ne!(keys[0]["provider"], recovery.as_str(), "{rel}: {keys}");
    }
    let status = vol.status("/vault");
    assert_eq!(u(&status["files_current"]), 8, "{status:#}");
    vol.mount();
    assert_mount_holds_some(&vol, &files);
    vol.umount();
}

/// Break-glass when the primary keyring is gone altogether (the case a
/// recipient exists for): the mount must still come up and read /vault
/// through the recipient.
#[test]
fn break_glass_recipient_with_primary_keyring_gone() {
    let (mut vol, files, _) = break_glass_volume();
    let d = vol.dir().to_path_buf();
    vol.umount();
    std::fs::rename(d.join("primary.keys"), d.join("primary.keys.away")).unwrap();
    vol.mount();
    assert_mount_holds_some(&vol, &files);
    vol.umount();
}

#[test]
fn crypto_shred_local() {
    let mut vol = Vol::local("kmsfs-lc-shred", &[]);
    let b = vol.backing_str();
    let kf = vol.key_file_str();
    vol.ok(&[
        "policy",
        "set",
        &b,
        "/pii",
        "--kms",
        "local",
        "--key-file",
        &kf,
        "--key-name",
        "pii",
    ]);
    vol.mount();
    std::fs::create_dir(vol.path("pii")).unwrap();
    let old: Vec<(String, Vec<u8>)> = (0..10)
        .map(|i| (format!("pii/old{i}"), content(i, 3000 * i)))
        .collect();
    write_all(&vol.places.mnt, &old, 1);
    std::fs::write(vol.path("public"), b"not pii").unwrap();
    vol.ok(&["keys", "rotate", "--key-file", &kf, "--name", "pii"]);
    // The running mount wraps new files under version 2 at once.
    let new: Vec<(String, Vec<u8>)> = (10..15)
        .map(|i| (format!("pii/new{i}"), content(i, 3000 * i)))
        .collect();
    write_all(&vol.places.mnt, &new, 1);
    assert_eq!(vol.info("pii/new10")["key"]["key_version"], "2");
    assert_eq!(vol.info("pii/old0")["key"]["key_version"], "1");

    vol.ok(&[
        "keys",
        "destroy",
        "--key-file",
        &kf,
        "--name",
        "pii",
        "--version",
        "1",
        "--yes",
    ]);
    let status = vol.status("/pii");
    assert_eq!(u(&status["files_unreadable"]), 10, "{status:#}");
    assert_eq!(u(&status["files_current"]), 5, "{status:#}");
    assert_eq!(u(&status["files_stale"]), 0, "{status:#}");
    let root = vol.status("/");
    assert_eq!(u(&root["files_current"]), 1, "{root:#}");
    assert_eq!(u(&root["files_unreadable"]), 0, "{root:#}");

    vol.umount();
    vol.mount();
    for (rel, _) in &old {
        let err = std::fs::read(vol.path(rel)).expect_err(rel);
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{rel}: {err}");
    }
    assert_mount_holds_some(&vol, &new);
    assert_eq!(std::fs::read(vol.path("public")).unwrap(), b"not pii");
    vol.umount();
    // A rewrap cannot save them either: they fail (exit 1), the rest is
    // current.
    let (s, code) = vol.pass(&["rewrap", &b, "/pii", "--json"]);
    assert_eq!(code, Some(1), "{s:#}");
    assert_eq!(u(&s["failed"]), 10, "{s:#}");
    assert_eq!(u(&s["up_to_date"]), 5, "{s:#}");
}

/// The operator's routine: rotate the root key, rewrap, destroy the old
/// version. The volume must still open (its configuration's volume key
/// was under the old version too).
#[test]
fn destroy_old_root_version_after_rotate_and_rewrap() {
    let mut vol = Vol::local("kmsfs-lc-rootshred", &[]);
    let b = vol.backing_str();
    let kf = vol.key_file_str();
    vol.mount();
    let files: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| (format!("f{i}"), content(i, 5000 * i)))
        .collect();
    write_all(&vol.places.mnt, &files, 1);
    vol.umount();
    vol.ok(&["keys", "rotate", &b, "/"]);
    let status = vol.status("/");
    assert_eq!(status["current_version"], "2", "{status:#}");
    assert_eq!(u(&status["files_current"]), 5, "{status:#}");
    vol.ok(&[
        "keys",
        "destroy",
        "--key-file",
        &kf,
        "--name",
        "default",
        "--version",
        "1",
        "--yes",
    ]);
    let status = vol.status("/");
    assert_eq!(u(&status["files_current"]), 5, "{status:#}");
    vol.mount();
    assert_mount_holds(&vol, &files);
    vol.umount();
}

// -------------------------------------------------------------- 6. schedules

/// `rotate_after` makes `kmsfs rotate --due` rotate the key and rewrap its
/// files; a key older than `max_key_age` makes it fail, and `keys status`
/// says which is which. No mount needed.
#[test]
fn rotate_due_follows_the_policy_schedule() {
    let mut vol = Vol::local("kmsfs-lc-due", &[]);
    let b = vol.backing_str();
    let kf = vol.key_file_str();
    vol.mount();
    let files: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| (format!("f{i}"), content(i, 100 + 50 * i)))
        .collect();
    write_all(&vol.places.mnt, &files, 1);
    vol.umount();

    // Nothing is due without a schedule.
    let out = vol.json(&["rotate", "--due", &b, "--json"]);
    assert_eq!(out["rotated"].as_array().map(Vec::len), Some(0), "{out:#}");

    // Due after 1 s; the key's current version is older than that soon.
    vol.ok(&[
        "policy",
        "set",
        &b,
        "/",
        "--kms",
        "local",
        "--key-file",
        &kf,
        "--key-name",
        "default",
        "--rotate-after",
        "1s",
        "--max-key-age",
        "1h",
    ]);
    std::thread::sleep(Duration::from_millis(1100));
    let status = vol.json(&["keys", "status", &b, "--json"]);
    assert_eq!(status[0]["rotation_due"], true, "{status:#}");
    assert_eq!(status[0]["past_max_age"], false, "{status:#}");
    assert_eq!(u(&status[0]["files_current"]), 20, "{status:#}");

    let out = vol.json(&["rotate", "--due", &b, "--json"]);
    assert_eq!(out["rotated"][0]["to_version"], "2", "{out:#}");
    assert_eq!(u(&out["rewrap"]["changed"]), 20, "{out:#}");
    let status = vol.json(&["keys", "status", &b, "--json"]);
    assert_eq!(status[0]["current_version"], "2", "{status:#}");
    assert_eq!(u(&status[0]["files_current"]), 20, "{status:#}");
    assert_eq!(u(&status[0]["files_stale"]), 0, "{status:#}");
    assert_eq!(vol.info("f3")["key"]["key_version"], "2");

    // A key past its max age: rotate --due fails with a message that says
    // so (here the schedule never rotates it: no rotate_after).
    vol.ok(&[
        "policy",
        "set",
        &b,
        "/",
        "--kms",
        "local",
        "--key-file",
        &kf,
        "--key-name",
        "default",
        "--max-key-age",
        "3s",
    ]);
    // Ages are whole seconds: well past 3 s here, well under it after the
    // rotation below.
    std::thread::sleep(Duration::from_millis(4100));
    let out = vol.run(&["rotate", "--due", &b]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_key_age"), "{err}");
    // Rotating it now clears that.
    vol.ok(&["keys", "rotate", &b, "/"]);
    let out = vol.run(&["rotate", "--due", &b]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    vol.mount();
    assert_mount_holds(&vol, &files);
    vol.umount();
}

// ------------------------------------------------- 7. a hostile backing dir

/// Temporary files of a rekey of `name`, as kmsfs names them.
fn rekey_temp(name: &[u8], suffix: &str) -> String {
    let tag = hex::encode(&Sha256::digest(name)[..16]);
    format!(".kmsfs-lifecycle-tmp.rk-{tag}.{suffix}")
}

/// An intent record planted in the backing directory can name only a file
/// of its own directory: one that points outside (`../`), at a
/// subdirectory, or at a name that is not there makes rewrap and rekey
/// change nothing outside, and its temporaries are cleared away.
#[test]
fn planted_intent_records_change_nothing_outside() {
    let mut vol = Vol::local("kmsfs-lc-intent", &[]);
    let b = vol.backing_str();
    vol.mount();
    let mut files: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| (format!("f{i}"), content(i, 5000)))
        .collect();
    files.push(("sub/g".into(), b"in sub".to_vec()));
    write_all(&vol.places.mnt, &files, 1);
    vol.umount();

    // A file outside the backing directory, and one planted swap for each
    // hostile name: intent record plus a data file to swap in.
    let outside = vol.dir().join("outside.txt");
    std::fs::write(&outside, b"keep me").unwrap();
    let before = std::fs::metadata(&outside).unwrap().ino();
    for name in ["../outside.txt", "sub/g", "missing", ".kmsfs-config.toml"] {
        let data = vol.backing().join(rekey_temp(name.as_bytes(), "data"));
        std::fs::write(&data, b"attacker's bytes").unwrap();
        // For the name outside, the inode number of the file there: without
        // the check, "the data was swapped in, the header not" would have
        // the pass exchange the planted data with it.
        let ino = if name.starts_with("../") {
            before
        } else {
            std::fs::metadata(&data).unwrap().ino()
        };
        let intent = format!(
            "kmsfs rekey intent 2\nname={}\ndata_ino={ino}\nheader_sha256={}\n",
            hex::encode(name),
            hex::encode(Sha256::digest(b"anything"))
        );
        std::fs::write(
            vol.backing().join(rekey_temp(name.as_bytes(), "intent")),
            intent,
        )
        .unwrap();
    }
    vol.ok(&["rewrap", &b]);
    vol.ok(&["rekey", &b]);

    assert_eq!(std::fs::read(&outside).unwrap(), b"keep me");
    assert_eq!(std::fs::metadata(&outside).unwrap().ino(), before);
    let leftovers = temps_below(vol.backing());
    assert!(leftovers.is_empty(), "{leftovers:?}");
    vol.mount();
    assert_mount_holds(&vol, &files);
    vol.umount();
}
