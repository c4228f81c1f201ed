//! Embeds the XDP object built by `cargo xtask build` (or `cargo xtask build-ebpf`).
//!
//! The object is looked up at `$RECORDER_EBPF_OBJECT`, else at
//! `<workspace>/target/bpfel-unknown-none/release/recorder-xdp`. When it is missing an empty
//! stub is embedded instead, so `cargo check`/`clippy` work without the BPF toolchain; the loader
//! then fails with a clear "object not built" error.
use std::{env, fs, path::PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let default = manifest.join("../target/bpfel-unknown-none/release/recorder-xdp");
    let object = env::var_os("RECORDER_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or(default);
    println!("cargo:rerun-if-env-changed=RECORDER_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("recorder-xdp.o");
    match fs::read(&object) {
        Ok(bytes) => fs::write(&out, bytes).unwrap(),
        Err(_) => {
            println!(
                "cargo:warning=eBPF object {} not found; embedding an empty stub (run `cargo xtask build`)",
                object.display()
            );
            fs::write(&out, []).unwrap();
        }
    }
}
