//! Positional vectored writes: the system calls the snapshot writer makes for its data
//! batches, shared with the `ext-snapshot bench` baselines so that both measure the same
//! write path.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Writes `slices` back to back at `offset` with `pwritev(2)`, retrying interrupted and short
/// writes. `Ok(())` means every byte was written; a write that makes no progress is
/// `ErrorKind::WriteZero`, an offset beyond `off_t` is `ErrorKind::InvalidInput`.
pub fn write_all_vectored_at(file: &File, slices: &[&[u8]], offset: u64) -> io::Result<()> {
    let mut iovecs: Vec<libc::iovec> = slices
        .iter()
        .map(|s| libc::iovec {
            iov_base: s.as_ptr() as *mut libc::c_void,
            iov_len: s.len(),
        })
        .collect();
    let mut first = 0usize;
    let mut offset = offset;
    while first < iovecs.len() {
        let count = libc::c_int::try_from(iovecs.len() - first).unwrap_or(libc::c_int::MAX);
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file offset too large"))?;
        // SAFETY: every iovec from `first` on describes a live slice borrowed for this call
        // (or the unwritten tail of one, adjusted below); pwritev only reads them.
        let n = unsafe { libc::pwritev(file.as_raw_fd(), iovecs[first..].as_ptr(), count, off) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        let mut n = n as usize;
        offset += n as u64;
        while first < iovecs.len() && n >= iovecs[first].iov_len {
            n -= iovecs[first].iov_len;
            first += 1;
        }
        if n > 0 {
            let v = &mut iovecs[first];
            // SAFETY: `n < iov_len`, so the advanced pointer stays inside the same slice.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n).cast() };
            v.iov_len -= n;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    #[test]
    fn slices_land_back_to_back_at_the_offset() {
        let file = tempfile::tempfile().unwrap();
        let big = vec![7u8; 3 << 20];
        write_all_vectored_at(&file, &[b"abc", &big, b"de"], 4096).unwrap();
        let mut back = vec![0u8; 3 + big.len() + 2];
        file.read_exact_at(&mut back, 4096).unwrap();
        assert_eq!(&back[..3], b"abc");
        assert!(back[3..3 + big.len()].iter().all(|&b| b == 7));
        assert_eq!(&back[3 + big.len()..], b"de");
    }
}
