//! Bearer tokens from `api_tokens_file`: one `name role sha256-hex` line per token (`#` starts a
//! comment). Only the SHA-256 of a token is stored, so the file gives nothing away; a request's
//! token is hashed and looked up. The file is read again when it changes, so that adding or
//! revoking a token needs no restart; a file that no longer parses revokes every token (fail
//! closed: recordings are personal data) until it is fixed.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use axum::{extract::FromRequestParts, http::request::Parts};
use sha2::{Digest, Sha256};

use super::{api::ApiError, HttpError, HttpState};

/// What a token may do: `admin` includes `read`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Read,
    Admin,
}

/// Who made a request (the token's name, for the audit log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// The tokens, by the SHA-256 of each (lower-case hex).
#[derive(Debug, Default)]
pub struct Tokens(HashMap<String, Caller>);

impl Tokens {
    pub fn load(path: &Path) -> Result<Self, HttpError> {
        let err = |reason: String| HttpError::Tokens {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Self::parse(&text).map_err(err)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut tokens = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [name, role, hash] = fields[..] else {
                return Err(format!(
                    "line {}: want `name role sha256-hex`, got {} fields",
                    n + 1,
                    fields.len()
                ));
            };
            let role = match role {
                "read" => Role::Read,
                "admin" => Role::Admin,
                other => {
                    return Err(format!(
                        "line {}: role {other:?} is not read or admin",
                        n + 1
                    ))
                }
            };
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "line {}: {hash:?} is not a SHA-256 in hex (64 digits)",
                    n + 1
                ));
            }
            let caller = Caller {
                name: name.to_string(),
                role,
            };
            if tokens.insert(hash.to_ascii_lowercase(), caller).is_some() {
                return Err(format!("line {}: the same token twice", n + 1));
            }
        }
        Ok(Self(tokens))
    }

    /// The caller a presented token belongs to.
    fn caller(&self, token: &str) -> Option<&Caller> {
        self.0.get(&sha256_hex(token.as_bytes()))
    }

    /// Checks an `Authorization` header value: 401 without a known bearer token, 403 when the
    /// token's role is below `needed`.
    pub fn authorize(&self, header: Option<&str>, needed: Role) -> Result<Caller, ApiError> {
        let header = header.ok_or(ApiError::Unauthorized("a bearer token is required"))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .ok_or(ApiError::Unauthorized(
                "the Authorization header is not `Bearer <token>`",
            ))?;
        let caller = self
            .caller(token)
            .ok_or(ApiError::Unauthorized("unknown token"))?;
        if caller.role < needed {
            return Err(ApiError::Forbidden(format!(
                "token {} has role read; this needs admin",
                caller.name
            )));
        }
        Ok(caller.clone())
    }
}

/// Identifies one version of the file: modification time, size, inode.
type Version = (i64, i64, u64, u64);

fn version(path: &Path) -> std::io::Result<Version> {
    let m = std::fs::metadata(path)?;
    Ok((m.mtime(), m.mtime_nsec(), m.len(), m.ino()))
}

/// `api_tokens_file`, re-read when it changes.
#[derive(Debug, Default)]
pub struct TokenFile {
    path: Option<PathBuf>,
    current: RwLock<(Option<Version>, Arc<Tokens>)>,
}

impl TokenFile {
    /// Reads the file (None: no tokens); an unreadable or bad file stops the start.
    pub fn open(path: Option<&Path>) -> Result<Self, HttpError> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let version = version(path).ok();
        let tokens = Tokens::load(path)?;
        Ok(Self {
            path: Some(path.to_path_buf()),
            current: RwLock::new((version, Arc::new(tokens))),
        })
    }

    /// The tokens in force (one stat per call, a read when the file changed).
    pub fn tokens(&self) -> Arc<Tokens> {
        let current = || {
            let guard = self.current.read().unwrap_or_else(|e| e.into_inner());
            (guard.0, guard.1.clone())
        };
        let Some(path) = &self.path else {
            return current().1;
        };
        let now = version(path).ok();
        let (seen, tokens) = current();
        if now == seen {
            return tokens;
        }
        let mut guard = self.current.write().unwrap_or_else(|e| e.into_inner());
        let tokens = match now.map(|_| Tokens::load(path)) {
            Some(Ok(tokens)) => {
                tracing::info!(file = %path.display(), tokens = tokens.0.len(), "API tokens reloaded");
                tokens
            }
            Some(Err(e)) => {
                tracing::error!(error = %e, "API tokens file unusable: every token refused until it is fixed");
                Tokens::default()
            }
            None => {
                tracing::error!(file = %path.display(), "API tokens file gone: every token refused");
                Tokens::default()
            }
        };
        *guard = (now, Arc::new(tokens));
        guard.1.clone()
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn authorize(parts: &Parts, state: &HttpState, needed: Role) -> Result<Caller, ApiError> {
    let header = match parts.headers.get(axum::http::header::AUTHORIZATION) {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::Unauthorized("the Authorization header is not text"))?,
        ),
        None => None,
    };
    state.tokens.tokens().authorize(header, needed)
}

/// A request with a token of role `read` or `admin` (extractor).
pub struct Reader(pub Caller);

/// A request with a token of role `admin` (extractor).
pub struct Admin(pub Caller);

impl FromRequestParts<Arc<HttpState>> for Reader {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<HttpState>,
    ) -> Result<Self, ApiError> {
        authorize(parts, state, Role::Read).map(Reader)
    }
}

impl FromRequestParts<Arc<HttpState>> for Admin {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<HttpState>,
    ) -> Result<Self, ApiError> {
        authorize(parts, state, Role::Admin).map(Admin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens::parse(&format!(
            "# name role sha256\nqa read {}\nops admin {}  # the on-call team\n\n",
            sha256_hex(b"qa-secret"),
            sha256_hex(b"ops-secret").to_uppercase()
        ))
        .unwrap()
    }

    #[test]
    fn roles_and_tokens_decide_401_or_403() {
        let t = tokens();
        let qa = t.authorize(Some("Bearer qa-secret"), Role::Read).unwrap();
        assert_eq!((qa.name.as_str(), qa.role), ("qa", Role::Read));
        assert!(matches!(
            t.authorize(Some("Bearer qa-secret"), Role::Admin),
            Err(ApiError::Forbidden(_))
        ));
        // Upper-case hex in the file matches too.
        let ops = t.authorize(Some("Bearer ops-secret"), Role::Admin).unwrap();
        assert_eq!(ops.name, "ops");
        for header in [
            None,
            Some("Bearer nope"),
            Some("Basic cWE6eA=="),
            Some("qa-secret"),
        ] {
            assert!(
                matches!(
                    t.authorize(header, Role::Read),
                    Err(ApiError::Unauthorized(_))
                ),
                "{header:?}"
            );
        }
    }

    #[test]
    fn bad_lines_are_named() {
        let h = sha256_hex(b"x");
        for (text, want) in [
            (format!("a read {h} extra"), "line 1"),
            (format!("a owner {h}"), "owner"),
            ("a read abc".to_string(), "SHA-256"),
            (format!("a read {h}\nb admin {h}"), "line 2: the same token"),
        ] {
            let err = Tokens::parse(&text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }
}
