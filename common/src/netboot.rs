//! The netboot initramfs: where its files are, and what its `/init` allows
//! to boot.
//!
//! `imgbuild netboot` writes one [`BootPolicy`] into the trusted `initrd.img`
//! and `/init` (the boot mode of `imgdeploy`) reads nothing else to decide
//! what to trust. The image archive (`image.cpio`) is loaded *before* that
//! initrd, from wherever the boot loader got it, so it can add any file it
//! likes under any name the initrd does not itself carry. Hence:
//!
//! - the keys are inside the policy, never a directory listing, so an
//!   archive cannot add one;
//! - every other file `/init` uses (kernel modules, an optional rescue
//!   shell) is named here with its sha256 and checked before use, so an
//!   archive cannot substitute one;
//! - the channel and the lowest serial are fixed when the initrd is built, so
//!   an archive cannot bring another channel's image or an older one of ours.
//!
//! What the policy cannot stop: an archive loaded *after* the initrd, or a
//! replaced kernel, initrd or boot script. Those need a signed boot chain
//! (Secure Boot, iPXE code signing); see SECURITY.md.

use serde::{Deserialize, Serialize};

use crate::digest::Sha256Digest;

/// Where the policy lives inside the initramfs.
pub const BOOT_POLICY_PATH: &str = "/etc/imgdeploy/boot-policy.json";
/// The signed manifest, from `image.cpio`.
pub const MANIFEST_PATH: &str = "/imgdeploy/manifest.json";
/// Its signature, from `image.cpio`.
pub const SIGNATURE_PATH: &str = "/imgdeploy/manifest.json.sig";
/// The image, from `image.cpio`.
pub const IMAGE_PATH: &str = "/imgdeploy/image.squashfs";

/// `path` as a cpio member name (archives name members without the leading `/`).
pub fn member(path: &str) -> &str {
    path.trim_start_matches('/')
}
/// Network mode: where the downloaded image is kept (a tmpfs of its own,
/// moved into the booted system with the rest of `/run`).
pub const NET_IMAGE_DIR: &str = "/run/imgdeploy/net";
/// Network mode: the static busybox that brings the network up (`udhcpc`, `ip`).
pub const BUSYBOX_PATH: &str = "/bin/busybox";

/// Upper bound on the policy's size; a larger file is refused unread.
pub const MAX_BOOT_POLICY_BYTES: u64 = 1 << 20;

/// A file the trusted initrd brought, by path inside the initramfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BroughtFile {
    /// Absolute path inside the initramfs.
    pub path: String,
    /// Its content's sha256.
    pub sha256: Sha256Digest,
}

/// Everything `/init` trusts, fixed when the initrd was built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootPolicy {
    /// The only channel whose manifests boot.
    pub channel: String,
    /// The lowest serial that boots: the one packaged when the initrd was built.
    pub min_serial: u64,
    /// Trusted public keys, PEM.
    pub keys: Vec<String>,
    /// Kernel modules to load, in order.
    pub modules: Vec<BroughtFile>,
    /// The rescue shell for `imgdeploy.onfail=shell`, if one was packed.
    pub shell: Option<BroughtFile>,
    /// Network mode, if the initrd was built for it (`imgbuild netboot
    /// --channel-url`): `/init` fetches the channel's current image instead
    /// of booting one from an archive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkPolicy>,
}

/// What network mode brings and where it looks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicy {
    /// The channel's manifest URLs, tried in order (mirrors).
    /// `imgdeploy.url=` on the kernel command line replaces them.
    pub urls: Vec<String>,
    /// A static busybox at [`BUSYBOX_PATH`] for `udhcpc` and `ip`.
    pub busybox: BroughtFile,
    /// Network drivers, loaded after [`BootPolicy::modules`]; one that does
    /// not load only warns (the machine may have another NIC).
    pub modules: Vec<BroughtFile>,
}

impl BootPolicy {
    /// Parses the policy file's bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_unknown_fields() {
        let p = BootPolicy {
            channel: "stable".into(),
            min_serial: 7,
            keys: vec!["-----BEGIN PUBLIC KEY-----\n...\n-----END PUBLIC KEY-----\n".into()],
            modules: vec![BroughtFile { path: "/lib/modules/loop.ko".into(), sha256: Sha256Digest::of_bytes(b"x") }],
            shell: None,
            network: None,
        };
        let json = serde_json::to_vec(&p).unwrap();
        assert_eq!(BootPolicy::from_json(&json).unwrap(), p);
        let mut v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        v["extra_keys_dir"] = "/etc/imgdeploy/keys".into();
        assert!(BootPolicy::from_json(v.to_string().as_bytes()).is_err());
        // A policy written before network mode existed still reads.
        v.as_object_mut().unwrap().remove("extra_keys_dir");
        assert!(v.get("network").is_none());
        assert_eq!(BootPolicy::from_json(v.to_string().as_bytes()).unwrap(), p);
        let net = BootPolicy {
            network: Some(NetworkPolicy {
                urls: vec!["http://10.0.2.100/stable.json".into()],
                busybox: BroughtFile { path: BUSYBOX_PATH.into(), sha256: Sha256Digest::of_bytes(b"b") },
                modules: vec![],
            }),
            ..p
        };
        assert_eq!(BootPolicy::from_json(&serde_json::to_vec(&net).unwrap()).unwrap(), net);
    }
}
