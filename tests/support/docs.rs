//! Shell completions and man pages of both binaries, generated from their
//! clap definitions. `cargo run -p imgdeploy-tests --bin gen-docs` writes them
//! into `doc/`; the test `docs_are_current` fails when they are stale.

use std::path::{Path, PathBuf};

use clap::CommandFactory;

/// Every generated file: (path relative to the repository root, contents).
pub fn generate() -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, mut cmd) in
        [("imgbuild", imgdeploy_builder::cli::Cli::command()), ("imgdeploy", imgdeploy_deployer::cli::Cli::command())]
    {
        cmd = cmd.name(name).bin_name(name);
        cmd.build();
        for (shell, file) in [
            (clap_complete::Shell::Bash, format!("doc/completions/{name}.bash")),
            (clap_complete::Shell::Zsh, format!("doc/completions/_{name}")),
            (clap_complete::Shell::Fish, format!("doc/completions/{name}.fish")),
        ] {
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd.clone(), name, &mut buf);
            out.push((PathBuf::from(file), buf));
        }
        man_pages(&cmd, name, &mut out);
    }
    out
}

fn man_pages(cmd: &clap::Command, name: &str, out: &mut Vec<(PathBuf, Vec<u8>)>) {
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut buf).expect("rendering into memory");
    out.push((PathBuf::from(format!("doc/man/{name}.1")), buf));
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help" && !s.is_hide_set()) {
        let full = format!("{name}-{}", sub.get_name());
        let mut buf = Vec::new();
        clap_mangen::Man::new(sub.clone().name(&*Box::leak(full.clone().into_boxed_str())))
            .render(&mut buf)
            .expect("rendering into memory");
        out.push((PathBuf::from(format!("doc/man/{full}.1")), buf));
    }
}

/// Writes every generated file under `root`.
pub fn write(root: &Path) -> std::io::Result<()> {
    for (rel, bytes) in generate() {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().expect("has a parent"))?;
        std::fs::write(p, bytes)?;
    }
    Ok(())
}
