//! `cargo xtask <command>`: setup, build, test, demo and bench for the recorder.
//!
//! Everything a fresh Debian machine needs is installed by `setup` (which `test` and `demo` run
//! first), so the README's two commands work after nothing but a clone.

mod bench;
mod fuzz;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "xtask", about = "Developer tasks for the recorder")]
enum Cli {
    /// Install what building and testing need (Debian packages, rust-src, bpf-linker); idempotent.
    Setup,
    /// Build the eBPF object and the userspace binary (release).
    Build,
    /// Build only the eBPF object.
    BuildEbpf,
    /// Setup if needed, build, then run every test, including the privileged ones, every fuzz
    /// target for 30 s and the quick media bench (200 calls with RTP, zero loss asserted); the
    /// last two are skipped with test arguments.
    Test {
        /// Extra arguments passed to `cargo test` (e.g. a test name filter after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup, build, then run the demo: a recorded call on a veth pair.
    Demo,
    /// Lint: rustfmt check and clippy with warnings denied.
    Lint,
    /// Run the cargo-fuzz targets in `fuzz/` (libFuzzer, nightly) one after another.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Only this target (default: every one).
        target: Option<String>,
    },
    /// Setup, build, then benchmark the data path against a no-op XDP ceiling, tcpdump and a
    /// UDP-socket recorder, SIPREC sessions (rate, held) with SIPp against the daemon, and calls
    /// with RTP (writes target/bench/report.{md,json} and loss.png).
    Bench {
        /// A short sweep (under two minutes) for checking a change.
        #[arg(long)]
        quick: bool,
        /// Run only one part: `datapath` (trafgen contenders, rewrites), `sip` (SIPp sessions),
        /// `media` (SIPREC calls with RTP) or `index` (searches over 1 000 000 index rows).
        #[arg(long, value_enum)]
        only: Option<bench::Part>,
        #[command(flatten)]
        select: bench::Select,
    },
}

fn main() -> Result<()> {
    match Cli::parse() {
        Cli::Setup => setup::setup(),
        Cli::Build => {
            build_ebpf()?;
            build_user()
        }
        Cli::BuildEbpf => build_ebpf(),
        Cli::Test { args } => {
            setup::setup()?;
            build_ebpf()?;
            let tests = test(&args);
            // The fuzzing, the quick media bench (200 calls with RTP against the release daemon,
            // zero loss asserted) and the quick faults after the cargo tests, whatever they
            // gave, so that one run shows every problem. Skipped when the tests are narrowed.
            if !args.is_empty() {
                eprintln!("xtask test: test arguments given, skipping the fuzzing, media and faults checks");
                return tests;
            }
            // Every fuzz target for 30 s from its committed seeds (a crash fails the run), then
            // the quick faults (200 live calls through kill -9, a full spool, a detach restart
            // and a SIP flood, every file checked).
            let fuzzing = fuzz::fuzz(30, None).map_err(|e| e.context("fuzzing (cargo xtask fuzz)"));
            let media = bench::media_check()
                .map_err(|e| e.context("media check (cargo xtask bench --quick --only media)"));
            let faults = bench::faults_check()
                .map_err(|e| e.context("faults check (cargo xtask bench --quick --faults)"));
            let failures: Vec<anyhow::Error> = [tests, fuzzing, media, faults]
                .into_iter()
                .filter_map(Result::err)
                .collect();
            match failures.len() {
                0 => Ok(()),
                1 => Err(failures.into_iter().next().expect("one")),
                _ => {
                    let all: Vec<String> = failures.iter().map(|e| format!("{e:#}")).collect();
                    Err(anyhow::anyhow!("{}", all.join("\nand: ")))
                }
            }
        }
        Cli::Demo => {
            setup::setup()?;
            build_ebpf()?;
            build_user()?;
            demo()
        }
        Cli::Lint => lint(),
        Cli::Fuzz { seconds, target } => fuzz::fuzz(seconds, target.as_deref()),
        Cli::Bench {
            quick,
            only,
            select,
        } => {
            setup::setup()?;
            build_ebpf()?;
            build_user()?;
            bench::run(quick, only, &select)
        }
    }
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// Path of the eBPF object `build_ebpf` produces.
pub fn ebpf_object() -> PathBuf {
    workspace_root().join("target/bpfel-unknown-none/release/recorder-xdp")
}

/// A cargo command for `toolchain` (default: the one running xtask, else `stable`).
///
/// The toolchain is always named through `RUSTUP_TOOLCHAIN`: without it, the rustup `rustc`
/// proxy honours `rust-toolchain` files it finds in the directory cargo compiles a crate in,
/// and some registry crates ship one naming a toolchain this machine does not have.
pub(crate) fn cargo(toolchain: Option<&str>) -> Command {
    let toolchain = toolchain
        .map(str::to_string)
        .unwrap_or_else(|| std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".into()));
    let mut cmd = Command::new("rustup");
    cmd.args(["run", &toolchain, "cargo"]);
    // Settings of the outer cargo that would leak into the inner build.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("RUSTUP_TOOLCHAIN", &toolchain);
    cmd.current_dir(workspace_root());
    cmd.env("RECORDER_EBPF_OBJECT", ebpf_object());
    cmd
}

/// Runs a command, failing with its description when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn build_ebpf() -> Result<()> {
    run(cargo(Some("nightly")).args([
        "build",
        "--package",
        "recorder-ebpf",
        "--bin",
        "recorder-xdp",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--release",
    ]))
    .context(
        "building the eBPF object (run `cargo xtask setup` if bpf-linker or rust-src is missing)",
    )
}

fn build_user() -> Result<()> {
    run(cargo(None).args(["build", "--release", "--package", "recorder-user"]))
}

fn test(args: &[String]) -> Result<()> {
    // The end-to-end tests run the real daemon binary (target/debug/recorder).
    run(cargo(None).args(["build", "--package", "recorder-user", "--bins"]))?;
    let mut cmd = cargo(None);
    // Every suite runs even after a failure, so one run shows every problem.
    cmd.args(["test", "--workspace", "--no-fail-fast"])
        .args(args);
    run(&mut cmd)
}

fn lint() -> Result<()> {
    run(cargo(None).args(["fmt", "--all", "--", "--check"]))?;
    run(cargo(None).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // Broken intra-doc links and stray HTML in doc comments, as rustdoc sees them.
    run(cargo(None)
        .env("RUSTDOCFLAGS", "-D warnings")
        .args(["doc", "--no-deps", "--workspace"]))
}

fn demo() -> Result<()> {
    // The demo driver (namespaces, SIPREC client, RTP) lives with the end-to-end test helpers.
    run(cargo(None)
        .env(
            "RECORDER_BIN",
            workspace_root().join("target/release/recorder"),
        )
        .args(["run", "--release", "--package", "tests", "--bin", "demo"]))
}
