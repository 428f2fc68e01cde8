//! Links the unwinder into the library itself instead of loading `libgcc_s.so.1`.
//!
//! Rust's standard library needs an unwinder (a panic in a hook is caught and turned
//! into an errno, never unwound into the program). By default rustc gets it from
//! `libgcc_s.so.1`, and loading that library — whose constructor probes the CPU — was
//! most of the start-up cost every process pays under the preload (~150 µs of ~250).
//! Linking GCC's static unwinder whole makes `libgcc_s` unneeded, so `--as-needed`
//! drops it. Only the hooks are exported (cdylib), so the program's own unwinder (a
//! C++ program's `libgcc_s`) is neither replaced nor disturbed.
fn main() {
    println!("cargo:rustc-link-lib=static:+whole-archive=gcc_eh");
}
