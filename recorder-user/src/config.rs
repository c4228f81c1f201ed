//! Daemon configuration: a TOML file (`--config`), overridden by command-line flags.
//!
//! Unknown keys and bad values are errors at start, naming the key.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{capture::loader::AttachMode, flow::FlowAction};

/// Errors in the configuration.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

/// The log filter `log_level` names: a level, or `tracing` directives (`info,recorder::sip=debug`).
/// Field values in span directives (`[span{field=value}]`) match as plain strings, not regular
/// expressions: the fuzzer found a 400-byte value whose regex took 74 s and 779 MB to compile,
/// at start and on every SIGHUP.
pub fn log_filter(spec: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    tracing_subscriber::EnvFilter::builder()
        .with_regex(false)
        .parse(spec)
        .map_err(|e| e.to_string())
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// An inclusive UDP port range, written `lo-hi`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (lo, hi) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?} is not a range like 20000-29999"))?;
        let lo: u16 = lo.trim().parse().map_err(|e| format!("{lo:?}: {e}"))?;
        let hi: u16 = hi.trim().parse().map_err(|e| format!("{hi:?}: {e}"))?;
        if lo == 0 || hi < lo + 1 {
            return Err(format!("{s:?}: need 0 < lo < hi"));
        }
        Ok(Self { lo, hi })
    }
}

impl TryFrom<String> for PortRange {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<PortRange> for String {
    fn from(r: PortRange) -> Self {
        r.to_string()
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.lo, self.hi)
    }
}

/// A CIDR network, written `10.0.0.0/8` or `fd00::/8` (a bare address means /32 or /128).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            _ => ip,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|e| format!("{s:?}: {e}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().map_err(|e| format!("{s:?}: {e}"))?,
            None => max,
        };
        if prefix > max {
            return Err(format!("{s:?}: prefix longer than {max}"));
        }
        Ok(Self { addr, prefix })
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> Self {
        format!("{}/{}", c.addr, c.prefix)
    }
}

/// Which index backend the recorder uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum IndexBackend {
    /// An SQLite file on this host (`index`).
    #[default]
    Sqlite,
    /// A PostgreSQL database shared by several recorders (`index_url`).
    Postgres,
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Everything the daemon needs. Field names are the TOML keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Interfaces to attach XDP to (at least one).
    pub interfaces: Vec<String>,
    /// SIP listen addresses (UDP and TCP on each).
    pub sip_listen: Vec<SocketAddr>,
    /// SIP over TLS listen addresses (usually port 5061; none by default).
    pub sip_tls_listen: Vec<SocketAddr>,
    /// PEM certificate chain presented on TLS connections.
    pub tls_certificate: Option<PathBuf>,
    /// PEM private key of that certificate.
    pub tls_private_key: Option<PathBuf>,
    /// Address we answer in SDP; RTP arrives there.
    pub media_address: Option<IpAddr>,
    /// Local RTP ports (RTCP uses RTP + 1).
    pub rtp_ports: PortRange,
    /// Seconds a released port rests before reuse.
    pub port_cooldown_secs: u64,
    /// Where recordings are written.
    pub spool: PathBuf,
    /// SQLite index (default `<spool>/index.sqlite`).
    pub index: Option<PathBuf>,
    /// `sqlite` (this host only) or `postgres` (shared by several hosts or sites).
    pub index_backend: IndexBackend,
    /// PostgreSQL connection string for `index_backend = "postgres"`
    /// (`postgres://user@host:port/db`, or `host=/run/postgresql user=recorder`).
    pub index_url: Option<String>,
    /// Site (host) name written in metadata and the index (default: the host name).
    pub site: Option<String>,
    /// Bytes per CPU ring buffer.
    pub ring_bytes: u32,
    /// Bytes of each frame captured at most.
    pub snaplen: u32,
    /// Capacity of the XDP flow map.
    pub max_flows: u32,
    /// Concurrent recording sessions at most (503 beyond).
    pub max_sessions: usize,
    /// Client networks allowed to open sessions (empty: all).
    pub acl: Vec<Cidr>,
    /// Headers that may carry the interaction id (CallUUID), in order of preference.
    pub uuid_headers: Vec<String>,
    /// Seconds without RTP and signaling before a session is ended (reason `timeout`).
    pub idle_timeout_secs: u64,
    /// Milliseconds to wait before answering an INVITE (0: at once).
    pub answer_delay_ms: u64,
    /// Smallest Session-Expires accepted (RFC 4028 Min-SE).
    pub min_session_expires: u32,
    /// Seconds in the Retry-After of a 503.
    pub retry_after_secs: u32,
    /// XDP attach mode.
    pub attach_mode: AttachMode,
    /// What happens to captured packets after capture: `drop` (the default: no socket listens
    /// on the recorder's media ports, so passing them up costs the kernel's UDP path per packet
    /// and draws ICMP port-unreachable, which some SBCs answer by stopping their media) or
    /// `pass` (the host also consumes them, e.g. a tap or another application on that port).
    pub flow_action: FlowAction,
    /// Only capture packets from the source the SDP names.
    pub pin_source: bool,
    /// Reject (400) an INVITE without `Require: siprec` and a `+sip.src` Contact.
    pub require_siprec_tag: bool,
    /// Reject (400) an INVITE without a metadata part.
    pub require_metadata: bool,
    /// Reject (400) an offer with a media line lacking `a=label`.
    pub require_label: bool,
    /// Answer every new stream `a=inactive` (recording deferred, streams start paused) until
    /// the client re-offers.
    pub answer_inactive: bool,
    /// Refuse new sessions when the spool has less free space than this.
    pub min_free_bytes: u64,
    /// Delete completed recordings older than this many hours.
    pub retention_max_age_hours: Option<u64>,
    /// Keep the spool below this many bytes (oldest first).
    pub retention_max_bytes: Option<u64>,
    /// `error`, `warn`, `info`, `debug`, `trace` or a tracing filter.
    pub log_level: String,
    pub log_format: LogFormat,
    /// Control socket the CLI talks to.
    pub control_socket: PathBuf,
    /// Prometheus metrics endpoint (off when absent): the HTTP API's router, for configs
    /// written before `http_listen`.
    pub metrics_listen: Option<SocketAddr>,
    /// HTTP API and `/metrics` (off when absent).
    pub http_listen: Option<SocketAddr>,
    /// PEM certificate chain of the HTTP API: with the key, `http_listen` speaks HTTPS.
    pub http_tls_certificate: Option<PathBuf>,
    /// PEM private key of that certificate.
    pub http_tls_private_key: Option<PathBuf>,
    /// API bearer tokens: one `name role sha256-hex` line each (role `read` or `admin`).
    pub api_tokens_file: Option<PathBuf>,
    /// Audit log of audio and pcap downloads, JSON lines appended (default: the daemon log).
    pub audit_log: Option<PathBuf>,
    /// `/metrics` asks for a token (any role) too.
    pub metrics_auth: bool,
    /// This host's HTTP API as other hosts reach it (`https://blue.example:8443`), kept in the
    /// shared index: another host fetches this host's segments of an interaction from it.
    pub public_url: Option<String>,
    /// PEM certificates trusted for other hosts' `https://` public URLs.
    pub http_peer_ca: Option<PathBuf>,
    /// On SIGTERM/SIGINT, hand the live recordings to the next daemon instead of finishing them:
    /// XDP stays attached and keeps capturing into the pinned ring buffers, the sessions are
    /// saved next to the spool, and the next `recorder run` carries on the same recordings.
    /// `false` (the default): finish every recording (`shutdown`) and detach XDP.
    pub detach_on_exit: bool,
    /// Take no new session (INVITEs and OPTIONS get 503) and let the live ones finish: for a
    /// host behind a load balancer that is to be taken out. Reloadable; `recorder drain` and
    /// SIGUSR1 do the same without editing the file.
    pub drain: bool,
    /// Seconds between refreshes of a live recording's counters in its metadata.json (events
    /// rewrite it at once).
    pub metadata_interval_secs: u64,
    /// Writer shards: packet-stage threads, each with its own file thread; recordings are
    /// spread over them by id. 0: one per CPU.
    pub writer_shards: usize,
    /// Packets queued to one writer shard before the ring consumer stops draining (records
    /// then wait in the rings; nothing is dropped in userspace).
    pub writer_queue_packets: usize,
    /// Nice value of the async runtime's threads (SIP, the control socket, the HTTP API), set
    /// once the writers run: when the CPU is short (a SIP flood), the writer threads, which
    /// keep the nice value the daemon started with, get it first. 0 to 19; 0 turns it off.
    pub signaling_nice: u8,
    /// What the pcap holds of SRTP streams: `received` (as on the wire) or `decrypted`.
    pub pcap_srtp: crate::writer::encode::media::PcapSrtp,
    /// bpffs directory holding the pinned XDP link, flow map and ring buffers (one
    /// subdirectory per kernel/user layout version). Give each daemon on a host its own.
    pub pin_dir: PathBuf,
    /// The file this configuration was read from (SIGHUP reads it again); not a key.
    #[serde(skip)]
    pub config_file: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            sip_listen: vec![SocketAddr::from(([0, 0, 0, 0], 5060))],
            sip_tls_listen: Vec::new(),
            tls_certificate: None,
            tls_private_key: None,
            media_address: None,
            rtp_ports: PortRange {
                lo: 20000,
                hi: 39999,
            },
            port_cooldown_secs: 10,
            spool: PathBuf::from("/var/spool/recorder"),
            index: None,
            index_backend: IndexBackend::Sqlite,
            index_url: None,
            site: None,
            // Covers the longest writer stall measured at the rated load with margin (bench
            // media on one receive CPU: 0.23 s at 2 000 calls, 200 000 packets/s; this holds
            // 0.66 s of them in 256-byte records).
            ring_bytes: 32 << 20,
            snaplen: recorder_ebpf::abi::DEFAULT_SNAPLEN,
            max_flows: recorder_ebpf::abi::DEFAULT_MAX_FLOWS,
            max_sessions: 10_000,
            acl: Vec::new(),
            uuid_headers: vec!["X-Genesys-CallUUID".into()],
            idle_timeout_secs: 600,
            answer_delay_ms: 0,
            min_session_expires: 90,
            retry_after_secs: 5,
            attach_mode: AttachMode::Auto,
            flow_action: FlowAction::Drop,
            pin_source: false,
            require_siprec_tag: false,
            require_metadata: false,
            require_label: false,
            answer_inactive: false,
            min_free_bytes: 64 << 20,
            retention_max_age_hours: None,
            retention_max_bytes: None,
            log_level: "info".into(),
            log_format: LogFormat::Text,
            control_socket: PathBuf::from("/run/recorder/control.sock"),
            metrics_listen: None,
            http_listen: None,
            http_tls_certificate: None,
            http_tls_private_key: None,
            api_tokens_file: None,
            audit_log: None,
            metrics_auth: false,
            public_url: None,
            http_peer_ca: None,
            detach_on_exit: false,
            drain: false,
            metadata_interval_secs: 30,
            writer_shards: 0,
            writer_queue_packets: 65536,
            signaling_nice: 5,
            pcap_srtp: Default::default(),
            pin_dir: PathBuf::from("/sys/fs/bpf/recorder"),
            config_file: None,
        }
    }
}

impl Config {
    /// Reads a TOML file; unknown keys are errors.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let mut config = Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.into(),
            message,
        })?;
        config.config_file = Some(path.into());
        Ok(config)
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim().replace('\n', " "))
    }

    /// Checks values that the types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.interfaces.is_empty() {
            return Err(invalid("interfaces", "at least one interface is needed"));
        }
        if self.sip_listen.is_empty() {
            return Err(invalid("sip_listen", "at least one address is needed"));
        }
        if !self.sip_tls_listen.is_empty() {
            if self.tls_certificate.is_none() {
                return Err(invalid(
                    "tls_certificate",
                    "required when sip_tls_listen is set (PEM certificate chain)",
                ));
            }
            if self.tls_private_key.is_none() {
                return Err(invalid(
                    "tls_private_key",
                    "required when sip_tls_listen is set (PEM private key)",
                ));
            }
        }
        if self.http_tls_certificate.is_some() != self.http_tls_private_key.is_some() {
            return Err(invalid(
                "http_tls_certificate",
                "and http_tls_private_key go together (PEM certificate chain and key)",
            ));
        }
        if let Some(url) = &self.public_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(invalid("public_url", "must start with http:// or https://"));
            }
        }
        let media = self
            .media_address
            .ok_or_else(|| invalid("media_address", "required (the address RTP is sent to)"))?;
        if media.is_unspecified() {
            return Err(invalid(
                "media_address",
                "must be a concrete address, not 0.0.0.0/::",
            ));
        }
        if self.rtp_ports.hi - self.rtp_ports.lo < 3 {
            return Err(invalid(
                "rtp_ports",
                "need room for at least two RTP/RTCP pairs",
            ));
        }
        if self.snaplen == 0 || self.snaplen > recorder_ebpf::abi::MAX_SNAPLEN {
            return Err(invalid(
                "snaplen",
                format!(
                    "{} is outside 1..={}",
                    self.snaplen,
                    recorder_ebpf::abi::MAX_SNAPLEN
                ),
            ));
        }
        if self.ring_bytes < 4096 || !self.ring_bytes.is_power_of_two() {
            return Err(invalid(
                "ring_bytes",
                "must be a power of two of at least 4096",
            ));
        }
        if self.index_backend == IndexBackend::Postgres && self.index_url.is_none() {
            return Err(invalid(
                "index_url",
                "is required with index_backend = \"postgres\"",
            ));
        }
        if self.max_sessions == 0 {
            return Err(invalid("max_sessions", "must be at least 1"));
        }
        if self.writer_queue_packets == 0 {
            return Err(invalid("writer_queue_packets", "must be at least 1"));
        }
        if self.signaling_nice > 19 {
            return Err(invalid("signaling_nice", "must be 0 to 19"));
        }
        if self.metadata_interval_secs == 0 {
            return Err(invalid("metadata_interval_secs", "must be at least 1"));
        }
        if self.idle_timeout_secs == 0 {
            return Err(invalid("idle_timeout_secs", "must be at least 1"));
        }
        if log_filter(&self.log_level).is_err() {
            return Err(invalid(
                "log_level",
                format!("{:?} is not a level or filter", self.log_level),
            ));
        }
        Ok(())
    }

    /// The index path (default `<spool>/index.sqlite`).
    pub fn index_path(&self) -> PathBuf {
        self.index
            .clone()
            .unwrap_or_else(|| self.spool.join("index.sqlite"))
    }

    /// Where the index is, per `index_backend`.
    pub fn index_location(&self) -> crate::index::IndexLocation {
        match (self.index_backend, &self.index_url) {
            (IndexBackend::Postgres, Some(url)) => {
                crate::index::IndexLocation::Postgres(url.clone())
            }
            _ => crate::index::IndexLocation::Sqlite(self.index_path()),
        }
    }

    /// The site (host) name recordings are attributed to.
    /// Where a daemon leaving with `detach_on_exit` saves the live sessions for the next one.
    pub fn handover_path(&self) -> PathBuf {
        self.spool.join(".handover.json")
    }

    pub fn site_name(&self) -> String {
        self.site.clone().unwrap_or_else(crate::writer::hostname)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Config {
        Config {
            interfaces: vec!["eth0".into()],
            media_address: Some("10.0.0.2".parse().unwrap()),
            ..Config::default()
        }
    }

    /// A log filter the config fuzzer found: compiling its field value as a regex took 74 s
    /// and 779 MB. Field values now match as plain strings, which this one cannot be, so it
    /// is refused at once, naming the key.
    #[test]
    fn a_log_filter_with_a_pathological_field_value_is_refused() {
        let spec = "6000[{-rv/.e..r............=i................sps__tlliisteninbc=\t'ُd'c eb=[''=cib=eg}\t'ُdc' eb=[ eb=['m\t'ُdc' eb=['ُd' 'ُ\t'ُdc' eb=['ُd' 'ُd'eg'ُdc' ...........'in(acke'dd'eg'ُdc' ...........'in(acke'dnendaba'dnend'iXX_bab$ckenbid_'pcap_srtpi'abaackCe'dnen=d'iXke'dc";
        assert!(log_filter(spec).is_err());
        let c = Config {
            log_level: spec.into(),
            ..valid()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("log_level"), "{err}");
        // Span field filters still work.
        log_filter("info,recorder[session{call_id=abc.1}]=debug").unwrap();
    }
    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("interfaces = [\"eth0\"]\nsnap_len = 100\n").unwrap_err();
        assert!(err.contains("snap_len"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let err = Config::from_toml("rtp_ports = \"30000-20000\"").unwrap_err();
        assert!(err.contains("rtp_ports"), "{err}");
        let err = Config::from_toml("acl = [\"10.0.0.0/40\"]").unwrap_err();
        assert!(err.contains("acl"), "{err}");
        let c = Config {
            snaplen: 9000,
            ..valid()
        };
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid { key: "snaplen", .. })
        ));
        let c = Config {
            media_address: None,
            ..valid()
        };
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid {
                key: "media_address",
                ..
            })
        ));
        valid().validate().unwrap();
    }

    #[test]
    fn tls_listen_needs_certificate_and_key() {
        let mut c = Config {
            sip_tls_listen: vec!["0.0.0.0:5061".parse().unwrap()],
            ..valid()
        };
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid {
                key: "tls_certificate",
                ..
            })
        ));
        c.tls_certificate = Some("/etc/recorder/cert.pem".into());
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("tls_private_key"), "{err}");
        c.tls_private_key = Some("/etc/recorder/key.pem".into());
        c.validate().unwrap();
        let c = Config::from_toml(
            "sip_tls_listen = [\"[::]:5061\"]\ntls_certificate = \"/c.pem\"\ntls_private_key = \"/k.pem\"\n",
        )
        .unwrap();
        assert_eq!(c.sip_tls_listen, vec!["[::]:5061".parse().unwrap()]);
        assert_eq!(c.tls_private_key, Some(PathBuf::from("/k.pem")));
    }

    #[test]
    fn full_file_parses() {
        let c = Config::from_toml(
            r#"
            interfaces = ["eth0", "eth1"]
            sip_listen = ["0.0.0.0:5060", "[::]:5060"]
            media_address = "192.0.2.10"
            rtp_ports = "30000-30999"
            spool = "/srv/rec"
            acl = ["10.0.0.0/8", "fd00::/8"]
            flow_action = "drop"
            attach_mode = "generic"
            log_format = "json"
            "#,
        )
        .unwrap();
        assert_eq!(
            c.rtp_ports,
            PortRange {
                lo: 30000,
                hi: 30999
            }
        );
        assert_eq!(c.flow_action, FlowAction::Drop);
        assert_eq!(c.attach_mode, AttachMode::Generic);
        assert!(c.acl[0].contains("10.9.8.7".parse().unwrap()));
        assert!(!c.acl[0].contains("11.0.0.1".parse().unwrap()));
        assert!(c.acl[1].contains("fd00::1".parse().unwrap()));
        assert!(c.acl[0].contains("::ffff:10.1.1.1".parse().unwrap()));
        assert_eq!(c.index_path(), PathBuf::from("/srv/rec/index.sqlite"));
    }

    /// The example shipped in packaging/ parses, validates, documents every key, and shows
    /// each key's default (apart from the two required keys, which have none).
    #[test]
    fn packaged_example_is_valid_and_shows_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/recorder.toml");
        let example = Config::from_file(&path).unwrap();
        example.validate().unwrap();
        let expected = Config {
            interfaces: example.interfaces.clone(),
            media_address: example.media_address,
            config_file: Some(path.clone()),
            ..Config::default()
        };
        assert_eq!(example, expected);
        let text = std::fs::read_to_string(&path).unwrap();
        let keys = serde_json::to_value(Config::default()).unwrap();
        for key in keys.as_object().unwrap().keys() {
            assert!(
                text.lines().any(|l| {
                    let l = l.trim_start_matches("# ");
                    l.starts_with(&format!("{key} ="))
                }),
                "packaging/recorder.toml does not document `{key}`"
            );
        }
    }

    #[test]
    fn index_backend_and_site() {
        // Default: the SQLite file in the spool.
        let c = valid();
        assert_eq!(
            c.index_location(),
            crate::index::IndexLocation::Sqlite(c.index_path())
        );
        let mut c: Config = Config::from_toml(
            r#"
            index_backend = "postgres"
            index_url = "postgres://recorder@db.example/recordings"
            site = "blue"
            "#,
        )
        .unwrap();
        assert_eq!(
            c.index_location(),
            crate::index::IndexLocation::Postgres(
                "postgres://recorder@db.example/recordings".into()
            )
        );
        assert_eq!(c.site_name(), "blue");
        c.interfaces = vec!["eth0".into()];
        c.media_address = valid().media_address;
        c.validate().unwrap();
        c.index_url = None;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid {
                key: "index_url",
                ..
            })
        ));
        assert!(Config::from_toml("index_backend = \"mysql\"")
            .unwrap_err()
            .contains("index_backend"));
    }
}
