//! Abuse of the recorder's control socket and HTTP API, with a normal `status` request timed
//! while it lasts; prints one JSON object.
//!
//! ```text
//! ctl_abuse [--socket /run/recorder/control.sock] [--http 127.0.0.1:8080] [--connections 1000]
//!           [--line-mib 4] [--slow 20] [--seconds 10]
//! ```
//!
//! For each interface given: one request line (or HTTP header) of `--line-mib` MiB, and the
//! error it gets; `--connections` connections opened and held (counted accepted, refused, and
//! what error they were told); `--slow` clients that send one byte a second and
//! `--slow` that send requests and never read. Meanwhile a `status` request (control socket)
//! or `GET /metrics` (HTTP) is timed once a second: `status_latency_ms` lists them, and
//! `status_failures` counts those that failed.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

struct Args {
    socket: Option<PathBuf>,
    http: Option<SocketAddr>,
    connections: usize,
    line_mib: usize,
    slow: usize,
    seconds: u64,
}

const USAGE: &str = "usage: ctl_abuse [--socket PATH] [--http IP:PORT] [--connections N] \
[--line-mib N] [--slow N] [--seconds S]";

fn parse_args() -> Result<Args> {
    let mut args = Args {
        socket: None,
        http: None,
        connections: 1000,
        line_mib: 4,
        slow: 20,
        seconds: 10,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--socket" => args.socket = Some(value()?.into()),
            "--http" => args.http = Some(value()?.parse().context("--http")?),
            "--connections" => args.connections = value()?.parse().context("--connections")?,
            "--line-mib" => args.line_mib = value()?.parse().context("--line-mib")?,
            "--slow" => args.slow = value()?.parse().context("--slow")?,
            "--seconds" => args.seconds = value()?.parse().context("--seconds")?,
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if args.socket.is_none() && args.http.is_none() {
        bail!("give --socket, --http or both\n{USAGE}");
    }
    Ok(args)
}

/// Either kind of stream, so the abuses are written once.
enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn open(target: &Target) -> std::io::Result<Conn> {
        let conn = match target {
            Target::Control(path) => Conn::Unix(UnixStream::connect(path)?),
            Target::Http(addr) => {
                Conn::Tcp(TcpStream::connect_timeout(addr, Duration::from_secs(2))?)
            }
        };
        conn.set_timeouts(Duration::from_secs(2))?;
        Ok(conn)
    }

    fn set_timeouts(&self, t: Duration) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
            Conn::Tcp(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
        }
    }

    /// What the server has sent so far, without waiting (None: nothing yet; Some(""): closed).
    fn poll(&mut self) -> Option<String> {
        let set = |c: &Conn, on: bool| match c {
            Conn::Unix(s) => s.set_nonblocking(on),
            Conn::Tcp(s) => s.set_nonblocking(on),
        };
        let _ = set(self, true);
        let mut buf = vec![0u8; 4096];
        let got = match self.read(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) => Some(format!("error: {e}")),
        };
        let _ = set(self, false);
        got
    }

    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(b),
            Conn::Tcp(s) => s.write(b),
        }
    }

    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(b),
            Conn::Tcp(s) => s.read(b),
        }
    }

    /// Whatever the server says within the read timeout, up to 4 KiB, as text.
    fn read_some(&mut self) -> String {
        let mut buf = vec![0u8; 4096];
        let mut got = 0;
        while got < buf.len() {
            match self.read(&mut buf[got..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    got += n;
                    if buf[..got].ends_with(b"\n") && !buf[..got].starts_with(b"HTTP/") {
                        break;
                    }
                    if buf[..got].starts_with(b"HTTP/") && http_complete(&buf[..got]) {
                        break;
                    }
                }
            }
        }
        String::from_utf8_lossy(&buf[..got]).into_owned()
    }
}

fn http_complete(b: &[u8]) -> bool {
    let Some(end) = b.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&b[..end]);
    let length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    b.len() >= end + 4 + length
}

#[derive(Clone)]
enum Target {
    Control(PathBuf),
    Http(SocketAddr),
}

impl Target {
    fn name(&self) -> &'static str {
        match self {
            Target::Control(_) => "control",
            Target::Http(_) => "http",
        }
    }

    /// The normal request whose latency is measured.
    fn probe(&self) -> Vec<u8> {
        match self {
            Target::Control(_) => b"{\"cmd\":\"status\"}\n".to_vec(),
            Target::Http(addr) => {
                format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .into_bytes()
            }
        }
    }

    fn probe_ok(&self, answer: &str) -> bool {
        match self {
            Target::Control(_) => serde_json::from_str::<Value>(answer.trim())
                .is_ok_and(|v| v["ok"] == json!(true) && v["data"]["version"].is_string()),
            Target::Http(_) => answer.starts_with("HTTP/1.1 200"),
        }
    }
}

/// Opens `n` connections and keeps them open; counts how many the server took, how many it
/// refused (closed at once or answered with an error), and the first error text.
fn hold_connections(target: &Target, n: usize) -> (Vec<Conn>, Value) {
    let mut held = Vec::new();
    let (mut connect_failed, mut refused) = (0u64, 0u64);
    let mut refusal: Option<String> = None;
    for _ in 0..n {
        match Conn::open(target) {
            Ok(c) => held.push(c),
            Err(_) => connect_failed += 1,
        }
    }
    // A refused connection is answered and closed at once; give the server a moment to do so
    // for every one, then look at each without blocking long.
    std::thread::sleep(Duration::from_millis(500));
    let mut kept = Vec::new();
    for mut c in held {
        match c.poll() {
            None => kept.push(c),
            Some(answer) => {
                refused += 1;
                refusal.get_or_insert(answer.trim().to_string());
            }
        }
    }
    let report = json!({
        "asked": n,
        "held": kept.len(),
        "refused": refused,
        "connect_failed": connect_failed,
        "refusal": refusal,
    });
    (kept, report)
}

/// One request line (control) or header (HTTP) of `mib` MiB, and what the server answers.
fn long_line(target: &Target, mib: usize) -> Value {
    let mut c = match Conn::open(target) {
        Ok(c) => c,
        Err(e) => return json!({ "error": format!("connect: {e}") }),
    };
    let start = Instant::now();
    let mut payload = match target {
        Target::Control(_) => b"{\"cmd\":\"status\",\"x\":\"".to_vec(),
        Target::Http(addr) => {
            format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nX-Long: ").into_bytes()
        }
    };
    payload.resize(payload.len() + mib * 1024 * 1024, b'a');
    let mut written = 0;
    while written < payload.len() {
        match c.write(&payload[written..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => written += n,
        }
    }
    let answer = c.read_some();
    json!({
        "bytes_sent": written,
        "bytes_offered": payload.len(),
        "answer": answer.lines().next().unwrap_or("").to_string(),
        "answer_full": answer,
        "ms": start.elapsed().as_millis() as u64,
    })
}

/// Slow clients: `n` that send one byte a second, `n` that send requests and never read.
fn slow_clients(
    target: &Target,
    n: usize,
    stop: Arc<AtomicBool>,
) -> (Vec<std::thread::JoinHandle<()>>, Arc<AtomicU64>) {
    let closed = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for i in 0..2 * n {
        let (target, stop, closed) = (target.clone(), stop.clone(), closed.clone());
        threads.push(std::thread::spawn(move || {
            let Ok(mut c) = Conn::open(&target) else {
                closed.fetch_add(1, Relaxed);
                return;
            };
            let request = target.probe();
            if i % 2 == 0 {
                // One byte a second, never finishing.
                let mut k = 0;
                while !stop.load(Relaxed) {
                    if c.write(&request[k % (request.len() - 1)..][..1]).is_err() {
                        closed.fetch_add(1, Relaxed);
                        return;
                    }
                    k += 1;
                    std::thread::sleep(Duration::from_secs(1));
                }
            } else {
                // Requests as fast as the server takes them, answers never read.
                let _ = c.set_timeouts(Duration::from_millis(200));
                let request = match &target {
                    Target::Control(_) => b"{\"cmd\":\"flows\"}\n".to_vec(),
                    Target::Http(addr) => {
                        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").into_bytes()
                    }
                };
                while !stop.load(Relaxed) {
                    match c.write(&request) {
                        Ok(_) => {}
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(_) => {
                            closed.fetch_add(1, Relaxed);
                            return;
                        }
                    }
                }
            }
        }));
    }
    (threads, closed)
}

/// One normal request: its latency in ms, or the error.
fn probe_once(target: &Target) -> Value {
    let start = Instant::now();
    let answer = Conn::open(target).and_then(|mut c| {
        c.set_timeouts(Duration::from_secs(5))?;
        let request = target.probe();
        let mut written = 0;
        while written < request.len() {
            written += c.write(&request[written..])?;
        }
        Ok(c.read_some())
    });
    match answer {
        Ok(a) if target.probe_ok(&a) => json!({ "ms": start.elapsed().as_millis() as u64 }),
        Ok(a) => json!({ "error": a.chars().take(300).collect::<String>() }),
        Err(e) => json!({ "error": e.to_string() }),
    }
}

/// Latencies (ms) of the answered probes, failures, and the first failure's text.
type Probes = (Vec<u64>, u64, Option<String>);

/// Times the normal request once a second until `stop`.
fn probe_loop(target: Target, stop: Arc<AtomicBool>, out: Arc<Mutex<Probes>>) {
    while !stop.load(Relaxed) {
        let start = Instant::now();
        let result = Conn::open(&target).and_then(|mut c| {
            c.set_timeouts(Duration::from_secs(5))?;
            let request = target.probe();
            let mut written = 0;
            while written < request.len() {
                written += c.write(&request[written..])?;
            }
            Ok(c.read_some())
        });
        let ms = start.elapsed().as_millis() as u64;
        let mut out = out.lock().unwrap();
        match result {
            Ok(answer) if target.probe_ok(&answer) => out.0.push(ms),
            Ok(answer) => {
                out.1 += 1;
                out.2.get_or_insert(answer.chars().take(300).collect());
            }
            Err(e) => {
                out.1 += 1;
                out.2.get_or_insert(e.to_string());
            }
        }
        drop(out);
        std::thread::sleep(Duration::from_millis(1000).saturating_sub(start.elapsed()));
    }
}

fn abuse(target: Target, args: &Args) -> Value {
    let stop = Arc::new(AtomicBool::new(false));
    let probes = Arc::new(Mutex::new((Vec::new(), 0, None)));
    let prober = {
        let (target, stop, probes) = (target.clone(), stop.clone(), probes.clone());
        std::thread::spawn(move || probe_loop(target, stop, probes))
    };
    let started = Instant::now();
    // The long line first: once the connections are held, an HTTP client is refused anyway.
    let line = long_line(&target, args.line_mib);
    let (held, connections) = hold_connections(&target, args.connections);
    let (slow, slow_closed) = slow_clients(&target, args.slow, stop.clone());
    let rest = Duration::from_secs(args.seconds).saturating_sub(started.elapsed());
    std::thread::sleep(rest);
    stop.store(true, Relaxed);
    let _ = prober.join();
    for t in slow {
        let _ = t.join();
    }
    // Did the server keep the held connections, or close them (idle limit)?
    let mut closed_by_server = 0;
    for mut c in held {
        if c.poll().is_some() {
            closed_by_server += 1;
        }
    }
    // Once the abusers are gone the interface must serve normally again.
    let after = probe_once(&target);
    let (latencies, failures, failure) = probes.lock().unwrap().clone();
    let max = latencies.iter().max().copied();
    json!({
        "connections": connections,
        "held_closed_by_server": closed_by_server,
        "long_line": line,
        "slow_clients": 2 * args.slow,
        "slow_clients_closed_by_server": slow_closed.load(Relaxed),
        "status_latency_ms": latencies,
        "status_max_ms": max,
        "status_failures": failures,
        "status_failure": failure,
        "status_after": after,
        "seconds": started.elapsed().as_secs_f64(),
    })
}

/// A thousand connections need more descriptors than the usual soft limit of 1024.
fn raise_nofile_limit() {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut l: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

fn main() -> Result<()> {
    raise_nofile_limit();
    let args = parse_args()?;
    let mut report = serde_json::Map::new();
    let mut targets = Vec::new();
    if let Some(p) = &args.socket {
        targets.push(Target::Control(p.clone()));
    }
    if let Some(a) = args.http {
        targets.push(Target::Http(a));
    }
    // One after the other: each interface's figures are its own.
    for target in targets {
        report.insert(target.name().into(), abuse(target, &args));
    }
    println!("{}", Value::Object(report));
    Ok(())
}
