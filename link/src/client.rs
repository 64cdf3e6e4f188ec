//! The client side of a feed connection, shared by the agent's uplink and a
//! hub's upstream link (级联): staying connected with backoff, reading the
//! peer's `Welcome`, reading replies on their own task, and telling an
//! operator why a connection failed.
//!
//! What is sent, and when it may be pruned, is [`shuyuan_protocol::window::SendWindow`];
//! dialing is [`crate::quic::dial`]. Each link keeps its own error type and
//! state board; this module only gives them one behaviour.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use quinn::{ConnectionError, ReadError, RecvStream, WriteError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::quic::{self, QuicError};
use shuyuan_protocol::message::{Reject, Welcome};
use shuyuan_protocol::{Message, MessageV1};

/// First reconnect delay; doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Longest reconnect delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// One connection attempt of a link, and what it does with a failure.
pub trait Session {
    type Error: Display;

    /// Connects and runs until the connection ends: `Ok` to stop for good
    /// (the link was cancelled), `Err` to try again. Sets `established`
    /// once the peer accepted the connection (which resets the backoff).
    fn session(
        &self,
        endpoint: &mut Option<quinn::Endpoint>,
        established: &mut bool,
    ) -> impl Future<Output = Result<(), Self::Error>>;

    /// A session failed; `news` is false when it failed again the same way
    /// without ever being established (log it once, not every attempt).
    fn failed(&self, error: &Self::Error, news: bool);
}

/// Runs sessions until one ends with `Ok` or `cancel` fires, waiting
/// [`BACKOFF_MIN`] doubling to [`BACKOFF_MAX`] between failed ones; closes
/// the endpoint at the end.
pub async fn keep_connected<S: Session>(link: &S, cancel: &CancellationToken) {
    let mut endpoint = None;
    let mut backoff = BACKOFF_MIN;
    let mut last_error = String::new();
    while !cancel.is_cancelled() {
        let mut established = false;
        let result = link.session(&mut endpoint, &mut established).await;
        if established {
            backoff = BACKOFF_MIN;
        }
        match result {
            Ok(()) => break,
            Err(e) => {
                let text = e.to_string();
                link.failed(&e, text != last_error || established);
                last_error = text;
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    if let Some(ep) = endpoint {
        ep.close(0u32.into(), b"stopping");
        let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
    }
}

/// The connection underneath a stream error, if the connection broke.
pub fn lost_connection(e: &QuicError) -> Option<&ConnectionError> {
    match e {
        QuicError::Connection(c)
        | QuicError::Read(ReadError::ConnectionLost(c))
        | QuicError::Write(WriteError::ConnectionLost(c)) => Some(c),
        _ => None,
    }
}

/// Why no `Welcome` came.
#[derive(Debug, thiserror::Error)]
pub enum WelcomeError {
    #[error("the peer did not answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Quic(#[from] QuicError),
    #[error("the peer closed the stream")]
    Closed,
    #[error("the peer refused: {} ({})", .0.detail, .0.reason)]
    Refused(Reject),
    #[error("expected Welcome, got {0}")]
    Unexpected(&'static str),
}

/// Reads the answer to `Hello` or `HubHello` within `timeout`.
pub async fn read_welcome(
    recv: &mut RecvStream,
    timeout: Duration,
) -> Result<Welcome, WelcomeError> {
    match tokio::time::timeout(timeout, quic::read_message(recv)).await {
        Err(_) => Err(WelcomeError::Timeout(timeout)),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(None)) => Err(WelcomeError::Closed),
        Ok(Ok(Some(Message::V1(MessageV1::Welcome(w))))) => Ok(w),
        Ok(Ok(Some(Message::V1(MessageV1::Reject(r))))) => Err(WelcomeError::Refused(r)),
        Ok(Ok(Some(Message::V1(other)))) => Err(WelcomeError::Unexpected(other.name())),
    }
}

/// A task that reads the peer's messages; aborted when dropped.
#[derive(Debug)]
pub struct Reader(tokio::task::JoinHandle<()>);

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the reader hands over: a message, the end of the stream, or why
/// reading failed (the last item either way).
pub type Incoming = Result<Option<Message>, QuicError>;

/// Reads `recv` on its own task (reading is not cancel-safe, so a select
/// loop must not do it) and hands over whole messages. The queue holds at
/// most what the peer answers to batches the window let out, plus the
/// peer's own few messages.
pub fn spawn_reader(mut recv: RecvStream) -> (Reader, mpsc::UnboundedReceiver<Incoming>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let m = quic::read_message(&mut recv).await;
            let end = !matches!(m, Ok(Some(_)));
            if tx.send(m).is_err() || end {
                break;
            }
        }
    });
    (Reader(task), rx)
}
