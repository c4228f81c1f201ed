//! Record layouts measured against the default one (see the README), kept so the numbers can be
//! reproduced: build with `RUSTFLAGS='--cfg recorder_layout="classes"'` (or `"perf"`). Neither is
//! part of the normal build.

#[allow(unused_imports)]
use super::*;

// Layout (b), measured only: fixed-size classes reserved in the ring, packet copied straight in.

#[cfg(recorder_layout = "classes")]
#[inline(always)]
pub(super) fn emit(ctx: &XdpContext, hdr: &RecordHeader) -> Result<(), EmitError> {
    let cap = hdr.cap_len;
    let idx = ring_index();
    // Each class is a constant reserve size (bpf_ringbuf_reserve needs a verifier constant);
    // the copy length is masked to the class so the verifier sees it fits.
    macro_rules! class {
        ($data:expr) => {{
            let f = |ring: &RingBuf| -> Result<(), EmitError> {
                let Some(mut e) = ring.reserve_bytes(RECORD_HEADER_LEN + $data, 0) else {
                    return Err(EmitError::RingFull);
                };
                let len = (cap.wrapping_sub(1) & ($data as u32 - 1)) + 1;
                let p = e.as_mut_ptr();
                // SAFETY: the reservation holds RECORD_HEADER_LEN + $data bytes, len <= $data.
                let rc = unsafe {
                    core::ptr::write_unaligned(p.cast::<RecordHeader>(), *hdr);
                    bpf_xdp_load_bytes(ctx.ctx, 0, p.add(RECORD_HEADER_LEN).cast(), len)
                };
                if rc != 0 {
                    e.discard(0);
                    return Err(EmitError::CopyFailed);
                }
                e.submit(0);
                Ok(())
            };
            with_ring!(idx, f)
        }};
    }
    if cap <= 256 {
        class!(256usize)
    } else if cap <= 512 {
        class!(512usize)
    } else if cap <= 1024 {
        class!(1024usize)
    } else {
        class!(2048usize)
    }
}

// ---------------------------------------------------------------------------------------------
// Layout (c), measured only: perf event array, the kernel appends cap_len packet bytes.

#[cfg(recorder_layout = "perf")]
#[map]
static EVENTS: aya_ebpf::maps::PerfEventArray<RecordHeader> =
    aya_ebpf::maps::PerfEventArray::new(0);

#[cfg(recorder_layout = "perf")]
#[inline(always)]
pub(super) fn emit(ctx: &XdpContext, hdr: &RecordHeader) -> Result<(), EmitError> {
    use aya_ebpf::{bindings::BPF_F_CURRENT_CPU, helpers::generated::bpf_perf_event_output};
    let flags = (u64::from(hdr.cap_len) << 32) | u64::from(BPF_F_CURRENT_CPU as u32);
    // SAFETY: EVENTS is a map definition; the header lives on the stack for the call.
    let rc = unsafe {
        bpf_perf_event_output(
            ctx.ctx.cast(),
            core::ptr::from_ref(&EVENTS).cast_mut().cast(),
            flags,
            core::ptr::from_ref(hdr).cast_mut().cast(),
            RECORD_HEADER_LEN as u64,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(EmitError::RingFull)
    }
}
