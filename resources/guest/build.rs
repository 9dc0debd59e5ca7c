//! Link the guest binary as a static, freestanding ELF laid out by linker.ld.
//! The flags go to the binary only, so `cargo test --lib` still links an
//! ordinary host test program.

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    for arg in [
        "-nostartfiles".to_string(),
        "-nostdlib".to_string(),
        "-static".to_string(),
        "-no-pie".to_string(),
        format!("-Wl,-T,{dir}/linker.ld"),
        "-Wl,--build-id=none".to_string(),
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rerun-if-changed=src/boot.s");
}
