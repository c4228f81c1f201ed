//! Shared helpers for the end-to-end tests: network namespaces, veth pairs, traffic.
pub mod client;
pub mod daemon;
pub mod kamailio;
pub mod net;
pub mod packets;
pub mod postgres;
pub mod rtp;

use std::path::PathBuf;

/// The XDP object built by `cargo xtask build`: `$RECORDER_EBPF_OBJECT`, else
/// `<workspace>/target/bpfel-unknown-none/release/recorder-xdp`.
///
/// # Panics
/// If the file cannot be read (tests cannot do anything useful without it).
pub fn ebpf_object() -> Vec<u8> {
    let path = std::env::var_os("RECORDER_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/bpfel-unknown-none/release/recorder-xdp")
        });
    match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) => panic!(
            "cannot read the eBPF object {}: {e}; run `cargo xtask build` first \
             (or set RECORDER_EBPF_OBJECT)",
            path.display()
        ),
    }
}
