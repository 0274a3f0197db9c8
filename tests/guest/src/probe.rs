//! Instructions that may fault, run so that a fault is an answer rather than
//! the end: the exception handler finds the faulting instruction in the
//! table below, records the vector and resumes after it.

use core::sync::atomic::{AtomicU64, Ordering};

use hv_boot::exception::ExceptionFrame;

/// Vector + 1 of the last fault recovered on this CPU (0: none): each CPU
/// probes on its own.
fn fault() -> &'static AtomicU64 {
    &crate::smp::this().fault
}

unsafe extern "C" {
    fn probe_read(address: u64) -> u64;
    fn probe_write(address: u64, value: u64);
    fn probe_rdmsr(msr: u32) -> u64;
    fn probe_wrmsr(msr: u32, value: u64);
    fn probe_vmfunc(index: u32);
    fn probe_write_cr0(value: u64);
    fn probe_read_loop(
        address: u64,
        released: *const u64,
        round: u64,
        marker: u64,
        reads: *mut u64,
    ) -> u64;
    static probe_table: [[u64; 2]; 7];
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
    .global probe_read_loop
probe_read_loop:
    xor r9, r9
13: mov r10, qword ptr [rsi]
14: mov rax, qword ptr [rdi]
    inc r9
    cmp rax, rcx
    jne 15f
    cmp r10, rdx
    jb 13b
15: mov qword ptr [r8], r9
    ret

    .section .rodata.probe, "a"
    .balign 8
    .global probe_table
probe_table:
    .quad 1b, 2b, 3b, 4b, 5b, 6b, 7b, 8b, 9b, 10b, 11b, 12b, 14b, 15b
"#
);

/// Called by the exception handler: if the fault is a probe's, resume after it.
pub fn recover(frame: &mut ExceptionFrame) -> bool {
    // SAFETY: reading an immutable table defined in assembly.
    let table = unsafe { &probe_table };
    match table.iter().find(|[at, _]| *at == frame.rip) {
        Some([_, resume]) => {
            fault().store(frame.vector + 1, Ordering::Relaxed);
            frame.rip = *resume;
            true
        }
        None => false,
    }
}

/// The exception vector a probe raised, if any.
fn outcome<T>(value: T) -> Result<T, u8> {
    match fault().swap(0, Ordering::Relaxed) {
        0 => Ok(value),
        v => Err((v - 1) as u8),
    }
}

pub fn read(address: u64) -> Result<u64, u8> {
    fault().store(0, Ordering::Relaxed);
    // SAFETY: a fault is recovered by the exception handler; the address may
    // be anything, which is the point.
    outcome(unsafe { probe_read(address) })
}

pub fn write(address: u64, value: u64) -> Result<(), u8> {
    fault().store(0, Ordering::Relaxed);
    // SAFETY: as for `read`; callers only write addresses outside the guest's RAM
    // or their own scratch memory.
    unsafe { probe_write(address, value) };
    outcome(())
}

pub fn rdmsr(msr: u32) -> Result<u64, u8> {
    fault().store(0, Ordering::Relaxed);
    // SAFETY: a #GP from a missing MSR is recovered.
    outcome(unsafe { probe_rdmsr(msr) })
}

/// VMFUNC leaf 0 (EPTP switching) to view `index`.
pub fn vmfunc(index: u32) -> Result<(), u8> {
    fault().store(0, Ordering::Relaxed);
    // SAFETY: a #UD (invalid or hidden view) is recovered; a valid switch only
    // changes which EPT view translates the guest's memory.
    unsafe { probe_vmfunc(index) };
    outcome(())
}

pub fn wrmsr(msr: u32, value: u64) -> Result<(), u8> {
    fault().store(0, Ordering::Relaxed);
    // SAFETY: as for `rdmsr`; callers only write MSRs that are the guest's own.
    unsafe { probe_wrmsr(msr, value) };
    outcome(())
}

/// MOV to CR0.
pub fn write_cr0(value: u64) -> Result<(), u8> {
    fault().store(0, Ordering::Relaxed);
    // SAFETY: a #GP (an invalid combination) is recovered; callers change
    // only the cache-control bits, which have no effect on memory contents.
    unsafe { probe_write_cr0(value) };
    outcome(())
}

/// How a [`read_loop`] ended.
#[derive(Clone, Copy, Debug)]
pub struct ReadLoop {
    /// The last value read (meaningless if the last read faulted).
    pub value: u64,
    /// Reads that returned a value.
    pub reads: u64,
    /// The vector of the fault that ended it, if one did.
    pub fault: Option<u8>,
}

/// Reads the u64 at `address` in a tight loop (six instructions a round)
/// while it holds `marker` and `released`, loaded before each read, is
/// below `round`. It stops at the first read that faults, that returns
/// anything else, or that returns the marker although `released` had
/// reached `round` before the read began.
pub fn read_loop(address: u64, released: &AtomicU64, round: u64, marker: u64) -> ReadLoop {
    let mut reads = 0;
    fault().store(0, Ordering::Relaxed);
    // SAFETY: a fault of the read is recovered (it resumes at the loop's
    // end); `released` is a live u64, read by aligned loads; `reads` is a
    // local word.
    let value = unsafe { probe_read_loop(address, released.as_ptr(), round, marker, &mut reads) };
    ReadLoop {
        value,
        reads,
        fault: outcome(()).err(),
    }
}
