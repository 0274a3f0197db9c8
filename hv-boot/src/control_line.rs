//! The control channel's line: COM3 (ports 0x3E8-0x3EF), 115200 baud 8N1,
//! the hypervisor's alone (the guest's port policy hides it, and its
//! interrupts stay off: IRQ 4 is COM1's, the guest's). Polled by hv-core's
//! control server (`hv_core::control`).
//!
//! The receive FIFO is off except under QEMU: Bochs's UART then takes a
//! byte from its pty only when the receive register is empty, so nothing
//! is lost however late the server polls (`docs/control.md`); QEMU's UART
//! does not drain without its FIFO.

use spin::Mutex;
use uart_16550::backend::PioBackend;
use uart_16550::spec::registers::FifoTriggerLevel;
use uart_16550::spec::registers::LSR;
use uart_16550::{BaudRate, Config, Uart16550};

use crate::platform::{Engine, engine};

const COM3: u16 = 0x3e8;
/// Polls of the line status register before a byte is given up: a line
/// whose other end stopped reading must not hang the hypervisor.
const SEND_RETRIES: u32 = 1_000_000;

static LINE: Mutex<Option<Uart16550<PioBackend>>> = Mutex::new(None);

/// Sets up COM3 if the machine has one (`enabled` is the `control=`
/// option); returns whether there is a line.
pub fn init(enabled: bool) -> bool {
    if !enabled {
        return false;
    }
    let fifo = match engine() {
        Engine::Qemu => Some(FifoTriggerLevel::Fourteen),
        Engine::Other => None,
    };
    let config = Config {
        baud_rate: BaudRate::Baud115200,
        check_cts_before_sending: false,
        fifo_trigger_level: fifo,
        ..Config::DEFAULT
    };
    // SAFETY: COM3's eight ports belong to the control line alone (the
    // guest's port policy hides them).
    let uart = unsafe { Uart16550::new_port(COM3) }
        .ok()
        .and_then(|mut uart| uart.init(config).ok().map(|_| uart));
    let present = uart.is_some();
    *LINE.lock() = uart;
    present
}

/// Whether the line is up.
pub fn present() -> bool {
    LINE.lock().is_some()
}

/// A received byte, if one is there.
pub fn receive() -> Option<u8> {
    LINE.lock().as_mut()?.try_receive_byte().ok()
}

/// Sends `bytes`, waiting (boundedly) for the transmitter before each.
pub fn send(bytes: &[u8]) {
    let mut line = LINE.lock();
    let Some(uart) = line.as_mut() else {
        return;
    };
    for &byte in bytes {
        for _ in 0..SEND_RETRIES {
            if uart.try_send_byte(byte).is_ok() {
                break;
            }
            core::hint::spin_loop();
        }
    }
    // Lets the last byte leave before the caller goes quiet for long.
    for _ in 0..SEND_RETRIES {
        if uart.lsr().contains(LSR::TRANSMITTER_EMPTY) {
            break;
        }
        core::hint::spin_loop();
    }
}
