//! A small real filesystem for disk-full tests: a tmpfs mounted over a
//! directory of the sandbox, grown again when a test gives space back.
//! Mounting needs root (CI runs as root); without it the test fails and
//! says why instead of passing untested.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// A tmpfs mounted at a directory; unmounted when dropped.
#[derive(Debug)]
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount` syntax: `8m`) at `dir`, creating it.
    pub fn mount(dir: &Path, size: &str) -> Result<Tmpfs> {
        std::fs::create_dir_all(dir)?;
        mount(
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ],
            dir,
        )
        .context("disk-full tests mount a small tmpfs and must run as root")?;
        Ok(Tmpfs {
            dir: dir.to_owned(),
        })
    }

    /// Grows (or shrinks) the filesystem to `size` without unmounting it.
    pub fn resize(&self, size: &str) -> Result<()> {
        mount(&["-o", &format!("remount,size={size}")], &self.dir)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn mount(args: &[&str], dir: &Path) -> Result<()> {
    let out = Command::new("mount")
        .args(args)
        .arg(dir)
        .output()
        .context("cannot run mount")?;
    if !out.status.success() {
        bail!(
            "mount {} {} failed: {}",
            args.join(" "),
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily, in case a process killed by the test still holds a file.
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}
