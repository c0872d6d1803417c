//! A mount's `/health` and `/ready`, and `kmsfs kms status`, against a REAL
//! OpenBao dev server (scripts/dev-vault.sh) and a real FUSE mount; and the
//! generated shell completions and man pages. These tests fail, never skip,
//! when FUSE or OpenBao is not available.
#![cfg(feature = "vault")]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::kms::vault::Bao;
use common::Places;

const EXIT_TEMPFAIL: i32 = 75;

/// `GET path` from the mount's HTTP endpoint: status code and body.
fn get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics address");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// `/ready` as (status, JSON body).
fn ready(port: u16) -> (u16, serde_json::Value) {
    let (status, body) = get(port, "/ready");
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("/ready body {body:?}: {e}"));
    (status, json)
}

/// Polls `/ready` (at most `within`) until it answers `status`.
fn wait_ready(port: u16, status: u16, within: Duration) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let (got, json) = ready(port);
        if got == status {
            return json;
        }
        assert!(
            start.elapsed() < within,
            "/ready still answers {got}, not {status}, after {within:?}: {json}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Resumes a paused server when dropped, so a failing test does not leave
/// it stopped.
struct Paused(i32);

impl Paused {
    fn new(pid: i32) -> Paused {
        assert_eq!(
            unsafe { libc::kill(pid, libc::SIGSTOP) },
            0,
            "SIGSTOP the server"
        );
        Paused(pid)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

struct Mounted<'a> {
    places: &'a Places,
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        common::detach(&self.places.mnt);
    }
}

#[test]
fn ready_follows_the_vault_and_kms_status_exits_75_while_it_is_down() {
    let bao = Bao::start();
    let places = Places::new("kmsfs-health");
    // The address comes from VAULT_ADDR only: none is recorded.
    let vault_env = [("VAULT_ADDR", bao.addr()), ("VAULT_TOKEN", bao.token())];
    let kmsfs = |args: &[&str]| -> Output {
        common::kmsfs()
            .envs(vault_env)
            .args(args)
            .output()
            .expect("run kmsfs")
    };
    let ok = |args: &[&str]| -> String {
        let out = kmsfs(args);
        assert!(
            out.status.success(),
            "kmsfs {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let backing = places.backing.to_str().unwrap();
    ok(&["init", backing, "--kms", "vault", "--vault-key", bao.key()]);
    let trusted = std::fs::read_to_string(common::trusted_config()).unwrap();
    assert!(
        !trusted.contains(bao.addr()),
        "without --vault-addr no address is recorded (VAULT_ADDR is read at each use):\n{trusted}"
    );

    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    ok(&[
        "mount",
        backing,
        places.mnt.to_str().unwrap(),
        "--log-file",
        places.log.to_str().unwrap(),
        "--metrics-addr",
        &addr,
    ]);
    let _mounted = Mounted { places: &places };
    std::fs::write(places.mnt.join("f"), b"through vault").unwrap();

    assert_eq!(get(port, "/health"), (200, "ok\n".to_owned()));
    let (status, body) = ready(port);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ready"], true, "{body}");
    assert_eq!(body["mounted"], true, "{body}");
    let keys = body["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{body}");
    assert_eq!(keys[0]["ok"], true, "{body}");
    assert!(
        keys[0]["key"].as_str().unwrap().ends_with(bao.key()),
        "{body}"
    );
    assert!(
        keys[0]["kms"].as_str().unwrap().contains(bao.addr()),
        "{body}"
    );
    assert!(keys[0]["latency_ms"].as_f64().is_some(), "{body}");
    assert_eq!(get(port, "/nope").0, 404);

    // A storm of probes costs one check per cache period, not one each.
    let checks = |port| {
        let (_, m) = get(port, "/metrics");
        m.lines()
            .filter(|l| {
                l.starts_with("kmsfs_kms_requests_total") && l.contains("operation=\"check\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    std::thread::sleep(Duration::from_millis(1100));
    let before = checks(port);
    let start = Instant::now();
    for _ in 0..20 {
        assert_eq!(ready(port).0, 200);
    }
    let made = checks(port) - before;
    // One check per second the storm lasted (answers are reused for 1 s).
    let most = start.elapsed().as_secs() + 1;
    assert!(
        (1..=most).contains(&made),
        "20 probes in {:?} made {made} checks",
        start.elapsed()
    );

    let status_json = |extra: &[&str]| -> (Option<i32>, serde_json::Value) {
        let mut args = vec!["kms", "status", backing, "--json"];
        args.extend_from_slice(extra);
        let out = kmsfs(&args);
        let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "kms status printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code(), json)
    };
    let (code, rows) = status_json(&[]);
    assert_eq!(code, Some(0), "{rows}");
    let row = &rows[0];
    assert_eq!(row["ok"], true, "{row}");
    assert_eq!(row["policies"], serde_json::json!(["/"]), "{row}");
    assert_eq!(row["versions"]["current"], "1", "{row}");
    assert!(row["latency_ms"].as_f64().is_some(), "{row}");

    // The server hangs: /ready says so within its deadline, and comes back.
    {
        let _paused = Paused::new(bao.pid());
        std::thread::sleep(Duration::from_millis(1100));
        let start = Instant::now();
        let (status, body) = ready(port);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "/ready took {:?}",
            start.elapsed()
        );
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["ready"], false, "{body}");
        assert_eq!(body["mounted"], true, "{body}");
        assert_eq!(body["keys"][0]["ok"], false, "{body}");
        assert_eq!(body["keys"][0]["error_kind"], "timeout", "{body}");
        assert_eq!(get(port, "/health").0, 200, "liveness does not ask the KMS");

        let (code, rows) = status_json(&["--timeout", "2"]);
        assert_eq!(code, Some(EXIT_TEMPFAIL), "{rows}");
        assert_eq!(rows[0]["ok"], false, "{rows}");
        assert_eq!(rows[0]["retryable"], true, "{rows}");
    }
    let body = wait_ready(port, 200, Duration::from_secs(15));
    assert_eq!(body["keys"][0]["ok"], true, "{body}");
    assert_eq!(
        std::fs::read(places.mnt.join("f")).unwrap(),
        b"through vault"
    );

    // The server is gone: connection refused, unreachable.
    let stop = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/dev-vault.sh"))
        .arg("stop")
        .arg(bao.state_dir())
        .output()
        .unwrap();
    assert!(stop.status.success(), "{stop:?}");
    let body = wait_ready(port, 503, Duration::from_secs(10));
    assert_eq!(body["keys"][0]["error_kind"], "unreachable", "{body}");
    let (code, rows) = status_json(&[]);
    assert_eq!(code, Some(EXIT_TEMPFAIL), "{rows}");
    assert_eq!(rows[0]["error_kind"], "unreachable", "{rows}");
    let out = kmsfs(&["kms", "status", backing]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.code() == Some(EXIT_TEMPFAIL) && said.starts_with("FAIL"),
        "{said}"
    );
}

#[test]
fn completion_scripts_parse_and_name_the_commands() {
    for shell in ["bash", "zsh", "fish"] {
        let out = common::run(&["completions", shell], true);
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(
            script.contains("kmsfs") && script.contains("mount") && script.contains("rewrap"),
            "{shell} completions: {script:.300}"
        );
        if shell == "bash" {
            let dir = common::tempdir("kmsfs-completions");
            let file = dir.path().join("kmsfs.bash");
            std::fs::write(&file, &script).unwrap();
            let check = Command::new("bash").arg("-n").arg(&file).output().unwrap();
            assert!(
                check.status.success(),
                "bash -n: {}",
                String::from_utf8_lossy(&check.stderr)
            );
        }
    }
    assert_eq!(
        common::run(&["completions", "tcsh"], false).status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[test]
fn man_pages_cover_every_command() {
    let out = common::run(&["man"], true);
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(
        page.starts_with(".ie") || page.contains(".TH"),
        "{page:.300}"
    );
    for sub in ["mount", "kms", "rewrap", "completions"] {
        assert!(page.contains(sub), "kmsfs.1 lacks {sub}");
    }
    let dir = common::tempdir("kmsfs-man");
    let out_dir = dir.path().join("man1");
    common::run(&["man", "--out", out_dir.to_str().unwrap()], true);
    for page in ["kmsfs.1", "kmsfs-mount.1", "kmsfs-kms-status.1"] {
        let text =
            std::fs::read_to_string(out_dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page}: {text:.200}");
    }
    let status = std::fs::read_to_string(out_dir.join("kmsfs-kms-status.1")).unwrap();
    assert!(status.contains("json"), "{status}");
}
