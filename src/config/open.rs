//! A volume opened for use: its configuration read, every key it names
//! connected (through providers of the trusted configuration, and those
//! only), and its MAC checked with the volume key the root policy's KMS key
//! unwraps. Also creating a volume and changing its policies, which
//! re-authenticate the configuration.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::trusted::TrustedConfig;
use super::volume::{VolumeConfig, VolumeId, CONFIG_FORMAT};
use super::ConfigError;
use crate::crypto::Dek;
use crate::fs::ik_store::BackingKeyStore;
use crate::kms::config::{ConnectError, KeySpec};
use crate::kms::instrumented::RetryPolicy;
use crate::kms::intermediate::{IntermediateKeyRegistry, Rotation, MAX_FILES_CAP};
use crate::kms::named::NamedKey;
use crate::kms::{KeyProvider, KmsError, KmsRuntime};
use crate::metrics::Metrics;
use crate::policy::{KeyMode, Policy};

/// How the KMS calls of an opened volume are made.
pub enum Calls {
    /// One attempt per call, bounded by the provider's timeout: for
    /// one-off commands.
    Once,
    /// Bounded, retried when a retry can help, recorded in the metrics: for
    /// a mount.
    Mount(Arc<Metrics>),
}

/// A policy with its keys connected.
#[derive(Clone)]
pub struct ActivePolicy {
    pub policy: Policy,
    /// The key that wraps new files.
    pub current: Arc<dyn KeyProvider>,
    /// Every key a file under this policy may be wrapped by, in the order
    /// of `Policy::keys`: the current one, the recipients, the retired ones.
    pub keys: Vec<Arc<dyn KeyProvider>>,
}

impl ActivePolicy {
    /// The keys a new header is wrapped under: the current one first, then
    /// the recipients (in the order of `Policy::wrapping_keys`).
    pub fn wrapping(&self) -> &[Arc<dyn KeyProvider>] {
        &self.keys[..1 + self.policy.recipients.len()]
    }

    /// The key of this policy that can unwrap under `key_ref`, if any. A
    /// format 2 reference names its provider as the trusted configuration
    /// does, and only that name matches: a provider's kind ("local") would
    /// match every provider of that kind, and so a key of another directory
    /// with the same key ID. Format 1 references recorded only the kind.
    pub fn key_for(
        &self, key_ref: &crate::format::KeyRef, format_1: bool,
    ) -> Option<&Arc<dyn KeyProvider>> {
        self.policy
            .keys()
            .zip(&self.keys)
            .find(|(spec, key)| {
                (format_1 || spec.provider == key_ref.provider) && key.handles(key_ref)
            })
            .map(|(_, key)| key)
    }
}

/// An opened, authenticated volume.
pub struct Volume {
    pub backing: PathBuf,
    pub config: VolumeConfig,
    pub policies: Vec<ActivePolicy>,
    /// The key the configuration's MAC is under; needed to change it.
    volume_key: Dek,
    /// Connected keys by spec, so that each is connected once.
    connected: HashMap<KeySpec, Arc<dyn KeyProvider>>,
    /// The intermediate keys of the policies in directory key mode (and
    /// what unwraps DEKs under them), kept across reloads.
    intermediate: Arc<IntermediateKeyRegistry>,
}

/// Connects `spec` through the trusted configuration, named as its
/// provider so that wraps record the provider's name.
fn connect(
    spec: &KeySpec, trusted: &TrustedConfig, rt: &KmsRuntime, calls: &Calls,
) -> Result<Arc<dyn KeyProvider>, ConfigError> {
    let cfg = trusted.resolve(spec)?;
    let inner = match calls {
        Calls::Once => cfg.build(rt)?,
        Calls::Mount(metrics) => cfg.build_instrumented(rt, metrics, RetryPolicy::default())?,
    };
    Ok(NamedKey::wrap(&spec.provider, inner))
}

/// Connects every key `config`'s policies name (current, recipients,
/// retired) that `connected` does not hold yet, each once. A key that
/// cannot be connected fails the whole, except a wrapping key of a policy
/// that has another one (break-glass recipients, `Policy::wrapping_keys`),
/// other than the root policy's key (which the volume key needs): it is
/// replaced by a stand-in that fails every call with the reason, so that
/// files under the policy open through their other wraps, and new files
/// there fail to be created rather than be wrapped under fewer keys.
fn connect_all(
    config: &VolumeConfig, trusted: &TrustedConfig, rt: &KmsRuntime, calls: &Calls,
    connected: &mut HashMap<KeySpec, Arc<dyn KeyProvider>>,
) -> Result<(), ConfigError> {
    let root_key = &config.root().key;
    for p in &config.policies {
        let has_another = p.wrapping_keys().count() > 1;
        for spec in p.keys() {
            if connected.contains_key(spec) {
                continue;
            }
            let key = match connect(spec, trusted, rt, calls) {
                Ok(key) => key,
                Err(e)
                    if has_another && spec != root_key && p.wrapping_keys().any(|k| k == spec) =>
                {
                    tracing::warn!(
                        "key {spec} of the policy of {} cannot be connected ({e}); files there open \
                         through their other keys, and new files there cannot be created until it \
                         can",
                        p.dir
                    );
                    let kind = trusted
                        .providers()
                        .get(&spec.provider)
                        .map(|d| d.kind.clone())
                        .unwrap_or_default();
                    NamedKey::wrap(&spec.provider, Arc::new(Unavailable::new(spec, &kind, e)))
                }
                Err(e) => return Err(e),
            };
            connected.insert(spec.clone(), key);
        }
    }
    Ok(())
}

/// A key that could not be connected, in place (see `connect_all`): it
/// claims the references of its provider kind, so that a header's wrap
/// under it is tried, and fails every call with why it is unavailable.
struct Unavailable {
    kind: &'static str,
    describe: String,
    why: KmsError,
}

impl Unavailable {
    fn new(spec: &KeySpec, kind: &str, e: ConfigError) -> Self {
        let kind = ["local", "vault", "aws", "azure", "gcp"]
            .into_iter()
            .find(|k| *k == kind)
            .unwrap_or("unknown");
        Unavailable {
            kind,
            describe: format!("{spec} (not connected)"),
            why: KmsError::Unreachable {
                kms: spec.to_string(),
                detail: format!("it could not be connected when the volume was opened: {e}"),
            },
        }
    }
}

#[async_trait::async_trait]
impl KeyProvider for Unavailable {
    fn describe(&self) -> String {
        self.describe.clone()
    }
    fn kind(&self) -> &'static str {
        self.kind
    }
    fn handles(&self, key_ref: &crate::format::KeyRef) -> bool {
        key_ref.provider == self.kind
    }
    async fn wrap(
        &self, _: &Dek, _: &crate::kms::WrapContext,
    ) -> Result<crate::kms::WrappedDek, KmsError> {
        Err(self.why.clone())
    }
    async fn unwrap(
        &self, _: &crate::kms::WrappedDek, _: &crate::kms::WrapContext,
    ) -> Result<Dek, KmsError> {
        Err(self.why.clone())
    }
    async fn check(&self) -> Result<(), KmsError> {
        Err(self.why.clone())
    }
}

/// A KMS refusing to unwrap the volume key means the key does not match the
/// configuration (a wrong keyring, or a replaced configuration); anything
/// else (unreachable, denied) is the KMS.
fn unwrap_error(e: KmsError, path: &Path, key: &KeySpec) -> ConfigError {
    match e {
        KmsError::UnwrapFailed { .. }
        | KmsError::NoProvider { .. }
        | KmsError::KeyVersionUnusable { .. } => ConfigError::VolumeKeyRefused {
            path: path.to_owned(),
            key: key.to_string(),
            detail: e.to_string(),
        },
        other => ConfigError::Connect(ConnectError::Kms(other)),
    }
}

/// Opens the volume of `backing` with the trusted configuration `trusted`,
/// on a KMS runtime of its own: how every command, a mount and the library
/// open a volume. The volume's configuration is read first ("not a backing
/// directory" is the likelier mistake than a missing trusted one).
pub fn open_volume(
    backing: &Path, trusted: &TrustedConfig, calls: &Calls,
) -> Result<(Volume, KmsRuntime), ConfigError> {
    let config = VolumeConfig::load(backing)?;
    let rt = KmsRuntime::new().map_err(|source| ConfigError::Io {
        path: backing.to_owned(),
        source,
    })?;
    let volume = Volume::from_config(backing, config, trusted, &rt, calls)?;
    Ok((volume, rt))
}

impl Volume {
    /// Opens the volume of `backing`: see the module documentation.
    pub fn open(
        backing: &Path, trusted: &TrustedConfig, rt: &KmsRuntime, calls: &Calls,
    ) -> Result<Self, ConfigError> {
        Self::from_config(backing, VolumeConfig::load(backing)?, trusted, rt, calls)
    }

    /// [`open`](Self::open) with the configuration already read from
    /// `backing` (not yet authenticated: that happens here).
    pub fn from_config(
        backing: &Path, config: VolumeConfig, trusted: &TrustedConfig, rt: &KmsRuntime,
        calls: &Calls,
    ) -> Result<Self, ConfigError> {
        let path = VolumeConfig::path(backing);
        // Only the root key before the MAC is checked: until then the
        // configuration's other keys are the backing directory's say.
        let root_spec = &config.root().key;
        let root_key = connect(root_spec, trusted, rt, calls)?;
        let wrapped = config.wrapped_volume_key()?;
        let volume_key = rt
            .block_on(root_key.unwrap(&wrapped, &config.volume_key_context()))
            .map_err(|e| unwrap_error(e, &path, root_spec))?;
        config.verify(&volume_key, &path)?;
        let mut connected = HashMap::from([(root_spec.clone(), root_key)]);
        connect_all(&config, trusted, rt, calls, &mut connected)?;
        Self::assemble(backing, config, volume_key, connected)
    }

    /// Makes `backing` a new volume with `policies` (one for "/"): a random
    /// volume ID and volume key, the key wrapped by the root policy's key,
    /// the configuration sealed and written. `legacy_v1_files` for an
    /// upgraded volume whose files may still be format 1.
    pub fn create(
        backing: &Path, trusted: &TrustedConfig, rt: &KmsRuntime, block_size: u64,
        policies: Vec<Policy>, legacy_v1_files: bool,
    ) -> Result<Self, ConfigError> {
        let mut config = VolumeConfig {
            format_version: CONFIG_FORMAT,
            volume_id: hex::encode(crate::crypto::random_file_id()),
            block_size,
            legacy_v1_files,
            policies,
            volume_key: Default::default(),
            mac: String::new(),
        };
        let mut connected = HashMap::new();
        connect_all(&config, trusted, rt, &Calls::Once, &mut connected)?;
        let volume_key = Dek::generate();
        let root_key = &connected[&config.root().key];
        let wrapped = rt
            .block_on(root_key.wrap(&volume_key, &config.volume_key_context()))
            .map_err(|e| ConfigError::Connect(e.into()))?;
        config.set_wrapped_volume_key(&wrapped);
        config.seal(&volume_key);
        config.save(backing, true)?;
        Self::assemble(backing, config, volume_key, connected)
    }

    fn assemble(
        backing: &Path, config: VolumeConfig, volume_key: Dek,
        connected: HashMap<KeySpec, Arc<dyn KeyProvider>>,
    ) -> Result<Self, ConfigError> {
        let store = BackingKeyStore::open(backing).map_err(|source| ConfigError::Io {
            path: backing.to_owned(),
            source,
        })?;
        let intermediate = Arc::new(IntermediateKeyRegistry::new(config.id(), Arc::new(store)));
        Ok(Self {
            backing: backing.to_owned(),
            policies: active_policies(&config, &connected, &intermediate),
            config,
            volume_key,
            connected,
            intermediate,
        })
    }

    /// Logs the intermediate keys' generations and KMS unwraps to `audit`
    /// (file operations are logged by `FileKeys`).
    pub fn set_audit_log(&self, audit: Arc<crate::audit::AuditLog>) {
        self.intermediate.set_audit_log(audit);
    }

    pub fn id(&self) -> VolumeId {
        self.config.id()
    }

    /// The policy governing mount-relative `path`, connected.
    pub fn policy_for(&self, path: &str) -> &ActivePolicy {
        &self.policies[crate::policy::governing(&self.config.policies, path)]
    }

    /// Sets the policy of `policy.dir`. Files already there keep opening:
    /// the key that governed them before (the old policy's, or the
    /// enclosing one's when the directory had none) joins `retired`. When
    /// the root key changes, the volume key is wrapped again under the new
    /// one (which needs that key's KMS). The configuration is sealed again
    /// and saved. Without `connect`, a new non-root key is not connected
    /// (saving a policy for a KMS that is down), and `policies` keeps
    /// describing the volume as it was.
    pub fn set_policy(
        &mut self, mut policy: Policy, trusted: &TrustedConfig, rt: &KmsRuntime, connect_keys: bool,
    ) -> Result<(), ConfigError> {
        let before = self.config.policy_for(&policy.dir).clone();
        if before.dir == policy.dir {
            policy.retire(before.keys());
            let i = self
                .config
                .policies
                .iter()
                .position(|p| p.dir == policy.dir)
                .expect("found above");
            self.config.policies[i] = policy.clone();
        } else {
            policy.retire(before.keys());
            self.config.policies.push(policy.clone());
            self.config.policies.sort_by(|a, b| a.dir.cmp(&b.dir));
        }
        let new_root_key = policy.dir == "/" && policy.key != before.key;
        for spec in policy.keys() {
            if (connect_keys || new_root_key) && !self.connected.contains_key(spec) {
                let key = connect(spec, trusted, rt, &Calls::Once)?;
                self.connected.insert(spec.clone(), key);
            }
        }
        if new_root_key {
            let new_root = &self.connected[&policy.key];
            let wrapped = rt
                .block_on(new_root.wrap(&self.volume_key, &self.config.volume_key_context()))
                .map_err(|e| ConfigError::Connect(e.into()))?;
            self.config.set_wrapped_volume_key(&wrapped);
        }
        self.save()
    }

    /// Removes the policy of `dir` (never the root's); returns false when
    /// there was none. Its files fall to the enclosing policy, which keeps
    /// accepting their keys (they join its `retired`).
    pub fn unset_policy(&mut self, dir: &str) -> Result<bool, ConfigError> {
        if dir == "/" {
            return Ok(false);
        }
        let Some(i) = self.config.policies.iter().position(|p| p.dir == dir) else {
            return Ok(false);
        };
        let gone = self.config.policies.remove(i);
        let parent = crate::policy::governing(&self.config.policies, dir);
        self.config.policies[parent].retire(gone.keys());
        self.save()?;
        Ok(true)
    }

    /// Seals the configuration again and writes it; the connected policies
    /// follow it when every key is connected.
    fn save(&mut self) -> Result<(), ConfigError> {
        self.config.seal(&self.volume_key);
        self.config.save(&self.backing, false)?;
        let all_connected = self
            .config
            .policies
            .iter()
            .all(|p| p.keys().all(|k| self.connected.contains_key(k)));
        if all_connected {
            self.policies = active_policies(&self.config, &self.connected, &self.intermediate);
        }
        Ok(())
    }

    /// Wraps the volume key again under the root policy's current key, when
    /// its wrap is under another key, or under a version other than
    /// `current_version` (`None`: the KMS does not name versions), or
    /// `force`; then seals and saves the configuration. This is the
    /// volume's own `rewrap`: once it is done, the root key's older
    /// versions are no longer needed to open the volume. The caller holds
    /// the configuration's lock. Returns whether it wrapped.
    pub fn rewrap_volume_key(
        &mut self, rt: &KmsRuntime, current_version: Option<&str>, force: bool,
    ) -> Result<bool, ConfigError> {
        let wrapped = self.config.wrapped_volume_key()?;
        let root = self.policy_for("/");
        let same_key = wrapped.key_ref.provider == root.policy.key.provider
            && root.current.handles(&wrapped.key_ref);
        let same_version = current_version.is_none_or(|v| v == wrapped.key_ref.key_version);
        if same_key && same_version && !force {
            return Ok(false);
        }
        let new = rt
            .block_on(
                root.current
                    .wrap(&self.volume_key, &self.config.volume_key_context()),
            )
            .map_err(|e| ConfigError::Connect(e.into()))?;
        self.config.set_wrapped_volume_key(&new);
        self.save()?;
        Ok(true)
    }

    /// Reads the configuration again if it changed since it was read (a
    /// `kmsfs policy set/unset` while mounted): checked under the same
    /// volume key (a configuration of another volume, or one not sealed
    /// with this volume's key, is refused), new keys connected through the
    /// trusted configuration as it is now. Returns whether anything changed.
    pub fn reload(
        &mut self, trusted: &TrustedConfig, rt: &KmsRuntime, calls: &Calls,
    ) -> Result<bool, ConfigError> {
        let path = VolumeConfig::path(&self.backing);
        let config = VolumeConfig::load(&self.backing)?;
        if config == self.config {
            return Ok(false);
        }
        if config.volume_id != self.config.volume_id {
            return Err(ConfigError::Tampered(path));
        }
        config.verify(&self.volume_key, &path)?;
        connect_all(&config, trusted, rt, calls, &mut self.connected)?;
        self.policies = active_policies(&config, &self.connected, &self.intermediate);
        self.config = config;
        Ok(true)
    }

    /// The configuration and its connected policies, without the volume
    /// key: what a mount keeps.
    pub fn into_parts(self) -> (VolumeConfig, Vec<ActivePolicy>) {
        (self.config, self.policies)
    }
}

/// The connected policies of `config`: each key through `intermediate`, so
/// that DEKs under intermediate keys unwrap with every key, and a policy in
/// directory mode wraps new files under one. Only the current key does:
/// recipients (break-glass) stay per file, so recovery through them never
/// depends on the backing directory's key objects.
fn active_policies(
    config: &VolumeConfig, connected: &HashMap<KeySpec, Arc<dyn KeyProvider>>,
    intermediate: &IntermediateKeyRegistry,
) -> Vec<ActivePolicy> {
    config
        .policies
        .iter()
        .map(|p| {
            let keys: Vec<_> = p
                .keys()
                .enumerate()
                .map(|(i, k)| {
                    let rotation = (i == 0 && p.key_mode == KeyMode::Directory).then(|| {
                        let default = Rotation::default();
                        Rotation {
                            max_files: p
                                .intermediate_max_files
                                .unwrap_or(default.max_files)
                                .clamp(1, MAX_FILES_CAP),
                            max_age: p.intermediate_rotate_after.unwrap_or(default.max_age),
                        }
                    });
                    intermediate.provider(k, connected[k].clone(), rotation)
                })
                .collect();
            ActivePolicy {
                policy: p.clone(),
                current: keys[0].clone(),
                keys,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{CipherSuite, KeyRef};
    use crate::kms::testing::FakeKms;

    /// A policy of `dir` whose only key is `id` of provider `provider`.
    fn active(dir: &str, provider: &str, id: &str) -> ActivePolicy {
        let key = NamedKey::wrap(provider, Arc::new(FakeKms::new(id)));
        ActivePolicy {
            policy: Policy::new(
                dir.into(),
                CipherSuite::Aes256Gcm,
                true,
                KeySpec {
                    provider: provider.into(),
                    id: id.into(),
                    version: None,
                },
            ),
            current: key.clone(),
            keys: vec![key],
        }
    }

    /// Two providers of one kind holding a key of one name (two keyrings
    /// with "default", say) are different keys: a format 2 reference by
    /// the kind, which would match both, matches neither.
    #[test]
    fn format_2_references_match_by_provider_name_only() {
        let hr = active("/hr", "local-2", "default");
        let by = |provider: &str| KeyRef {
            provider: provider.into(),
            key_id: "default".into(),
            key_version: "1".into(),
        };
        assert!(hr.key_for(&by("local-2"), false).is_some());
        assert!(hr.key_for(&by("local"), false).is_none());
        assert!(hr.key_for(&by("fake"), false).is_none(), "the kind");
        // Format 1 headers recorded only the kind.
        assert!(hr.key_for(&by("fake"), true).is_some());
        assert!(hr.key_for(&by("local"), true).is_none());
    }
}
