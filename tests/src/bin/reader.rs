//! A reader for the end-to-end tests, run as an unprivileged user (the way
//! a web server reads the deployed tree): reads FILE in a loop until
//! STOPFILE exists, counting reads that return one of the ALLOWED contents
//! and errors (failed reads or any other content), then prints
//! `reads=N errors=M` and the first error.
//!
//! Usage: `reader FILE STOPFILE ALLOWED...`

use std::path::PathBuf;

fn main() {
    let mut args = std::env::args_os().skip(1);
    let (Some(file), Some(stop)) = (args.next().map(PathBuf::from), args.next().map(PathBuf::from)) else {
        eprintln!("usage: reader FILE STOPFILE ALLOWED...");
        std::process::exit(2);
    };
    let allowed: Vec<String> = args.map(|a| a.to_string_lossy().into_owned()).collect();
    let (mut reads, mut errors, mut first_error) = (0u64, 0u64, None::<String>);
    loop {
        match std::fs::read_to_string(&file) {
            Ok(s) if allowed.contains(&s) => reads += 1,
            other => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("{other:?}"));
            }
        }
        // Checking for the stop file every read would halve the read rate.
        if (reads + errors) % 256 == 0 && stop.exists() {
            break;
        }
    }
    println!("reads={reads} errors={errors}");
    if let Some(e) = first_error {
        println!("first_error={e}");
    }
}
