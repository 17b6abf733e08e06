//! One `imgdeploy` at a time per state directory: an exclusive `flock` on
//! `STATE_DIR/lock`, released by the kernel when the process exits (even by
//! SIGKILL), so a crash never leaves a stale lock.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

/// Held while we work.
pub struct StateLock {
    _lock: Flock<File>,
}

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another run holds it.
    #[error("another imgdeploy is working on {dir} (pid {holder}); wait for it to finish")]
    Busy {
        /// The state directory.
        dir: String,
        /// Pid written by the holder.
        holder: String,
    },
    /// The lock file could not be opened.
    #[error("cannot open lock file in {dir}")]
    Io {
        /// The state directory.
        dir: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Takes the lock without waiting.
pub fn lock(state_dir: &Path) -> Result<StateLock, LockError> {
    let dir = state_dir.display().to_string();
    let path = state_dir.join("lock");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        // Root's alone: with the state directory readable by all (so that
        // readers reach the mount points), a world-readable lock file would
        // let any local user flock(2) it and stall every apply.
        .mode(0o600)
        .open(&path)
        .map_err(|source| LockError::Io { dir: dir.clone(), source })?;
    // A lock file made by an older release may be 0644.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|source| LockError::Io { dir: dir.clone(), source })?;
    let mut holder = String::new();
    // Only for the message; an unreadable pid is shown as "?".
    let _ = f.read_to_string(&mut holder);
    let mut lock = Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|(_, _)| LockError::Busy {
        dir: dir.clone(),
        holder: if holder.trim().is_empty() { "?".into() } else { holder.trim().to_owned() },
    })?;
    // Record our pid for the next one's message (not relied on for correctness).
    let _ = lock.set_len(0);
    let _ = lock.rewind();
    let _ = write!(lock, "{}", std::process::id());
    Ok(StateLock { _lock: lock })
}
