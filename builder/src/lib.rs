//! `imgbuild`: turns a master tree into a signed, reproducible zstd squashfs
//! image and publishes it into a repository directory that any static HTTP
//! server can serve.
//!
//! The pieces, in the order a build uses them: [`tree`] reads the source
//! tree, [`image`] writes it through [`sqfs`] (our libsquashfs binding),
//! [`publish`] signs the manifest and lays out the repository, [`gc`] prunes
//! it, [`keygen`] makes keys, [`inspect`] and [`verify`] look at the result.
//! [`cli`] maps the command line onto these.

pub mod channel;
pub mod cli;
pub mod cpio;
pub mod gc;
pub mod image;
pub mod inspect;
pub mod keygen;
pub mod netboot;
pub mod pack;
pub mod publish;
pub mod sqfs;
pub mod tree;
pub mod verify;
