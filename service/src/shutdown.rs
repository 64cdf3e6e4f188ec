//! Waiting for the signal that stops a service.

/// Waits for SIGTERM or Ctrl-C and says which arrived.
pub async fn shutdown_signal() -> std::io::Result<&'static str> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => Ok("SIGTERM"),
        r = tokio::signal::ctrl_c() => r.map(|()| "interrupt"),
    }
}
