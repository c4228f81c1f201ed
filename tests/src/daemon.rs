//! Runs the real `recorder` binary in the recorder namespace of a [`VethPair`].

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{client::SipClient, net::VethPair};

/// Path of the `recorder` binary: `$RECORDER_BIN`, else `<workspace>/target/debug/recorder`
/// (`cargo xtask test` builds it before the tests).
pub fn recorder_bin() -> PathBuf {
    let path = std::env::var_os("RECORDER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/recorder")
        });
    assert!(
        path.exists(),
        "{} missing: run `cargo build -p recorder-user` (cargo xtask test does) or set RECORDER_BIN",
        path.display()
    );
    path
}

/// A running recorder daemon; killed on drop (tests that check shutdown stop it themselves).
pub struct Daemon {
    pub child: Option<Child>,
    pub sip: SocketAddr,
    pub spool: PathBuf,
    pub log: PathBuf,
    pub control: PathBuf,
    pub dir: PathBuf,
    pub recorder_ns: String,
    pub args: Vec<String>,
    /// Keep the scratch directory (spool, log) after drop (the demo keeps its recording).
    pub keep_files: bool,
    /// This daemon's own bpffs pin directory (daemons of parallel tests must not share one),
    /// removed on drop.
    pub pin_dir: PathBuf,
}

/// Options for starting a daemon.
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    pub rtp_ports: String,
    pub extra: Vec<String>,
    pub sip_port: u16,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        Self {
            rtp_ports: "30000-30099".into(),
            extra: Vec::new(),
            sip_port: 5060,
        }
    }
}

/// A fresh scratch directory under the system temp dir.
pub fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "recorder-test-{tag}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Daemon {
    /// Starts `recorder run` in `pair`'s recorder namespace, attached to its veth end, and waits
    /// until it answers OPTIONS.
    pub fn start(pair: &VethPair, options: DaemonOptions) -> Self {
        let dir = scratch_dir("daemon");
        let spool = dir.join("spool");
        Self::start_with_spool(pair, options, dir, spool)
    }

    pub fn start_with_spool(
        pair: &VethPair,
        options: DaemonOptions,
        dir: PathBuf,
        spool: PathBuf,
    ) -> Self {
        let sip = SocketAddr::new(IpAddr::V4(pair.recorder_v4), options.sip_port);
        let control = dir.join("control.sock");
        let pin_dir = crate::net::daemon_bpffs().join(dir.file_name().expect("scratch dir name"));
        let mut args: Vec<String> = vec![
            "run".into(),
            "--interface".into(),
            pair.recorder_if.clone(),
            "--sip-listen".into(),
            sip.to_string(),
            "--media-address".into(),
            pair.recorder_v4.to_string(),
            "--rtp-ports".into(),
            options.rtp_ports.clone(),
            "--spool".into(),
            spool.display().to_string(),
            "--control-socket".into(),
            control.display().to_string(),
            "--log-level".into(),
            "debug".into(),
            "--pin-dir".into(),
            pin_dir.display().to_string(),
        ];
        args.extend(options.extra.iter().cloned());
        let mut daemon = Self {
            child: None,
            sip,
            spool,
            log: dir.join("recorder.log"),
            control,
            dir,
            recorder_ns: pair.recorder_ns.clone(),
            args,
            keep_files: false,
            pin_dir,
        };
        daemon.spawn(pair);
        daemon
    }

    /// (Re)starts the process with the same arguments and waits until it answers OPTIONS.
    pub fn spawn(&mut self, pair: &VethPair) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.recorder_ns])
            .arg(recorder_bin())
            .args(&self.args)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn recorder");
        self.child = Some(child);
        self.wait_ready(pair);
    }

    fn wait_ready(&mut self, pair: &VethPair) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let sip = self.sip;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("recorder exited early ({status}):\n{}", self.log_text());
            }
            let answered = pair.in_sender(|| {
                let mut c = SipClient::udp(IpAddr::V4(pair.sender_v4), sip);
                c.request_uri = format!("sip:srs@{sip}");
                let bytes = c.request("OPTIONS", "z9hG4bK-ready", 1, &[], None);
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
                "recorder never answered OPTIONS:\n{}",
                self.log_text()
            );
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal to the daemon (the `ip netns exec` child execs the binary).
    pub fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    /// SIGTERM, then waits for exit; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("recorder did not exit on SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20)); // polling a child's exit
        }
    }

    /// SIGKILL (crash simulation).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Recording directories in the spool.
    pub fn recordings(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&self.spool)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.join("metadata.json").exists())
                    .collect()
            })
            .unwrap_or_default();
        dirs.sort();
        dirs
    }

    /// Metadata of the recording with this SIP Call-ID, waiting until `state` is not active
    /// when `finished` is set.
    pub fn metadata_for(&self, call_id: &str, finished: bool) -> (PathBuf, serde_json::Value) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            for dir in self.recordings() {
                if let Some(meta) = read_json(&dir.join("metadata.json")) {
                    if meta["sip_call_id"] == call_id && (!finished || meta["state"] != "active") {
                        return (dir, meta);
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "no {} recording for Call-ID {call_id} in {}:\n{}",
                if finished { "finished" } else { "" },
                self.spool.display(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20)); // polling files another process writes
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        // Unlinking the pins releases whatever a killed or detached daemon left attached.
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        if std::thread::panicking() {
            eprintln!(
                "--- recorder log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        } else if !self.keep_files {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Reads a JSON file (None while it does not exist or is being replaced).
pub fn read_json(path: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Counts packets in a pcap with tshark (a real independent reader), optionally filtered.
pub fn tshark_count(pcap: &Path, filter: Option<&str>) -> usize {
    let mut cmd = Command::new("tshark");
    cmd.args(["-r"])
        .arg(pcap)
        .args(["-T", "fields", "-e", "frame.number"]);
    if let Some(f) = filter {
        cmd.args(["-Y", f]);
    }
    let out = cmd
        .output()
        .expect("run tshark (install: cargo xtask setup)");
    assert!(
        out.status.success(),
        "tshark failed on {}: {}",
        pcap.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// Runs `recorder <args> --socket <control>` and returns its output.
pub fn cli(control: &Path, args: &[&str]) -> std::process::Output {
    Command::new(recorder_bin())
        .args(args)
        .arg("--socket")
        .arg(control)
        .output()
        .expect("run the recorder CLI")
}

/// Text output of a command that must succeed.
pub fn cli_text(control: &Path, args: &[&str]) -> String {
    let out = cli(control, args);
    assert!(
        out.status.success(),
        "recorder {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// JSON output (`--json`) of a command that must succeed.
pub fn cli_json(control: &Path, args: &[&str]) -> serde_json::Value {
    let mut args = args.to_vec();
    args.push("--json");
    let text = cli_text(control, &args);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("recorder {args:?}: {e}: {text}"))
}
