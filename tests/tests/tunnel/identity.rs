//! Identity without copied keys: enrolment tokens, renewal over the tunnel, expiry and
//! revocation that reach live streams, groups and policy reload.
//!
//! The token's rules are checked on the gateway's own protocol with curl (a client
//! without a certificate, as an enrolling agent is) and keys made here; the rest runs
//! the real agent (`tunnel-agent enroll`, then `run`) and real transfers.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tunnel_proto::token::EnrolmentToken;
use tunnel_tests::*;

const ALLOW_ALICE_LOOPBACK: &str = "\n[[allow]]\nidentity = \"alice\"\nto = [\"127.0.0.1/32\"]\n";

/// A gateway made by `init`, with `settings` (top-level keys) and `rules` added.
fn gateway(site: &Site, settings: &str, rules: &str) -> (PathBuf, Gateway) {
    let dir = site.init_gateway("gateway");
    let config = dir.join("gateway.toml");
    let text = fs::read_to_string(&config).expect("gateway.toml");
    fs::write(&config, format!("{settings}\n{text}")).expect("write gateway.toml");
    let gateway = Gateway::start(&dir, rules).expect("gateway");
    (dir, gateway)
}

/// `tunnel-gateway token`, with the running gateway's address.
fn token(dir: &Path, gateway: &Gateway, args: &[&str]) -> String {
    let out = run_ok(
        Command::new(bin("tunnel-gateway"))
            .arg("token")
            .args(args)
            .arg("--address")
            .arg(gateway.addr.to_string())
            .arg("--dir")
            .arg(dir),
    );
    out.trim().to_string()
}

/// An ECDSA key and a signing request for it, PEM.
fn key_and_request() -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");
    (key.serialize_pem(), csr)
}

/// POSTs `body` to the gateway as a client without a certificate; returns the HTTP
/// status and the JSON answer.
fn post(gateway_dir: &Path, gateway: &Gateway, path: &str, body: &Value) -> (u16, Value) {
    let mut child = Command::new("curl")
        .args(["-sS", "--http2", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}"])
        .args(["-H", "content-type: application/json", "--data-binary", "@-"])
        .arg("--cacert")
        .arg(gateway_dir.join("ca.pem"))
        .arg(format!("https://localhost:{}{path}", gateway.addr.port()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("curl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.to_string().as_bytes())
        .expect("request body");
    let out = child.wait_with_output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (json, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let answer = serde_json::from_str(json).unwrap_or(Value::Null);
    (code.trim().parse().unwrap_or(0), answer)
}

fn enrol_request(token: &EnrolmentToken, csr: &str) -> Value {
    serde_json::json!({
        "token_id": token.id,
        "secret": token.secret.encode(),
        "csr": csr,
    })
}

#[test]
fn a_token_gives_one_certificate_to_one_key_even_when_fifty_race() {
    require("curl", "curl");
    let site = Site::new();
    // Fifty handshakes at once from one address: above the default per-source cap,
    // which would turn some away before they ask.
    let (dir, mut gateway) = gateway(&site, "max_handshakes_per_source = 64", ALLOW_ALICE_LOOPBACK);
    let text = token(&dir, &gateway, &["--identity", "alice", "--group", "lab"]);
    let token = EnrolmentToken::decode(&text).expect("the printed token decodes");
    assert_eq!((token.identity.as_str(), token.groups.as_slice()), ("alice", &["lab".to_string()][..]));

    let requests: Vec<(String, String)> = (0..50).map(|_| key_and_request()).collect();
    let answers: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = requests
            .iter()
            .map(|(_, csr)| {
                let body = enrol_request(&token, csr);
                let (dir, gateway) = (&dir, &gateway);
                scope.spawn(move || post(dir, gateway, "/v1/enrol", &body))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let winners: Vec<usize> = (0..answers.len()).filter(|i| answers[*i].0 == 200).collect();
    assert_eq!(winners.len(), 1, "exactly one certificate: {answers:?}");
    for (code, answer) in answers.iter().filter(|(code, _)| *code != 200) {
        assert_eq!(*code, 409, "{answer}");
        assert_eq!(answer["error"], "token-used", "{answer}");
    }
    let first = &answers[winners[0]].1;
    assert_eq!(first["identity"], "alice");
    assert_eq!(first["groups"], serde_json::json!(["lab"]));

    // The reply was lost: the same key asks again and gets the same certificate.
    let (code, again) = post(&dir, &gateway, "/v1/enrol", &enrol_request(&token, &requests[winners[0]].1));
    assert_eq!(code, 200, "{again}");
    assert_eq!(again["certificate"], first["certificate"]);
    assert_eq!(again["serial"], first["serial"]);

    gateway
        .daemon
        .wait_log("possible theft", Duration::from_secs(5))
        .expect("a second key is logged as a possible theft");
    let log = gateway.daemon.log_text();
    assert!(!log.contains(&token.secret.encode()), "the secret is in the gateway's log");
    assert!(!log.contains(&text), "the token is in the gateway's log");
    // Only a digest is kept.
    let stored = fs::read_to_string(dir.join("state/tokens").join(format!("{}.json", token.id)))
        .expect("token record");
    assert!(!stored.contains(&token.secret.encode()), "{stored}");
}

#[test]
fn a_token_works_until_its_last_second_and_not_after() {
    require("curl", "curl");
    let site = Site::new();
    let (dir, gateway) = gateway(&site, "", ALLOW_ALICE_LOOPBACK);
    // Two tokens of 3 s: one used at its expiry − 1 s, one at its expiry + 1 s.
    let early = EnrolmentToken::decode(&token(&dir, &gateway, &["--identity", "alice", "--ttl", "3s"]))
        .expect("token");
    let late = EnrolmentToken::decode(&token(&dir, &gateway, &["--identity", "alice", "--ttl", "3s"]))
        .expect("token");
    let wait_until = |unix: i64| {
        let now = tunnel_transport::certs::unix_now();
        if unix > now {
            std::thread::sleep(Duration::from_millis(
                u64::try_from(unix - now).unwrap_or(0) * 1000 + 50,
            ));
        }
    };
    wait_until(early.expires - 1);
    let (code, answer) = post(&dir, &gateway, "/v1/enrol", &enrol_request(&early, &key_and_request().1));
    assert_eq!(code, 200, "at expiry − 1 s: {answer}");
    wait_until(late.expires + 1);
    let (code, answer) = post(&dir, &gateway, "/v1/enrol", &enrol_request(&late, &key_and_request().1));
    assert_eq!(code, 410, "at expiry + 1 s: {answer}");
    assert_eq!(answer["error"], "token-expired", "{answer}");
    let message = answer["message"].as_str().unwrap_or_default();
    assert!(message.contains("expired on"), "{message}");
    assert!(answer["gateway_time"].as_i64().is_some(), "{answer}");
}
