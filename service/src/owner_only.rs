//! What only the service's own user may read: the data directory (mode
//! 0700) and the redb files in it (0600), whatever the umask of whoever
//! started the service. Under systemd the units' `UMask=0077` gives the
//! same; started by hand (or by `init`) the usual umask 022 would make them
//! readable by every local user.
//!
//! Invariant: a directory or file made here never exists with a wider mode,
//! not even for a moment (the mode is given at creation, not by a `chmod`
//! after it). A redb file found with a wider mode is narrowed at once on
//! its open handle; a data directory found with a wider mode is left as it
//! is and warned about, naming the path and the fix (the operator chose its
//! place and may have set it up that way; the files in it are narrowed).

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The mode of a data directory.
pub const DIR_MODE: u32 = 0o700;
/// The mode of a redb file.
pub const FILE_MODE: u32 = 0o600;

/// Whether a mode lets users other than the owner in.
fn wider(mode: u32) -> bool {
    mode & 0o077 != 0
}

/// Creates `dir` and its missing parents with mode 0700. An existing
/// directory keeps its mode; a wider one is warned about.
pub fn create_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o7777;
    if wider(mode) {
        tracing::warn!(
            path = %dir.display(),
            mode = format!("{mode:04o}"),
            "the data directory is open to other users; `chmod 700 {}` to close it",
            dir.display()
        );
    }
    Ok(())
}

/// Opens (or creates) the file at `path` for reading and writing, with mode
/// 0600; an existing file with a wider mode is narrowed to 0600.
pub fn open_file(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(path)?;
    let mode = file.metadata()?.permissions().mode() & 0o7777;
    if wider(mode) {
        file.set_permissions(Permissions::from_mode(FILE_MODE))?;
        tracing::warn!(
            path = %path.display(),
            mode = format!("{mode:04o}"),
            "narrowed a file other users could read to mode 0600"
        );
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn directories_and_files_are_made_for_the_owner_only() {
        // Whatever the umask of the test run (usually 022).
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("var").join("data");
        create_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&tmp.path().join("var")), 0o700);
        let file = dir.join("hub.redb");
        drop(open_file(&file).unwrap());
        assert_eq!(mode(&file), 0o600);
    }

    #[test]
    fn a_file_others_could_read_is_narrowed_and_a_wide_directory_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, Permissions::from_mode(0o750)).unwrap();
        create_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o750, "the operator's directory is left alone");
        let file = dir.join("outbox.redb");
        std::fs::write(&file, b"kept").unwrap();
        std::fs::set_permissions(&file, Permissions::from_mode(0o644)).unwrap();
        drop(open_file(&file).unwrap());
        assert_eq!(mode(&file), 0o600);
        assert_eq!(std::fs::read(&file).unwrap(), b"kept");
    }
}
