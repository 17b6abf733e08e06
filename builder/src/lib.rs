//! `imgbuild`: turns a master tree into a signed, reproducible zstd squashfs
//! image and publishes it into a repository directory that any static HTTP
//! server can serve.
//!
//! The pieces, in the order a build uses them: [`publish_tree`] runs
//! `imgbuild build`: [`tree`] reads the source tree, [`image`] writes it
//! through [`sqfs`] (our libsquashfs binding), whose blocks [`blocks`]
//! compresses or reuses from earlier images and maps, [`publish`] signs the
//! manifest and lays out the repository. [`channel`] re-signs what a channel serves
//! (`rollout`, `refresh`, `promote`), [`gc`] prunes the repository,
//! [`keygen`] makes keys, [`inspect`] and [`verify`] look at the result,
//! [`netboot`] (with [`cpio`]) builds the PXE artifacts. [`cli`] maps the
//! command line onto these.

pub mod blocks;
pub mod channel;
pub mod cli;
pub mod cpio;
pub mod deltas;
pub mod gc;
pub mod image;
pub mod inspect;
pub mod keygen;
pub mod netboot;
pub mod publish;
pub mod publish_tree;
pub mod sqfs;
pub mod tree;
pub mod verify;
