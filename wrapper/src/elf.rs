//! Can LD_PRELOAD reach this program? A statically linked program has no dynamic
//! loader to honour it, and a Go program makes its own system calls; both bypass the
//! library. Read from the ELF headers, never by running the program.
//!
//! Every offset, count and size comes from the file, which may be truncated or made
//! to mislead: the headers are read by a well-kept parser (`object`), and what does
//! not add up is [`Executable::Other`], never a panic.

/// What kind of executable a file is, as far as preloading goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Executable {
    /// Dynamically linked through libc: preloading works.
    Dynamic,
    /// No program interpreter: LD_PRELOAD is never read.
    Static,
    /// A Go binary: its network calls do not go through libc.
    Go,
    /// Not ELF (a script, say), or headers that do not add up: its interpreter, or the
    /// kernel, decides.
    Other,
}

use object::elf::{FileHeader64, PT_INTERP};
use object::read::elf::{ElfFile, ProgramHeader};
use object::{LittleEndian, Object};

/// Size of a 64-bit ELF file header.
const ELF_HEADER: usize = 64;
/// The sections that mark a Go binary.
const GO_SECTIONS: [&str; 2] = [".go.buildinfo", ".note.go.buildid"];

/// Classifies a 64-bit little-endian ELF file from its bytes, with the `object`
/// crate's parser: headers, tables and names that do not add up are [`Executable::Other`].
pub fn classify(b: &[u8]) -> Executable {
    // A whole 64-byte ELF header first: fuzzing found a 60-byte file whose program
    // header table overlapped a partial header and read as "dynamically linked".
    if b.len() < ELF_HEADER {
        return Executable::Other;
    }
    let Ok(file) = ElfFile::<FileHeader64<LittleEndian>>::parse(b) else {
        return Executable::Other;
    };
    if GO_SECTIONS
        .iter()
        .any(|name| file.section_by_name(name).is_some())
    {
        return Executable::Go;
    }
    let endian = file.endian();
    let interpreted = file
        .elf_program_headers()
        .iter()
        .any(|header| header.p_type(endian) == PT_INTERP);
    if interpreted {
        Executable::Dynamic
    } else {
        Executable::Static
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn classifies_real_binaries() {
        let bash = std::fs::read("/bin/bash").unwrap_or_default();
        assert_eq!(classify(&bash), Executable::Dynamic);
        assert_eq!(classify(b"#!/bin/sh\n"), Executable::Other);
        assert_eq!(classify(b"\x7fELF\x02\x01"), Executable::Other);
    }

    /// The header fields the classifier reads.
    #[derive(Debug, Clone, Copy)]
    struct Header {
        phoff: u64,
        shoff: u64,
        phentsize: u16,
        phnum: u16,
        shentsize: u16,
        shnum: u16,
        shstrndx: u16,
    }

    fn put(file: &mut [u8], at: usize, bytes: &[u8]) {
        file[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// A 64-byte ELF header with `h`, followed by `body`.
    fn elf(h: Header, body: &[u8]) -> Vec<u8> {
        let mut file = vec![0u8; 64];
        put(&mut file, 0, b"\x7fELF\x02\x01\x01");
        put(&mut file, 0x20, &h.phoff.to_le_bytes());
        put(&mut file, 0x28, &h.shoff.to_le_bytes());
        put(&mut file, 0x36, &h.phentsize.to_le_bytes());
        put(&mut file, 0x38, &h.phnum.to_le_bytes());
        put(&mut file, 0x3a, &h.shentsize.to_le_bytes());
        put(&mut file, 0x3c, &h.shnum.to_le_bytes());
        put(&mut file, 0x3e, &h.shstrndx.to_le_bytes());
        file.extend_from_slice(body);
        file
    }

    /// A well-formed file: program headers of `types`, and sections named `sections`
    /// (their string table is the last section).
    fn well_formed(types: &[u32], sections: &[&str]) -> Vec<u8> {
        let mut names = vec![0u8];
        let mut name_at = Vec::new();
        for name in sections {
            name_at.push(names.len() as u32);
            names.extend_from_slice(name.as_bytes());
            names.push(0);
        }
        let phoff = 64;
        let shoff = phoff + 56 * types.len();
        let names_offset = shoff + 64 * (sections.len() + 1);
        let mut body = Vec::new();
        for kind in types {
            let mut header = [0u8; 56];
            header[..4].copy_from_slice(&kind.to_le_bytes());
            body.extend_from_slice(&header);
        }
        for at in name_at.iter().chain([&0]) {
            let mut header = [0u8; 64];
            header[..4].copy_from_slice(&at.to_le_bytes());
            header[0x18..0x20].copy_from_slice(&(names_offset as u64).to_le_bytes());
            body.extend_from_slice(&header);
        }
        // The last section is the string table of the names, as in a real file.
        let names_header = body.len() - 64;
        body[names_header + 4..names_header + 8].copy_from_slice(&3u32.to_le_bytes()); // SHT_STRTAB
        body[names_header + 0x20..names_header + 0x28]
            .copy_from_slice(&(names.len() as u64).to_le_bytes());
        body.extend_from_slice(&names);
        let h = Header {
            phoff: phoff as u64,
            shoff: shoff as u64,
            phentsize: 56,
            phnum: types.len() as u16,
            shentsize: 64,
            shnum: sections.len() as u16 + 1,
            shstrndx: sections.len() as u16,
        };
        elf(h, &body)
    }

    #[test]
    fn classifies_well_formed_headers() {
        let dynamic = well_formed(&[6, 3, 1], &[".text", ".dynamic"]);
        assert_eq!(classify(&dynamic), Executable::Dynamic);
        assert_eq!(
            classify(&well_formed(&[6, 1], &[".text"])),
            Executable::Static
        );
        let go = well_formed(&[1], &[".text", ".note.go.buildid"]);
        assert_eq!(classify(&go), Executable::Go);
        // A name that only begins like one of Go's is not one.
        let not_go = well_formed(&[1], &[".go.buildinfox"]);
        assert_eq!(classify(&not_go), Executable::Static);
        // Every shorter file is truncated somewhere: never a panic, never "dynamic"
        // unless the interpreter's header is whole.
        for len in 0..dynamic.len() {
            let kind = classify(&dynamic[..len]);
            assert!(
                kind == Executable::Other || kind == Executable::Dynamic && len >= 64 + 3 * 56,
                "{len} bytes: {kind:?}"
            );
        }
    }

    #[test]
    fn crafted_offsets_and_counts_are_not_trusted() {
        let huge = Header {
            phoff: u64::MAX,
            shoff: u64::MAX - 0x10,
            phentsize: u16::MAX,
            phnum: u16::MAX,
            shentsize: u16::MAX,
            shnum: u16::MAX,
            shstrndx: u16::MAX,
        };
        let body = vec![0u8; 4096];
        assert_eq!(classify(&elf(huge, &body)), Executable::Other);
        // Offsets that overflow only once an index or a field offset is added.
        let near_end = Header {
            phoff: usize::MAX as u64 - 100,
            shoff: usize::MAX as u64 - 0x20,
            ..huge
        };
        assert_eq!(classify(&elf(near_end, &body)), Executable::Other);
        // Tables that start inside the file and run past its end.
        let past_end = Header {
            phoff: 64,
            shoff: 64,
            phentsize: 56,
            phnum: 1000,
            shentsize: 64,
            shnum: 1000,
            shstrndx: 3,
        };
        assert_eq!(classify(&elf(past_end, &body)), Executable::Other);
        // A string table index past the section table, and a string table offset
        // past everything: headers that do not add up, so the kernel decides.
        let mut file = well_formed(&[1], &[".text"]);
        put(&mut file, 0x3e, &100u16.to_le_bytes());
        assert_eq!(classify(&file), Executable::Other);
        let mut file = well_formed(&[1], &[".note.go.buildid"]);
        let names_field = 64 + 56 + 64 + 0x18;
        put(&mut file, names_field, &u64::MAX.to_le_bytes());
        assert_eq!(classify(&file), Executable::Other);
        // Entries of zero size: a table no real file has.
        let zero = Header {
            phoff: 64,
            shoff: 64,
            phentsize: 0,
            phnum: u16::MAX,
            shentsize: 0,
            shnum: u16::MAX,
            shstrndx: u16::MAX,
        };
        assert_eq!(classify(&elf(zero, &body)), Executable::Other);
    }

    /// Header fields near the edges: zero, small, around the file's length, huge.
    fn field() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0u64),
            0u64..512,
            Just(u64::MAX),
            (0u64..64).prop_map(|d| u64::MAX - d),
            (0u64..64).prop_map(|d| usize::MAX as u64 - d),
            any::<u64>(),
        ]
    }

    fn header() -> impl Strategy<Value = Header> {
        let small = || field().prop_map(|v| v as u16);
        (
            field(),
            field(),
            small(),
            small(),
            small(),
            small(),
            small(),
        )
            .prop_map(
                |(phoff, shoff, phentsize, phnum, shentsize, shnum, shstrndx)| Header {
                    phoff,
                    shoff,
                    phentsize,
                    phnum,
                    shentsize,
                    shnum,
                    shstrndx,
                },
            )
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            classify(&bytes);
            let mut elf = b"\x7fELF\x02\x01".to_vec();
            elf.extend_from_slice(&bytes);
            classify(&elf);
        }

        #[test]
        fn crafted_headers_never_panic(
            h in header(),
            body in proptest::collection::vec(any::<u8>(), 0..2048),
        ) {
            classify(&elf(h, &body));
        }
    }
}
