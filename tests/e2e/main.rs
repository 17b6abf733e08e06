//! End-to-end tests: the real binaries against real kernel mounts and a real
//! nginx. Privileged tests are named `privileged_*`; they skip without root on
//! a laptop and fail under `CI=true` instead of skipping.
//!
//! - `blocks`: block maps (every block recompresses to the image's bytes,
//!   every file rebuilds from its blocks) and incremental builds (the same
//!   image as from scratch after every kind of change; never copied from a
//!   corrupted, missing or differently compressed earlier image).
//! - `builder`: imgbuild — faithful round trips through the kernel and
//!   unsquashfs, reproducibility, signatures with openssl, bad input, gc.
//! - `deployer`: imgdeploy against nginx — full cycle, drain, switches under
//!   load, SIGKILL at many points, resume, every bad input, disk full, boot.
//! - `delta`: delta updates — byte-identical results, fallbacks, tampering, resume.
//! - `fleet`: staged rollout, promotion, 50 frontends through a caching edge,
//!   metrics, CI scripts.
//! - `reliability`: more server faults, a crash loop of SIGKILLs, key rotation.
//! - `powerloss`: a qemu guest applies two updates while qemu logs its disk
//!   writes; every power cut rebuilt from the log leaves one consistent version.
//! - `netboot`: imgbuild netboot artifacts booted in qemu (TCG) to a marker;
//!   a tampered image is refused at boot.
//! - `private_origin`: TLS with its own CA, a client certificate and a bearer
//!   token; refused without each; the token reaches no one else.
//! - `verity`: the dm-verity hash tree of every image, checked and rewritten
//!   byte for byte by veritysetup.

mod blocks;
mod builder;
mod delta;
mod deployer;
mod docs;
mod field;
mod fleet;
mod netboot;
mod powerloss;
mod private_origin;
mod reliability;
mod static_delta;
mod trust;
mod verity;
