//! `shuyuan-agent pg setup|drop`: the publication and the replication slot,
//! created by the agent or printed as SQL for a DBA.
//!
//! The agent needs only: LOGIN and REPLICATION, SELECT on the shared tables
//! (for initial loads and resyncs), and a publication of those tables,
//! which their owner creates.

use super::{SourceError, connect_sql, pg_config, pg_err, quoted_table, resolve};
use crate::config::{Config, PgConfig, SourceConfig};

fn pg(config: &Config) -> Result<&PgConfig, SourceError> {
    match &config.source {
        SourceConfig::Postgres(pg) => Ok(pg),
        _ => Err(SourceError::Unsupported(format!(
            "{}: source.kind is not \"postgres\"",
            config.file.display()
        ))),
    }
}

fn tables(config: &Config) -> String {
    config
        .resources
        .iter()
        .map(|r| quoted_table(&r.table))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The SQL a DBA runs instead of `pg setup`.
pub fn setup_sql(config: &Config) -> Result<String, SourceError> {
    let pg = pg(config)?;
    let tables = tables(config);
    let user = pg_config(pg)?
        .get_user()
        .unwrap_or("shuyuan_agent")
        .to_string();
    Ok(format!(
        "-- shuyuan agent for department {dept}: PostgreSQL set-up.\n\
         -- 1. postgresql.conf: wal_level = logical (restart needed), and\n\
         --    max_slot_wal_keep_size to bound the WAL a stopped agent can hold.\n\
         -- 2. As a superuser: a role with only what the agent needs.\n\
         CREATE ROLE \"{user}\" LOGIN REPLICATION; -- then set its password\n\
         GRANT SELECT ON {tables} TO \"{user}\";\n\
         -- (and USAGE on each table's schema if it is not public)\n\
         -- Tables without a primary key need: ALTER TABLE t REPLICA IDENTITY FULL;\n\
         -- 3. As the owner of the tables:\n\
         CREATE PUBLICATION \"{publication}\" FOR TABLE {tables};\n\
         -- 4. As \"{user}\":\n\
         SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput');\n",
        dept = config.department,
        publication = pg.publication,
        slot = pg.slot,
    ))
}

/// Creates (or updates) the publication and creates the slot if missing.
/// Returns what was done, one line each.
pub async fn setup(config: &Config) -> Result<Vec<String>, SourceError> {
    let pg = pg(config)?;
    let sql = connect_sql(&pg_config(pg)?).await?;
    let e = pg_err("setting up capture");
    let wal_level: String = sql
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(&e)?
        .get(0);
    if wal_level != "logical" {
        return Err(SourceError::Unsupported(format!(
            "the server runs with wal_level = {wal_level}; set wal_level = logical in postgresql.conf and restart PostgreSQL"
        )));
    }
    // Refuse tables the log cannot identify rows of before publishing them
    // (publishing such a table would make the department's UPDATEs fail).
    for r in &config.resources {
        resolve(&sql, r).await?;
    }
    let mut done = Vec::new();
    let tables = tables(config);
    let exists = sql
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&pg.publication],
        )
        .await
        .map_err(&e)?
        .is_some();
    if exists {
        sql.batch_execute(&format!(
            "ALTER PUBLICATION \"{}\" SET TABLE {tables}",
            pg.publication
        ))
        .await
        .map_err(&e)?;
        done.push(format!(
            "publication {} now publishes {tables}",
            pg.publication
        ));
    } else {
        sql.batch_execute(&format!(
            "CREATE PUBLICATION \"{}\" FOR TABLE {tables}",
            pg.publication
        ))
        .await
        .map_err(&e)?;
        done.push(format!(
            "publication {} created for {tables}",
            pg.publication
        ));
    }
    let slot = sql
        .query_opt(
            "SELECT plugin::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&pg.slot],
        )
        .await
        .map_err(&e)?;
    match slot {
        Some(row) => {
            let plugin: Option<String> = row.get(0);
            if plugin.as_deref() != Some("pgoutput") {
                return Err(SourceError::Unsupported(format!(
                    "replication slot {} exists but uses {:?}, not pgoutput; drop it or name another slot in source.slot",
                    pg.slot, plugin
                )));
            }
            done.push(format!("replication slot {} already exists", pg.slot));
        }
        None => {
            let lsn: String = sql
                .query_one(
                    "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&pg.slot],
                )
                .await
                .map_err(&e)?
                .get(0);
            done.push(format!(
                "replication slot {} created at {lsn}; the agent's first run loads every table",
                pg.slot
            ));
        }
    }
    Ok(done)
}

/// Drops the slot (so the server stops keeping WAL for the agent) and the
/// publication.
pub async fn drop(config: &Config) -> Result<Vec<String>, SourceError> {
    let pg = pg(config)?;
    let sql = connect_sql(&pg_config(pg)?).await?;
    let e = pg_err("removing capture");
    let mut done = Vec::new();
    let n = sql
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            &[&pg.slot],
        )
        .await
        .map_err(&e)?;
    done.push(if n > 0 {
        format!("replication slot {} dropped", pg.slot)
    } else {
        format!("replication slot {} did not exist", pg.slot)
    });
    sql.batch_execute(&format!(
        "DROP PUBLICATION IF EXISTS \"{}\"",
        pg.publication
    ))
    .await
    .map_err(&e)?;
    done.push(format!("publication {} dropped", pg.publication));
    Ok(done)
}
