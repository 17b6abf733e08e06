//! What the kernel command line asks of the netboot `/init`: pure parsing,
//! so every word it understands is table-tested without booting anything.
//!
//! Words it does not understand are left alone (they are the kernel's, or
//! the booted system's). A value it cannot use falls back to the default
//! rather than stopping the boot, except `ip=` with a bad address, which
//! would otherwise put the machine on the wrong network silently.

use std::net::Ipv4Addr;

use imgdeploy_common::location::Location;
use std::time::Duration;

/// What to do when no image could be booted (`imgdeploy.onfail=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFail {
    /// Power off (the default: a refused machine stays off until someone looks).
    PowerOff,
    /// Reboot (and try the boot loader again).
    Reboot,
    /// Run the shell the initrd brought, if any; otherwise power off.
    Shell,
}

/// An IPv4 address set by hand (`ip=` with a client address) or leased by DHCP.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ipv4Config {
    /// The interface, e.g. `eth0` (for `ip=`, `None` means the first one found).
    pub device: Option<String>,
    /// This machine's address.
    pub address: Ipv4Addr,
    /// The network's prefix length.
    pub prefix: u8,
    /// The default route, if any.
    pub gateway: Option<Ipv4Addr>,
    /// Name servers, in order.
    pub dns: Vec<Ipv4Addr>,
}

/// How the network comes up (`ip=`, in the kernel's own syntax).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpMode {
    /// DHCP (`udhcpc`) on `device`, or on each interface in turn.
    Dhcp {
        /// The one interface to use, if named.
        device: Option<String>,
    },
    /// A static address.
    Static(Ipv4Config),
    /// No network (`ip=off`): network mode cannot work.
    Off,
}

/// What the kernel command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootParams {
    /// tmpfs overlay for writes.
    pub overlay: bool,
    /// Program to exec in the new root.
    pub init: String,
    /// What to do when the image is refused.
    pub onfail: OnFail,
    /// Boot a manifest past its expiry.
    pub allow_expired: bool,
    /// Channel manifest URLs (`imgdeploy.url=`, repeatable, tried in
    /// order); they replace the ones the initrd was built with.
    pub urls: Vec<String>,
    /// How to bring the network up.
    pub ip: IpMode,
    /// How long network mode keeps trying before `onfail` (`imgdeploy.timeout=` seconds).
    pub timeout: Duration,
}

/// Network mode's default time budget: retries while the origin is down.
pub const DEFAULT_NET_TIMEOUT: Duration = Duration::from_secs(600);

impl Default for BootParams {
    fn default() -> Self {
        BootParams {
            overlay: true,
            init: "/sbin/init".into(),
            onfail: OnFail::PowerOff,
            allow_expired: false,
            urls: Vec::new(),
            ip: IpMode::Dhcp { device: None },
            timeout: DEFAULT_NET_TIMEOUT,
        }
    }
}

/// Why a command line cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("kernel command line: {word}: {problem}")]
pub struct ParamError {
    /// The word, as written.
    pub word: String,
    /// What is wrong with it, and what to write instead.
    pub problem: &'static str,
}

impl BootParams {
    /// Parses `/proc/cmdline`; the first word it cannot use is an error.
    pub fn parse(cmdline: &str) -> Result<Self, ParamError> {
        let (p, mut errors) = Self::parse_all(cmdline);
        if errors.is_empty() {
            Ok(p)
        } else {
            Err(errors.remove(0))
        }
    }

    /// Parses `/proc/cmdline`: what it could use, and every word it could
    /// not (so `/init` can refuse to boot and still honour `onfail`).
    pub fn parse_all(cmdline: &str) -> (Self, Vec<ParamError>) {
        let mut p = BootParams::default();
        let mut errors = Vec::new();
        for word in cmdline.split_whitespace() {
            if let Err(e) = p.apply(word) {
                errors.push(e);
            }
        }
        (p, errors)
    }

    fn apply(&mut self, word: &str) -> Result<(), ParamError> {
        let p = self;
        {
            match word.split_once('=') {
                Some(("imgdeploy.overlay", v)) => p.overlay = !matches!(v, "0" | "no" | "off" | "false"),
                Some(("imgdeploy.allow_expired", v)) => p.allow_expired = matches!(v, "1" | "yes" | "on" | "true"),
                Some(("imgdeploy.init", v)) if v.starts_with('/') => p.init = v.to_owned(),
                Some(("imgdeploy.onfail", "poweroff")) => p.onfail = OnFail::PowerOff,
                Some(("imgdeploy.onfail", "reboot")) => p.onfail = OnFail::Reboot,
                Some(("imgdeploy.onfail", "shell")) => p.onfail = OnFail::Shell,
                Some(("imgdeploy.url", v)) if Location::is_http_url(v) => p.urls.push(v.to_owned()),
                Some(("imgdeploy.url", _)) => {
                    return Err(ParamError { word: word.into(), problem: "must be an http:// or https:// URL" })
                }
                Some(("imgdeploy.timeout", v)) => match v.parse::<u64>() {
                    Ok(s) if s > 0 => p.timeout = Duration::from_secs(s),
                    _ => return Err(ParamError { word: word.into(), problem: "must be a number of seconds above 0" }),
                },
                Some(("ip", v)) => p.ip = parse_ip(v).map_err(|problem| ParamError { word: word.into(), problem })?,
                _ => {}
            }
        }
        Ok(())
    }
}

/// `ip=` as the kernel documents it (Documentation/admin-guide/nfs/nfsroot.rst):
/// `dhcp`/`on`/`any`, `off`/`none`, or
/// `<client-ip>:<server-ip>:<gw-ip>:<netmask>:<hostname>:<device>:<autoconf>:<dns0-ip>:<dns1-ip>`,
/// where an empty client address means DHCP on `<device>`.
fn parse_ip(v: &str) -> Result<IpMode, &'static str> {
    match v {
        "dhcp" | "on" | "any" | "both" | "bootp" => return Ok(IpMode::Dhcp { device: None }),
        "off" | "none" => return Ok(IpMode::Off),
        _ => {}
    }
    let f: Vec<&str> = v.split(':').collect();
    if f.len() < 2 {
        return Err("use ip=dhcp, ip=off, or ip=<client-ip>::<gw-ip>:<netmask>::<device>");
    }
    let field = |i: usize| f.get(i).copied().filter(|s| !s.is_empty());
    let device = field(5).map(str::to_owned);
    let Some(client) = field(0) else { return Ok(IpMode::Dhcp { device }) };
    let address: Ipv4Addr = client.parse().map_err(|_| "the client address is not an IPv4 address")?;
    let gateway = field(2).map(str::parse).transpose().map_err(|_| "the gateway is not an IPv4 address")?;
    let prefix = match field(3) {
        None => 24,
        Some(m) => {
            let mask: Ipv4Addr = m.parse().map_err(|_| "the netmask is not a dotted IPv4 mask")?;
            let bits = u32::from(mask);
            if bits.leading_ones() + bits.trailing_zeros() != 32 {
                return Err("the netmask is not a contiguous mask (like 255.255.255.0)");
            }
            bits.leading_ones() as u8
        }
    };
    let dns = [field(7), field(8)]
        .into_iter()
        .flatten()
        .map(str::parse)
        .collect::<Result<Vec<Ipv4Addr>, _>>()
        .map_err(|_| "a name server is not an IPv4 address")?;
    Ok(IpMode::Static(Ipv4Config { device, address, prefix, gateway, dns }))
}

/// Doubling waits between rounds of attempts, from 1 s up to `cap`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    cap: Duration,
}

impl Backoff {
    /// Starts at 1 s.
    pub fn new(cap: Duration) -> Self {
        Backoff { next: Duration::from_secs(1).min(cap), cap }
    }

    /// The wait before the next round.
    pub fn next_wait(&mut self) -> Duration {
        let w = self.next;
        self.next = (self.next * 2).min(self.cap);
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> BootParams {
        BootParams::parse(s).unwrap()
    }

    #[test]
    fn command_line() {
        assert_eq!(parse("quiet console=ttyS0"), BootParams::default());
        assert!(parse("imgdeploy.allow_expired=1").allow_expired);
        assert!(!parse("imgdeploy.allow_expired=0").allow_expired);
        let p = parse("imgdeploy.overlay=0 imgdeploy.init=/bin/sh imgdeploy.onfail=shell");
        assert_eq!((p.overlay, p.init.as_str(), p.onfail), (false, "/bin/sh", OnFail::Shell));
        assert!(parse("imgdeploy.overlay=1").overlay);
        assert_eq!(parse("imgdeploy.onfail=reboot").onfail, OnFail::Reboot);
        assert_eq!(parse("imgdeploy.onfail=reboot imgdeploy.onfail=poweroff").onfail, OnFail::PowerOff);
        let p = parse("imgdeploy.init=relative imgdeploy.onfail=explode");
        assert_eq!((p.init.as_str(), p.onfail), ("/sbin/init", OnFail::PowerOff));
    }

    #[test]
    fn network_words() {
        let p =
            parse("imgdeploy.url=http://a/stable.json ro imgdeploy.url=https://b/x/stable.json imgdeploy.timeout=30");
        assert_eq!(p.urls, ["http://a/stable.json", "https://b/x/stable.json"]);
        assert_eq!(p.timeout, Duration::from_secs(30));
        assert_eq!(parse("").timeout, DEFAULT_NET_TIMEOUT);
        for bad in ["imgdeploy.url=ftp://a/s.json", "imgdeploy.url=", "imgdeploy.timeout=0", "imgdeploy.timeout=soon"] {
            let e = BootParams::parse(bad).unwrap_err();
            assert_eq!(e.word, bad);
        }
        // A bad word does not lose the others: onfail still applies.
        let (p, errors) = BootParams::parse_all("imgdeploy.onfail=reboot ip=1.2.3 imgdeploy.timeout=x");
        assert_eq!((p.onfail, errors.len()), (OnFail::Reboot, 2));
        assert!(errors[0].to_string().contains("ip=1.2.3"), "{}", errors[0]);
    }

    #[test]
    fn ip_in_the_kernels_syntax() {
        for dhcp in ["ip=dhcp", "ip=on", "ip=any", ""] {
            assert_eq!(parse(dhcp).ip, IpMode::Dhcp { device: None }, "{dhcp}");
        }
        assert_eq!(parse("ip=off").ip, IpMode::Off);
        assert_eq!(parse("ip=none").ip, IpMode::Off);
        assert_eq!(parse("ip=:::::eth1:dhcp").ip, IpMode::Dhcp { device: Some("eth1".into()) });
        assert_eq!(
            parse("ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off:10.0.2.3").ip,
            IpMode::Static(Ipv4Config {
                device: Some("eth0".into()),
                address: Ipv4Addr::new(10, 0, 2, 15),
                prefix: 24,
                gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
                dns: vec![Ipv4Addr::new(10, 0, 2, 3)],
            })
        );
        let IpMode::Static(c) = parse("ip=192.168.7.9:1.2.3.4::255.255.240.0:host::none:9.9.9.9:1.1.1.1").ip else {
            panic!("not static")
        };
        assert_eq!((c.prefix, c.gateway, c.device, c.dns.len()), (20, None, None, 2));
        let IpMode::Static(c) = parse("ip=192.168.7.9:").ip else { panic!("not static") };
        assert_eq!(c.prefix, 24);
        assert_eq!(
            parse("ip=1.2.3.4::::::::").ip,
            IpMode::Static(Ipv4Config { address: Ipv4Addr::new(1, 2, 3, 4), ..c })
        );
        for bad in
            ["ip=10.0.2", "ip=10.0.2.300:", "ip=10.0.2.15::gw", "ip=10.0.2.15:::255.0.255.0", "ip=1.2.3.4:::::::x"]
        {
            assert!(BootParams::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let mut b = Backoff::new(Duration::from_secs(10));
        let waits: Vec<u64> = (0..6).map(|_| b.next_wait().as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 10, 10]);
        assert_eq!(Backoff::new(Duration::from_millis(300)).next_wait(), Duration::from_millis(300));
    }
}
