//! Where a manifest or image comes from: a local path, a `file://` URL, or an
//! `http(s)://` URL. Any static HTTP server, mirror or CDN is a valid source,
//! so this only ever issues plain GETs.

use crate::digest::Sha256Digest;
use crate::manifest::{signature_path, Timestamp};
use crate::multipart::{MultipartError, Parts};
use crate::sign::PublicKey;
use crate::transport::Transport;
use crate::trust::{verify_manifest, TrustError, VerifiedManifest};
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
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
    /// The server could not be reached (or its certificate was refused).
    #[error("cannot fetch {url}; check the URL and that the server is reachable")]
    Transport {
        /// The URL.
        url: String,
        /// What went wrong.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The transfer broke after the answer began.
    #[error("cannot fetch {url}: transfer broke; rerun to resume")]
    Broken {
        /// The URL.
        url: String,
        /// The read error.
        #[source]
        source: io::Error,
    },
    /// The answer to a Range request is not the range asked for.
    #[error("{url}: asked for bytes {asked} but the server answered with range `{answered}`")]
    WrongRange {
        /// The URL.
        url: String,
        /// The Range asked for.
        asked: String,
        /// The server's Content-Range.
        answered: String,
    },
    /// The server sent the whole file to a Range request.
    #[error("{url} ignores HTTP Range requests")]
    RangeIgnored {
        /// The URL.
        url: String,
    },
    /// A multi-range answer could not be read.
    #[error("{url} answered a Range request badly")]
    Multipart {
        /// The URL.
        url: String,
        /// What is wrong with the body.
        #[source]
        source: crate::multipart::MultipartError,
    },
    /// A private origin redirected (its headers must not follow).
    #[error("{url} redirects to {to}, and requests carrying private headers follow no redirect: point `source` at the final URL")]
    Redirect {
        /// The URL.
        url: String,
        /// Where it points (as the server sent it).
        to: String,
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

/// A channel manifest fetched and verified, with the exact bytes and
/// signature it was verified from and where it came from.
#[derive(Debug, Clone)]
pub struct SignedManifest {
    /// The verified manifest.
    pub verified: VerifiedManifest,
    /// The raw signed bytes.
    pub bytes: Vec<u8>,
    /// The raw signature.
    pub signature: Vec<u8>,
    /// Where it came from.
    pub location: Location,
}

/// Why a manifest could not be fetched and verified.
#[derive(Debug, thiserror::Error)]
pub enum ManifestFetchError {
    /// It could not be read.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// It was refused (signature, contents or expiry).
    #[error("manifest {source_url}")]
    Trust {
        /// Where it came from.
        source_url: String,
        /// Why.
        #[source]
        err: TrustError,
    },
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
    /// Whether `s` is an `http://` or `https://` URL (what [`Self::parse`] takes for one).
    pub fn is_http_url(s: &str) -> bool {
        s.starts_with("http://") || s.starts_with("https://")
    }

    /// Interprets `s`: `http(s)://` is a URL, `file://` and anything else a path.
    pub fn parse(s: &str) -> Self {
        if Self::is_http_url(s) {
            Location::Url(s.to_owned())
        } else if let Some(p) = s.strip_prefix("file://") {
            Location::Path(PathBuf::from(p))
        } else {
            Location::Path(PathBuf::from(s))
        }
    }

    /// A sibling resource: `rel` resolved against this location's directory.
    /// `rel` must already be validated (no `..`, not absolute). A URL's query
    /// string is kept (a private origin may need its token on every request);
    /// a fragment is dropped.
    pub fn sibling(&self, rel: &str) -> Self {
        match self {
            Location::Path(p) => Location::Path(p.parent().unwrap_or(Path::new(".")).join(rel)),
            Location::Url(u) => {
                let (base, query) = split_url(u);
                let dir = &base[..base.rfind('/').map(|i| i + 1).unwrap_or(base.len())];
                Location::Url(format!("{dir}{rel}{query}"))
            }
        }
    }

    /// This location with `suffix` appended to its path (e.g. `.sig`), before
    /// a URL's query string.
    pub fn with_suffix(&self, suffix: &str) -> Self {
        match self {
            Location::Path(p) => {
                let mut s = p.clone().into_os_string();
                s.push(suffix);
                Location::Path(s.into())
            }
            Location::Url(u) => {
                let (base, query) = split_url(u);
                Location::Url(format!("{base}{suffix}{query}"))
            }
        }
    }

    /// Reads the whole resource, refusing more than `limit` bytes.
    pub fn read_bounded(&self, t: &Transport, limit: u64) -> Result<Vec<u8>, FetchError> {
        let (reader, _) = self.open(t, 0)?;
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
    pub fn read_signed_manifest(&self, t: &Transport) -> Result<(Vec<u8>, Vec<u8>), FetchError> {
        let bytes = self.read_bounded(t, crate::MAX_MANIFEST_BYTES)?;
        let by_digest = self.sibling(&signature_path(&Sha256Digest::of_bytes(&bytes)));
        let signature = match by_digest.read_bounded(t, crate::SIGNATURE_BYTES as u64) {
            Ok(s) => s,
            Err(e) if e.is_absent() => self.with_suffix(".sig").read_bounded(t, crate::SIGNATURE_BYTES as u64)?,
            Err(e) => return Err(e),
        };
        Ok((bytes, signature))
    }

    /// Reads the manifest here and its signature ([`Self::read_signed_manifest`])
    /// and verifies them with `keys` at `now` (signature, then contents,
    /// then expiry): the one way every command gets a manifest it may act on.
    pub fn fetch_verified_manifest(
        &self,
        t: &Transport,
        keys: &[PublicKey],
        now: Timestamp,
    ) -> Result<SignedManifest, ManifestFetchError> {
        let (bytes, signature) = self.read_signed_manifest(t)?;
        let verified = verify_manifest(&bytes, &signature, keys, now)
            .map_err(|err| ManifestFetchError::Trust { source_url: self.to_string(), err })?;
        Ok(SignedManifest { verified, bytes, signature, location: self.clone() })
    }

    /// Opens the resource for streaming from byte `offset`. Returns the reader
    /// and, for HTTP, whether the server honoured the offset (206); a server
    /// that ignores Range sends the whole body from byte 0.
    pub fn open(&self, t: &Transport, offset: u64) -> Result<(Box<dyn Read + Send>, u64), FetchError> {
        match self {
            Location::Path(p) => {
                let mut f = File::open(p).map_err(|source| FetchError::Local { path: p.clone(), source })?;
                io::Seek::seek(&mut f, io::SeekFrom::Start(offset))
                    .map_err(|source| FetchError::Local { path: p.clone(), source })?;
                Ok((Box::new(f), offset))
            }
            Location::Url(u) => {
                let range = (offset > 0).then(|| format!("bytes={offset}-"));
                let resp = t.get(u, range.as_deref(), None)?;
                let start = match resp.status {
                    200 => 0,
                    206 if offset > 0 => {
                        // A 206 for some other range would splice foreign bytes into the file.
                        let answered = resp.header("content-range").unwrap_or("");
                        match parse_content_range(answered) {
                            Some((a, _)) if a == offset => offset,
                            _ => {
                                return Err(FetchError::WrongRange {
                                    url: u.clone(),
                                    asked: format!("{offset}-"),
                                    answered: crate::text::printable(answered),
                                })
                            }
                        }
                    }
                    _ => return Err(status_error(u, t, &resp)),
                };
                Ok((Box::new(resp.into_reader()), start))
            }
        }
    }

    /// Fetches the inclusive byte `ranges` of this resource in one request
    /// bounded by `timeout`, and returns the answer's parts to read one by
    /// one (a server may send them in any order; a local file answers them
    /// in the order asked).
    pub fn read_ranges(
        &self,
        t: &Transport,
        ranges: &[(u64, u64)],
        timeout: Duration,
    ) -> Result<RangeParts, FetchError> {
        match self {
            Location::Path(p) => {
                let file = File::open(p).map_err(|source| FetchError::Local { path: p.clone(), source })?;
                Ok(RangeParts::Local { file, ranges: ranges.iter().rev().copied().collect(), current: None })
            }
            Location::Url(u) => {
                let spec: Vec<String> = ranges.iter().map(|(a, b)| format!("{a}-{b}")).collect();
                let resp = t.get(u, Some(&format!("bytes={}", spec.join(","))), Some(timeout))?;
                match resp.status {
                    206 => {}
                    200 => return Err(FetchError::RangeIgnored { url: u.clone() }),
                    _ => return Err(status_error(u, t, &resp)),
                }
                let boundary = resp.header("content-type").and_then(crate::multipart::boundary).map(str::to_owned);
                let single = resp.header("content-range").and_then(parse_content_range);
                let body: Box<dyn io::BufRead + Send> = Box::new(BufReader::with_capacity(1 << 20, resp.into_reader()));
                let parts = match (boundary, single) {
                    (Some(b), _) => Parts::multipart(body, &b),
                    (None, Some(range)) => Parts::single(body, range),
                    (None, None) => {
                        return Err(FetchError::Multipart { url: u.clone(), source: MultipartError::NoRange })
                    }
                };
                Ok(RangeParts::Http { url: u.clone(), parts })
            }
        }
    }

    /// Wraps an error that happened while reading the body.
    pub fn read_error(&self, e: io::Error) -> FetchError {
        match self {
            Location::Path(p) => FetchError::Local { path: p.clone(), source: e },
            Location::Url(u) => FetchError::Broken { url: u.clone(), source: e },
        }
    }
}

/// A URL's path part and its query string (with the `?`, or empty); a
/// fragment is dropped (it is never sent to a server).
fn split_url(u: &str) -> (&str, &str) {
    let u = u.split('#').next().unwrap_or(u);
    match u.find('?') {
        Some(i) => (&u[..i], &u[i..]),
        None => (u, ""),
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

/// The error for a non-success answer: a redirect that private headers may
/// not follow, or the status with what to do and the server's Retry-After.
fn status_error(url: &str, t: &Transport, resp: &crate::transport::Response) -> FetchError {
    if (300..400).contains(&resp.status) && t.has_private_headers() {
        let to: String = resp.header("location").unwrap_or("nowhere").chars().take(256).collect();
        return FetchError::Redirect { url: url.to_owned(), to: crate::text::printable(&to) };
    }
    let retry = resp.header("retry-after").map(|v| {
        // Seconds or an HTTP date; say which.
        if v.trim().bytes().all(|b| b.is_ascii_digit()) {
            format!("{} s", v.trim())
        } else {
            crate::text::printable(&v.trim().chars().take(64).collect::<String>())
        }
    });
    status_error_of(url, resp.status, retry)
}

fn status_error_of(url: &str, status: u16, retry_after: Option<String>) -> FetchError {
    let hint = match status {
        404 => "; nothing is published there: check `source` and that the repository was uploaded",
        401 | 403 => "; the server refuses access: check its permissions, or the credentials a private origin needs (http_headers_file, tls_client_cert)",
        429 => "; the server is rate limiting: try again later",
        300..=399 => "; too many redirects or a redirect without a target: check `source`",
        500..=599 => "; the server failed: try again later or use another mirror",
        _ => "",
    };
    FetchError::Status { url: url.to_owned(), status, hint, retry_after }
}

/// The parts of an answer to [`Location::read_ranges`]: call
/// [`RangeParts::next_part`], then read exactly that part's bytes from it.
pub enum RangeParts {
    /// From an HTTP server.
    Http {
        /// Where from (for errors).
        url: String,
        /// The body.
        parts: Parts<Box<dyn io::BufRead + Send>>,
    },
    /// From a local file.
    Local {
        /// The file.
        file: File,
        /// The ranges still to give, last first.
        ranges: Vec<(u64, u64)>,
        /// The part being read: (next offset, end inclusive).
        current: Option<(u64, u64)>,
    },
}

impl RangeParts {
    /// The next part's inclusive byte range, or `None` after the last.
    pub fn next_part(&mut self) -> Result<Option<(u64, u64)>, FetchError> {
        match self {
            RangeParts::Http { url, parts } => parts.next_part().map_err(|source| match source {
                MultipartError::Io(source) => FetchError::Broken { url: url.clone(), source },
                source => FetchError::Multipart { url: url.clone(), source },
            }),
            RangeParts::Local { ranges, current, .. } => {
                *current = ranges.pop();
                Ok(*current)
            }
        }
    }
}

impl Read for RangeParts {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            RangeParts::Http { parts, .. } => parts.body().read(buf),
            RangeParts::Local { file, current, .. } => {
                let Some((at, end)) = current else { return Ok(0) };
                let want = buf.len().min((*end + 1).saturating_sub(*at).min(usize::MAX as u64) as usize);
                let n = file.read_at(&mut buf[..want], *at)?;
                *at += n as u64;
                Ok(n)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_an_http_url() {
        for url in ["http://h/s.json", "https://h/s.json"] {
            assert!(Location::is_http_url(url), "{url}");
        }
        for not in ["ftp://h/s.json", "file:///s.json", "/srv/s.json", "HTTP://h", "http:/h"] {
            assert!(!Location::is_http_url(not), "{not}");
        }
    }

    #[test]
    fn parse_and_resolve() {
        let cases = [
            ("http://h/repo/stable.json", "images/a.squashfs", "http://h/repo/images/a.squashfs"),
            ("https://h/stable.json?token=x", "images/a.squashfs", "https://h/images/a.squashfs?token=x"),
            ("https://h/r/stable.json#frag", "sigs/a.sig", "https://h/r/sigs/a.sig"),
            ("https://h/r/stable.json?t=1#frag", "sigs/a.sig", "https://h/r/sigs/a.sig?t=1"),
        ];
        for (base, rel, want) in cases {
            assert_eq!(Location::parse(base).sibling(rel), Location::Url(want.into()));
        }
        assert_eq!(
            Location::parse("https://h/s.json?token=x").with_suffix(".sig"),
            Location::Url("https://h/s.json.sig?token=x".into())
        );
        assert_eq!(
            Location::parse("https://h/s.json").with_suffix(".sig"),
            Location::Url("https://h/s.json.sig".into())
        );
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
        let agent = Transport::public(Duration::from_secs(1), Duration::from_secs(1));
        let loc = Location::Path(p);
        assert_eq!(loc.read_bounded(&agent, 100).unwrap().len(), 100);
        assert!(matches!(loc.read_bounded(&agent, 99), Err(FetchError::TooLarge { limit: 99, .. })));
    }

    /// A server on 127.0.0.1 answering every request with the raw HTTP
    /// response `answer(path, range header)`; returns its base URL.
    fn server(answer: impl Fn(&str, Option<&str>) -> String + Send + Sync + 'static) -> String {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut first = String::new();
                reader.read_line(&mut first).unwrap();
                let mut range = None;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.strip_prefix("Range: ").or(line.strip_prefix("range: ")) {
                        range = Some(v.trim().to_owned());
                    }
                }
                let path = first.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let _ = (&stream).write_all(answer(&path, range.as_deref()).as_bytes());
            }
        });
        base
    }

    fn reply(status: &str, headers: &str, body: &str) -> String {
        format!("HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
    }

    fn read_all(r: (Box<dyn Read + Send>, u64)) -> (String, u64) {
        let (mut reader, start) = r;
        let mut s = String::new();
        reader.read_to_string(&mut s).unwrap();
        (s, start)
    }

    #[test]
    fn open_follows_ranges_and_refuses_foreign_ones() {
        let honours = server(|_, range| match range {
            Some("bytes=4-") => reply("206 Partial Content", "Content-Range: bytes 4-9/10\r\n", "456789"),
            Some(_) => reply("206 Partial Content", "Content-Range: bytes 0-9/10\r\n", "0123456789"),
            None => reply("200 OK", "", "0123456789"),
        });
        let agent = Transport::public(Duration::from_secs(5), Duration::from_secs(5));
        let at = |path: &str| Location::Url(format!("{honours}{path}"));
        assert_eq!(read_all(at("/f").open(&agent, 0).unwrap()), ("0123456789".into(), 0));
        assert_eq!(read_all(at("/f").open(&agent, 4).unwrap()), ("456789".into(), 4));
        // A 206 for another range would splice foreign bytes in.
        let e = at("/f").open(&agent, 3).err().unwrap().to_string();
        assert!(e.contains("asked for bytes 3- but the server answered with range `bytes 0-9/10`"), "{e}");
        // A server that ignores Range sends everything from byte 0.
        let ignores = server(|_, _| reply("200 OK", "", "0123456789"));
        let loc = Location::Url(format!("{ignores}/f"));
        assert_eq!(read_all(loc.open(&agent, 4).unwrap()), ("0123456789".into(), 0));
        // An unasked-for 206 is refused.
        let eager = server(|_, _| reply("206 Partial Content", "Content-Range: bytes 0-9/10\r\n", "0123456789"));
        let e = Location::Url(format!("{eager}/f")).open(&agent, 0).err().unwrap();
        assert!(matches!(e, FetchError::Status { status: 206, .. }), "{e}");
        // Local files: from the offset.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, "0123456789").unwrap();
        assert_eq!(read_all(Location::Path(p.clone()).open(&agent, 4).unwrap()), ("456789".into(), 4));
        assert_eq!(Location::Path(p.clone()).to_string(), p.display().to_string());
        assert_eq!(at("/f").to_string(), format!("{honours}/f"));
    }

    #[test]
    fn statuses_say_what_to_do() {
        let base = server(|path, _| match path {
            "/404" => reply("404 Not Found", "", ""),
            "/403" => reply("403 Forbidden", "", ""),
            "/401" => reply("401 Unauthorized", "", ""),
            "/429" => reply("429 Too Many Requests", "Retry-After: 30\r\n", ""),
            "/503" => reply("503 Service Unavailable", "Retry-After: Wed, 21 Oct 2026 07:28:00 GMT\r\n", ""),
            _ => reply("418 I'm a teapot", "", ""),
        });
        let agent = Transport::public(Duration::from_secs(5), Duration::from_secs(5));
        let status = |path: &str| match Location::Url(format!("{base}{path}")).open(&agent, 0).err().unwrap() {
            FetchError::Status { status, hint, retry_after, .. } => (status, hint, retry_after),
            other => panic!("{other}"),
        };
        assert!(status("/404").1.contains("nothing is published there"));
        assert!(status("/403").1.contains("refuses access"));
        assert!(status("/401").1.contains("refuses access"));
        assert_eq!(status("/429"), (429, "; the server is rate limiting: try again later", Some("30 s".into())));
        let (code, hint, retry) = status("/503");
        assert_eq!((code, retry.as_deref()), (503, Some("Wed, 21 Oct 2026 07:28:00 GMT")));
        assert!(hint.contains("the server failed"));
        assert_eq!(status("/418"), (418, "", None));
        assert!(status_error_of("u", 302, None).to_string().contains("redirect"));
        let e = status_error_of("http://h/x", 404, Some("5 s".into())).to_string();
        assert!(
            e.starts_with("http://h/x answered HTTP 404; nothing") && e.ends_with("(it asks to retry after 5 s)"),
            "{e}"
        );
    }

    #[test]
    fn the_signature_named_by_the_manifest_comes_first() {
        let manifest = "{\"m\": 1}\n";
        let named = format!("/r/sigs/{}.sig", Sha256Digest::of_bytes(manifest.as_bytes()));
        let agent = Transport::public(Duration::from_secs(5), Duration::from_secs(5));
        let serve = |named_status: &'static str| {
            let named = named.clone();
            server(move |path, _| match path {
                "/r/s.json" => reply("200 OK", "", manifest),
                p if p == named && named_status == "200 OK" => reply("200 OK", "", &"A".repeat(64)),
                p if p == named => reply(named_status, "", ""),
                "/r/s.json.sig" => reply("200 OK", "", &"B".repeat(64)),
                _ => reply("404 Not Found", "", ""),
            })
        };
        let sig_of = |base: String| {
            Location::Url(format!("{base}/r/s.json")).read_signed_manifest(&agent).map(|(m, s)| {
                assert_eq!(m, manifest.as_bytes());
                String::from_utf8(s).unwrap()
            })
        };
        assert_eq!(sig_of(serve("200 OK")).unwrap(), "A".repeat(64));
        for absent in ["404 Not Found", "410 Gone", "403 Forbidden"] {
            assert_eq!(sig_of(serve(absent)).unwrap(), "B".repeat(64), "{absent}");
        }
        // A failing server is an error, not a reason to take the other file.
        assert!(matches!(sig_of(serve("500 Internal Server Error")), Err(FetchError::Status { status: 500, .. })));

        // The same on disk.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s.json"), manifest).unwrap();
        std::fs::write(dir.path().join("s.json.sig"), "B".repeat(64)).unwrap();
        let local = Location::Path(dir.path().join("s.json"));
        assert_eq!(local.read_signed_manifest(&agent).unwrap().1, "B".repeat(64).into_bytes());
        std::fs::create_dir_all(dir.path().join("sigs")).unwrap();
        let named_path = dir.path().join(named.trim_start_matches("/r/"));
        std::fs::write(&named_path, "A".repeat(64)).unwrap();
        assert_eq!(local.read_signed_manifest(&agent).unwrap().1, "A".repeat(64).into_bytes());
        // Unreadable (a directory in its place) is an error, not absent.
        std::fs::remove_file(&named_path).unwrap();
        std::fs::create_dir(&named_path).unwrap();
        assert!(local.read_signed_manifest(&agent).is_err());
    }

    /// A part's inclusive range and its bytes.
    type Part = ((u64, u64), String);

    /// Every part of `ranges` of `loc`, with its bytes.
    fn parts_of(t: &Transport, loc: &Location, ranges: &[(u64, u64)]) -> Result<Vec<Part>, FetchError> {
        let mut parts = loc.read_ranges(t, ranges, Duration::from_secs(5))?;
        let mut out = Vec::new();
        while let Some((a, b)) = parts.next_part()? {
            let mut buf = vec![0; (b - a + 1) as usize];
            parts.read_exact(&mut buf).unwrap();
            out.push(((a, b), String::from_utf8(buf).unwrap()));
        }
        Ok(out)
    }

    #[test]
    fn ranges_come_as_parts_or_are_refused() {
        let multi = "multipart/byteranges; boundary=XX";
        let base = server(move |path, range| {
            match (path, range) {
            ("/multi", Some("bytes=0-1,5-6")) => reply(
                "206 Partial Content",
                &format!("Content-Type: {multi}\r\n"),
                "\r\n--XX\r\nContent-Range: bytes 5-6/10\r\n\r\n56\r\n--XX\r\nContent-Range: bytes 0-1/10\r\n\r\n01\r\n--XX--\r\n",
            ),
            ("/single", Some("bytes=2-3")) => reply("206 Partial Content", "Content-Range: bytes 2-3/10\r\n", "23"),
            ("/no-range", _) => reply("206 Partial Content", "", "23"),
            ("/ignores", _) => reply("200 OK", "", "0123456789"),
            ("/garbage", _) => reply("206 Partial Content", &format!("Content-Type: {multi}\r\n"), "garbage\r\n"),
            ("/moved", _) => reply("302 Found", "Location: /gone\r\n", ""),
            _ => reply("404 Not Found", "", ""),
        }
        });
        let public = Transport::public(Duration::from_secs(5), Duration::from_secs(5));
        let at = |path: &str| Location::Url(format!("{base}{path}"));
        assert_eq!(
            parts_of(&public, &at("/multi"), &[(0, 1), (5, 6)]).unwrap(),
            vec![((5, 6), "56".into()), ((0, 1), "01".into())]
        );
        assert_eq!(parts_of(&public, &at("/single"), &[(2, 3)]).unwrap(), vec![((2, 3), "23".into())]);
        let err = |t: &Transport, path: &str| parts_of(t, &at(path), &[(2, 3)]).unwrap_err();
        assert!(matches!(err(&public, "/no-range"), FetchError::Multipart { source: MultipartError::NoRange, .. }));
        assert!(matches!(err(&public, "/ignores"), FetchError::RangeIgnored { .. }));
        let e = err(&public, "/garbage");
        assert!(matches!(e, FetchError::Multipart { source: MultipartError::Unexpected(_), .. }), "{e}");
        assert!(matches!(err(&public, "/404"), FetchError::Status { status: 404, .. }));
        // A public origin's redirect is followed (here to a 404); with private
        // headers it is refused, and other statuses stay what they are.
        assert!(matches!(err(&public, "/moved"), FetchError::Status { status: 404, .. }));
        let dir = tempfile::tempdir().unwrap();
        let headers = dir.path().join("h");
        std::fs::write(&headers, "X-Key: k\n").unwrap();
        std::fs::set_permissions(&headers, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let origin = crate::transport::PrivateOrigin { headers_file: Some(headers), ..Default::default() };
        let private = Transport::new(&origin, Duration::from_secs(5), Duration::from_secs(5)).unwrap();
        let e = err(&private, "/moved");
        assert!(matches!(&e, FetchError::Redirect { to, .. } if to == "/gone"), "{e}");
        assert!(matches!(err(&private, "/404"), FetchError::Status { status: 404, .. }));
        let e = at("/moved").open(&private, 0).err().unwrap();
        assert!(
            e.to_string().contains("redirects to /gone, and requests carrying private headers follow no redirect"),
            "{e}"
        );

        // A local file answers the ranges in the order asked.
        let p = dir.path().join("f");
        std::fs::write(&p, "0123456789").unwrap();
        let local = Location::Path(p);
        assert_eq!(
            parts_of(&public, &local, &[(7, 9), (0, 0), (3, 4)]).unwrap(),
            vec![((7, 9), "789".into()), ((0, 0), "0".into()), ((3, 4), "34".into())]
        );
        // Read a byte at a time, a part gives its bytes and nothing more of the file.
        let mut parts = local.read_ranges(&public, &[(3, 6)], Duration::from_secs(1)).unwrap();
        assert_eq!(parts.next_part().unwrap(), Some((3, 6)));
        let mut rest = Vec::new();
        let mut byte = [0u8; 1];
        while rest.len() < 10 && parts.read(&mut byte).unwrap() == 1 {
            rest.push(byte[0]);
        }
        assert_eq!(rest, b"3456");
        assert!(matches!(
            Location::Path(dir.path().join("nope")).read_ranges(&public, &[(0, 0)], Duration::from_secs(1)),
            Err(FetchError::Local { .. })
        ));
    }

    #[test]
    fn content_ranges() {
        assert_eq!(parse_content_range("bytes 4-9/10"), Some((4, 9)));
        assert_eq!(parse_content_range(" bytes 7-7/*"), Some((7, 7)));
        for bad in ["bytes 9-4/10", "4-9/10", "bytes 4-9", "bytes x-9/10", "bytes 4-/10", ""] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
    }
}
