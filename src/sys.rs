//! The few operating-system facts and knobs apexd needs beyond glommio: the memlock limit, whether
//! io_uring is enabled, and aborting a TCP connection with a reset (RFC 3081 §2, BEEP-59).
//!
//! The only `unsafe` in apexd lives here.

use std::io;
use std::os::fd::RawFd;

/// The soft RLIMIT_MEMLOCK in bytes (`None`: unlimited), read from /proc/self/limits.
pub fn memlock_limit() -> io::Result<Option<u64>> {
    let limits = std::fs::read_to_string("/proc/self/limits")?;
    parse_memlock(&limits)
        .ok_or_else(|| io::Error::other("no 'Max locked memory' line in /proc/self/limits"))
}

fn parse_memlock(limits: &str) -> Option<Option<u64>> {
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))?;
    let soft = line["Max locked memory".len()..]
        .split_whitespace()
        .next()?;
    if soft == "unlimited" {
        Some(None)
    } else {
        soft.parse().ok().map(Some)
    }
}

/// Explains why io_uring cannot be used, if the kernel says so.
pub fn io_uring_disabled() -> Option<String> {
    let value = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").ok()?;
    match value.trim() {
        "0" => None,
        v => Some(format!(
            "io_uring is disabled by the kernel (kernel.io_uring_disabled = {v}); \
             enable it with `sysctl kernel.io_uring_disabled=0`"
        )),
    }
}

/// Makes the next close of `fd` send a TCP reset instead of a FIN (SO_LINGER with a zero
/// timeout): how a BEEP session is terminated (RFC 3081 §2).
pub fn reset_on_close(fd: RawFd) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `linger` is a valid, initialised `libc::linger` that outlives the call, and the
    // length passed is its exact size. An invalid `fd` makes the call fail with EBADF; it cannot
    // touch memory we do not own.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::addr_of!(linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    #[test]
    fn parses_memlock_lines() {
        let text = "Limit                     Soft Limit           Hard Limit           Units\nMax locked memory         8388608              8388608              bytes\n";
        assert_eq!(parse_memlock(text), Some(Some(8_388_608)));
        let text = "Max locked memory         unlimited            unlimited            bytes\n";
        assert_eq!(parse_memlock(text), Some(None));
        assert_eq!(parse_memlock("nothing"), None);
        assert!(memlock_limit().is_ok());
    }

    #[test]
    fn reset_on_close_sends_a_reset() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        reset_on_close(server.as_raw_fd()).unwrap();
        drop(server);
        let mut buf = [0u8; 8];
        let err = client.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert!(reset_on_close(-1).is_err());
    }
}
