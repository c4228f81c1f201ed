//! The driver: one task that owns the [`Endpoint`] and the application, and is the only code
//! that mutates them.
//!
//! Each loop turn waits for exactly one input (a message, a TCP connection change, an app
//! command, the earliest timer, or shutdown), applies it, then calls `Driver::drain`, which
//! delivers endpoint events to the app and sends endpoint transmits until both queues are empty
//! (the str0m "drain after every mutation" invariant, enforced here in one function).

use std::{collections::HashMap, future::pending, net::SocketAddr, sync::Arc, time::Instant};

use bytes::Bytes;
use tokio::{
    net::{TcpListener, UdpSocket},
    sync::mpsc,
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use super::{
    inlet::{
        Inlet, TransportCounters, TransportMonitor, MAX_STREAM_CONNECTIONS, NEW_REQUEST_QUEUE,
        PRIORITY_QUEUE,
    },
    tcp, tls, udp, TransportError,
};
use crate::{
    contain::contain,
    sip::{Endpoint, Incoming, SipEvent, Transmit, Transport},
};

/// The application driven with the endpoint (the SIPREC session layer, or a test app).
pub trait SipApp {
    /// An endpoint event; answer requests with `endpoint.respond` now or later.
    fn handle_event(&mut self, now: Instant, event: SipEvent, endpoint: &mut Endpoint);
    /// Called when the earliest of the endpoint's and the app's timers is due.
    fn handle_timeout(&mut self, _now: Instant, _endpoint: &mut Endpoint) {}
    /// The app's next timer, if any.
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }
}

/// Work from outside the driver (e.g. a control command "stop recording X"), run on the driver
/// task with the app and endpoint; the endpoint output it causes is drained right after.
pub type Command<A> = Box<dyn FnOnce(&mut A, &mut Endpoint, Instant) + Send>;

/// What the socket tasks tell the driver.
pub(crate) enum Input {
    Message(Incoming),
    Connected {
        id: u64,
        peer: SocketAddr,
        writer: mpsc::Sender<Bytes>,
    },
    Closed {
        id: u64,
    },
}

/// Bound sockets, before the driver runs (bind port 0 in tests and read the ports here).
pub struct Sockets {
    udp: Vec<Arc<UdpSocket>>,
    tcp: Vec<TcpListener>,
    tls: Vec<TcpListener>,
    tls_acceptor: Option<TlsAcceptor>,
    counters: Arc<TransportCounters>,
    connections: Arc<tokio::sync::Semaphore>,
    new_requests: (mpsc::Sender<Input>, mpsc::Receiver<Input>),
}

impl Sockets {
    /// The admission counters and gauges (readable while the driver runs).
    pub fn monitor(&self) -> TransportMonitor {
        TransportMonitor {
            counters: self.counters.clone(),
            queue: self.new_requests.0.downgrade(),
            connections: self.connections.clone(),
        }
    }

    /// The bound addresses (UDP and TCP share each of them).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.udp
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }

    /// The bound TLS listener addresses.
    pub fn tls_local_addrs(&self) -> Vec<SocketAddr> {
        self.tls
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Adds TLS listeners on `listen` (port 0 picks a free port), served with `config`.
    pub fn bind_tls(
        &mut self,
        listen: &[SocketAddr],
        config: Arc<ServerConfig>,
    ) -> Result<(), TransportError> {
        for addr in listen {
            self.tls.push(tls::bind(*addr)?);
        }
        self.tls_acceptor = Some(TlsAcceptor::from(config));
        Ok(())
    }
}

/// Binds UDP and TCP on each listen address. A port 0 is resolved on UDP first and the same
/// port is then taken on TCP (retried with a fresh port if TCP has it in use).
/// Must be called within a tokio runtime.
pub fn bind(listen: &[SocketAddr]) -> Result<Sockets, TransportError> {
    if listen.is_empty() {
        return Err(TransportError::NoListenAddress);
    }
    let mut sockets = Sockets {
        udp: Vec::new(),
        tcp: Vec::new(),
        tls: Vec::new(),
        tls_acceptor: None,
        counters: Arc::default(),
        connections: Arc::new(tokio::sync::Semaphore::new(MAX_STREAM_CONNECTIONS)),
        new_requests: mpsc::channel(NEW_REQUEST_QUEUE),
    };
    for addr in listen {
        let mut attempts = 0;
        let (udp, tcp) = loop {
            let udp = udp::bind(*addr)?;
            let bound = udp.local_addr()?;
            match tcp::bind(bound) {
                Ok(tcp) => break (udp, tcp),
                Err(TransportError::Bind { source, .. })
                    if addr.port() == 0
                        && attempts < 16
                        && source.kind() == std::io::ErrorKind::AddrInUse =>
                {
                    attempts += 1;
                }
                Err(e) => return Err(e),
            }
        };
        sockets.udp.push(Arc::new(udp));
        sockets.tcp.push(tcp);
    }
    Ok(sockets)
}

/// Binds `listen` and runs the driver until `shutdown`; returns the app.
pub async fn run<A: SipApp>(
    listen: Vec<SocketAddr>,
    endpoint: Endpoint,
    app: A,
    shutdown: CancellationToken,
) -> Result<A, TransportError> {
    let sockets = bind(&listen)?;
    run_on(sockets, endpoint, app, shutdown, None).await
}

/// Runs the driver on already bound sockets, with an optional command channel.
pub async fn run_on<A: SipApp>(
    sockets: Sockets,
    endpoint: Endpoint,
    app: A,
    shutdown: CancellationToken,
    commands: Option<mpsc::Receiver<Command<A>>>,
) -> Result<A, TransportError> {
    let (priority_tx, priority) = mpsc::channel(PRIORITY_QUEUE);
    let (new_requests_tx, new_requests) = sockets.new_requests;
    let inlet = Inlet {
        priority: priority_tx,
        new_requests: new_requests_tx,
        shedder: Arc::new(Endpoint::new(endpoint.config().clone())),
        counters: sockets.counters.clone(),
        connections: sockets.connections.clone(),
    };
    let mut tasks = JoinSet::new();
    for socket in &sockets.udp {
        tasks.spawn(udp::receive(socket.clone(), inlet.clone()));
    }
    // Stops the accept and connection tasks however the driver ends.
    let stop = shutdown.child_token();
    let _stop_on_exit = stop.clone().drop_guard();
    for listener in sockets.tcp {
        tasks.spawn(tcp::accept(listener, inlet.clone(), stop.clone()));
    }
    if let Some(acceptor) = sockets.tls_acceptor {
        for listener in sockets.tls {
            tasks.spawn(tls::accept(
                listener,
                acceptor.clone(),
                inlet.clone(),
                stop.clone(),
            ));
        }
    }
    let mut driver = Driver {
        endpoint,
        app,
        udp: sockets.udp,
        connections: HashMap::new(),
        by_peer: HashMap::new(),
        inlet,
        stop,
    };
    let result = driver.run(priority, new_requests, commands, shutdown).await;
    // Socket tasks end with the runtime or here; connection tasks end when their channels drop.
    tasks.abort_all();
    result.map(|()| driver.app)
}

struct Driver<A> {
    endpoint: Endpoint,
    app: A,
    udp: Vec<Arc<UdpSocket>>,
    /// Writer channel of each live TCP connection.
    connections: HashMap<u64, mpsc::Sender<Bytes>>,
    /// The latest connection per peer, for sends whose connection has gone.
    by_peer: HashMap<SocketAddr, u64>,
    inlet: Inlet,
    stop: CancellationToken,
}

impl<A: SipApp> Driver<A> {
    async fn run(
        &mut self,
        mut priority: mpsc::Receiver<Input>,
        mut new_requests: mpsc::Receiver<Input>,
        mut commands: Option<mpsc::Receiver<Command<A>>>,
        shutdown: CancellationToken,
    ) -> Result<(), TransportError> {
        loop {
            let deadline = match (self.endpoint.poll_timeout(), self.app.poll_timeout()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => pending().await,
                }
            };
            let command = async {
                match commands.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => pending().await,
                }
            };
            tokio::select! {
                // The order of the branches is the priority (see the module documentation).
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                input = priority.recv() => {
                    // The driver holds a sender itself, so the channel never closes.
                    let Some(input) = input else { return Ok(()) };
                    contain("SIP input", || self.handle_input(input));
                }
                cmd = command => match cmd {
                    Some(cmd) => {
                        contain("driver command", || cmd(&mut self.app, &mut self.endpoint, now()));
                    }
                    // The command sender is gone: keep serving SIP without commands.
                    None => commands = None,
                },
                _ = sleep => {
                    let now = now();
                    contain("SIP timers", || self.endpoint.handle_timeout(now));
                    contain("session timers", || self.app.handle_timeout(now, &mut self.endpoint));
                }
                input = new_requests.recv() => {
                    let Some(input) = input else { return Ok(()) };
                    self.handle_input(input);
                }
            }
            self.drain().await;
        }
    }

    fn handle_input(&mut self, input: Input) {
        match input {
            Input::Message(incoming) => self.endpoint.handle_incoming(now(), incoming),
            Input::Connected { id, peer, writer } => {
                self.connections.insert(id, writer);
                self.by_peer.insert(peer, id);
            }
            Input::Closed { id } => {
                self.connections.remove(&id);
                self.by_peer.retain(|_, c| *c != id);
            }
        }
    }

    /// Delivers events and sends transmits until the endpoint has nothing left.
    async fn drain(&mut self) {
        loop {
            let mut progressed = false;
            while let Some(event) = self.endpoint.poll_event() {
                progressed = true;
                // One event is one request or timer of one call.
                contain("SIP event", || {
                    self.app.handle_event(now(), event, &mut self.endpoint)
                });
            }
            while let Some(transmit) = self.endpoint.poll_transmit() {
                progressed = true;
                self.send(transmit).await;
            }
            if !progressed {
                return;
            }
        }
    }

    async fn send(&mut self, t: Transmit) {
        match t.transport {
            Transport::Udp => {
                // The socket the request came in on, else any of the destination's family.
                let socket = self
                    .udp
                    .iter()
                    .find(|s| t.local.is_some() && s.local_addr().ok() == t.local)
                    .or_else(|| {
                        self.udp.iter().find(|s| {
                            s.local_addr()
                                .is_ok_and(|l| l.is_ipv4() == t.destination.is_ipv4())
                        })
                    });
                let Some(socket) = socket else {
                    tracing::warn!(destination = %t.destination, "no UDP socket of that address family");
                    return;
                };
                if let Err(e) = socket.send_to(&t.bytes, t.destination).await {
                    tracing::warn!(destination = %t.destination, error = %e, "UDP send failed");
                }
            }
            Transport::Tcp | Transport::Tls => {
                let id = t
                    .connection
                    .filter(|id| self.connections.contains_key(id))
                    .or_else(|| self.by_peer.get(&t.destination).copied());
                if let Some(writer) = id.and_then(|id| self.connections.get(&id)) {
                    // A full queue means the peer does not read: drop rather than stall SIP.
                    if writer.try_send(t.bytes).is_err() {
                        self.inlet
                            .counters
                            .write_queue_full
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!(destination = %t.destination, "TCP write queue full or closed; message dropped");
                    }
                    return;
                }
                if t.transport == Transport::Tls {
                    tracing::warn!(destination = %t.destination, "TLS connection gone; message dropped (no outbound TLS)");
                    return;
                }
                tokio::spawn(tcp::connect_and_send(
                    t.destination,
                    t.bytes,
                    self.inlet.clone(),
                    self.stop.clone(),
                ));
            }
        }
    }
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}
