//! HTTP/1.1 on one accepted connection of the control API: framing requests under the size
//! and time limits, and writing responses in micro_http's wire format.
//!
//! Accepted: a request line and headers (parsed by `httparse`), a body framed by
//! `Content-Length`, persistent connections and pipelined requests, `Expect: 100-continue`.
//! Refused, and the connection closed after the answer (the next request's start cannot be
//! trusted): a malformed head (400), a head over the limit (431), a body over the limit (413),
//! `Transfer-Encoding` (501), another expectation (417), a request that does not arrive in time
//! (408).

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::ApiLimits;

/// Header slots for `httparse`; more headers than this is a 431.
const MAX_HEADERS: usize = 24;
/// After a refusal, how much of what the client still sends is read and dropped, and for how
/// long: closing with unread bytes would reset the connection and could lose the answer.
const DISCARD_BYTES: usize = 1 << 20;
const DISCARD_TIME: Duration = Duration::from_secs(1);

/// A framed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    /// The method, e.g. `GET`.
    pub method: String,
    /// The path of the request target, without its query string.
    pub path: String,
    /// The body, empty when there was none.
    pub body: Vec<u8>,
    /// Whether the connection may carry another request after this one.
    pub keep_alive: bool,
}

/// A response: a status and, unless it is a 204, a JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Response {
    /// The status code.
    pub status: u16,
    /// The JSON body.
    pub json: Option<Vec<u8>>,
    /// The `Allow` header of a 405.
    pub allow: Option<String>,
}

impl Response {
    /// `204`, no body.
    pub fn empty() -> Self {
        Response {
            status: 204,
            json: None,
            allow: None,
        }
    }

    /// `status` with a JSON body.
    pub fn with_json(status: u16, json: Vec<u8>) -> Self {
        Response {
            status,
            json: Some(json),
            allow: None,
        }
    }

    /// An error as Cloud Hypervisor and ext-vmm answer one: `status` and a JSON array of
    /// messages, outermost first.
    pub fn failure(status: u16, messages: &[String]) -> Self {
        // A list of strings always serializes; the fallback only keeps the type total.
        let json = serde_json::to_vec(messages).unwrap_or_else(|_| b"[]".to_vec());
        Response::with_json(status, json)
    }

    /// The bytes on the wire. The status line is `HTTP/1.1 <code> ` with no reason phrase,
    /// byte for byte what micro_http sends and `ch-remote` parses; a 204 has neither
    /// `Content-Type` nor `Content-Length`, any other response has `Content-Length`.
    pub fn to_bytes(&self, keep_alive: bool) -> Vec<u8> {
        let connection = if keep_alive { "keep-alive" } else { "close" };
        let mut text = format!(
            "HTTP/1.1 {} \r\nServer: vhost-user-mem\r\nConnection: {connection}\r\n",
            self.status
        );
        if let Some(methods) = &self.allow {
            text += &format!("Allow: {methods}\r\n");
        }
        let body: &[u8] = match &self.json {
            _ if self.status == 204 => &[],
            Some(json) => {
                text += &format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n",
                    json.len()
                );
                json
            }
            None => {
                text += "Content-Length: 0\r\n";
                &[]
            }
        };
        text += "\r\n";
        let mut bytes = text.into_bytes();
        bytes.extend_from_slice(body);
        bytes
    }
}

/// What waiting for the next request gave.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// A request to answer.
    Request(Request),
    /// The client hung up, stayed idle past the limit, or the socket failed: close quietly.
    Gone,
    /// A request that cannot be served: send this, then close.
    Refused(Response),
}

/// The facts of a request head that framing needs.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    method: String,
    path: String,
    len: usize,
    content_length: usize,
    keep_alive: bool,
    expect_continue: bool,
}

/// What the headers said, gathered one header at a time.
#[derive(Debug, Default)]
struct HeaderFacts {
    content_length: Option<usize>,
    close: bool,
    keep_alive: bool,
    expect_continue: bool,
}

impl HeaderFacts {
    fn absorb(&mut self, name: &str, raw: &[u8]) -> Result<(), Response> {
        let value = std::str::from_utf8(raw)
            .map_err(|_| bad_request(format!("the {name} header is not UTF-8")))?
            .trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => {
                // Digits only: `usize::from_str` would also take a sign.
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad_request(format!("bad Content-Length {value:?}")));
                }
                // Too many digits for a usize is far over any limit.
                let length = value.parse().unwrap_or(usize::MAX);
                if self.content_length.is_some_and(|seen| seen != length) {
                    return Err(bad_request("two different Content-Length headers".into()));
                }
                self.content_length = Some(length);
            }
            "transfer-encoding" => {
                return Err(Response::failure(
                    501,
                    &[format!(
                        "Transfer-Encoding {value} is not supported: send Content-Length"
                    )],
                ))
            }
            "connection" => {
                for token in value.split(',').map(str::trim) {
                    self.close |= token.eq_ignore_ascii_case("close");
                    self.keep_alive |= token.eq_ignore_ascii_case("keep-alive");
                }
            }
            "expect" if value.eq_ignore_ascii_case("100-continue") => self.expect_continue = true,
            "expect" => {
                return Err(Response::failure(
                    417,
                    &[format!("expectation {value:?} is not supported")],
                ))
            }
            _ => {}
        }
        Ok(())
    }
}

fn bad_request(message: String) -> Response {
    Response::failure(400, &[message])
}

/// Parses the head at the start of `bytes`: `Ok(None)` while it is incomplete.
fn parse_head(bytes: &[u8], max_header_bytes: usize) -> Result<Option<Head>, Response> {
    let oversized = || {
        Response::failure(
            431,
            &[format!(
                "the request line and headers exceed {max_header_bytes} bytes"
            )],
        )
    };
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut slots);
    let len = match parsed.parse(bytes) {
        Ok(httparse::Status::Complete(len)) if len <= max_header_bytes => len,
        Ok(httparse::Status::Complete(_)) => return Err(oversized()),
        Ok(httparse::Status::Partial) if bytes.len() > max_header_bytes => return Err(oversized()),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Response::failure(
                431,
                &[format!("more than {MAX_HEADERS} headers")],
            ))
        }
        Err(e) => return Err(bad_request(format!("malformed request: {e}"))),
    };
    let (Some(method), Some(target), Some(minor)) = (parsed.method, parsed.path, parsed.version)
    else {
        return Err(bad_request("incomplete request line".into()));
    };
    let mut facts = HeaderFacts::default();
    for header in parsed.headers.iter() {
        facts.absorb(header.name, header.value)?;
    }
    let path = target.split('?').next().unwrap_or(target);
    Ok(Some(Head {
        method: method.to_string(),
        path: path.to_string(),
        len,
        content_length: facts.content_length.unwrap_or(0),
        // HTTP/1.1 persists unless told to close; HTTP/1.0 only when asked to keep alive.
        keep_alive: !facts.close && (minor >= 1 || facts.keep_alive),
        expect_continue: facts.expect_continue,
    }))
}

/// How a read from the client ended.
enum Filled {
    /// Bytes arrived.
    More,
    /// End of stream or a socket error.
    Ended,
    /// Nothing arrived before the deadline.
    Late,
}

/// The server side of one API connection.
pub(crate) struct HttpConnection {
    stream: UnixStream,
    /// Received and not yet consumed: the start of the next request when pipelined.
    unread: Vec<u8>,
    limits: ApiLimits,
}

impl HttpConnection {
    /// Serves `stream` under `limits`.
    pub fn new(stream: UnixStream, limits: ApiLimits) -> Self {
        // Every write is bounded, so a client that never reads cannot hold the thread.
        if let Err(e) = stream.set_write_timeout(Some(limits.request_timeout)) {
            tracing::debug!(error = %e, "cannot bound API writes");
        }
        HttpConnection {
            stream,
            unread: Vec::new(),
            limits,
        }
    }

    /// Waits for the next request: at most the idle timeout for its first byte, then at most
    /// the request timeout for all of it, so a client sending a byte now and then cannot keep
    /// the connection forever.
    pub fn next_request(&mut self) -> Incoming {
        let request_time = self.limits.request_timeout;
        let mut deadline = (!self.unread.is_empty()).then(|| Instant::now() + request_time);
        let head = loop {
            if !self.unread.is_empty() {
                match parse_head(&self.unread, self.limits.max_header_bytes) {
                    Ok(Some(head)) => break head,
                    Ok(None) => {}
                    Err(refusal) => return Incoming::Refused(refusal),
                }
            }
            let until = deadline.unwrap_or_else(|| Instant::now() + self.limits.idle_timeout);
            match self.fill(until) {
                Filled::More => {}
                Filled::Ended => return Incoming::Gone,
                Filled::Late if deadline.is_some() => return Incoming::Refused(too_late()),
                Filled::Late => return Incoming::Gone,
            }
            deadline.get_or_insert_with(|| Instant::now() + request_time);
        };
        let deadline = deadline.unwrap_or_else(|| Instant::now() + request_time);

        if head.content_length > self.limits.max_body_bytes {
            return Incoming::Refused(Response::failure(
                413,
                &[format!(
                    "a body of {} bytes is over the limit of {} bytes",
                    head.content_length, self.limits.max_body_bytes
                )],
            ));
        }
        let end = head.len + head.content_length;
        if head.expect_continue
            && self.unread.len() < end
            && self.stream.write_all(b"HTTP/1.1 100 \r\n\r\n").is_err()
        {
            return Incoming::Gone;
        }
        while self.unread.len() < end {
            match self.fill(deadline) {
                Filled::More => {}
                Filled::Ended => return Incoming::Gone,
                Filled::Late => return Incoming::Refused(too_late()),
            }
        }
        let body = self.unread[head.len..end].to_vec();
        self.unread.drain(..end);
        Incoming::Request(Request {
            method: head.method,
            path: head.path,
            body,
            keep_alive: head.keep_alive,
        })
    }

    fn fill(&mut self, until: Instant) -> Filled {
        let mut chunk = [0u8; 4096];
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Filled::Late;
            }
            if self.stream.set_read_timeout(Some(left)).is_err() {
                return Filled::Ended;
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return Filled::Ended,
                Ok(n) => {
                    self.unread.extend_from_slice(&chunk[..n]);
                    return Filled::More;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "API read failed");
                    return Filled::Ended;
                }
            }
        }
    }

    /// Sends `response`; `keep_alive` false says `Connection: close`.
    pub fn send(&mut self, response: &Response, keep_alive: bool) -> io::Result<()> {
        self.stream.write_all(&response.to_bytes(keep_alive))
    }

    /// Sends a refusal and closes: our side stops sending, then what the client still sends
    /// (the rest of an oversized body, say) is read and dropped for a bounded time and size,
    /// so that it reads the answer rather than a reset.
    pub fn refuse(mut self, response: &Response) {
        if self.send(response, false).is_err() || self.stream.shutdown(Shutdown::Write).is_err() {
            return;
        }
        let until = Instant::now() + DISCARD_TIME;
        let mut dropped = 0;
        let mut chunk = [0u8; 4096];
        while dropped < DISCARD_BYTES {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || self.stream.set_read_timeout(Some(left)).is_err() {
                return;
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return,
                Ok(n) => dropped += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

impl Drop for HttpConnection {
    fn drop(&mut self) {
        // The acceptor holds another handle on this socket (to end it at shutdown), so
        // dropping ours would not close the connection: end it here.
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

fn too_late() -> Response {
    Response::failure(408, &["the request did not arrive in time".to_string()])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<Head>, Response> {
        parse_head(text.as_bytes(), 8192)
    }

    fn refusal(text: &str) -> Option<u16> {
        head(text).err().map(|r| r.status)
    }

    #[test]
    fn heads_frame_and_persist_by_version() {
        assert!(matches!(head("GET /api/v1/status HTTP/1.1\r\n"), Ok(None)));
        let h = head("PUT /api/v1/resize?x=1 HTTP/1.1\r\nContent-Length: 20\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((h.path.as_str(), h.content_length), ("/api/v1/resize", 20));
        assert!(h.keep_alive);
        let keep = |text: &str| head(text).unwrap().unwrap().keep_alive;
        assert!(!keep("GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(!keep("GET / HTTP/1.0\r\n\r\n"));
        assert!(keep("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
    }

    #[test]
    fn bad_heads_get_their_status() {
        assert_eq!(
            refusal("PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            Some(400)
        );
        assert_eq!(
            refusal("PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Some(400)
        );
        assert_eq!(
            refusal("PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Some(501)
        );
        assert_eq!(
            refusal("PUT / HTTP/1.1\r\nExpect: magic\r\n\r\n"),
            Some(417)
        );
        assert_eq!(refusal("G\0T / HTTP/1.1\r\n\r\n"), Some(400));
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("X-{i}: y\r\n"))
            .collect();
        assert_eq!(refusal(&format!("GET / HTTP/1.1\r\n{many}\r\n")), Some(431));
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(9000));
        assert_eq!(refusal(&long), Some(431));
    }

    #[test]
    fn responses_are_written_as_micro_http_does() {
        let text = String::from_utf8(Response::empty().to_bytes(true)).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 204 \r\nServer: vhost-user-mem\r\nConnection: keep-alive\r\n\r\n"
        );
        let mut refused = Response::failure(405, &["no".into()]);
        refused.allow = Some("GET".into());
        let text = String::from_utf8(refused.to_bytes(false)).unwrap();
        assert!(text.starts_with("HTTP/1.1 405 \r\n"));
        assert!(text.contains("Connection: close\r\nAllow: GET\r\n"));
        assert!(text.ends_with("Content-Length: 6\r\n\r\n[\"no\"]"));
    }

    #[test]
    fn pipelined_requests_arriving_byte_by_byte_are_framed_exactly() {
        let wire: &[u8] = b"GET /api/v1/status HTTP/1.1\r\n\r\n\
            PUT /api/v1/resize HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}\
            GET /api/v1/stats HTTP/1.1\r\nConnection: close\r\n\r\n";
        let (mut client, server) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            for byte in wire {
                client.write_all(std::slice::from_ref(byte)).unwrap();
            }
        });
        let mut connection = HttpConnection::new(server, ApiLimits::default());
        let mut seen = Vec::new();
        for _ in 0..3 {
            match connection.next_request() {
                Incoming::Request(r) => seen.push((r.method, r.path, r.body, r.keep_alive)),
                other => panic!("{other:?}"),
            }
        }
        writer.join().unwrap();
        let expected = [
            ("GET", "/api/v1/status", &b""[..], true),
            ("PUT", "/api/v1/resize", b"{}", true),
            ("GET", "/api/v1/stats", b"", false),
        ];
        assert_eq!(seen.len(), expected.len());
        for (got, want) in seen.iter().zip(expected) {
            assert_eq!((got.0.as_str(), got.1.as_str(), &got.2[..], got.3), want);
        }
    }

    #[test]
    fn random_bytes_never_panic_the_parser() {
        let alphabet = b"GETPUT /api?v1:\r\n HTTP/1.0 Content-Length: 9\t\0\xffExpect";
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..10_000 {
            let len = (next() % 80) as usize;
            let input: Vec<u8> = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            let _ = parse_head(&input, 64);
        }
    }
}
