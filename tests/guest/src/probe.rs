//! Instructions that may fault, run so that a fault is an answer rather than
//! the end: the exception handler finds the faulting instruction in the
//! table below, records the vector and resumes after it. An instruction
//! fetch from an address (`fetch`) is recovered by the fault's RIP being
//! that address: the handler returns to the probe's caller.

use core::sync::atomic::{AtomicU64, Ordering};

use hv_boot::exception::ExceptionFrame;

/// Vector + 1 of the last fault recovered on this CPU (0: none): each CPU
/// probes on its own.
fn fault() -> &'static AtomicU64 {
    &crate::smp::this().fault
}
/// Faults recovered so far, for the fuzzer's totals.
static RECOVERED: AtomicU64 = AtomicU64::new(0);
/// The address `fetch` jumps to while it runs (0: none).
static FETCH_TARGET: AtomicU64 = AtomicU64::new(0);

/// The VMX instructions [`vmx`] runs: each must raise #UD in a guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxInsn {
    Vmxon,
    Vmclear,
    Vmptrld,
    Vmptrst,
    Vmread,
    Vmwrite,
    Vmlaunch,
    Vmresume,
    Vmxoff,
    Invept,
    Invvpid,
    Getsec,
}

impl VmxInsn {
    pub const ALL: [VmxInsn; 12] = [
        Self::Vmxon,
        Self::Vmclear,
        Self::Vmptrld,
        Self::Vmptrst,
        Self::Vmread,
        Self::Vmwrite,
        Self::Vmlaunch,
        Self::Vmresume,
        Self::Vmxoff,
        Self::Invept,
        Self::Invvpid,
        Self::Getsec,
    ];
}

unsafe extern "C" {
    fn probe_read(address: u64) -> u64;
    fn probe_write(address: u64, value: u64);
    fn probe_read_u8(address: u64) -> u64;
    fn probe_write_u8(address: u64, value: u64);
    fn probe_rdmsr(msr: u32) -> u64;
    fn probe_wrmsr(msr: u32, value: u64);
    fn probe_vmfunc(index: u32);
    fn probe_vmfunc_leaf(leaf: u32, index: u32);
    fn probe_write_cr0(value: u64);
    fn probe_write_cr3(value: u64);
    fn probe_write_cr4(value: u64);
    fn probe_write_cr8(value: u64);
    fn probe_xsetbv(xcr: u32, value: u64);
    fn probe_vmxon(operand: u64);
    fn probe_vmclear(operand: u64);
    fn probe_vmptrld(operand: u64);
    fn probe_vmptrst(operand: u64);
    fn probe_vmread(field: u64);
    fn probe_vmwrite(field: u64, value: u64);
    fn probe_vmlaunch();
    fn probe_vmresume();
    fn probe_vmxoff();
    fn probe_invept(kind: u64, descriptor: u64);
    fn probe_invvpid(kind: u64, descriptor: u64);
    fn probe_getsec();
    fn probe_fetch(address: u64) -> u64;
    fn probe_read_u32(address: u64) -> u64;
    fn probe_read_loop(
        address: u64,
        released: *const u64,
        round: u64,
        marker: u64,
        reads: *mut u64,
    ) -> u64;
    static probe_table: [[u64; 2]; 27];
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
    .global probe_write_cr3
probe_write_cr3:
13: mov cr3, rdi
14: ret
    .global probe_write_cr4
probe_write_cr4:
15: mov cr4, rdi
16: ret
    .global probe_write_cr8
probe_write_cr8:
17: mov cr8, rdi
18: ret
    .global probe_xsetbv
probe_xsetbv:
    mov ecx, edi
    mov eax, esi
    mov rdx, rsi
    shr rdx, 32
19: xsetbv
20: ret
    .global probe_vmfunc_leaf
probe_vmfunc_leaf:
    mov eax, edi
    mov ecx, esi
21: vmfunc
22: ret
    .global probe_read_u8
probe_read_u8:
23: movzx eax, byte ptr [rdi]
24: ret
    .global probe_write_u8
probe_write_u8:
25: mov byte ptr [rdi], sil
26: ret
    .global probe_vmxon
probe_vmxon:
27: vmxon qword ptr [rdi]
28: ret
    .global probe_vmclear
probe_vmclear:
29: vmclear qword ptr [rdi]
30: ret
    .global probe_vmptrld
probe_vmptrld:
31: vmptrld qword ptr [rdi]
32: ret
    .global probe_vmptrst
probe_vmptrst:
33: vmptrst qword ptr [rdi]
34: ret
    .global probe_vmread
probe_vmread:
35: vmread rax, rdi
36: ret
    .global probe_vmwrite
probe_vmwrite:
37: vmwrite rdi, rsi
38: ret
    .global probe_vmlaunch
probe_vmlaunch:
39: vmlaunch
40: ret
    .global probe_vmresume
probe_vmresume:
41: vmresume
42: ret
    .global probe_vmxoff
probe_vmxoff:
43: vmxoff
44: ret
    .global probe_invept
probe_invept:
45: invept rdi, xmmword ptr [rsi]
46: ret
    .global probe_invvpid
probe_invvpid:
47: invvpid rdi, xmmword ptr [rsi]
48: ret
    .global probe_getsec
probe_getsec:
    xor eax, eax
49: getsec
50: ret
    .global probe_read_u32
probe_read_u32:
51: mov eax, dword ptr [rdi]
52: ret
    .global probe_fetch
probe_fetch:
    call rdi
    ret
    .global probe_read_loop
probe_read_loop:
    xor r9, r9
53: mov r10, qword ptr [rsi]
54: mov rax, qword ptr [rdi]
    inc r9
    cmp rax, rcx
    jne 55f
    cmp r10, rdx
    jb 53b
55: mov qword ptr [r8], r9
    ret

    .section .rodata.probe, "a"
    .balign 8
    .global probe_table
probe_table:
    .quad 1b, 2b, 3b, 4b, 5b, 6b, 7b, 8b, 9b, 10b, 11b, 12b
    .quad 13b, 14b, 15b, 16b, 17b, 18b, 19b, 20b, 21b, 22b, 23b, 24b
    .quad 25b, 26b, 27b, 28b, 29b, 30b, 31b, 32b, 33b, 34b, 35b, 36b
    .quad 37b, 38b, 39b, 40b, 41b, 42b, 43b, 44b, 45b, 46b, 47b, 48b
    .quad 49b, 50b, 51b, 52b, 54b, 55b
"#
);

/// Called by the exception handler: if the fault is a probe's, resume after it.
pub fn recover(frame: &mut ExceptionFrame) -> bool {
    let target = FETCH_TARGET.load(Ordering::Relaxed);
    // An INT3 at the target is a trap: RIP is past it.
    let at_target = frame.rip == target || (frame.vector == 3 && frame.rip == target + 1);
    if target != 0 && at_target {
        // The fetch faulted at the target: return to `probe_fetch`'s
        // caller, popping the return address `call` pushed.
        // SAFETY: the interrupted stack's top is that return address.
        let back = unsafe { core::ptr::read(frame.rsp as *const u64) };
        frame.rip = back;
        frame.rsp += 8;
        return note(frame);
    }
    // SAFETY: reading an immutable table defined in assembly.
    let table = unsafe { &probe_table };
    match table.iter().find(|[at, _]| *at == frame.rip) {
        Some([_, resume]) => {
            frame.rip = *resume;
            note(frame)
        }
        None => false,
    }
}

fn note(frame: &ExceptionFrame) -> bool {
    fault().store(frame.vector + 1, Ordering::Relaxed);
    RECOVERED.fetch_add(1, Ordering::Relaxed);
    true
}

/// Faults recovered since the guest started.
pub fn recovered() -> u64 {
    RECOVERED.load(Ordering::Relaxed)
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

pub fn read_u8(address: u64) -> Result<u8, u8> {
    fault().store(0, Ordering::Relaxed);
    // SAFETY: as for `read`.
    outcome(unsafe { probe_read_u8(address) } as u8)
}

/// A dword read (device registers: the local APIC takes no wider access).
pub fn read_u32(address: u64) -> Result<u32, u8> {
    fault().store(0, Ordering::Relaxed);
    // SAFETY: as for `read`.
    outcome(unsafe { probe_read_u32(address) } as u32)
}

pub fn write_u8(address: u64, value: u8) -> Result<(), u8> {
    fault().store(0, Ordering::Relaxed);
    // SAFETY: as for `write`.
    unsafe { probe_write_u8(address, u64::from(value)) };
    outcome(())
}

pub fn rdmsr(msr: u32) -> Result<u64, u8> {
    fault().store(0, Ordering::Relaxed);
    // SAFETY: a #GP from a missing MSR is recovered.
    outcome(unsafe { probe_rdmsr(msr) })
}

/// VMFUNC leaf 0 (EPTP switching) to view `index`.
pub fn vmfunc(index: u32) -> Result<(), u8> {
    vmfunc_leaf(0, index)
}

/// VMFUNC with any leaf (EAX) and index (ECX).
pub fn vmfunc_leaf(leaf: u32, index: u32) -> Result<(), u8> {
    fault().store(0, Ordering::Relaxed);
    // SAFETY: a #UD (invalid leaf, invalid or hidden view) is recovered; a
    // valid switch only changes which EPT view translates the guest's memory.
    unsafe {
        if leaf == 0 {
            probe_vmfunc(index)
        } else {
            probe_vmfunc_leaf(leaf, index)
        }
    };
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
    // only bits whose change does not stop the guest's own execution.
    unsafe { probe_write_cr0(value) };
    outcome(())
}

/// MOV to CR3.
pub fn write_cr3(value: u64) -> Result<(), u8> {
    fault().store(0, Ordering::Relaxed);
    // SAFETY: a #GP (reserved bits) is recovered; callers load only page
    // tables that map the guest as its own do.
    unsafe { probe_write_cr3(value) };
    outcome(())
}

/// MOV to CR4.
pub fn write_cr4(value: u64) -> Result<(), u8> {
    fault().store(0, Ordering::Relaxed);
    // SAFETY: a #GP (reserved or refused bits) is recovered; callers change
    // only bits the guest's code does not depend on.
    unsafe { probe_write_cr4(value) };
    outcome(())
}

/// MOV to CR8 (the task priority).
pub fn write_cr8(value: u64) -> Result<(), u8> {
    fault().store(0, Ordering::Relaxed);
    // SAFETY: a #GP (reserved bits) is recovered; the priority only gates
    // interrupts, which the callers keep off.
    unsafe { probe_write_cr8(value) };
    outcome(())
}

/// XSETBV of extended control register `xcr`.
pub fn xsetbv(xcr: u32, value: u64) -> Result<(), u8> {
    fault().store(0, Ordering::Relaxed);
    // SAFETY: #GP or #UD are recovered; the guest uses no extended state.
    unsafe { probe_xsetbv(xcr, value) };
    outcome(())
}

/// A VMX instruction (or GETSEC) with `operand` as its memory operand's
/// address (or register operand): a guest gets #UD.
pub fn vmx(insn: VmxInsn, operand: u64, value: u64) -> Result<(), u8> {
    fault().store(0, Ordering::Relaxed);
    // SAFETY: every one of these raises #UD (recovered) in a guest without
    // nested VMX; `operand` points at scratch memory of the caller's.
    unsafe {
        match insn {
            VmxInsn::Vmxon => probe_vmxon(operand),
            VmxInsn::Vmclear => probe_vmclear(operand),
            VmxInsn::Vmptrld => probe_vmptrld(operand),
            VmxInsn::Vmptrst => probe_vmptrst(operand),
            VmxInsn::Vmread => probe_vmread(value),
            VmxInsn::Vmwrite => probe_vmwrite(value, operand),
            VmxInsn::Vmlaunch => probe_vmlaunch(),
            VmxInsn::Vmresume => probe_vmresume(),
            VmxInsn::Vmxoff => probe_vmxoff(),
            VmxInsn::Invept => probe_invept(value, operand),
            VmxInsn::Invvpid => probe_invvpid(value, operand),
            VmxInsn::Getsec => probe_getsec(),
        }
    };
    outcome(())
}

/// Jumps to `address` as code and returns if the fetch faults there.
/// Callers pass only addresses nothing maps (outside the guest's RAM and
/// devices), so the fetch itself faults.
pub fn fetch(address: u64) -> Result<(), u8> {
    call(address).map(|_| ())
}

/// Calls the code at `address` (which must return, or fault at its first
/// instruction, INT3 included): its RAX, or the vector it raised there.
pub fn call(address: u64) -> Result<u64, u8> {
    fault().store(0, Ordering::Relaxed);
    FETCH_TARGET.store(address, Ordering::Relaxed);
    // SAFETY: the target is code that returns (the fuzzer's arena code) or
    // an address whose first fetch faults; the exception handler returns
    // here then (see `recover`).
    let rax = unsafe { probe_fetch(address) };
    FETCH_TARGET.store(0, Ordering::Relaxed);
    outcome(rax)
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
