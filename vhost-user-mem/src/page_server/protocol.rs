//! The page-server protocol, version 1 (`PAGE_SERVER.md`): newline-terminated JSON messages on
//! a unix stream socket, the userfaultfd riding on the hello as `SCM_RIGHTS` ancillary data.
//! Both halves (the server and [`super::client`]) use these types and this framing.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use serde::{Deserialize, Serialize};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::error::{Error, Result};

/// The protocol version this crate speaks (the `version` field of every message).
pub const PROTOCOL_VERSION: u32 = 1;

/// The longest message accepted, newline included.
pub const MAX_MESSAGE_BYTES: usize = 64 << 10;

/// File descriptors one read accepts; a hello carries exactly one.
const MAX_FDS_PER_READ: usize = 4;

/// One guest memory region as the VMM mapped and registered it (Firecracker's
/// `GuestRegionUffdMapping` shape, with the guest address in place of a file offset: an
/// ext-snapshot is sparse, so its regions are named by guest address).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionMapping {
    /// Where the region starts in the VMM's address space (page aligned).
    pub base_host_virt_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Guest physical address of the region's first byte.
    pub guest_phys_addr: u64,
    /// Page size of the mapping in bytes (4096; huge pages are not served).
    pub page_size: u64,
}

/// Every message of the protocol, told apart by its `type` field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    /// VMM → server, first and only message, carrying the userfaultfd.
    Hello {
        /// Protocol version the VMM speaks.
        version: u32,
        /// The ext-snapshot identity the VMM restores (hex, as `ext-snapshot info` prints it);
        /// when given, the server refuses a different snapshot.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        snapshot_id: Option<String>,
        /// The guest memory regions, in guest address order.
        regions: Vec<RegionMapping>,
    },
    /// Server → VMM: the hello is accepted, faults are served from now on.
    Ack {
        /// Protocol version of the server.
        version: u32,
        /// The identity of the snapshot served.
        snapshot_id: String,
        /// Data pages in the snapshot.
        data_pages: u64,
        /// Whether the server copies data pages in the background.
        prefault: bool,
    },
    /// Server → VMM: the hello is refused, or serving failed. The server stops serving this
    /// VM; faults stay blocked until the VMM closes the connection.
    Error {
        /// Protocol version of the server.
        version: u32,
        /// What went wrong.
        error: String,
    },
}

impl Message {
    /// An error message of this version.
    pub fn error(text: impl Into<String>) -> Self {
        Message::Error {
            version: PROTOCOL_VERSION,
            error: text.into(),
        }
    }

    /// Decodes one message (without its newline). The version is checked before the rest, so
    /// a peer of another version is told so rather than about fields it does not know.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| Error::Protocol(format!("the message is not JSON: {e}")))?;
        match value.get("version").and_then(serde_json::Value::as_u64) {
            Some(version) if version == u64::from(PROTOCOL_VERSION) => {}
            Some(version) => {
                return Err(Error::Protocol(format!(
                    "protocol version {version} is not supported (this side speaks \
                     {PROTOCOL_VERSION})"
                )))
            }
            None => {
                return Err(Error::Protocol(
                    "the message has no numeric \"version\" field".into(),
                ))
            }
        }
        serde_json::from_value(value)
            .map_err(|e| Error::Protocol(format!("malformed message: {e}")))
    }

    /// The message as it goes on the wire: compact JSON and a newline.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut bytes = serde_json::to_vec(self)
            .map_err(|e| Error::Protocol(format!("cannot encode a message: {e}")))?;
        bytes.push(b'\n');
        Ok(bytes)
    }
}

/// Sends `message`, with `fd` as `SCM_RIGHTS` on its first bytes when given.
pub fn send(stream: &UnixStream, message: &Message, fd: Option<RawFd>) -> Result<()> {
    let bytes = message.encode()?;
    let sent = match fd {
        Some(fd) => stream
            .send_with_fd(bytes.as_slice(), fd)
            .map_err(|e| Error::io("sending a message with a descriptor", e.into()))?,
        None => 0,
    };
    let mut writer = stream;
    writer
        .write_all(&bytes[sent..])
        .map_err(|e| Error::io("sending a message", e))
}

/// A message read from the socket, with the descriptors that came with its bytes.
#[derive(Debug)]
pub struct Received {
    /// The message's bytes, without the newline.
    pub bytes: Vec<u8>,
    /// Descriptors received with them (owned: closed when dropped).
    pub fds: Vec<OwnedFd>,
}

/// Reads newline-terminated messages (and their descriptors) from a stream socket.
#[derive(Debug, Default)]
pub struct MessageReader {
    buffer: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl MessageReader {
    /// The next message; `Ok(None)` when the peer closed the connection between messages.
    /// `Err` for a read error, a timeout (the stream's read timeout), a message over
    /// [`MAX_MESSAGE_BYTES`], too many descriptors, or a connection closed mid-message.
    pub fn read(&mut self, stream: &UnixStream) -> Result<Option<Received>> {
        loop {
            if let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let mut bytes: Vec<u8> = self.buffer.drain(..=end).collect();
                bytes.pop();
                return Ok(Some(Received {
                    bytes,
                    fds: std::mem::take(&mut self.fds),
                }));
            }
            if self.buffer.len() >= MAX_MESSAGE_BYTES {
                return Err(Error::Protocol(format!(
                    "a message longer than {MAX_MESSAGE_BYTES} bytes"
                )));
            }
            let mut chunk = [0u8; 4096];
            let mut raw_fds: [RawFd; MAX_FDS_PER_READ] = [-1; MAX_FDS_PER_READ];
            let mut iovec = [libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: chunk.len(),
            }];
            // SAFETY: the one iovec points at `chunk`, a local buffer the kernel may fill with
            // arbitrary bytes; `raw_fds` has room for the descriptors asked for.
            let received = unsafe { stream.recv_with_fds(&mut iovec, &mut raw_fds) };
            let (count, fd_count) = match received {
                Ok(counts) => counts,
                Err(e) if e.errno() == libc::EINTR => continue,
                Err(e) if e.errno() == libc::ENOBUFS => {
                    return Err(Error::Protocol(format!(
                        "more than {MAX_FDS_PER_READ} file descriptors in one message"
                    )))
                }
                Err(e) => return Err(Error::io("reading the socket", e.into())),
            };
            for &fd in &raw_fds[..fd_count] {
                // SAFETY: `recv_with_fds` returned `fd_count` new descriptors that nothing
                // else owns.
                self.fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            if count == 0 {
                if self.buffer.is_empty() && self.fds.is_empty() {
                    return Ok(None);
                }
                return Err(Error::Protocol(
                    "the connection closed in the middle of a message".into(),
                ));
            }
            self.buffer.extend_from_slice(&chunk[..count]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_other_versions_are_named() {
        let hello = Message::Hello {
            version: PROTOCOL_VERSION,
            snapshot_id: None,
            regions: vec![RegionMapping {
                base_host_virt_addr: 0x7f00_0000_0000,
                size: 1 << 20,
                guest_phys_addr: 0,
                page_size: 4096,
            }],
        };
        let bytes = hello.encode().unwrap();
        assert_eq!(bytes.last(), Some(&b'\n'));
        assert!(!bytes[..bytes.len() - 1].contains(&b'\n'));
        assert_eq!(Message::decode(&bytes[..bytes.len() - 1]).unwrap(), hello);
        let text = String::from_utf8(bytes).unwrap();
        assert!(
            text.starts_with(r#"{"type":"hello","version":1,"regions":[{"base_host_virt_addr":"#)
        );

        let error = |bytes: &[u8]| Message::decode(bytes).unwrap_err().to_string();
        assert!(error(br#"{"type":"hello","version":2,"x":1}"#).contains("version 2"));
        assert!(error(br#"{"type":"hello","regions":[]}"#).contains("version"));
        assert!(error(b"garbage").contains("not JSON"));
        assert!(
            error(br#"{"type":"hello","version":1,"regions":[],"extra":1}"#).contains("malformed")
        );
        assert!(error(br#"{"type":"nonsense","version":1}"#).contains("malformed"));
    }

    #[test]
    fn the_reader_splits_messages_and_keeps_their_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        send(
            &a,
            &Message::error("first"),
            Some(std::os::fd::AsRawFd::as_raw_fd(&file)),
        )
        .unwrap();
        send(&a, &Message::error("second"), None).unwrap();
        let mut reader = MessageReader::default();
        let first = reader.read(&b).unwrap().unwrap();
        assert_eq!(first.fds.len(), 1);
        assert_eq!(
            Message::decode(&first.bytes).unwrap(),
            Message::error("first")
        );
        let second = reader.read(&b).unwrap().unwrap();
        assert!(second.fds.is_empty());
        assert_eq!(
            Message::decode(&second.bytes).unwrap(),
            Message::error("second")
        );
        drop(a);
        assert!(reader.read(&b).unwrap().is_none());

        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(b"{\"half\":").unwrap();
        drop(a);
        assert!(MessageReader::default().read(&b).is_err());
    }
}
