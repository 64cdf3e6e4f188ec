//! Schema changes: the table shapes a read reports are imported into the
//! catalog (its data items follow the table) and recorded in the feed.
//!
//! Invariant: a feed's changes carry the version of the shape they were
//! read under: a changed shape gets the next version and opens the feed's
//! entries of that read, before any change that uses it. A shape the
//! catalog cannot take is logged; capture goes on.

use shuyuan_protocol::{Entry, FeedId, TableSchema, UnixMillis};

use super::CaptureLoop;
use crate::outbox::FeedState;

impl CaptureLoop {
    /// Imports the shapes of a read into the catalog, and records each
    /// changed one in its feed's state and entries.
    pub(super) fn record_shapes(
        &self,
        shapes: Vec<TableSchema>,
        feeds: &mut [(FeedId, FeedState)],
        entries: &mut [Vec<Entry>],
        now: UnixMillis,
    ) {
        for (i, shape) in shapes.into_iter().enumerate() {
            // The catalog's data items follow the table (idempotent).
            if let Err(e) = self
                .catalog
                .record_schema(&self.config.resources[i].code, &shape, now)
            {
                tracing::warn!(error = %e, resource = %self.config.resources[i].code, "cannot update the catalog's data items");
            }
            let state = &mut feeds[i].1;
            let changed = state.schema.as_ref().is_none_or(|s| !same_shape(s, &shape));
            if changed {
                let version = state.schema.as_ref().map_or(1, |s| s.version + 1);
                let schema = TableSchema { version, ..shape };
                tracing::info!(feed = %feeds[i].0, version, "table shape recorded");
                entries[i].push(Entry::Schema(schema.clone()));
                feeds[i].1.schema = Some(schema);
            }
        }
    }
}

fn same_shape(a: &TableSchema, b: &TableSchema) -> bool {
    a.table == b.table && a.columns == b.columns && a.key == b.key
}
