//! `cargo xtask setup`: installs what building and testing need, skipping what is present.
//!
//! * Debian packages (iproute2, trafgen, SIPp, tshark, tcpdump, bpftool, sox, espeak-ng, ...).
//! * `rust-src` for the nightly toolchain (the eBPF crate is built with `-Z build-std=core`).
//! * `bpf-linker` built against the nightly's own libLLVM, so both use the same LLVM: the LLVM
//!   major is read from `rustc +nightly -vV`, `<prefix>/lib` gets symlinks to the sysroot's
//!   libLLVM (the binary's RUNPATH points there), then `cargo install bpf-linker` with
//!   `LLVM_PREFIX=<prefix>`. A stamp file records which LLVM the installed linker was built for.
//! * `cargo-fuzz` (`cargo xtask fuzz`, and the fuzzing in `cargo xtask test`), from crates.io.
//! * bpffs mounted on /sys/fs/bpf.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::run;

/// Debian packages the build, tests, demo and bench use.
const PACKAGES: &[&str] = &[
    "iproute2",
    "netsniff-ng",
    "sip-tester",
    // Codecs the writer decodes into the WAV: Opus (found through pkg-config) and G.729.
    "pkg-config",
    "libopus-dev",
    "libbcg729-dev",
    // The independent RTP/SRTP sender of the SRTP and codec tests.
    "ffmpeg",
    // libsrtp as a second independent SRTP sender (GCM suites, rollover counter).
    "python3-pylibsrtp",
    "tshark",
    "tcpdump",
    "bpftool",
    "sox",
    "espeak-ng",
    "ethtool",
    "procps",
    "util-linux",
    // The bench's spool: a dedicated ext4 filesystem (mkfs.ext4 on a loop device).
    "e2fsprogs",
    // A real PostgreSQL server for the shared-index tests (initdb + pg_ctl in a temp dir).
    "postgresql",
    // The console test's browser (headless), driven over WebDriver so the test waits for the
    // page to finish (media loading included) instead of a virtual-time budget.
    "chromium",
    "chromium-driver",
    // The SIP load balancer (dispatcher module) in front of several recorders.
    "kamailio",
    // The bench chart's font.
    "fonts-dejavu-core",
    // The bench's profile of the recorder (perf record/report).
    "linux-perf",
];

pub fn setup() -> Result<()> {
    install_packages()?;
    install_rust_src()?;
    install_bpf_linker()?;
    install_cargo_fuzz()?;
    mount_bpffs()?;
    println!("setup: done");
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn package_installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn install_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !package_installed(p))
        .collect();
    if missing.is_empty() {
        println!("setup: Debian packages present");
        return Ok(());
    }
    println!("setup: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing))
}

fn install_rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("setup: rust-src (nightly) present");
        return Ok(());
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// The LLVM major version of the nightly toolchain (`LLVM version: 22.1.4` -> 22).
fn nightly_llvm_major() -> Result<u32> {
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let version = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` printed no LLVM version")?;
    version
        .split('.')
        .next()
        .and_then(|m| m.trim().parse().ok())
        .with_context(|| format!("unexpected LLVM version {version:?}"))
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
        })
}

fn install_bpf_linker() -> Result<()> {
    let major = nightly_llvm_major()?;
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let sysroot_lib = Path::new(sysroot.trim()).join("lib");
    let prefix = PathBuf::from(
        std::env::var("RECORDER_TOOLS_DIR").unwrap_or_else(|_| "/opt/recorder".into()),
    )
    .join(format!("llvm-{major}"));
    let stamp = prefix.join("bpf-linker.stamp");
    let linker = cargo_home().join("bin/bpf-linker");
    let wanted_stamp = format!("llvm-{major} {}\n", sysroot.trim());

    let works = Command::new(&linker)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if works && fs::read_to_string(&stamp).ok().as_deref() == Some(wanted_stamp.as_str()) {
        println!("setup: bpf-linker (LLVM {major}) present");
        return Ok(());
    }

    // The versioned libLLVM shipped with the nightly, e.g. libLLVM.so.22.1-rust-1.97.0-nightly.
    let versioned = fs::read_dir(&sysroot_lib)
        .with_context(|| format!("reading {}", sysroot_lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with(&format!("libLLVM.so.{major}")))
        .with_context(|| format!("no libLLVM.so.{major}* in {}", sysroot_lib.display()))?;
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    for name in ["libLLVM.so", versioned.as_str()] {
        let link = lib.join(name);
        let _ = fs::remove_file(&link);
        symlink(sysroot_lib.join(&versioned), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    println!("setup: building bpf-linker against {versioned} (takes a few minutes)");
    run(Command::new("cargo")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env("LLVM_PREFIX", &prefix)
        .args([
            "+nightly",
            "install",
            "--force",
            "bpf-linker",
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ]))?;
    run(Command::new(&linker).arg("--version")).context("bpf-linker does not run on its own")?;
    fs::write(&stamp, wanted_stamp)?;
    Ok(())
}

/// Pinned: a newer cargo-fuzz may need a newer rustc than the stable toolchain here (1.95
/// builds this one).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

fn install_cargo_fuzz() -> Result<()> {
    let installed =
        output(Command::new(cargo_home().join("bin/cargo-fuzz")).args(["fuzz", "--version"]))
            .unwrap_or_default();
    if installed.split_whitespace().nth(1) == Some(CARGO_FUZZ_VERSION) {
        println!("setup: cargo-fuzz {CARGO_FUZZ_VERSION} present");
        return Ok(());
    }
    println!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    run(Command::new("cargo").env_remove("RUSTUP_TOOLCHAIN").args([
        "+stable",
        "install",
        "--locked",
        "--force",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
}

fn mount_bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        return Ok(());
    }
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}
