//! A real nginx on 127.0.0.1 serving a directory, started by a test with a
//! temp config and stopped when dropped. Its access log records every request
//! with the Range header and bytes sent, so tests can assert what crossed the wire.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running nginx.
pub struct Nginx {
    child: Child,
    /// The port it listens on.
    pub port: u16,
    /// Its access log.
    pub access_log: PathBuf,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Nginx {
    /// Serves `root` on a free port of 127.0.0.1.
    pub fn serve(root: &Path) -> Self {
        Self::serve_with(root, "")
    }

    /// Serves `root` with extra directives inside the `server` block.
    pub fn serve_with(root: &Path, extra: &str) -> Self {
        Self::start(root, "", extra)
    }

    /// Starts nginx with extra directives in the `http` block and in the `server` block.
    pub fn start(root: &Path, http_extra: &str, extra: &str) -> Self {
        Self::start_listening(root, "", http_extra, extra)
    }

    /// Serves `root` over TLS (the `ssl_*` directives belong in `extra`), with
    /// extra directives in the `http` block too; see [`Self::https_url`].
    pub fn serve_tls(root: &Path, http_extra: &str, extra: &str) -> Self {
        Self::start_listening(root, "ssl", http_extra, extra)
    }

    /// Starts nginx with `listen 127.0.0.1:PORT {listen}` and the extra directives.
    fn start_listening(root: &Path, listen: &str, http_extra: &str, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let access_log = dir.path().join("access.log");
        let conf = dir.path().join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{\n  log_format fmt '$request \"$http_range\" $status $body_bytes_sent';\n  access_log {log} fmt;\n\
                 client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
                 types {{ application/json json; application/octet-stream squashfs; }}\n{http_extra}\n\
                 server {{\n    listen 127.0.0.1:{port} {listen};\n    root {root};\n    {extra}\n  }}\n}}\n",
                d = dir.path().display(),
                log = access_log.display(),
                root = root.display(),
            ),
        )
        .unwrap();
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("nginx is installed (apt-get install nginx; the README's test command does)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nginx did not start; see {}/error.log", dir.path().display());
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx { child, port, access_log, _dir: dir }
    }

    /// `http://127.0.0.1:PORT/` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{}", self.port, path.trim_start_matches('/'))
    }

    /// `https://127.0.0.1:PORT/` + `path`.
    pub fn https_url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}/{}", self.port, path.trim_start_matches('/'))
    }

    /// A directory private to this nginx (for caches).
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// The access log's lines so far.
    pub fn log(&self) -> Vec<String> {
        std::fs::read_to_string(&self.access_log).unwrap_or_default().lines().map(str::to_owned).collect()
    }
}

/// Image bytes sent (`$body_bytes_sent`, the last field of our log format)
/// and the number of image requests in access-log `lines`.
pub fn image_bytes_sent(lines: &[String]) -> (u64, usize) {
    let images: Vec<&String> = lines.iter().filter(|l| l.starts_with("GET /images/")).collect();
    let bytes = images
        .iter()
        .map(|l| {
            l.rsplit(' ').next().and_then(|b| b.parse::<u64>().ok()).unwrap_or_else(|| panic!("no byte count: {l}"))
        })
        .sum();
    (bytes, images.len())
}

/// The byte ranges (first, last) of every image request in access-log
/// `lines`; a request without a Range header counts as the whole file.
pub fn image_ranges(lines: &[String]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for l in lines.iter().filter(|l| l.starts_with("GET /images/")) {
        let range = l.split('"').nth(1).unwrap_or_else(|| panic!("no Range field: {l}"));
        let Some(spec) = range.strip_prefix("bytes=") else {
            out.push((0, u64::MAX));
            continue;
        };
        for r in spec.split(',') {
            let (a, b) = r.trim().split_once('-').unwrap_or_else(|| panic!("bad range {r}: {l}"));
            let first = a.parse().unwrap_or_else(|_| panic!("bad range {r}: {l}"));
            out.push((first, b.parse().unwrap_or(u64::MAX)));
        }
    }
    out
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // Best effort: the process may already be gone.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
