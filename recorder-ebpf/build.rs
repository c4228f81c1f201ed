// Rebuild the eBPF object when the linker changes (aya-template habit).
fn main() {
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("bpf-linker");
            if candidate.exists() {
                println!("cargo:rerun-if-changed={}", candidate.display());
                break;
            }
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
