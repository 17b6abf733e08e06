//! `imgbuild` entry point: parse, set up logging, run, report.
use clap::Parser;
use imgdeploy_builder::cli::{run, Cli};
use imgdeploy_common::cli::{exit_code, init_logging};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging("IMGBUILD_LOG", cli.global.quiet, cli.global.verbose);
    exit_code(run(cli))
}
