//! The parts of a `multipart/byteranges` body (RFC 9110 §14.6), the answer
//! a server gives to a Range request for several ranges at once.
//!
//! The body comes from a server we do not trust, so every read is bounded:
//! header lines by length and count, blank lines between parts by count. The
//! parser only reads delimiters and part headers; the caller reads each
//! part's bytes straight from [`Parts::body`], so a large part is never
//! buffered here. It works on any [`BufRead`] (a `&[u8]` in the unit tests
//! and the fuzz target, an HTTP body in production).

use std::io::{self, BufRead, Read};

use crate::location::parse_content_range;

/// Longest line accepted in a multipart body's delimiters and headers.
pub const MAX_LINE: u64 = 4096;
/// Header lines accepted per part (servers send two or three).
pub const MAX_PART_HEADERS: usize = 16;
/// Blank lines accepted before a part's delimiter (RFC 2046 puts one there).
pub const MAX_BLANK_LINES: usize = 4;

/// Why a multipart body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MultipartError {
    /// Reading the body failed.
    #[error("the transfer broke")]
    Io(#[from] io::Error),
    /// A line is longer than [`MAX_LINE`] or the body ended inside one.
    #[error("a delimiter or header line is longer than {MAX_LINE} bytes or cut off")]
    LongLine,
    /// Too many blank lines in a row.
    #[error("more than {MAX_BLANK_LINES} blank lines between parts")]
    Blank,
    /// A line where a delimiter belongs.
    #[error("unexpected line in multipart body: {0:.80}")]
    Unexpected(String),
    /// A part with too many header lines.
    #[error("a part has more than {MAX_PART_HEADERS} header lines")]
    Headers,
    /// A part without a usable `Content-Range`.
    #[error("a part has no valid Content-Range")]
    NoRange,
}

/// The boundary named by a `Content-Type: multipart/byteranges; boundary=X` value.
pub fn boundary(content_type: &str) -> Option<&str> {
    let mut params = content_type.split(';');
    let kind = params.next()?.trim();
    if !kind.eq_ignore_ascii_case("multipart/byteranges") {
        return None;
    }
    params.find_map(|p| p.trim().strip_prefix("boundary=")).map(|b| b.trim_matches('"')).filter(|b| !b.is_empty())
}

#[derive(Debug)]
enum Kind {
    /// A 206 for one range: the whole body is that range.
    Single(Option<(u64, u64)>),
    /// Parts separated by `--boundary` lines, closed by `--boundary--`.
    Multi { delimiter: String, closed: bool },
}

/// A body of byte ranges, read one part at a time: [`Parts::next_part`]
/// gives the range of the next part, whose bytes the caller then reads
/// (exactly `end - start + 1` of them) from [`Parts::body`].
#[derive(Debug)]
pub struct Parts<R> {
    body: R,
    kind: Kind,
}

impl<R: BufRead> Parts<R> {
    /// A `multipart/byteranges` body with this `boundary`.
    pub fn multipart(body: R, boundary: &str) -> Self {
        Parts { body, kind: Kind::Multi { delimiter: format!("--{boundary}"), closed: false } }
    }

    /// A single-range body (`Content-Range: bytes a-b/n` on the response itself).
    pub fn single(body: R, range: (u64, u64)) -> Self {
        Parts { body, kind: Kind::Single(Some(range)) }
    }

    /// The next part's inclusive byte range, or `None` after the last one.
    pub fn next_part(&mut self) -> Result<Option<(u64, u64)>, MultipartError> {
        let (delimiter, closed) = match &mut self.kind {
            Kind::Single(range) => return Ok(range.take()),
            Kind::Multi { closed: true, .. } => return Ok(None),
            Kind::Multi { delimiter, closed } => (delimiter.as_str(), closed),
        };
        let mut blank = 0;
        loop {
            let line = read_line(&mut self.body)?;
            if line.is_empty() {
                blank += 1;
                if blank > MAX_BLANK_LINES {
                    return Err(MultipartError::Blank);
                }
                continue;
            }
            if line.strip_prefix(delimiter) == Some("--") {
                *closed = true;
                return Ok(None);
            }
            if line != delimiter {
                // Server text: it may end up in an error message on a terminal.
                return Err(MultipartError::Unexpected(crate::text::printable(&line)));
            }
            break;
        }
        let mut range = None;
        for _ in 0..=MAX_PART_HEADERS {
            let header = read_line(&mut self.body)?;
            if header.is_empty() {
                return range.map(Some).ok_or(MultipartError::NoRange);
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.trim().eq_ignore_ascii_case("content-range") {
                    range = parse_content_range(value);
                }
            }
        }
        Err(MultipartError::Headers)
    }

    /// The body, positioned at the start of the current part's bytes.
    pub fn body(&mut self) -> &mut R {
        &mut self.body
    }
}

/// One line without its line ending (`\n` or `\r\n`), at most [`MAX_LINE`] bytes.
fn read_line(r: &mut impl BufRead) -> Result<String, MultipartError> {
    let mut line = Vec::new();
    r.take(MAX_LINE).read_until(b'\n', &mut line)?;
    if line.pop() != Some(b'\n') {
        return Err(MultipartError::LongLine);
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A part's inclusive range and its bytes.
    type Part = ((u64, u64), String);

    /// Every part, or the error that stopped the parse.
    fn parse(body: &str, boundary: &str) -> Result<Vec<Part>, String> {
        let mut parts = Parts::multipart(body.as_bytes(), boundary);
        let mut out = Vec::new();
        while let Some((a, b)) = parts.next_part().map_err(|e| e.to_string())? {
            let mut buf = vec![0; (b - a + 1) as usize];
            parts.body().read_exact(&mut buf).map_err(|e| e.to_string())?;
            out.push(((a, b), String::from_utf8(buf).unwrap()));
        }
        Ok(out)
    }

    #[test]
    fn reads_the_parts_servers_send() {
        // nginx's layout: CRLF, a blank line before each delimiter.
        let nginx = "\r\n--00000000000000000001\r\nContent-Type: application/octet-stream\r\n\
                     Content-Range: bytes 0-3/20\r\n\r\n0123\r\n--00000000000000000001\r\n\
                     Content-Range: bytes 10-11/20\r\n\r\nab\r\n--00000000000000000001--\r\n";
        assert_eq!(
            parse(nginx, "00000000000000000001").unwrap(),
            vec![((0, 3), "0123".into()), ((10, 11), "ab".into())]
        );
        // Bare LF, no preamble, header names in any case.
        let lf = "--B\ncontent-range: bytes 5-5/9\n\nx\n--B--\n";
        assert_eq!(parse(lf, "B").unwrap(), vec![((5, 5), "x".into())]);
        // Nothing after the closing delimiter is read.
        assert_eq!(parse("--B--\r\ngarbage", "B").unwrap(), vec![]);
    }

    #[test]
    fn refuses_what_a_hostile_server_could_send() {
        let long = format!("--B\r\nX: {}\r\n", "a".repeat(MAX_LINE as usize));
        let many_headers = format!("--B\r\n{}\r\n", "X: y\r\n".repeat(MAX_PART_HEADERS + 1));
        let blanks = |n: usize| format!("{}--B\r\nContent-Range: bytes 0-0/1\r\n\r\nx\r\n--B--\r\n", "\r\n".repeat(n));
        let cases = [
            (long.as_str(), "longer than 4096 bytes"),
            ("--B\r\nContent-Range: bytes 0-0/1", "longer than 4096 bytes or cut off"),
            (many_headers.as_str(), "more than 16 header lines"),
            ("--B\r\nContent-Type: x\r\n\r\n", "no valid Content-Range"),
            ("--B\r\nContent-Range: bytes 9-1/10\r\n\r\n", "no valid Content-Range"),
            ("--C\r\n", "unexpected line in multipart body: --C"),
            ("--B-\r\n", "unexpected line in multipart body: --B-"),
            ("HTTP/1.1 200 OK\x1b[2J\r\n", "unexpected line in multipart body: HTTP/1.1 200 OK\\u{1b}[2J"),
            ("", "cut off"),
        ];
        for (body, want) in cases {
            let e = parse(body, "B").unwrap_err();
            assert!(e.contains(want), "{body:?}: {e}");
        }
        assert_eq!(parse(&blanks(MAX_BLANK_LINES), "B").unwrap().len(), 1);
        assert!(parse(&blanks(MAX_BLANK_LINES + 1), "B").unwrap_err().contains("more than 4 blank lines"));
        // Exactly MAX_PART_HEADERS header lines are fine.
        let sixteen = format!("--B\r\n{}Content-Range: bytes 0-0/1\r\n\r\nx\r\n--B--\r\n", "X: y\r\n".repeat(15));
        assert_eq!(parse(&sixteen, "B").unwrap().len(), 1);
    }

    #[test]
    fn a_single_range_is_one_part() {
        let mut parts = Parts::single(&b"abc"[..], (7, 9));
        assert_eq!(parts.next_part().unwrap(), Some((7, 9)));
        let mut s = String::new();
        parts.body().read_to_string(&mut s).unwrap();
        assert_eq!(s, "abc");
        assert_eq!(parts.next_part().unwrap(), None);
    }

    #[test]
    fn boundaries() {
        assert_eq!(boundary("multipart/byteranges; boundary=00000000000000000001"), Some("00000000000000000001"));
        assert_eq!(boundary("Multipart/Byteranges;boundary=\"a b\""), Some("a b"));
        for other in [
            "application/octet-stream",
            "multipart/byteranges",
            "multipart/mixed; boundary=x",
            "",
            "multipart/byteranges; boundary=",
        ] {
            assert_eq!(boundary(other), None, "{other}");
        }
    }
}
