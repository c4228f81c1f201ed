//! SRTP streams and codecs beyond G.711.

use super::*;

/// An SRTP stream across the sequence wrap and a handover: the rollover counter goes with the
/// handover (else every packet after the resume fails authentication), a tampered packet is
/// counted and not decoded, the tone fills the channel, and the key stays out of metadata.json.
#[test]
fn srtp_stream_is_decrypted_across_the_wrap_and_a_handover() {
    use crate::media::srtp::tests::{crypto, rtp as srtp_rtp, sender};
    let dir = TempDir::new("srtp");
    let mut config = indexed_writer_config(dir.path());
    config.index = None;
    let rec = config.spool.join("s1");
    let key: Vec<u8> = (0..30).map(|i| i * 7 + 1).collect();
    let c = crypto("AES_CM_128_HMAC_SHA1_32", &key, "");
    let mut info = stream(0, "caller", 1, "PCMU", 0, 40000);
    info.srtp = true;
    info.sdes = Some(c.clone());
    let (h, mut sink) = start(config.clone()).unwrap();
    h.event(started("s1", vec![info], "uuid-s"));
    let mut tx = sender(&c);
    let tone = tone(440.0, 8000.0);
    let mut send = |sink: &mut WriterSink, k: u16, tamper: bool| {
        let payload: Vec<u8> = (0..160)
            .map(|i| encode::ulaw(tone(u64::from(k) * 160 + i)))
            .collect();
        let plain = srtp_rtp(
            65_500u16.wrapping_add(k),
            u32::from(k) * 160,
            0x51,
            &payload,
        );
        let mut p = tx.rtp_protect(plain).unwrap();
        if tamper {
            p[30] ^= 1;
        }
        let (f, off) = udp_frame(40000, &p);
        feed(sink, 1, at_ms(i64::from(k) * 20), &f, off);
    };
    for k in 0..100 {
        send(&mut sink, k, k == 50);
    }
    let handover = h.handover().expect("handover");
    drop(sink);
    let json = serde_json::to_string(&handover).unwrap();
    let handover: WriterHandover = serde_json::from_str(&json).unwrap();
    let (h, mut sink) = start_resumed(config, handover).expect("resume");
    for k in 100..200 {
        send(&mut sink, k, false);
    }
    h.event(ended("s1", 4000));
    h.sync();
    let m = RecordingMetadata::read(&rec).unwrap();
    let s = &m.streams[0];
    assert_eq!(
        (s.packets, s.decode.decoded_packets, s.decode.auth_failures),
        (200, 199, 1)
    );
    assert_eq!(
        s.decode.srtp_suite.as_deref(),
        Some("AES_CM_128_HMAC_SHA1_32")
    );
    assert!(s.decoded);
    let text = std::fs::read_to_string(rec.join(METADATA_FILE)).unwrap();
    let b64 = crate::media::sdes::base64_encode(&key);
    assert!(!text.contains(&b64) && !text.contains("key_salt"), "{text}");
    let (_, rate, c) = read_wav(&rec.join(WAV_FILE));
    assert_eq!(rate, 8000);
    // Every 20 ms window carries the tone but the tampered packet's, which stays silent.
    let silent: Vec<usize> = c[0][..32000]
        .chunks(160)
        .enumerate()
        .filter(|(_, w)| goertzel(w, 440.0) < rms(w).powi(2) / 4.0 || rms(w) < 1000.0)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(silent, vec![50]);
    h.shutdown();
}

/// A G.722 stream makes a 16 kHz WAV; the PCMU stream beside it is resampled to it.
#[test]
fn g722_sets_the_wav_rate_and_pcmu_is_resampled() {
    let dir = TempDir::new("g722");
    let (h, mut sink) = start_writer(dir.path());
    let mut s = two_streams();
    s[1] = stream(1, "callee", 2, "G722", 9, 40002);
    h.event(started("g1", s, "u"));
    let mut enc = ezk_g722::libg722::encoder::Encoder::new(
        ezk_g722::libg722::Bitrate::Mode1_64000,
        false,
        false,
    );
    let low = tone(440.0, 8000.0);
    for k in 0..100u64 {
        let pcmu: Vec<u8> = (0..160).map(|i| encode::ulaw(low(k * 160 + i))).collect();
        // 16 kHz input: the 8 kHz tone function at half steps.
        let wide: Vec<i16> = (0..320)
            .map(|i| {
                let t = (k * 320 + i) as f64 / 16000.0;
                (8000.0 * (2.0 * std::f64::consts::PI * 1000.0 * t).sin()) as i16
            })
            .collect();
        let g = enc.encode(&wide);
        let (f, off) = udp_frame(40000, &rtp(0, k as u16, k as u32 * 160, 0xA, &pcmu));
        feed(&mut sink, 1, at_ms(k as i64 * 20), &f, off);
        // RFC 3551: G.722's RTP clock runs at 8000 although it carries 16 kHz audio.
        let (f, off) = udp_frame(40002, &rtp(9, k as u16, k as u32 * 160, 0xB, &g));
        feed(&mut sink, 2, at_ms(k as i64 * 20), &f, off);
    }
    h.event(ended("g1", 2000));
    h.sync();
    let rec = dir.path().join("g1");
    let (ch, rate, c) = read_wav(&rec.join(WAV_FILE));
    assert_eq!((ch, rate, c[0].len()), (2, 16000, 32000));
    let m = RecordingMetadata::read(&rec).unwrap();
    assert_eq!(m.wav.sample_rate, 16000);
    assert_eq!(
        (
            m.streams[0].decode.sample_rate,
            m.streams[1].decode.sample_rate
        ),
        (Some(8000), Some(16000))
    );
    assert_eq!(m.streams[1].clock_rate, 8000);
    let share = |x: &[i16], f: f64| {
        // goertzel() assumes 8 kHz: at 16 kHz, f Hz sits where f/2 does at 8 kHz.
        goertzel(x, f / 2.0) / (rms(x).powi(2) / 4.0).max(1.0)
    };
    for w in 1..49 {
        let (a, b) = (&c[0][w * 640..(w + 1) * 640], &c[1][w * 640..(w + 1) * 640]);
        assert!(share(a, 440.0) > 0.8, "window {w}: PCMU tone resampled");
        assert!(share(b, 1000.0) > 0.8, "window {w}: G.722 tone");
        assert!(
            share(a, 1000.0) < 0.1 && share(b, 440.0) < 0.1,
            "window {w}"
        );
    }
    h.shutdown();
}

/// A re-INVITE moving an Opus stream to another dynamic payload type: packets still sent with
/// the old type after it are decoded as before, and the timeline goes on.
#[test]
fn dynamic_payload_type_change_keeps_decoding_both_types() {
    use audiopus::{coder::Encoder, Application, Channels, SampleRate};
    let dir = TempDir::new("dynpt");
    let (h, mut sink) = start_writer(dir.path());
    let opus = |pt: u8| Codec {
        payload_type: pt,
        name: "opus".into(),
        clock_rate: 48000,
        channels: 2,
        fmtp: None,
    };
    let mut info = stream(0, "caller", 1, "opus", 111, 40000);
    info.codec = opus(111);
    h.event(started("d1", vec![info.clone()], "u"));
    let enc = Encoder::new(SampleRate::Hz48000, Channels::Mono, Application::Voip).unwrap();
    let mut buf = [0u8; 1500];
    let mut send = |sink: &mut WriterSink, k: u32, pt: u8| {
        let pcm: Vec<i16> = (0..960)
            .map(|i| {
                let t = f64::from(k * 960 + i) / 48000.0;
                (8000.0 * (2.0 * std::f64::consts::PI * 500.0 * t).sin()) as i16
            })
            .collect();
        let n = enc.encode(&pcm, &mut buf[..]).unwrap();
        let (f, off) = udp_frame(40000, &rtp(pt, k as u16, k * 960, 0xD, &buf[..n]));
        feed(sink, 1, at_ms(i64::from(k) * 20), &f, off);
    };
    for k in 0..50 {
        send(&mut sink, k, 111);
    }
    info.codec = opus(96);
    h.event(SessionEvent::MediaChanged {
        id: "d1".into(),
        at: at_ms(1000),
        streams: vec![info],
    });
    for k in 50..52 {
        send(&mut sink, k, 111); // sent before the client switched
    }
    for k in 52..100 {
        send(&mut sink, k, 96);
    }
    h.event(ended("d1", 2000));
    h.sync();
    let rec = dir.path().join("d1");
    let m = RecordingMetadata::read(&rec).unwrap();
    assert_eq!(
        (m.streams[0].decode.decoded_packets, m.dropped.not_decoded),
        (100, 0)
    );
    assert_eq!(m.streams[0].payload_type, 96);
    let (_, rate, c) = read_wav(&rec.join(WAV_FILE));
    assert_eq!((rate, c[0].len()), (48000, 96000));
    // goertzel() assumes 8 kHz: at 48 kHz, 500 Hz sits where 500/6 Hz does.
    for w in 1..99 {
        let x = &c[0][w * 960..(w + 1) * 960];
        assert!(
            goertzel(x, 500.0 / 6.0) > rms(x).powi(2) / 4.0 * 0.8,
            "window {w} lacks the tone"
        );
    }
    h.shutdown();
}
