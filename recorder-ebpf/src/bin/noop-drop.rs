//! Benchmark ceiling: an XDP program that drops every frame without reading it. `cargo xtask
//! bench` compares the recorder against it (the most the sender and the veth pair can deliver).
//! On the host this builds an empty binary, like `recorder-xdp`.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::{bindings::xdp_action::XDP_DROP, macros::xdp, programs::XdpContext};

    #[panic_handler]
    fn panic(_: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

    #[xdp]
    pub fn noop_drop(_ctx: XdpContext) -> u32 {
        XDP_DROP
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
