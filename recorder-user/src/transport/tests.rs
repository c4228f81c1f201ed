//! The driver on real sockets (127.0.0.1, port 0) with a tiny app that answers 200 to INVITE.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::BytesMut;
use rsip::{headers::UntypedHeader, prelude::HeadersExt};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    sync::mpsc,
    time::timeout,
};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::sip::{frame, DialogId, Endpoint, EndpointConfig, SipEvent};

/// What the app saw, reported to the test as it happens (no sleeps needed).
#[derive(Debug, PartialEq)]
enum Seen {
    Invite,
    Acked(DialogId),
    ByeCompleted(Option<u16>),
}

struct AnsweringApp {
    seen: mpsc::UnboundedSender<Seen>,
    requests: usize,
}

impl SipApp for AnsweringApp {
    fn handle_event(&mut self, now: Instant, event: SipEvent, endpoint: &mut Endpoint) {
        match event {
            SipEvent::Request { txn, request, .. } => {
                self.requests += 1;
                if request.method == rsip::Method::Invite {
                    let _ = self.seen.send(Seen::Invite);
                }
                let mut ok = endpoint
                    .make_response(&txn, 200, None)
                    .expect("live transaction");
                ok.body = b"v=0\r\n".to_vec();
                endpoint.respond(now, &txn, ok).expect("first answer");
            }
            SipEvent::Acked { dialog } => {
                let _ = self.seen.send(Seen::Acked(dialog));
            }
            SipEvent::RequestCompleted { response, .. } => {
                let status = response.map(|r| r.status_code.code());
                let _ = self.seen.send(Seen::ByeCompleted(status));
            }
            _ => {}
        }
    }
}

fn invite(transport: &str, client: SocketAddr, call_id: &str) -> String {
    format!(
        "INVITE sip:srs@127.0.0.1 SIP/2.0\r\n\
         Via: SIP/2.0/{transport} {client};branch=z9hG4bK-{call_id};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:src@{client}>;tag=src\r\n\
         To: <sip:srs@127.0.0.1>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:src@{client}>\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

fn ack(transport: &str, client: SocketAddr, call_id: &str, to: &str) -> String {
    format!(
        "ACK sip:srs@127.0.0.1 SIP/2.0\r\n\
         Via: SIP/2.0/{transport} {client};branch=z9hG4bK-ack-{call_id};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:src@{client}>;tag=src\r\n\
         To: {to}\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 ACK\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

fn parse_response(bytes: &[u8]) -> rsip::Response {
    rsip::Response::try_from(bytes).expect("a response")
}

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn driver_over_udp_and_tcp() {
    let sockets = bind(&["127.0.0.1:0".parse().unwrap()]).unwrap();
    let server = sockets.local_addrs()[0];
    assert_ne!(server.port(), 0);
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let (commands_tx, commands) = mpsc::channel::<Command<AnsweringApp>>(4);
    let shutdown = CancellationToken::new();
    let config = EndpointConfig {
        contact_host: "127.0.0.1".into(),
        contact_port: server.port(),
        ..Default::default()
    };
    let app = AnsweringApp {
        seen: seen_tx,
        requests: 0,
    };
    let driver = tokio::spawn(run_on(
        sockets,
        Endpoint::new(config),
        app,
        shutdown.clone(),
        Some(commands),
    ));

    // --- UDP: INVITE -> 100, 200; ACK -> Acked; then our BYE via a command.
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let client_addr = client.local_addr().unwrap();
    client
        .send_to(invite("UDP", client_addr, "udp-1").as_bytes(), server)
        .await
        .unwrap();
    let mut buf = vec![0u8; 65535];
    let mut codes = Vec::new();
    let mut to = String::new();
    while codes.last() != Some(&200) {
        let (n, from) = timeout(WAIT, client.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            from, server,
            "answers come from the port the request went to"
        );
        let r = parse_response(&buf[..n]);
        codes.push(r.status_code.code());
        to = r.to_header().unwrap().value().to_string();
    }
    assert_eq!(codes, vec![100, 200]);
    assert_eq!(
        timeout(WAIT, seen.recv()).await.unwrap(),
        Some(Seen::Invite)
    );
    client
        .send_to(ack("UDP", client_addr, "udp-1", &to).as_bytes(), server)
        .await
        .unwrap();
    let dialog = match timeout(WAIT, seen.recv()).await.unwrap() {
        Some(Seen::Acked(d)) => d,
        other => panic!("{other:?}"),
    };
    assert_eq!(dialog.call_id, "udp-1");

    let bye_dialog = dialog.clone();
    let stop: Command<AnsweringApp> = Box::new(move |_app, endpoint, now| {
        endpoint
            .send_bye(
                now,
                &bye_dialog,
                Some("SIP;cause=200;text=\"operator stop\""),
            )
            .unwrap();
    });
    assert!(commands_tx.send(stop).await.is_ok());
    let (n, _) = timeout(WAIT, client.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let bye = rsip::Request::try_from(&buf[..n]).unwrap();
    assert_eq!(bye.method, rsip::Method::Bye);
    let ok = format!(
        "SIP/2.0 200 OK\r\nVia: {}\r\nFrom: {}\r\nTo: {}\r\nCall-ID: udp-1\r\nCSeq: {}\r\nContent-Length: 0\r\n\r\n",
        bye.via_header().unwrap().value(),
        bye.from_header().unwrap().value(),
        bye.to_header().unwrap().value(),
        bye.cseq_header().unwrap().value(),
    );
    client.send_to(ok.as_bytes(), server).await.unwrap();
    assert_eq!(
        timeout(WAIT, seen.recv()).await.unwrap(),
        Some(Seen::ByeCompleted(Some(200)))
    );

    // --- TCP: the INVITE arrives in two writes, responses come back on the connection.
    let mut stream = TcpStream::connect(server).await.unwrap();
    let tcp_client = stream.local_addr().unwrap();
    let text = invite("TCP", tcp_client, "tcp-1");
    let (first, second) = text.split_at(40);
    stream.write_all(first.as_bytes()).await.unwrap();
    stream.flush().await.unwrap();
    stream.write_all(second.as_bytes()).await.unwrap();
    let mut rbuf = BytesMut::new();
    let mut codes = Vec::new();
    let mut to = String::new();
    while codes.last() != Some(&200) {
        if let Some(msg) = frame(&mut rbuf).unwrap() {
            let r = parse_response(&msg);
            codes.push(r.status_code.code());
            to = r.to_header().unwrap().value().to_string();
            if r.status_code.code() == 200 {
                assert_eq!(r.body, b"v=0\r\n", "the body survives framing");
            }
            continue;
        }
        let n = timeout(WAIT, stream.read_buf(&mut rbuf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "connection closed early");
    }
    assert_eq!(codes, vec![100, 200]);
    assert_eq!(
        timeout(WAIT, seen.recv()).await.unwrap(),
        Some(Seen::Invite)
    );
    // ACK and an OPTIONS ping in one write.
    let mut both = ack("TCP", tcp_client, "tcp-1", &to);
    both.push_str(
        &invite("TCP", tcp_client, "ping")
            .replace("INVITE sip:", "OPTIONS sip:")
            .replace("1 INVITE", "1 OPTIONS"),
    );
    stream.write_all(both.as_bytes()).await.unwrap();
    match timeout(WAIT, seen.recv()).await.unwrap() {
        Some(Seen::Acked(d)) => assert_eq!(d.call_id, "tcp-1"),
        other => panic!("{other:?}"),
    }
    let options_ok = loop {
        if let Some(msg) = frame(&mut rbuf).unwrap() {
            break parse_response(&msg);
        }
        let n = timeout(WAIT, stream.read_buf(&mut rbuf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "connection closed early");
    };
    assert_eq!(options_ok.status_code.code(), 200);
    assert_eq!(options_ok.cseq_header().unwrap().value(), "1 OPTIONS");

    shutdown.cancel();
    let app = timeout(WAIT, driver).await.unwrap().unwrap().unwrap();
    assert_eq!(
        app.requests, 2,
        "two INVITEs reached the app; the OPTIONS was answered by the endpoint"
    );
}

#[tokio::test]
async fn bind_rejects_an_empty_list_and_a_taken_port() {
    assert!(matches!(bind(&[]), Err(TransportError::NoListenAddress)));
    let first = bind(&["127.0.0.1:0".parse().unwrap()]).unwrap();
    let taken = first.local_addrs()[0];
    assert!(matches!(
        bind(&[taken]),
        Err(TransportError::Bind {
            transport: "UDP",
            ..
        })
    ));
}

#[tokio::test]
async fn ipv4_and_ipv6_wildcards_share_a_port() {
    let v4 = bind(&["0.0.0.0:0".parse().unwrap()]).unwrap();
    let port = v4.local_addrs()[0].port();
    // Skip where the host has no IPv6 at all.
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        return;
    }
    let v6 = bind(&[SocketAddr::new("::".parse().unwrap(), port)]).unwrap();
    assert_eq!(v6.local_addrs()[0].port(), port);
}

#[tokio::test]
async fn unframeable_tcp_stream_is_closed() {
    let sockets = bind(&["127.0.0.1:0".parse().unwrap()]).unwrap();
    let server = sockets.local_addrs()[0];
    let (seen_tx, _seen) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let app = AnsweringApp {
        seen: seen_tx,
        requests: 0,
    };
    let endpoint = Endpoint::new(EndpointConfig::default());
    let driver = tokio::spawn(run_on(sockets, endpoint, app, shutdown.clone(), None));

    let mut stream = TcpStream::connect(server).await.unwrap();
    stream
        .write_all(b"INVITE sip:a@b SIP/2.0\r\nContent-Length: 99999999999\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    // The server closes: EOF (or a reset), never a response.
    match timeout(WAIT, stream.read(&mut buf)).await.unwrap() {
        Ok(n) => assert_eq!(n, 0, "no response to an unframeable stream"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
    shutdown.cancel();
    let app = timeout(WAIT, driver).await.unwrap().unwrap().unwrap();
    assert_eq!(app.requests, 0);
}

/// A self-signed certificate for `localhost` written as PEM files in a fresh directory.
fn self_signed() -> (std::path::PathBuf, std::path::PathBuf, rcgen::CertifiedKey) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let dir = std::env::temp_dir().join(format!("recorder-tls-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    (cert, key, certified)
}

async fn read_message<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> bytes::Bytes {
    loop {
        if let Some(msg) = frame(buf).unwrap() {
            return msg;
        }
        let n = timeout(WAIT, stream.read_buf(buf)).await.unwrap().unwrap();
        assert!(n > 0, "connection closed early");
    }
}

#[tokio::test]
async fn driver_over_tls() {
    let (cert, key, certified) = self_signed();
    let mut sockets = bind(&["127.0.0.1:0".parse().unwrap()]).unwrap();
    sockets
        .bind_tls(
            &["127.0.0.1:0".parse().unwrap()],
            tls::server_config(&cert, &key).unwrap(),
        )
        .unwrap();
    let server = sockets.tls_local_addrs()[0];
    assert_ne!(server.port(), 0);
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let (commands_tx, commands) = mpsc::channel::<Command<AnsweringApp>>(4);
    let shutdown = CancellationToken::new();
    let config = EndpointConfig {
        contact_host: "127.0.0.1".into(),
        contact_port: sockets.local_addrs()[0].port(),
        contact_tls_port: Some(server.port()),
        ..Default::default()
    };
    let app = AnsweringApp {
        seen: seen_tx,
        requests: 0,
    };
    let driver = tokio::spawn(run_on(
        sockets,
        Endpoint::new(config),
        app,
        shutdown.clone(),
        Some(commands),
    ));

    // A client that trusts exactly the server's self-signed certificate.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    let client_config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client_config));
    let tcp = TcpStream::connect(server).await.unwrap();
    let client = tcp.local_addr().unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = timeout(WAIT, connector.connect(name, tcp))
        .await
        .unwrap()
        .unwrap();

    stream
        .write_all(invite("TLS", client, "tls-1").as_bytes())
        .await
        .unwrap();
    let mut rbuf = BytesMut::new();
    let mut codes = Vec::new();
    let mut ok = None;
    while codes.last() != Some(&200) {
        let r = parse_response(&read_message(&mut stream, &mut rbuf).await);
        codes.push(r.status_code.code());
        ok = Some(r);
    }
    assert_eq!(codes, vec![100, 200]);
    let ok = ok.unwrap();
    let contact = ok.contact_header().unwrap().value().to_string();
    assert!(
        contact.contains(&format!(":{};transport=tls", server.port())),
        "Contact names the TLS port and transport: {contact}"
    );
    assert_eq!(
        timeout(WAIT, seen.recv()).await.unwrap(),
        Some(Seen::Invite)
    );
    let to = ok.to_header().unwrap().value().to_string();
    stream
        .write_all(ack("TLS", client, "tls-1", &to).as_bytes())
        .await
        .unwrap();
    let dialog = match timeout(WAIT, seen.recv()).await.unwrap() {
        Some(Seen::Acked(d)) => d,
        other => panic!("{other:?}"),
    };

    // Our BYE goes out on the same TLS connection, with a TLS Via.
    let stop: Command<AnsweringApp> = Box::new(move |_app, endpoint, now| {
        endpoint.send_bye(now, &dialog, None).unwrap();
    });
    assert!(commands_tx.send(stop).await.is_ok());
    let bye = rsip::Request::try_from(&read_message(&mut stream, &mut rbuf).await[..]).unwrap();
    assert_eq!(bye.method, rsip::Method::Bye);
    let via = bye.via_header().unwrap().value().to_string();
    assert!(via.starts_with("SIP/2.0/TLS "), "{via}");
    let bye_ok = format!(
        "SIP/2.0 200 OK\r\nVia: {via}\r\nFrom: {}\r\nTo: {}\r\nCall-ID: tls-1\r\nCSeq: {}\r\nContent-Length: 0\r\n\r\n",
        bye.from_header().unwrap().value(),
        bye.to_header().unwrap().value(),
        bye.cseq_header().unwrap().value(),
    );
    stream.write_all(bye_ok.as_bytes()).await.unwrap();
    assert_eq!(
        timeout(WAIT, seen.recv()).await.unwrap(),
        Some(Seen::ByeCompleted(Some(200)))
    );

    shutdown.cancel();
    let app = timeout(WAIT, driver).await.unwrap().unwrap().unwrap();
    assert_eq!(app.requests, 1);
    let _ = std::fs::remove_dir_all(cert.parent().unwrap());
}

#[tokio::test]
async fn tls_config_errors_name_the_file() {
    let (cert, key, _) = self_signed();
    let missing = cert.with_file_name("missing.pem");
    match tls::server_config(&missing, &key) {
        Err(TransportError::TlsFile { path, .. }) => assert_eq!(path, missing),
        other => panic!("{other:?}"),
    }
    // A certificate file given as the key: no private key in it.
    match tls::server_config(&cert, &cert) {
        Err(TransportError::TlsFile { path, .. }) => assert_eq!(path, cert),
        other => panic!("{other:?}"),
    }
    // The key file given as the certificate: no certificate in it.
    match tls::server_config(&key, &key) {
        Err(TransportError::TlsFile { path, .. }) => assert_eq!(path, key),
        other => panic!("{other:?}"),
    }
    let config = tls::server_config(&cert, &key).unwrap();
    // A taken TLS port is reported as TLS.
    let mut sockets = bind(&["127.0.0.1:0".parse().unwrap()]).unwrap();
    let taken = sockets.local_addrs()[0];
    assert!(matches!(
        sockets.bind_tls(&[taken], config),
        Err(TransportError::Bind {
            transport: "TLS",
            ..
        })
    ));
    let _ = std::fs::remove_dir_all(cert.parent().unwrap());
}
