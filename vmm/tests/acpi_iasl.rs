//! Our ACPI tables read back by an independent parser: ACPICA's `iasl -d` disassembles each
//! table; it must accept every checksum and length and show what we meant to describe.

use std::process::Command;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::boot::acpi::{write_tables, MmioDeviceInfo};

fn read_table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
    let mut hdr = [0u8; 8];
    mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
    let len = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
    let mut t = vec![0u8; len];
    mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
    t
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

#[test]
fn iasl_disassembles_every_table_cleanly() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
    let devs = [
        MmioDeviceInfo {
            base: 0xd000_0000,
            size: 0x1000,
            gsi: 5,
        },
        MmioDeviceInfo {
            base: 0xd000_1000,
            size: 0x1000,
            gsi: 6,
        },
    ];
    let rsdp_addr = write_tables(&mem, 2, &devs).unwrap();
    let mut rsdp = vec![0u8; 36];
    mem.read_slice(&mut rsdp, GuestAddress(rsdp_addr)).unwrap();
    let xsdt = read_table(&mem, u64_at(&rsdp, 24));
    // iasl does not take a bare RSDP: check its two checksums (first 20 bytes, all 36) here.
    assert_eq!(&rsdp[0..8], b"RSD PTR ");
    let sum = |b: &[u8]| b.iter().fold(0u8, |a, x| a.wrapping_add(*x));
    assert_eq!((sum(&rsdp[..20]), sum(&rsdp)), (0, 0), "RSDP checksums");
    let mut tables = vec![("XSDT".to_string(), xsdt.clone())];
    for i in 0..(xsdt.len() - 36) / 8 {
        let t = read_table(&mem, u64_at(&xsdt, 36 + 8 * i));
        let sig = String::from_utf8_lossy(&t[0..4]).into_owned();
        if sig == "FACP" {
            tables.push(("DSDT".into(), read_table(&mem, u64_at(&t, 140))));
        }
        tables.push((sig, t));
    }
    let sigs: Vec<&str> = tables.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(sigs, ["XSDT", "DSDT", "FACP", "APIC"]);

    let dir = std::env::temp_dir().join(format!("vmm-acpi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut out = String::new();
    for (sig, bytes) in &tables {
        let dat = dir.join(format!("{}.dat", sig.to_lowercase()));
        std::fs::write(&dat, bytes).unwrap();
        let r = Command::new("iasl")
            .arg("-d")
            .arg(&dat)
            .current_dir(&dir)
            .output()
            .expect("iasl (acpica-tools) is installed by resources/setup");
        let log =
            String::from_utf8_lossy(&r.stdout).into_owned() + &String::from_utf8_lossy(&r.stderr);
        assert!(r.status.success(), "iasl -d {sig}: {log}");
        for bad in ["Error", "Warning", "Invalid", "Incorrect checksum"] {
            assert!(!log.contains(bad), "iasl complains about {sig}: {log}");
        }
        let dsl = std::fs::read_to_string(dat.with_extension("dsl")).unwrap();
        assert!(!dsl.contains("Incorrect"), "{sig}:\n{dsl}");
        out.push_str(&dsl);
    }
    if std::env::var_os("KEEP_ACPI").is_none() {
        std::fs::remove_dir_all(&dir).ok();
    }

    for want in [
        "\"LNRO0005\"",
        "0xD0000000",
        "0xD0001000",
        "Name (_S5, Package",
        "EisaId (\"PNP0501\")",
        "Hardware Reduced (V5) : 1",
        "Processor Local APIC",
        "I/O APIC",
    ] {
        assert!(
            out.contains(want),
            "missing {want} in the disassembly:\n{out}"
        );
    }
}
