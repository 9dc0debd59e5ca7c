//! Which tests can run on this host is a property of the host's KVM: the full Linux boot needs
//! hardware KVM, the emulation-failure report only happens on PVM. The cfg `kvm_pvm_host` lets
//! those tests be marked `ignore` with their reason, so the runner counts them as ignored, not
//! passed. Detected again whenever /dev/kvm is recreated (a new boot, another machine); each such
//! test also checks at run time that the host is still what it was built for.
use std::path::Path;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(kvm_pvm_host)");
    println!("cargo::rerun-if-changed=/dev/kvm");
    let pvm = Path::new("/sys/module/kvm_pvm");
    if pvm.exists() {
        // Only an existing path: cargo would rerun this script on every build for a missing one.
        println!("cargo::rerun-if-changed=/sys/module/kvm_pvm");
        println!("cargo::rustc-cfg=kvm_pvm_host");
    }
}
