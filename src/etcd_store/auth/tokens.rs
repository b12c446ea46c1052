//! Auth tokens: etcd's `simple` and `jwt` providers (`--auth-token`).
//!
//! - **simple** (the default): an opaque random string. The member that checked the
//!   password proposes it through Raft ([`super::AuthOp::Authenticate`]) so every
//!   member knows it; each member keeps it in memory and expires it after
//!   `--auth-token-ttl` seconds without use, as etcd does. Tokens do not survive a
//!   restart (clients re-authenticate on "invalid auth token"). The table is
//!   bounded by [`SIMPLE_TOKENS_MAX`].
//! - **jwt**: a signed token (`username`, `revision`, `exp` claims) that any member
//!   holding the public key verifies without shared state.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Live simple tokens a member keeps. Past this, expired tokens are dropped and
/// then the ones closest to expiry: a flood of logins cannot exhaust memory.
pub const SIMPLE_TOKENS_MAX: usize = 100_000;

/// Length of the random part of a simple token (etcd's).
const SIMPLE_TOKEN_CHARS: usize = 16;

/// The replicated simple-token table of one member.
pub struct SimpleTokens {
    ttl: Duration,
    /// token → (user, expiry). A std mutex: held for map operations only.
    tokens: Mutex<HashMap<String, (String, Instant)>>,
}

impl SimpleTokens {
    pub fn new(ttl: Duration) -> Self {
        SimpleTokens { ttl, tokens: Mutex::default() }
    }

    /// A fresh random token; `seq` (the proposer's counter) keeps it unique.
    pub fn generate(seq: u64) -> String {
        const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
        let mut rng = rand::rng();
        let random: String =
            (0..SIMPLE_TOKEN_CHARS).map(|_| char::from(LETTERS[rng.random_range(0..LETTERS.len())])).collect();
        format!("{random}.{seq}")
    }

    pub fn assign(&self, token: &str, user: &str) {
        let now = Instant::now();
        let mut map = self.tokens.lock().expect("token table poisoned");
        if map.len() >= SIMPLE_TOKENS_MAX {
            map.retain(|_, (_, exp)| *exp > now);
        }
        if map.len() >= SIMPLE_TOKENS_MAX {
            if let Some(oldest) = map.iter().min_by_key(|(_, (_, exp))| *exp).map(|(k, _)| k.clone()) {
                map.remove(&oldest);
            }
        }
        map.insert(token.to_string(), (user.to_string(), now + self.ttl));
    }

    /// The user of a live token, extending its life (etcd resets the TTL on use).
    pub fn check(&self, token: &str) -> Option<String> {
        let now = Instant::now();
        let mut map = self.tokens.lock().expect("token table poisoned");
        match map.get_mut(token) {
            Some((user, exp)) if *exp > now => {
                *exp = now + self.ttl;
                Some(user.clone())
            }
            Some(_) => {
                map.remove(token);
                None
            }
            None => None,
        }
    }

    pub fn invalidate_user(&self, user: &str) {
        self.tokens.lock().expect("token table poisoned").retain(|_, (u, _)| u != user);
    }

    pub fn clear(&self) {
        self.tokens.lock().expect("token table poisoned").clear();
    }
}

/// `--auth-token`: which provider issues tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenConfig {
    Simple,
    Jwt(JwtConfig),
}

/// `--auth-token jwt,pub-key=…,priv-key=…,sign-method=…,ttl=…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtConfig {
    pub pub_key: PathBuf,
    pub priv_key: Option<PathBuf>,
    pub sign_method: String,
    pub ttl: Duration,
}

/// The signing algorithm etcd names `name` (`sign-method=`).
pub fn algorithm(name: &str) -> Result<jsonwebtoken::Algorithm, String> {
    use jsonwebtoken::Algorithm::*;
    Ok(match name {
        "RS256" => RS256,
        "RS384" => RS384,
        "RS512" => RS512,
        "PS256" => PS256,
        "PS384" => PS384,
        "PS512" => PS512,
        "ES256" => ES256,
        "ES384" => ES384,
        _ => return Err(format!("unsupported JWT sign-method {name:?}")),
    })
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    username: String,
    revision: u64,
    exp: u64,
}

/// Signs and verifies JWT tokens with the configured key pair.
pub struct JwtTokens {
    algorithm: jsonwebtoken::Algorithm,
    encoding: Option<jsonwebtoken::EncodingKey>,
    decoding: jsonwebtoken::DecodingKey,
    ttl: Duration,
}

impl JwtTokens {
    /// Loads the keys named by `config`; a member without `priv-key` only verifies.
    pub fn load(config: &JwtConfig) -> Result<JwtTokens, String> {
        let algorithm = algorithm(&config.sign_method)?;
        let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("read {}: {e}", p.display()));
        let is_ec = matches!(algorithm, jsonwebtoken::Algorithm::ES256 | jsonwebtoken::Algorithm::ES384);
        let decoding = if is_ec {
            jsonwebtoken::DecodingKey::from_ec_pem(&read(&config.pub_key)?)
        } else {
            jsonwebtoken::DecodingKey::from_rsa_pem(&read(&config.pub_key)?)
        }
        .map_err(|e| format!("JWT public key {}: {e}", config.pub_key.display()))?;
        let encoding = match &config.priv_key {
            None => None,
            Some(p) => Some(
                if is_ec {
                    jsonwebtoken::EncodingKey::from_ec_pem(&read(p)?)
                } else {
                    jsonwebtoken::EncodingKey::from_rsa_pem(&read(p)?)
                }
                .map_err(|e| format!("JWT private key {}: {e}", p.display()))?,
            ),
        };
        Ok(JwtTokens { algorithm, encoding, decoding, ttl: config.ttl })
    }

    pub fn sign(&self, user: &str, auth_revision: u64) -> Result<String, String> {
        let key = self.encoding.as_ref().ok_or("this member has no JWT private key (priv-key=)")?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let claims = Claims { username: user.to_string(), revision: auth_revision, exp: (now + self.ttl).as_secs() };
        jsonwebtoken::encode(&jsonwebtoken::Header::new(self.algorithm), &claims, key).map_err(|e| e.to_string())
    }

    /// The user named by a valid, unexpired token.
    pub fn verify(&self, token: &str) -> Option<String> {
        let validation = jsonwebtoken::Validation::new(self.algorithm);
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation).ok().map(|d| d.claims.username)
    }
}
