//! Kamailio (Debian's package) running `packaging/kamailio/kamailio.cfg` in a namespace, in
//! front of recorders: its dispatcher list written from the recorders' SIP addresses, its log
//! (stderr) in a file the tests read for the dispatcher's state changes. Stopped on drop.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{client::SipClient, daemon::scratch_dir, net::in_netns};

pub struct Kamailio {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    pub log: PathBuf,
    ns: String,
}

/// The configuration the tests run: the packaged one.
pub fn packaged_cfg() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../packaging/kamailio/kamailio.cfg")
}

impl Kamailio {
    /// Starts Kamailio in `ns` listening on UDP `addr`, dispatching to `recorders` (set 1),
    /// probing them every `ping_interval_s` seconds; returns once it answers OPTIONS.
    pub fn start(
        ns: &str,
        addr: SocketAddr,
        recorders: &[SocketAddr],
        ping_interval_s: u32,
        fr_timer_ms: u32,
    ) -> Self {
        let dir = scratch_dir("kamailio");
        let list: String = recorders
            .iter()
            .map(|r| format!("1 sip:{r} 0 0\n"))
            .collect();
        let ds_list = dir.join("dispatcher.list");
        std::fs::write(&ds_list, list).unwrap();
        let log = dir.join("kamailio.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "kamailio"])
            .arg("-f")
            .arg(packaged_cfg())
            // Foreground (no daemon), log to stderr, this address only, small memory.
            .args([
                "-DD",
                "-E",
                "-l",
                &format!("udp:{addr}"),
                "-m",
                "64",
                "-M",
                "8",
            ])
            .arg("-Y")
            .arg(&dir)
            .arg("-P")
            .arg(dir.join("kamailio.pid"))
            .arg("-A")
            .arg(format!("DS_LIST=\"{}\"", ds_list.display()))
            .arg("-A")
            .arg(format!("DS_PING_INTERVAL={ping_interval_s}"))
            .arg("-A")
            .arg(format!("FR_TIMER_MS={fr_timer_ms}"))
            .arg("-A")
            .arg(format!("CTL_SOCKET=\"unix:{}\"", dir.join("ctl").display()))
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("run kamailio (install: cargo xtask setup)");
        let mut kamailio = Self {
            child: Some(child),
            addr,
            dir,
            log,
            ns: ns.to_string(),
        };
        kamailio.wait_ready();
        kamailio
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("kamailio exited early ({status}):\n{}", self.log_text());
            }
            let addr = self.addr;
            let answered = in_netns(&self.ns, || {
                let mut c = SipClient::udp(addr.ip(), addr);
                c.request_uri = format!("sip:{addr}");
                let bytes = c.request("OPTIONS", "z9hG4bK-kam-ready", 1, &[], None);
                c.send_raw(&bytes);
                c.recv_reply(Duration::from_millis(200))
                    .map(|r| r.status == 200)
                    .unwrap_or(false)
            });
            if answered {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "kamailio never answered OPTIONS:\n{}",
                self.log_text()
            );
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Log lines containing `pattern`; a `pattern` of several parts joined by `&&` wants all.
    pub fn lines(&self, pattern: &str) -> Vec<String> {
        let parts: Vec<&str> = pattern.split("&&").collect();
        self.log_text()
            .lines()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .map(str::to_string)
            .collect()
    }

    /// Waits until the log has more than `seen` lines matching `pattern` (polling the file
    /// Kamailio writes, with a deadline); returns when it saw it.
    pub fn wait_for(&self, pattern: &str, seen: usize, within: Duration) -> Option<Instant> {
        let deadline = Instant::now() + within;
        loop {
            if self.lines(pattern).len() > seen {
                return Some(Instant::now());
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10)); // polling another process's log
        }
    }

    /// Pattern of the dispatcher's state-change line for the recorder at `recorder` (its SIP
    /// address) going down (or up): the cfg's event routes log it.
    pub fn state_pattern(recorder: SocketAddr, up: bool) -> String {
        format!(
            "dispatcher: recorder {}&&sip:{recorder}",
            if up { "up" } else { "down" }
        )
    }
}

impl Drop for Kamailio {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child (`ip netns exec` execs kamailio).
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20)); // polling a child's exit
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- kamailio log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
