//! A node's key file: its ed25519 secret key as PKCS#8 PEM (the format
//! `openssl pkey` reads), created with mode 0600.
//!
//! Invariants: a key file is never overwritten; a key file that users other
//! than its owner could read or replace is refused before it is read (a
//! leaked key lets anyone sign as the node); every error names the file.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use shuyuan_protocol::NodeKey;
use shuyuan_protocol::identity::IdentityError;

/// Why a key file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "key file {path} has mode {mode:04o}: other users can read or change it; \
         run `chmod 600 {path}` (the key must be readable by its owner only)"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("key file {path}: {source}")]
    Format {
        path: PathBuf,
        #[source]
        source: IdentityError,
    },
    /// Making or encoding a key failed.
    #[error(transparent)]
    Key(#[from] IdentityError),
}

/// Reads a key file, refusing one that others could read or replace.
pub fn load(path: &Path) -> Result<NodeKey, KeyFileError> {
    refuse_exposed(path)?;
    let pem = fs::read_to_string(path).map_err(|source| KeyFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    NodeKey::from_pkcs8_pem(&pem).map_err(|source| KeyFileError::Format {
        path: path.to_owned(),
        source,
    })
}

/// Writes `key` to a new file with mode 0600; refuses to overwrite.
pub fn save_new(key: &NodeKey, path: &Path) -> Result<(), KeyFileError> {
    let write_err = |source| KeyFileError::Write {
        path: path.to_owned(),
        source,
    };
    let pem = key.to_pkcs8_pem()?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(write_err)?;
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(write_err)?;
    file.write_all(pem.as_bytes()).map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    Ok(())
}

/// Loads the key at `path`, or creates one there if the file does not
/// exist. Returns the key and whether it was created.
pub fn load_or_create(path: &Path) -> Result<(NodeKey, bool), KeyFileError> {
    if path.exists() {
        return Ok((load(path)?, false));
    }
    let key = NodeKey::generate()?;
    save_new(&key, path)?;
    Ok((key, true))
}

#[cfg(unix)]
fn refuse_exposed(path: &Path) -> Result<(), KeyFileError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(path).map_err(|source| KeyFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Exposed {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn refuse_exposed(_path: &Path) -> Result<(), KeyFileError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_round_trip_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/node.key");
        let (key, created) = load_or_create(&path).unwrap();
        assert!(created);
        let (again, created) = load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(key.id(), again.id());
        assert!(save_new(&key, &path).is_err(), "must not overwrite a key");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"));
    }

    #[test]
    fn garbage_key_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.key");
        fs::write(&path, "not a key").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        }
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("bad.key") && err.contains("PKCS#8"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn a_key_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        save_new(&NodeKey::from_seed([3; 32]), &path).unwrap();
        for mode in [0o640, 0o604, 0o660, 0o666] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = load(&path).unwrap_err().to_string();
            assert!(
                err.contains("node.key")
                    && err.contains(&format!("{mode:04o}"))
                    && err.contains("chmod 600"),
                "{err}"
            );
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(load(&path).unwrap().id(), NodeKey::from_seed([3; 32]).id());
    }
}
