//! Network mode's network: one IPv4 interface up, by DHCP or `ip=`.
//!
//! We write no DHCP client. The trusted initrd brings Debian's static
//! busybox; its `udhcpc` runs with `/init` itself as the lease script
//! (`-s /init`), so no shell script is involved: called that way, `/init`
//! only writes the lease it was handed to `/run/imgdeploy/dhcp/<if>.json`
//! and exits ([`dhcp_event`]). PID 1 then sets the address and the route with
//! busybox `ip`, and writes the resolver's files afresh, so a name server or
//! an NSS module an earlier archive planted in `/etc` is never consulted.
//! (The static glibc resolves names itself from `/etc/hosts` and
//! `/etc/resolv.conf`, with no shared library.)

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use imgdeploy_common::netboot::{BroughtFile, NetworkPolicy};

use super::open_brought;
use super::params::{IpMode, Ipv4Config};

/// Where the lease script leaves each interface's lease.
const LEASE_DIR: &str = "/run/imgdeploy/dhcp";
/// How long to wait for a network driver to register its interface.
const INTERFACE_WAIT: Duration = Duration::from_secs(10);

/// The events udhcpc calls its script with.
const DHCP_EVENTS: [&str; 5] = ["deconfig", "bound", "renew", "leasefail", "nak"];

/// If this process is udhcpc calling `/init` as its lease script (not PID
/// 1, one argument that is a udhcpc event, `interface` in the
/// environment), the event.
pub fn dhcp_event(args: &[String]) -> Option<&str> {
    match args {
        [_, event] if std::process::id() != 1 && std::env::var_os("interface").is_some() => {
            DHCP_EVENTS.contains(&event.as_str()).then_some(event.as_str())
        }
        _ => None,
    }
}

/// Handles one lease-script event: on `bound` or `renew` writes the lease
/// for PID 1. Returns the exit status for udhcpc.
pub fn handle_dhcp_event(event: &str) -> i32 {
    if !matches!(event, "bound" | "renew") {
        return 0;
    }
    let lease = lease_from_env(|k| std::env::var(k).ok());
    let written = lease.map_err(anyhow::Error::msg).and_then(|l| {
        let dev = l.device.clone().unwrap_or_default();
        fs::create_dir_all(LEASE_DIR)?;
        let path = lease_path(&dev);
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, serde_json::to_vec(&l)?)?;
        fs::rename(&tmp, &path)?;
        Ok(())
    });
    match written {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("imgdeploy: DHCP lease not usable: {e:#}");
            1
        }
    }
}

fn lease_path(dev: &str) -> PathBuf {
    Path::new(LEASE_DIR).join(format!("{dev}.json"))
}

/// A lease from udhcpc's environment: `interface`, `ip`, `subnet` (or
/// `mask`), `router` and `dns` (space-separated lists).
pub fn lease_from_env(get: impl Fn(&str) -> Option<String>) -> Result<Ipv4Config, String> {
    let addr = |name: &str, v: &str| v.parse::<Ipv4Addr>().map_err(|_| format!("{name}={v} is not an IPv4 address"));
    let device = get("interface").filter(|d| valid_interface(d)).ok_or("no usable interface name")?;
    let address = addr("ip", &get("ip").ok_or("the lease has no address")?)?;
    let prefix = match (get("mask"), get("subnet")) {
        (Some(m), _) => m.parse::<u8>().ok().filter(|p| *p <= 32).ok_or(format!("mask={m} is not a prefix length"))?,
        (None, Some(s)) => {
            let bits = u32::from(addr("subnet", &s)?);
            if bits.leading_ones() + bits.trailing_zeros() != 32 {
                return Err(format!("subnet={s} is not a contiguous mask"));
            }
            bits.leading_ones() as u8
        }
        (None, None) => 24,
    };
    let list = |name: &str| -> Result<Vec<Ipv4Addr>, String> {
        get(name).unwrap_or_default().split_whitespace().map(|v| addr(name, v)).collect()
    };
    let gateway = list("router")?.into_iter().next();
    Ok(Ipv4Config { device: Some(device), address, prefix, gateway, dns: list("dns")? })
}

/// An interface name the kernel could have made (and safe in a path).
fn valid_interface(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
}

/// Runs a busybox applet ([`bring_up`] checked busybox against the policy).
fn busybox(bb: &BroughtFile, args: &[&str]) -> Result<String> {
    let out = Command::new(&bb.path)
        .args(args)
        .env_clear()
        .output()
        .with_context(|| format!("running {} {}", bb.path, args.join(" ")))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("busybox {} failed ({}): {}", args.join(" "), out.status, text.trim());
    }
    Ok(text)
}

/// The network interfaces other than loopback, sorted, waiting up to
/// [`INTERFACE_WAIT`] for the first to appear (drivers probe asynchronously).
fn interfaces() -> Result<Vec<String>> {
    let started = Instant::now();
    loop {
        let mut found: Vec<String> = fs::read_dir("/sys/class/net")
            .context("listing /sys/class/net")?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "lo" && valid_interface(n))
            .collect();
        found.sort();
        if !found.is_empty() {
            return Ok(found);
        }
        if started.elapsed() > INTERFACE_WAIT {
            bail!(
                "no network interface appeared within {} s; is the NIC's driver in the initrd \
                 (imgbuild netboot --net-modules NAME)?",
                INTERFACE_WAIT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Brings one interface up as `mode` says; returns what it got.
pub fn bring_up(net: &NetworkPolicy, mode: &IpMode) -> Result<Ipv4Config> {
    let bb = &net.busybox;
    // Checked once: nothing else runs in the initramfs until the switch.
    open_brought(bb)?;
    busybox(bb, &["ip", "link", "set", "dev", "lo", "up"])?;
    let config = match mode {
        IpMode::Off => bail!("ip=off, but network mode needs the network; remove ip=off or boot an image.cpio"),
        IpMode::Static(c) => {
            let mut c = c.clone();
            if c.device.is_none() {
                c.device = Some(interfaces()?.remove(0));
            }
            c
        }
        IpMode::Dhcp { device } => {
            let candidates = match device {
                Some(d) => vec![d.clone()],
                None => interfaces()?,
            };
            let mut tried = Vec::new();
            let mut leased = None;
            for dev in &candidates {
                match dhcp(bb, dev) {
                    Ok(l) => {
                        leased = Some(l);
                        break;
                    }
                    Err(e) => tried.push(format!("{dev}: {e:#}")),
                }
            }
            match leased {
                Some(l) => l,
                None => bail!("no DHCP lease ({}); check the DHCP server, or set ip= by hand", tried.join("; ")),
            }
        }
    };
    configure(bb, &config)?;
    write_resolver(Path::new("/etc"), &config.dns)?;
    Ok(config)
}

/// One DHCP exchange on `dev` (about 9 s at most).
fn dhcp(bb: &BroughtFile, dev: &str) -> Result<Ipv4Config> {
    let path = lease_path(dev);
    let _ = fs::remove_file(&path);
    busybox(bb, &["ip", "link", "set", "dev", dev, "up"])?;
    busybox(bb, &["udhcpc", "-i", dev, "-f", "-q", "-n", "-t", "3", "-T", "3", "-s", "/init"])
        .context("no answer from a DHCP server")?;
    let bytes = fs::read(&path).with_context(|| format!("udhcpc left no lease in {}", path.display()))?;
    let lease: Ipv4Config = serde_json::from_slice(&bytes).context("reading the lease")?;
    if lease.device.as_deref() != Some(dev) {
        bail!("udhcpc leased an address for {:?}, not {dev}", lease.device);
    }
    Ok(lease)
}

/// Sets the address and default route of `c.device`.
fn configure(bb: &BroughtFile, c: &Ipv4Config) -> Result<()> {
    let dev = c.device.as_deref().context("no interface to configure")?;
    let cidr = format!("{}/{}", c.address, c.prefix);
    busybox(bb, &["ip", "link", "set", "dev", dev, "up"])?;
    busybox(bb, &["ip", "addr", "flush", "dev", dev])?;
    busybox(bb, &["ip", "addr", "add", &cidr, "dev", dev])?;
    if let Some(gw) = c.gateway {
        busybox(bb, &["ip", "route", "replace", "default", "via", &gw.to_string(), "dev", dev])?;
    }
    Ok(())
}

/// Writes `hosts`, `nsswitch.conf` and `resolv.conf` under `etc` from
/// scratch: whatever an earlier archive put there (a file, a symlink, a
/// directory) is removed first, so names resolve only through `dns`.
pub fn write_resolver(etc: &Path, dns: &[Ipv4Addr]) -> Result<()> {
    let resolv: String = dns.iter().take(3).map(|d| format!("nameserver {d}\n")).collect();
    for (name, text) in [
        ("hosts", "127.0.0.1 localhost\n".to_owned()),
        ("nsswitch.conf", "hosts: files dns\n".to_owned()),
        ("resolv.conf", resolv),
        ("host.conf", "multi on\n".to_owned()),
    ] {
        let path = etc.join(name);
        match fs::symlink_metadata(&path) {
            Ok(md) if md.is_dir() => fs::remove_dir_all(&path)?,
            Ok(_) => fs::remove_file(&path)?,
            Err(_) => {}
        }
        fs::create_dir_all(etc)?;
        use std::io::Write;
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn a_lease_from_udhcpcs_environment() {
        let l = lease_from_env(env(&[
            ("interface", "eth0"),
            ("ip", "10.0.2.15"),
            ("subnet", "255.255.255.0"),
            ("router", "10.0.2.2 10.0.2.1"),
            ("dns", "10.0.2.3 9.9.9.9"),
        ]))
        .unwrap();
        assert_eq!(l.device.as_deref(), Some("eth0"));
        assert_eq!(
            (l.address, l.prefix, l.gateway),
            (Ipv4Addr::new(10, 0, 2, 15), 24, Some(Ipv4Addr::new(10, 0, 2, 2)))
        );
        assert_eq!(l.dns, [Ipv4Addr::new(10, 0, 2, 3), Ipv4Addr::new(9, 9, 9, 9)]);
        // `mask` wins over `subnet`; no router, no dns is fine.
        let l = lease_from_env(env(&[("interface", "enp1s0"), ("ip", "192.168.1.9"), ("mask", "20"), ("subnet", "x")]))
            .unwrap();
        assert_eq!((l.prefix, l.gateway, l.dns.len()), (20, None, 0));
        for bad in [
            vec![("ip", "10.0.2.15")],
            vec![("interface", "../../etc"), ("ip", "10.0.2.15")],
            vec![("interface", "eth0")],
            vec![("interface", "eth0"), ("ip", "10.0.2")],
            vec![("interface", "eth0"), ("ip", "10.0.2.15"), ("mask", "33")],
            vec![("interface", "eth0"), ("ip", "10.0.2.15"), ("subnet", "255.0.255.0")],
            vec![("interface", "eth0"), ("ip", "10.0.2.15"), ("router", "gw")],
            vec![("interface", "eth0"), ("ip", "10.0.2.15"), ("dns", "10.0.2.3 ns")],
        ] {
            assert!(lease_from_env(env(&bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn interface_names() {
        for ok in ["eth0", "enp0s3", "ens1f0np0", "wlan0", "br-lan", "eth0.100"] {
            assert!(valid_interface(ok), "{ok}");
        }
        assert!(valid_interface("fifteen-chars15"), "IFNAMSIZ allows 15 characters");
        for bad in ["", ".", "..", "a/b", "sixteen-chars-16", "eth 0"] {
            assert!(!valid_interface(bad), "{bad}");
        }
    }

    #[test]
    fn the_resolver_files_replace_whatever_was_planted() {
        let d = tempfile::tempdir().unwrap();
        let etc = d.path().join("etc");
        fs::create_dir_all(etc.join("nsswitch.conf")).unwrap();
        fs::write(etc.join("nsswitch.conf/x"), "hosts: evil").unwrap();
        std::os::unix::fs::symlink("/proc/self/environ", etc.join("hosts")).unwrap();
        fs::write(etc.join("resolv.conf"), "nameserver 6.6.6.6\n").unwrap();
        write_resolver(&etc, &[Ipv4Addr::new(10, 0, 2, 3)]).unwrap();
        assert_eq!(fs::read_to_string(etc.join("nsswitch.conf")).unwrap(), "hosts: files dns\n");
        assert_eq!(fs::read_to_string(etc.join("hosts")).unwrap(), "127.0.0.1 localhost\n");
        assert!(!fs::symlink_metadata(etc.join("hosts")).unwrap().is_symlink());
        assert_eq!(fs::read_to_string(etc.join("resolv.conf")).unwrap(), "nameserver 10.0.2.3\n");
    }
}
