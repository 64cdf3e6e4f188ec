//! A connection's stream: reading messages within the connection's and the
//! hub's byte budget, and writing replies in the order the batches came.
//!
//! Invariants: a payload is read (and allocated) only once its length fits
//! both budgets, and the bytes stay held until the writer decided the
//! batch; a batch's reply is written only once its outcome is decided
//! (after the commit for an ack), and replies leave in arrival order.

use quinn::{RecvStream, SendStream};
use shuyuan_link::quic::{self, QuicError};
use shuyuan_protocol::{Message, MessageV1};
use tokio::sync::{mpsc, oneshot};

use super::{Budget, Held};
use crate::apply::Outcome;

/// What the reply writer sends, in order.
pub(crate) enum Outgoing {
    /// A batch's ack or rejection, once the store has decided, and the
    /// budget its bytes hold until then.
    Outcome(oneshot::Receiver<Outcome>, Held),
    /// A message to send as it is (catalog sync, comparison requests).
    Message(MessageV1),
}

/// A message read from a peer, with the budget it holds.
pub(crate) type Read = Result<Option<(Message, Held)>, QuicError>;

/// Reads whole messages for the session loop. A payload is read (and
/// allocated) only once its length, from the prefix, fits the connection's
/// and the hub's budget: until then the stream is not read and QUIC flow
/// control holds the peer back. Reading is not cancel-safe, so it runs on
/// its own.
pub(crate) async fn read_messages(mut recv: RecvStream, budget: Budget, out: mpsc::Sender<Read>) {
    loop {
        let m = match quic::read_prefix(&mut recv).await {
            Ok(Some(len)) => {
                let Some(held) = budget.hold(len).await else {
                    return;
                };
                quic::read_payload(&mut recv, len)
                    .await
                    .map(|m| Some((m, held)))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        let end = !matches!(m, Ok(Some(_)));
        if out.send(m).await.is_err() || end {
            return;
        }
    }
}

/// Writes each batch's outcome in the order the batches arrived, and the
/// catalog messages between them.
pub(crate) async fn write_replies(mut send: SendStream, mut pending: mpsc::Receiver<Outgoing>) {
    while let Some(next) = pending.recv().await {
        let rx = match next {
            Outgoing::Outcome(rx, held) => (rx, held),
            Outgoing::Message(m) => {
                if quic::write_message(&mut send, &m.into()).await.is_err() {
                    break;
                }
                continue;
            }
        };
        let (rx, held) = rx;
        let decided = rx.await;
        drop(held);
        let message = match decided {
            Ok(Outcome::Ack(a)) => MessageV1::Ack(a),
            Ok(Outcome::Reject(r)) => MessageV1::Reject(r),
            Ok(Outcome::Discarded) => continue,
            Err(_) => break,
        };
        if quic::write_message(&mut send, &message.into())
            .await
            .is_err()
        {
            break;
        }
    }
    let _ = send.finish();
}
