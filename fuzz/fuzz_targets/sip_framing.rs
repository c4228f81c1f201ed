//! SIP framing over a TCP byte stream: the frames must not depend on where the reads cut it,
//! and the connection's `Framer` (which keeps its scan position between reads) must frame like
//! the stateless `frame` over the whole stream, in time linear in the stream.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use recorder::sip::{frame, Framer, FramingError};

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
    let mut framer = Framer::default();
    let mut reads = 0u64;
    'reads: for read in stream.chunks(cut as usize + 1) {
        chunked.extend_from_slice(read);
        reads += 1;
        loop {
            match framer.frame(&mut chunked) {
                Ok(Some(message)) => in_reads.push(message),
                Ok(None) => break,
                Err(e) => {
                    chunked_result = Err(e);
                    break 'reads;
                }
            }
        }
    }
    assert!(
        framer.scanned() <= 3 * stream.len() as u64 + 2 * reads + 2 * in_reads.len() as u64,
        "framing work is not linear: {} for {} bytes",
        framer.scanned(),
        stream.len()
    );
    assert_eq!(at_once, in_reads, "frames depend on the read size");
    assert_eq!(whole_result, chunked_result);
    if whole_result.is_ok() {
        assert_eq!(whole, chunked, "different bytes left over");
    }
    let framed: usize = at_once.iter().map(Bytes::len).sum();
    assert!(framed + whole.len() <= stream.len(), "frames invent bytes");
});
