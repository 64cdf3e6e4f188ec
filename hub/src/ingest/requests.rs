//! The hub's comparison requests to an agent (一致性核验): the pending ranges
//! of its feeds' verification runs, each sent once per connection.
//!
//! Invariant: every pending range of a run is sent on each new connection
//! (a lost connection loses nothing: the run's state is in the store), and
//! never twice on the same one.

use shuyuan_protocol::message::VerifyRequest;
use shuyuan_protocol::{DepartmentCode, FeedId, MessageV1};
use tokio::sync::mpsc;

use super::Ingest;
use super::stream::Outgoing;
use crate::store::StoreError;

/// The verification requests already sent on this connection: feed, run,
/// the end of the range and its depth (pending ranges of a run are
/// disjoint, and a range asked for again is one level deeper).
pub(crate) type SentRequests = std::collections::BTreeSet<(FeedId, u64, Option<Vec<u8>>, u8)>;

/// Sends the pending verification requests of the department's feeds (or
/// of one feed) that this connection has not sent yet.
pub(crate) async fn send_verify_requests(
    ingest: &Ingest,
    department: &DepartmentCode,
    only: Option<&FeedId>,
    sent: &mut SentRequests,
    out: &mpsc::Sender<Outgoing>,
) -> Result<(), StoreError> {
    let runs = ingest.store.read(|t| {
        let feeds: Vec<FeedId> = match only {
            Some(f) => vec![f.clone()],
            None => t
                .feeds()?
                .into_iter()
                .map(|(f, _)| f)
                .filter(|f| f.department == *department)
                .collect(),
        };
        let mut runs = Vec::new();
        for feed in feeds {
            if let Some(run) = t.verification(&feed)?.and_then(|v| v.run) {
                runs.push((feed, run));
            }
        }
        Ok::<_, StoreError>(runs)
    })?;
    for (feed, run) in runs {
        for p in run.pending {
            if !sent.insert((feed.clone(), run.id, p.range.hi.clone(), p.depth)) {
                continue;
            }
            let request = VerifyRequest {
                feed: feed.clone(),
                run: run.id,
                range: p.range,
                mode: p.mode,
            };
            tracing::debug!(%feed, run = run.id, range = %request.range, "verification request sent");
            if out
                .send(Outgoing::Message(MessageV1::Verify(request)))
                .await
                .is_err()
            {
                return Ok(());
            }
        }
    }
    Ok(())
}
