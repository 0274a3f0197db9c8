//! The hypervisor's console: COM2 (the serial log; COM1 is the guest's)
//! mirrored to the emulator debug port 0xE9, and the `log` logger on top.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use log::{Level, LevelFilter, Log, Metadata, Record};
use spin::Mutex;
use uart_16550::backend::PioBackend;
use uart_16550::spec::registers::LSR;
use uart_16550::{BaudRate, Config, Uart16550};

/// The hypervisor's serial port: COM2. COM1 belongs to the guest, COM3 to
/// the control channel.
const COM2: u16 = 0x2f8;
const DEBUG_PORT: u16 = 0xe9;
/// Polls of the line status register before a byte is given up: a machine
/// without a serial port must not hang the hypervisor.
const SEND_RETRIES: u32 = 100_000;

struct Console {
    serial: Option<Uart16550<PioBackend>>,
}

static CONSOLE: Mutex<Console> = Mutex::new(Console { serial: None });
/// Bochs (`port_e9_hack`) and QEMU (`-debugcon`) read back 0xE9 from the port.
static DEBUG_PORT_PRESENT: AtomicBool = AtomicBool::new(false);

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let e9 = DEBUG_PORT_PRESENT.load(Ordering::Relaxed);
        for byte in s.bytes() {
            if let Some(serial) = self.serial.as_mut() {
                for _ in 0..SEND_RETRIES {
                    if serial.try_send_byte(byte).is_ok() {
                        break;
                    }
                    core::hint::spin_loop();
                }
            }
            if e9 {
                crate::platform::outb(DEBUG_PORT, byte);
            }
        }
        Ok(())
    }
}

/// Sets up COM2 and the debug port, and installs the logger at `Info`.
pub fn init() {
    DEBUG_PORT_PRESENT.store(crate::platform::inb(DEBUG_PORT) == 0xe9, Ordering::Relaxed);
    // 115200 baud: at the default 9600, Bochs's paced UART spends about 200k
    // emulated instructions per byte. Do not wait for CTS: emulators leave it
    // low when nothing is attached.
    let config = Config {
        baud_rate: BaudRate::Baud115200,
        check_cts_before_sending: false,
        ..Config::DEFAULT
    };
    // SAFETY: COM2's eight ports belong to the console alone.
    let serial = unsafe { Uart16550::new_port(COM2) }
        .ok()
        .and_then(|mut uart| uart.init(config).ok().map(|_| uart));
    CONSOLE.lock().serial = serial;
    static LOGGER: Logger = Logger;
    // Only fails if a logger is already set, which cannot happen: init runs once.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(LevelFilter::Info);
}

/// Writes formatted text to the console (used by `println!`).
pub fn print(args: fmt::Arguments<'_>) {
    let _ = CONSOLE.lock().write_fmt(args);
}

/// Waits (boundedly) until COM2 has sent every queued byte, so that a run
/// ending right after its last line does not cut that line off.
pub fn flush() {
    let mut console = CONSOLE.lock();
    if let Some(serial) = console.serial.as_mut() {
        for _ in 0..SEND_RETRIES {
            if serial.lsr().contains(LSR::TRANSMITTER_EMPTY) {
                break;
            }
            core::hint::spin_loop();
        }
    }
}

/// Makes the console usable from a fatal path that may have interrupted a
/// holder of its lock (a panic or exception in the middle of a log line).
pub fn break_lock() {
    if CONSOLE.is_locked() {
        // SAFETY: only called on the way to ending the run on this (only) CPU:
        // the interrupted holder never runs again.
        unsafe { CONSOLE.force_unlock() };
    }
}

struct Logger;

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            Level::Error => "ERROR",
            Level::Warn => "WARN ",
            Level::Info => "INFO ",
            Level::Debug => "DEBUG",
            Level::Trace => "TRACE",
        };
        // Messages name their subsystem themselves ("memory: ..."), like the
        // `hv: ...` lines, so the module path is not repeated.
        print(format_args!("{level} {}\n", record.args()));
    }

    fn flush(&self) {}
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::console::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}
