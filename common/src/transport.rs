//! The one HTTP client every request goes through, set up for the origin.
//!
//! A public origin (any static server, mirror or CDN) needs nothing but
//! timeouts. A private one may need HTTP headers on every request (a bearer
//! token for a bucket or an internal server), its own certificate authority,
//! and a client certificate. They are read once, here, and attached to every
//! request [`crate::location::Location`] makes, the delta's Range requests
//! included; no other module builds an HTTP request or sees the HTTP library.
//!
//! The headers and the client key are secrets: their files must be readable
//! by their owner alone, their values are never printed (not in errors, not
//! in `Debug`), and with private headers no redirect is followed, so a
//! redirect can never carry them to another host.

use std::fmt;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ureq::tls::{Certificate, ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig};

use crate::location::FetchError;

/// Most header lines a headers file may hold.
const MAX_HEADERS: usize = 32;
/// Largest headers, CA bundle, certificate or key file read.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// Where a private origin's credentials are (all optional).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrivateOrigin {
    /// `Name: value` lines sent with every request (e.g. `Authorization: Bearer ...`).
    pub headers_file: Option<PathBuf>,
    /// PEM certificates that replace the built-in roots for verifying the origin.
    pub ca_bundle: Option<PathBuf>,
    /// PEM certificate chain presented to the origin.
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
}

impl PrivateOrigin {
    /// Every file it names, with what it is for (for ownership checks).
    pub fn files(&self) -> impl Iterator<Item = (&'static str, &Path)> {
        [
            ("HTTP headers file", &self.headers_file),
            ("CA bundle", &self.ca_bundle),
            ("client certificate", &self.client_cert),
            ("client key", &self.client_key),
        ]
        .into_iter()
        .filter_map(|(what, p)| p.as_deref().map(|p| (what, p)))
    }
}

/// Why a private origin's settings could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A file could not be read.
    #[error("cannot read the {what} {path}")]
    Read {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A secret is readable by other users.
    #[error("the {what} {path} is readable by other users (mode {mode:o}); it holds a secret: run `chmod 600 {path}`")]
    Exposed {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// A secret belongs to another user.
    #[error("the {what} {path} is owned by uid {uid}, not by the user running this ({me}); `chown {me} {path}`")]
    Owner {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// Our uid.
        me: u32,
    },
    /// A line of the headers file is not a valid header (its text is not shown: it may be a secret).
    #[error("{path}:{line}: {problem}; write one `Name: value` header per line")]
    Header {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A PEM file holds nothing usable.
    #[error("the {what} {path} {problem}")]
    Pem {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: &'static str,
    },
}

/// What every request carries; `Debug` never shows header values.
struct Access {
    headers: Vec<(String, String)>,
    tls: TlsConfig,
}

impl fmt::Debug for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Access")
            .field("headers", &self.headers.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// An HTTP client for one origin: its timeouts and credentials.
#[derive(Debug, Clone)]
pub struct Transport {
    agent: ureq::Agent,
    access: Arc<Access>,
}

/// An answer's status, the headers [`crate::location`] reads, and its body.
pub(crate) struct Response {
    pub status: u16,
    headers: ureq::http::HeaderMap,
    body: ureq::Body,
}

impl Response {
    /// A header's value, if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as a stream.
    pub fn into_reader(self) -> impl Read + Send + 'static {
        self.body.into_reader()
    }
}

impl Transport {
    /// A client for a public origin: 15 s to connect, `response_timeout` for
    /// the response headers, `body_timeout` for a whole body (a server that
    /// stalls mid-body cannot hang a run), at most 5 redirects.
    pub fn public(response_timeout: Duration, body_timeout: Duration) -> Self {
        let access = Arc::new(Access { headers: Vec::new(), tls: TlsConfig::default() });
        Transport { agent: agent(&access, response_timeout, body_timeout), access }
    }

    /// A client with `origin`'s credentials; without any it is [`Self::public`].
    pub fn new(
        origin: &PrivateOrigin,
        response_timeout: Duration,
        body_timeout: Duration,
    ) -> Result<Self, TransportError> {
        let headers = match &origin.headers_file {
            Some(p) => parse_headers(p, &read_secret("HTTP headers file", p)?)?,
            None => Vec::new(),
        };
        let mut tls = TlsConfig::builder();
        if let Some(p) = &origin.ca_bundle {
            let certs = certificates("CA bundle", p)?;
            tls = tls.root_certs(RootCerts::new_with_certs(&certs));
        }
        match (&origin.client_cert, &origin.client_key) {
            (Some(cert), Some(key)) => {
                let chain = certificates("client certificate", cert)?;
                let key = private_key(key)?;
                tls = tls.client_cert(Some(ClientCert::new_with_certs(&chain, key)));
            }
            (None, None) => {}
            (Some(p), None) | (None, Some(p)) => {
                return Err(TransportError::Pem {
                    what: if origin.client_key.is_some() { "client key" } else { "client certificate" },
                    path: p.clone(),
                    problem: "is set without its pair: set both the client certificate and its key",
                })
            }
        }
        let access = Arc::new(Access { headers, tls: tls.build() });
        Ok(Transport { agent: agent(&access, response_timeout, body_timeout), access })
    }

    /// The same origin and credentials with other timeouts.
    pub fn with_timeouts(&self, response_timeout: Duration, body_timeout: Duration) -> Self {
        Transport { agent: agent(&self.access, response_timeout, body_timeout), access: self.access.clone() }
    }

    /// Whether requests carry private headers (then redirects are refused).
    pub fn has_private_headers(&self) -> bool {
        !self.access.headers.is_empty()
    }

    /// A GET of `url`, with a `Range` header if given, the origin's
    /// headers, and `timeout` for the whole request if given. Any status is
    /// returned; the caller decides what it means.
    pub(crate) fn get(
        &self,
        url: &str,
        range: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<Response, FetchError> {
        let mut req = self.agent.get(url);
        if let Some(t) = timeout {
            req = req.config().timeout_global(Some(t)).build();
        }
        for (name, value) in &self.access.headers {
            req = req.header(name, value);
        }
        if let Some(r) = range {
            req = req.header("Range", r);
        }
        let resp = req.call().map_err(|e| FetchError::Transport { url: url.to_owned(), source: Box::new(e) })?;
        let (parts, body) = resp.into_parts();
        Ok(Response { status: parts.status.as_u16(), headers: parts.headers, body })
    }
}

fn agent(access: &Access, response_timeout: Duration, body_timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(15)))
        .timeout_recv_response(Some(response_timeout))
        .timeout_recv_body(Some(body_timeout))
        .timeout_per_call(None)
        .http_status_as_error(false)
        // Private headers go to the configured origin and nowhere else.
        .max_redirects(if access.headers.is_empty() { 5 } else { 0 })
        .tls_config(access.tls.clone())
        .user_agent(concat!("imgdeploy/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TransportError> {
    let read = |source| TransportError::Read { what, path: path.to_owned(), source };
    let mut bytes = Vec::new();
    std::fs::File::open(path).and_then(|f| f.take(MAX_FILE_BYTES).read_to_end(&mut bytes)).map_err(read)?;
    Ok(bytes)
}

/// Reads a file that holds a secret: ours, and closed to everyone else.
fn read_secret(what: &'static str, path: &Path) -> Result<Vec<u8>, TransportError> {
    let md = std::fs::metadata(path).map_err(|source| TransportError::Read { what, path: path.to_owned(), source })?;
    let me = nix::unistd::geteuid().as_raw();
    if md.uid() != me {
        return Err(TransportError::Owner { what, path: path.to_owned(), uid: md.uid(), me });
    }
    let mode = md.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TransportError::Exposed { what, path: path.to_owned(), mode });
    }
    read_file(what, path)
}

/// Parses `Name: value` lines; blank lines and `#` comments are skipped.
/// Errors name the line, never its text.
fn parse_headers(path: &Path, bytes: &[u8]) -> Result<Vec<(String, String)>, TransportError> {
    let bad = |line, problem| TransportError::Header { path: path.to_owned(), line, problem };
    let text = std::str::from_utf8(bytes).map_err(|_| bad(0, "the file is not UTF-8"))?;
    let mut headers = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) = line.split_once(':').ok_or_else(|| bad(i + 1, "no `:` after the header name"))?;
        let (name, value) = (name.trim(), value.trim());
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if name.is_empty() || !name.bytes().all(token) {
            return Err(bad(i + 1, "the header name is not a valid HTTP token"));
        }
        if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            return Err(bad(i + 1, "the header value holds a control character"));
        }
        if ["host", "range", "content-length", "transfer-encoding", "connection"]
            .contains(&name.to_ascii_lowercase().as_str())
        {
            return Err(bad(i + 1, "this header is set by imgdeploy itself"));
        }
        headers.push((name.to_owned(), value.to_owned()));
    }
    if headers.len() > MAX_HEADERS {
        return Err(bad(0, "more than 32 headers"));
    }
    if headers.is_empty() {
        return Err(bad(0, "the file holds no header"));
    }
    Ok(headers)
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<Certificate<'static>>, TransportError> {
    let bytes = read_file(what, path)?;
    let pem = |problem| TransportError::Pem { what, path: path.to_owned(), problem };
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&bytes) {
        if let PemItem::Certificate(c) = item.map_err(|_| pem("is not valid PEM"))? {
            certs.push(c);
        }
    }
    if certs.is_empty() {
        return Err(pem("holds no PEM certificate (-----BEGIN CERTIFICATE-----)"));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKey<'static>, TransportError> {
    const WHAT: &str = "client key";
    let bytes = read_secret(WHAT, path)?;
    PrivateKey::from_pem(&bytes).map_err(|_| TransportError::Pem {
        what: WHAT,
        path: path.to_owned(),
        problem: "holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn headers_files_are_parsed_strictly_and_never_quoted() {
        let p = Path::new("/etc/h");
        let ok = parse_headers(p, b"# token for the bucket\n\nAuthorization: Bearer abc def\r\nX-Key:v\n").unwrap();
        assert_eq!(ok, vec![("Authorization".into(), "Bearer abc def".into()), ("X-Key".into(), "v".into())]);
        let cases: [(&[u8], &str); 7] = [
            (b"Bearer s3cret\n", "/etc/h:1: no `:` after the header name"),
            (b"# c\nBad Name: s3cret\n", "/etc/h:2: the header name is not a valid HTTP token"),
            (b": s3cret\n", "/etc/h:1: the header name is not a valid HTTP token"),
            (b"X: s3\x01cret\n", "/etc/h:1: the header value holds a control character"),
            (b"Range: bytes=0-\n", "/etc/h:1: this header is set by imgdeploy itself"),
            (b"# nothing\n", "/etc/h:0: the file holds no header"),
            (b"\xff\n", "/etc/h:0: the file is not UTF-8"),
        ];
        for (bytes, want) in cases {
            let e = parse_headers(p, bytes).unwrap_err().to_string();
            assert!(e.starts_with(want) && !e.contains("s3"), "{e}");
        }
        assert!(parse_headers(p, "X: y\n".repeat(33).as_bytes()).unwrap_err().to_string().contains("more than 32"));
        assert_eq!(parse_headers(p, "X: y\n".repeat(32).as_bytes()).unwrap().len(), 32);
    }

    #[test]
    fn the_files_of_an_origin_are_named_for_their_checks() {
        let origin = PrivateOrigin {
            headers_file: Some("/h".into()),
            client_cert: Some("/c".into()),
            client_key: Some("/k".into()),
            ..Default::default()
        };
        let files: Vec<_> = origin.files().collect();
        assert_eq!(
            files,
            [
                ("HTTP headers file", Path::new("/h")),
                ("client certificate", Path::new("/c")),
                ("client key", Path::new("/k"))
            ]
        );
        assert_eq!(PrivateOrigin::default().files().count(), 0);
    }

    #[test]
    fn secrets_must_be_closed_to_other_users() {
        let dir = tempfile::tempdir().unwrap();
        let timeouts = (Duration::from_secs(1), Duration::from_secs(1));
        for mode in [0o644, 0o640, 0o604, 0o610] {
            let headers = file(dir.path(), "h", "Authorization: Bearer s3cret\n", mode);
            let origin = PrivateOrigin { headers_file: Some(headers), ..Default::default() };
            let e = Transport::new(&origin, timeouts.0, timeouts.1).unwrap_err();
            assert!(matches!(e, TransportError::Exposed { .. }), "{mode:o}: {e}");
            assert!(e.to_string().contains("chmod 600"), "{e}");
        }
        let headers = file(dir.path(), "h", "Authorization: Bearer s3cret\n", 0o600);
        let origin = PrivateOrigin { headers_file: Some(headers.clone()), ..Default::default() };
        let t = Transport::new(&origin, timeouts.0, timeouts.1).unwrap();
        assert!(t.has_private_headers() && !Transport::public(timeouts.0, timeouts.1).has_private_headers());
        // Debug output names the headers, never their values.
        let shown = format!("{t:?}");
        assert!(shown.contains("[\"Authorization\"]") && !shown.contains("s3cret"), "{shown}");
        // A missing file, and half a client certificate, are refused by name.
        let missing = PrivateOrigin { ca_bundle: Some(dir.path().join("nope.pem")), ..Default::default() };
        let e = Transport::new(&missing, timeouts.0, timeouts.1).unwrap_err().to_string();
        assert!(e.starts_with("cannot read the CA bundle") && e.contains("nope.pem"), "{e}");
        let half = PrivateOrigin { client_cert: Some(headers.clone()), ..Default::default() };
        let e = Transport::new(&half, timeouts.0, timeouts.1).unwrap_err().to_string();
        assert!(e.contains("set both the client certificate and its key"), "{e}");
        let not_pem = PrivateOrigin { ca_bundle: Some(headers), ..Default::default() };
        let e = Transport::new(&not_pem, timeouts.0, timeouts.1).unwrap_err().to_string();
        assert!(e.contains("holds no PEM certificate") && !e.contains("s3cret"), "{e}");
    }
}
