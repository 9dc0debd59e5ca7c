//! The MMIO space the guest's devices occupy: windows and GSIs handed out in order, and the
//! dispatch of MMIO exits to the device that owns the address.

use std::sync::{Arc, Mutex};

use crate::boot::acpi::MmioDeviceInfo;
use crate::layout::{VIRTIO_GSIS, VIRTIO_MMIO_START, VIRTIO_MMIO_WINDOW};

/// A device reachable through an MMIO window (offsets are relative to the window's base).
pub trait MmioDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    #[error("too many virtio devices: at most {0} are supported")]
    TooManyDevices(usize),
}

struct Window {
    base: u64,
    size: u64,
    dev: Arc<Mutex<dyn MmioDevice>>,
}

#[derive(Default)]
pub struct MmioBus {
    windows: Vec<Window>,
}

impl MmioBus {
    fn find(&self, addr: u64) -> Option<(&Window, u64)> {
        self.windows
            .iter()
            .find(|w| addr >= w.base && addr - w.base < w.size)
            .map(|w| (w, addr - w.base))
    }

    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((w, off)) => match w.dev.lock() {
                Ok(mut d) => d.read(off, data),
                Err(_) => data.fill(0xff),
            },
            None => {
                tracing::debug!(
                    "MMIO read of {} bytes at unclaimed address {addr:#x}",
                    data.len()
                );
                data.fill(0xff);
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        match self.find(addr) {
            Some((w, off)) => {
                if let Ok(mut d) = w.dev.lock() {
                    d.write(off, data)
                }
            }
            None => tracing::debug!(
                "MMIO write of {} bytes at unclaimed address {addr:#x}",
                data.len()
            ),
        }
    }
}

/// Hands out virtio-mmio windows and GSIs; the same list feeds the DSDT and the command line.
#[derive(Default)]
pub struct DeviceManager {
    pub bus: MmioBus,
    pub devices: Vec<MmioDeviceInfo>,
}

impl DeviceManager {
    /// Reserves the next window and GSI.
    pub fn allocate(&mut self) -> Result<MmioDeviceInfo, DeviceManagerError> {
        let i = self.devices.len();
        let gsi = *VIRTIO_GSIS
            .get(i)
            .ok_or(DeviceManagerError::TooManyDevices(VIRTIO_GSIS.len()))?;
        let info = MmioDeviceInfo {
            base: VIRTIO_MMIO_START + i as u64 * VIRTIO_MMIO_WINDOW,
            size: VIRTIO_MMIO_WINDOW,
            gsi,
        };
        self.devices.push(info);
        Ok(info)
    }

    pub fn attach(&mut self, info: MmioDeviceInfo, dev: Arc<Mutex<dyn MmioDevice>>) {
        self.bus.windows.push(Window {
            base: info.base,
            size: info.size,
            dev,
        });
    }

    /// `virtio_mmio.device=4K@0xd0000000:5` per device, for kernels built with CMDLINE_DEVICES
    /// (and our test guest); stock kernels find the same devices through the DSDT.
    pub fn cmdline_fragment(&self) -> String {
        self.devices
            .iter()
            .map(|d| {
                format!(
                    "virtio_mmio.device={}K@{:#x}:{}",
                    d.size >> 10,
                    d.base,
                    d.gsi
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl MmioDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatch_and_cmdline() {
        let mut dm = DeviceManager::default();
        let a = dm.allocate().unwrap();
        let b = dm.allocate().unwrap();
        assert_eq!(b.base, a.base + VIRTIO_MMIO_WINDOW);
        dm.attach(a, Arc::new(Mutex::new(Echo(1))));
        dm.write(a.base, &[10]);
        let mut d = [0u8; 1];
        dm.bus.read(a.base + 2, &mut d);
        assert_eq!(d, [12]);
        dm.bus.read(b.base, &mut d); // unclaimed
        assert_eq!(d, [0xff]);
        assert_eq!(
            dm.cmdline_fragment(),
            "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
    }

    impl DeviceManager {
        fn write(&self, a: u64, d: &[u8]) {
            self.bus.write(a, d)
        }
    }
}
