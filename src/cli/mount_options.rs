//! The mount's options and settings, and where they come from. One parser
//! serves every source:
//! - the command line: `kmsfs mount` flags (`--cache-size N`) and `-o`
//!   items, as mount(8) and /etc/fstab write them (`-o cache_size=N,ro`);
//! - `KMSFS_<NAME>` environment variables (`KMSFS_CACHE_SIZE`, and
//!   `KMSFS_OPTIONS` for `-o` items);
//! - the `[mount]` table of the trusted configuration (`cache_size = N`,
//!   `options = ["allow_other"]`);
//! - built-in defaults.
//!
//! Sources apply in that order of precedence: the command line wins over
//! the environment, which wins over the configuration file. Within one
//! source a later `-o` item wins over an earlier one (`ro` then `rw` is
//! read-write), and an `-o` setting wins over its flag.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};

/// What the docs call the full list; every refusal points there.
const SEE_DOCS: &str = "see docs/MOUNTING.md for the options kmsfs accepts";

pub const DEFAULT_THREADS: usize = 8;
pub const DEFAULT_CACHE_SIZE: usize = 100_000;
pub const DEFAULT_CACHE_TTL_SECS: u64 = 3600;
pub const DEFAULT_ATTR_TIMEOUT_SECS: f64 = 1.0;
pub const DEFAULT_DEK_POOL: usize = kmsfs::kms::pool::DEFAULT_CAPACITY;

/// The settings, by the one name each has as `-o NAME=VALUE`, as
/// `KMSFS_<NAME>` and as a key of `[mount]`.
const SETTING_NAMES: [&str; 8] = [
    "threads",
    "cache_size",
    "cache_ttl",
    "dek_pool",
    "attr_timeout",
    "metrics_addr",
    "audit_log",
    "log_file",
];

/// The `-o` list's name as an environment variable and a `[mount]` key.
const OPTIONS_NAME: &str = "options";

/// A mount setting with a value.
#[derive(Clone, Debug)]
pub enum Setting {
    Threads(usize),
    CacheSize(usize),
    CacheTtl(u64),
    DekPool(usize),
    AttrTimeout(f64),
    MetricsAddr(String),
    AuditLog(PathBuf),
    LogFile(PathBuf),
}

/// One `-o` item, understood.
#[derive(Clone, Debug)]
pub enum MountOpt {
    ReadOnly(bool),
    /// `shared`: other mounts (here or on other machines) may serve the
    /// same backing directory at once (docs/MOUNTING.md, "Shared mounts").
    Shared(bool),
    AllowOther,
    NoExec(bool),
    Sync(bool),
    DirSync,
    /// Accepted and without effect here: options for mount(8), systemd or
    /// fstab, or what kmsfs always does anyway.
    NoEffect,
    Setting(Setting),
    /// `config=FILE`: the trusted configuration (like `--config FILE`).
    Config(PathBuf),
}

/// Why an `-o` item was not accepted; the message names it and says what
/// to do.
#[derive(Debug, thiserror::Error)]
pub enum OptionError {
    #[error("unknown mount option {0:?}; {SEE_DOCS}")]
    Unknown(String),
    #[error("mount option {option:?} is refused: {why}")]
    Refused { option: String, why: &'static str },
    #[error("mount option {option:?}: {why}")]
    BadValue { option: String, why: String },
}

/// Parses one `-o` item (the `value_parser` of `kmsfs mount -o`).
pub fn parse_option(item: &str) -> Result<MountOpt, OptionError> {
    let item = item.trim();
    let refused = |why| {
        Err(OptionError::Refused {
            option: item.to_owned(),
            why,
        })
    };
    if let Some((name, value)) = item.split_once('=') {
        if SETTING_NAMES.contains(&name) {
            return parse_setting(name, value)
                .map(MountOpt::Setting)
                .map_err(|why| OptionError::BadValue {
                    option: item.to_owned(),
                    why,
                });
        }
        return match name {
            "config" if value.is_empty() => Err(OptionError::BadValue {
                option: item.to_owned(),
                why: "give the trusted configuration's path, config=FILE".into(),
            }),
            "config" => Ok(MountOpt::Config(PathBuf::from(value))),
            // Userspace notes for mount(8) and systemd.
            "comment" => Ok(MountOpt::NoEffect),
            _ if name.starts_with("x-") => Ok(MountOpt::NoEffect),
            _ => Err(OptionError::Unknown(item.to_owned())),
        };
    }
    Ok(match item {
        "" => MountOpt::NoEffect,
        "ro" => MountOpt::ReadOnly(true),
        "rw" => MountOpt::ReadOnly(false),
        "shared" => MountOpt::Shared(true),
        "noshared" => MountOpt::Shared(false),
        "allow_other" => MountOpt::AllowOther,
        "noexec" => MountOpt::NoExec(true),
        "exec" => MountOpt::NoExec(false),
        "sync" => MountOpt::Sync(true),
        "async" => MountOpt::Sync(false),
        "dirsync" => MountOpt::DirSync,
        // kmsfs always mounts nosuid,nodev,noatime with default_permissions.
        "nosuid" | "nodev" | "noatime" | "nodiratime" | "relatime" | "default_permissions" => {
            MountOpt::NoEffect
        }
        // For mount(8) and systemd only (mount(8) strips some of them
        // itself; `kmsfs mount -o` and fstab copies may still carry them).
        "defaults" | "auto" | "noauto" | "user" | "nouser" | "users" | "owner" | "group"
        | "_netdev" | "nofail" => MountOpt::NoEffect,
        other if other.starts_with("x-") => MountOpt::NoEffect,
        "suid" | "dev" => {
            return refused(
                "kmsfs always mounts nosuid,nodev: whoever can write the backing directory \
                 could otherwise plant set-ID programs or device nodes; remove it",
            )
        }
        "atime" | "strictatime" => {
            return refused(
                "kmsfs always mounts noatime (recording access times would rewrite a \
                 header on every read); remove it",
            )
        }
        "allow_root" => return refused("use allow_other (with default permission checks)"),
        "auto_unmount" => {
            return refused(
                "kmsfs unmounts itself when stopped (SIGTERM); remove it, and see \
                 docs/MOUNTING.md for systemd",
            )
        }
        other if SETTING_NAMES.contains(&other) || other == "config" => {
            return Err(OptionError::BadValue {
                option: other.to_owned(),
                why: format!("give a value, {other}=VALUE"),
            })
        }
        other => return Err(OptionError::Unknown(other.to_owned())),
    })
}

/// Parses setting `name`'s value; the error says what is expected.
fn parse_setting(name: &str, value: &str) -> Result<Setting, String> {
    let whole = |min: usize| {
        value
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|&n| n >= min)
            .ok_or_else(|| format!("{name} must be a whole number >= {min}, not {value:?}"))
    };
    let seconds = || {
        value
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0 && *s <= 1e9)
            .ok_or_else(|| format!("{name} must be a number of seconds >= 0, not {value:?}"))
    };
    let path = || {
        if value.is_empty() {
            Err(format!("{name} needs a file name"))
        } else {
            Ok(PathBuf::from(value))
        }
    };
    Ok(match name {
        "threads" => Setting::Threads(whole(1)?),
        "cache_size" => Setting::CacheSize(whole(0)?),
        "cache_ttl" => Setting::CacheTtl(whole(0)? as u64),
        "dek_pool" => Setting::DekPool(whole(0)?),
        "attr_timeout" => Setting::AttrTimeout(seconds()?),
        "metrics_addr" if value.is_empty() => return Err("metrics_addr needs HOST:PORT".into()),
        "metrics_addr" => Setting::MetricsAddr(value.to_owned()),
        "audit_log" => Setting::AuditLog(path()?),
        "log_file" => Setting::LogFile(path()?),
        _ => return Err(format!("unknown setting {name:?}")),
    })
}

/// The mount's options and settings once every source is applied.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    pub read_only: bool,
    /// `-o shared`: see `MountOpt::Shared`.
    pub shared: bool,
    pub allow_other: bool,
    pub noexec: bool,
    pub sync: bool,
    pub dirsync: bool,
    pub threads: usize,
    pub cache_size: usize,
    pub cache_ttl: Duration,
    /// Pre-wrapped DEKs kept per remote key (0: none).
    pub dek_pool: usize,
    pub attr_timeout: Duration,
    pub metrics_addr: Option<String>,
    /// None: the trusted configuration's top-level `audit_log`, if any.
    pub audit_log: Option<PathBuf>,
    pub log_file: Option<PathBuf>,
}

impl Default for Resolved {
    fn default() -> Self {
        Resolved {
            read_only: false,
            shared: false,
            allow_other: false,
            noexec: false,
            sync: false,
            dirsync: false,
            threads: DEFAULT_THREADS,
            cache_size: DEFAULT_CACHE_SIZE,
            cache_ttl: Duration::from_secs(DEFAULT_CACHE_TTL_SECS),
            dek_pool: DEFAULT_DEK_POOL,
            attr_timeout: Duration::from_secs_f64(DEFAULT_ATTR_TIMEOUT_SECS),
            metrics_addr: None,
            audit_log: None,
            log_file: None,
        }
    }
}

impl Resolved {
    /// Applies one item; a later one wins.
    fn apply(&mut self, o: &MountOpt) {
        match o {
            MountOpt::ReadOnly(ro) => self.read_only = *ro,
            MountOpt::Shared(s) => self.shared = *s,
            MountOpt::AllowOther => self.allow_other = true,
            MountOpt::NoExec(n) => self.noexec = *n,
            MountOpt::Sync(s) => self.sync = *s,
            MountOpt::DirSync => self.dirsync = true,
            MountOpt::NoEffect | MountOpt::Config(_) => {}
            MountOpt::Setting(s) => match s {
                Setting::Threads(n) => self.threads = *n,
                Setting::CacheSize(n) => self.cache_size = *n,
                Setting::CacheTtl(s) => self.cache_ttl = Duration::from_secs(*s),
                Setting::DekPool(n) => self.dek_pool = *n,
                Setting::AttrTimeout(s) => {
                    // The flag is not range-checked by its parser.
                    self.attr_timeout = Duration::try_from_secs_f64(s.max(0.0))
                        .unwrap_or(Duration::from_secs(1_000_000_000))
                }
                Setting::MetricsAddr(a) => self.metrics_addr = Some(a.clone()),
                Setting::AuditLog(p) => self.audit_log = Some(p.clone()),
                Setting::LogFile(p) => self.log_file = Some(p.clone()),
            },
        }
    }

    /// Mount flags for the kernel, by name (kmsfs's fixed ones aside).
    pub fn kernel_flags(&self) -> Vec<String> {
        [
            (self.noexec, "noexec"),
            (self.sync, "sync"),
            (self.dirsync, "dirsync"),
        ]
        .into_iter()
        .filter(|(on, _)| *on)
        .map(|(_, name)| name.to_owned())
        .collect()
    }
}

/// Applies the sources in order of precedence: `[mount]` of the trusted
/// configuration, then the `KMSFS_*` variables `env` returns, then the
/// command line (`command_line`: flags first, then `-o` items).
pub fn resolve(
    config_table: &toml::Table, config_path: &std::path::Path,
    env: impl Fn(&str) -> Option<String>, command_line: &[MountOpt],
) -> Result<Resolved> {
    let mut r = Resolved::default();
    for o in from_config(config_table, config_path)? {
        r.apply(&o);
    }
    for o in from_env(env)? {
        r.apply(&o);
    }
    for o in command_line {
        r.apply(o);
    }
    Ok(r)
}

/// `KMSFS_<NAME>` for a setting or `options`.
pub fn env_name(name: &str) -> String {
    format!("KMSFS_{}", name.to_ascii_uppercase())
}

/// The items the environment gives: each `KMSFS_<SETTING>`, then the
/// `-o` items of `KMSFS_OPTIONS`. An empty variable counts as unset.
fn from_env(env: impl Fn(&str) -> Option<String>) -> Result<Vec<MountOpt>> {
    let mut out = Vec::new();
    for name in SETTING_NAMES {
        let var = env_name(name);
        if let Some(v) = env(&var).filter(|v| !v.is_empty()) {
            match parse_setting(name, &v) {
                Ok(s) => out.push(MountOpt::Setting(s)),
                Err(why) => bail!("{var}={v:?}: {why}"),
            }
        }
    }
    let var = env_name(OPTIONS_NAME);
    if let Some(v) = env(&var) {
        for item in v.split(',') {
            out.push(option_from(item, &var)?);
        }
    }
    Ok(out)
}

/// An `-o` item from a list other than the command line's; `config=` has
/// no meaning there (the trusted configuration is chosen first).
fn option_from(item: &str, source: &str) -> Result<MountOpt> {
    match parse_option(item) {
        Ok(MountOpt::Config(_)) => bail!(
            "{source}: config= chooses the trusted configuration, so it belongs on the command \
             line (or in KMSFS_CONFIG)"
        ),
        Ok(o) => Ok(o),
        Err(e) => bail!("{source}: {e}"),
    }
}

/// The items the trusted configuration's `[mount]` table gives.
fn from_config(table: &toml::Table, path: &std::path::Path) -> Result<Vec<MountOpt>> {
    let mut out = Vec::new();
    let at = |key: &str| format!("[mount] {key} in {}", path.display());
    for (key, value) in table {
        if key == OPTIONS_NAME {
            let items: Vec<&str> = match value {
                toml::Value::String(s) => s.split(',').collect(),
                toml::Value::Array(a) => a
                    .iter()
                    .map(|v| v.as_str())
                    .collect::<Option<_>>()
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "{}: write a list of strings, e.g. [\"allow_other\"]",
                            at(key)
                        )
                    })?,
                _ => bail!(
                    "{}: write a list of strings, e.g. [\"allow_other\"]",
                    at(key)
                ),
            };
            for item in items {
                out.push(option_from(item, &at(key))?);
            }
            continue;
        }
        if key == "audit_log" {
            bail!(
                "{}: the audit log is set once for every command, as audit_log at the top of \
                 the file (before any [table]); move it there",
                at(key)
            );
        }
        if !SETTING_NAMES.contains(&key.as_str()) {
            bail!(
                "{}: unknown setting; [mount] takes {}, and options",
                at(key),
                SETTING_NAMES
                    .iter()
                    .filter(|n| **n != "audit_log")
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let text = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            other => bail!("{}: expected a number or a string, not {other}", at(key)),
        };
        match parse_setting(key, &text) {
            Ok(s) => out.push(MountOpt::Setting(s)),
            Err(why) => bail!("{}: {why}", at(key)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn command_line_beats_environment_beats_config_beats_default() {
        let config = table(
            "threads = 3\ncache_size = 10\ncache_ttl = 7\ndek_pool = 64\noptions = [\"ro\", \"noexec\"]",
        );
        let env = |name: &str| match name {
            "KMSFS_CACHE_SIZE" => Some("20".to_owned()),
            "KMSFS_DEK_POOL" => Some("128".to_owned()),
            "KMSFS_CACHE_TTL" => Some("9".to_owned()),
            "KMSFS_OPTIONS" => Some("rw,allow_other".to_owned()),
            _ => None,
        };
        let cli = [
            parse_option("cache_ttl=11").unwrap(),
            parse_option("dek_pool=0").unwrap(),
        ];
        let r = resolve(&config, "/c".as_ref(), env, &cli).unwrap();
        assert_eq!(r.threads, 3, "config over default");
        assert_eq!(r.cache_size, 20, "environment over config");
        assert_eq!(
            r.cache_ttl,
            Duration::from_secs(11),
            "command line over environment"
        );
        assert_eq!(
            r.dek_pool, 0,
            "dek_pool=0 on the command line turns the pool off"
        );
        assert_eq!(r.attr_timeout, Duration::from_secs(1), "default");
        assert!(!r.read_only, "a later rw wins over ro");
        assert!(r.allow_other && r.noexec);
        assert_eq!(r.kernel_flags(), ["noexec"]);

        // Each source alone, and the default.
        let only = |config: &str, env: Option<&str>| {
            let env = |name: &str| (name == "KMSFS_DEK_POOL").then(|| env.map(str::to_owned))?;
            resolve(&table(config), "/c".as_ref(), env, &[])
                .unwrap()
                .dek_pool
        };
        assert_eq!(only("", None), DEFAULT_DEK_POOL);
        assert_eq!(only("dek_pool = 64", None), 64);
        assert_eq!(only("dek_pool = 64", Some("32")), 32);
    }

    #[test]
    fn refusals_name_the_option_and_say_why() {
        for (item, needle) in [
            ("suid", "nosuid,nodev"),
            ("dev", "nosuid,nodev"),
            ("atime", "noatime"),
            ("bogus", "unknown mount option \"bogus\""),
            ("threads=0", "threads must be a whole number >= 1"),
            ("dek_pool=-1", "dek_pool must be a whole number >= 0"),
            ("cache_size", "give a value"),
        ] {
            let e = parse_option(item).unwrap_err().to_string();
            assert!(e.contains(needle), "{item}: {e}");
            assert!(e.contains(item.split('=').next().unwrap()), "{item}: {e}");
        }
        for ok in [
            "_netdev",
            "nofail",
            "x-systemd.automount",
            "x-systemd.mount-timeout=30",
            "noauto",
            "auto",
            "user",
            "comment=hi",
            "defaults",
            "nosuid",
            "nodev",
            "noatime",
            "relatime",
        ] {
            assert!(matches!(parse_option(ok), Ok(MountOpt::NoEffect)), "{ok}");
        }
    }

    #[test]
    fn bad_sources_are_named() {
        let e = resolve(
            &table("threads = \"x\""),
            "/etc/k.toml".as_ref(),
            |_| None,
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("[mount] threads in /etc/k.toml"), "{e}");
        let e = resolve(&table("nope = 1"), "/c".as_ref(), |_| None, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown setting"), "{e}");
        let env = |n: &str| (n == "KMSFS_THREADS").then(|| "many".to_owned());
        let e = resolve(&toml::Table::new(), "/c".as_ref(), env, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("KMSFS_THREADS"), "{e}");
        let env = |n: &str| (n == "KMSFS_OPTIONS").then(|| "config=/x".to_owned());
        let e = resolve(&toml::Table::new(), "/c".as_ref(), env, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("belongs on the command line"), "{e}");
    }
}
