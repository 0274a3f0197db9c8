//! Every VMX and privileged instruction the hypervisor executes on the
//! hardware, each in one small function with the reason it is sound. Code
//! elsewhere in hv-core reaches the CPU only through these (and through the
//! [`Cpu`](crate::vmx::Cpu) trait they implement for [`ThisCpu`]), so host
//! tests can stand a simulated CPU in their place.

use x86_64::registers::control::{Cr0, Cr3, Cr4};

use super::Fail;

fn fail(e: x86::vmx::VmFail) -> Fail {
    Fail::from(e)
}

/// VMXON with the region at physical address `pa`.
///
/// # Safety
///
/// `pa` is a zeroed, page-aligned frame holding the VMCS revision id, owned
/// by VMX operation until VMXOFF; CR0/CR4 satisfy the VMX fixed bits.
pub unsafe fn vmxon(pa: u64) -> Result<(), Fail> {
    // SAFETY: forwarded from the caller.
    unsafe { x86::bits64::vmx::vmxon(pa) }.map_err(fail)
}

/// VMXOFF.
///
/// # Safety
///
/// No VMCS of this CPU is entered afterwards.
pub unsafe fn vmxoff() -> Result<(), Fail> {
    // SAFETY: forwarded from the caller.
    unsafe { x86::bits64::vmx::vmxoff() }.map_err(fail)
}

/// VMCLEAR of the VMCS at `pa`: flushes its cached state and marks it clear.
///
/// # Safety
///
/// `pa` is a VMCS region this hypervisor owns, not current on another CPU.
pub unsafe fn vmclear(pa: u64) -> Result<(), Fail> {
    // SAFETY: forwarded from the caller.
    unsafe { x86::bits64::vmx::vmclear(pa) }.map_err(fail)
}

/// VMPTRLD: makes the VMCS at `pa` current on this CPU.
///
/// # Safety
///
/// As for [`vmclear`]; the region holds the revision id.
pub unsafe fn vmptrld(pa: u64) -> Result<(), Fail> {
    // SAFETY: forwarded from the caller.
    unsafe { x86::bits64::vmx::vmptrld(pa) }.map_err(fail)
}

/// VMREAD of the current VMCS. Fails (never touches memory) for a bad field
/// encoding or without a current VMCS.
pub fn vmread(field: u32) -> Result<u64, Fail> {
    // SAFETY: VMREAD only reads the current VMCS into a register.
    unsafe { x86::bits64::vmx::vmread(field) }.map_err(fail)
}

/// VMWRITE of the current VMCS. A wrong value is caught by the checks of the
/// next VM entry, which fails cleanly; the host state is written only by
/// `write_host_state`.
pub fn vmwrite(field: u32, value: u64) -> Result<(), Fail> {
    // SAFETY: VMWRITE only writes the current VMCS, never host memory.
    unsafe { x86::bits64::vmx::vmwrite(field, value) }.map_err(fail)
}

/// INVEPT of type `kind` (1: single context `eptp`, 2: all contexts); x86
/// 0.52 has no wrapper. Returns false if the CPU refused it.
pub fn invept(kind: u64, eptp: u64) -> bool {
    let descriptor: [u64; 2] = [eptp, 0];
    let failed: u8;
    // SAFETY: INVEPT only drops cached translations; both types are required
    // by `Controls::compute`, and the descriptor is a 16-byte memory operand.
    unsafe {
        core::arch::asm!(
            "invept {kind}, [{desc}]",
            "setbe {failed}",
            kind = in(reg) kind,
            desc = in(reg) descriptor.as_ptr(),
            failed = out(reg_byte) failed,
            options(nostack),
        );
    }
    failed == 0
}

/// INVVPID single-context for `vpid`; x86 0.52 has no wrapper. Returns
/// false if the CPU refused it.
pub fn invvpid_single(vpid: u16) -> bool {
    let descriptor: [u64; 2] = [u64::from(vpid), 0];
    let failed: u8;
    // SAFETY: INVVPID only drops cached translations; single-context is
    // required whenever VPID is used (`Controls::compute`).
    unsafe {
        core::arch::asm!(
            "invvpid {kind}, [{desc}]",
            "setbe {failed}",
            kind = in(reg) 1u64,
            desc = in(reg) descriptor.as_ptr(),
            failed = out(reg_byte) failed,
            options(nostack),
        );
    }
    failed == 0
}

/// CPUID on this CPU: EAX, EBX, ECX, EDX.
pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// XSETBV on this CPU.
///
/// # Safety
///
/// `value` is a valid XCR0 for this CPU (CPUID.0xD and the XCR0 rules), and
/// CR4.OSXSAVE is set.
pub unsafe fn xsetbv(index: u32, value: u64) {
    // SAFETY: forwarded from the caller; the hypervisor itself uses no
    // extended state, so the guest's mask may stay loaded.
    unsafe {
        core::arch::asm!("xsetbv", in("ecx") index, in("eax") value as u32, in("edx") (value >> 32) as u32)
    };
}

/// RDMSR of an MSR the caller knows exists on this CPU.
///
/// # Safety
///
/// The MSR exists (a missing one raises #GP in the hypervisor).
pub unsafe fn rdmsr(msr: u32) -> u64 {
    // SAFETY: forwarded from the caller.
    unsafe { x86::msr::rdmsr(msr) }
}

/// WRMSR.
///
/// # Safety
///
/// The MSR exists and `value` is valid for it, and changing it does not
/// break the hypervisor's own execution.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: forwarded from the caller.
    unsafe { x86::msr::wrmsr(msr, value) }
}

pub fn read_cr0() -> u64 {
    Cr0::read_raw()
}

pub fn read_cr3() -> u64 {
    Cr3::read_raw().0.start_address().as_u64()
}

pub fn read_cr4() -> u64 {
    Cr4::read_raw()
}

/// Writes CR0 and CR4 (VMX fixed bits before VMXON).
///
/// # Safety
///
/// The new values keep paging, protection and the hypervisor's mappings as
/// they are; only bits VMX operation requires may change.
pub unsafe fn write_cr0_cr4(cr0: u64, cr4: u64) {
    // SAFETY: forwarded from the caller.
    unsafe {
        Cr0::write_raw(cr0);
        Cr4::write_raw(cr4);
    }
}

/// Reads CR2, which holds the guest's last page-fault address while the
/// hypervisor runs (VM exits do not switch it).
pub fn read_cr2() -> u64 {
    x86_64::registers::control::Cr2::read_raw()
}

/// Writes CR2 (see [`read_cr2`]).
pub fn write_cr2(value: u64) {
    // SAFETY: CR2 is only read by page-fault handlers; the hypervisor takes
    // none in normal operation, and a fatal one reports its own.
    unsafe { core::arch::asm!("mov cr2, {}", in(reg) value, options(nomem, nostack)) };
}

/// IRETQ to the next instruction, with this CPU's own CS, SS, RSP and
/// RFLAGS: the one effect is the end of NMI blocking (SDM Vol. 3A,
/// "Handling Multiple NMIs"), which a VM exit caused by an NMI leaves
/// behind (Vol. 3C, "Updating Non-Register State").
pub fn unblock_nmis() {
    // SAFETY: the frame pushed returns to the label below with the current
    // segments, stack pointer (as it was before the pushes) and flags; the
    // kernel runs without a red zone, so the pushes clobber nothing live.
    unsafe {
        core::arch::asm!(
            "mov {rsp}, rsp",
            "mov {sel:e}, ss",
            "push {sel}",
            "push {rsp}",
            "pushfq",
            "mov {sel:e}, cs",
            "push {sel}",
            "lea {rsp}, [rip + 2f]",
            "push {rsp}",
            "iretq",
            "2:",
            rsp = out(reg) _,
            sel = out(reg) _,
        )
    };
}

pub fn read_cr8() -> u64 {
    let value: u64;
    // SAFETY: reading CR8 has no side effect.
    unsafe { core::arch::asm!("mov {}, cr8", out(reg) value, options(nomem, nostack)) };
    value
}

/// Writes CR8 (the local APIC's task priority).
///
/// # Safety
///
/// Raising the task priority must not hide an interrupt the caller waits for.
pub unsafe fn write_cr8(value: u64) {
    // SAFETY: forwarded from the caller.
    unsafe { core::arch::asm!("mov cr8, {}", in(reg) value, options(nomem, nostack)) };
}

/// IN of a byte.
pub fn inb(port: u16) -> u8 {
    // SAFETY: reading a port has no effect on memory; the callers read only
    // ports whose reads have no effect the hypervisor depends on.
    unsafe { x86::io::inb(port) }
}

/// OUT of a byte.
///
/// # Safety
///
/// The write must not reset the machine, turn A20 off or otherwise change
/// what the hypervisor depends on.
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: forwarded from the caller.
    unsafe { x86::io::outb(port, value) }
}

/// RDTSC.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads a counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The local APIC's registers, at its architectural base (the hypervisor
/// never moves it), identity-mapped by the kernel's page tables.
const LAPIC: usize = 0xfee0_0000;
/// Spurious-interrupt vector register; bit 8 enables the APIC (software).
const LAPIC_SVR: usize = 0xf0;

/// Clears the software-enable bit of this CPU's local APIC.
pub fn lapic_software_disable() {
    let svr = (LAPIC + LAPIC_SVR) as *mut u32;
    // SAFETY: the xAPIC page is identity-mapped device memory; SVR is a
    // 32-bit register at a 16-byte-aligned offset. Disabling only masks
    // interrupts, which the hypervisor does not use.
    unsafe { svr.write_volatile(svr.read_volatile() & !(1 << 8)) };
}

/// STR: the task register's selector.
pub fn task_register() -> u16 {
    // SAFETY: STR only reads the task register.
    unsafe { x86::task::tr() }.bits()
}
