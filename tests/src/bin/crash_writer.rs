//! A department application for the crash tests: writes random household
//! and land-parcel changes to a SQLite database in IMMEDIATE transactions,
//! forever, pausing in the middle of each transaction so that a SIGKILL
//! often lands while one is open. SQLite rolls an interrupted transaction
//! back when the database is next opened, so killing this process is how
//! the tests crash an embedded source database.
//!
//! Usage: `shuyuan-crash-writer DB SEED`

use std::time::Duration;

use anyhow::{Context, Result};
use shuyuan_tests::data::{self, Rng};
use shuyuan_tests::immediate;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let db = args.next().context("usage: shuyuan-crash-writer DB SEED")?;
    let seed: u64 = args
        .next()
        .context("usage: shuyuan-crash-writer DB SEED")?
        .parse()
        .context("SEED must be a number")?;
    let conn = rusqlite::Connection::open(&db).with_context(|| format!("cannot open {db}"))?;
    conn.busy_timeout(Duration::from_secs(30))?;
    let mut rng = Rng::new(seed);
    loop {
        let tx = immediate(&conn)?;
        let changes = 1 + rng.below(30);
        for i in 0..changes {
            let table = if rng.below(4) == 0 {
                "land_parcel"
            } else {
                "household"
            };
            data::churn_one(&tx, table, &mut rng)?;
            if i == changes / 2 {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        tx.commit()?;
        std::thread::sleep(Duration::from_millis(20));
    }
}
