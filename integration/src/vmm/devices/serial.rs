//! COM1: a vm-superio 16550 on the port-I/O bus; output to a writer, input fed by the main
//! loop from stdin.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::IrqTrigger;
use crate::vmm::bus::BusDevice;

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

/// The 16550 UART.
pub struct SerialDevice {
    serial: Serial<IrqTrigger, NoEvents, CountingWriter>,
    counters: Arc<SerialCounters>,
}

impl SerialDevice {
    /// A UART that raises `irq` and writes the guest's output to `out`.
    pub fn new(irq: IrqTrigger, out: Box<dyn Write + Send>) -> Self {
        let counters = Arc::new(SerialCounters::default());
        let writer = CountingWriter {
            inner: out,
            counters: counters.clone(),
        };
        SerialDevice {
            serial: Serial::new(irq, writer),
            counters,
        }
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

/// Feeds stdin to the serial port from the main event loop.
pub struct SerialInput {
    serial: Arc<Mutex<SerialDevice>>,
}

impl SerialInput {
    /// Forwards stdin to `serial`.
    pub fn new(serial: Arc<Mutex<SerialDevice>>) -> Self {
        SerialInput { serial }
    }
}

impl MutEventSubscriber for SerialInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&io::stdin().as_raw_fd(), EventSet::IN)) {
            tracing::warn!("serial input from stdin unavailable: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        let n = if events.event_set().contains(EventSet::IN) {
            read_stdin(&mut buf)
        } else {
            0
        };
        if n == 0 {
            // EOF or hang-up: stop polling, or epoll would report it forever.
            let _ = ops.remove(events);
            return;
        }
        let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        let taken = serial.enqueue_input(&buf[..n]);
        if taken < n {
            tracing::debug!("serial FIFO full: {} input bytes dropped", n - taken);
        }
    }
}

/// Reads what stdin has right now without std's buffering, which would hide pending bytes
/// from epoll.
fn read_stdin(buf: &mut [u8]) -> usize {
    // SAFETY: fd 0 stays open for the life of the process and `buf` is valid for `buf.len()`
    // bytes of writes.
    let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).unwrap_or(0)
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
