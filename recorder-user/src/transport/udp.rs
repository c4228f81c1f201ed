//! UDP sockets: binding (IPv6 sockets are v6-only so `[::]` and `0.0.0.0` can share a port) and
//! one receive task per socket that forwards datagrams to the driver.

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use super::{inlet::Inlet, TransportError};
use crate::sip::{Incoming, Transport};

/// Largest datagram read (the UDP maximum).
const MAX_DATAGRAM: usize = 65_535;
/// Receive buffer asked of the kernel: a burst of a flood queues here while the receive task
/// sorts it, instead of being dropped with the live calls' BYEs among it (the kernel caps it
/// at `net.core.rmem_max`).
const RECEIVE_BUFFER: usize = 4 * 1024 * 1024;

/// Binds a UDP socket. Must be called within a tokio runtime.
pub fn bind(addr: SocketAddr) -> Result<UdpSocket, TransportError> {
    let err = |source| TransportError::Bind {
        transport: "UDP",
        addr,
        source,
    };
    let socket =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true).map_err(err)?;
    }
    socket.set_nonblocking(true).map_err(err)?;
    enlarge_receive_buffer(&socket, addr);
    socket.bind(&addr.into()).map_err(err)?;
    UdpSocket::from_std(socket.into()).map_err(err)
}

/// Asks for [`RECEIVE_BUFFER`]; past `net.core.rmem_max` only with CAP_NET_ADMIN
/// (SO_RCVBUFFORCE), which the daemon has for XDP anyway.
fn enlarge_receive_buffer(socket: &Socket, addr: SocketAddr) {
    use std::os::fd::AsRawFd;
    let size = RECEIVE_BUFFER as libc::c_int;
    // SAFETY: a valid descriptor and a c_int option value of the size passed.
    let forced = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &size as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    } == 0;
    if !forced {
        if let Err(e) = socket.set_recv_buffer_size(RECEIVE_BUFFER) {
            tracing::debug!(%addr, error = %e, "cannot enlarge the UDP receive buffer");
        }
    }
}

/// Forwards every datagram of `socket` to the driver until the driver goes away; new INVITEs
/// the driver has no room for are answered 503 from here.
pub(crate) async fn receive(socket: Arc<UdpSocket>, inlet: Inlet) {
    let Ok(local) = socket.local_addr() else {
        return;
    };
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (len, source) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            // ICMP errors of earlier sends surface here on Linux; the socket is still fine.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                continue
            }
            Err(e) => {
                tracing::error!(%local, error = %e, "UDP receive failed; socket closed");
                return;
            }
        };
        let incoming = Incoming {
            transport: Transport::Udp,
            source,
            local,
            connection: None,
            bytes: Bytes::copy_from_slice(&buf[..len]),
        };
        let reply = |t: crate::sip::Transmit| {
            // Never wait here: a full send buffer under a flood drops this 503, not the flood.
            let _ = socket.try_send_to(&t.bytes, t.destination);
        };
        if inlet.message(incoming, reply).await.is_err() {
            return;
        }
    }
}
