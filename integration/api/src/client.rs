//! A small HTTP/1.1 client for the API socket, used by `ext-remote` and the tests.
//!
//! One [`ApiClient`] is one connection; requests on it reuse the connection (keep-alive).
//! Responses are framed by `Content-Length`, or by the end of the stream when it is absent.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::routes::API_PREFIX;

/// Largest response head the client accepts.
const MAX_RESPONSE_HEAD: usize = 16 << 10;
/// Largest response body the client accepts.
const MAX_RESPONSE_BODY: usize = 16 << 20;
/// Header slots handed to `httparse`.
const MAX_RESPONSE_HEADERS: usize = 64;
/// Default time a response may take; generous because a pause in the nested lab is slow.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a request got no usable response. An HTTP error status is not an error here: it is
/// an [`ApiResponse`] whose [`ApiResponse::is_success`] is false.
#[derive(Debug, thiserror::Error)]
pub enum ApiClientError {
    /// The socket could not be reached.
    #[error("cannot connect to API socket {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Sending or receiving failed (including a timeout).
    #[error("API connection failed: {0}")]
    Io(#[from] io::Error),
    /// The server closed the connection before a complete response.
    #[error("the API server closed the connection before responding")]
    ConnectionClosed,
    /// The bytes received are not a valid HTTP response.
    #[error("malformed API response: {0}")]
    MalformedResponse(String),
}

/// One HTTP response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiResponse {
    /// Status code.
    pub status: u16,
    /// Reason phrase as sent.
    pub reason: String,
    /// Headers in the order received.
    pub headers: Vec<(String, String)>,
    /// Body (empty when there was none).
    pub body: Vec<u8>,
}

impl ApiResponse {
    /// True for a 2xx status.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The messages of an error response: the server's JSON array of strings, or the raw
    /// body as one message when it is not in that shape.
    pub fn error_messages(&self) -> Vec<String> {
        serde_json::from_slice::<Vec<String>>(&self.body).unwrap_or_else(|_| {
            let text = self.body_text();
            if text.trim().is_empty() {
                Vec::new()
            } else {
                vec![text]
            }
        })
    }
}

/// The full request target for an endpoint name, e.g. `vm.info` → `/api/v1/vm.info`.
pub fn endpoint_path(endpoint: &str) -> String {
    format!("{API_PREFIX}{endpoint}")
}

/// A connection to the API socket.
#[derive(Debug)]
pub struct ApiClient {
    stream: UnixStream,
    /// Bytes received past the previous response (a server may pipeline nothing, but a
    /// response read in one chunk with the next one must not lose it).
    pending: Vec<u8>,
}

impl ApiClient {
    /// Connects to the API socket at `path`, with [`DEFAULT_TIMEOUT`] for each response.
    ///
    /// # Errors
    /// [`ApiClientError::Connect`] when nothing accepts connections at `path`.
    pub fn connect(path: &Path) -> Result<Self, ApiClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ApiClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let client = ApiClient {
            stream,
            pending: Vec::new(),
        };
        client.set_timeout(Some(DEFAULT_TIMEOUT))?;
        Ok(client)
    }

    /// Sets how long a read or write may block (`None`: forever).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), ApiClientError> {
        self.stream.set_read_timeout(timeout)?;
        self.stream.set_write_timeout(timeout)?;
        Ok(())
    }

    /// Sends `method` on `endpoint` (a name like `vm.info`) with an optional JSON body and
    /// reads the response.
    ///
    /// # Errors
    /// Only when no complete response arrived (I/O failure, timeout, closed connection,
    /// malformed response); an HTTP error status is an `Ok` response.
    pub fn request(
        &mut self,
        method: &str,
        endpoint: &str,
        json_body: Option<&[u8]>,
    ) -> Result<ApiResponse, ApiClientError> {
        let mut request = format!(
            "{method} {} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n",
            endpoint_path(endpoint)
        )
        .into_bytes();
        if let Some(body) = json_body {
            request.extend_from_slice(
                format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            );
            request.extend_from_slice(body);
        } else {
            request.extend_from_slice(b"\r\n");
        }
        if let Err(error) = self.send_raw(&request) {
            // A server that refuses the connection (503 when all connection slots are taken)
            // answers and closes without reading the request, so the write can fail with
            // EPIPE while its answer waits in our receive buffer: prefer that answer.
            let peer_closed = matches!(
                &error,
                ApiClientError::Io(io_error) if matches!(
                    io_error.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                )
            );
            if peer_closed {
                if let Ok(response) = self.read_response() {
                    return Ok(response);
                }
            }
            return Err(error);
        }
        self.read_response()
    }

    /// Writes `bytes` to the connection unchanged (for tests of malformed or pipelined input).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ApiClientError> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    /// Reads the next final response, skipping `100 Continue`.
    pub fn read_response(&mut self) -> Result<ApiResponse, ApiClientError> {
        loop {
            let response = self.read_one_response()?;
            if !(100..200).contains(&response.status) {
                return Ok(response);
            }
        }
    }

    fn read_one_response(&mut self) -> Result<ApiResponse, ApiClientError> {
        let (status, reason, headers, head_len) = loop {
            let mut slots = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
            let mut response = httparse::Response::new(&mut slots);
            match response.parse(&self.pending) {
                Ok(httparse::Status::Complete(len)) => {
                    let headers = response
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_string(),
                                String::from_utf8_lossy(h.value).trim().to_string(),
                            )
                        })
                        .collect::<Vec<_>>();
                    let status = response.code.unwrap_or(0);
                    let reason = response.reason.unwrap_or("").to_string();
                    break (status, reason, headers, len);
                }
                Ok(httparse::Status::Partial) if self.pending.len() > MAX_RESPONSE_HEAD => {
                    return Err(ApiClientError::MalformedResponse(
                        "response head too large".to_string(),
                    ))
                }
                Ok(httparse::Status::Partial) => {}
                Err(err) => return Err(ApiClientError::MalformedResponse(err.to_string())),
            }
            if self.fill()? == 0 {
                return Err(ApiClientError::ConnectionClosed);
            }
        };
        self.pending.drain(..head_len);

        let no_body = (100..200).contains(&status) || status == 204 || status == 304;
        let content_length = headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
            .map(|(_, value)| {
                value.parse::<usize>().map_err(|_| {
                    ApiClientError::MalformedResponse(format!("bad Content-Length {value:?}"))
                })
            })
            .transpose()?;
        let body = match (no_body, content_length) {
            (true, _) => Vec::new(),
            (false, Some(length)) if length > MAX_RESPONSE_BODY => {
                return Err(ApiClientError::MalformedResponse(format!(
                    "response body of {length} bytes is too large"
                )))
            }
            (false, Some(length)) => {
                while self.pending.len() < length {
                    if self.fill()? == 0 {
                        return Err(ApiClientError::ConnectionClosed);
                    }
                }
                self.pending.drain(..length).collect()
            }
            (false, None) => {
                // No length: the body runs to the end of the stream.
                while self.fill()? != 0 {
                    if self.pending.len() > MAX_RESPONSE_BODY {
                        return Err(ApiClientError::MalformedResponse(
                            "response body too large".to_string(),
                        ));
                    }
                }
                std::mem::take(&mut self.pending)
            }
        };
        Ok(ApiResponse {
            status,
            reason,
            headers,
            body,
        })
    }

    /// Reads what is available into `pending`; returns the byte count (0 at end of stream).
    fn fill(&mut self) -> Result<usize, ApiClientError> {
        let mut chunk = [0u8; 8192];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(n) => {
                    self.pending.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(ApiClientError::Io(err)),
            }
        }
    }
}
