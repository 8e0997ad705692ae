//! `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` on the backend request channel.
//!
//! A balloon resize is a config-space change the guest must be told about: the backend sends
//! `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` on the channel the frontend opened with
//! `VHOST_USER_SET_BACKEND_REQ_FD`, and the frontend raises the device's config interrupt
//! (Cloud Hypervisor's generic vhost-user device does; so does ext-vmm's frontend).
//!
//! vhost 0.16's `vhost::vhost_user::Backend`, the only handle vhost-user-backend passes on for
//! that channel, can send the shared-object and shared-memory requests but not this one, and
//! does not expose its socket. So the daemon finds the channel's socket among its own file
//! descriptors when the frontend hands it over, keeps a duplicate, and writes the one 12-byte
//! message itself (header only: request 2, flags = version 1, size 0; no `NEED_REPLY`, so the
//! frontend sends no reply even with `REPLY_ACK`, and no reply can interleave with anything
//! vhost's `Backend` sends, which the daemon never uses).
//!
//! The channel is the one unnamed unix stream socket the process holds besides those it
//! already knows: every other socket of the daemon is bound (the vhost-user listener and its
//! accepted connection, the control API, the page server). When that does not single one out
//! (a frontend in the same process, as in some tests, holds the other end of the pair), the
//! daemon logs it and does without config-change messages for that connection.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use tracing::{debug, warn};

/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`.
const CONFIG_CHANGE_MSG: u32 = 2;
/// Protocol version 1 in the header's flags.
const VERSION_1: u32 = 0x1;

/// The daemon's end of a frontend's backend request channel.
#[derive(Debug)]
pub struct ConfigChannel {
    fd: OwnedFd,
}

impl ConfigChannel {
    /// Finds the channel the frontend just handed over (see the module docs); `skip` is the
    /// descriptor of a channel already held, which is not a candidate. `None`, logged, when no
    /// single socket qualifies.
    pub fn find_new(skip: Option<RawFd>) -> Option<Self> {
        let candidates = match unnamed_stream_sockets() {
            Ok(fds) => fds,
            Err(e) => {
                warn!(error = %e, "cannot list the process's descriptors: no config-change messages");
                return None;
            }
        };
        let candidates: Vec<RawFd> = candidates
            .into_iter()
            .filter(|&fd| Some(fd) != skip)
            .collect();
        let [fd] = candidates[..] else {
            warn!(
                candidates = candidates.len(),
                "cannot single out the backend request channel: no config-change messages"
            );
            return None;
        };
        // SAFETY: `fd` was listed as open in /proc/self/fd a moment ago and the daemon does
        // not close descriptors it does not own; the borrow lasts only for the duplication,
        // whose result is a new descriptor owned here.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        match borrowed.try_clone_to_owned() {
            Ok(fd) => {
                debug!(fd = fd.as_raw_fd(), "backend request channel found");
                Some(ConfigChannel { fd })
            }
            Err(e) => {
                warn!(error = %e, "cannot keep the backend request channel");
                None
            }
        }
    }

    /// The duplicate descriptor held (to skip it when the next channel arrives).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Sends `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`.
    pub fn notify_config_change(&self) -> io::Result<()> {
        let mut message = [0u8; 12];
        message[0..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
        message[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
        // Size 0: the message has no body.
        // SAFETY: `message` is a live buffer of `message.len()` bytes and `self.fd` an open
        // socket; MSG_NOSIGNAL turns a closed peer into EPIPE instead of a signal.
        let sent = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        match usize::try_from(sent) {
            Ok(n) if n == message.len() => Ok(()),
            Ok(n) => Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("config-change message cut after {n} bytes"),
            )),
            Err(_) => Err(io::Error::last_os_error()),
        }
    }
}

/// The process's unix stream sockets that are not bound to a name.
fn unnamed_stream_sockets() -> io::Result<BTreeSet<RawFd>> {
    let mut found = BTreeSet::new();
    for entry in fs::read_dir("/proc/self/fd")? {
        let Some(fd) = entry?
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<RawFd>().ok())
        else {
            continue;
        };
        if is_unnamed_unix_stream(fd) {
            found.insert(fd);
        }
    }
    Ok(found)
}

fn is_unnamed_unix_stream(fd: RawFd) -> bool {
    // SAFETY: an all-zero `sockaddr_un` is a valid value of the plain C struct.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>())
        .unwrap_or(libc::socklen_t::MAX);
    // SAFETY: `addr` and `len` are live and `len` holds `addr`'s size; a descriptor that is
    // not a socket (or already closed) makes the call fail, which is checked.
    let named = unsafe { libc::getsockname(fd, (&raw mut addr).cast(), &raw mut len) };
    if named != 0 || i32::from(addr.sun_family) != libc::AF_UNIX {
        return false;
    }
    // An unbound unix socket's name is the family alone.
    if usize::try_from(len).unwrap_or(usize::MAX) > std::mem::size_of::<libc::sa_family_t>() {
        return false;
    }
    let mut kind: libc::c_int = 0;
    let mut kind_len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>())
        .unwrap_or(libc::socklen_t::MAX);
    // SAFETY: `kind` and `kind_len` are live and `kind_len` holds `kind`'s size.
    let ok = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&raw mut kind).cast(),
            &raw mut kind_len,
        )
    };
    ok == 0 && kind == libc::SOCK_STREAM
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::io::Read;
    use std::os::unix::net::{UnixListener, UnixStream};

    #[test]
    fn sends_a_header_only_config_change() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let channel = ConfigChannel {
            fd: OwnedFd::from(ours),
        };
        channel.notify_config_change().unwrap();
        let mut header = [0u8; 12];
        theirs.read_exact(&mut header).unwrap();
        assert_eq!(header, [2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        drop(theirs);
        assert!(
            channel.notify_config_change().is_err(),
            "closed peer: EPIPE, no signal"
        );
    }

    #[test]
    fn bound_sockets_are_not_candidates() {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("s")).unwrap();
        let client = UnixStream::connect(dir.path().join("s")).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(!is_unnamed_unix_stream(listener.as_raw_fd()));
        assert!(!is_unnamed_unix_stream(accepted.as_raw_fd()));
        // The connecting side is unbound.
        assert!(is_unnamed_unix_stream(client.as_raw_fd()));
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(is_unnamed_unix_stream(a.as_raw_fd()));
        let file = tempfile::tempfile().unwrap();
        assert!(!is_unnamed_unix_stream(file.as_raw_fd()));
    }
}
