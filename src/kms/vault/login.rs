//! The Vault token: from VAULT_TOKEN (or the embedder), or from an
//! AppRole/Kubernetes login that is renewed before its lease runs out and
//! when Vault rejects it.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use super::{VaultAuth, VaultKms};
use crate::kms::support::{clean_message, error_chain};
use crate::kms::KmsError;

/// The Vault token in use, and when a login token should be renewed.
pub(super) struct TokenState {
    token: Arc<Zeroizing<String>>,
    /// For AppRole/Kubernetes logins: log in again after this instant.
    refresh_at: Option<Instant>,
}

impl TokenState {
    /// No token yet: [`VaultKms::login`] gets the first.
    pub(super) fn none() -> Self {
        TokenState {
            token: Arc::new(Zeroizing::new(String::new())),
            refresh_at: None,
        }
    }
}

/// A secret from the file `path`, trimmed; `what` names the file in the
/// error (never its content).
fn secret_from_file(path: &Path, what: &str) -> Result<Zeroizing<String>, KmsError> {
    let text =
        Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            KmsError::Config(format!("cannot read {what} {}: {e}", path.display()))
        })?);
    Ok(Zeroizing::new(text.trim().to_owned()))
}

/// A secret from the environment variable `var`, trimmed; None if it is
/// unset or blank.
fn secret_from_env(var: &str) -> Option<Zeroizing<String>> {
    let value = Zeroizing::new(std::env::var(var).ok()?);
    let trimmed = value.trim();
    (!trimmed.is_empty()).then(|| Zeroizing::new(trimmed.to_owned()))
}

impl VaultKms {
    /// The token to send, and whether its login should be renewed first.
    pub(super) fn current_token(&self) -> (Arc<Zeroizing<String>>, bool) {
        let st = self.token.read().unwrap();
        let stale = st.refresh_at.is_some_and(|t| Instant::now() >= t);
        (st.token.clone(), stale)
    }

    /// Obtains a token by the configured method.
    pub(super) async fn login(&self) -> Result<TokenState, KmsError> {
        let auth_failed = |detail: String| KmsError::AuthFailed {
            kms: self.kms(),
            detail,
        };
        match &self.cfg.auth {
            VaultAuth::Token if self.token_override.is_some() => Ok(TokenState {
                token: Arc::new(self.token_override.clone().expect("checked")),
                refresh_at: None,
            }),
            VaultAuth::Token => match secret_from_env("VAULT_TOKEN") {
                Some(token) => Ok(TokenState {
                    token: Arc::new(token),
                    refresh_at: None,
                }),
                None => Err(KmsError::Config(format!(
                    "the vault provider (auth method token) reads its token from the VAULT_TOKEN \
                     environment variable, which is not set; set it for `kmsfs mount` ({})",
                    self.kms()
                ))),
            },
            VaultAuth::Approle {
                role_id,
                secret_id_file,
                mount,
            } => {
                let secret_id = match secret_id_file {
                    Some(f) => secret_from_file(f, "the AppRole secret ID file")?,
                    None => secret_from_env("VAULT_SECRET_ID").ok_or_else(|| {
                        KmsError::Config(
                            "AppRole login needs a secret ID: set VAULT_SECRET_ID or configure \
                             secret_id_file (--vault-secret-id-file)"
                                .into(),
                        )
                    })?,
                };
                let r =
                    vaultrs::auth::approle::login(&self.client, mount, role_id, &secret_id).await;
                self.login_result(r, &format!("AppRole login at auth/{mount}"), auth_failed)
            }
            VaultAuth::Kubernetes {
                role,
                jwt_file,
                mount,
            } => {
                let jwt = secret_from_file(jwt_file, "the Kubernetes service-account token")?;
                let r = vaultrs::auth::kubernetes::login(&self.client, mount, role, &jwt).await;
                self.login_result(
                    r,
                    &format!("Kubernetes login at auth/{mount} as role {role}"),
                    auth_failed,
                )
            }
        }
    }

    fn login_result(
        &self, r: Result<vaultrs::api::AuthInfo, vaultrs::error::ClientError>, what: &str,
        auth_failed: impl Fn(String) -> KmsError,
    ) -> Result<TokenState, KmsError> {
        use vaultrs::error::ClientError as CE;
        match r {
            Ok(info) => {
                let refresh_at = (info.lease_duration > 0)
                    .then(|| Instant::now() + Duration::from_secs(info.lease_duration * 3 / 4));
                Ok(TokenState {
                    token: Arc::new(Zeroizing::new(info.client_token)),
                    refresh_at,
                })
            }
            Err(CE::APIError { code, errors }) => {
                let detail = format!(
                    "{what} failed: HTTP {code}: {}",
                    clean_message(&errors.join("; "))
                );
                Err(if code < 500 {
                    auth_failed(detail)
                } else {
                    KmsError::Unreachable {
                        kms: self.kms(),
                        detail,
                    }
                })
            }
            Err(CE::RestClientError { source }) => Err(self.transport_error(&source)),
            Err(e) => Err(auth_failed(format!("{what} failed: {}", error_chain(&e)))),
        }
    }

    /// Logs in again (AppRole/Kubernetes) unless another task just did.
    pub(super) async fn relogin(&self, stale: &Arc<Zeroizing<String>>) -> Result<(), KmsError> {
        let _g = self.login_lock.lock().await;
        if !Arc::ptr_eq(&self.token.read().unwrap().token, stale) {
            return Ok(());
        }
        let st = self.login().await?;
        *self.token.write().unwrap() = st;
        Ok(())
    }

    pub(super) fn uses_login(&self) -> bool {
        !matches!(self.cfg.auth, VaultAuth::Token)
    }

    /// Whether `token` is valid (lookup-self, allowed by Vault's default policy).
    pub(super) async fn token_valid(&self, token: &str) -> Result<bool, KmsError> {
        let ans = self.send("auth/token/lookup-self", None, token).await?;
        Ok(ans.status != 403 && ans.status != 401)
    }
}
