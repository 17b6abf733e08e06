//! A tiny HTTP/1.1 server on 127.0.0.1 that misbehaves on purpose: it can cut
//! a body short, send more than it announced, or answer with any status.
//! Each request is answered on its own thread; the server stops when dropped.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How to answer one path.
#[derive(Clone, Debug)]
pub enum Reply {
    /// 200 with this body.
    Body(Vec<u8>),
    /// Announce the full length, send only the first `n` bytes, then close.
    Truncated(Vec<u8>, usize),
    /// Send the body plus `extra` more bytes, announcing the larger length.
    TooLong(Vec<u8>, usize),
    /// This status with an empty body.
    Status(u16),
    /// Announce the full length, send the first `n` bytes, then stall for a minute.
    Stall(Vec<u8>, usize),
    /// A redirect to the same path, forever.
    RedirectLoop,
    /// This status with a Retry-After header.
    RetryAfter(u16, u32),
    /// 206 for any request, but with the wrong range (the first bytes).
    WrongRange(Vec<u8>),
    /// 200 with no length and a body that never ends.
    Endless,
    /// Range requests answered correctly (multipart/byteranges for several
    /// ranges), each after sleeping this long.
    SlowRanges(Vec<u8>, Duration),
    /// 206 multipart/byteranges with boundary `B` and no length: `head`, then
    /// `repeat` every 10 ms until the client hangs up (or nothing, if empty).
    Multipart {
        /// Sent first.
        head: Vec<u8>,
        /// Sent over and over after it.
        repeat: Vec<u8>,
    },
}

/// Answers `Range: bytes=a-b,c-d,...` over `body` (one part, or multipart/byteranges).
fn ranges_reply(out: &mut TcpStream, body: &[u8], range: &str) -> std::io::Result<()> {
    let ranges: Vec<(usize, usize)> = range
        .trim()
        .strip_prefix("bytes=")
        .unwrap_or("")
        .split(',')
        .filter_map(|r| {
            let (a, b) = r.trim().split_once('-')?;
            let a: usize = a.parse().ok()?;
            let b: usize = if b.is_empty() { body.len() - 1 } else { b.parse().ok()? };
            Some((a, b.min(body.len() - 1)))
        })
        .collect();
    match ranges.as_slice() {
        [] => write!(out, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())
            .and_then(|_| out.write_all(body)),
        [(a, b)] => write!(
            out,
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len(),
            b - a + 1
        )
        .and_then(|_| out.write_all(&body[*a..=*b])),
        many => {
            let mut m = Vec::new();
            for (a, b) in many {
                write!(m, "\r\n--B\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {a}-{b}/{}\r\n\r\n", body.len())?;
                m.extend_from_slice(&body[*a..=*b]);
            }
            m.extend_from_slice(b"\r\n--B--\r\n");
            write!(
                out,
                "HTTP/1.1 206 Partial Content\r\nContent-Type: multipart/byteranges; boundary=B\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                m.len()
            )
            .and_then(|_| out.write_all(&m))
        }
    }
}

/// A running fault server.
pub struct FaultServer {
    /// Its port.
    pub port: u16,
    routes: Arc<Mutex<HashMap<String, Reply>>>,
    log: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl FaultServer {
    /// Starts a server with no routes (everything is 404).
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let routes: Arc<Mutex<HashMap<String, Reply>>> = Arc::default();
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (r, l, s) = (routes.clone(), log.clone(), stop.clone());
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (r, l) = (r.clone(), l.clone());
                        std::thread::spawn(move || serve(stream, &r, &l));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FaultServer { port, routes, log, stop }
    }

    /// How many requests for `path` the server has received.
    pub fn requests_for(&self, path: &str) -> usize {
        self.log.lock().unwrap().iter().filter(|p| *p == path).count()
    }

    /// Sets the reply for `path` (e.g. `/stable.json`).
    pub fn route(&self, path: &str, reply: Reply) {
        self.routes.lock().unwrap().insert(path.to_owned(), reply);
    }

    /// `http://127.0.0.1:PORT` + path.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(stream: TcpStream, routes: &Mutex<HashMap<String, Reply>>, log: &Mutex<Vec<String>>) {
    stream.set_nonblocking(false).ok();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    let mut range = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = v.trim().to_owned();
            }
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("/").to_owned();
    log.lock().unwrap().push(path.clone());
    let reply = routes.lock().unwrap().get(&path).cloned().unwrap_or(Reply::Status(404));
    let mut out = stream;
    // Errors writing to a client that hung up are expected in fault tests.
    let _ = match reply {
        Reply::Body(b) => write!(out, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", b.len())
            .and_then(|_| out.write_all(&b)),
        Reply::Truncated(b, n) => {
            write!(out, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", b.len())
                .and_then(|_| out.write_all(&b[..n]))
        }
        Reply::TooLong(b, extra) => {
            write!(out, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", b.len() + extra)
                .and_then(|_| out.write_all(&b))
                .and_then(|_| out.write_all(&vec![b'x'; extra]))
        }
        Reply::Status(code) => write!(out, "HTTP/1.1 {code} Status\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
        Reply::Stall(b, n) => {
            write!(out, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", b.len())
                .and_then(|_| out.write_all(&b[..n]))
                .and_then(|_| out.flush())
                .map(|_| std::thread::sleep(std::time::Duration::from_secs(60)))
        }
        Reply::RetryAfter(code, secs) => {
            write!(out, "HTTP/1.1 {code} Busy\r\nRetry-After: {secs}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        }
        Reply::WrongRange(b) => {
            let n = b.len().min(1000);
            write!(out, "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-{}/{}\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n", n - 1, b.len())
                .and_then(|_| out.write_all(&b[..n]))
        }
        Reply::Endless => write!(out, "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n").and_then(|_| {
            let block = vec![b'z'; 64 * 1024];
            // Until the client hangs up.
            loop {
                out.write_all(&block)?;
            }
        }),
        Reply::SlowRanges(body, delay) => {
            std::thread::sleep(delay);
            ranges_reply(&mut out, &body, &range)
        }
        Reply::Multipart { head, repeat } => write!(
            out,
            "HTTP/1.1 206 Partial Content\r\nContent-Type: multipart/byteranges; boundary=B\r\nConnection: close\r\n\r\n"
        )
        .and_then(|_| out.write_all(&head))
        .and_then(|_| {
            // Until the client hangs up.
            while !repeat.is_empty() {
                out.write_all(&repeat)?;
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(())
        }),
        Reply::RedirectLoop => {
            write!(out, "HTTP/1.1 302 Found\r\nLocation: {path}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        }
    };
    let _ = out.flush();
}
