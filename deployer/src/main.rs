//! `imgdeploy` entry point: parse, set up logging, run, report.
use clap::Parser;
use imgdeploy_common::cli::{exit_code, init_logging};
use imgdeploy_deployer::cli::{run, started_as_init, Cli};

fn main() -> std::process::ExitCode {
    // As `/init` of a netboot initramfs (`imgbuild netboot`) there is no
    // config and no command line: boot the image. Being PID 1 alone (a
    // container, `unshare -pf`) is not enough.
    if started_as_init(std::env::args_os().next().as_deref()) {
        imgdeploy_deployer::boot::init_main();
    }
    let cli = Cli::parse();
    init_logging("IMGDEPLOY_LOG", cli.global.quiet, cli.global.verbose);
    exit_code(run(cli))
}
