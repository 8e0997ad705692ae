//! COM1: a vm-superio 16550 on the port-I/O bus; output to a writer, input fed by the main
//! loop from stdin.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use std::collections::VecDeque;

use vm_superio::serial::SerialEvents;
use vm_superio::Serial;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::persist::SerialSnapshot;
use super::IrqTrigger;
use crate::bus::BusDevice;

/// Byte counters of the serial port, shared with `vm.counters`.
#[derive(Default)]
pub struct SerialCounters {
    /// Bytes the guest transmitted.
    pub tx_bytes: AtomicU64,
    /// Bytes delivered to the guest's receive FIFO.
    pub rx_bytes: AtomicU64,
}

/// Counts and forwards the guest's output; flushes per write so the console is live.
pub struct CountingWriter {
    inner: Box<dyn Write + Send>,
    counters: Arc<SerialCounters>,
}

impl Write for CountingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.counters
            .tx_bytes
            .fetch_add(written as u64, Ordering::Relaxed);
        self.inner.flush()?;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Signals when the guest has drained the receive FIFO, so held-back input can follow.
pub struct InputRoom(EventFd);

impl SerialEvents for InputRoom {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        // A failed write only delays input until the next stdin event.
        let _ = self.0.write(1);
    }
}

/// The 16550 UART.
pub struct SerialDevice {
    serial: Serial<IrqTrigger, InputRoom, CountingWriter>,
    counters: Arc<SerialCounters>,
}

impl SerialDevice {
    /// A UART that raises `irq` and writes the guest's output to `out`.
    pub fn new(irq: IrqTrigger, out: Box<dyn Write + Send>) -> io::Result<Self> {
        let counters = Arc::new(SerialCounters::default());
        let writer = CountingWriter {
            inner: out,
            counters: counters.clone(),
        };
        let room = InputRoom(EventFd::new(EFD_NONBLOCK)?);
        Ok(SerialDevice {
            serial: Serial::with_events(irq, room, writer),
            counters,
        })
    }

    /// A UART that continues from `state` (a restored snapshot).
    pub fn from_state(
        irq: IrqTrigger,
        out: Box<dyn Write + Send>,
        state: &SerialSnapshot,
    ) -> io::Result<Self> {
        let counters = Arc::new(SerialCounters::default());
        let writer = CountingWriter {
            inner: out,
            counters: counters.clone(),
        };
        let room = InputRoom(EventFd::new(EFD_NONBLOCK)?);
        let serial = Serial::from_state(&state.into(), irq, room, writer)
            .map_err(|e| io::Error::other(format!("serial state: {e:?}")))?;
        Ok(SerialDevice { serial, counters })
    }

    /// The registers and receive FIFO, for a snapshot.
    pub fn state(&self) -> SerialSnapshot {
        self.serial.state().into()
    }

    /// An eventfd that fires whenever the guest empties the receive FIFO.
    pub fn input_room_event(&self) -> io::Result<EventFd> {
        self.serial.events().0.try_clone()
    }

    /// The counters for `vm.counters`.
    pub fn counters(&self) -> Arc<SerialCounters> {
        self.counters.clone()
    }

    /// Queues host input for the guest; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let room = self.serial.fifo_capacity().min(input.len());
        if room == 0 {
            return 0;
        }
        match self.serial.enqueue_raw_bytes(&input[..room]) {
            Ok(n) => {
                self.counters
                    .rx_bytes
                    .fetch_add(n as u64, Ordering::Relaxed);
                n
            }
            Err(e) => {
                tracing::warn!("serial input dropped: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(first) = data.first_mut() {
            *first = self.serial.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(value) = data.first() {
            if let Err(e) = self.serial.write(offset as u8, *value) {
                tracing::warn!("serial write failed: {e:?}");
            }
        }
    }
}

/// Most host input held back while the guest's receive FIFO is full; beyond it, stdin is not
/// read until the guest catches up (the pipe or tty buffers the rest).
const MAX_PENDING_INPUT: usize = 4096;

/// Feeds stdin to the serial port from the main event loop, holding input back while the
/// 64-byte receive FIFO is full and resuming when the guest drains it.
pub struct SerialInput {
    serial: Arc<Mutex<SerialDevice>>,
    room: EventFd,
    pending: VecDeque<u8>,
    stdin_open: bool,
    stdin_watched: bool,
}

impl SerialInput {
    /// Forwards stdin to `serial`.
    pub fn new(serial: Arc<Mutex<SerialDevice>>) -> io::Result<Self> {
        let room = serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .input_room_event()?;
        Ok(SerialInput {
            serial,
            room,
            pending: VecDeque::new(),
            stdin_open: true,
            stdin_watched: false,
        })
    }

    fn flush(&mut self) {
        let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        while !self.pending.is_empty() {
            let (front, _) = self.pending.as_slices();
            let taken = serial.enqueue_input(front);
            if taken == 0 {
                break;
            }
            self.pending.drain(..taken);
        }
    }

    /// Watches stdin only while there is room to hold what it delivers.
    fn update_interest(&mut self, ops: &mut EventOps) {
        let stdin = io::stdin().as_raw_fd();
        let want = self.stdin_open && self.pending.len() < MAX_PENDING_INPUT;
        if want != self.stdin_watched {
            let set = if want {
                EventSet::IN
            } else {
                EventSet::empty()
            };
            match ops.modify(Events::new(&stdin, set)) {
                Ok(()) => self.stdin_watched = want,
                Err(e) => tracing::warn!("serial input: cannot update stdin interest: {e:?}"),
            }
        }
    }
}

impl MutEventSubscriber for SerialInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.room, EventSet::IN)) {
            tracing::warn!("serial input: cannot watch the receive FIFO: {e:?}");
        }
        match ops.add(Events::new(&io::stdin().as_raw_fd(), EventSet::IN)) {
            Ok(()) => self.stdin_watched = true,
            Err(e) => {
                tracing::warn!("serial input from stdin unavailable: {e:?}");
                self.stdin_open = false;
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.room.as_raw_fd() {
            let _ = self.room.read();
        } else if events.event_set().contains(EventSet::IN) {
            let mut buf = [0u8; 256];
            let n = read_stdin(&mut buf);
            if n == 0 {
                // EOF: what is pending still goes to the guest.
                self.stdin_open = false;
                let _ = ops.remove(Events::empty(&io::stdin().as_raw_fd()));
                self.stdin_watched = false;
            }
            self.pending.extend(&buf[..n]);
        } else {
            // Hang-up or error without data.
            self.stdin_open = false;
            let _ = ops.remove(Events::empty(&io::stdin().as_raw_fd()));
            self.stdin_watched = false;
        }
        self.flush();
        self.update_interest(ops);
    }
}

/// True when stdin is a terminal, pipe or socket: the kinds epoll can watch. (A regular file or
/// `/dev/null`, as under a batch runner, cannot be polled and has nothing to feed the guest.)
pub fn stdin_is_pollable() -> bool {
    // SAFETY: `stat` is plain data that `fstat` fills; fd 0 is valid or fstat fails cleanly.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes only into `stat`, which is valid for writes.
    if unsafe { libc::fstat(libc::STDIN_FILENO, &mut stat) } != 0 {
        return false;
    }
    let kind = stat.st_mode & libc::S_IFMT;
    // SAFETY: isatty only inspects the descriptor.
    let tty = unsafe { libc::isatty(libc::STDIN_FILENO) } == 1;
    tty || kind == libc::S_IFIFO || kind == libc::S_IFSOCK
}

/// Reads what stdin has right now without std's buffering, which would hide pending bytes
/// from epoll.
fn read_stdin(buf: &mut [u8]) -> usize {
    // SAFETY: fd 0 stays open for the life of the process and `buf` is valid for `buf.len()`
    // bytes of writes.
    let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_waits_for_fifo_room_and_room_is_signalled() {
        let irq = IrqTrigger(EventFd::new(EFD_NONBLOCK).unwrap());
        let mut device = SerialDevice::new(irq, Box::new(io::sink())).unwrap();
        let room = device.input_room_event().unwrap();
        let input: Vec<u8> = (0..200u8).collect();
        let first = device.enqueue_input(&input);
        assert!(first > 0 && first < input.len(), "FIFO took {first}");
        assert_eq!(device.enqueue_input(&input[first..]), 0);
        assert!(room.read().is_err(), "room signalled before the guest read");
        let mut byte = [0u8];
        for expected in 0..first {
            device.read(0, &mut byte);
            assert_eq!(usize::from(byte[0]), expected);
        }
        assert_eq!(room.read().unwrap(), 1);
        assert!(device.enqueue_input(&input[first..]) > 0);
        assert_eq!(
            device.counters().rx_bytes.load(Ordering::Relaxed) as usize,
            first + first.min(input.len() - first)
        );
    }
}
