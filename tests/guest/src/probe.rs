//! Instructions that may fault, run so that a fault is an answer rather than
//! the end: the exception handler finds the faulting instruction in the
//! table below, records the vector and resumes after it.

use core::sync::atomic::{AtomicU64, Ordering};

use hv_boot::exception::ExceptionFrame;

/// Vector + 1 of the last recovered fault (0: none).
static FAULT: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" {
    fn probe_read(address: u64) -> u64;
    fn probe_write(address: u64, value: u64);
    fn probe_rdmsr(msr: u32) -> u64;
    fn probe_wrmsr(msr: u32, value: u64);
    fn probe_vmfunc(index: u32);
    fn probe_write_cr0(value: u64);
    static probe_table: [[u64; 2]; 6];
}

core::arch::global_asm!(
    r#"
    .section .text.probe, "ax"
    .global probe_read
probe_read:
1:  mov rax, qword ptr [rdi]
2:  ret
    .global probe_write
probe_write:
3:  mov qword ptr [rdi], rsi
4:  ret
    .global probe_rdmsr
probe_rdmsr:
    mov ecx, edi
    xor eax, eax
    xor edx, edx
5:  rdmsr
6:  shl rdx, 32
    or rax, rdx
    ret
    .global probe_wrmsr
probe_wrmsr:
    mov ecx, edi
    mov eax, esi
    mov rdx, rsi
    shr rdx, 32
7:  wrmsr
8:  ret
    .global probe_vmfunc
probe_vmfunc:
    xor eax, eax
    mov ecx, edi
9:  vmfunc
10: ret
    .global probe_write_cr0
probe_write_cr0:
11: mov cr0, rdi
12: ret

    .section .rodata.probe, "a"
    .balign 8
    .global probe_table
probe_table:
    .quad 1b, 2b, 3b, 4b, 5b, 6b, 7b, 8b, 9b, 10b, 11b, 12b
"#
);

/// Called by the exception handler: if the fault is a probe's, resume after it.
pub fn recover(frame: &mut ExceptionFrame) -> bool {
    // SAFETY: reading an immutable table defined in assembly.
    let table = unsafe { &probe_table };
    match table.iter().find(|[at, _]| *at == frame.rip) {
        Some([_, resume]) => {
            FAULT.store(frame.vector + 1, Ordering::Relaxed);
            frame.rip = *resume;
            true
        }
        None => false,
    }
}

/// The exception vector a probe raised, if any.
fn outcome<T>(value: T) -> Result<T, u8> {
    match FAULT.swap(0, Ordering::Relaxed) {
        0 => Ok(value),
        v => Err((v - 1) as u8),
    }
}

pub fn read(address: u64) -> Result<u64, u8> {
    FAULT.store(0, Ordering::Relaxed);
    // SAFETY: a fault is recovered by the exception handler; the address may
    // be anything, which is the point.
    outcome(unsafe { probe_read(address) })
}

pub fn write(address: u64, value: u64) -> Result<(), u8> {
    FAULT.store(0, Ordering::Relaxed);
    // SAFETY: as for `read`; callers only write addresses outside the guest's RAM
    // or their own scratch memory.
    unsafe { probe_write(address, value) };
    outcome(())
}

pub fn rdmsr(msr: u32) -> Result<u64, u8> {
    FAULT.store(0, Ordering::Relaxed);
    // SAFETY: a #GP from a missing MSR is recovered.
    outcome(unsafe { probe_rdmsr(msr) })
}

/// VMFUNC leaf 0 (EPTP switching) to view `index`.
pub fn vmfunc(index: u32) -> Result<(), u8> {
    FAULT.store(0, Ordering::Relaxed);
    // SAFETY: a #UD (invalid or hidden view) is recovered; a valid switch only
    // changes which EPT view translates the guest's memory.
    unsafe { probe_vmfunc(index) };
    outcome(())
}

pub fn wrmsr(msr: u32, value: u64) -> Result<(), u8> {
    FAULT.store(0, Ordering::Relaxed);
    // SAFETY: as for `rdmsr`; callers only write MSRs that are the guest's own.
    unsafe { probe_wrmsr(msr, value) };
    outcome(())
}

/// MOV to CR0.
pub fn write_cr0(value: u64) -> Result<(), u8> {
    FAULT.store(0, Ordering::Relaxed);
    // SAFETY: a #GP (an invalid combination) is recovered; callers change
    // only the cache-control bits, which have no effect on memory contents.
    unsafe { probe_write_cr0(value) };
    outcome(())
}
