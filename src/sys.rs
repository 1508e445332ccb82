//! The few operating-system facts and knobs apexd needs beyond glommio: the memlock limit, whether
//! io_uring is enabled, aborting a TCP connection with a reset (RFC 3081 §2, BEEP-59), the
//! vectored send that writes large payloads from where they are, the receive that reads
//! straight into a connection's read buffer, and the listening sockets of a shard.
//! Socket options and calls go through socket2 on a borrowed descriptor.
//!
//! The only `unsafe` in apexd lives here: handing a new listening socket to glommio, lending a
//! glommio stream's descriptor, growing a read buffer by what the kernel wrote into it, and
//! asking for the effective user id.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use bytes::BytesMut;
use socket2::SockRef;

/// The soft RLIMIT_MEMLOCK in bytes (`None`: unlimited).
pub fn memlock_limit() -> io::Result<Option<u64>> {
    let (soft, _hard) = rlimit::getrlimit(rlimit::Resource::MEMLOCK)?;
    Ok((soft != rlimit::INFINITY).then_some(soft))
}

/// Whether the process holds CAP_IPC_LOCK in its effective set (capability 14,
/// linux/capability.h), with which the kernel charges nothing to RLIMIT_MEMLOCK. Read from
/// /proc/self/status (`CapEff`, hexadecimal); false when that cannot be read.
pub fn has_ipc_lock_capability() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|effective| effective & (1 << CAP_IPC_LOCK) != 0)
}

/// The process's effective user id (geteuid(2)): whether apexd runs as root decides where its
/// data lives by default.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid takes no arguments, touches no memory of ours and cannot fail.
    #[allow(unsafe_code)]
    unsafe {
        libc::geteuid()
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

/// A shard's listening socket on `addr`, handed to glommio, and a second descriptor of the same
/// socket for [`refuse_waiting`] (glommio lends none). SO_REUSEPORT gives every shard its
/// own accept queue on the shared address; SO_REUSEADDR lets a restarted relay bind the port
/// while the connections it closed before wait in TIME_WAIT (glommio's own `bind` sets only
/// the first). Must be called on a glommio executor.
pub fn listen(
    addr: SocketAddr,
    backlog: i32,
) -> io::Result<(glommio::net::TcpListener, socket2::Socket)> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::os::fd::{FromRawFd, IntoRawFd};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    let handle = socket.try_clone()?;
    let fd = socket.into_raw_fd();
    // SAFETY: `fd` is the socket created just above, bound and listening; `into_raw_fd` gave up
    // its ownership, so the listener becomes its only owner and closes it once.
    #[allow(unsafe_code)]
    let listener = unsafe { glommio::net::TcpListener::from_raw_fd(fd) };
    Ok((listener, handle))
}

/// Unanswered keepalive probes after which the kernel drops a connection.
pub const KEEPALIVE_PROBES: u32 = 3;

/// Turns TCP keepalive on for `fd`: the first probe after `interval` of silence, then one per
/// `interval`, and the connection is dropped after [`KEEPALIVE_PROBES`] unanswered ones. BEEP
/// has no ping of its own: this is how the session of a peer that vanished (power cut, a NAT
/// that forgot it) ends while it has an endpoint attached.
pub fn set_keepalive(fd: BorrowedFd<'_>, interval: Duration) -> io::Result<()> {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(interval)
        .with_interval(interval)
        .with_retries(KEEPALIVE_PROBES);
    SockRef::from(&fd).set_tcp_keepalive(&keepalive)
}

/// Whether `error` says the process or the system has no file descriptor left.
pub fn out_of_descriptors(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Accepts what waits on `listener` without waiting, at most `max` connections, and writes
/// `refusal` to each before closing it (a FIN, so the peer reads it). Each accepted
/// connection is closed before the next is accepted, so one free descriptor is enough.
/// Returns how many were answered. The listener is non-blocking only meanwhile: no accept of
/// glommio's is in flight on it while the shard runs this.
pub fn refuse_waiting(listener: &socket2::Socket, refusal: &[u8], max: usize) -> io::Result<usize> {
    listener.set_nonblocking(true)?;
    let mut answered = 0;
    let result = loop {
        if answered == max {
            break Ok(answered);
        }
        match listener.accept() {
            Ok((connection, _)) => {
                // A new connection's send buffer takes a few hundred octets; if it does not,
                // the peer gets the close alone.
                let _ =
                    connection.send_with_flags(refusal, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
                drop(connection);
                answered += 1;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(answered),
            // Connections that reset while queued: the next one may be fine.
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
            Err(e) => break Err(e),
        }
    };
    listener.set_nonblocking(false)?;
    result
}

/// `as_fd` for glommio's `TcpStream`, which offers only `AsRawFd`: lends the stream's socket
/// descriptor to the functions below for as long as the stream is borrowed.
pub trait StreamFd {
    /// The stream's descriptor, borrowed.
    fn as_fd(&self) -> BorrowedFd<'_>;
}

impl StreamFd for glommio::net::TcpStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: glommio's `TcpStream` owns its socket descriptor and closes it only when
        // dropped; the `BorrowedFd` returned borrows the stream, so the descriptor stays open
        // while it lives.
        #[allow(unsafe_code)]
        unsafe {
            BorrowedFd::borrow_raw(self.as_raw_fd())
        }
    }
}

/// Makes the next close of `fd` send a TCP reset instead of a FIN (SO_LINGER with a zero
/// timeout): how a BEEP session is terminated (RFC 3081 §2).
pub fn reset_on_close(fd: BorrowedFd<'_>) -> io::Result<()> {
    SockRef::from(&fd).set_linger(Some(Duration::ZERO))
}

/// Sends `slices` in order with one `sendmsg`, without waiting: `Ok(None)` when the socket has
/// no room now. glommio offers no vectored write; its `write` is used to wait for room.
/// MSG_NOSIGNAL turns a closed peer into an EPIPE error rather than a signal.
pub fn send_vectored(fd: BorrowedFd<'_>, slices: &[IoSlice<'_>]) -> io::Result<Option<usize>> {
    let socket = SockRef::from(&fd);
    loop {
        match socket.send_vectored_with_flags(slices, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) {
            Ok(sent) => return Ok(Some(sent)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

/// Receives what is waiting on `fd` into `buf`'s spare capacity (at most `max` octets; room
/// for `max` is made when there is none), without waiting: `Ok(None)` when nothing is. glommio's
/// `read` wants an initialised slice, so going through it meant a copy of everything received
/// (a tenth of the relay's CPU at 4 KiB messages) or zeroing the window first.
pub fn recv_into(fd: BorrowedFd<'_>, buf: &mut BytesMut, max: usize) -> io::Result<Option<usize>> {
    if buf.capacity() == buf.len() {
        buf.reserve(max.max(1));
    }
    let socket = SockRef::from(&fd);
    let spare = buf.spare_capacity_mut();
    let len = spare.len().min(max);
    loop {
        match socket.recv_with_flags(&mut spare[..len], libc::MSG_DONTWAIT) {
            Ok(received) => {
                // SAFETY: recv(2) initialised the first `received` octets of the spare capacity
                // it was given (at most `len`, so within it), and they directly follow `buf`'s
                // contents; socket2 writes nothing else there.
                #[allow(unsafe_code)]
                unsafe {
                    buf.set_len(buf.len() + received)
                };
                return Ok(Some(received));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    /// Something that is a descriptor but not a socket: every socket call on it fails.
    fn not_a_socket() -> std::fs::File {
        std::fs::File::open("/proc/self/limits").unwrap()
    }

    /// A connected loopback pair: (client, accepted server side).
    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    #[test]
    fn memlock_limit_is_the_soft_limit_the_kernel_reports() {
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
        let soft = limits
            .lines()
            .find_map(|l| l.strip_prefix("Max locked memory"))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap();
        let expected = match soft {
            "unlimited" => None,
            n => Some(n.parse::<u64>().unwrap()),
        };
        assert_eq!(memlock_limit().unwrap(), expected);
    }

    #[test]
    fn listen_shares_the_port_serves_connections_and_closes_on_drop() {
        let served = glommio::LocalExecutorBuilder::default()
            .io_memory(256 * 1024)
            .ring_depth(64)
            .spawn(|| async {
                let (first, first_handle) = listen("127.0.0.1:0".parse().unwrap(), 16).unwrap();
                let addr = first.local_addr().unwrap();
                // Another shard's listener on the same address (SO_REUSEPORT).
                // The second descriptor is the same socket: it goes with the listener.
                let (second, second_handle) = listen(addr, 16).unwrap();
                drop((second, second_handle));
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
                drop((first, first_handle));
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
    fn a_glommio_stream_lends_its_descriptor() {
        // What the connection driver does through `StreamFd`: receive, send vectored, abort.
        let (received, reset) = glommio::LocalExecutorBuilder::default()
            .io_memory(256 * 1024)
            .ring_depth(64)
            .spawn(|| async {
                let (listener, _handle) = listen("127.0.0.1:0".parse().unwrap(), 16).unwrap();
                let addr = listener.local_addr().unwrap();
                let client = std::thread::spawn(move || {
                    let mut client = TcpStream::connect(addr).unwrap();
                    client.write_all(b"ping").unwrap();
                    let mut got = [0u8; 9];
                    client.read_exact(&mut got).unwrap();
                    assert_eq!(&got, b"pong, too");
                    // The server aborts: the next read sees a reset.
                    let mut more = [0u8; 1];
                    client.read(&mut more).unwrap_err().kind()
                });
                let stream = listener.accept().await.unwrap();
                let mut buf = BytesMut::new();
                while buf.len() < 4 {
                    if recv_into(stream.as_fd(), &mut buf, 64).unwrap().is_none() {
                        glommio::timer::sleep(Duration::from_millis(1)).await;
                    }
                }
                let slices = [IoSlice::new(b"pong"), IoSlice::new(b", too")];
                assert_eq!(send_vectored(stream.as_fd(), &slices).unwrap(), Some(9));
                reset_on_close(stream.as_fd()).unwrap();
                drop(stream);
                (buf, client.join().unwrap())
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(&received[..], b"ping");
        assert_eq!(reset, io::ErrorKind::ConnectionReset);
    }

    #[test]
    fn reset_on_close_sends_a_reset() {
        let (mut client, server) = pair();
        reset_on_close(server.as_fd()).unwrap();
        drop(server);
        let mut buf = [0u8; 8];
        let err = client.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert!(reset_on_close(not_a_socket().as_fd()).is_err());
    }

    #[test]
    fn recv_into_appends_what_is_waiting_and_no_more() {
        let (mut client, server) = pair();
        let fd = server.as_fd();
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
                    std::thread::sleep(Duration::from_millis(1));
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
        // The peer's close reads as zero octets; a descriptor that is no socket is an error,
        // and neither changes the buffer.
        drop(client);
        assert_eq!(retry(&mut buf, 64), Some(0));
        assert_eq!(&buf[..], b"kept0123456789");
        assert!(recv_into(not_a_socket().as_fd(), &mut buf, 64).is_err());
        assert_eq!(&buf[..], b"kept0123456789");
    }

    #[test]
    fn recv_into_makes_room_in_a_full_buffer_and_stays_within_its_spare_capacity() {
        let (mut client, server) = pair();
        let payload: Vec<u8> = (0..200u8).collect();
        client.write_all(&payload).unwrap();
        // A full buffer: room for `max` is reserved before receiving.
        let mut buf = BytesMut::with_capacity(8);
        buf.extend_from_slice(b"12345678");
        assert_eq!(buf.capacity(), buf.len());
        while buf.len() < 8 + payload.len() {
            let (before, spare) = (buf.len(), buf.capacity() - buf.len());
            match recv_into(server.as_fd(), &mut buf, 16).unwrap() {
                Some(n) => {
                    // Never more than asked for, nor than the spare capacity when there was some.
                    assert!(n > 0 && n <= 16, "{n}");
                    assert!(spare == 0 || n <= spare, "{n} > {spare}");
                    assert_eq!(buf.len(), before + n);
                }
                None => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        assert_eq!(&buf[..8], b"12345678");
        assert_eq!(&buf[8..], &payload[..]);
    }

    #[test]
    fn send_vectored_sends_the_slices_in_order() {
        let (client, mut server) = pair();
        client.set_nonblocking(true).unwrap();
        let big = vec![b'z'; 3000];
        let slices = [
            IoSlice::new(b"MSG "),
            IoSlice::new(&big),
            IoSlice::new(b"END\r\n"),
        ];
        let sent = send_vectored(client.as_fd(), &slices).unwrap();
        assert_eq!(sent, Some(4 + 3000 + 5));
        let mut got = vec![0u8; 4 + 3000 + 5];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got[..4], b"MSG ");
        assert!(got[4..3004].iter().all(|&b| b == b'z'));
        assert_eq!(&got[3004..], b"END\r\n");
        // A full socket answers None instead of blocking.
        let chunk = vec![0u8; 1 << 20];
        let full = (0..1000).find_map(|_| {
            match send_vectored(client.as_fd(), &[IoSlice::new(&chunk)]).unwrap() {
                None => Some(()),
                Some(_) => None,
            }
        });
        assert_eq!(full, Some(()), "the socket never filled");
        assert!(send_vectored(not_a_socket().as_fd(), &slices).is_err());
    }

    #[test]
    fn send_vectored_to_a_reset_peer_is_an_error() {
        let (client, server) = pair();
        reset_on_close(server.as_fd()).unwrap();
        drop(server);
        // The reset may take a moment to arrive; after it every send fails (EPIPE or
        // ECONNRESET, never a signal: MSG_NOSIGNAL).
        let error =
            (0..2000).find_map(
                |_| match send_vectored(client.as_fd(), &[IoSlice::new(b"late")]) {
                    Err(e) => Some(e),
                    Ok(_) => {
                        std::thread::sleep(Duration::from_millis(1));
                        None
                    }
                },
            );
        let kind = error.expect("sending to a reset peer fails").kind();
        assert!(
            matches!(
                kind,
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ),
            "{kind:?}"
        );
    }

    /// Issue 19 item 9: keepalive on an accepted connection probes after the interval, at
    /// the interval, [`KEEPALIVE_PROBES`] times.
    #[test]
    fn keepalive_is_set_with_the_interval_and_probes() {
        let (_client, server) = pair();
        let socket = SockRef::from(&server);
        assert!(!socket.keepalive().unwrap(), "off until apexd turns it on");
        set_keepalive(server.as_fd(), Duration::from_secs(7)).unwrap();
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(socket.keepalive_interval().unwrap(), Duration::from_secs(7));
        assert_eq!(socket.keepalive_retries().unwrap(), KEEPALIVE_PROBES);
    }

    /// Issue 19 item 11: connections waiting on a listener are each answered and closed;
    /// with none waiting, the call returns at once, and the listener blocks again after.
    #[test]
    fn waiting_connections_are_answered_and_closed_without_blocking() {
        use socket2::{Domain, Socket, Type};
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        listener
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        listener.listen(16).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        assert_eq!(refuse_waiting(&listener, b"no", 8).unwrap(), 0);
        let mut clients: Vec<TcpStream> =
            (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
        // The handshakes complete in the kernel; give the last one a moment to be queued.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            refuse_waiting(&listener, b"ERR refused", 2).unwrap(),
            2,
            "at most max"
        );
        assert_eq!(refuse_waiting(&listener, b"ERR refused", 8).unwrap(), 1);
        for client in &mut clients {
            client
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).unwrap();
            assert_eq!(
                got, b"ERR refused",
                "the refusal, then the end of the stream"
            );
        }
        assert!(!listener.nonblocking().unwrap());
    }
}
