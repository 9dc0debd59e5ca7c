//! The guest's command line (see the test-guest contract).
//!
//! Whitespace-separated tokens, any order. The first token naming a test
//! selects it; `irq`, `no-event-idx`, `no-indirect`, `blocks=`, `start=`,
//! `seed=`, `reqs=`, `qd=`, `rw=`, `idle=` and `disk=` are options (and a few
//! more, see `Options`); `virtio_mmio.device=SIZE@ADDR:IRQ` describes a device
//! (Linux syntax). Any other `key=value` token is ignored, the way a kernel
//! ignores parameters meant for someone else; any other bare word is taken as
//! the name of an unknown test.

/// The most virtio-mmio devices the guest keeps track of.
pub const MAX_DEVICES: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Test {
    Hello,
    Exit(u8),
    Fault,
    Compute,
    BlkWriteVerify,
    BlkBench,
    Cpuid,
}

impl Test {
    /// The name every output line of the test starts with.
    pub fn name(self) -> &'static str {
        match self {
            Test::Hello => "hello",
            Test::Exit(_) => "exit",
            Test::Fault => "fault",
            Test::Compute => "compute",
            Test::BlkWriteVerify => "blk-write-verify",
            Test::BlkBench => "blk-bench",
            Test::Cpuid => "cpuid",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadWrite {
    RandRead,
    RandWrite,
}

impl ReadWrite {
    pub fn name(self) -> &'static str {
        match self {
            ReadWrite::RandRead => "randread",
            ReadWrite::RandWrite => "randwrite",
        }
    }
}

/// A `virtio_mmio.device=` entry: register window and interrupt line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    pub gsi: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// Wait for completions by interrupt instead of polling the used ring.
    pub irq: bool,
    /// Do not negotiate VIRTIO_F_EVENT_IDX even if the device offers it (`no-event-idx`).
    pub no_event_idx: bool,
    /// Do not negotiate VIRTIO_F_INDIRECT_DESC even if the device offers it (`no-indirect`).
    pub no_indirect: bool,
    /// blk-write-verify: after verifying, reset the device (status 0), bring it up again and
    /// verify once more (the VMM must stop and restart the backend's rings in between).
    pub reset: bool,
    pub blocks: u64,
    pub start: u64,
    pub seed: u64,
    /// blk-write-verify: write the blocks this many times, pass p with seed `seed + p`, then
    /// verify the last pass. A write of an earlier pass that the backend replays after a later
    /// one completed (a recovery bug) leaves a wrong block.
    pub passes: u64,
    /// blk-write-verify: a byte on the serial port (the VMM's stdin) ends the writing at the end
    /// of the pass under way; that pass is then the last and is verified (`vmm reconnect-test`
    /// stops a long run this way once its kills are done).
    pub stop_on_input: bool,
    /// blk-write-verify: print a progress line every this many completions (a host that plots
    /// throughput over time, as `vmm reconnect-test --plot` does, asks for a finer grain).
    pub progress: u64,
    pub reqs: u64,
    pub qd: u16,
    pub rw: ReadWrite,
    /// blk-bench: after the timed loop, keep the device set up but idle for this many ms
    /// (`idle=MS`; 0: none), so the host can watch what the backend does with nothing to do.
    pub idle_ms: u64,
    /// Index among the virtio-blk devices found; None: the first.
    pub disk: Option<usize>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            irq: false,
            no_event_idx: false,
            no_indirect: false,
            reset: false,
            blocks: 64,
            start: 0,
            seed: 1,
            passes: 1,
            stop_on_input: false,
            progress: 4096,
            reqs: 10_000,
            qd: 1,
            rw: ReadWrite::RandRead,
            idle_ms: 0,
            disk: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub test: Test,
    pub options: Options,
    devices: [MmioDevice; MAX_DEVICES],
    device_count: usize,
}

impl Config {
    /// The devices in command-line order, without duplicates (QEMU's microvm
    /// adds its own entries, which may repeat ones given by hand).
    pub fn devices(&self) -> &[MmioDevice] {
        &self.devices[..self.device_count]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmdlineError<'a> {
    UnknownTest(&'a str),
    BadValue { token: &'a str, why: &'static str },
    TooManyDevices,
}

impl core::fmt::Display for CmdlineError<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CmdlineError::UnknownTest(name) => write!(f, "unknown test {name:?}"),
            CmdlineError::BadValue { token, why } => write!(f, "bad value in {token:?}: {why}"),
            CmdlineError::TooManyDevices => {
                write!(f, "more than {MAX_DEVICES} virtio_mmio.device entries")
            }
        }
    }
}

/// Parse a number: decimal, or hexadecimal with a `0x` prefix.
pub fn parse_number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) if !hex.is_empty() => u64::from_str_radix(hex, 16).ok(),
        Some(_) => None,
        None if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) => None,
        None => text.parse().ok(),
    }
}

/// Parse a size the way Linux's memparse does for these entries: a number
/// with an optional K, M or G suffix.
pub fn parse_size(text: &str) -> Option<u64> {
    let (digits, shift) = match text.as_bytes().last()? {
        b'k' | b'K' => (&text[..text.len() - 1], 10),
        b'm' | b'M' => (&text[..text.len() - 1], 20),
        b'g' | b'G' => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    parse_number(digits)?.checked_mul(1 << shift)
}

/// Parse the value of `virtio_mmio.device=`: `SIZE@ADDR:IRQ[:ID]`.
pub fn parse_mmio_device(value: &str) -> Option<MmioDevice> {
    let (size, rest) = value.split_once('@')?;
    let (base, rest) = rest.split_once(':')?;
    let gsi = rest.split_once(':').map_or(rest, |(irq, _id)| irq);
    let device = MmioDevice {
        size: parse_size(size)?,
        base: parse_number(base)?,
        gsi: u32::try_from(parse_number(gsi)?).ok()?,
    };
    (device.size > 0).then_some(device)
}

fn bad<'a>(token: &'a str, why: &'static str) -> CmdlineError<'a> {
    CmdlineError::BadValue { token, why }
}

fn number_in<'a>(token: &'a str, value: &str, min: u64, max: u64) -> Result<u64, CmdlineError<'a>> {
    let n = parse_number(value).ok_or(bad(token, "not a number"))?;
    if n < min || n > max {
        return Err(bad(token, "out of range"));
    }
    Ok(n)
}

pub fn parse(cmdline: &str) -> Result<Config, CmdlineError<'_>> {
    let mut test = None;
    let mut options = Options::default();
    let mut devices = [MmioDevice {
        base: 0,
        size: 0,
        gsi: 0,
    }; MAX_DEVICES];
    let mut device_count = 0;

    for token in cmdline.split_ascii_whitespace() {
        let named_test = match token {
            "hello" => Some(Test::Hello),
            "fault" => Some(Test::Fault),
            "compute" => Some(Test::Compute),
            "cpuid" => Some(Test::Cpuid),
            "blk-write-verify" => Some(Test::BlkWriteVerify),
            "blk-bench" => Some(Test::BlkBench),
            _ => None,
        };
        if let Some(named) = named_test {
            test.get_or_insert(named);
            continue;
        }
        if token == "irq" {
            options.irq = true;
            continue;
        }
        if token == "no-event-idx" {
            options.no_event_idx = true;
            continue;
        }
        if token == "no-indirect" {
            options.no_indirect = true;
            continue;
        }
        if token == "reset" {
            options.reset = true;
            continue;
        }
        if token == "stop-on-input" {
            options.stop_on_input = true;
            continue;
        }
        let Some((key, value)) = token.split_once('=') else {
            return Err(CmdlineError::UnknownTest(token));
        };
        match key {
            "exit" => {
                let status = number_in(token, value, 0, 255)? as u8;
                test.get_or_insert(Test::Exit(status));
            }
            "blocks" => options.blocks = number_in(token, value, 1, u64::MAX)?,
            "start" => options.start = number_in(token, value, 0, u64::MAX)?,
            "seed" => options.seed = number_in(token, value, 0, u64::MAX)?,
            "passes" => options.passes = number_in(token, value, 1, 1_000_000)?,
            "progress" => options.progress = number_in(token, value, 1, u64::MAX)?,
            "reqs" => options.reqs = number_in(token, value, 1, u64::MAX)?,
            "idle" => options.idle_ms = number_in(token, value, 0, u64::MAX)?,
            "qd" => options.qd = number_in(token, value, 1, u64::from(u16::MAX))? as u16,
            "disk" => {
                options.disk = Some(number_in(token, value, 0, MAX_DEVICES as u64 - 1)? as usize)
            }
            "rw" => {
                options.rw = match value {
                    "randread" => ReadWrite::RandRead,
                    "randwrite" => ReadWrite::RandWrite,
                    _ => return Err(bad(token, "expected randread or randwrite")),
                }
            }
            "virtio_mmio.device" => {
                let device =
                    parse_mmio_device(value).ok_or(bad(token, "expected SIZE@ADDR:IRQ"))?;
                if devices[..device_count]
                    .iter()
                    .any(|d| d.base == device.base)
                {
                    continue;
                }
                if device_count == MAX_DEVICES {
                    return Err(CmdlineError::TooManyDevices);
                }
                devices[device_count] = device;
                device_count += 1;
            }
            _ => {} // someone else's parameter
        }
    }
    Ok(Config {
        test: test.unwrap_or(Test::Hello),
        options,
        devices,
        device_count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_command_line_runs_hello_with_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config.test, Test::Hello);
        assert_eq!(config.options, Options::default());
        assert!(config.devices().is_empty());
    }

    #[test]
    fn first_test_token_wins_and_options_go_anywhere() {
        let config =
            parse("qd=4 console=ttyS0 blk-bench compute irq rw=randwrite reqs=0x10 reset").unwrap();
        assert_eq!(config.test, Test::BlkBench);
        assert!(config.options.irq);
        assert!(config.options.reset);
        assert_eq!(config.options.qd, 4);
        assert_eq!(config.options.passes, 1);
        assert!(!config.options.stop_on_input);
        assert!(
            parse("blk-write-verify stop-on-input")
                .unwrap()
                .options
                .stop_on_input
        );
        assert_eq!(
            parse("blk-write-verify passes=3").unwrap().options.passes,
            3
        );
        assert_eq!(
            parse("blk-write-verify progress=256")
                .unwrap()
                .options
                .progress,
            256
        );
        assert_eq!(
            parse("blk-write-verify passes=3").unwrap().options.passes,
            3
        );
        assert_eq!(config.options.reqs, 16);
        assert_eq!(config.options.rw, ReadWrite::RandWrite);
    }

    #[test]
    fn ring_feature_switches() {
        let config = parse("blk-bench").unwrap();
        assert!(!config.options.no_event_idx);
        assert!(!config.options.no_indirect);
        let config = parse("blk-bench no-event-idx qd=32").unwrap();
        assert!(config.options.no_event_idx);
        assert!(!config.options.no_indirect);
        assert_eq!(config.options.qd, 32);
        let config = parse("no-indirect blk-write-verify irq").unwrap();
        assert_eq!(config.test, Test::BlkWriteVerify);
        assert!(!config.options.no_event_idx);
        assert!(config.options.no_indirect);
        assert!(config.options.irq);
        let both = parse("blk-bench no-indirect no-event-idx").unwrap().options;
        assert!(both.no_event_idx && both.no_indirect);
        // Not tests and not key=value: a typo is an unknown test, not silently ignored.
        assert_eq!(
            parse("blk-bench no-event_idx"),
            Err(CmdlineError::UnknownTest("no-event_idx"))
        );
    }

    #[test]
    fn idle_milliseconds() {
        assert_eq!(parse("blk-bench").unwrap().options.idle_ms, 0);
        assert_eq!(parse("blk-bench idle=1500").unwrap().options.idle_ms, 1500);
        assert_eq!(parse("blk-bench idle=0").unwrap().options.idle_ms, 0);
        assert_eq!(parse("idle=0x10 blk-bench").unwrap().options.idle_ms, 16);
        assert!(matches!(
            parse("blk-bench idle=-1"),
            Err(CmdlineError::BadValue { .. })
        ));
        assert!(matches!(
            parse("blk-bench idle=1s"),
            Err(CmdlineError::BadValue { .. })
        ));
        assert!(matches!(
            parse("blk-bench idle="),
            Err(CmdlineError::BadValue { .. })
        ));
    }

    #[test]
    fn exit_status_is_bounded() {
        assert_eq!(parse("exit=7").unwrap().test, Test::Exit(7));
        assert_eq!(parse("exit=255").unwrap().test, Test::Exit(255));
        assert!(matches!(
            parse("exit=256"),
            Err(CmdlineError::BadValue { .. })
        ));
        assert!(matches!(
            parse("exit=-1"),
            Err(CmdlineError::BadValue { .. })
        ));
        assert!(matches!(parse("exit="), Err(CmdlineError::BadValue { .. })));
    }

    #[test]
    fn cpuid_is_a_test() {
        assert_eq!(parse("cpuid").unwrap().test, Test::Cpuid);
        assert_eq!(Test::Cpuid.name(), "cpuid");
    }

    #[test]
    fn unknown_bare_word_is_an_unknown_test() {
        assert_eq!(
            parse("hello bogus"),
            Err(CmdlineError::UnknownTest("bogus"))
        );
    }

    #[test]
    fn zero_counts_are_rejected() {
        assert!(parse("blocks=0").is_err());
        assert!(parse("qd=0").is_err());
        assert!(parse("reqs=0").is_err());
        assert!(parse("qd=65536").is_err());
        assert!(parse("rw=seqread").is_err());
    }

    #[test]
    fn mmio_devices_in_linux_syntax() {
        assert_eq!(
            parse_mmio_device("512@0xfeb00e00:12"),
            Some(MmioDevice {
                base: 0xfeb0_0e00,
                size: 512,
                gsi: 12
            })
        );
        assert_eq!(
            parse_mmio_device("4K@0xd0000000:5:3"),
            Some(MmioDevice {
                base: 0xd000_0000,
                size: 4096,
                gsi: 5
            })
        );
        assert_eq!(
            parse_mmio_device("0x1000@0x1000:1").map(|d| d.size),
            Some(4096)
        );
        assert_eq!(parse_mmio_device("512@0xfeb00e00"), None);
        assert_eq!(parse_mmio_device("@0x1000:1"), None);
        assert_eq!(parse_mmio_device("0@0x1000:1"), None);
        assert_eq!(parse_mmio_device("99999999999G@0x1000:1"), None);
        assert_eq!(parse_mmio_device("512@0x1000:4294967296"), None);
    }

    #[test]
    fn duplicate_devices_are_dropped_and_order_kept() {
        let config = parse(
            "virtio_mmio.device=512@0xfeb00e00:12 virtio_mmio.device=512@0xfeb00c00:11 \
             virtio_mmio.device=512@0xfeb00e00:12",
        )
        .unwrap();
        let bases: Vec<u64> = config.devices().iter().map(|d| d.base).collect();
        assert_eq!(bases, vec![0xfeb0_0e00, 0xfeb0_0c00]);
    }

    #[test]
    fn too_many_devices_is_an_error() {
        let line: String = (0..=MAX_DEVICES)
            .map(|i| format!("virtio_mmio.device=512@{:#x}:5 ", 0x1000 * (i + 1)))
            .collect();
        assert_eq!(parse(&line), Err(CmdlineError::TooManyDevices));
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_number("0"), Some(0));
        assert_eq!(parse_number("0x1f"), Some(31));
        assert_eq!(parse_number("0x"), None);
        assert_eq!(parse_number("+5"), None);
        assert_eq!(parse_number("18446744073709551616"), None);
    }
}
