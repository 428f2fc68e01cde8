#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tunnel_fuzz::dns(data));
