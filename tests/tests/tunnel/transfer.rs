//! Bulk transfers arrive byte-exact, in each direction, with half-close: the side that
//! finished sending shuts its write side and still receives the other side's reply.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use tunnel_tests::*;

const GIB: u64 = 1 << 30;
const IO_TIMEOUT: Duration = Duration::from_secs(60);

fn listener() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    (l, addr)
}

#[test]
fn one_gib_upload_arrives_exact_and_the_reply_comes_back_after_half_close() {
    let (server, target) = listener();
    let (hash_tx, hash_rx) = mpsc::channel();
    let server = thread::spawn(move || {
        let (mut s, _) = server.accept().expect("accept");
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let (n, hash) = drain_hash(&mut s).expect("server read");
        hash_tx.send((n, hash)).expect("send");
        // The client has shut its write side; its read side is still open.
        s.write_all(hex(&hash).as_bytes()).expect("server reply");
    });
    let tunnel = Tunnel::start(&allow_alice(&[&target]), &[&target]).expect("tunnel");
    let fwd = tunnel.forward(0);
    let client = thread::spawn(move || {
        let mut s = connect(fwd, IO_TIMEOUT);
        let sent = send_pattern(&mut s, 1, GIB).expect("upload");
        s.shutdown(Shutdown::Write).expect("half-close");
        let mut reply = String::new();
        s.read_to_string(&mut reply)
            .expect("reply after half-close");
        (sent, reply)
    });

    // While it runs, status shows the stream and its bytes.
    let seen = wait_for(Duration::from_secs(60), "a live stream with bytes", || {
        let status = tunnel.agent.status().ok()?;
        let stream = status["streams"].as_array()?.first()?.clone();
        (stream["bytes_to_destination"].as_u64()? > 0).then_some(stream)
    })
    .expect("status during transfer");
    assert_eq!(seen["destination"], target.as_str());
    assert_eq!(seen["peer"], "site-b");

    let (sent, reply) = client.join().expect("client");
    let (received, server_hash) = hash_rx.recv().expect("server hash");
    server.join().expect("server");
    assert_eq!(received, GIB, "the server received {received} bytes");
    assert_eq!(server_hash, sent, "bytes changed on the way");
    assert_eq!(
        reply,
        hex(&sent),
        "the reply after half-close did not arrive intact"
    );

    let gw = tunnel.gateway.status().expect("gateway status");
    let ended = gw["recent"]
        .as_array()
        .and_then(|r| r.last())
        .cloned()
        .unwrap_or_default();
    assert_eq!(ended["outcome"], "closed", "{gw}");
    assert_eq!(ended["bytes_to_destination"], GIB);
    assert_eq!(ended["peer"], "alice");
}

#[test]
fn one_gib_download_arrives_exact_after_the_client_half_closes() {
    let (server, target) = listener();
    let server = thread::spawn(move || {
        let (mut s, _) = server.accept().expect("accept");
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        s.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let mut request = String::new();
        s.read_to_string(&mut request)
            .expect("request until the client's FIN");
        assert_eq!(request, "send 1 GiB\n");
        send_pattern(&mut s, 2, GIB).expect("download")
    });
    let tunnel = Tunnel::start(&allow_alice(&[&target]), &[&target]).expect("tunnel");
    let mut s = connect(tunnel.forward(0), IO_TIMEOUT);
    s.write_all(b"send 1 GiB\n").expect("request");
    s.shutdown(Shutdown::Write).expect("half-close");
    let (received, hash) = drain_hash(&mut s).expect("download");
    let sent = server.join().expect("server");
    assert_eq!(received, GIB);
    assert_eq!(hash, sent, "bytes changed on the way");
}
