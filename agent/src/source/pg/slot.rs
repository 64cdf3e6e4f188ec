//! The replication slot: the stream is started from the committed
//! position on the agent's slot, after checking that the slot is still the
//! one the position belongs to.
//!
//! Invariant: a lost slot is never continued silently: the agent recreates
//! it and re-reads every resource, and the hub is told why in the feed
//! (each re-read begins with the reason).

use shuyuan_protocol::UnixMillis;

use super::decode::SESSION_SETTINGS;
use super::wire::{ReplConn, WireError, lsn_text, parse_lsn};
use super::{Mark, PgSource, pg_err, wire_err};
use crate::source::SourceError;

impl PgSource {
    /// Connects the stream, checking the slot first. A lost slot is
    /// recreated and every resource re-read.
    pub(super) async fn ensure_stream(
        &mut self,
        fresh: bool,
        marks: &mut Vec<Mark>,
    ) -> Result<(), SourceError> {
        self.ensure_sql().await?;
        if self.repl.is_some() {
            return Ok(());
        }
        let slot = self.cfg.slot.clone();
        let row = self
            .sql()?
            .query_opt(
                "SELECT confirmed_flush_lsn::text, to_jsonb(s) ->> 'wal_status', plugin::text \
                 FROM pg_replication_slots s WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(pg_err("reading the replication slot"))?;
        let lost = match &row {
            None if fresh => return Err(SourceError::NoSlot { slot }),
            None => Some("it was dropped".to_string()),
            Some(r) if r.get::<_, Option<String>>(1).as_deref() == Some("lost") => Some(
                "PostgreSQL invalidated it (WAL it needed was removed, see max_slot_wal_keep_size)"
                    .to_string(),
            ),
            Some(r) if r.get::<_, Option<String>>(2).as_deref() != Some("pgoutput") => {
                return Err(SourceError::Pg {
                    context: "checking the replication slot".into(),
                    message: format!("slot {slot} does not use the pgoutput plugin"),
                });
            }
            Some(r) => {
                let confirmed = r
                    .get::<_, Option<String>>(0)
                    .as_deref()
                    .and_then(parse_lsn)
                    .unwrap_or(0);
                if fresh {
                    self.pos.lsn = confirmed;
                    None
                } else if confirmed > self.pos.lsn {
                    Some(format!(
                        "it is at {} but the agent captured only up to {}: it was recreated or advanced by someone else",
                        lsn_text(confirmed),
                        lsn_text(self.pos.lsn)
                    ))
                } else {
                    None
                }
            }
        };
        if fresh {
            for i in 0..self.resources.len() {
                self.start_load(i, "initial load".into(), marks).await?;
            }
        }
        if let Some(why) = lost {
            self.repair_lost_slot(&why, row.is_some(), marks).await?;
        }
        let mut repl = ReplConn::connect(&self.pg, SESSION_SETTINGS)
            .await
            .map_err(wire_err("opening the replication connection"))?;
        if let Err(e) = repl.start(&slot, &self.cfg.publication, self.pos.lsn).await {
            if let WireError::Server { code, message } = &e
                && (code == "55000"
                    || code == "58P01"
                    || message.contains("has already been removed"))
            {
                // Invalidated between the check and the start.
                self.repair_lost_slot(message, true, marks).await?;
                return Err(wire_err("starting replication; slot recreated, retrying")(
                    e,
                ));
            }
            return Err(wire_err("starting replication")(e));
        }
        self.released = self.released.max(self.pos.lsn);
        self.repl = Some(repl);
        tracing::info!(slot = %self.cfg.slot, lsn = %lsn_text(self.pos.lsn), "streaming the log");
        Ok(())
    }

    async fn repair_lost_slot(
        &mut self,
        why: &str,
        exists: bool,
        marks: &mut Vec<Mark>,
    ) -> Result<(), SourceError> {
        let slot = self.cfg.slot.clone();
        let alarm = format!("replication slot {slot} lost: {why}");
        tracing::error!(%alarm, "capture position lost; recreating the slot and re-reading every resource");
        let e = pg_err("recreating the replication slot");
        if exists {
            self.sql()?
                .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await
                .map_err(&e)?;
        }
        let lsn: String = self
            .sql()?
            .query_one(
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await
            .map_err(&e)?
            .get(0);
        self.pos.lsn = parse_lsn(&lsn).unwrap_or(0);
        self.pos.partial = None;
        self.released = self.pos.lsn;
        self.chunk = None;
        self.probe_chunk = None;
        for i in 0..self.resources.len() {
            self.start_load(i, format!("{alarm}; re-reading the table"), marks)
                .await?;
        }
        self.alarm = Some(format!(
            "{alarm} (at {}); re-read started",
            UnixMillis::now()
        ));
        Ok(())
    }
}
