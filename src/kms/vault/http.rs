//! One transit request: sending it with the current token (logging in again
//! when Vault rejects a login token), and what a failed answer means.

use std::error::Error as StdError;

use serde_json::Value;
use zeroize::Zeroizing;

use super::VaultKms;
use crate::kms::support::{clean_message, error_chain, Direction};
use crate::kms::KmsError;

/// The operation a request performs, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    Encrypt,
    Decrypt,
    ReadKey,
    /// `POST {mount}/keys/{key}/rotate`: a new key version.
    Rotate,
}

impl Op {
    pub(super) fn direction(self) -> Direction {
        match self {
            Op::Decrypt => Direction::Unwrap,
            Op::Encrypt | Op::ReadKey | Op::Rotate => Direction::Wrap,
        }
    }

    /// The policy capability the request needs on its path.
    pub(super) fn capability(self) -> &'static str {
        match self {
            Op::ReadKey => "read",
            Op::Encrypt | Op::Decrypt | Op::Rotate => "update",
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Op::Encrypt => "transit encrypt",
            Op::Decrypt => "transit decrypt",
            Op::ReadKey => "transit keys read",
            Op::Rotate => "transit key rotate",
        }
    }
}

/// The JSON answer of one request.
pub(super) struct Answer {
    pub(super) status: u16,
    pub(super) body: Value,
}

impl Answer {
    /// The answer's `errors`, cleaned, on one line.
    fn errors(&self) -> String {
        match self.body.get("errors").and_then(Value::as_array) {
            Some(a) => clean_message(
                &a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            None => String::new(),
        }
    }

    pub(super) fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Whether any cause in the chain is an I/O timeout.
fn chain_is_timeout(e: &(dyn StdError + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(s) = cur {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        cur = s.source();
    }
    false
}

impl VaultKms {
    pub(super) fn transport_error(&self, e: &(dyn StdError + 'static)) -> KmsError {
        if chain_is_timeout(e) {
            return KmsError::Timeout {
                kms: self.kms(),
                seconds: self.cfg.transport_timeout().as_secs(),
            };
        }
        KmsError::Unreachable {
            kms: self.kms(),
            detail: error_chain(e),
        }
    }

    /// One HTTP request with `token`; `body` None = GET.
    pub(super) async fn send(
        &self, path: &str, body: Option<&Value>, token: &str,
    ) -> Result<Answer, KmsError> {
        let url = format!("{}/v1/{}", self.base, path);
        let http = &self.client.http.http;
        let mut rb = match body {
            None => http.get(&url),
            Some(b) => http
                .post(&url)
                .header("Content-Type", "application/json")
                .body(serde_json::to_vec(b).expect("JSON serializes")),
        };
        rb = rb
            .header("X-Vault-Token", token)
            .header("X-Vault-Request", "true");
        if let Some(ns) = self.cfg.namespace.as_deref().filter(|n| !n.is_empty()) {
            rb = rb.header("X-Vault-Namespace", ns);
        }
        // (Spelled out without `?`: reqwest is not a direct dependency, so
        // its error type cannot be named.)
        let answer = match rb.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                match resp.bytes().await {
                    Ok(bytes) => Ok((status, Zeroizing::new(bytes.to_vec()))),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        let (status, bytes) = answer.map_err(|e| self.transport_error(&e))?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(&bytes) {
                Ok(v) => v,
                Err(_) if status >= 500 || status == 429 => Value::Null,
                Err(_) => {
                    return Err(KmsError::Unreachable {
                        kms: self.kms(),
                        detail: format!(
                        "HTTP {status} with a body that is not JSON: is {} a Vault/OpenBao server?",
                        self.base
                    ),
                    })
                }
            }
        };
        Ok(Answer { status, body })
    }

    /// A request with the current token; on a rejected login token, logs in
    /// again once (AppRole/Kubernetes). Returns the answer and whether the
    /// token was found invalid (403 and lookup-self fails too).
    pub(super) async fn request(
        &self, path: &str, body: Option<&Value>,
    ) -> Result<Answer, KmsError> {
        let (token, stale) = self.current_token();
        let token = if stale {
            self.relogin(&token).await?;
            self.current_token().0
        } else {
            token
        };
        let ans = self.send(path, body, &token).await?;
        if ans.status == 403 && self.uses_login() && !self.token_valid(&token).await? {
            self.relogin(&token).await?;
            let token = self.current_token().0;
            return self.send(path, body, &token).await;
        }
        Ok(ans)
    }

    /// Classifies a non-2xx answer to `op` with no per-item results.
    pub(super) async fn classify(&self, op: Op, ans: &Answer, version: Option<&str>) -> KmsError {
        let errors = ans.errors();
        let detail = if errors.is_empty() {
            format!("HTTP {}", ans.status)
        } else {
            format!("HTTP {}: {errors}", ans.status)
        };
        match ans.status {
            401 | 403 => {
                let token = self.current_token().0;
                match self.token_valid(&token).await {
                    Ok(false) => KmsError::AuthFailed {
                        kms: self.kms(),
                        detail: format!("the token is invalid or expired ({detail})"),
                    },
                    _ => KmsError::PermissionDenied {
                        kms: self.kms(),
                        operation: op.name(),
                        detail: format!(
                            "{detail} on {path} (the token's policy needs `{cap}` on {path})",
                            path = self.op_path(op),
                            cap = op.capability()
                        ),
                    },
                }
            }
            404 if matches!(op, Op::ReadKey | Op::Rotate) => KmsError::KeyNotFound {
                kms: self.kms(),
                key: self.key_id(),
            },
            429 | 500..=599 => KmsError::Unreachable {
                kms: self.kms(),
                detail: format!("{} failed: {detail}", op.name()),
            },
            _ => self.classify_message(op, &errors, &detail, version),
        }
    }

    /// Classifies a transit error message (whole request or one batch item).
    pub(super) fn classify_message(
        &self, op: Op, msg: &str, detail: &str, version: Option<&str>,
    ) -> KmsError {
        let m = msg.to_ascii_lowercase();
        if m.contains("key not found")
            || m.contains("no existing key named")
            || m.contains("unsupported path")
        {
            KmsError::KeyNotFound {
                kms: self.kms(),
                key: self.key_id(),
            }
        } else if m.contains("disallowed by policy")
            || m.contains("too old")
            || m.contains("min_decryption_version")
            || m.contains("minimum decryption version")
        {
            KmsError::KeyVersionUnusable {
                kms: self.kms(),
                key: self.key_id(),
                version: version.unwrap_or("?").to_owned(),
                detail: format!(
                    "{detail} (the key's min_decryption_version excludes it; lower it or rewrap the file)"
                ),
            }
        } else if m.contains("high complexity") || m.contains("maximum number of strings") {
            KmsError::Config(format!(
                "{}: the server refused a {} request as too large ({detail}); \
                 its listener limits (max_request_json_strings) are below kmsfs's batches",
                self.kms(),
                op.name()
            ))
        } else if m.contains("context") && m.contains("deriv") {
            KmsError::Config(format!(
                "{}: transit key {} needs a derivation context ({detail}); \
                 its derived setting changed since kmsfs connected, remount",
                self.kms(),
                self.key_id()
            ))
        } else if op == Op::Decrypt {
            KmsError::UnwrapFailed {
                kms: self.kms(),
                detail: format!("{} failed: {detail}", op.name()),
            }
        } else {
            KmsError::Config(format!("{}: {} failed: {detail}", self.kms(), op.name()))
        }
    }

    pub(super) fn op_path(&self, op: Op) -> String {
        let m = self.cfg.mount.trim_matches('/');
        let k = &self.cfg.key;
        match op {
            Op::Encrypt => format!("{m}/encrypt/{k}"),
            Op::Decrypt => format!("{m}/decrypt/{k}"),
            Op::ReadKey => format!("{m}/keys/{k}"),
            Op::Rotate => format!("{m}/keys/{k}/rotate"),
        }
    }
}
