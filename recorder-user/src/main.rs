//! The `recorder` command line.
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "recorder",
    version,
    about = "SIPREC call recorder with XDP capture"
)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
