//! Measures delta sizes for chunking parameters: how many bytes of NEW are
//! in chunks OLD does not have, plus the index itself.
//!
//!   cargo run --release -p imgdeploy-common --example chunkdiff OLD NEW
use std::collections::HashSet;
use std::fs::File;
use std::io::BufReader;

use imgdeploy_common::chunk::{ChunkIndex, ChunkParams};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (old, new) = (&args[1], &args[2]);
    println!("{:>8} {:>8} {:>8} {:>12} {:>10} {:>12}", "min", "avg", "max", "missing B", "index B", "total B");
    for (min, avg, max) in [(4, 16, 64), (8, 32, 128), (16, 64, 256), (32, 128, 512)] {
        let p = ChunkParams { min: min << 10, avg: avg << 10, max: max << 10 };
        let (io, _, _) = ChunkIndex::build(BufReader::new(File::open(old).unwrap()), p).unwrap();
        let (inew, _, _) = ChunkIndex::build(BufReader::new(File::open(new).unwrap()), p).unwrap();
        let have: HashSet<_> = io.chunks.iter().map(|c| c.hash).collect();
        let missing: u64 = inew.chunks.iter().filter(|c| !have.contains(&c.hash)).map(|c| c.len as u64).sum();
        let index = inew.encode().len() as u64;
        println!("{:>8} {:>8} {:>8} {:>12} {:>10} {:>12}", min, avg, max, missing, index, missing + index);
    }
}
