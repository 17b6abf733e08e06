//! `imgdeploy` entry point: parse, set up logging, run, report.
use clap::Parser;
use imgdeploy_deployer::cli::{run, Cli};

fn main() -> std::process::ExitCode {
    // As PID 1 of a netboot initramfs (`imgbuild netboot`), there is no config: boot the image.
    if std::process::id() == 1 {
        imgdeploy_deployer::boot::boot_main();
    }
    let cli = Cli::parse();
    let level = match (cli.global.quiet, cli.global.verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("IMGDEPLOY_LOG").unwrap_or_else(|_| level.into()))
        .without_time()
        .with_target(false)
        .with_ansi(std::env::var_os("NO_COLOR").is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
