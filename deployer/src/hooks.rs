//! Operator hooks: `health_check` (before the switch; failure aborts) and
//! `post_switch` (after it, e.g. a graceful web server reload). Each runs as
//! `sh -c '<command> "$@"' imgdeploy <mount point>`, with the image's serial
//! and version in the environment, in a process group of its own, which is
//! killed whole after `hook_timeout` (so a hook's children die with it).

use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use imgdeploy_common::manifest::Manifest;

/// Why a hook failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The hook program could be changed by a user other than root.
    #[error("refusing to run {name}")]
    Unsafe {
        /// health_check or post_switch.
        name: &'static str,
        /// Why.
        #[source]
        source: crate::safety::UnsafeDir,
    },
    /// The shell could not be started.
    #[error("cannot run {name} `{command}`")]
    Spawn {
        /// health_check or post_switch.
        name: &'static str,
        /// The command.
        command: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Non-zero exit.
    #[error("{name} `{command}` failed ({status}) against {mount}")]
    Failed {
        /// health_check or post_switch.
        name: &'static str,
        /// The command.
        command: String,
        /// Exit status.
        status: String,
        /// The mount point it was given.
        mount: String,
    },
    /// Ran too long.
    #[error(
        "{name} `{command}` did not finish within {timeout:?} and was killed; raise hook_timeout or fix the command"
    )]
    Timeout {
        /// health_check or post_switch.
        name: &'static str,
        /// The command.
        command: String,
        /// The limit.
        timeout: Duration,
    },
}

/// Runs hook `name` with `command` against `mount`.
pub fn run_hook(
    name: &'static str,
    command: &str,
    mount: &Path,
    manifest: &Manifest,
    timeout: Duration,
) -> Result<(), HookError> {
    // A hook given by absolute path runs as root: it must be root's to change.
    if let Some(program) = command.split_whitespace().next().filter(|p| p.starts_with('/')) {
        crate::safety::check_trusted_file(Path::new(program), "hook program")
            .map_err(|source| HookError::Unsafe { name, source })?;
    }
    tracing::info!("running {name}: {command} {}", mount.display());
    let spawn_err = |source| HookError::Spawn { name, command: command.to_owned(), source };
    // Hook output is operator diagnostics: it goes to our stderr, never to stdout (data).
    let stderr = std::io::stderr().as_fd().try_clone_to_owned().map_err(spawn_err)?;
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("{command} \"$@\""))
        .arg("imgdeploy")
        .arg(mount)
        .env("IMGDEPLOY_MOUNT", mount)
        .env("IMGDEPLOY_SERIAL", manifest.serial.to_string())
        .env("IMGDEPLOY_VERSION", &manifest.version)
        .env("IMGDEPLOY_CHANNEL", &manifest.channel)
        .stdin(Stdio::null())
        .stdout(Stdio::from(stderr))
        .process_group(0)
        .spawn()
        .map_err(spawn_err)?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                return Err(HookError::Failed {
                    name,
                    command: command.to_owned(),
                    status: status.to_string(),
                    mount: mount.display().to_string(),
                })
            }
            Ok(None) if Instant::now() >= deadline => {
                // The whole group: `sh` and whatever it started. Best effort:
                // it may exit on its own between the check and the kill.
                let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
                let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait();
                return Err(HookError::Timeout { name, command: command.to_owned(), timeout });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(source) => return Err(HookError::Spawn { name, command: command.to_owned(), source }),
        }
    }
}
