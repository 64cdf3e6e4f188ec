//! Service configuration: errors that name the file, the key and the
//! reason; TOML parsing that says where a file is wrong; and writing the
//! example configuration on `init`.
//!
//! Invariant: every configuration error a service reports carries the file,
//! the key path (or line and column) and the reason.

use std::fmt;
use std::path::{Path, PathBuf};

/// A config problem, with where it is.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    /// The key path (`resource[1].update_cycle`), or a line and column when
    /// the TOML itself does not parse.
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.file.display(), self.key, self.reason)
    }
}

impl ConfigError {
    /// An error about `key` in `file`.
    pub fn at(file: &Path, key: &str, reason: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_owned(),
            key: key.to_string(),
            reason: reason.into(),
        }
    }
}

/// Reads a config file's text.
pub fn read_config(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|e| ConfigError::at(path, "(file)", format!("cannot read: {e}")))
}

/// Parses config text, turning a TOML error into a [`ConfigError`] that
/// names the line and column.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e: toml::de::Error| {
        let key = match e.span() {
            Some(span) => {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                format!("line {line}, column {col}")
            }
            None => "(document)".to_string(),
        };
        ConfigError::at(path, &key, e.message().trim())
    })
}

/// Whether `s` reads as `HOST:PORT` (a name or an address, a port 1 to
/// 65535): how a peer's address is written in a config.
pub fn is_host_port(s: &str) -> bool {
    s.parse::<std::net::SocketAddr>().is_ok()
        || match s.rsplit_once(':') {
            Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0),
            None => false,
        }
}

/// The directory relative paths in a config file are resolved against.
pub fn config_dir(path: &Path) -> PathBuf {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Writes `template` to `path` unless a file is already there. Returns
/// whether it wrote.
pub fn write_template_if_missing(path: &Path, template: &str) -> std::io::Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, template)?;
    Ok(true)
}
#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        name: String,
    }

    #[test]
    fn toml_errors_name_line_and_column() {
        let e = parse_toml::<Sample>(Path::new("/etc/x.toml"), "name = \"a\"\ncolour = 1\n")
            .unwrap_err();
        assert_eq!(e.key, "line 2, column 1");
        assert!(
            e.to_string()
                .starts_with("/etc/x.toml: line 2, column 1: unknown field `colour`"),
            "{e}"
        );
        assert_eq!(config_dir(Path::new("x.toml")), PathBuf::from("."));
        assert_eq!(config_dir(Path::new("/etc/x.toml")), PathBuf::from("/etc"));
    }
}
