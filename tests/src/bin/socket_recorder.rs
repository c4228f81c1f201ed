//! Baseline for `cargo xtask bench`: a conventional userspace RTP recorder. One UDP socket per
//! port, epoll, `recvmmsg` batches, every datagram written to a pcap (Ethernet/IPv4/UDP headers
//! rebuilt from the socket addresses, since a socket sees only the payload).
//!
//! `socket_recorder <addr> <base-port> <flows> <out.pcap>`: binds `flows` even ports from
//! `base-port`, prints `ready`, records until a line (or EOF) on stdin, then prints JSON counts.

use std::{
    fs::File,
    io::{BufRead, BufWriter, Write},
    net::{Ipv4Addr, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use serde_json::json;

const BATCH: usize = 64;
const SNAP: usize = 2048;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 4 {
        bail!("usage: socket_recorder <addr> <base-port> <flows> <out.pcap>");
    }
    let addr: Ipv4Addr = args[0].parse().context("addr")?;
    let base: u16 = args[1].parse().context("base port")?;
    let flows: u16 = args[2].parse().context("flows")?;
    raise_nofile(flows as u64 + 64);

    // SAFETY: plain syscall; checked below.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epoll < 0 {
        bail!("epoll_create1: {}", std::io::Error::last_os_error());
    }
    let mut sockets = Vec::with_capacity(flows as usize);
    for k in 0..flows {
        let port = base + 2 * k;
        let s = UdpSocket::bind((addr, port)).with_context(|| format!("bind {addr}:{port}"))?;
        s.set_nonblocking(true)?;
        // 16 MiB, as tcpdump's -B in the bench; FORCE passes net.core.rmem_max (we run as root).
        let size: libc::c_int = 16 << 20;
        // SAFETY: valid fd and option buffer of the stated size.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: k as u64,
        };
        // SAFETY: both fds valid; `ev` outlives the call.
        if unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev) } < 0 {
            bail!("epoll_ctl: {}", std::io::Error::last_os_error());
        }
        sockets.push(s);
    }

    let mut out = BufWriter::with_capacity(1 << 20, File::create(&args[3])?);
    // Classic pcap, microseconds, LINKTYPE_ETHERNET.
    out.write_all(&0xa1b2c3d4u32.to_le_bytes())?;
    out.write_all(&2u16.to_le_bytes())?;
    out.write_all(&4u16.to_le_bytes())?;
    out.write_all(&[0; 8])?;
    out.write_all(&(SNAP as u32).to_le_bytes())?;
    out.write_all(&1u32.to_le_bytes())?;

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::stdin().lock().read_line(&mut line);
            stop.store(true, Ordering::Relaxed);
        });
    }
    println!("ready");

    let mut bufs = vec![[0u8; SNAP]; BATCH];
    // SAFETY: an all-zero sockaddr_in is valid.
    let mut names: Vec<libc::sockaddr_in> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut iovs: Vec<libc::iovec> = Vec::with_capacity(BATCH);
    let mut msgs: Vec<libc::mmsghdr> = Vec::with_capacity(BATCH);
    for buf in bufs.iter_mut() {
        iovs.push(libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: SNAP,
        });
    }
    for i in 0..BATCH {
        // SAFETY: an all-zero mmsghdr is valid; pointers are filled in right after.
        let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
        m.msg_hdr.msg_iov = &mut iovs[i];
        m.msg_hdr.msg_iovlen = 1;
        m.msg_hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_in).cast();
        m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
        msgs.push(m);
    }
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let (mut packets, mut bytes, mut syscalls) = (0u64, 0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `events` is a valid buffer of its length.
        let n = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as i32, 50) };
        for ev in &events[..n.max(0) as usize] {
            let k = ev.u64 as usize;
            let fd = sockets[k].as_raw_fd();
            let dport = base + 2 * k as u16;
            loop {
                for m in msgs.iter_mut() {
                    m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
                }
                // SAFETY: `msgs` holds BATCH valid headers pointing at live buffers.
                let got = unsafe {
                    libc::recvmmsg(
                        fd,
                        msgs.as_mut_ptr(),
                        BATCH as u32,
                        libc::MSG_DONTWAIT,
                        std::ptr::null_mut(),
                    )
                };
                syscalls += 1;
                if got <= 0 {
                    break;
                }
                let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
                for i in 0..got as usize {
                    let len = msgs[i].msg_len as usize;
                    let src = Ipv4Addr::from(u32::from_be(names[i].sin_addr.s_addr));
                    let sport = u16::from_be(names[i].sin_port);
                    write_record(&mut out, now, src, addr, sport, dport, &bufs[i][..len])?;
                    packets += 1;
                    bytes += len as u64;
                }
                if (got as usize) < BATCH {
                    break;
                }
            }
        }
    }
    out.flush()?;
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    println!(
        "{}",
        json!({
            "packets": packets, "payload_bytes": bytes, "recvmmsg_calls": syscalls,
            "user_s": secs(ru.ru_utime), "sys_s": secs(ru.ru_stime), "max_rss_kib": peak_rss_kib(),
        })
    );
    Ok(())
}

fn write_record(
    out: &mut impl Write,
    ts: std::time::Duration,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> std::io::Result<()> {
    let frame_len = 14 + 20 + 8 + payload.len();
    out.write_all(&(ts.as_secs() as u32).to_le_bytes())?;
    out.write_all(&ts.subsec_micros().to_le_bytes())?;
    out.write_all(&(frame_len as u32).to_le_bytes())?;
    out.write_all(&(frame_len as u32).to_le_bytes())?;
    let mut h = [0u8; 42];
    h[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    h[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    h[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    h[14] = 0x45;
    h[16..18].copy_from_slice(&((20 + 8 + payload.len()) as u16).to_be_bytes());
    h[22] = 64;
    h[23] = 17;
    h[26..30].copy_from_slice(&src.octets());
    h[30..34].copy_from_slice(&dst.octets());
    h[34..36].copy_from_slice(&sport.to_be_bytes());
    h[36..38].copy_from_slice(&dport.to_be_bytes());
    h[38..40].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    out.write_all(&h)?;
    out.write_all(payload)
}

fn raise_nofile(want: u64) {
    let lim = libc::rlimit {
        rlim_cur: want.max(1024),
        rlim_max: want.max(1024),
    };
    // SAFETY: valid rlimit struct; failure only means fewer sockets can be opened.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
}

/// Peak RSS of this process image in KiB (`VmHWM`; `ru_maxrss` would also count the image of the
/// parent that forked us before `exec`).
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
