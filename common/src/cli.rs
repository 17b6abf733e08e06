//! What both command-line entry points do around their library: log to
//! stderr at the level `-q`/`-v` ask for (an environment variable overrides
//! it), and turn the result into one `error:` line and an exit code. Only
//! built with the `cli` feature, so the libraries do not pull in a logger.

use std::io::IsTerminal;
use std::process::ExitCode;

/// Logs to stderr: errors only with `quiet`, else info, debug (`-v`) or
/// trace (`-vv`); `env_var` (e.g. `IMGDEPLOY_LOG=debug`) overrides it.
/// Colour only on a terminal and without `NO_COLOR`.
pub fn init_logging(env_var: &str, quiet: bool, verbose: u8) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env(env_var).unwrap_or_else(|_| level.into()))
        .without_time()
        .with_target(false)
        .with_ansi(std::env::var_os("NO_COLOR").is_none() && std::io::stderr().is_terminal())
        .init();
}

/// Success, or the error chain on one `error:` line and exit code 1.
pub fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line ([`crate::report::Chain`]).
pub fn one_line(e: &anyhow::Error) -> String {
    crate::report::one_line(e.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read {path}; pass --config")]
    struct ReadError {
        path: &'static str,
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn the_context_then_each_cause_then_the_advice() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let e = anyhow::Error::new(ReadError { path: "/x.toml", source: io }).context("loading the config");
        assert_eq!(one_line(&e), "loading the config: cannot read /x.toml: No such file or directory; pass --config");
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(one_line(&plain), "outer: inner");
    }
}
