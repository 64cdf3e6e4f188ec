//! The README's first command works: the demo starts a district hub that
//! forwards to a city hub, and three agents; shows zero-updates, stops
//! cleanly and ends in sync at both levels.

use std::process::Command;

use anyhow::Result;

#[test]
fn the_demo_runs_and_ends_in_sync() -> Result<()> {
    shuyuan_tests::bin_dir();
    let dir = tempfile::tempdir()?;
    let out = Command::new(env!("CARGO_BIN_EXE_shuyuan-demo"))
        .arg("--dir")
        .arg(dir.path().join("demo"))
        .args(["--seconds", "22"])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.matches("the hub's copy equals the source").count(),
        3,
        "{stdout}"
    );
    assert_eq!(
        stdout
            .matches("the city hub's copy equals the source too")
            .count(),
        3,
        "{stdout}"
    );
    assert!(
        stdout.contains("ZR-330902:301015/00009") && stdout.contains("zero-update #"),
        "{stdout}"
    );
    assert!(stdout.contains("2 approved by the platform"), "{stdout}");
    assert!(
        stdout.contains("shuyuan-hub --config") && stdout.contains(" status"),
        "it says how to watch: {stdout}"
    );
    assert!(
        stdout.contains(
            "open the console (管理控制台) in a browser on this machine: http://127.0.0.1:"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("stopped cleanly"), "{stdout}");
    Ok(())
}
