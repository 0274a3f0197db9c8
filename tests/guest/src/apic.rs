//! The local APIC in xAPIC mode, at the base IA32_APIC_BASE names (the
//! hypervisor maps that page to the physical APIC, docs/platform.md), and
//! the I/O APIC's identification registers.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::interrupts::{self, APIC_ERROR, SPURIOUS};
use crate::{paging, probe};

pub const IA32_APIC_BASE: u32 = 0x1b;
pub const BASE_ENABLE: u64 = 1 << 11;
const BASE_ADDRESS: u64 = 0x000f_ffff_ffff_f000;
/// The architectural base, where firmware leaves the APIC.
pub const DEFAULT_BASE: u64 = 0xfee0_0000;

pub const ID: u32 = 0x20;
pub const VERSION: u32 = 0x30;
const TPR: u32 = 0x80;
const EOI: u32 = 0xb0;
pub const SVR: u32 = 0xf0;
const ISR: u32 = 0x100;
const IRR: u32 = 0x200;
const ESR: u32 = 0x280;
const ICR_LOW: u32 = 0x300;
const ICR_HIGH: u32 = 0x310;
const LVT_TIMER: u32 = 0x320;
const LVT_LINT0: u32 = 0x350;
const LVT_LINT1: u32 = 0x360;
const LVT_ERROR: u32 = 0x370;
const TIMER_INITIAL: u32 = 0x380;
pub const TIMER_CURRENT: u32 = 0x390;
const TIMER_DIVIDE: u32 = 0x3e0;

pub const SVR_ENABLE: u32 = 1 << 8;
const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;
const DELIVERY_NMI: u32 = 0b100 << 8;
const DELIVERY_EXTINT: u32 = 0b111 << 8;
const DELIVERY_PENDING: u32 = 1 << 12;
/// ICR destination shorthand "self".
pub const SHORTHAND_SELF: u32 = 0b01 << 18;

/// Where the APIC's registers are now (identity-mapped).
static BASE: AtomicU64 = AtomicU64::new(DEFAULT_BASE);

pub fn base() -> u64 {
    BASE.load(Ordering::SeqCst)
}

pub fn read_at(base: u64, register: u32) -> u32 {
    // SAFETY: `base` is an APIC page (or a page the hypervisor maps in its
    // place), identity-mapped uncached; registers are aligned dwords.
    unsafe { core::ptr::read_volatile((base + u64::from(register)) as *const u32) }
}

pub fn read(register: u32) -> u32 {
    read_at(base(), register)
}

pub fn write(register: u32, value: u32) {
    // SAFETY: as for `read_at`; the scenarios own the APIC.
    unsafe { core::ptr::write_volatile((base() + u64::from(register)) as *mut u32, value) }
}

/// IA32_APIC_BASE as the guest reads it.
pub fn base_msr() -> u64 {
    probe::rdmsr(IA32_APIC_BASE).unwrap_or(0)
}

/// Writes IA32_APIC_BASE and follows it: the registers are at the new
/// base, and the interrupt handler EOIs only while the APIC is enabled.
/// Interrupts wait meanwhile, so none finds the APIC moved and the
/// handler not.
pub fn set_base_msr(value: u64) -> Result<(), u8> {
    x86_64::instructions::interrupts::without_interrupts(|| {
        probe::wrmsr(IA32_APIC_BASE, value)?;
        let address = value & BASE_ADDRESS;
        paging::map_uncached(address);
        BASE.store(address, Ordering::SeqCst);
        interrupts::APIC_EOI.store(value & BASE_ENABLE != 0, Ordering::SeqCst);
        Ok(())
    })
}

/// Software-enables the APIC at the base IA32_APIC_BASE names: spurious
/// vector 0xFF, TPR 0, LINT0 ExtINT (the 8259's interrupts, virtual-wire
/// mode), LINT1 NMI, errors to vector 0xFE, the timer masked.
pub fn init() {
    let address = base_msr() & BASE_ADDRESS;
    paging::map_uncached(address);
    BASE.store(address, Ordering::SeqCst);
    write(SVR, SVR_ENABLE | u32::from(SPURIOUS));
    write(TPR, 0);
    write(LVT_LINT0, DELIVERY_EXTINT);
    write(LVT_LINT1, DELIVERY_NMI);
    write(LVT_ERROR, u32::from(APIC_ERROR));
    timer_stop();
    error_status();
}

pub fn id() -> u8 {
    (read(ID) >> 24) as u8
}

pub fn eoi() {
    write(EOI, 0);
}

/// The divide configuration register's encoding of `by` (1..=128, a power of 2).
fn divide_code(by: u32) -> u32 {
    match by {
        1 => 0b1011,
        2 => 0b0000,
        4 => 0b0001,
        8 => 0b0010,
        16 => 0b0011,
        32 => 0b1000,
        64 => 0b1001,
        _ => 0b1010,
    }
}

/// Starts the timer: an interrupt at `vector` every `initial` x `divide`
/// APIC clocks (`periodic`), or once.
pub fn timer_start(vector: u8, initial: u32, divide: u32, periodic: bool) {
    write(TIMER_DIVIDE, divide_code(divide));
    let mode = if periodic { LVT_PERIODIC } else { 0 };
    write(LVT_TIMER, mode | u32::from(vector));
    write(TIMER_INITIAL, initial);
}

pub fn timer_stop() {
    write(LVT_TIMER, LVT_MASKED);
    write(TIMER_INITIAL, 0);
}

fn vector_bit(array: u32, vector: u8) -> bool {
    let register = array + u32::from(vector / 32) * 0x10;
    read(register) & (1 << (vector % 32)) != 0
}

/// Whether `vector` is requested (waiting to be delivered).
pub fn requested(vector: u8) -> bool {
    vector_bit(IRR, vector)
}

/// Whether `vector` is in service (delivered, no EOI yet).
pub fn in_service(vector: u8) -> bool {
    vector_bit(ISR, vector)
}

/// Sends an IPI (`low`: vector, delivery mode, shorthand) to APIC id `dest`
/// and waits until the APIC has sent it. Returns whether it was sent.
pub fn send_ipi(dest: u8, low: u32) -> bool {
    write(ICR_HIGH, u32::from(dest) << 24);
    write(ICR_LOW, low);
    (0..1_000_000).any(|_| read(ICR_LOW) & DELIVERY_PENDING == 0)
}

/// An NMI IPI to APIC id `dest` (the self shorthand is invalid for NMIs).
pub fn send_nmi(dest: u8) -> bool {
    send_ipi(dest, DELIVERY_NMI)
}

/// The error status (written first, as the SDM asks, to latch it).
pub fn error_status() -> u32 {
    write(ESR, 0);
    read(ESR)
}

/// An I/O APIC register (through IOREGSEL/IOWIN).
pub fn io_apic_read(address: u64, register: u32) -> u32 {
    paging::map_uncached(address);
    // SAFETY: the I/O APIC's page from the MADT, identity-mapped uncached;
    // selecting and reading a register has no other effect.
    unsafe {
        core::ptr::write_volatile(address as *mut u32, register);
        core::ptr::read_volatile((address + 0x10) as *const u32)
    }
}
