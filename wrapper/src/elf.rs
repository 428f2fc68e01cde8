//! Can LD_PRELOAD reach this program? A statically linked program has no dynamic
//! loader to honour it, and a Go program makes its own system calls; both bypass the
//! library. Read from the ELF headers, never by running the program.

/// What kind of executable a file is, as far as preloading goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Executable {
    /// Dynamically linked through libc: preloading works.
    Dynamic,
    /// No program interpreter: LD_PRELOAD is never read.
    Static,
    /// A Go binary: its network calls do not go through libc.
    Go,
    /// Not ELF (a script, say): its interpreter decides.
    Other,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<usize> {
    usize::try_from(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?)).ok()
}

const PT_INTERP: u32 = 3;

/// Classifies a 64-bit little-endian ELF file from its bytes.
pub fn classify(b: &[u8]) -> Executable {
    if b.get(..4) != Some(b"\x7fELF") || b.get(4) != Some(&2) || b.get(5) != Some(&1) {
        return Executable::Other;
    }
    if has_go_section(b).unwrap_or(false) {
        return Executable::Go;
    }
    let interp = (|| {
        let phoff = u64_at(b, 0x20)?;
        let phentsize = usize::from(u16_at(b, 0x36)?);
        let phnum = usize::from(u16_at(b, 0x38)?);
        Some((0..phnum).any(|i| u32_at(b, phoff + i * phentsize) == Some(PT_INTERP)))
    })();
    match interp {
        Some(true) => Executable::Dynamic,
        Some(false) => Executable::Static,
        None => Executable::Other,
    }
}

fn has_go_section(b: &[u8]) -> Option<bool> {
    let shoff = u64_at(b, 0x28)?;
    let shentsize = usize::from(u16_at(b, 0x3a)?);
    let shnum = usize::from(u16_at(b, 0x3c)?);
    let shstrndx = usize::from(u16_at(b, 0x3e)?);
    let names_offset = u64_at(b, shoff + shstrndx * shentsize + 0x18)?;
    Some((0..shnum).any(|i| {
        let name = u32_at(b, shoff + i * shentsize).and_then(|n| {
            let start = names_offset.checked_add(n as usize)?;
            let rest = b.get(start..)?;
            let end = rest.iter().position(|c| *c == 0)?;
            rest.get(..end)
        });
        matches!(name, Some(b".go.buildinfo") | Some(b".note.go.buildid"))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_real_binaries() {
        let bash = std::fs::read("/bin/bash").unwrap_or_default();
        assert_eq!(classify(&bash), Executable::Dynamic);
        assert_eq!(classify(b"#!/bin/sh\n"), Executable::Other);
        assert_eq!(classify(b"\x7fELF\x02\x01"), Executable::Other);
    }
}
