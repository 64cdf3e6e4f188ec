//! Key rotation (密钥轮换) at the agent.
//!
//! `shuyuan-agent rotate-key` creates the next key beside the current one
//! (`KEY_FILE.next`, mode 0600) and a rotation signed by both keys
//! (`DATA_DIR/key-rotation.pending`). From its next start the agent signs
//! new batches with the next key, still connects with the current one, and
//! announces the rotation first on every connection until the hub confirms
//! it; then the next key replaces the current one (one rename) and later
//! connections use it. Batches already sealed under the old key stay valid:
//! the hub accepts an agent's batches signed by any key of its lineage.
//!
//! Invariant: the step that makes the new key current is a single rename,
//! and a start after any crash in between finds either the old key with a
//! pending rotation or the new key with a stale pending file (removed).

use std::path::{Path, PathBuf};

use shuyuan_protocol::encoding::{self, DecodeError, EncodeError};
use shuyuan_protocol::rotation::{KeyRotation, RotationBody, RotationError};
use shuyuan_protocol::{NodeId, NodeKey, UnixMillis};
use shuyuan_service::keyfile::{self, KeyFileError};

use crate::config::Config;

/// Why the keys cannot be loaded or rotated.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error(transparent)]
    Key(#[from] KeyFileError),
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the pending key rotation {path} is unreadable: {reason}")]
    Pending { path: PathBuf, reason: String },
    #[error(
        "a key rotation to {new} is already pending (announced at the next connection); \
         wait until the hub confirms it (see the agent's log)"
    )]
    AlreadyPending { new: NodeId },
    #[error(
        "the pending key rotation {path} replaces {old}, but the key file holds {found}; \
         restore the key file or remove the pending rotation"
    )]
    Mismatch {
        path: PathBuf,
        old: NodeId,
        found: NodeId,
    },
    #[error("cannot sign the rotation: {0}")]
    Encode(#[from] EncodeError),
}

/// The keys a starting agent works with.
#[derive(Debug, Clone)]
pub struct Keys {
    /// The key the agent connects with: the enrolled one until the hub
    /// confirms a rotation.
    pub identity: NodeKey,
    /// The key new batches are signed with: the next key while a rotation
    /// is pending.
    pub signing: NodeKey,
    /// The rotation to announce, until the hub confirms it.
    pub pending: Option<KeyRotation>,
}

/// Where the next key is kept until it becomes current.
pub fn next_key_path(config: &Config) -> PathBuf {
    let mut name = config.key_file.as_os_str().to_owned();
    name.push(".next");
    PathBuf::from(name)
}

/// Where the signed rotation waits for the hub's confirmation.
pub fn pending_path(config: &Config) -> PathBuf {
    config.data_dir.join("key-rotation.pending")
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> KeysError {
    let path = path.to_owned();
    move |source| KeysError::Io { what, path, source }
}

fn read_pending(path: &Path) -> Result<Option<(KeyRotation, RotationBody)>, KeysError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("read", path)(e)),
    };
    let unreadable = |reason: String| KeysError::Pending {
        path: path.to_owned(),
        reason,
    };
    let rotation: KeyRotation =
        encoding::decode(&bytes).map_err(|e: DecodeError| unreadable(e.to_string()))?;
    let body = rotation
        .open()
        .map_err(|e: RotationError| unreadable(e.to_string()))?;
    Ok(Some((rotation, body)))
}

/// Loads the current key and any pending rotation, finishing one that was
/// confirmed just before a crash.
pub fn load(config: &Config) -> Result<Keys, KeysError> {
    let current = keyfile::load(&config.key_file)?;
    let pending = pending_path(config);
    let next = next_key_path(config);
    let Some((rotation, body)) = read_pending(&pending)? else {
        if next.exists() {
            // Made by a `rotate-key` that stopped before signing: never
            // announced, so nobody knows it.
            tracing::warn!(path = %next.display(), "removing a next key that was never announced");
            std::fs::remove_file(&next).map_err(io("remove", &next))?;
        }
        return Ok(Keys {
            identity: current.clone(),
            signing: current,
            pending: None,
        });
    };
    if current.id() == body.new {
        std::fs::remove_file(&pending).map_err(io("remove", &pending))?;
        return Ok(Keys {
            identity: current.clone(),
            signing: current,
            pending: None,
        });
    }
    if current.id() != body.old {
        return Err(KeysError::Mismatch {
            path: pending,
            old: body.old,
            found: current.id(),
        });
    }
    let signing = keyfile::load(&next)?;
    if signing.id() != body.new {
        return Err(KeysError::Mismatch {
            path: next,
            old: body.new,
            found: signing.id(),
        });
    }
    Ok(Keys {
        identity: current,
        signing,
        pending: Some(rotation),
    })
}

/// Creates the next key and the signed rotation; returns what it says.
pub fn begin(config: &Config) -> Result<RotationBody, KeysError> {
    let keys = load(config)?;
    if let Some(p) = &keys.pending {
        let body = p.open().map_err(|e| KeysError::Pending {
            path: pending_path(config),
            reason: e.to_string(),
        })?;
        return Err(KeysError::AlreadyPending { new: body.new });
    }
    let next = NodeKey::generate().map_err(KeyFileError::from)?;
    let next_path = next_key_path(config);
    keyfile::save_new(&next, &next_path)?;
    let rotation = KeyRotation::sign(
        &keys.identity,
        &next,
        config.department.clone(),
        UnixMillis::now(),
    )?;
    let pending = pending_path(config);
    shuyuan_service::owner_only::create_dir(&config.data_dir)
        .map_err(io("create", &config.data_dir))?;
    let tmp = pending.with_extension("tmp");
    std::fs::write(&tmp, encoding::encode(&rotation)?).map_err(io("write", &tmp))?;
    std::fs::rename(&tmp, &pending).map_err(io("write", &pending))?;
    rotation.open().map_err(|e| KeysError::Pending {
        path: pending,
        reason: e.to_string(),
    })
}

/// The hub confirmed the rotation: the next key becomes the current one.
pub fn finish(config: &Config) -> Result<NodeKey, KeysError> {
    let next = next_key_path(config);
    std::fs::rename(&next, &config.key_file).map_err(io("install", &next))?;
    let pending = pending_path(config);
    std::fs::remove_file(&pending).map_err(io("remove", &pending))?;
    Ok(keyfile::load(&config.key_file)?)
}
