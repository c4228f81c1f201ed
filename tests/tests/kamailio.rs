//! Several recorders behind Kamailio's dispatcher (`packaging/kamailio/kamailio.cfg`), one
//! PostgreSQL index: three recorder daemons, each in its own namespace, joined to a hub
//! namespace where Kamailio and SIPp run. SIPp (`tests/sipp/siprec_proxied.xml`) sends SIPREC
//! calls with RTP through Kamailio: INVITE, ACK, a re-INVITE, BYE, every in-dialog request
//! through Kamailio's Record-Route to the recorder's Contact (a call only succeeds if the
//! recorder that owns the dialog answers them: any other answers 481).
//!
//! The cases: the spread; one recorder full (`max_sessions` 10); one drained mid-run; one
//! killed with SIGKILL mid-run and restarted; one restarted with `--detach-on-exit` mid-run.
//! The cases run one at a time (a lock): each has three daemons, Kamailio and SIPp on a
//! shared 2-CPU machine.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{
    daemon::{read_json, recorder_bin, scratch_dir, tshark_count, Daemon, DaemonOptions},
    kamailio::Kamailio,
    net::Star,
    postgres::Postgres,
};

/// One case at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const HOSTS: usize = 3;
/// Kamailio's OPTIONS probing interval (seconds) and its wait for a first answer to a new
/// INVITE (and to a probe) before the next recorder.
const PING_INTERVAL_S: u32 = 1;
const FR_TIMER_MS: u32 = 1000;

fn host_name(i: usize) -> String {
    format!("host-{i}")
}

/// Runs `recorder <args> --socket <control>`.
fn cli(control: &Path, args: &[&str]) -> Output {
    Command::new(recorder_bin())
        .args(args)
        .arg("--socket")
        .arg(control)
        .output()
        .expect("run the recorder CLI")
}

fn cli_text(control: &Path, args: &[&str]) -> String {
    let out = cli(control, args);
    assert!(
        out.status.success(),
        "recorder {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

fn cli_json(control: &Path, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let text = cli_text(control, &args);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("recorder {args:?}: {e}: {text}"))
}

/// SIPp's final counts.
#[derive(Debug)]
struct SippResult {
    successful: u64,
    failed: u64,
    errors: String,
}

/// A SIPp run in the hub namespace.
struct Sipp {
    child: Child,
    dir: PathBuf,
    started: Instant,
}

impl Sipp {
    fn wait(mut self) -> SippResult {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if self.child.try_wait().unwrap().is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("sipp did not finish in time");
            }
            std::thread::sleep(Duration::from_millis(50)); // polling a child's exit
        }
        let stat = std::fs::read_to_string(self.dir.join("stat.csv")).unwrap_or_default();
        let mut lines = stat.lines().filter(|l| !l.trim().is_empty());
        let header: Vec<&str> = lines.next().unwrap_or_default().split(';').collect();
        let last: Vec<&str> = lines.last().unwrap_or_default().split(';').collect();
        let field = |name: &str| -> u64 {
            let i = header.iter().position(|h| *h == name).unwrap_or_else(|| {
                panic!(
                    "no {name} in sipp's statistics: {stat}\n{}",
                    std::fs::read_to_string(self.dir.join("sipp.stderr")).unwrap_or_default()
                )
            });
            last[i].parse().unwrap()
        };
        let errors = std::fs::read_to_string(self.dir.join("errors.log")).unwrap_or_default();
        SippResult {
            successful: field("SuccessfulCall(C)"),
            failed: field("FailedCall(C)"),
            errors,
        }
    }
}

/// Three recorders sharing one PostgreSQL, Kamailio in front. Fields drop in order: Kamailio
/// and the daemons stop before the namespaces go, the database last.
struct Cluster {
    kamailio: Kamailio,
    daemons: Vec<Daemon>,
    star: Star,
    dir: PathBuf,
    _pg: Postgres,
}

impl Cluster {
    /// `extra(i)`: more flags for recorder `i`.
    fn start(tag: &str, extra: impl Fn(usize) -> Vec<String>) -> Self {
        let pg = Postgres::start();
        let star = Star::new(tag, HOSTS);
        let daemons: Vec<Daemon> = (0..HOSTS)
            .map(|i| {
                let mut flags: Vec<String> = [
                    "--index-backend",
                    "postgres",
                    "--index-url",
                    &pg.url(),
                    "--site",
                    &host_name(i),
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                flags.extend(extra(i));
                Daemon::start(
                    &star.spokes[i],
                    DaemonOptions {
                        rtp_ports: "30000-31999".into(),
                        extra: flags,
                        sip_port: 5060,
                    },
                )
            })
            .collect();
        let sips: Vec<SocketAddr> = daemons.iter().map(|d| d.sip).collect();
        let kamailio = Kamailio::start(
            &star.hub_ns,
            SocketAddr::new(IpAddr::V4(star.hub_v4), 5060),
            &sips,
            PING_INTERVAL_S,
            FR_TIMER_MS,
        );
        let dir = scratch_dir("kamailio-sipp");
        // Two seconds of a 440 Hz tone as 8 kHz mu-law: what SIPp streams (100 packets).
        let status = Command::new("sox")
            .args(["-n", "-r", "8000", "-c", "1", "-e", "u-law"])
            .arg(dir.join("tone.wav"))
            .args(["synth", "2", "sine", "440"])
            .status()
            .expect("run sox (install: cargo xtask setup)");
        assert!(status.success());
        Self {
            kamailio,
            daemons,
            star,
            dir,
            _pg: pg,
        }
    }

    /// Starts SIPp: `calls` calls at `rate` per second through Kamailio.
    fn sipp(&self, name: &str, calls: u32, rate: u32) -> Sipp {
        let dir = self.dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(self.dir.join("tone.wav"), dir.join("tone.wav")).unwrap();
        let scenario = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sipp/siprec_proxied.xml");
        let hub = self.star.hub_v4.to_string();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.star.hub_ns, "sipp"])
            .arg(self.kamailio.addr.to_string())
            .arg("-sf")
            .arg(&scenario)
            .args(["-m", &calls.to_string(), "-r", &rate.to_string()])
            .args(["-i", &hub, "-p", "5070", "-mi", &hub])
            .args(["-mp", "40000"])
            .args(["-timeout", "100s", "-timeout_error", "-nostdin"])
            .args(["-trace_stat", "-fd", "1", "-trace_err"])
            .arg("-stf")
            .arg(dir.join("stat.csv"))
            .arg("-error_file")
            .arg(dir.join("errors.log"))
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("sipp.stderr")).unwrap(),
            ))
            .spawn()
            .expect("run sipp (install: cargo xtask setup)");
        Sipp {
            child,
            dir,
            started: Instant::now(),
        }
    }

    fn control(&self, i: usize) -> &Path {
        &self.daemons[i].control
    }

    fn status(&self, i: usize) -> Value {
        cli_json(self.control(i), &["status"])
    }

    /// Every index row as host `i` lists it, once `want` rows are there and none is active
    /// (polling the shared index, with a deadline).
    fn settled_rows(&self, i: usize, want: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let rows = cli_json(self.control(i), &["recordings"]);
            let rows = rows.as_array().cloned().unwrap_or_default();
            let active = rows.iter().filter(|r| r["state"] == "active").count();
            if rows.len() >= want && active == 0 {
                return rows;
            }
            assert!(
                Instant::now() < deadline,
                "host {i} lists {} rows ({active} active), want {want} settled",
                rows.len()
            );
            std::thread::sleep(Duration::from_millis(200)); // polling the shared index
        }
    }

    /// The rows as every host lists them (all must agree), by host name.
    fn rows_everywhere(&self, want: usize) -> Vec<Value> {
        let first = self.settled_rows(0, want);
        let ids = |rows: &[Value]| -> BTreeSet<String> {
            rows.iter()
                .map(|r| r["id"].as_str().unwrap().to_string())
                .collect()
        };
        for i in 1..HOSTS {
            let rows = self.settled_rows(i, want);
            assert_eq!(
                ids(&rows),
                ids(&first),
                "host {i} lists the same recordings"
            );
        }
        first
    }

    /// Recording metadata files in host `i`'s spool, by SIP Call-ID.
    fn spool_metadata(&self, i: usize) -> BTreeMap<String, (PathBuf, Value)> {
        self.daemons[i]
            .recordings()
            .into_iter()
            .filter_map(|dir| {
                let meta = read_json(&dir.join("metadata.json"))?;
                Some((meta["sip_call_id"].as_str()?.to_string(), (dir, meta)))
            })
            .collect()
    }
}

/// Rows per host name.
fn per_host(rows: &[Value]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in rows {
        *counts
            .entry(r["host"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    counts
}

/// Every SIPp call recorded exactly once, complete, ended by its BYE.
fn assert_each_call_once(rows: &[Value], calls: usize) {
    let call_ids: BTreeSet<&str> = rows
        .iter()
        .map(|r| r["sip_call_id"].as_str().unwrap())
        .collect();
    assert_eq!(rows.len(), calls, "one recording per call");
    assert_eq!(call_ids.len(), calls, "no call recorded twice");
    for r in rows {
        assert_eq!(r["state"], "complete", "{r}");
        assert_eq!(r["end_reason"], "bye", "{r}");
    }
}

/// Packets of every recording in host `i`'s spool: (min, max, total lost).
fn packet_range(cluster: &Cluster, i: usize) -> (u64, u64, u64) {
    let mut min = u64::MAX;
    let mut max = 0;
    let mut lost = 0;
    for (_, (_, meta)) in cluster.spool_metadata(i) {
        let stream = &meta["streams"][0];
        let packets = stream["packets"].as_u64().unwrap();
        min = min.min(packets);
        max = max.max(packets);
        lost += stream["lost"].as_u64().unwrap() + stream["ring_drops"].as_u64().unwrap_or(0);
    }
    (min, max, lost)
}

#[test]
fn calls_spread_over_three_recorders_each_recorded_once() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cluster = Cluster::start("kmain", |_| Vec::new());
    const CALLS: usize = 300;
    let sipp = cluster.sipp("main", CALLS as u32, 30);
    let result = sipp.wait();
    assert_eq!(
        (result.successful, result.failed),
        (CALLS as u64, 0),
        "{}",
        result.errors
    );
    let rows = cluster.rows_everywhere(CALLS);
    assert_each_call_once(&rows, CALLS);
    let spread = per_host(&rows);
    eprintln!("spread of {CALLS} calls: {spread:?}");
    assert_eq!(spread.len(), HOSTS, "{spread:?}");
    for (host, n) in &spread {
        assert!(*n * 5 >= CALLS, "{host} recorded {n} of {CALLS} calls");
    }
    // Each host's spool holds exactly its rows, with the media.
    for i in 0..HOSTS {
        let spool = cluster.spool_metadata(i);
        assert_eq!(spool.len(), spread[&host_name(i)], "host {i}'s spool");
        let (min, max, lost) = packet_range(&cluster, i);
        eprintln!("host {i}: packets per recording {min}..={max}, lost {lost}");
        assert!(min >= 95, "host {i}: a recording with {min} packets");
        assert_eq!(lost, 0, "host {i}");
    }
    // The text listing names the host too.
    let text = cli_text(cluster.control(1), &["recordings"]);
    for i in 0..HOSTS {
        assert!(text.contains(&host_name(i)), "{text}");
    }
    let status = cli_text(cluster.control(2), &["status"]);
    assert!(status.contains("host host-2"), "{status}");
    assert!(status.contains("taking new sessions"), "{status}");
}
