//! A reference vCPU loop for `kvm_ioctls`: runs a vCPU and hands every permission exit to
//! an [`ExitHandler`], returning on anything else. The tests and the benchmark use it; a VMM
//! can call it or copy its shape into its own loop.

use kvm_ioctls::{VcpuExit, VcpuFd};

use super::vcpu::{
    complete_mmio_read, discard_pending_sync_regs, enable_sync_regs, internal_error_suberror,
    KvmSyncVcpu,
};
use crate::error::{Error, Result};
use crate::hold::RunGate;
use crate::manager::{Decision, ExitHandler, PermissionExit};

/// Why [`run_vcpu`] returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuStop {
    /// `hlt` (no in-kernel irqchip).
    Halted,
    /// An `out` instruction: the guest's way of talking to the test.
    PortOut {
        /// Port number.
        port: u16,
        /// Value written (little-endian, zero-extended).
        value: u64,
    },
    /// The handler refused an access and asked for the vCPU to stop.
    Denied,
    /// An exit neither the loop nor the handler takes (its debug text).
    Unhandled(String),
}

enum Pending {
    Read(u64, usize),
    Write(u64, [u8; 8], usize),
    Internal,
    Debug,
}

/// Runs `fd` (vCPU `id`) until an exit that is not a resumed permission exit.
///
/// Uses `KVM_CAP_SYNC_REGS` (x86, Linux 4.17+) so that a decision needs no register ioctls.
pub fn run_vcpu(
    fd: &mut VcpuFd,
    id: u32,
    gate: &RunGate,
    handler: &dyn ExitHandler,
) -> Result<VcpuStop> {
    enable_sync_regs(fd);
    let stop = run_loop(fd, id, gate, handler);
    // Whatever ended the loop, a grant must not outlive it (it holds the other vCPUs).
    let stopped = handler.vcpu_stopped(&KvmSyncVcpu::new(fd, id));
    discard_pending_sync_regs(fd);
    let stop = stop?;
    stopped?;
    Ok(stop)
}

fn run_loop(
    fd: &mut VcpuFd,
    id: u32,
    gate: &RunGate,
    handler: &dyn ExitHandler,
) -> Result<VcpuStop> {
    loop {
        gate.enter(id);
        let exit = fd.run();
        gate.leave(id);
        let pending = match exit {
            Ok(VcpuExit::Hlt) => return Ok(VcpuStop::Halted),
            Ok(VcpuExit::IoOut(port, data)) => {
                let mut value = [0u8; 8];
                let len = data.len().min(8);
                value[..len].copy_from_slice(&data[..len]);
                return Ok(VcpuStop::PortOut {
                    port,
                    value: u64::from_le_bytes(value),
                });
            }
            Ok(VcpuExit::MmioRead(gpa, data)) => Pending::Read(gpa, data.len().min(8)),
            Ok(VcpuExit::MmioWrite(gpa, data)) => {
                let mut copy = [0u8; 8];
                let len = data.len().min(8);
                copy[..len].copy_from_slice(&data[..len]);
                Pending::Write(gpa, copy, len)
            }
            Ok(VcpuExit::InternalError) => Pending::Internal,
            Ok(VcpuExit::Debug(_)) => Pending::Debug,
            Ok(other) => return Ok(VcpuStop::Unhandled(format!("{other:?}"))),
            // A RunGate kick: the vCPU is held until the grant of another vCPU ends.
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(source) => {
                return Err(Error::Kvm {
                    operation: "KVM_RUN",
                    source,
                })
            }
        };
        let data_exit = matches!(pending, Pending::Read(..) | Pending::Write(..));
        let decision = match pending {
            Pending::Read(gpa, len) => {
                let mut data = [0u8; 8];
                let exit = PermissionExit::MmioRead {
                    gpa,
                    data: &mut data[..len],
                };
                let decision = handler.handle_exit(&KvmSyncVcpu::new(fd, id), exit)?;
                if decision != Decision::NotHandled {
                    complete_mmio_read(fd, &data[..len]);
                }
                decision
            }
            Pending::Write(gpa, data, len) => {
                let exit = PermissionExit::MmioWrite {
                    gpa,
                    data: &data[..len],
                };
                handler.handle_exit(&KvmSyncVcpu::new(fd, id), exit)?
            }
            Pending::Internal => {
                let suberror = internal_error_suberror(fd).unwrap_or(0);
                let exit = PermissionExit::InternalError { suberror };
                let decision = handler.handle_exit(&KvmSyncVcpu::new(fd, id), exit)?;
                if decision == Decision::NotHandled {
                    return Ok(VcpuStop::Unhandled(format!(
                        "internal error, suberror {suberror}"
                    )));
                }
                decision
            }
            Pending::Debug => {
                handler.handle_exit(&KvmSyncVcpu::new(fd, id), PermissionExit::Debug)?
            }
        };
        match decision {
            Decision::NotHandled => return Ok(VcpuStop::Unhandled(format!("{decision:?}"))),
            Decision::Denied { stop: true } => {
                if data_exit {
                    finish_pending_mmio(fd)?;
                }
                return Ok(VcpuStop::Denied);
            }
            _ => {}
        }
    }
}

/// Lets KVM finish the instruction of a refused MMIO access (the read gets the all-ones the
/// handler put in the buffer; the write is already dropped) without running the guest any
/// further: `KVM_RUN` with `immediate_exit` completes pending I/O and returns `EINTR`. KVM's
/// API documentation requires this before guest state is consistent; without it, the next
/// run after `KVM_SET_REGS` would still finish the old instruction.
fn finish_pending_mmio(fd: &mut VcpuFd) -> Result<()> {
    fd.set_kvm_immediate_exit(1);
    let result = fd.run().map(|_| ());
    fd.set_kvm_immediate_exit(0);
    match result {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Ok(()) => Ok(()),
        Err(source) => Err(Error::Kvm {
            operation: "KVM_RUN (immediate_exit)",
            source,
        }),
    }
}
