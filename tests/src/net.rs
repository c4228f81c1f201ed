//! Test networks: two network namespaces joined by a veth pair.
//!
//! Names are unique per process and per call, so concurrent test runs never collide; `Drop`
//! deletes both namespaces (which deletes the veth pair) on every path, panics included.
//! Traffic only ever goes between the two ends of the pair.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use nix::sched::{setns, CloneFlags};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs `ip` with arguments, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Mounts bpffs on /sys/fs/bpf if it is not mounted (needed for pinning tests).
pub fn ensure_bpffs() {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .expect("mount bpffs");
        assert!(status.success(), "mount bpffs failed");
    }
}

/// A bpffs mount for daemons started with `ip netns exec`, which remounts /sys and so hides
/// /sys/fs/bpf from them. Mounted once per machine (under a lock, so two test runs never stack
/// two mounts, which would hide one run's pins from its own next daemon).
pub fn daemon_bpffs() -> std::path::PathBuf {
    use std::os::fd::AsRawFd;
    let dir = std::path::PathBuf::from("/run/recorder-test-bpffs");
    let lock = File::create("/run/recorder-test-bpffs.lock").expect("create bpffs lock");
    // SAFETY: flock(2) on a descriptor we own; released when `lock` drops.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mounted = mounts.lines().any(|l| {
        let mut fields = l.split_whitespace();
        fields.nth(1) == Some("/run/recorder-test-bpffs") && fields.next() == Some("bpf")
    });
    if !mounted {
        std::fs::create_dir_all(&dir).expect("create bpffs mount point");
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&dir)
            .status()
            .expect("mount bpffs");
        assert!(status.success(), "mount bpffs on {} failed", dir.display());
    }
    dir
}

/// Two namespaces, `sender` and `recorder`, joined by a veth pair with IPv4 and IPv6 addresses.
pub struct VethPair {
    /// Namespace of the traffic source (the SIPREC client side).
    pub sender_ns: String,
    /// Namespace of the recorder (XDP is attached to `recorder_if` there).
    pub recorder_ns: String,
    pub sender_if: String,
    pub recorder_if: String,
    pub sender_v4: Ipv4Addr,
    pub recorder_v4: Ipv4Addr,
    pub sender_v6: Ipv6Addr,
    pub recorder_v6: Ipv6Addr,
    /// Drop deletes the sender namespace too (false for the spokes of a [`Star`], whose hub
    /// namespace the star deletes).
    owns_sender_ns: bool,
}

impl VethPair {
    /// Creates the pair. `tag` (a few letters) makes names readable in `ip netns list`.
    pub fn new(tag: &str) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}{}", std::process::id() % 100_000, n);
        let tag: String = tag
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(4)
            .collect();
        let pair = Self {
            sender_ns: format!("rec-{tag}-s{id}"),
            recorder_ns: format!("rec-{tag}-r{id}"),
            // Interface names are limited to 15 bytes.
            sender_if: format!("vs{tag}{id}").chars().take(15).collect(),
            recorder_if: format!("vr{tag}{id}").chars().take(15).collect(),
            sender_v4: Ipv4Addr::new(10, 231, 0, 1),
            recorder_v4: Ipv4Addr::new(10, 231, 0, 2),
            sender_v6: "fd00:231::1".parse().unwrap(),
            recorder_v6: "fd00:231::2".parse().unwrap(),
            owns_sender_ns: true,
        };
        // From here on Drop cleans up whatever was created.
        ip(&["netns", "add", &pair.sender_ns]);
        ip(&["netns", "add", &pair.recorder_ns]);
        ip(&[
            "link",
            "add",
            &pair.sender_if,
            "netns",
            &pair.sender_ns,
            "type",
            "veth",
            "peer",
            "name",
            &pair.recorder_if,
            "netns",
            &pair.recorder_ns,
        ]);
        for (ns, dev, v4, v6) in [
            (
                &pair.sender_ns,
                &pair.sender_if,
                pair.sender_v4,
                pair.sender_v6,
            ),
            (
                &pair.recorder_ns,
                &pair.recorder_if,
                pair.recorder_v4,
                pair.recorder_v6,
            ),
        ] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", dev]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        // Static neighbours: no ARP/ND before the first packet, so timing tests are clean.
        let sender_mac = pair.mac(&pair.sender_ns, &pair.sender_if);
        let recorder_mac = pair.mac(&pair.recorder_ns, &pair.recorder_if);
        for (ns, dev, addr, mac) in [
            (
                &pair.sender_ns,
                &pair.sender_if,
                IpAddr::V4(pair.recorder_v4),
                &recorder_mac,
            ),
            (
                &pair.sender_ns,
                &pair.sender_if,
                IpAddr::V6(pair.recorder_v6),
                &recorder_mac,
            ),
            (
                &pair.recorder_ns,
                &pair.recorder_if,
                IpAddr::V4(pair.sender_v4),
                &sender_mac,
            ),
            (
                &pair.recorder_ns,
                &pair.recorder_if,
                IpAddr::V6(pair.sender_v6),
                &sender_mac,
            ),
        ] {
            ip(&[
                "-n",
                ns,
                "neigh",
                "replace",
                &addr.to_string(),
                "lladdr",
                mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        }
        pair
    }

    /// MAC address of an interface in a namespace.
    pub fn mac(&self, ns: &str, dev: &str) -> String {
        let out = Command::new("ip")
            .args(["-n", ns, "-o", "link", "show", dev])
            .output()
            .expect("ip link show");
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .unwrap_or_else(|| panic!("no MAC for {dev} in {ns}: {text}"))
            .to_string()
    }

    /// Runs `f` with the calling thread inside the sender namespace.
    pub fn in_sender<R>(&self, f: impl FnOnce() -> R) -> R {
        in_netns(&self.sender_ns, f)
    }

    /// `GET /metrics` over plain HTTP from the sender namespace (one request, the connection
    /// closed after it): the response head and body.
    pub fn get_metrics(&self, addr: std::net::SocketAddr) -> (String, String) {
        use std::io::{Read, Write};
        let raw = self.in_sender(|| {
            let mut stream =
                std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
                    .expect("connect to the metrics endpoint");
            stream
                .set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: recorder\r\nAccept: */*\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut raw = String::new();
            stream.read_to_string(&mut raw).expect("read the response");
            raw
        });
        let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP head");
        (head.to_string(), body.to_string())
    }

    /// Runs `f` with the calling thread inside the recorder namespace.
    pub fn in_recorder<R>(&self, f: impl FnOnce() -> R) -> R {
        in_netns(&self.recorder_ns, f)
    }

    /// A command run inside a namespace (`ip netns exec`).
    pub fn command(ns: &str, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, program]);
        cmd
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.recorder_ns])
            .status();
        if self.owns_sender_ns {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.sender_ns])
                .status();
        }
    }
}

/// One hub namespace (a load balancer and the SIPREC client) and `n` recorder namespaces,
/// each joined to the hub's bridge by a veth pair: one IPv4 subnet, `10.241.0.1` the hub,
/// `10.241.0.2..` the recorders. Each spoke is a [`VethPair`] whose sender side is the hub, so
/// [`Daemon`](crate::daemon::Daemon) runs in it unchanged. Drop deletes every namespace.
pub struct Star {
    pub hub_ns: String,
    pub hub_v4: Ipv4Addr,
    pub spokes: Vec<VethPair>,
}

impl Star {
    pub fn new(tag: &str, n: usize) -> Self {
        let id = format!(
            "{}{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let tag: String = tag
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(3)
            .collect();
        let hub_v4 = Ipv4Addr::new(10, 241, 0, 1);
        let mut star = Self {
            hub_ns: format!("rec-{tag}-h{id}"),
            hub_v4,
            spokes: Vec::new(),
        };
        ip(&["netns", "add", &star.hub_ns]);
        let hub = star.hub_ns.clone();
        let bridge: String = format!("b{tag}{id}").chars().take(15).collect();
        ip(&["-n", &hub, "link", "set", "lo", "up"]);
        ip(&["-n", &hub, "link", "add", &bridge, "type", "bridge"]);
        ip(&[
            "-n",
            &hub,
            "addr",
            "add",
            &format!("{hub_v4}/24"),
            "dev",
            &bridge,
        ]);
        ip(&["-n", &hub, "link", "set", &bridge, "up"]);
        for i in 0..n {
            let recorder_ns = format!("rec-{tag}-r{id}x{i}");
            ip(&["netns", "add", &recorder_ns]);
            let recorder_v4 = Ipv4Addr::new(10, 241, 0, 2 + i as u8);
            let spoke = VethPair {
                sender_ns: hub.clone(),
                recorder_ns: recorder_ns.clone(),
                sender_if: format!("h{tag}{id}x{i}").chars().take(15).collect(),
                recorder_if: format!("r{tag}{id}x{i}").chars().take(15).collect(),
                sender_v4: hub_v4,
                recorder_v4,
                sender_v6: "fd00:241::1".parse().unwrap(),
                recorder_v6: format!("fd00:241::{}", 2 + i).parse().unwrap(),
                owns_sender_ns: false,
            };
            // From here on the spoke's Drop deletes its namespace (and the veth pair).
            star.spokes.push(spoke);
            let spoke = star.spokes.last().unwrap();
            ip(&[
                "link",
                "add",
                &spoke.sender_if,
                "netns",
                &hub,
                "type",
                "veth",
                "peer",
                "name",
                &spoke.recorder_if,
                "netns",
                &recorder_ns,
            ]);
            ip(&[
                "-n",
                &hub,
                "link",
                "set",
                &spoke.sender_if,
                "master",
                &bridge,
            ]);
            ip(&["-n", &hub, "link", "set", &spoke.sender_if, "up"]);
            ip(&["-n", &recorder_ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &recorder_ns,
                "addr",
                "add",
                &format!("{recorder_v4}/24"),
                "dev",
                &spoke.recorder_if,
            ]);
            ip(&["-n", &recorder_ns, "link", "set", &spoke.recorder_if, "up"]);
        }
        star
    }
}

impl Drop for Star {
    fn drop(&mut self) {
        self.spokes.clear();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.hub_ns])
            .status();
    }
}

/// Runs `f` with the calling thread moved into network namespace `ns`, then moves it back
/// (also when `f` panics). Sockets created inside stay in `ns`.
pub fn in_netns<R>(ns: &str, f: impl FnOnce() -> R) -> R {
    let original = File::open("/proc/thread-self/ns/net").expect("open own netns");
    let target = File::open(format!("/var/run/netns/{ns}"))
        .unwrap_or_else(|e| panic!("open netns {ns}: {e}"));
    setns(target.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns into test netns");
    struct Restore(File);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Err(e) = setns(self.0.as_fd(), CloneFlags::CLONE_NEWNET) {
                eprintln!("could not restore the network namespace: {e}");
            }
        }
    }
    let _restore = Restore(original);
    f()
}

/// Gives a socket a 32 MiB receive buffer (SO_RCVBUFFORCE, root), so a burst sent by a test is
/// not dropped by the socket before the test reads it.
pub fn big_receive_buffer(socket: &impl std::os::fd::AsRawFd) {
    let size: libc::c_int = 32 << 20;
    // SAFETY: valid fd and a c_int option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &size as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
}
