//! HTTP/1.1 on one server-side connection: reading requests under size and time limits, and
//! writing responses.
//!
//! Only what the API needs is accepted: a request line and headers parsed by `httparse`, a body
//! framed by `Content-Length` (no chunked transfer coding), persistent connections with
//! pipelining (bytes after one request stay buffered for the next), and
//! `Expect: 100-continue`. Anything else is answered with a 4xx/5xx and the connection closes,
//! because after a framing error the next request's start cannot be found reliably.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::server::ApiServerLimits;

/// Header slots handed to `httparse`; a request with more headers is refused with 431.
const MAX_HEADERS: usize = 32;
/// How much is read from the socket at a time.
const READ_CHUNK: usize = 8192;
/// After refusing a request, at most this much of what the client is still sending is read
/// and discarded, so that it sees our response instead of a connection reset.
const MAX_DRAIN_BYTES: usize = 4 << 20;
/// How long the discard phase may last.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// One complete request, with the framing already removed.
#[derive(Debug)]
pub(crate) struct Request {
    /// The method token, e.g. `GET`.
    pub method: String,
    /// The request target as sent, e.g. `/api/v1/vm.info`.
    pub target: String,
    /// The body (empty when there was none).
    pub body: Vec<u8>,
    /// Whether the client allows the connection to serve another request after this one.
    pub keep_alive: bool,
}

/// A response; the body, when present, is JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Response {
    /// Status code.
    pub status: u16,
    /// JSON body, absent for 204.
    pub body: Option<Vec<u8>>,
    /// Value of the `Allow` header, sent with 405.
    pub allow: Option<String>,
}

impl Response {
    /// `204 No Content`.
    pub fn no_content() -> Self {
        Response {
            status: 204,
            body: None,
            allow: None,
        }
    }

    /// A response with a JSON body.
    pub fn json(status: u16, body: Vec<u8>) -> Self {
        Response {
            status,
            body: Some(body),
            allow: None,
        }
    }

    /// An error in Cloud Hypervisor's shape: a JSON array of strings, outermost first.
    pub fn error(status: u16, messages: &[String]) -> Self {
        // Serializing a slice of strings cannot fail; the fallback keeps the shape anyway.
        let body = serde_json::to_vec(messages).unwrap_or_else(|_| b"[]".to_vec());
        Response::json(status, body)
    }
}

/// What reading the next request produced.
#[derive(Debug)]
pub(crate) enum ReadOutcome {
    /// A complete request to dispatch.
    Request(Request),
    /// The client closed the connection, stayed idle too long, or the socket failed: close
    /// without answering.
    Closed,
    /// The request cannot be served: answer with this error, then close.
    Refused(Response),
}

/// The parts of a request head that outlive the `httparse` borrow of the read buffer.
struct Head {
    method: String,
    target: String,
    head_len: usize,
    content_length: usize,
    keep_alive: bool,
    expect_continue: bool,
}

/// The server side of one client connection.
pub(crate) struct Connection {
    stream: UnixStream,
    /// Bytes received but not yet consumed: the start of the next (pipelined) request.
    pending: Vec<u8>,
    limits: ApiServerLimits,
}

impl Connection {
    /// Serves requests from `stream` under `limits`.
    pub fn new(stream: UnixStream, limits: ApiServerLimits) -> Self {
        // Bounds every write (responses, 100-continue) so a client that stops reading
        // cannot park this thread.
        if let Err(err) = stream.set_write_timeout(Some(limits.request_timeout)) {
            tracing::debug!("cannot set API write timeout: {err}");
        }
        Connection {
            stream,
            pending: Vec::new(),
            limits,
        }
    }

    /// Waits for the next request. The idle timeout applies until its first byte arrives;
    /// from then on the whole request must arrive within the request timeout, so a client
    /// trickling bytes cannot hold the connection forever.
    pub fn read_request(&mut self) -> ReadOutcome {
        let idle_deadline = Instant::now() + self.limits.idle_timeout;
        let mut request_deadline = None;
        let head = loop {
            if !self.pending.is_empty() {
                let deadline = *request_deadline
                    .get_or_insert_with(|| Instant::now() + self.limits.request_timeout);
                match parse_head(&self.pending, &self.limits) {
                    Ok(Some(head)) => break head,
                    Ok(None) => {}
                    Err(response) => return ReadOutcome::Refused(response),
                }
                if let Some(outcome) = self.receive(deadline) {
                    return outcome;
                }
            } else if let Some(outcome) = self.receive(idle_deadline) {
                return outcome;
            }
        };

        if head.content_length > self.limits.max_body_bytes {
            return ReadOutcome::Refused(Response::error(
                413,
                &[format!(
                    "request body of {} bytes exceeds the limit of {} bytes",
                    head.content_length, self.limits.max_body_bytes
                )],
            ));
        }
        let total = head.head_len + head.content_length;
        if head.expect_continue && self.pending.len() < total {
            if let Err(err) = self.stream.write_all(b"HTTP/1.1 100 \r\n\r\n") {
                tracing::debug!("API client went away before 100-continue: {err}");
                return ReadOutcome::Closed;
            }
        }
        let deadline =
            request_deadline.unwrap_or_else(|| Instant::now() + self.limits.request_timeout);
        while self.pending.len() < total {
            if let Some(outcome) = self.receive(deadline) {
                return outcome;
            }
        }
        let body = self.pending[head.head_len..total].to_vec();
        self.pending.drain(..total);
        ReadOutcome::Request(Request {
            method: head.method,
            target: head.target,
            body,
            keep_alive: head.keep_alive,
        })
    }

    /// Reads more bytes into `pending`. Returns `None` when bytes arrived, otherwise how the
    /// read ended: end of stream or an error closes silently, a timeout in the middle of a
    /// request is answered with 408.
    fn receive(&mut self, deadline: Instant) -> Option<ReadOutcome> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Some(self.timed_out());
        }
        if let Err(err) = self.stream.set_read_timeout(Some(remaining)) {
            tracing::debug!("cannot set API read timeout: {err}");
            return Some(ReadOutcome::Closed);
        }
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Some(ReadOutcome::Closed),
                Ok(n) => {
                    self.pending.extend_from_slice(&chunk[..n]);
                    return None;
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Some(self.timed_out())
                }
                Err(err) => {
                    tracing::debug!("API connection read failed: {err}");
                    return Some(ReadOutcome::Closed);
                }
            }
        }
    }

    fn timed_out(&self) -> ReadOutcome {
        if self.pending.is_empty() {
            ReadOutcome::Closed
        } else {
            ReadOutcome::Refused(Response::error(
                408,
                &["request not received in time".to_string()],
            ))
        }
    }

    /// Sends `response`; `keep_alive` false adds `Connection: close`.
    pub fn write_response(&mut self, response: &Response, keep_alive: bool) -> io::Result<()> {
        self.stream
            .write_all(&encode_response(response, keep_alive))
    }

    /// Answers a refused request and closes the connection gracefully: our side stops
    /// sending, then whatever the client is still sending (say, the rest of an oversized
    /// body) is read and dropped for a bounded time, because closing a socket with unread
    /// data would reset the connection and the client could lose our answer.
    pub fn refuse_and_close(mut self, response: &Response) {
        if let Err(err) = self.write_response(response, false) {
            tracing::debug!("cannot send API error response: {err}");
            return;
        }
        if self.stream.shutdown(std::net::Shutdown::Write).is_err() {
            return;
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        let mut drained = 0usize;
        let mut chunk = [0u8; READ_CHUNK];
        while drained < MAX_DRAIN_BYTES {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() || self.stream.set_read_timeout(Some(remaining)).is_err() {
                break;
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => drained += n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // The server keeps a second handle on this socket (to interrupt reads at shutdown),
        // so dropping ours alone would not close the connection: end it explicitly.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// Parses the request head in `buf`: `Ok(None)` while it is incomplete, `Err` with the
/// response to send when it is malformed or too large.
fn parse_head(buf: &[u8], limits: &ApiServerLimits) -> Result<Option<Head>, Response> {
    let too_large = || {
        Response::error(
            431,
            &[format!(
                "request line and headers exceed {} bytes",
                limits.max_header_bytes
            )],
        )
    };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > limits.max_header_bytes => {
            return Err(too_large())
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Response::error(
                431,
                &[format!("more than {MAX_HEADERS} request headers")],
            ))
        }
        Err(err) => return Err(bad_request(format!("malformed request: {err}"))),
    };
    if head_len > limits.max_header_bytes {
        return Err(too_large());
    }
    // httparse reports all three once the head is complete.
    let (Some(method), Some(target), Some(minor_version)) =
        (request.method, request.path, request.version)
    else {
        return Err(bad_request("incomplete request line".to_string()));
    };

    let mut content_length: Option<usize> = None;
    let mut connection_close = false;
    let mut connection_keep_alive = false;
    let mut expect_continue = false;
    for header in request.headers.iter() {
        let value = std::str::from_utf8(header.value)
            .map_err(|_| bad_request(format!("header {} is not valid UTF-8", header.name)))?
            .trim();
        if header.name.eq_ignore_ascii_case("content-length") {
            let length = parse_content_length(value)?;
            if content_length.is_some_and(|seen| seen != length) {
                return Err(bad_request(
                    "conflicting Content-Length headers".to_string(),
                ));
            }
            content_length = Some(length);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Response::error(
                501,
                &[format!(
                    "Transfer-Encoding {value} is not supported; send Content-Length"
                )],
            ));
        } else if header.name.eq_ignore_ascii_case("connection") {
            for option in value.split(',').map(str::trim) {
                connection_close |= option.eq_ignore_ascii_case("close");
                connection_keep_alive |= option.eq_ignore_ascii_case("keep-alive");
            }
        } else if header.name.eq_ignore_ascii_case("expect") {
            if !value.eq_ignore_ascii_case("100-continue") {
                return Err(Response::error(
                    417,
                    &[format!("unsupported expectation: {value}")],
                ));
            }
            expect_continue = true;
        }
    }
    // HTTP/1.1 connections persist unless closed; HTTP/1.0 ones only when asked to.
    let keep_alive = if minor_version >= 1 {
        !connection_close
    } else {
        connection_keep_alive && !connection_close
    };
    Ok(Some(Head {
        method: method.to_string(),
        target: target.to_string(),
        head_len,
        content_length: content_length.unwrap_or(0),
        keep_alive,
        expect_continue,
    }))
}

fn parse_content_length(value: &str) -> Result<usize, Response> {
    // `usize::from_str` alone would accept a leading '+', which HTTP does not.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad_request(format!("invalid Content-Length: {value:?}")));
    }
    // Digits only, so a failure here is an overflow: far beyond any body limit.
    Ok(value.parse().unwrap_or(usize::MAX))
}

fn bad_request(message: String) -> Response {
    Response::error(400, &[message])
}

/// Serializes a response byte for byte the way micro_http (Cloud Hypervisor's HTTP server)
/// does, because Cloud Hypervisor's client depends on it: `ch-remote` takes everything between
/// `HTTP/1.1 ` and the first `\r` as the status code, so the status line is the code followed by
/// one space and no reason phrase (`HTTP/1.1 200 \r\n`; RFC 9112 allows the empty phrase).
/// Then `Server`, `Connection`, `Allow` when set, `Content-Type` and `Content-Length` with a
/// body; a 204 carries neither (RFC 9110 §8.6).
pub(crate) fn encode_response(response: &Response, keep_alive: bool) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 {} \r\nServer: ext-vmm\r\nConnection: {}\r\n",
        response.status,
        if keep_alive { "keep-alive" } else { "close" }
    );
    if let Some(allow) = &response.allow {
        head.push_str(&format!("Allow: {allow}\r\n"));
    }
    let body = match (&response.body, response.status) {
        (_, 204) => &[][..],
        (Some(body), _) => {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
            body.as_slice()
        }
        (None, _) => {
            // micro_http omits the header here; we keep it so that a generic HTTP/1.1 client
            // on a persistent connection knows the (empty) body ends (RFC 9112 §6.3).
            head.push_str("Content-Length: 0\r\n");
            &[][..]
        }
    };
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Result<Option<Head>, Response> {
        parse_head(raw.as_bytes(), &ApiServerLimits::default())
    }

    #[test]
    fn incomplete_head_waits_for_more() {
        assert!(matches!(
            head("GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n"),
            Ok(None)
        ));
    }

    #[test]
    fn keep_alive_defaults_follow_the_http_version() {
        let h11 = head("GET / HTTP/1.1\r\n\r\n").ok().flatten();
        assert!(h11.is_some_and(|h| h.keep_alive));
        let h10 = head("GET / HTTP/1.0\r\n\r\n").ok().flatten();
        assert!(h10.is_some_and(|h| !h.keep_alive));
        let h10_ka = head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .ok()
            .flatten();
        assert!(h10_ka.is_some_and(|h| h.keep_alive));
        let close = head("GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .ok()
            .flatten();
        assert!(close.is_some_and(|h| !h.keep_alive));
    }

    #[test]
    fn content_length_must_be_digits_and_agree() {
        let status = |raw: &str| head(raw).err().map(|r| r.status);
        assert_eq!(
            status("PUT / HTTP/1.1\r\nContent-Length: +5\r\n\r\n"),
            Some(400)
        );
        assert_eq!(
            status("PUT / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n"),
            Some(400)
        );
        assert_eq!(
            status("PUT / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"),
            Some(400)
        );
        let huge = head("PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n");
        assert!(huge
            .ok()
            .flatten()
            .is_some_and(|h| h.content_length == usize::MAX));
    }

    #[test]
    fn chunked_bodies_are_not_implemented() {
        let refused = head("PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").err();
        assert_eq!(refused.map(|r| r.status), Some(501));
    }

    #[test]
    fn no_content_has_no_length_header() {
        let bytes = encode_response(&Response::no_content(), true);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.starts_with("HTTP/1.1 204 \r\nServer: ext-vmm\r\nConnection: keep-alive\r\n"));
        assert!(!text.contains("Content-Length"));
        assert!(text.ends_with("\r\n\r\n"));
    }

    #[test]
    fn error_bodies_are_json_string_arrays() {
        let response = Response::error(404, &["no such endpoint".to_string()]);
        let parsed: Vec<String> =
            serde_json::from_slice(response.body.as_deref().unwrap_or_default())
                .unwrap_or_default();
        assert_eq!(parsed, vec!["no such endpoint".to_string()]);
    }

    const PIPELINE: &[u8] = b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n\
        PUT /api/v1/vm.snapshot HTTP/1.1\r\nContent-Length: 10\r\n\r\n{\"a\":\"bc\"}\
        PUT /api/v1/vm.pause HTTP/1.1\r\nConnection: close\r\n\r\n";

    #[test]
    fn every_prefix_of_a_head_is_incomplete_until_it_is_whole() {
        let first_head_len = PIPELINE
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|p| p + 4)
            .unwrap_or_default();
        for cut in 0..PIPELINE.len() {
            let parsed = parse_head(&PIPELINE[..cut], &ApiServerLimits::default());
            match parsed {
                Ok(None) => assert!(cut < first_head_len, "cut {cut}"),
                Ok(Some(head)) => {
                    assert!(cut >= first_head_len, "cut {cut}");
                    assert_eq!(head.head_len, first_head_len);
                }
                Err(response) => panic!("cut {cut}: refused with {}", response.status),
            }
        }
    }

    #[test]
    fn requests_arriving_a_byte_at_a_time_are_framed_exactly() {
        let (mut client, server) = UnixStream::pair().unwrap_or_else(|e| panic!("pair: {e}"));
        let writer = std::thread::spawn(move || {
            for byte in PIPELINE {
                if client.write_all(std::slice::from_ref(byte)).is_err() {
                    return;
                }
            }
        });
        let mut connection = Connection::new(server, ApiServerLimits::default());
        let mut seen = Vec::new();
        for _ in 0..3 {
            match connection.read_request() {
                ReadOutcome::Request(request) => seen.push((
                    request.method,
                    request.target,
                    request.body,
                    request.keep_alive,
                )),
                other => panic!("after {} requests: {other:?}", seen.len()),
            }
        }
        let _ = writer.join();
        assert_eq!(
            seen,
            vec![
                ("GET".into(), "/api/v1/vmm.ping".into(), Vec::new(), true),
                (
                    "PUT".into(),
                    "/api/v1/vm.snapshot".into(),
                    br#"{"a":"bc"}"#.to_vec(),
                    true
                ),
                ("PUT".into(), "/api/v1/vm.pause".into(), Vec::new(), false),
            ]
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_parser() {
        // A fixed xorshift stream: reproducible, and biased towards HTTP-ish bytes so the
        // parser gets past the first token now and then.
        let alphabet = b"GETPUT /api/v1:\r\n HTTP/1.1 Content-Length: 0123456789\t\0\xff";
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let mut input = Vec::new();
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 96) as usize;
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                input.push(alphabet[(state % alphabet.len() as u64) as usize]);
            }
            let _ = parse_head(&input, &ApiServerLimits::default());
        }
    }
}
