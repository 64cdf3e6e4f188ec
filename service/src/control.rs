//! The local control channel: how `status`, `enroll` and `export` talk to a
//! running service.
//!
//! A Unix socket in the service's data directory, mode 0600, so only the
//! service's own user (or root) can use it: it is bound in a private
//! directory (0700) beside its place, given its mode there and then renamed
//! into place, so no other user can connect in the moment between bind and
//! chmod (a umask set around bind would not do: it is the whole process's,
//! and other threads create files meanwhile). One connection carries one
//! request: the client writes a JSON line; the server answers with a JSON
//! header line, `{"ok":true}` or `{"ok":false,"error":"..."}`, followed by
//! the response body, streamed until it closes the connection.
//!
//! Invariant: a request line longer than [`MAX_REQUEST`] is refused before it
//! is buffered in full.

use std::future::Future;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// The longest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;

/// Errors of the control channel.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no running service answers on {path}: {source}")]
    NotRunning {
        path: String,
        source: std::io::Error,
    },
    #[error("control socket I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad control message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("request longer than {MAX_REQUEST} bytes")]
    TooLong,
    #[error("{0}")]
    Refused(String),
}

/// The mode of the control socket.
pub const SOCKET_MODE: u32 = 0o600;

/// Binds the control socket, replacing a stale socket file; the socket has
/// mode 0600 from the moment it appears at `path` (see the module doc).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    // A live service would still answer; a dead one left the file behind,
    // which the rename below replaces.
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("{} is in use by a running service", path.display()),
        ));
    }
    let staging = staging_dir(path)?;
    let bound = (|| {
        let inside = staging.join("control.sock");
        let listener = UnixListener::bind(&inside)?;
        std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(SOCKET_MODE))?;
        std::fs::rename(&inside, path)?;
        Ok(listener)
    })();
    std::fs::remove_dir_all(&staging)?;
    bound
}

/// A new directory only this user can enter, beside `path` (so that a
/// rename from it to `path` stays on one file system); one left behind by a
/// start that crashed is removed first.
fn staging_dir(path: &Path) -> std::io::Result<PathBuf> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging = path.with_file_name(format!(".{name}.{}.bind", std::process::id()));
    let create = || {
        std::fs::DirBuilder::new()
            .mode(crate::owner_only::DIR_MODE)
            .create(&staging)
    };
    match create() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::remove_dir_all(&staging)?;
            create()?;
        }
        other => other?,
    }
    Ok(staging)
}

/// Serves the control socket until `stop` completes: each connection's
/// request line is decoded as `R` and handed with the connection to
/// `handle`, which writes the answer; an unreadable request is refused.
pub async fn serve<R, F, Fut>(listener: UnixListener, stop: impl Future<Output = ()>, handle: F)
where
    R: DeserializeOwned + Send + 'static,
    F: Fn(R, UnixStream) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    // Transient (for example too many open files): pause, go on.
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stream);
            match read_request::<R>(&mut reader).await {
                // A client sends one line and waits, so nothing is buffered
                // beyond it.
                Ok(request) => handle(request, reader.into_inner()).await,
                Err(e) => {
                    let _ = write_error(reader.get_mut(), &e.to_string()).await;
                }
            }
        });
    }
}

/// Reads the request line of an accepted connection.
pub async fn read_request<T: DeserializeOwned>(
    stream: &mut BufReader<UnixStream>,
) -> Result<T, ControlError> {
    let mut line = Vec::new();
    let mut limited = (&mut *stream).take(MAX_REQUEST as u64 + 1);
    limited.read_until(b'\n', &mut line).await?;
    if line.len() > MAX_REQUEST {
        return Err(ControlError::TooLong);
    }
    Ok(serde_json::from_slice(&line)?)
}

/// Writes the header of a successful response; the body follows.
pub async fn write_ok<W: AsyncWrite + Unpin>(out: &mut W) -> std::io::Result<()> {
    out.write_all(b"{\"ok\":true}\n").await
}

/// Writes a refusal and nothing else.
pub async fn write_error<W: AsyncWrite + Unpin>(out: &mut W, error: &str) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(&serde_json::json!({ "ok": false, "error": error }))
        .unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    line.push(b'\n');
    out.write_all(&line).await
}

/// Sends `request` to the service at `socket` and copies the response body
/// to `out`.
pub async fn call<R: Serialize>(
    socket: &Path,
    request: &R,
    out: &mut (dyn Write + Send),
) -> Result<(), ControlError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ControlError::NotRunning {
            path: socket.display().to_string(),
            source,
        })?;
    let mut stream = BufReader::new(stream);
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.get_mut().write_all(&line).await?;
    let mut header = Vec::new();
    (&mut stream)
        .take(MAX_REQUEST as u64)
        .read_until(b'\n', &mut header)
        .await?;
    let header: serde_json::Value = serde_json::from_slice(&header)?;
    if header.get("ok").and_then(serde_json::Value::as_bool) != Some(true) {
        let error = header
            .get("error")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("the service refused the request");
        return Err(ControlError::Refused(error.to_string()));
    }
    copy_body(&mut stream, out).await
}

async fn copy_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    out: &mut (dyn Write + Send),
) -> Result<(), ControlError> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn request_response_and_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("c.sock");
        let listener = bind(&sock).unwrap();
        assert!(bind(&sock).is_err(), "a live socket is not replaced");
        let server = tokio::spawn(async move {
            let mut answered = 0;
            while answered < 2 {
                let (s, _) = listener.accept().await.unwrap();
                let mut s = BufReader::new(s);
                // The liveness probe of the second bind() sends nothing.
                let Ok(req) = read_request::<serde_json::Value>(&mut s).await else {
                    continue;
                };
                answered += 1;
                if req["cmd"] == "hello" {
                    write_ok(s.get_mut()).await.unwrap();
                    s.get_mut().write_all(b"line 1\nline 2\n").await.unwrap();
                } else {
                    write_error(s.get_mut(), "unknown command").await.unwrap();
                }
            }
        });
        let mut out = Vec::new();
        call(&sock, &serde_json::json!({"cmd": "hello"}), &mut out)
            .await
            .unwrap();
        assert_eq!(out, b"line 1\nline 2\n");
        let err = call(&sock, &serde_json::json!({"cmd": "nope"}), &mut Vec::new())
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "unknown command");
        server.await.unwrap();
        drop(std::fs::remove_file(&sock));
        let err = call(&sock, &serde_json::json!({}), &mut Vec::new())
            .await
            .unwrap_err();
        assert!(matches!(err, ControlError::NotRunning { .. }));
    }

    #[tokio::test]
    async fn the_socket_appears_with_mode_0600_and_replaces_a_stale_one() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("c.sock");
        // A watcher records every mode the socket is seen with while it is
        // bound again and again (whatever the umask, usually 022).
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let watcher = {
            let (sock, done) = (sock.clone(), done.clone());
            std::thread::spawn(move || {
                let mut seen = std::collections::BTreeSet::new();
                while !done.load(Ordering::Relaxed) {
                    if let Ok(m) = std::fs::symlink_metadata(&sock) {
                        seen.insert(format!("{:04o}", m.permissions().mode() & 0o7777));
                    }
                }
                seen
            })
        };
        for _ in 0..300 {
            // Each listener dropped leaves a stale file for the next bind.
            drop(bind(&sock).unwrap());
        }
        done.store(true, Ordering::Relaxed);
        let seen = watcher.join().unwrap();
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["0600"]);
        let _listener = bind(&sock).unwrap();
        std::os::unix::net::UnixStream::connect(&sock).unwrap();
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "only the socket is left: {left:?}");
    }
}
