//! `imgdeploy` entry point: parse, set up logging, run, report.
use clap::Parser;
use imgdeploy_common::cli::{exit_code, init_logging};
use imgdeploy_deployer::cli::{run, Cli};

fn main() -> std::process::ExitCode {
    // As PID 1 of a netboot initramfs (`imgbuild netboot`), there is no config: boot the image.
    if std::process::id() == 1 {
        imgdeploy_deployer::boot::boot_main();
    }
    let cli = Cli::parse();
    init_logging("IMGDEPLOY_LOG", cli.global.quiet, cli.global.verbose);
    exit_code(run(cli))
}
