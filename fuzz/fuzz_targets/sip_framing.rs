//! SIP framing over a TCP byte stream: the frames must not depend on where the reads cut it.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use recorder::sip::{frame, FramingError};

/// Frames until the stream needs more bytes or cannot be framed any further.
fn drain(buf: &mut BytesMut, out: &mut Vec<Bytes>) -> Result<(), FramingError> {
    while let Some(message) = frame(buf)? {
        out.push(message);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    // First byte: the read size of the chunked feed (1..=256).
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let mut whole = BytesMut::from(stream);
    let mut at_once = Vec::new();
    let whole_result = drain(&mut whole, &mut at_once);

    let mut chunked = BytesMut::new();
    let mut in_reads = Vec::new();
    let mut chunked_result = Ok(());
    for read in stream.chunks(cut as usize + 1) {
        chunked.extend_from_slice(read);
        chunked_result = drain(&mut chunked, &mut in_reads);
        if chunked_result.is_err() {
            break;
        }
    }
    assert_eq!(at_once, in_reads, "frames depend on the read size");
    assert_eq!(whole_result, chunked_result);
    if whole_result.is_ok() {
        assert_eq!(whole, chunked, "different bytes left over");
    }
    let framed: usize = at_once.iter().map(Bytes::len).sum();
    assert!(framed + whole.len() <= stream.len(), "frames invent bytes");
});
