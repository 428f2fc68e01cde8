//! The checks each fuzz target runs on one input, shared with the regression test that
//! replays saved inputs (`tests/regressions.rs`). Every check is: never panic, and what
//! decodes re-encodes to something that decodes to the same value.
#![forbid(unsafe_code)]

use std::path::Path;

/// `tunnel-run`'s ELF classifier, the same file the wrapper builds.
#[path = "../../wrapper/src/elf.rs"]
#[allow(dead_code)]
mod elf;

use tunnel_proto::config::{AgentConfig, GatewayConfig};
use tunnel_proto::local::{Reply, Request};
use tunnel_proto::routes::RouteTable;
use tunnel_proto::{Pattern, Target};

/// The local protocol between the preload and the agent, both directions.
pub fn local_protocol(data: &[u8]) {
    if let Ok(Some((request, used))) = Request::decode(data) {
        assert!(used <= data.len());
        let wire = request.encode();
        assert_eq!(
            Request::decode(wire.as_bytes()),
            Ok(Some((request, wire.len()))),
            "request does not round-trip"
        );
    }
    if let Ok(Some((reply, used))) = Reply::decode(data) {
        assert!(used <= data.len());
        let wire = reply.encode();
        let again = Reply::decode(wire.as_bytes());
        // An error message is cut and cleaned when encoded; everything else round-trips.
        if !matches!(reply, Reply::Err { .. }) {
            assert_eq!(
                again,
                Ok(Some((reply, wire.len()))),
                "reply does not round-trip"
            );
        } else {
            assert!(
                matches!(again, Ok(Some(_))),
                "an error reply does not decode again"
            );
        }
    }
}

/// `TUNNEL_ROUTES`, destination patterns and targets.
pub fn routes(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(table) = RouteTable::parse(text) {
        let again = RouteTable::parse(&table.to_string());
        assert_eq!(
            again.as_ref(),
            Ok(&table),
            "route table does not round-trip"
        );
        for route in table.routes() {
            for pattern in &route.patterns {
                let _ = pattern.matches_name("db.site-b.internal", 5432);
                let _ = pattern.matches_ip([10, 20, 0, 1].into(), 22);
            }
        }
        let _ = table.may_route_name("db.site-b.internal");
    }
    if let Ok(pattern) = Pattern::parse(text) {
        assert_eq!(Pattern::parse(&pattern.to_string()), Ok(pattern));
    }
    if let Ok(target) = Target::parse(text) {
        // A service name made only of digits would read back as something else.
        let _ = Target::parse(&target.to_string());
    }
}

/// Both configuration files.
pub fn configs(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = AgentConfig::parse(text, Path::new("/etc/tunnel/agent.toml"));
    let _ = GatewayConfig::parse(text, Path::new("/etc/tunnel/gateway.toml"));
}

/// Enrolment tokens (what a user pastes), durations, and the enrolment messages: any
/// text, an answer and never a panic; a token that decodes encodes back to itself.
pub fn tokens(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(token) = tunnel_proto::token::EnrolmentToken::decode(text) {
        let again = tunnel_proto::token::EnrolmentToken::decode(&token.encode());
        assert_eq!(again.as_ref(), Ok(&token), "a decoded token does not round-trip");
    }
    if let Ok(d) = tunnel_proto::duration::parse(text) {
        assert_eq!(tunnel_proto::duration::parse(&tunnel_proto::duration::format(d)), Ok(d));
    }
    let _ = serde_json::from_str::<tunnel_proto::enrolment::EnrolRequest>(text);
    let _ = serde_json::from_str::<tunnel_proto::enrolment::Issued>(text);
    let _ = serde_json::from_str::<tunnel_proto::enrolment::Refused>(text);
}

/// The kernel's socket-diagnostics answers.
pub fn sock_diag(data: &[u8]) {
    let sequence = data.first().copied().map_or(0, u32::from);
    let query = tunnel_proto::sock_diag::encode_query(
        std::net::SocketAddr::from(([127, 0, 0, 1], 1)),
        std::net::SocketAddr::from(([127, 0, 0, 1], 2)),
        sequence,
    );
    let _ =
        tunnel_proto::sock_diag::decode_answer(data.get(1..).unwrap_or_default(), sequence, &query);
}

/// `tunnel-run`'s ELF classifier: any bytes, a kind, never a panic; a file it calls
/// dynamically linked has the header that says so whole.
pub fn elf(data: &[u8]) {
    let kind = elf::classify(data);
    if kind == elf::Executable::Dynamic {
        assert!(data.len() >= 64, "dynamic from {} bytes", data.len());
    }
}

/// The supervisor's resolver stub: any datagram read as a query or not, never a panic;
/// the answer to one it reads repeats its id and question and reads back the same.
pub fn dns(data: &[u8]) {
    use tunnel_proto::dns;
    let Some(question) = dns::read_query(data) else {
        return;
    };
    assert!(question.name.len() <= 253, "{} bytes of name", question.name.len());
    for address in [
        Some(std::net::IpAddr::from([198, 18, 0, 1])),
        Some(std::net::IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, 1])),
        None,
    ] {
        let mut answer = dns::answer(data, &question, address);
        assert_eq!(answer[..2], data[..2], "the answer's id");
        assert_eq!(answer[2] & 0x80, 0x80, "an answer");
        // As a query again, it asks the same question.
        answer[2] &= 0x7f;
        answer[6..8].copy_from_slice(&[0, 0]);
        let again = dns::read_query(&answer).expect("the answer's question reads");
        assert_eq!(again.name, question.name);
        assert_eq!((again.qtype, again.qclass), (question.qtype, question.qclass));
    }
}
