//! The throwaway PostgreSQL harness itself: a server starts, answers SQL
//! through psql and tokio-postgres, renders a table as CSV in the hub's
//! conventions, runs pgbench, survives a SIGKILL and a restart, and is gone
//! when its handle drops.

use std::net::TcpStream;

use anyhow::Result;
use shuyuan_tests::pg::{PgInstance, assert_same_csv};

#[tokio::test(flavor = "multi_thread")]
async fn a_throwaway_server_starts_serves_and_stops() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("shuyuan-pg-").tempdir()?;
    // A zone with a whole-hour offset, to pin how timestamptz is printed.
    let mut pg = PgInstance::start_with(&dir.path().join("pg"), &[("timezone", "Asia/Shanghai")])?;
    let port = pg.port;
    assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
    assert_eq!(pg.sql("SHOW wal_level")?.trim(), "logical");
    assert_eq!(pg.sql("SHOW fsync")?.trim(), "off");

    pg.sql(
        r#"CREATE TABLE t (
             id int PRIMARY KEY, name text, flag boolean, data bytea,
             x float8, y real, amount numeric(30, 2), at timestamptz, d date);
           INSERT INTO t VALUES
             (1, 'plain', true, '\x00ff', 0.1, 0.1, 12.5, '2026-11-21 08:30:00.5+08', '2026-11-21'),
             (2, '', false, '\x', 1e300, '-0', -3, NULL, NULL),
             (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
             (4, E'a,"b"\nc', true, NULL, 'NaN', 'Infinity', 0, '2026-01-01 00:00:00+05:30', NULL),
             (5, '数源', false, NULL, 1, 1.5, 1e20, NULL, NULL)"#,
    )?;
    // The hub's conventions (hub/src/export.rs): NULL empty and unquoted,
    // the empty string quoted, bytea as \x hex, booleans true/false, reals
    // in Rust's shortest form of the f64 (a real as the f64 of its text).
    let expected = "id,name,flag,data,x,y,amount,at,d\n\
        1,plain,true,\\x00ff,0.1,0.1,12.50,2026-11-21 08:30:00.5+08,2026-11-21\n\
        2,\"\",false,\\x,1e300,-0.0,-3.00,,\n\
        3,,,,,,,,\n\
        4,\"a,\"\"b\"\"\nc\",true,,NaN,Infinity,0.00,2026-01-01 02:30:00+08,\n\
        5,数源,false,,1.0,1.5,100000000000000000000.00,,\n";
    let csv = pg.table_csv("t", "id")?;
    assert_same_csv(expected, &csv)?;
    assert_eq!(pg.key_order("t", &[])?, "\"id\" NULLS FIRST");
    let differs = assert_same_csv(expected, &csv.replace("12.50", "12.5"))
        .expect_err("a changed value must be reported");
    assert!(
        differs
            .to_string()
            .contains("1 line differs, the first at line 2"),
        "{differs}"
    );

    // The same server through tokio-postgres.
    let client = pg.client().await?;
    let n: i64 = client
        .query_one("SELECT count(*) FROM t WHERE flag", &[])
        .await?
        .get(0);
    assert_eq!(n, 2);
    drop(client);

    pg.pgbench(&["-i", "-s", "1", "-q"])?;
    assert_eq!(
        pg.sql("SELECT count(*) FROM pgbench_accounts")?.trim(),
        "100000"
    );
    let run = pg.pgbench(&["-T", "1", "-c", "2", "-n"])?;
    assert!(run.contains("tps = "), "{run}");

    // A crash and a restart on the same port keep committed rows.
    pg.kill()?;
    assert!(!pg.running());
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    pg.restart()?;
    assert_eq!(pg.port, port);
    assert_eq!(pg.sql("SELECT count(*) FROM t")?.trim(), "5");
    pg.restart()?;
    assert_eq!(pg.sql("SELECT count(*) FROM t")?.trim(), "5");

    let data = pg.data.clone();
    drop(pg);
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the server still accepts connections after drop"
    );
    assert!(!data.join("postmaster.pid").exists());
    Ok(())
}
