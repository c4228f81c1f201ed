//! The `recorder` command line.
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
};

use clap::{Args, Parser, Subcommand};
use recorder::config::{Cidr, Config, LogFormat, PortRange};

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
    Run(RunArgs),
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
    /// Log level or tracing filter.
    #[arg(long)]
    log_level: Option<String>,
    /// Log format.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
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
            log_format
        );
        if self.media_address.is_some() {
            c.media_address = self.media_address;
        }
        if self.index.is_some() {
            c.index = self.index;
        }
        if self.metrics_listen.is_some() {
            c.metrics_listen = self.metrics_listen;
        }
        c.validate()?;
        Ok(c)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => args
            .into_config()
            .and_then(|config| recorder::daemon::run_blocking(config)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("recorder: {e:#}");
            ExitCode::FAILURE
        }
    }
}
