//! Interrupt vectors 32..=255: one entry stub each, a handler that counts
//! every arrival, notes its TSC and its place in the order of events, and
//! ends it (EOI to the 8259 for the PIC's vectors, to the local APIC for
//! the others but the spurious vector). NMIs (vector 2) and #VE (vector
//! 20) come through the exception path and are noted here too, so a
//! scenario can check what arrived and in which order.

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use x86_64::VirtAddr;
use x86_64::structures::idt::InterruptDescriptorTable;

use crate::{apic, legacy, rdtsc};

/// The vectors the scenarios use.
pub const PIC_BASE: u8 = 0x20;
pub const TIMER: u8 = 0x40;
pub const IPI: u8 = 0x41;
/// The boot processor wakes an AP with it (`smp`).
pub const WAKE: u8 = 0x42;
pub const APIC_ERROR: u8 = 0xfe;
pub const SPURIOUS: u8 = 0xff;
pub const NMI: u8 = 2;
pub const VE: u8 = 20;

unsafe extern "C" {
    static interrupt_stubs: [u8; 224 * STUB_SIZE];
}

/// Bytes per stub: `call interrupt_common` (5 bytes), padded.
const STUB_SIZE: usize = 8;

// Each stub calls the common path; the return address it pushes tells the
// vector (stubs are STUB_SIZE apart), so no stub needs an immediate.
core::arch::global_asm!(
    r#"
    .section .text.interrupts, "ax"
    .balign 8
    .global interrupt_stubs
interrupt_stubs:
    .rept 224
    .balign 8
    call interrupt_common
    .endr

interrupt_common:
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    mov rdi, [rsp + 72]
    lea rax, [rip + interrupt_stubs]
    sub rdi, rax
    shr rdi, 3
    add rdi, 32
    sub rsp, 8
    cld
    call {handler}
    add rsp, 8
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    add rsp, 8
    iretq
"#,
    handler = sym on_interrupt,
);

/// Routes vectors 32..=255 to the stubs.
pub fn install(idt: &mut InterruptDescriptorTable) {
    // SAFETY: reading the address of the stub table defined above.
    let base = unsafe { interrupt_stubs.as_ptr() } as u64;
    for vector in 32..=255u8 {
        let stub = base + (usize::from(vector - 32) * STUB_SIZE) as u64;
        // SAFETY: each stub is an interrupt entry point (no error code) that
        // returns with IRETQ after the handler.
        unsafe { idt[vector].set_handler_addr(VirtAddr::new(stub)) };
    }
}

static COUNTS: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];
static LAST_TSC: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];
/// The order events arrived in, since the last [`clear_order`].
static ORDER: [AtomicU64; 16] = [const { AtomicU64::new(0) }; 16];
static ORDER_LEN: AtomicUsize = AtomicUsize::new(0);
/// Local APIC EOIs owed: interrupts that arrived while the APIC was
/// disabled (its page is not the APIC then; the EOI waits for re-enabling).
static EOI_OWED: AtomicU64 = AtomicU64::new(0);
/// Whether the handler EOIs at the local APIC (off while it is disabled).
pub static APIC_EOI: AtomicBool = AtomicBool::new(true);

/// Notes an event: its count, its time, its place in the order.
pub fn note(vector: u8) {
    COUNTS[usize::from(vector)].fetch_add(1, Ordering::SeqCst);
    LAST_TSC[usize::from(vector)].store(rdtsc(), Ordering::SeqCst);
    let at = ORDER_LEN.fetch_add(1, Ordering::SeqCst);
    if let Some(slot) = ORDER.get(at) {
        slot.store(u64::from(vector), Ordering::SeqCst);
    }
}

extern "C" fn on_interrupt(vector: u64) {
    let vector = vector as u8;
    note(vector);
    match vector {
        v if (PIC_BASE..PIC_BASE + 16).contains(&v) => legacy::pic_eoi(v - PIC_BASE),
        SPURIOUS => {}
        _ if APIC_EOI.load(Ordering::SeqCst) => apic::eoi(),
        _ => {
            EOI_OWED.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// The EOIs owed since the APIC was disabled, sent once it answers again.
pub fn pay_owed_eois() -> u64 {
    let owed = EOI_OWED.swap(0, Ordering::SeqCst);
    for _ in 0..owed {
        apic::eoi();
    }
    owed
}

pub fn count(vector: u8) -> u64 {
    COUNTS[usize::from(vector)].load(Ordering::SeqCst)
}

/// `vector`'s arrival counter itself, for code that watches it in assembly.
pub fn counter(vector: u8) -> &'static AtomicU64 {
    &COUNTS[usize::from(vector)]
}

/// The TSC when `vector` last arrived.
pub fn last_tsc(vector: u8) -> u64 {
    LAST_TSC[usize::from(vector)].load(Ordering::SeqCst)
}

pub fn clear_order() {
    ORDER_LEN.store(0, Ordering::SeqCst);
}

/// The vectors noted since [`clear_order`], in order (at most 16).
pub fn order() -> heapless::Vec<u8, 16> {
    let len = ORDER_LEN.load(Ordering::SeqCst).min(ORDER.len());
    ORDER[..len]
        .iter()
        .map(|v| v.load(Ordering::SeqCst) as u8)
        .collect()
}

pub fn enable() {
    x86_64::instructions::interrupts::enable();
}

pub fn disable() {
    x86_64::instructions::interrupts::disable();
}

/// STI; HLT: sleeps until the next interrupt (the STI shadow keeps one
/// from arriving between the two), which runs before this returns.
pub fn sti_hlt() {
    x86_64::instructions::interrupts::enable_and_hlt();
}

/// Spins with interrupts as they are until the TSC has advanced `cycles`.
pub fn spin(cycles: u64) {
    let start = rdtsc();
    while rdtsc() - start < cycles {
        core::hint::spin_loop();
    }
}

/// Spins until `vector` has arrived `n` more times than `from`, or
/// `timeout` TSC cycles passed. Returns whether it did.
pub fn wait_for(vector: u8, from: u64, n: u64, timeout: u64) -> bool {
    let start = rdtsc();
    while count(vector) < from + n {
        if rdtsc() - start >= timeout {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}
