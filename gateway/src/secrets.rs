//! Random numbers and secret comparisons: the only places the gateway touches secrets.

use ring::rand::{SecureRandom, SystemRandom};
use subtle::ConstantTimeEq;

/// Fills `buf` from the system's cryptographic random source.
pub fn fill_random(buf: &mut [u8]) -> anyhow::Result<()> {
    SystemRandom::new()
        .fill(buf)
        .map_err(|_| anyhow::anyhow!("the system's random source (getrandom) failed"))
}

/// True when two digests are equal, in time that does not depend on where they differ.
pub fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.ct_eq(b).into()
}

/// Hex of bytes, lower case.
pub fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

/// Bytes of lower-case hex, if it is exactly 32 of them.
pub fn digest_from_hex(text: &str) -> Option<[u8; 32]> {
    let bytes = data_encoding::HEXLOWER.decode(text.as_bytes()).ok()?;
    <[u8; 32]>::try_from(bytes.as_slice()).ok()
}
