//! UDP sockets: binding (IPv6 sockets are v6-only so `[::]` and `0.0.0.0` can share a port) and
//! one receive task per socket that forwards datagrams to the driver.

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{net::UdpSocket, sync::mpsc};

use super::{driver::Input, TransportError};
use crate::sip::{Incoming, Transport};

/// Largest datagram read (the UDP maximum).
const MAX_DATAGRAM: usize = 65_535;

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
    socket.bind(&addr.into()).map_err(err)?;
    UdpSocket::from_std(socket.into()).map_err(err)
}

/// Forwards every datagram of `socket` to the driver until the driver goes away.
pub(crate) async fn receive(socket: Arc<UdpSocket>, inputs: mpsc::Sender<Input>) {
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
        if inputs.send(Input::Message(incoming)).await.is_err() {
            return;
        }
    }
}
