//! Node identity: one ed25519 key per node; its public key is its id.
//!
//! The secret key is kept as PKCS#8 PEM (the format `openssl pkey` reads;
//! the file with mode 0600 is `shuyuan_service::keyfile`). The public key
//! has a copyable text form, 52 lowercase base32 characters, which
//! operators paste into `enroll` commands and agent configs.
//!
//! Invariant: every signature is domain-separated by a context string, and
//! every check uses `verify_strict`, so a signature made for one purpose can
//! never be replayed for another and malleable encodings are refused.

use std::fmt;
use std::str::FromStr;

use data_encoding::BASE32_NOPAD;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, spki::der::pem::LineEnding};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

/// Errors making, encoding or parsing identities.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("not an ed25519 PKCS#8 PEM private key: {0}")]
    Pem(String),
    #[error("cannot encode the key: {0}")]
    Encode(String),
    #[error("the operating system's random source failed: {0}")]
    Random(String),
    #[error("{0:?} is not a node key: expected 52 base32 characters (a-z, 2-7)")]
    BadNodeId(String),
    #[error("{0:?} is not a valid ed25519 public key")]
    InvalidPoint(String),
}

/// A node's secret signing key.
#[derive(Clone)]
pub struct NodeKey(SigningKey);

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeKey({})", self.id())
    }
}

impl NodeKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Result<Self, IdentityError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| IdentityError::Random(e.to_string()))?;
        Ok(Self::from_seed(seed))
    }

    /// The key with this 32-byte seed (deterministic; for tests and fixtures).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        NodeKey(SigningKey::from_bytes(&seed))
    }

    /// The public identity of this key.
    pub fn id(&self) -> NodeId {
        NodeId(self.0.verifying_key().to_bytes())
    }

    /// Signs `context || message`. `context` names the purpose of the
    /// signature and must end with a NUL byte so that no context is a prefix
    /// of another.
    pub fn sign(&self, context: &[u8], message: &[u8]) -> Signature {
        let mut buf = Vec::with_capacity(context.len() + message.len());
        buf.extend_from_slice(context);
        buf.extend_from_slice(message);
        self.0.sign(&buf)
    }

    /// A 32-byte secret for `context`, derived from this key: stable across
    /// restarts, and revealing nothing about the key itself.
    pub fn derive_secret(&self, context: &str) -> [u8; 32] {
        blake3::derive_key(context, self.0.as_bytes())
    }

    /// The private key as PKCS#8 DER (what rustls and rcgen take).
    pub fn to_pkcs8_der(&self) -> Result<Vec<u8>, IdentityError> {
        let doc = self
            .0
            .to_pkcs8_der()
            .map_err(|e| IdentityError::Encode(e.to_string()))?;
        Ok(doc.as_bytes().to_vec())
    }

    /// The private key as PKCS#8 PEM (what the key file holds).
    pub fn to_pkcs8_pem(&self) -> Result<String, IdentityError> {
        Ok(self
            .0
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| IdentityError::Encode(e.to_string()))?
            .to_string())
    }

    /// A key from PKCS#8 PEM.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, IdentityError> {
        SigningKey::from_pkcs8_pem(pem)
            .map(NodeKey)
            .map_err(|e| IdentityError::Pem(e.to_string()))
    }
}

/// A node's public key, which is its identity. Binary encodings carry the
/// 32 raw bytes; human-readable ones (JSON) the text form.
///
/// Holds the 32 key bytes, checked to be a valid ed25519 point when made.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeId([u8; 32]);

impl Serialize for NodeId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            serializer.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let text = String::deserialize(deserializer)?;
            text.parse().map_err(serde::de::Error::custom)
        } else {
            VerifyingKey::deserialize(deserializer).map(|k| NodeId(k.to_bytes()))
        }
    }
}

impl NodeId {
    /// Builds an id from 32 raw bytes, refusing points that are not valid
    /// ed25519 public keys.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, IdentityError> {
        VerifyingKey::from_bytes(bytes)
            .map(|_| NodeId(*bytes))
            .map_err(|_| IdentityError::InvalidPoint(BASE32_NOPAD.encode(bytes).to_lowercase()))
    }

    /// The 32 raw bytes of the key.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Checks a signature made with [`NodeKey::sign`] under the same context,
    /// with `verify_strict` (refuses small-order keys and non-canonical
    /// signatures).
    pub fn verify(&self, context: &[u8], message: &[u8], signature: &Signature) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        let mut buf = Vec::with_capacity(context.len() + message.len());
        buf.extend_from_slice(context);
        buf.extend_from_slice(message);
        key.verify_strict(&buf, signature).is_ok()
    }

    /// A short prefix of the text form, for logs.
    pub fn short(&self) -> String {
        self.to_string()[..10].to_string()
    }
}

impl PartialOrd for NodeId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for NodeId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BASE32_NOPAD.encode(self.as_bytes()).to_lowercase())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

impl FromStr for NodeId {
    type Err = IdentityError;

    /// Parses the text form; surrounding whitespace and case are ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        let bad = || IdentityError::BadNodeId(text.to_string());
        if text.len() != 52 {
            return Err(bad());
        }
        let bytes = BASE32_NOPAD
            .decode(text.to_ascii_uppercase().as_bytes())
            .map_err(|_| bad())?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| bad())?;
        NodeId::from_bytes(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: &[u8] = b"shuyuan/test\0";

    #[test]
    fn text_form_round_trips() {
        let key = NodeKey::from_seed([7; 32]);
        let text = key.id().to_string();
        assert_eq!(text.len(), 52);
        assert!(
            text.chars()
                .all(|c| c.is_ascii_lowercase() || ('2'..='7').contains(&c))
        );
        assert_eq!(text.parse::<NodeId>().unwrap(), key.id());
        assert_eq!(
            format!("  {}\n", text.to_uppercase())
                .parse::<NodeId>()
                .unwrap(),
            key.id()
        );
        assert!("abc".parse::<NodeId>().is_err());
        assert!(text[..51].parse::<NodeId>().is_err());
    }

    #[test]
    fn signatures_are_domain_separated() {
        let key = NodeKey::from_seed([1; 32]);
        let sig = key.sign(CTX, b"hello");
        assert!(key.id().verify(CTX, b"hello", &sig));
        assert!(!key.id().verify(b"shuyuan/other\0", b"hello", &sig));
        assert!(!key.id().verify(CTX, b"hellp", &sig));
        assert!(!NodeKey::from_seed([2; 32]).id().verify(CTX, b"hello", &sig));
    }

    #[test]
    fn keys_round_trip_through_pem() {
        let key = NodeKey::from_seed([4; 32]);
        let pem = key.to_pkcs8_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_eq!(NodeKey::from_pkcs8_pem(&pem).unwrap().id(), key.id());
        let err = NodeKey::from_pkcs8_pem("not a key")
            .unwrap_err()
            .to_string();
        assert!(err.contains("PKCS#8"), "{err}");
    }
}
