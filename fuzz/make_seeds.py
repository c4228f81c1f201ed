#!/usr/bin/env python3
"""Writes fuzz/seeds/<target>/ from the test suite's inputs: the string literals of the unit and
end-to-end tests (SIP messages, SDP, multipart bodies, RFC 7865 documents, a=crypto values,
TOML configs; the interop shapes of Cisco CUBE, Oracle/Acme, AudioCodes, Genesys, Avaya and the
RFC 7866 examples among them), framed the way each target reads its input, plus packets built
here as the tests build them (RTP, RTCP, ring records). The handover seeds come from the unit
test `handover_seed_for_the_fuzzer` (RECORDER_FUZZ_SEEDS=fuzz/seeds/handover_file).

Run from the repository root: python3 fuzz/make_seeds.py. Seeds are named by content, so a
rerun adds only what is new.
"""

import glob
import hashlib
import os
import re
import struct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = os.path.join(ROOT, "fuzz", "seeds")


def literals(text):
    """The string literals of Rust source, unescaped, as bytes."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            i = text.find("\n", i)
            i = n if i < 0 else i
        elif text.startswith("/*", i):
            i = text.find("*/", i + 2)
            i = n if i < 0 else i + 2
        elif c == "'" and re.match(r"'(\\.|\\x..|\\u\{[0-9a-fA-F]+\}|[^'\\])'", text[i:i + 12]):
            i += re.match(r"'(\\.|\\x..|\\u\{[0-9a-fA-F]+\}|[^'\\])'", text[i:i + 12]).end()
        elif re.match(r'b?r#*"', text[i:i + 8]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'b?r(#*)"', text[i:])
            close = '"' + m.group(1)
            j = text.find(close, i + m.end())
            j = n if j < 0 else j
            out.append(text[i + m.end():j].encode())
            i = j + len(close)
        elif c == '"':
            j, buf = i + 1, bytearray()
            while j < n and text[j] != '"':
                if text[j] == "\\":
                    e = text[j + 1]
                    if e == "\n":
                        j += 2
                        while j < n and text[j] in " \t\n\r":
                            j += 1
                        continue
                    simple = {"n": b"\n", "r": b"\r", "t": b"\t", "\\": b"\\", '"': b'"', "'": b"'", "0": b"\0"}
                    if e in simple:
                        buf += simple[e]
                        j += 2
                    elif e == "x":
                        buf.append(int(text[j + 2:j + 4], 16))
                        j += 4
                    elif e == "u":
                        k = text.find("}", j)
                        buf += chr(int(text[j + 3:k], 16)).encode()
                        j = k + 1
                    else:
                        buf += e.encode()
                        j += 2
                else:
                    buf += text[j].encode()
                    j += 1
            out.append(bytes(buf))
            i = j + 1
        else:
            i += 1
    return out


def save(target, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()[:16]
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def sources():
    files = glob.glob(os.path.join(ROOT, "recorder-user/src/**/*.rs"), recursive=True)
    files += glob.glob(os.path.join(ROOT, "tests/**/*.rs"), recursive=True)
    return sorted(files)


def crlf(b):
    return b.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def sdp_of(lit):
    start = lit.find(b"v=0")
    end = lit.find(b"\n--", start)
    return lit[start:] if end < 0 else lit[start:end + 1]


def xml_of(lit):
    start = lit.find(b"<?xml")
    if start < 0:
        start = lit.find(b"<recording")
    end = lit.find(b"</recording>", start)
    return lit[start:] if end < 0 else lit[start:end + len(b"</recording>")]


def boundary_of(lit):
    m = re.search(rb"(?m)^--([!-~]+?)\r?$", lit)
    return m.group(1) if m else None


def invite(body, content_type, method=b"INVITE", tag=None, cseq=1, extra=b""):
    to = b"<sip:srs@10.20.0.50>" + (b";tag=" + tag if tag else b"")
    head = (method + b" sip:srs@10.20.0.50:5060 SIP/2.0\r\nVia: SIP/2.0/TCP 10.20.0.10:5060;branch=z9hG4bK-"
            + str(cseq).encode() + method.lower() + b"\r\nMax-Forwards: 70\r\nFrom: <sip:src@sbc1.cc.example>;tag=src1\r\n"
            + b"To: " + to + b"\r\nCall-ID: fuzz-call-1\r\nCSeq: " + str(cseq).encode() + b" "
            + (b"INVITE" if method == b"ACK" else method) + b"\r\nContact: <sip:src@10.20.0.10:5060>;+sip.src\r\n"
            + b"Require: siprec\r\n" + extra)
    if body is None:
        return head + b"Content-Length: 0\r\n\r\n"
    return head + b"Content-Type: " + content_type + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body


def sip_seeds(lits):
    bodies = []
    for lit in lits:
        if re.match(rb"^[A-Z]+ sip:|^SIP/2\.0 \d", lit) and b"\n" in lit:
            for t in ("sip_framing",):
                save(t, b"\x00" + lit)
                save(t, b"\x07" + crlf(lit))
            save("sip_message", b"\x00" + lit)
            save("sip_message", b"\x01" + crlf(lit))
        b = boundary_of(lit)
        if b and (b"application/sdp" in lit or b"rs-metadata" in lit):
            ct = b"multipart/mixed;boundary=" + b
            save("multipart_body", ct + b"\n" + lit)
            bodies.append((ct, lit))
    # Whole dialogs around the bodies the tests hold: INVITE, ACK, re-INVITE, UPDATE, BYE.
    for ct, body in bodies:
        dialog = [
            invite(body, ct),
            invite(None, None, b"ACK", b"@TAG@", 1),
            invite(body, ct, b"INVITE", b"@TAG@", 2),
            invite(None, None, b"ACK", b"@TAG@", 2),
            invite(body, ct, b"UPDATE", b"@TAG@", 3),
            invite(None, None, b"BYE", b"@TAG@", 4),
        ]
        save("sip_message", b"\x01" + b"\x00".join(dialog))
        save("sip_message", b"\x00" + b"\x00".join(dialog))
        save("sip_framing", b"\x40" + b"".join(dialog))


def main():
    lits = []
    for path in sources():
        with open(path, encoding="utf-8") as f:
            lits += literals(f.read())
    sip_seeds(lits)
    for lit in lits:
        if b"v=0" in lit and b"m=" in lit:
            sdp = sdp_of(lit)
            save("sdp_offer_answer", sdp)
            save("sdp_offer_answer", crlf(sdp))
        if b"<recording" in lit:
            save("metadata", xml_of(lit))
        if re.match(rb"^\d+ [A-Z0-9_]+ inline:", lit):
            srtp_seeds(lit)
        for m in re.finditer(rb"(?m)^a=crypto:(\d+ [A-Z0-9_]+ inline:[^\r\n]*)", lit):
            srtp_seeds(m.group(1))
        if re.search(rb"(?m)^\s*[a-z][a-z_]+\s*=\s*[\[\x220-9tf]", lit) and len(lit) < 8192:
            save("config_file", lit)
    # Metadata documents in sequence: complete, then partial updates.
    docs = [xml_of(l) for l in lits if b"<recording" in l]
    complete = [d for d in docs if b">complete<" in d]
    partial = [d for d in docs if b">partial<" in d]
    for c in complete[:8]:
        for p in partial[:8]:
            save("metadata", c + b"\x00" + p)
    with open(os.path.join(ROOT, "packaging/recorder.toml"), "rb") as f:
        save("config_file", f.read())
    for req in [b'{"cmd":"status"}', b'{"cmd":"sessions"}', b'{"cmd":"flows"}',
                b'{"cmd":"stop","id":"20240102T030405Z-ab12"}', b'{"cmd":"show","id":"x"}',
                b'{"cmd":"recordings","call_uuid":"0123","aor":null,"since":null}',
                b'{"cmd":"recordings","call_uuid":null,"aor":"sip:7001@cc.example","since":"2024-01-02T03:04:05Z"}',
                b'{"cmd":"recordings","since":"2024-01-02T03:04:05.123+01:00"}',
                b'{"ok":true,"data":{"sessions":[]}}', b'{"ok":false,"error":"no live recording x"}']:
        save("control_request", req)
    media_seeds()


def rtp(seq, ts, ssrc, payload, pt=0, marker=False, csrc=0, ext=None, pad=0):
    b0 = 0x80 | csrc | (0x10 if ext is not None else 0) | (0x20 if pad else 0)
    p = struct.pack("!BBHII", b0, pt | (0x80 if marker else 0), seq, ts, ssrc)
    p += b"\x00\x00\x00\x01" * csrc
    if ext is not None:
        p += struct.pack("!HH", 0xBEDE, len(ext) // 4) + ext
    p += payload
    if pad:
        p += b"\x00" * (pad - 1) + bytes([pad])
    return p


def sender_report(ssrc):
    return struct.pack("!BBHIIIIII", 0x80, 200, 6, ssrc, 0xE5D1_0000, 0x3344_5566, 160, 10, 1600)


def packets(ps, step=1):
    return b"".join(bytes([min(len(p), 255), step]) + p[:255] for p in ps)


def srtp_seeds(line):
    # The receiver's own sender protects these (op bit 1): they authenticate.
    ps = [rtp(i, 160 * i, 0x1234, b"\x55" * 40) for i in range(3)]
    body = b"".join(bytes([2, len(p)]) + p for p in ps)
    body += bytes([3, len(sender_report(1))]) + sender_report(1)
    body += bytes([0, len(ps[0])]) + ps[0]
    save("srtp", line + b"\n" + body)


def frame(payload, vlan=False, v6=False):
    eth = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02"
    if vlan:
        eth += b"\x81\x00\x00\x64"
    udp_len = 8 + len(payload)
    udp = struct.pack("!HHHH", 40000, 20000, udp_len, 0)
    if v6:
        ip = struct.pack("!IHBB", 0x6000_0000, udp_len, 17, 64) + b"\x20\x01\x0d\xb8" + b"\x00" * 11 + b"\x01" + b"\x20\x01\x0d\xb8" + b"\x00" * 11 + b"\x02"
        eth += b"\x86\xdd"
    else:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0, 64, 17, 0, bytes([10, 20, 0, 10]), bytes([10, 20, 0, 50]))
        eth += b"\x08\x00"
    return eth + ip + udp + payload


def record(frm, flow=1, ts=1_000_000, cap=None, flags=0):
    cap = len(frm) if cap is None else cap
    payload_offset = 14 + (4 if frm[12:14] == b"\x81\x00" else 0) + (40 if b"\x86\xdd" in frm[12:18] else 20) + 8
    rec = struct.pack("<QQIIIHH", flow, ts, 1, len(frm), cap, payload_offset, flags) + frm[:cap]
    return rec + b"\x00" * (-len(rec) % 8)


def media_seeds():
    g711 = [rtp(i, 160 * i, 0xCAFE, bytes(range(160)), pt=0) for i in range(4)]
    odd = [rtp(9, 1, 7, b"\x01" * 20, pt=8, csrc=2, ext=b"\x10\x01\x00\x00", pad=4),
           rtp(65535, 0xFFFF_FF00, 7, b"\xf8" * 20, pt=18), rtp(0, 0, 7, b"\x00" * 80, pt=9, marker=True)]
    for pick in range(6):
        save("rtp_rtcp", bytes([pick]) + packets(g711 + odd + [sender_report(0xCAFE)]))
    save("rtp_rtcp", bytes([3]) + packets([rtp(1, 960, 5, b"\x78\x07\xff\xfe" * 10, pt=111)]))
    save("rtp_rtcp", bytes([5]) + packets([rtp(1, 160, 5, bytes(range(20)), pt=18), rtp(2, 320, 5, b"\x0a\x0b", pt=18)]))
    recs = [record(frame(p)) for p in g711[:2]]
    recs.append(record(frame(odd[0], vlan=True)))
    recs.append(record(frame(g711[2], v6=True)))
    recs.append(record(frame(g711[3] + b"\x00" * 10), cap=60, flags=1))
    save("ring_record", b"".join(recs))
    for r in recs:
        save("ring_record", r)


if __name__ == "__main__":
    main()
