//! Two kmsfs "nodes" serving one backing directory with `-o shared`:
//! either two mounts of one backing directory on this machine
//! ([`Kind::Local`]), or one mount over each of two GlusterFS client mounts
//! of one volume ([`Kind::Gluster`]), brought up by scripts/dev-gluster.sh.
//! A test that needs GlusterFS fails (never skips) when it cannot be
//! brought up.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use super::{detach, init_local, run, tempdir, wait_for_daemon_exit};

/// The attribute timeout the nodes mount with (`-o attr_timeout=SECS`):
/// creates, renames and removals on one node are seen on the other within
/// it. Small, so that tests wait little.
pub const ATTR_TIMEOUT_SECS: f64 = 0.2;

/// Waits until what the other node did is past the attribute timeout.
pub fn settle() {
    std::thread::sleep(Duration::from_secs_f64(ATTR_TIMEOUT_SECS * 3.0));
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Two mounts of one backing directory on this machine.
    Local,
    /// Mount A over GlusterFS client mount 1, mount B over client mount 2.
    Gluster,
}

/// The two GlusterFS client mounts of one volume, up for the rest of this
/// test process (taken down at its exit, unless `KMSFS_TEST_GLUSTER_DIR`
/// named a setup to reuse and keep).
pub struct Gluster {
    pub dir: PathBuf,
    pub node_a: PathBuf,
    pub node_b: PathBuf,
}

fn dev_gluster() -> String {
    format!("{}/scripts/dev-gluster.sh", env!("CARGO_MANIFEST_DIR"))
}

static GLUSTER: OnceLock<Gluster> = OnceLock::new();

extern "C" fn gluster_down_at_exit() {
    if let Some(g) = GLUSTER.get() {
        let _ = Command::new("bash")
            .arg(dev_gluster())
            .arg("down")
            .arg(&g.dir)
            .output();
        let _ = std::fs::remove_dir_all(&g.dir);
    }
}

/// Brings GlusterFS up once per test process (`dev-gluster.sh up`), or
/// panics saying why it could not.
pub fn gluster() -> &'static Gluster {
    GLUSTER.get_or_init(|| {
        super::require_fuse();
        let (dir, keep) = match std::env::var_os("KMSFS_TEST_GLUSTER_DIR") {
            Some(d) => (PathBuf::from(d), true),
            None => (tempdir("kmsfs-gluster").keep(), false),
        };
        let out = Command::new("bash")
            .arg(dev_gluster())
            .arg("up")
            .arg(&dir)
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", dev_gluster()));
        assert!(
            out.status.success(),
            "scripts/dev-gluster.sh up {} failed ({}): the multi-node tests need GlusterFS \
             (Debian glusterfs-server and glusterfs-client, root, /dev/fuse):\n{}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let var = |name: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(&format!("export {name}=")))
                .map(PathBuf::from)
                .unwrap_or_else(|| panic!("dev-gluster.sh printed no {name}:\n{stdout}"))
        };
        let g = Gluster {
            node_a: var("NODE_A"),
            node_b: var("NODE_B"),
            dir,
        };
        if !keep {
            unsafe { libc::atexit(gluster_down_at_exit) };
        }
        g
    })
}

/// One node: a kmsfs mount of its view of the backing directory.
pub struct Node {
    pub name: &'static str,
    /// The backing directory as this node sees it.
    pub backing: PathBuf,
    pub mnt: PathBuf,
    pub log: PathBuf,
    mounted: bool,
}

impl Node {
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// `kmsfs mount BACKING MNT -o OPTIONS`; panics with the error and the
    /// daemon's log on failure when `expect_ok`.
    pub fn mount(&mut self, options: &str, expect_ok: bool) -> Output {
        let mut args = vec![
            "mount",
            self.backing.to_str().unwrap(),
            self.mnt.to_str().unwrap(),
            "--log-file",
            self.log.to_str().unwrap(),
        ];
        if !options.is_empty() {
            args.extend(["-o", options]);
        }
        let out = run(&args, false);
        if out.status.success() {
            self.mounted = true;
        } else if expect_ok {
            panic!(
                "node {}: kmsfs {args:?} failed ({}): {}\nlog:\n{}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        out
    }

    pub fn umount(&mut self) {
        if self.mounted {
            run(&["umount", self.mnt.to_str().unwrap()], true);
            self.mounted = false;
            wait_for_daemon_exit(&self.mnt);
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.mounted {
            detach(&self.mnt);
        }
    }
}

/// The options both nodes mount with: `-o shared` and a small attribute
/// timeout.
pub fn shared_options() -> String {
    format!("shared,attr_timeout={ATTR_TIMEOUT_SECS}")
}

/// Two nodes over one freshly made volume (local keyring).
pub struct Pair {
    pub kind: Kind,
    pub a: Node,
    pub b: Node,
    /// The volume's directory on GlusterFS, removed when dropped.
    gluster_backing: Option<PathBuf>,
    pub dir: tempfile::TempDir,
}

impl Pair {
    /// A fresh volume, both nodes mounted with [`shared_options`].
    pub fn new(kind: Kind) -> Pair {
        let mut p = Pair::unmounted(kind);
        let opts = shared_options();
        p.a.mount(&opts, true);
        p.b.mount(&opts, true);
        p
    }

    /// A fresh volume (`kmsfs init` through node A's view), not mounted.
    pub fn unmounted(kind: Kind) -> Pair {
        super::require_fuse();
        let dir = tempdir(match kind {
            Kind::Local => "kmsfs-shared-local",
            Kind::Gluster => "kmsfs-shared-gluster",
        });
        let (backing_a, backing_b, gluster_backing) = match kind {
            Kind::Local => {
                let b = dir.path().join("backing");
                (b.clone(), b, None)
            }
            Kind::Gluster => {
                let g = gluster();
                // A name of its own on the volume, per test.
                let name = dir.path().file_name().unwrap().to_owned();
                (
                    g.node_a.join(&name),
                    g.node_b.join(&name),
                    Some(g.node_a.join(&name)),
                )
            }
        };
        init_local(&backing_a, &dir.path().join("keys"), &[]);
        let node = |name: &'static str, backing: PathBuf| {
            let mnt = dir.path().join(format!("mnt-{name}"));
            std::fs::create_dir(&mnt).unwrap();
            Node {
                name,
                backing,
                log: dir.path().join(format!("kmsfs-{name}.log")),
                mnt,
                mounted: false,
            }
        };
        Pair {
            kind,
            a: node("A", backing_a),
            b: node("B", backing_b),
            gluster_backing,
            dir,
        }
    }

    /// Both nodes, A first.
    pub fn nodes(&self) -> [&Node; 2] {
        [&self.a, &self.b]
    }

    /// The daemons' logs, for a failure message.
    pub fn logs(&self) -> String {
        self.nodes()
            .iter()
            .map(|n| {
                format!(
                    "--- node {} log:\n{}",
                    n.name,
                    std::fs::read_to_string(&n.log).unwrap_or_default()
                )
            })
            .collect()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for n in [&mut self.a, &mut self.b] {
            if n.mounted {
                detach(&n.mnt);
                n.mounted = false;
            }
        }
        if let Some(b) = &self.gluster_backing {
            let _ = std::fs::remove_dir_all(b);
        }
    }
}

/// Whether `path` exists (as lstat sees it).
pub fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}
