//! A CPUID table as text: what `vmm cpuid --supported` captures and `testdata/` holds.
//!
//! ```text
//! # comment lines: provenance (host, kernel, date)
//! # leaf     subleaf    flags eax        ebx        ecx        edx
//! 0x00000001 0x00000000 0x0   0x00a00f11 0x00000800 0xfeda3203 0x178bfbff
//! ```

use kvm_bindings::kvm_cpuid_entry2;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("CPUID table line {line}: {why}")]
pub struct TableError {
    pub line: usize,
    pub why: String,
}

pub const HEADER: &str = "# leaf     subleaf    flags eax        ebx        ecx        edx";

pub fn format_entry(e: &kvm_cpuid_entry2) -> String {
    format!(
        "{:#010x} {:#010x} {:<5} {:#010x} {:#010x} {:#010x} {:#010x}",
        e.function,
        e.index,
        format!("{:#x}", e.flags),
        e.eax,
        e.ebx,
        e.ecx,
        e.edx
    )
}

pub fn format(entries: &[kvm_cpuid_entry2]) -> String {
    let mut s = String::from(HEADER);
    s.push('\n');
    for e in entries {
        s.push_str(&format_entry(e));
        s.push('\n');
    }
    s
}

fn hex(field: &str) -> Result<u32, String> {
    let digits = field
        .strip_prefix("0x")
        .ok_or_else(|| format!("'{field}' is not 0x-prefixed hex"))?;
    u32::from_str_radix(digits, 16).map_err(|e| format!("'{field}': {e}"))
}

pub fn parse(text: &str) -> Result<Vec<kvm_cpuid_entry2>, TableError> {
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |why: String| TableError { line: n + 1, why };
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() != 7 {
            return Err(err(format!("expected 7 fields, found {}", fields.len())));
        }
        let v = fields
            .iter()
            .map(|f| hex(f))
            .collect::<Result<Vec<u32>, String>>()
            .map_err(err)?;
        entries.push(kvm_cpuid_entry2 {
            function: v[0],
            index: v[1],
            flags: v[2],
            eax: v[3],
            ebx: v[4],
            ecx: v[5],
            edx: v[6],
            ..Default::default()
        });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_reads_back_as_written() {
        let e = vec![
            kvm_cpuid_entry2 {
                function: 0x8000_001e,
                index: 0,
                flags: 0,
                eax: 1,
                ebx: 0x100,
                ecx: 0,
                edx: 0xffff_ffff,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                flags: 1,
                ..Default::default()
            },
        ];
        let text = format!("# provenance\n\n{}", format(&e));
        let back = parse(&text).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(format(&back), format(&e));
    }

    #[test]
    fn malformed_lines_name_their_number() {
        assert_eq!(parse("# x\n0x1 0x0\n").unwrap_err().line, 2);
        assert!(parse("0x1 0x0 0x0 0x0 0x0 0x0 12")
            .unwrap_err()
            .why
            .contains("0x-prefixed"));
    }
}
