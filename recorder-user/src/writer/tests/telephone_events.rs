//! RFC 4733 telephone events.

use super::*;

fn dtmf_frame(seq: u16, ts: u32, ssrc: u32, event: u8, end: bool, duration: u16) -> (Vec<u8>, u16) {
    let flags = if end { 0x80 } else { 0 } | 10; // volume -10 dBm0
    let d = duration.to_be_bytes();
    udp_frame(40000, &rtp(101, seq, ts, ssrc, &[event, flags, d[0], d[1]]))
}

#[test]
fn dtmf_events_are_listed_once_and_keep_the_audio_channel_silent() {
    let dir = TempDir::new("dtmf");
    let (h, mut sink) = start_writer(dir.path());
    h.event(started("r1", two_streams(), "u"));
    let mut a = Sender::new(1, 40000, 0, 0x77, 1, 5000);
    let ta = tone(440.0, 10000.0);
    // 1 s of tone, then digit 5 (160 ms, end sent 3 times), then `#` (80 ms), then tone again.
    for k in 0..50u64 {
        a.send(&mut sink, k * 160, 0, &ta);
    }
    let mut seq = a.seq;
    let mut dtmf = |sink: &mut WriterSink, n: u64, event: u8, end: bool, dur: u16, ms: i64| {
        let (f, off) = dtmf_frame(seq, 5000 + n as u32, 0x77, event, end, dur);
        seq = seq.wrapping_add(1);
        feed(sink, 1, at_ms(ms), &f, off);
    };
    for (i, dur) in [160u16, 320, 480, 640, 800, 960, 1120]
        .into_iter()
        .enumerate()
    {
        dtmf(&mut sink, 8000, 5, false, dur, 1000 + 20 * i as i64);
    }
    for r in 0..3 {
        dtmf(&mut sink, 8000, 5, true, 1280, 1140 + 20 * r);
    }
    dtmf(&mut sink, 9600, 11, false, 320, 1200);
    for r in 0..3 {
        dtmf(&mut sink, 9600, 11, true, 640, 1240 + 20 * r);
    }
    // A payload too short to be an event.
    let (f, off) = udp_frame(40000, &rtp(101, seq, 5000 + 9600, 0x77, &[1, 2]));
    feed(&mut sink, 1, at_ms(1300), &f, off);
    a.seq = seq.wrapping_add(1);
    for k in 70..100u64 {
        a.send(&mut sink, k * 160, 0, &ta);
    }
    h.event(ended("r1", 2000));
    h.sync();

    let m = RecordingMetadata::read(&dir.path().join("r1")).unwrap();
    let events = &m.streams[0].dtmf;
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(
        (
            events[0].digit.as_str(),
            events[0].event,
            events[0].duration_ms
        ),
        ("5", 5, 160)
    );
    assert!(events[0].ended);
    assert_eq!(events[0].offset_ms, 1000);
    assert_eq!(events[0].rtp_timestamp, 5000 + 8000);
    assert_eq!(events[0].volume, 10);
    assert_eq!(
        (
            events[1].digit.as_str(),
            events[1].duration_ms,
            events[1].ended
        ),
        ("#", 80, true)
    );
    assert_eq!(events[1].offset_ms, 1200);
    assert!(m.streams[1].dtmf.is_empty());
    assert_eq!(m.dropped.malformed, 1, "the short event payload");
    assert_eq!(m.dropped.not_decoded, 0, "events are not codec failures");
    assert_eq!(m.streams[0].packets, 50 + 14 + 1 + 30);

    // The WAV: tone before and after, silence while the digits were sent (1.0-1.4 s).
    let (_, _, c) = read_wav(&dir.path().join("r1").join(WAV_FILE));
    let part = |from: usize, to: usize| c[0][from..to].to_vec();
    assert!(rms(&part(800, 7900)) > 5000.0);
    assert_eq!(
        rms(&part(8000, 11_200)),
        0.0,
        "no audio decoded from events"
    );
    assert!(rms(&part(11_300, 15_900)) > 5000.0);
    h.shutdown();
}

#[test]
fn dtmf_digits_and_short_payloads() {
    let digits: Vec<String> = [0u8, 9, 10, 11, 12, 15, 16, 40]
        .into_iter()
        .map(dtmf::digit)
        .collect();
    assert_eq!(digits, ["0", "9", "*", "#", "A", "D", "flash", "event-40"]);
    assert_eq!(dtmf::parse(&[1, 2, 3]), None);
    let p = dtmf::parse(&[3, 0x8a, 0x01, 0x40, 0xff]).unwrap();
    assert_eq!((p.event, p.end, p.volume, p.duration), (3, true, 10, 320));
}
