//! The little of DNS that the supervisor's resolver stub needs (RFC 1035): read the
//! one question of a query, and write the answer for a routed name (its synthetic
//! address, or no data for other types). Everything else is forwarded untouched, so
//! nothing here has to understand more.
//!
//! ```text
//! header   id(2) flags(2) qdcount(2) ancount(2) nscount(2) arcount(2)
//! question name (labels, no compression in a query) type(2) class(2)
//! answer   0xc00c (the question's name) type(2) class(2) ttl(4) rdlength(2) rdata
//! ```

use std::net::IpAddr;

/// Record types the stub answers with an address.
pub const TYPE_A: u16 = 1;
pub const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
const HEADER: usize = 12;
/// Longest name, in its text form (RFC 1035 2.3.4: 255 octets on the wire).
const MAX_NAME: usize = 253;
/// How long a resolver may keep a synthetic answer: the mapping lives as long as the
/// agent, but a short time keeps a cache from outliving a restarted one.
pub const TTL: u32 = 60;

/// The question of a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub id: u16,
    /// Recursion desired, copied into the answer.
    pub recursion: bool,
    /// Lower case, without the final dot.
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    /// Where the question ends in the query: what the answer repeats.
    end: usize,
}

/// Reads the single question of a standard query; `None` for anything else (an
/// answer, another opcode, several questions, a malformed name), which the stub
/// forwards as it came.
pub fn read_query(packet: &[u8]) -> Option<Question> {
    let header = packet.get(..HEADER)?;
    let id = u16::from_be_bytes([header[0], header[1]]);
    let flags = u16::from_be_bytes([header[2], header[3]]);
    let is_answer = flags & 0x8000 != 0;
    let opcode = (flags >> 11) & 0xf;
    let questions = u16::from_be_bytes([header[4], header[5]]);
    if is_answer || opcode != 0 || questions != 1 {
        return None;
    }
    let mut at = HEADER;
    let mut name = String::new();
    loop {
        let length = usize::from(*packet.get(at)?);
        at += 1;
        if length == 0 {
            break;
        }
        // Compression (0xc0) or the reserved label types: not in a query.
        if length > 63 {
            return None;
        }
        let label = packet.get(at..at + length)?;
        if !label
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        {
            return None;
        }
        if !name.is_empty() {
            name.push('.');
        }
        name.extend(label.iter().map(|b| char::from(b.to_ascii_lowercase())));
        if name.len() > MAX_NAME {
            return None;
        }
        at += length;
    }
    let fixed = packet.get(at..at + 4)?;
    Some(Question {
        id,
        recursion: flags & 0x0100 != 0,
        name,
        qtype: u16::from_be_bytes([fixed[0], fixed[1]]),
        qclass: u16::from_be_bytes([fixed[2], fixed[3]]),
        end: at + 4,
    })
}

/// The answer to `question` (taken from `query`) for a routed name: `address` when it
/// is of the type asked (A for IPv4, AAAA for IPv6), else no data (NOERROR with no
/// answer), as a name that exists but has no record of that type.
pub fn answer(query: &[u8], question: &Question, address: Option<IpAddr>) -> Vec<u8> {
    let record = match (question.qclass, question.qtype, address) {
        (CLASS_IN, TYPE_A, Some(IpAddr::V4(v4))) => Some((TYPE_A, v4.octets().to_vec())),
        (CLASS_IN, TYPE_AAAA, Some(IpAddr::V6(v6))) => Some((TYPE_AAAA, v6.octets().to_vec())),
        _ => None,
    };
    let mut out = Vec::with_capacity(question.end + 32);
    out.extend_from_slice(&question.id.to_be_bytes());
    // QR, the opcode (0), recursion desired as asked, recursion available, NOERROR.
    let flags: u16 = 0x8000 | if question.recursion { 0x0100 } else { 0 } | 0x0080;
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&u16::from(record.is_some()).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(query.get(HEADER..question.end).unwrap_or_default());
    if let Some((rtype, data)) = record {
        out.extend_from_slice(&[0xc0, 0x0c]);
        out.extend_from_slice(&rtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&TTL.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(&data);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        let mut q = Vec::new();
        q.extend_from_slice(&id.to_be_bytes());
        q.extend_from_slice(&0x0100u16.to_be_bytes());
        q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 1]);
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&1u16.to_be_bytes());
        // An EDNS OPT record in the additional section, as resolvers send.
        q.extend_from_slice(&[0, 0, 41, 4, 0, 0, 0, 0, 0, 0, 0]);
        q
    }

    #[test]
    fn reads_the_question_and_answers_with_the_address() {
        let q = query(0x1234, "Files.Site-B.internal", TYPE_A);
        let question = read_query(&q).unwrap();
        assert_eq!(question.name, "files.site-b.internal");
        assert_eq!((question.id, question.qtype), (0x1234, TYPE_A));
        let a = answer(&q, &question, Some("198.18.0.5".parse().unwrap()));
        assert_eq!(&a[..2], &[0x12, 0x34]);
        assert_eq!(u16::from_be_bytes([a[6], a[7]]), 1, "one answer");
        assert_eq!(&a[a.len() - 4..], &[198, 18, 0, 5]);
        // The same question, no data for another type.
        let aaaa = query(7, "files.site-b.internal", TYPE_AAAA);
        let q6 = read_query(&aaaa).unwrap();
        let none = answer(&aaaa, &q6, Some("198.18.0.5".parse().unwrap()));
        assert_eq!(u16::from_be_bytes([none[6], none[7]]), 0);
        assert_eq!(none.len(), q6.end);
    }

    #[test]
    fn anything_but_a_plain_query_is_not_read() {
        let q = query(1, "a.b", TYPE_A);
        for cut in 0..q.len() - 11 {
            let _ = read_query(&q[..cut]);
        }
        let mut answer_bit = q.clone();
        answer_bit[2] |= 0x80;
        assert_eq!(read_query(&answer_bit), None);
        let mut compressed = q.clone();
        compressed[12] = 0xc0;
        assert_eq!(read_query(&compressed), None);
        let mut two = q.clone();
        two[5] = 2;
        assert_eq!(read_query(&two), None);
    }
}
