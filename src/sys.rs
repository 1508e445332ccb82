//! The few operating-system facts and knobs apexd needs beyond glommio: the memlock limit, whether
//! io_uring is enabled, aborting a TCP connection with a reset (RFC 3081 §2, BEEP-59), the
//! vectored send that writes large payloads from where they are, the receive that reads
//! straight into a connection's read buffer, and the listening sockets of a shard.
//!
//! The only `unsafe` in apexd lives here.

use std::io::{self, IoSlice};
use std::net::SocketAddr;

use bytes::BytesMut;
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

/// A shard's listening socket on `addr`, handed to glommio. SO_REUSEPORT gives every shard its
/// own accept queue on the shared address; SO_REUSEADDR lets a restarted relay bind the port
/// while the connections it closed before wait in TIME_WAIT (glommio's own `bind` sets only
/// the first). Must be called on a glommio executor.
pub fn listen(addr: SocketAddr, backlog: i32) -> io::Result<glommio::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::os::fd::{FromRawFd, IntoRawFd};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    let fd = socket.into_raw_fd();
    // SAFETY: `fd` is the socket created just above, bound and listening; `into_raw_fd` gave up
    // its ownership, so the listener becomes its only owner and closes it once.
    #[allow(unsafe_code)]
    let listener = unsafe { glommio::net::TcpListener::from_raw_fd(fd) };
    Ok(listener)
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

/// Sends `slices` in order with one `sendmsg`, without waiting: `Ok(None)` when the socket has
/// no room now. glommio offers no vectored write; its `write` is used to wait for room.
pub fn send_vectored(fd: RawFd, slices: &[IoSlice<'_>]) -> io::Result<Option<usize>> {
    // SAFETY: an all-zero `msghdr` is valid (no address, no control data, no flags).
    #[allow(unsafe_code)]
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    // `IoSlice` is guaranteed ABI-compatible with `iovec` on Unix; the kernel only reads them.
    header.msg_iov = slices.as_ptr() as *mut libc::iovec;
    header.msg_iovlen = slices.len() as _;
    loop {
        // SAFETY: `header` points at `slices`, which outlive the call, and at nothing else;
        // sendmsg reads the slices' memory and writes none of ours. An invalid `fd` fails the
        // call (EBADF); MSG_NOSIGNAL turns a closed peer into EPIPE rather than a signal.
        #[allow(unsafe_code)]
        let sent = unsafe { libc::sendmsg(fd, &header, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if sent >= 0 {
            return Ok(Some(sent as usize));
        }
        let error = io::Error::last_os_error();
        match error.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(None),
            _ => return Err(error),
        }
    }
}

/// Receives what is waiting on `fd` into `buf`'s spare capacity (at most `max` octets; room
/// for `max` is made when there is none), without waiting: `Ok(None)` when nothing is. glommio's
/// `read` wants an initialised slice, so going through it meant a copy of everything received
/// (a tenth of the relay's CPU at 4 KiB messages) or zeroing the window first.
pub fn recv_into(fd: RawFd, buf: &mut BytesMut, max: usize) -> io::Result<Option<usize>> {
    if buf.capacity() == buf.len() {
        buf.reserve(max.max(1));
    }
    let spare = buf.spare_capacity_mut();
    let len = spare.len().min(max);
    let ptr = spare.as_mut_ptr();
    loop {
        // SAFETY: `ptr` is valid for `len` octets of writes (the spare capacity `buf` just
        // reserved) and nothing else refers to them during the call; recv writes at most `len`
        // octets there and reads none. An invalid `fd` fails the call (EBADF).
        #[allow(unsafe_code)]
        let received = unsafe { libc::recv(fd, ptr.cast(), len, libc::MSG_DONTWAIT) };
        if received >= 0 {
            let received = received as usize;
            // SAFETY: the kernel initialised the first `received` (<= `len`) octets of the
            // spare capacity, which directly follow `buf`'s contents.
            #[allow(unsafe_code)]
            unsafe {
                buf.set_len(buf.len() + received)
            };
            return Ok(Some(received));
        }
        let error = io::Error::last_os_error();
        match error.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(None),
            _ => return Err(error),
        }
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
    fn listen_shares_the_port_serves_connections_and_closes_on_drop() {
        use std::io::Write;
        let served = glommio::LocalExecutorBuilder::default()
            .io_memory(256 * 1024)
            .ring_depth(64)
            .spawn(|| async {
                let first = listen("127.0.0.1:0".parse().unwrap(), 16).unwrap();
                let addr = first.local_addr().unwrap();
                // Another shard's listener on the same address (SO_REUSEPORT).
                let second = listen(addr, 16).unwrap();
                drop(second);
                let client = std::thread::spawn(move || {
                    let mut client = TcpStream::connect(addr).unwrap();
                    client.write_all(b"ping").unwrap();
                });
                let mut stream = first.accept().await.unwrap();
                let mut got = [0u8; 4];
                futures_lite::AsyncReadExt::read_exact(&mut stream, &mut got)
                    .await
                    .unwrap();
                client.join().unwrap();
                drop(stream);
                drop(first);
                (addr, got)
            })
            .unwrap()
            .join()
            .unwrap();
        let (addr, got) = served;
        assert_eq!(&got, b"ping");
        // Both descriptors were closed: a listener without SO_REUSEPORT binds the address.
        assert!(TcpListener::bind(addr).is_ok());
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

    #[test]
    fn recv_into_appends_what_is_waiting_and_no_more() {
        use std::io::Write;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let fd = server.as_raw_fd();
        let mut buf = BytesMut::from(&b"kept"[..]);
        // Nothing sent yet: no waiting, nothing appended.
        assert_eq!(recv_into(fd, &mut buf, 64).unwrap(), None);
        assert_eq!(&buf[..], b"kept");
        client.write_all(b"0123456789").unwrap();
        // Bounded by `max`, appended after what the buffer held.
        // Loopback delivers at once, but not necessarily before the first try.
        let retry = |buf: &mut BytesMut, max| {
            (0..2000).find_map(|_| {
                let got = recv_into(fd, buf, max).unwrap();
                if got.is_none() {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                got
            })
        };
        let first = retry(&mut buf, 4).expect("the octets arrive");
        assert_eq!(first, 4);
        assert_eq!(&buf[..], b"kept0123");
        let mut rest = 0;
        while rest < 6 {
            rest += retry(&mut buf, 64).expect("the rest arrives");
        }
        assert_eq!(&buf[..], b"kept0123456789");
        // The peer's close reads as zero octets; a bad descriptor is an error.
        drop(client);
        assert_eq!(retry(&mut buf, 64), Some(0));
        assert_eq!(&buf[..], b"kept0123456789");
        assert!(recv_into(-1, &mut buf, 64).is_err());
    }

    #[test]
    fn send_vectored_sends_the_slices_in_order() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.set_nonblocking(true).unwrap();
        let big = vec![b'z'; 3000];
        let slices = [
            IoSlice::new(b"MSG "),
            IoSlice::new(&big),
            IoSlice::new(b"END\r\n"),
        ];
        let sent = send_vectored(client.as_raw_fd(), &slices).unwrap();
        assert_eq!(sent, Some(4 + 3000 + 5));
        let mut got = vec![0u8; 4 + 3000 + 5];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got[..4], b"MSG ");
        assert!(got[4..3004].iter().all(|&b| b == b'z'));
        assert_eq!(&got[3004..], b"END\r\n");
        // A full socket answers None instead of blocking.
        let chunk = vec![0u8; 1 << 20];
        let full = (0..1000).find_map(|_| {
            match send_vectored(client.as_raw_fd(), &[IoSlice::new(&chunk)]).unwrap() {
                None => Some(()),
                Some(_) => None,
            }
        });
        assert_eq!(full, Some(()), "the socket never filled");
        assert!(send_vectored(-1, &slices).is_err());
    }
}
