//! Embeds the test guest (`resources/guest`, built by `resources/guest/build`) in `vmm`, for
//! `vmm reconnect-test`. When it has not been built, nothing is embedded and `vmm` still builds;
//! the subcommand then says how to get it. `resources/setup` builds the guest before `vmm`.

use std::path::{Path, PathBuf};

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let guest_dir = manifest.join("../resources/guest");
    let elf = guest_dir.join("target/x86_64-unknown-linux-gnu/release/test-guest");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default()).join("guest.rs");
    let code = if elf.is_file() {
        println!("cargo:rerun-if-changed={}", elf.display());
        format!(
            "/// The test guest's ELF, embedded at build time.\n\
             pub const GUEST_ELF: Option<&[u8]> = Some(include_bytes!({:?}));\n",
            elf.display().to_string()
        )
    } else {
        // Watch the nearest folder that exists, so building the guest later reruns this script
        // (a missing file would rerun it on every build).
        println!(
            "cargo:rerun-if-changed={}",
            nearest_existing(&elf).display()
        );
        "/// No test guest was built when vmm was (run resources/guest/build, then rebuild).\n\
         pub const GUEST_ELF: Option<&[u8]> = None;\n"
            .to_string()
    };
    println!("cargo:rerun-if-changed=build.rs");
    if let Err(e) = std::fs::write(&out, code) {
        panic!("cannot write {}: {e}", out.display());
    }
}

fn nearest_existing(path: &Path) -> PathBuf {
    let mut p = path;
    while let Some(parent) = p.parent() {
        if parent.exists() {
            return parent.to_path_buf();
        }
        p = parent;
    }
    PathBuf::from(".")
}
