//! The `recorder` command line.
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
};

use clap::{Args, Parser, Subcommand};
use recorder::{
    config::{Cidr, Config, IndexBackend, LogFormat, PortRange},
    control::{self, ControlError, Request},
};

#[derive(Debug, Parser)]
#[command(
    name = "recorder",
    version,
    about = "SIPREC call recorder with XDP capture"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the recorder daemon in the foreground.
    Run(Box<RunArgs>),
    /// Version, uptime, interfaces and XDP mode, counters, spool usage.
    Status(ReadArgs),
    /// Live recording sessions.
    Sessions(ReadArgs),
    /// The pinned flows as the kernel sees them, with counters.
    Flows(ReadArgs),
    /// End a recording from the operator's side (BYE to the client, reason `operator`).
    Stop {
        /// Recording id.
        id: String,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Recordings from the index.
    Recordings {
        /// Every recording of one interaction, in time order.
        #[arg(long)]
        call_uuid: Option<String>,
        /// Recordings with this participant address of record.
        #[arg(long)]
        aor: Option<String>,
        /// Recordings active at or after this RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// One recording's metadata.
    Show {
        /// Recording id.
        id: String,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Take no new session (INVITEs and OPTIONS get 503, so a load balancer sends calls
    /// elsewhere) and let the live ones finish; SIGUSR1 does the same.
    Drain {
        /// Take new sessions again.
        #[arg(long)]
        resume: bool,
        #[command(flatten)]
        read: ReadArgs,
    },
}

/// Options of every command that talks to the daemon.
#[derive(Debug, Args)]
struct ReadArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Control socket of the daemon.
    #[arg(long, default_value = "/run/recorder/control.sock")]
    socket: PathBuf,
}

/// Flags of `recorder run`; each overrides the same key of the config file.
#[derive(Debug, Args)]
struct RunArgs {
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Interface to attach XDP to (repeat for several).
    #[arg(long = "interface")]
    interfaces: Vec<String>,
    /// SIP listen address, UDP and TCP (repeat for several).
    #[arg(long = "sip-listen")]
    sip_listen: Vec<SocketAddr>,
    /// SIP over TLS listen address (repeat for several; needs the certificate and key).
    #[arg(long = "sip-tls-listen")]
    sip_tls_listen: Vec<SocketAddr>,
    /// PEM certificate chain for SIP over TLS.
    #[arg(long)]
    tls_certificate: Option<PathBuf>,
    /// PEM private key for SIP over TLS.
    #[arg(long)]
    tls_private_key: Option<PathBuf>,
    /// Address answered in SDP (where RTP is sent).
    #[arg(long)]
    media_address: Option<IpAddr>,
    /// Local RTP port range, e.g. 20000-29999.
    #[arg(long)]
    rtp_ports: Option<PortRange>,
    /// Recording spool directory.
    #[arg(long)]
    spool: Option<PathBuf>,
    /// SQLite index path.
    #[arg(long)]
    index: Option<PathBuf>,
    /// Index backend: sqlite (this host) or postgres (shared by several hosts or sites).
    #[arg(long, value_enum)]
    index_backend: Option<IndexBackend>,
    /// PostgreSQL connection string (with --index-backend postgres).
    #[arg(long)]
    index_url: Option<String>,
    /// Site (host) name recorded in metadata and the index.
    #[arg(long)]
    site: Option<String>,
    /// Client networks allowed to open sessions (repeat; default all).
    #[arg(long)]
    acl: Vec<Cidr>,
    /// Concurrent sessions at most.
    #[arg(long)]
    max_sessions: Option<usize>,
    /// Bytes of each frame captured at most.
    #[arg(long)]
    snaplen: Option<u32>,
    /// Bytes per CPU ring buffer (power of two).
    #[arg(long)]
    ring_bytes: Option<u32>,
    /// Milliseconds to wait before answering an INVITE.
    #[arg(long)]
    answer_delay_ms: Option<u64>,
    /// Seconds without RTP or signaling before a session ends.
    #[arg(long)]
    idle_timeout_secs: Option<u64>,
    /// Control socket path.
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Prometheus metrics listen address.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// HTTP API (and /metrics) listen address.
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// PEM certificate chain for the HTTP API (HTTPS with the key).
    #[arg(long)]
    http_tls_certificate: Option<PathBuf>,
    /// PEM private key for the HTTP API.
    #[arg(long)]
    http_tls_private_key: Option<PathBuf>,
    /// API bearer tokens file (`name role sha256-hex` per line).
    #[arg(long)]
    api_tokens_file: Option<PathBuf>,
    /// Audit log file of audio and pcap downloads (default: the daemon log).
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// This host's HTTP API URL as other hosts reach it (kept in the shared index).
    #[arg(long)]
    public_url: Option<String>,
    /// PEM certificates trusted for other hosts' https public URLs.
    #[arg(long)]
    http_peer_ca: Option<PathBuf>,
    /// Log level or tracing filter.
    #[arg(long)]
    log_level: Option<String>,
    /// Log format.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// On exit, leave capture running and the live sessions saved for the next daemon
    /// (restart or upgrade without loss) instead of finishing recordings and detaching XDP.
    #[arg(long)]
    detach_on_exit: bool,
    /// bpffs directory for the pinned XDP objects.
    #[arg(long)]
    pin_dir: Option<PathBuf>,
}

impl RunArgs {
    fn into_config(self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if !self.interfaces.is_empty() {
            c.interfaces = self.interfaces;
        }
        if !self.sip_listen.is_empty() {
            c.sip_listen = self.sip_listen;
        }
        if !self.sip_tls_listen.is_empty() {
            c.sip_tls_listen = self.sip_tls_listen;
        }
        if self.tls_certificate.is_some() {
            c.tls_certificate = self.tls_certificate;
        }
        if self.tls_private_key.is_some() {
            c.tls_private_key = self.tls_private_key;
        }
        if !self.acl.is_empty() {
            c.acl = self.acl;
        }
        macro_rules! set {
            ($($field:ident),*) => { $(if let Some(v) = self.$field { c.$field = v; })* };
        }
        set!(
            rtp_ports,
            spool,
            max_sessions,
            snaplen,
            ring_bytes,
            answer_delay_ms,
            idle_timeout_secs,
            control_socket,
            log_level,
            log_format,
            pin_dir
        );
        if self.detach_on_exit {
            c.detach_on_exit = true;
        }
        if self.media_address.is_some() {
            c.media_address = self.media_address;
        }
        if self.index.is_some() {
            c.index = self.index;
        }
        if let Some(backend) = self.index_backend {
            c.index_backend = backend;
        }
        if self.index_url.is_some() {
            c.index_url = self.index_url;
        }
        if self.site.is_some() {
            c.site = self.site;
        }
        if self.metrics_listen.is_some() {
            c.metrics_listen = self.metrics_listen;
        }
        macro_rules! set_some {
            ($($field:ident),*) => { $(if self.$field.is_some() { c.$field = self.$field; })* };
        }
        set_some!(
            http_listen,
            http_tls_certificate,
            http_tls_private_key,
            api_tokens_file,
            audit_log,
            public_url,
            http_peer_ca
        );
        c.validate()?;
        Ok(c)
    }
}

/// Exit codes scripts can use.
const EXIT_ERROR: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_UNREACHABLE: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (request, read) = match cli.command {
        Command::Run(args) => {
            return match args.into_config() {
                Ok(config) => match recorder::daemon::run_blocking(config) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("recorder: {e:#}");
                        ExitCode::from(EXIT_ERROR)
                    }
                },
                Err(e) => {
                    eprintln!("recorder: configuration: {e:#}");
                    ExitCode::from(EXIT_USAGE)
                }
            };
        }
        Command::Status(read) => (Request::Status, read),
        Command::Sessions(read) => (Request::Sessions, read),
        Command::Flows(read) => (Request::Flows, read),
        Command::Stop { id, read } => (Request::Stop { id }, read),
        Command::Recordings {
            call_uuid,
            aor,
            since,
            read,
        } => (
            Request::Recordings {
                call_uuid,
                aor,
                since,
            },
            read,
        ),
        Command::Show { id, read } => (Request::Show { id }, read),
        Command::Drain { resume, read } => (Request::Drain { resume }, read),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("recorder: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match runtime.block_on(control::call(&read.socket, &request)) {
        Ok(data) => {
            if read.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&data).unwrap_or_default()
                );
            } else {
                print!("{}", recorder::cli::render(&request, &data));
            }
            ExitCode::SUCCESS
        }
        Err(e @ (ControlError::Connect { .. } | ControlError::Timeout)) => {
            eprintln!("recorder: {e}");
            ExitCode::from(EXIT_UNREACHABLE)
        }
        Err(e) => {
            eprintln!("recorder: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}
