//! Where a manifest or image comes from: a local path, a `file://` URL, or an
//! `http(s)://` URL. Any static HTTP server, mirror or CDN is a valid source,
//! so this only ever issues plain GETs.

use crate::digest::Sha256Digest;
use crate::manifest::signature_path;
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Errors reaching or reading a source.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// A local file could not be read.
    #[error("cannot read {path}")]
    Local {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The server could not be reached or the transfer broke.
    #[error("cannot fetch {url}: {message}; check the URL and that the server is reachable")]
    Transport {
        /// The URL.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The server answered with a non-success status.
    #[error("{url} answered HTTP {status}{hint}{}", retry_after.as_ref().map(|r| format!(" (it asks to retry after {r})")).unwrap_or_default())]
    Status {
        /// The URL.
        url: String,
        /// HTTP status code.
        status: u16,
        /// What to do.
        hint: &'static str,
        /// The server's Retry-After header, if any.
        retry_after: Option<String>,
    },
    /// More bytes than allowed.
    #[error("{what} is larger than the allowed {limit} bytes; refusing to read it")]
    TooLarge {
        /// What was read.
        what: String,
        /// The limit.
        limit: u64,
    },
}

impl FetchError {
    /// The resource does not exist (a missing file; HTTP 404 or 410, or 403,
    /// which buckets answer for a missing object when listing is not allowed).
    pub fn is_absent(&self) -> bool {
        match self {
            FetchError::Local { source, .. } => source.kind() == io::ErrorKind::NotFound,
            FetchError::Status { status, .. } => matches!(status, 403 | 404 | 410),
            _ => false,
        }
    }
}

/// A local path or a URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A file on this machine.
    Path(PathBuf),
    /// An `http://` or `https://` URL.
    Url(String),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Path(p) => write!(f, "{}", p.display()),
            Location::Url(u) => f.write_str(u),
        }
    }
}

impl Location {
    /// Interprets `s`: `http(s)://` is a URL, `file://` and anything else a path.
    pub fn parse(s: &str) -> Self {
        if s.starts_with("http://") || s.starts_with("https://") {
            Location::Url(s.to_owned())
        } else if let Some(p) = s.strip_prefix("file://") {
            Location::Path(PathBuf::from(p))
        } else {
            Location::Path(PathBuf::from(s))
        }
    }

    /// A sibling resource: `rel` resolved against this location's directory.
    /// `rel` must already be validated (no `..`, not absolute).
    pub fn sibling(&self, rel: &str) -> Self {
        match self {
            Location::Path(p) => Location::Path(p.parent().unwrap_or(Path::new(".")).join(rel)),
            Location::Url(u) => {
                let base = u.split(['?', '#']).next().unwrap_or(u);
                let dir = &base[..base.rfind('/').map(|i| i + 1).unwrap_or(base.len())];
                Location::Url(format!("{dir}{rel}"))
            }
        }
    }

    /// This location with `suffix` appended (e.g. `.sig`).
    pub fn with_suffix(&self, suffix: &str) -> Self {
        match self {
            Location::Path(p) => {
                let mut s = p.clone().into_os_string();
                s.push(suffix);
                Location::Path(s.into())
            }
            Location::Url(u) => Location::Url(format!("{u}{suffix}")),
        }
    }

    /// Reads the whole resource, refusing more than `limit` bytes.
    pub fn read_bounded(&self, agent: &ureq::Agent, limit: u64) -> Result<Vec<u8>, FetchError> {
        let (reader, _) = self.open(agent, 0)?;
        let mut out = Vec::new();
        let mut limited = reader.take(limit + 1);
        limited.read_to_end(&mut out).map_err(|e| self.read_error(e))?;
        if out.len() as u64 > limit {
            return Err(FetchError::TooLarge { what: self.to_string(), limit });
        }
        Ok(out)
    }

    /// Reads a channel manifest and the signature over exactly those bytes:
    /// `sigs/<sha256 of the bytes>.sig` beside it (immutable, so no cache can
    /// pair it with another manifest), or `<manifest>.sig` when the
    /// repository has no such file (published before it had `sigs/`).
    /// Returns `(manifest bytes, signature)`, neither verified yet.
    pub fn read_signed_manifest(&self, agent: &ureq::Agent) -> Result<(Vec<u8>, Vec<u8>), FetchError> {
        let bytes = self.read_bounded(agent, crate::MAX_MANIFEST_BYTES)?;
        let by_digest = self.sibling(&signature_path(&Sha256Digest::of_bytes(&bytes)));
        let signature = match by_digest.read_bounded(agent, crate::SIGNATURE_BYTES as u64) {
            Ok(s) => s,
            Err(e) if e.is_absent() => self.with_suffix(".sig").read_bounded(agent, crate::SIGNATURE_BYTES as u64)?,
            Err(e) => return Err(e),
        };
        Ok((bytes, signature))
    }

    /// Opens the resource for streaming from byte `offset`. Returns the reader
    /// and, for HTTP, whether the server honoured the offset (206); a server
    /// that ignores Range sends the whole body from byte 0.
    pub fn open(&self, agent: &ureq::Agent, offset: u64) -> Result<(Box<dyn Read + Send>, u64), FetchError> {
        match self {
            Location::Path(p) => {
                let mut f = File::open(p).map_err(|source| FetchError::Local { path: p.clone(), source })?;
                if offset > 0 {
                    io::Seek::seek(&mut f, io::SeekFrom::Start(offset))
                        .map_err(|source| FetchError::Local { path: p.clone(), source })?;
                }
                Ok((Box::new(f), offset))
            }
            Location::Url(u) => {
                let mut req = agent.get(u);
                if offset > 0 {
                    req = req.header("Range", &format!("bytes={offset}-"));
                }
                let resp = req.call().map_err(|e| FetchError::Transport { url: u.clone(), message: e.to_string() })?;
                let status = resp.status().as_u16();
                let start = match status {
                    200 => 0,
                    206 if offset > 0 => {
                        // A 206 for some other range would splice foreign bytes into the file.
                        let range = resp.headers().get("content-range").and_then(|v| v.to_str().ok()).unwrap_or("");
                        match parse_content_range(range) {
                            Some((a, _)) if a == offset => offset,
                            _ => {
                                return Err(FetchError::Transport {
                                    url: u.clone(),
                                    message: format!(
                                        "asked for bytes {offset}- but the server answered with range `{range}`"
                                    ),
                                })
                            }
                        }
                    }
                    _ => {
                        let retry = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(|v| {
                            // Seconds or an HTTP date; say which.
                            if v.trim().bytes().all(|b| b.is_ascii_digit()) {
                                format!("{} s", v.trim())
                            } else {
                                v.trim().chars().take(64).collect()
                            }
                        });
                        return Err(status_error(u, status, retry));
                    }
                };
                Ok((Box::new(resp.into_body().into_reader()), start))
            }
        }
    }

    /// Wraps an error that happened while reading the body.
    pub fn read_error(&self, e: io::Error) -> FetchError {
        match self {
            Location::Path(p) => FetchError::Local { path: p.clone(), source: e },
            Location::Url(u) => {
                FetchError::Transport { url: u.clone(), message: format!("transfer broke ({e}); rerun to resume") }
            }
        }
    }
}

/// Parses a `Content-Range: bytes a-b/total` value into (a, b).
pub fn parse_content_range(v: &str) -> Option<(u64, u64)> {
    let r = v.trim().strip_prefix("bytes ")?;
    let (range, _) = r.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a <= b).then_some((a, b))
}

fn status_error(url: &str, status: u16, retry_after: Option<String>) -> FetchError {
    let hint = match status {
        404 => "; nothing is published there: check `source` and that the repository was uploaded",
        401 | 403 => "; the server refuses access: check its permissions",
        429 => "; the server is rate limiting: try again later",
        300..=399 => "; too many redirects or a redirect without a target: check `source`",
        500..=599 => "; the server failed: try again later or use another mirror",
        _ => "",
    };
    FetchError::Status { url: url.to_owned(), status, hint, retry_after }
}

/// An HTTP agent with sane limits: 15 s to connect, `response_timeout` for
/// the response headers, `body_timeout` for a whole body (so a server that
/// stalls mid-body cannot hang a run forever), statuses handled by the
/// caller, and at most 5 redirects.
pub fn http_agent(response_timeout: Duration, body_timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(15)))
        .timeout_recv_response(Some(response_timeout))
        .timeout_recv_body(Some(body_timeout))
        .timeout_per_call(None)
        .http_status_as_error(false)
        .max_redirects(5)
        .user_agent(concat!("imgdeploy/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_resolve() {
        let cases = [
            ("http://h/repo/stable.json", "images/a.squashfs", "http://h/repo/images/a.squashfs"),
            ("https://h/stable.json?x=1", "images/a.squashfs", "https://h/images/a.squashfs"),
        ];
        for (base, rel, want) in cases {
            assert_eq!(Location::parse(base).sibling(rel), Location::Url(want.into()));
        }
        assert_eq!(
            Location::parse("file:///srv/repo/stable.json").sibling("images/x"),
            Location::Path("/srv/repo/images/x".into())
        );
        assert_eq!(Location::parse("stable.json").sibling("images/x"), Location::Path("images/x".into()));
        assert_eq!(Location::parse("/r/s.json").with_suffix(".sig"), Location::Path("/r/s.json.sig".into()));
    }

    #[test]
    fn read_bounded_refuses_oversized_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        std::fs::write(&p, vec![b'x'; 100]).unwrap();
        let agent = http_agent(Duration::from_secs(1), Duration::from_secs(1));
        let loc = Location::Path(p);
        assert_eq!(loc.read_bounded(&agent, 100).unwrap().len(), 100);
        assert!(matches!(loc.read_bounded(&agent, 99), Err(FetchError::TooLarge { limit: 99, .. })));
    }
}
