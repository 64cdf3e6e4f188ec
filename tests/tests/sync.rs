//! A SQLite department syncs to a hub: thousands of inserts, updates and
//! deletes through the real binaries, compared row for row.

use std::time::Duration;

use anyhow::Result;
use shuyuan_tests::data::{self, Rng};
use shuyuan_tests::{AgentSpec, Nodes, ResourceSpec, Topology, assert_in_sync, immediate};

const MIXED_DDL: &str =
    "CREATE TABLE mixed (id TEXT PRIMARY KEY, n INTEGER, r REAL, t TEXT, b BLOB, untyped)";

#[test]
fn thousands_of_changes_arrive_row_for_row() -> Result<()> {
    let mut rng = Rng::new(7);
    let Nodes(mut sb, [], [mut agent]) = Topology::new()
        .agent(
            AgentSpec::sqlite(
                "ga",
                "GA-330902",
                &[data::HOUSEHOLD_DDL, data::PARCEL_DDL, MIXED_DDL],
            )
            .resources(vec![
                ResourceSpec::new("A01/0001", "household", &["id_number"], "realtime"),
                ResourceSpec::land_parcel("daily"),
                ResourceSpec::new("X00/0001", "mixed", &["id"], "daily"),
            ])
            // Rows that exist before capture is installed arrive too.
            .seed(|conn| {
                for _ in 0..300 {
                    data::insert_household(conn, &mut rng)?;
                }
                Ok(())
            })
            .outbox("batch_max_changes = 200"),
        )
        .start()?;
    let conn = agent.database()?;

    // Values whose type or emptiness must survive exactly.
    conn.execute_batch(
        "INSERT INTO mixed VALUES ('null-vs-empty', NULL, NULL, '', x'', NULL);
         INSERT INTO mixed VALUES ('0042', 9223372036854775807, 0.1, '零', x'00ff10', 3.5);
         INSERT INTO mixed VALUES ('min', -9223372036854775808, -1e300, 'a,\"b\"\nc', randomblob(64), 'x');
         INSERT INTO mixed VALUES ('mixed-affinity', '12', '1.5', 12, 'text in a blob column', x'01');
         INSERT INTO mixed VALUES ('doomed', 1, 1, 'gone', NULL, NULL);
         UPDATE mixed SET t = NULL WHERE id = '0042';
         UPDATE mixed SET id = 'renamed' WHERE id = 'min';
         DELETE FROM mixed WHERE id = 'doomed';",
    )?;
    let mut counts = std::collections::BTreeMap::new();
    for round in 0..20 {
        let tx = immediate(&conn)?;
        for _ in 0..150 {
            *counts
                .entry(data::churn_one(&tx, "household", &mut rng)?)
                .or_insert(0) += 1;
            *counts
                .entry(data::churn_one(&tx, "land_parcel", &mut rng)?)
                .or_insert(0) += 1;
        }
        tx.commit()?;
        if round % 5 == 0 {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert!(
        counts["insert"] > 1000 && counts["update"] > 500 && counts["delete"] > 300,
        "{counts:?}"
    );

    let status = agent.wait_drained(Duration::from_secs(120))?;
    let rows = assert_in_sync(&sb.hub, &agent)?;
    assert!(rows > 1000, "only {rows} rows compared");

    // Every feed applied each of its batches once, with nothing refused.
    for r in status["resources"].as_array().unwrap() {
        let feed = format!("GA-330902:{}", r["code"].as_str().unwrap());
        let f = sb.hub.feed_status(&feed)?.expect("feed at the hub");
        assert_eq!(f["last_seq"], r["head_seq"], "{feed}");
        assert_eq!(f["batches_applied"], f["last_seq"], "{feed}");
        assert_eq!(f["rejected"], 0, "{feed}");
        assert_eq!(f["signer"], agent.key.as_str(), "{feed}");
    }

    // CSV keeps NULL apart from the empty string.
    let csv = sb.hub.export_csv("X00/0001")?;
    let line = csv
        .lines()
        .find(|l| l.starts_with("null-vs-empty,"))
        .expect("row in csv");
    assert_eq!(line, "null-vs-empty,,,\"\",\\x,");
    assert!(csv.lines().next() == Some("id,n,r,t,b,untyped"));

    agent.stop()?;
    sb.hub.stop()?;
    Ok(())
}
