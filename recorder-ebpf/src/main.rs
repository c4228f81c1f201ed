//! The recorder's XDP program (see `xdp.rs`). On the host this file builds an empty binary so
//! that `cargo build --workspace` and clippy work without the BPF toolchain.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod xdp;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
