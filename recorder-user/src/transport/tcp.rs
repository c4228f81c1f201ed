//! TCP: listeners, an accept task per listener, and per connection a reader task (framing by
//! `Content-Length`, [`crate::sip::frame`]) and a writer task fed by a channel. The driver keeps
//! each connection's writer channel under its id; a connection ends when its reader stops
//! (EOF, error, a framing error, or the driver stopping) and the driver drops the writer channel.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
};

use bytes::{Bytes, BytesMut};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, OwnedSemaphorePermit},
};
use tokio_util::sync::CancellationToken;

use super::{driver::Input, inlet::Inlet, TransportError};
use crate::sip::{Framer, Incoming, Transport};

/// Messages queued per connection before the driver's sends to it are dropped.
const WRITE_QUEUE: usize = 256;

static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

/// Binds a TCP listener. Must be called within a tokio runtime.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, TransportError> {
    bind_stream(addr, "TCP")
}

/// Binds a listener for a stream transport (`transport` names it in errors).
pub(crate) fn bind_stream(
    addr: SocketAddr,
    transport: &'static str,
) -> Result<TcpListener, TransportError> {
    let err = |source| TransportError::Bind {
        transport,
        addr,
        source,
    };
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true).map_err(err)?;
    }
    // Restarting the daemon must not wait for TIME_WAIT connections of the previous run.
    socket.set_reuse_address(true).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    socket.listen(1024).map_err(err)?;
    TcpListener::from_std(socket.into()).map_err(err)
}

/// The next accepted connection (stream, peer, local address), or `None` once `stop` fires.
/// Accept errors (EMFILE and friends) keep the listener: the condition may pass.
pub(crate) async fn next_connection(
    listener: &TcpListener,
    stop: &CancellationToken,
    what: &'static str,
) -> Option<(TcpStream, SocketAddr, SocketAddr)> {
    let mut backoff = crate::accept::AcceptBackoff::new(what);
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return None,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff.succeeded();
                let local = stream.local_addr().unwrap_or(peer);
                return Some((stream, peer, local));
            }
            Err(e) => backoff.failed(&e).await,
        }
    }
}

/// A slot for one more inbound stream connection, or `None` (counted) when all are taken:
/// the caller closes the connection.
pub(crate) fn admit(
    inlet: &Inlet,
    peer: SocketAddr,
    what: &'static str,
) -> Option<OwnedSemaphorePermit> {
    let permit = inlet.connections.clone().try_acquire_owned().ok();
    if permit.is_none() {
        let refused = inlet
            .counters
            .connections_refused
            .fetch_add(1, Ordering::Relaxed);
        // One line per thousand: a connection flood must not become a log flood.
        if refused.is_multiple_of(1000) {
            tracing::warn!(%peer, transport = what, refused = refused + 1, "too many SIP stream connections; closing new ones");
        }
    }
    permit
}

/// Accepts connections until the driver goes away.
pub(crate) async fn accept(listener: TcpListener, inlet: Inlet, stop: CancellationToken) {
    while let Some((stream, peer, local)) = next_connection(&listener, &stop, "TCP").await {
        let Some(permit) = admit(&inlet, peer, "TCP") else {
            continue;
        };
        spawn_connection(
            stream,
            peer,
            local,
            Transport::Tcp,
            inlet.clone(),
            stop.clone(),
            Some(permit),
        );
    }
}

/// Opens a connection to `destination` and sends `bytes` on it (a request to a peer whose
/// connection is gone, RFC 3261 §18.1.1); the connection then serves like an accepted one.
pub(crate) async fn connect_and_send(
    destination: SocketAddr,
    bytes: Bytes,
    inlet: Inlet,
    stop: CancellationToken,
) {
    match TcpStream::connect(destination).await {
        Ok(stream) => {
            let local = stream.local_addr().unwrap_or(destination);
            // Ours: not counted against the inbound limit.
            let writer = spawn_connection(
                stream,
                destination,
                local,
                Transport::Tcp,
                inlet,
                stop,
                None,
            );
            let _ = writer.send(bytes).await;
        }
        Err(e) => tracing::warn!(%destination, error = %e, "TCP connect failed; message dropped"),
    }
}

/// Starts the reader and writer tasks of a stream connection (plain TCP, or TLS once the
/// handshake is done) and returns the writer's channel. `permit` is the connection's slot,
/// held until its reader ends.
pub(crate) fn spawn_connection<S>(
    stream: S,
    peer: SocketAddr,
    local: SocketAddr,
    transport: Transport,
    inlet: Inlet,
    stop: CancellationToken,
    permit: Option<OwnedSemaphorePermit>,
) -> mpsc::Sender<Bytes>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let id = NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed);
    let (mut reader, mut writer) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Bytes>(WRITE_QUEUE);
    tokio::spawn(async move {
        // Ends when every sender is gone: the driver forgot the connection, or stopped.
        while let Some(bytes) = rx.recv().await {
            if let Err(e) = writer.write_all(&bytes).await {
                tracing::debug!(connection = id, %transport, error = %e, "stream write failed");
                break;
            }
        }
        let _ = writer.shutdown().await;
    });
    let writer_for_driver = tx.clone();
    let writer_for_shed = tx.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let connected = Input::Connected {
            id,
            peer,
            writer: writer_for_driver,
        };
        if inlet.control(connected).await.is_err() {
            return;
        }
        let mut buf = BytesMut::with_capacity(8 * 1024);
        let mut framer = Framer::default();
        'read: loop {
            let read = tokio::select! {
                _ = stop.cancelled() => break,
                read = reader.read_buf(&mut buf) => read,
            };
            match read {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(connection = id, %transport, error = %e, "stream read failed");
                    break;
                }
            }
            loop {
                match framer.frame(&mut buf) {
                    Ok(Some(bytes)) => {
                        let incoming = Incoming {
                            transport,
                            source: peer,
                            local,
                            connection: Some(id),
                            bytes,
                        };
                        let reply = |t: crate::sip::Transmit| {
                            if writer_for_shed.try_send(t.bytes).is_err() {
                                inlet
                                    .counters
                                    .write_queue_full
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                        };
                        if inlet.message(incoming, reply).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        inlet
                            .counters
                            .framing_errors
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::info!(connection = id, %peer, %transport, error = %e, "closing unframeable stream connection");
                        break 'read;
                    }
                }
            }
        }
        let _ = inlet.control(Input::Closed { id }).await;
    });
    tx
}
