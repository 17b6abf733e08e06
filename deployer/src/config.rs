//! `/etc/imgdeploy/imgdeploy.toml`: what to deploy, from where, trusting
//! which keys, and where the active tree appears.
//!
//! Parsing is strict (unknown keys are errors, so a typo such as
//! `alow_downgrade` cannot silently keep a default), and errors name the
//! file, line and key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use imgdeploy_common::location::Location;
use imgdeploy_common::manifest::validate_channel;
use imgdeploy_common::sign::PublicKey;
use imgdeploy_common::transport::{PrivateOrigin, Transport, TransportError};
use serde::Deserialize;

/// The default config file.
pub const DEFAULT_CONFIG: &str = "/etc/imgdeploy/imgdeploy.toml";

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}; pass --config or set IMGDEPLOY_CONFIG")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Syntax or type error.
    #[error("{path}:{line}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong, naming the key.
        message: String,
    },
    /// The file, a key file, or a directory above one could be changed by
    /// a user other than root.
    #[error(transparent)]
    Unsafe(#[from] crate::safety::UnsafeDir),
    /// The private origin's credentials cannot be used.
    #[error(transparent)]
    Origin(#[from] TransportError),
    /// A value is not acceptable.
    #[error("{path}: `{key}` {message}")]
    Value {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    source: String,
    channel: Option<String>,
    trusted_keys: Vec<PathBuf>,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    link: PathBuf,
    #[serde(default)]
    mount_options: String,
    #[serde(default)]
    allow_devices_and_setuid: bool,
    #[serde(default)]
    require_verity: bool,
    #[serde(default)]
    on_drain_timeout: DrainTimeoutAction,
    #[serde(default = "default_drain_timeout")]
    drain_timeout: String,
    health_check: Option<String>,
    #[serde(default = "default_hook_timeout")]
    hook_timeout: String,
    post_switch: Option<String>,
    #[serde(default)]
    allow_downgrade: bool,
    machine_id: Option<String>,
    metrics_file: Option<PathBuf>,
    #[serde(default = "default_download_timeout")]
    download_timeout: String,
    http_headers_file: Option<PathBuf>,
    tls_ca_bundle: Option<PathBuf>,
    tls_client_cert: Option<PathBuf>,
    tls_client_key: Option<PathBuf>,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/imgdeploy")
}
fn default_drain_timeout() -> String {
    "5m".into()
}
fn default_download_timeout() -> String {
    "2h".into()
}
fn default_hook_timeout() -> String {
    "2m".into()
}

/// What to do with an old slot that processes still use when `drain_timeout` runs out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DrainTimeoutAction {
    /// Lazily unmount it (`umount -l`): the update goes on, and the processes
    /// still inside keep a consistent view of the old version until they exit.
    #[default]
    Detach,
    /// Leave it mounted; the next apply that needs the slot fails and names them.
    Fail,
}

/// Mount flags (the mount is always read-only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountOptions {
    /// `nodev`.
    pub nodev: bool,
    /// `nosuid`.
    pub nosuid: bool,
    /// `noexec`.
    pub noexec: bool,
    /// `noatime` (squashfs is read-only anyway; accepted for familiarity).
    pub noatime: bool,
}

impl Default for MountOptions {
    /// `ro,nodev,nosuid`: what every slot gets unless the config explicitly
    /// allows devices and setuid programs.
    fn default() -> Self {
        MountOptions { nodev: true, nosuid: true, noexec: false, noatime: false }
    }
}

impl MountOptions {
    /// No flags at all besides read-only (netboot's root filesystem needs its devices and setuid programs).
    pub const PERMISSIVE: MountOptions = MountOptions { nodev: false, nosuid: false, noexec: false, noatime: false };

    /// Adds the options of `mount_options` to `ro,nodev,nosuid`. Options only
    /// ever add restrictions: `dev` and `suid` are refused here, and
    /// `allow_devices_and_setuid` is the one way to drop `nodev,nosuid`.
    pub fn parse(s: &str, allow_devices_and_setuid: bool) -> Result<Self, String> {
        let mut o = if allow_devices_and_setuid { MountOptions::PERMISSIVE } else { MountOptions::default() };
        for opt in s.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            match opt {
                "ro" => {}
                "nodev" => o.nodev = true,
                "nosuid" => o.nosuid = true,
                "noexec" => o.noexec = true,
                "noatime" | "relatime" => o.noatime = true,
                "dev" | "suid" | "exec" => {
                    return Err(format!(
                        "cannot contain `{opt}`: mount_options only add to ro,nodev,nosuid; to allow device files and setuid programs set `allow_devices_and_setuid = true`"
                    ))
                }
                "rw" => return Err("cannot contain `rw`: images are always mounted read-only".into()),
                other => {
                    return Err(format!(
                        "has unknown option `{other}` (known: ro, nodev, nosuid, noexec, noatime)"
                    ))
                }
            }
        }
        Ok(o)
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from.
    pub path: PathBuf,
    /// Manifest location.
    pub source: Location,
    /// Channel the manifest must name.
    pub channel: String,
    /// Public key files.
    pub trusted_key_files: Vec<PathBuf>,
    /// Slots, state and mount points.
    pub state_dir: PathBuf,
    /// The active symlink.
    pub link: PathBuf,
    /// Mount flags.
    pub mount_options: MountOptions,
    /// Refuse to mount a slot without a dm-verity device under it.
    pub require_verity: bool,
    /// How long to wait for processes to leave the old mount.
    pub drain_timeout: Duration,
    /// What happens to an old mount still in use after `drain_timeout`.
    pub on_drain_timeout: DrainTimeoutAction,
    /// Command run with the new mount point before switching.
    pub health_check: Option<String>,
    /// Limit for each hook.
    pub hook_timeout: Duration,
    /// Command run after switching.
    pub post_switch: Option<String>,
    /// Accept lower serials.
    pub allow_downgrade: bool,
    /// This host's identity for staged rollouts (default: /etc/machine-id).
    pub machine_id: Option<String>,
    /// Where to write Prometheus text-format metrics after every apply.
    pub metrics_file: Option<PathBuf>,
    /// Longest an image transfer may take, all of a delta's requests and a
    /// fallback full download together; a server that stalls fails the apply
    /// after this (a partial full download is kept and resumed).
    pub download_timeout: Duration,
    /// What a private origin needs: headers on every request, a CA, a client certificate.
    pub origin: PrivateOrigin,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        // It names the source, the keys and the programs root runs.
        crate::safety::check_trusted_file(path, "config file")?;
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        // Relative paths inside the file are relative to the file, wherever we run from.
        let path = std::path::absolute(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, &path)
    }

    /// Parses config text; `path` is used in messages and to resolve relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            line: e.span().map(|s| line_of(text, s.start)).unwrap_or(1),
            message: e.message().trim().to_owned(),
        })?;
        let value = |key, message: String| ConfigError::Value { path: path.to_owned(), key, message };
        let base = path.parent().unwrap_or(Path::new("/"));
        let abs = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let source = Location::parse(&raw.source);
        let channel = match raw.channel {
            Some(c) => c,
            None => {
                // Default: the manifest's file name without `.json`.
                let s = raw.source.split(['?', '#']).next().unwrap_or("");
                let name = s.rsplit('/').next().unwrap_or("");
                name.strip_suffix(".json").unwrap_or(name).to_owned()
            }
        };
        validate_channel(&channel).map_err(|e| value("channel", format!("is invalid: {e}")))?;
        if raw.trusted_keys.is_empty() {
            return Err(value("trusted_keys", "must list at least one public key file".into()));
        }
        let link = abs(raw.link);
        if link.file_name().is_none() || link.parent().is_none() {
            return Err(value("link", "must be a path like /webroot/cgi".into()));
        }
        let dur = |key, s: &str| {
            humantime::parse_duration(s).map_err(|e| value(key, format!("`{s}` is not a duration like 30s or 5m: {e}")))
        };
        Ok(Config {
            path: path.to_owned(),
            source: match source {
                Location::Path(p) => Location::Path(abs(p)),
                u => u,
            },
            channel,
            trusted_key_files: raw.trusted_keys.into_iter().map(abs).collect(),
            state_dir: abs(raw.state_dir),
            link,
            mount_options: MountOptions::parse(&raw.mount_options, raw.allow_devices_and_setuid)
                .map_err(|m| value("mount_options", m))?,
            require_verity: raw.require_verity,
            drain_timeout: dur("drain_timeout", &raw.drain_timeout)?,
            on_drain_timeout: raw.on_drain_timeout,
            health_check: raw.health_check.filter(|s| !s.trim().is_empty()),
            hook_timeout: dur("hook_timeout", &raw.hook_timeout)?,
            post_switch: raw.post_switch.filter(|s| !s.trim().is_empty()),
            allow_downgrade: raw.allow_downgrade,
            machine_id: raw.machine_id.filter(|s| !s.trim().is_empty()),
            metrics_file: raw.metrics_file.map(abs),
            download_timeout: dur("download_timeout", &raw.download_timeout)?,
            origin: PrivateOrigin {
                headers_file: raw.http_headers_file.map(abs),
                ca_bundle: raw.tls_ca_bundle.map(abs),
                client_cert: raw.tls_client_cert.map(abs),
                client_key: raw.tls_client_key.map(abs),
            },
        })
    }

    /// This host's identity for staged rollouts.
    pub fn machine_id(&self) -> Result<String, ConfigError> {
        if let Some(id) = &self.machine_id {
            return Ok(id.trim().to_owned());
        }
        std::fs::read_to_string("/etc/machine-id").map(|s| s.trim().to_owned()).map_err(|e| ConfigError::Value {
            path: self.path.clone(),
            key: "machine_id",
            message: format!(
                "is not set and /etc/machine-id cannot be read ({e}); set machine_id to a stable, unique string"
            ),
        })
    }

    /// The HTTP client for `source` with these timeouts and the private
    /// origin's credentials. Their files decide whom root trusts and what it
    /// sends, so they must be root's like the config.
    pub fn transport(&self, response_timeout: Duration, body_timeout: Duration) -> Result<Transport, ConfigError> {
        for (what, p) in self.origin.files() {
            crate::safety::check_trusted_file(p, what)?;
        }
        Ok(Transport::new(&self.origin, response_timeout, body_timeout)?)
    }

    /// Reads the trusted public keys.
    pub fn trusted_keys(&self) -> Result<Vec<PublicKey>, ConfigError> {
        self.trusted_key_files
            .iter()
            .map(|p| {
                crate::safety::check_trusted_file(p, "trusted key file")?;
                PublicKey::read(p).map_err(|e| ConfigError::Value {
                    path: self.path.clone(),
                    key: "trusted_keys",
                    message: format!("entry {}: {e}", p.display()),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
source = "http://mirror.example/repo/stable.json"
trusted_keys = ["keys/ci.pub", "/etc/imgdeploy/old.pub"]
link = "/webroot/cgi"
drain_timeout = "30s"
health_check = "test -x"
"#;

    #[test]
    fn parses_with_defaults() {
        let c = Config::parse(GOOD, Path::new("/etc/imgdeploy/imgdeploy.toml")).unwrap();
        assert_eq!(c.channel, "stable");
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/imgdeploy"));
        assert_eq!(c.trusted_key_files[0], PathBuf::from("/etc/imgdeploy/keys/ci.pub"));
        assert_eq!(c.mount_options, MountOptions { nodev: true, nosuid: true, ..Default::default() });
        assert_eq!(c.drain_timeout, Duration::from_secs(30));
        assert_eq!(c.on_drain_timeout, DrainTimeoutAction::Detach);
        assert!(!c.allow_downgrade);
        assert_eq!(c.health_check.as_deref(), Some("test -x"));
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let p = Path::new("/etc/x.toml");
        let cases: &[(&str, &str)] = &[
            (
                "source = \"a\"\ntrusted_keys = [\"k\"]\nlink = \"/l\"\nalow_downgrade = true\n",
                "/etc/x.toml:4: unknown field `alow_downgrade`",
            ),
            ("source = \"a\"\ntrusted_keys = \"k\"\nlink = \"/l\"\n", "/etc/x.toml:2:"),
            ("source = \"a\"\nlink = \"/l\"\n", "missing field `trusted_keys`"),
            ("source = \"a\"\ntrusted_keys = []\nlink = \"/l\"\n", "`trusted_keys` must list"),
            ("source = \"x/Bad.json\"\ntrusted_keys = [\"k\"]\nlink = \"/l\"\n", "`channel` is invalid"),
            (
                "source = \"a\"\ntrusted_keys = [\"k\"]\nlink = \"/l\"\nmount_options = \"rw\"\n",
                "`mount_options` cannot contain `rw`",
            ),
            (
                "source = \"a\"\ntrusted_keys = [\"k\"]\nlink = \"/l\"\ndrain_timeout = \"soon\"\n",
                "`drain_timeout` `soon` is not a duration",
            ),
            ("source = \"a\"\ntrusted_keys = [\"k\"\nlink = \"/l\"\n", "/etc/x.toml:"),
        ];
        for (text, want) in cases {
            let e = Config::parse(text, p).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        }
    }

    #[test]
    fn mount_options_only_add_restrictions() {
        let base = MountOptions::default();
        assert_eq!((base.nodev, base.nosuid, base.noexec), (true, true, false));
        // Regression: `noexec` alone used to replace the defaults and drop nodev,nosuid.
        assert_eq!(
            MountOptions::parse("noexec", false).unwrap(),
            MountOptions { nodev: true, nosuid: true, noexec: true, noatime: false }
        );
        assert_eq!(MountOptions::parse("", false).unwrap(), base);
        for opt in ["dev", "suid", "exec", "nodev,suid"] {
            let e = MountOptions::parse(opt, false).unwrap_err();
            assert!(e.contains("allow_devices_and_setuid = true"), "{opt}: {e}");
        }
        assert_eq!(MountOptions::parse("", true).unwrap(), MountOptions::PERMISSIVE);
        assert_eq!(
            MountOptions::parse("nodev", true).unwrap(),
            MountOptions { nodev: true, ..MountOptions::PERMISSIVE }
        );
        assert!(MountOptions::parse("loop", false).is_err());
        assert!(MountOptions::parse("rw", true).is_err());
    }

    #[test]
    fn drain_timeout_action() {
        let base = "source = \"a\"\ntrusted_keys = [\"k\"]\nlink = \"/l\"\n";
        let p = Path::new("/etc/x.toml");
        let c = Config::parse(&format!("{base}on_drain_timeout = \"fail\"\n"), p).unwrap();
        assert_eq!(c.on_drain_timeout, DrainTimeoutAction::Fail);
        let e = Config::parse(&format!("{base}on_drain_timeout = \"kill\"\n"), p).unwrap_err().to_string();
        assert!(e.contains("unknown variant `kill`"), "{e}");
        let c = Config::parse(&format!("{base}allow_devices_and_setuid = true\n"), p).unwrap();
        assert_eq!(c.mount_options, MountOptions::PERMISSIVE);
    }
}
