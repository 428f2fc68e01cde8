//! Enrolment tokens: one copy-pasteable string that lets an agent get its first
//! certificate from a gateway without any key copied by hand.
//!
//! ```text
//!  tunnel1.<payload: base64url of JSON>.<check: 6 characters>
//!          │
//!          └─ gateway name, addresses, pin of the CA (SHA-256 of its public key),
//!             token id, 256-bit secret, expiry, identity and groups granted
//! ```
//!
//! The check is the start of a SHA-256 of everything before it, so a typo (a changed,
//! lost or swapped character) is caught here, before anything is sent. The gateway
//! keeps only [`secret_digest`] of the secret. White space inside a token (a line
//! broken by a terminal or a mail program) is ignored.

use std::fmt;

use data_encoding::BASE64URL_NOPAD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const PREFIX: &str = "tunnel1.";
const CHECK_LEN: usize = 6;
/// Longest token accepted: far more than any real one, so a pasted file is not parsed.
const MAX_LEN: usize = 8192;

/// The secret of a token: 32 random bytes. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub [u8; 32]);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Secret {
    /// The secret as it travels in an enrolment request.
    pub fn encode(&self) -> String {
        BASE64URL_NOPAD.encode(&self.0)
    }

    pub fn decode(text: &str) -> Option<Secret> {
        let bytes = BASE64URL_NOPAD.decode(text.as_bytes()).ok()?;
        <[u8; 32]>::try_from(bytes.as_slice()).ok().map(Secret)
    }
}

/// What the gateway keeps of a secret, and compares (in constant time) on redemption.
pub fn secret_digest(secret: &Secret) -> [u8; 32] {
    Sha256::digest(secret.0).into()
}

/// The pin of a CA: SHA-256 of its SubjectPublicKeyInfo (DER).
pub fn pin_of_public_key(spki_der: &[u8]) -> [u8; 32] {
    Sha256::digest(spki_der).into()
}

/// A pin as people compare it: `sha256:` and base64url.
pub fn format_pin(pin: &[u8; 32]) -> String {
    format!("sha256:{}", BASE64URL_NOPAD.encode(pin))
}

/// Everything a token carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrolmentToken {
    /// The name the gateway suggests for the agent's `[[gateway]]` table.
    pub gateway: String,
    /// Where the gateway listens (`host:port`), replicas included.
    pub addresses: Vec<String>,
    /// [`pin_of_public_key`] of the gateway's CA.
    pub ca_pin: [u8; 32],
    /// Names the token at the gateway (not secret).
    pub id: String,
    pub secret: Secret,
    /// Seconds since 1970, by the gateway's clock.
    pub expires: i64,
    pub identity: String,
    pub groups: Vec<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    #[serde(rename = "n")]
    gateway: String,
    #[serde(rename = "a")]
    addresses: Vec<String>,
    #[serde(rename = "p")]
    pin: String,
    #[serde(rename = "i")]
    id: String,
    #[serde(rename = "s")]
    secret: String,
    #[serde(rename = "e")]
    expires: i64,
    #[serde(rename = "u")]
    identity: String,
    #[serde(rename = "g", default)]
    groups: Vec<String>,
}

/// Why a string is not a usable token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error(
        "this is not an enrolment token (one starts with `tunnel1.`; `tunnel-gateway token` prints them)"
    )]
    NotAToken,
    #[error(
        "the token does not check out: a character was changed, lost or added on the way (copy the whole token again)"
    )]
    BadCheck,
    #[error("the token is damaged ({0}): copy the whole token again")]
    Malformed(String),
}

fn check_of(body: &str) -> String {
    let digest = Sha256::digest(body.as_bytes());
    BASE64URL_NOPAD.encode(&digest)[..CHECK_LEN].to_string()
}

impl EnrolmentToken {
    pub fn encode(&self) -> String {
        let payload = Payload {
            gateway: self.gateway.clone(),
            addresses: self.addresses.clone(),
            pin: BASE64URL_NOPAD.encode(&self.ca_pin),
            id: self.id.clone(),
            secret: self.secret.encode(),
            expires: self.expires,
            identity: self.identity.clone(),
            groups: self.groups.clone(),
        };
        // Serialising plain strings and numbers cannot fail.
        let json = serde_json::to_vec(&payload).unwrap_or_default();
        let body = format!("{PREFIX}{}", BASE64URL_NOPAD.encode(&json));
        let check = check_of(&body);
        format!("{body}.{check}")
    }

    pub fn decode(text: &str) -> Result<EnrolmentToken, TokenError> {
        if text.len() > MAX_LEN {
            return Err(TokenError::NotAToken);
        }
        let token: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        if !token.starts_with(PREFIX) {
            return Err(TokenError::NotAToken);
        }
        let (body, check) = token.rsplit_once('.').ok_or(TokenError::NotAToken)?;
        if body.len() <= PREFIX.len() {
            return Err(TokenError::NotAToken);
        }
        if check != check_of(body) {
            return Err(TokenError::BadCheck);
        }
        let malformed = |what: &str| TokenError::Malformed(what.to_string());
        let json = BASE64URL_NOPAD
            .decode(&body.as_bytes()[PREFIX.len()..])
            .map_err(|_| malformed("not base64url"))?;
        let p: Payload = serde_json::from_slice(&json)
            .map_err(|e| TokenError::Malformed(format!("its contents: {e}")))?;
        let pin = BASE64URL_NOPAD
            .decode(p.pin.as_bytes())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
            .ok_or_else(|| malformed("the CA pin is not 32 bytes"))?;
        let secret =
            Secret::decode(&p.secret).ok_or_else(|| malformed("the secret is not 32 bytes"))?;
        if p.addresses.is_empty() {
            return Err(malformed("it names no gateway address"));
        }
        if p.id.is_empty() || p.id.len() > 64 || !p.id.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(malformed("its id"));
        }
        Ok(EnrolmentToken {
            gateway: p.gateway,
            addresses: p.addresses,
            ca_pin: pin,
            id: p.id,
            secret,
            expires: p.expires,
            identity: p.identity,
            groups: p.groups,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> EnrolmentToken {
        EnrolmentToken {
            gateway: "site-b".into(),
            addresses: vec!["gw.site-b.example.org:7443".into(), "[fd00::1]:7443".into()],
            ca_pin: [7; 32],
            id: "0123456789abcdef".into(),
            secret: Secret([42; 32]),
            expires: 1_767_441_600,
            identity: "alice".into(),
            groups: vec!["lab".into()],
        }
    }

    #[test]
    fn a_token_round_trips_and_survives_line_breaks() {
        let text = sample().encode();
        assert!(text.starts_with("tunnel1."), "{text}");
        assert_eq!(EnrolmentToken::decode(&text), Ok(sample()));
        let (a, b) = text.split_at(40);
        assert_eq!(
            EnrolmentToken::decode(&format!("  {a}\n  {b}\n")),
            Ok(sample())
        );
    }

    #[test]
    fn every_single_character_typo_is_caught() {
        let text = sample().encode();
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        for i in 0..text.len() {
            let mut bytes = text.clone().into_bytes();
            let replacement =
                alphabet[(alphabet.iter().position(|c| *c == bytes[i]).unwrap_or(0) + 1) % 64];
            bytes[i] = replacement;
            let typo = String::from_utf8(bytes).unwrap();
            assert!(EnrolmentToken::decode(&typo).is_err(), "typo at {i} passed");
        }
        // Two neighbours swapped.
        let mut bytes = text.clone().into_bytes();
        let i = bytes
            .iter()
            .position(|c| *c != bytes[20])
            .unwrap_or(0)
            .max(21);
        bytes.swap(i - 1, i);
        if bytes != text.as_bytes() {
            assert_eq!(
                EnrolmentToken::decode(&String::from_utf8(bytes).unwrap()),
                Err(TokenError::BadCheck)
            );
        }
        assert_eq!(
            EnrolmentToken::decode(&text[..text.len() - 1]),
            Err(TokenError::BadCheck)
        );
        assert_eq!(EnrolmentToken::decode("hello"), Err(TokenError::NotAToken));
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let shown = format!("{:?}", sample());
        assert!(shown.contains("Secret(***)"), "{shown}");
        assert!(!shown.contains("42, 42"), "{shown}");
    }
}
