//! Validated VM configuration: what the CLI builds and what tests may build directly.

use std::path::PathBuf;
use std::time::Duration;

pub use devices::blk::backend::IoEngine;
pub use devices::virtio_mmio::ReconnectPolicy;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid memory size '{0}': expected a number with an optional K, M or G suffix (e.g. 256M)")]
    BadMemSize(String),
    #[error("memory size {0} bytes is too small: the VM needs at least {1} bytes")]
    MemTooSmall(u64, u64),
    #[error("memory size {0} bytes is too large: at most {1} bytes are supported")]
    MemTooLarge(u64, u64),
    #[error("memory size {0} bytes is not a multiple of 4 KiB (KVM maps guest RAM in pages)")]
    MemNotPageAligned(u64),
    #[error("--cpus must be between 1 and {max}, got {got}")]
    BadCpuCount { got: u32, max: u32 },
    #[error("invalid --blk '{0}': {1}")]
    BadBlk(String, &'static str),
}

/// A virtio-blk device: served by our in-process fallback backend or by an external one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlkConfig {
    /// `--blk path=FILE[,readonly][,queues=N][,direct=on|off][,engine=inline|threads|uring]`:
    /// our backend on a thread, over a socketpair.
    InProcess {
        path: PathBuf,
        readonly: bool,
        queues: u16,
        /// Open the image with O_DIRECT.
        direct: bool,
        /// Who runs each queue's disk I/O.
        engine: IoEngine,
    },
    /// `--blk socket=PATH[,queues=N][,reconnect=off|MS]`: any vhost-user-blk backend listening
    /// on a unix socket. Once connected, a backend that goes away is reconnected per `reconnect`
    /// (default: for ever, with backoff; `MS`: every MS milliseconds, for ever).
    Socket {
        path: PathBuf,
        queues: u16,
        reconnect: ReconnectPolicy,
    },
}

/// Request queues a blk device may expose (the backend may serve fewer; the handshake checks).
pub use vhost_frontend::wire::MAX_QUEUES as MAX_BLK_QUEUES;

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub mem_bytes: u64,
    pub cpus: u32,
    pub blk: Vec<BlkConfig>,
    pub trace_vhost: bool,
}

/// Below this the boot structures, the ACPI area and a kernel at 1 MiB cannot fit.
pub const MIN_MEM_BYTES: u64 = 2 << 20;
/// One memfd, RAM above the MMIO gap allowed; bounded so a typo can't ask for a petabyte.
pub const MAX_MEM_BYTES: u64 = 64 << 30;
/// The in-kernel IOAPIC/MADT we build have room for this many local APICs.
pub const MAX_CPUS: u32 = 64;

/// KVM_SET_USER_MEMORY_REGION takes whole pages only.
const PAGE_SIZE: u64 = 4096;

/// Parses `256M`, `1G`, `4096K`, `1048576` (bytes).
pub fn parse_mem_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadMemSize(s.to_string());
    let t = s.trim();
    let (digits, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let bytes = n.checked_mul(1u64 << shift).ok_or_else(bad)?;
    if bytes < MIN_MEM_BYTES {
        return Err(ConfigError::MemTooSmall(bytes, MIN_MEM_BYTES));
    }
    if bytes > MAX_MEM_BYTES {
        return Err(ConfigError::MemTooLarge(bytes, MAX_MEM_BYTES));
    }
    if !bytes.is_multiple_of(PAGE_SIZE) {
        return Err(ConfigError::MemNotPageAligned(bytes));
    }
    Ok(bytes)
}

pub fn check_cpus(n: u32) -> Result<u32, ConfigError> {
    if n == 0 || n > MAX_CPUS {
        return Err(ConfigError::BadCpuCount {
            got: n,
            max: MAX_CPUS,
        });
    }
    Ok(n)
}

/// Longest `reconnect=MS` interval: a typo must not mean "retry once a day".
pub const MAX_RECONNECT_MS: u64 = 60_000;

/// Parses one `--blk` value: `path=FILE[,readonly][,queues=N]` or
/// `socket=PATH[,queues=N][,reconnect=off|MS]`.
pub fn parse_blk(s: &str) -> Result<BlkConfig, ConfigError> {
    let bad = |why| ConfigError::BadBlk(s.to_string(), why);
    let mut path = None;
    let mut socket = None;
    let mut readonly = false;
    let mut queues = 1u16;
    let mut reconnect = None;
    let mut direct = None;
    let mut engine = None;
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("path", v)) if !v.is_empty() => path = Some(PathBuf::from(v)),
            Some(("socket", v)) if !v.is_empty() => socket = Some(PathBuf::from(v)),
            Some(("queues", v)) => match v.parse::<u16>() {
                Ok(n) if (1..=MAX_BLK_QUEUES).contains(&n) => queues = n,
                _ => return Err(bad("queues= takes a number from 1 to 64")),
            },
            Some(("reconnect", "off")) => reconnect = Some(ReconnectPolicy::Off),
            Some(("reconnect", v)) => match v.parse::<u64>() {
                Ok(ms) if (1..=MAX_RECONNECT_MS).contains(&ms) => {
                    reconnect = Some(ReconnectPolicy::every(Duration::from_millis(ms)))
                }
                _ => return Err(bad("reconnect= takes off or milliseconds from 1 to 60000")),
            },
            Some(("direct", "on")) => direct = Some(true),
            Some(("direct", "off")) => direct = Some(false),
            Some(("direct", _)) => return Err(bad("direct= takes on or off")),
            Some(("engine", v)) => match v.parse::<IoEngine>() {
                Ok(e) => engine = Some(e),
                Err(_) => return Err(bad("engine= takes inline, threads or uring")),
            },
            None if part == "readonly" => readonly = true,
            _ => {
                return Err(bad(
                    "expected path=FILE[,readonly][,queues=N][,direct=on|off]\
                     [,engine=inline|threads|uring] \
                     or socket=PATH[,queues=N][,reconnect=off|MS]",
                ))
            }
        }
    }
    match (path, socket) {
        (Some(_), None) if reconnect.is_some() => Err(bad(
            "reconnect= is for socket= backends; the in-process backend does not go away",
        )),
        (Some(path), None) => Ok(BlkConfig::InProcess {
            path,
            readonly,
            queues,
            direct: direct.unwrap_or(false),
            engine: engine.unwrap_or_default(),
        }),
        (None, Some(_)) if direct.is_some() || engine.is_some() => Err(bad(
            "direct= and engine= are options of our in-process backend; pass them to the \
             backend (vmm blk-backend --direct --io-engine)",
        )),
        (None, Some(path)) if !readonly => Ok(BlkConfig::Socket {
            path,
            queues,
            reconnect: reconnect.unwrap_or(ReconnectPolicy::DEFAULT),
        }),
        (None, Some(_)) => Err(bad(
            "readonly is a property of the backend; pass it to the backend",
        )),
        _ => Err(bad("give exactly one of path= or socket=")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_sizes() {
        assert_eq!(parse_mem_size("256M"), Ok(256 << 20));
        assert_eq!(parse_mem_size("1G"), Ok(1 << 30));
        assert_eq!(parse_mem_size("4096k"), Ok(4 << 20));
        assert_eq!(parse_mem_size("8388608"), Ok(8 << 20));
        assert!(matches!(
            parse_mem_size("1K"),
            Err(ConfigError::MemTooSmall(..))
        ));
        assert!(matches!(
            parse_mem_size("99999999999G"),
            Err(ConfigError::BadMemSize(_))
        ));
        assert!(matches!(
            parse_mem_size("1T"),
            Err(ConfigError::BadMemSize(_))
        ));
        assert!(matches!(
            parse_mem_size("100G"),
            Err(ConfigError::MemTooLarge(..))
        ));
        assert_eq!(
            parse_mem_size("8388609"),
            Err(ConfigError::MemNotPageAligned(8388609))
        );
        assert!(matches!(
            parse_mem_size(""),
            Err(ConfigError::BadMemSize(_))
        ));
    }

    #[test]
    fn cpus() {
        assert!(check_cpus(0).is_err());
        assert_eq!(check_cpus(4), Ok(4));
        assert!(check_cpus(MAX_CPUS + 1).is_err());
    }

    #[test]
    fn blk_specs() {
        let in_process = |p: &str, readonly, queues| BlkConfig::InProcess {
            path: p.into(),
            readonly,
            queues,
            direct: false,
            engine: IoEngine::Inline,
        };
        let socket = |p: &str, queues| BlkConfig::Socket {
            path: p.into(),
            queues,
            reconnect: ReconnectPolicy::DEFAULT,
        };
        assert_eq!(
            parse_blk("path=/d.img,readonly"),
            Ok(in_process("/d.img", true, 1))
        );
        assert_eq!(
            parse_blk("path=/d.img,queues=8"),
            Ok(in_process("/d.img", false, 8))
        );
        assert_eq!(
            parse_blk("path=/d.img,direct=on,engine=threads"),
            Ok(BlkConfig::InProcess {
                path: "/d.img".into(),
                readonly: false,
                queues: 1,
                direct: true,
                engine: IoEngine::Threads,
            })
        );
        assert_eq!(
            parse_blk("path=/d.img,direct=off,engine=inline"),
            Ok(in_process("/d.img", false, 1))
        );
        assert_eq!(
            parse_blk("path=/d.img,engine=uring,direct=on,queues=2"),
            Ok(BlkConfig::InProcess {
                path: "/d.img".into(),
                readonly: false,
                queues: 2,
                direct: true,
                engine: IoEngine::Uring,
            })
        );
        assert!(matches!(
            parse_blk("path=/d.img,engine=io_uring"),
            Err(ConfigError::BadBlk(_, why)) if why.contains("uring")
        ));
        assert_eq!(parse_blk("socket=/s"), Ok(socket("/s", 1)));
        assert_eq!(parse_blk("socket=/s,queues=4"), Ok(socket("/s", 4)));
        assert_eq!(
            parse_blk("socket=/s,reconnect=off"),
            Ok(BlkConfig::Socket {
                path: "/s".into(),
                queues: 1,
                reconnect: ReconnectPolicy::Off
            })
        );
        assert_eq!(
            parse_blk("socket=/s,reconnect=20,queues=2"),
            Ok(BlkConfig::Socket {
                path: "/s".into(),
                queues: 2,
                reconnect: ReconnectPolicy::every(Duration::from_millis(20))
            })
        );
        for bad in [
            "socket=/s,reconnect=0",
            "socket=/s,reconnect=60001",
            "socket=/s,reconnect=",
            "socket=/s,reconnect=soon",
            "path=/d,reconnect=5",
            "path=/a,socket=/b",
            "path=",
            "bogus",
            "path=/d,queues=0",
            "path=/d,queues=65",
            "path=/d,queues=x",
            "socket=/s,readonly",
            "path=/d,direct=yes",
            "path=/d,direct=",
            "path=/d,engine=io_uring",
            "path=/d,engine=",
            "socket=/s,engine=uring",
            "socket=/s,direct=on",
            "socket=/s,engine=threads",
        ] {
            assert!(parse_blk(bad).is_err(), "{bad}");
        }
    }
}
