//! Secrets that deserve the name: present where they are needed, long enough, not copied from an
//! example. Checked at start-up, at every reload and by `check`.

use super::Config;

/// Minimum lengths of the secrets (SPEC §9).
pub const MIN_ADMIN_TOKEN_BYTES: usize = 24;
pub const MIN_HMAC_SECRET_BYTES: usize = 32;
/// Words that mark a secret copied from an example rather than generated. Only unmistakable
/// ones: a generated secret may well hold `secret` or `dev` (`test-jwt-secret-...` is a
/// test's own, and stopping the gateway for it would be the check's fault).
pub const PLACEHOLDER_WORDS: [&str; 6] = [
    "change-me",
    "changeme",
    "replace-me",
    "replaceme",
    "your-secret",
    "example",
];

/// What is wrong with a secret: it stops `run` and a reload (`check` too, unless it is only
/// missing: `check` may run where the secrets are not).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretProblem {
    #[error("the admin token is not set: export {var}")]
    AdminTokenMissing { var: String },
    #[error("jwt.algorithms allows HMAC but the secret is not set: export {var}")]
    HmacSecretMissing { var: String },
    #[error("{what} ({var}) contains the placeholder \"{word}\": generate one, e.g. $(openssl rand -hex 32)")]
    Placeholder {
        what: &'static str,
        var: String,
        word: &'static str,
    },
    #[error("the admin token ({var}) is no header value a request can carry: it starts or ends with whitespace or holds a control byte (a trailing newline from a file?)")]
    AdminTokenUnsendable { var: String },
    #[error("{what} ({var}) is too short: at least {min} bytes, got {got}")]
    TooShort {
        what: &'static str,
        var: String,
        min: usize,
        got: usize,
    },
}

/// Why a secret is not one, if it is not.
fn weak_secret(what: &'static str, var: &str, value: &str, min: usize) -> Option<SecretProblem> {
    let lower = value.to_ascii_lowercase();
    if let Some(word) = PLACEHOLDER_WORDS.iter().find(|w| lower.contains(*w)) {
        return Some(SecretProblem::Placeholder {
            what,
            var: var.to_owned(),
            word,
        });
    }
    (value.len() < min).then(|| SecretProblem::TooShort {
        what,
        var: var.to_owned(),
        min,
        got: value.len(),
    })
}

impl Config {
    /// Secrets that are set but are no secrets: too short, or a placeholder. They stop `run`,
    /// a reload and `check`.
    pub fn weak_secrets(&self) -> Vec<SecretProblem> {
        let mut weak = Vec::new();
        if let Some(token) = &self.admin.token {
            // Header values arrive trimmed and hold no control byte: such a token could never
            // be matched, and every admin call would be refused without a word as to why.
            if token.trim() != token || token.bytes().any(|b| b.is_ascii_control()) {
                weak.push(SecretProblem::AdminTokenUnsendable {
                    var: self.admin.token_env.clone(),
                });
            }
            weak.extend(weak_secret(
                "the admin token",
                &self.admin.token_env,
                token,
                MIN_ADMIN_TOKEN_BYTES,
            ));
        }
        if let (Some(secret), true) = (&self.jwt.secret, self.jwt.allows_hmac()) {
            weak.extend(weak_secret(
                "the JWT HMAC secret",
                &self.jwt.secret_env,
                secret,
                MIN_HMAC_SECRET_BYTES,
            ));
        }
        weak
    }

    /// Everything about the secrets that stops `run` and a reload: missing or weak.
    pub fn secret_problems(&self) -> Vec<SecretProblem> {
        let mut problems = self.missing_secrets();
        problems.extend(self.weak_secrets());
        problems
    }

    /// Problems that stop `run` but not `check`: missing secrets.
    pub fn missing_secrets(&self) -> Vec<SecretProblem> {
        let mut missing = Vec::new();
        if self.admin.token.is_none() {
            missing.push(SecretProblem::AdminTokenMissing {
                var: self.admin.token_env.clone(),
            });
        }
        if self.jwt.allows_hmac() && self.jwt.secret.is_none() {
            missing.push(SecretProblem::HmacSecretMissing {
                var: self.jwt.secret_env.clone(),
            });
        }
        missing
    }
}
