//! A real KMS dev server started by one of the scripts/dev-*.sh scripts in
//! its own state directory, and stopped when dropped. A test that needs one
//! fails (never skips) when it cannot be started.

use std::collections::HashMap;
use std::process::Command;

pub struct DevServer {
    script: String,
    pub state: tempfile::TempDir,
    /// The `export NAME=VALUE` lines the script printed.
    pub env: HashMap<String, String>,
}

impl DevServer {
    /// Runs `scripts/SCRIPT start STATE_DIR`, with `configure` adjusting the
    /// command (environment), and checks that it printed every `required`
    /// variable. `needs` tells, when it fails, what the tests need.
    pub fn start(
        script: &str, needs: &str, required: &[&str], configure: impl FnOnce(&mut Command),
    ) -> DevServer {
        let script = format!("{}/scripts/{script}", env!("CARGO_MANIFEST_DIR"));
        let state = tempfile::Builder::new()
            .prefix("kmsfs-dev-server")
            .tempdir()
            .unwrap();
        let mut cmd = Command::new("bash");
        cmd.arg(&script).arg("start").arg(state.path());
        configure(&mut cmd);
        let out = cmd.output().unwrap_or_else(|e| panic!("run {script}: {e}"));
        let mut server = DevServer {
            script,
            state,
            env: HashMap::new(),
        };
        assert!(
            out.status.success(),
            "{} start failed ({}): these tests need {needs}:\n{}",
            server.script,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let (k, v) = line
                .strip_prefix("export ")
                .and_then(|l| l.split_once('='))
                .unwrap_or_else(|| panic!("unexpected stdout line {line:?}"));
            server.env.insert(k.to_owned(), v.to_owned());
        }
        for k in required {
            assert!(
                server.env.contains_key(*k),
                "{} printed no {k}: {:?}",
                server.script,
                server.env.keys()
            );
        }
        server
    }
}

impl Drop for DevServer {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(&self.script)
            .arg("stop")
            .arg(self.state.path())
            .output();
    }
}
