//! The machine as a guest sees it: control registers, EFER and XCR0
//! (written inside the fault-recovery harness and restored at once), MSRs,
//! CPUID, the VMX instructions, port I/O of every size and stray
//! accesses and fetches up to 1 TiB.

use core::arch::x86_64::{__cpuid, __cpuid_count};

use x86_64::registers::control::{Cr0, Cr4};

use super::Fuzzer;
use super::model::PAGE;
use crate::probe::{self, VmxInsn};
use crate::scenarios::Outcome;

const UD: u8 = 6;
const GP: u8 = 13;
const PF: u8 = 14;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_EM: u64 = 1 << 2;
const CR0_TS: u64 = 1 << 3;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_AM: u64 = 1 << 18;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
const CR0_DEFINED: u64 = CR0_PE
    | CR0_MP
    | CR0_EM
    | CR0_TS
    | CR0_ET
    | CR0_NE
    | CR0_WP
    | CR0_AM
    | CR0_NW
    | CR0_CD
    | CR0_PG;
/// CR0 bits 31:0 the architecture reserves.
const CR0_RESERVED_LOW: [u32; 6] = [6, 7, 12, 15, 17, 24];

const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const CR4_VMXE: u64 = 1 << 13;
const CR4_OSXSAVE: u64 = 1 << 18;

const IA32_EFER: u32 = 0xc000_0080;
const EFER_SCE: u64 = 1 << 0;
const EFER_LME: u64 = 1 << 8;
const EFER_NXE: u64 = 1 << 11;

/// Which CPUID bit (leaf, register index 0..4 = EAX EBX ECX EDX, bit)
/// offers each CR4 bit's feature.
const CR4_FEATURES: [(u32, u32, usize, u32); 17] = [
    (0, 1, 3, 1),   // VME
    (1, 1, 3, 1),   // PVI
    (2, 1, 3, 4),   // TSD
    (3, 1, 3, 2),   // DE
    (4, 1, 3, 3),   // PSE
    (6, 1, 3, 7),   // MCE
    (7, 1, 3, 13),  // PGE
    (10, 1, 3, 25), // OSXMMEXCPT
    (11, 7, 2, 2),  // UMIP
    (14, 1, 2, 6),  // SMXE
    (16, 7, 1, 0),  // FSGSBASE
    (18, 1, 2, 26), // OSXSAVE
    (19, 7, 2, 23), // KL
    (20, 7, 1, 7),  // SMEP
    (21, 7, 1, 20), // SMAP
    (22, 7, 2, 3),  // PKE
    (24, 7, 2, 31), // PKS
];
/// CR4 bits no CPU the guest can be on defines.
const CR4_RESERVED: [u32; 6] = [15, 26, 27, 29, 30, 31];

/// The guest's own too, but never written here (see [`PASSED`]).
const IA32_GS_BASE: u32 = 0xc000_0101;
/// MSRs the guest reaches directly (the hypervisor's MSR bitmap): written
/// with a random value, then restored. Not GS_BASE: it points at the test
/// guest's per-CPU data, which the fault recovery itself reads.
const PASSED: [u32; 11] = [
    0xc000_0100, // FS_BASE
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // FMASK
    0xc000_0103, // TSC_AUX
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x277,       // PAT
];
/// MSRs whose value must be a canonical address.
const CANONICAL: [u32; 7] = [
    0xc000_0100,
    0xc000_0101,
    0xc000_0102,
    0xc000_0082,
    0xc000_0083,
    0x175,
    0x176,
];
/// MSRs the hypervisor emulates for writes (besides APIC_BASE and TSC).
const MTRRS: [u32; 5] = [0x2ff, 0x200, 0x201, 0x250, 0x268];
const INTERESTING_MSRS: [u32; 24] = [
    0x10,
    0x17,
    0x1b,
    0x3a,
    0x48,
    0x8b,
    0x9b,
    0xfe,
    0x179,
    0x17a,
    0x1a0,
    0x1d9,
    0x277,
    0x2ff,
    0x480,
    0x48b,
    0x6e0,
    0x802,
    0x830,
    0xc000_0080,
    0xc000_0102,
    0x4000_0000,
    0x4b56_4d00,
    0xc001_0000,
];

fn is_x2apic(msr: u32) -> bool {
    (0x800..=0x8ff).contains(&msr)
}

fn is_vmx_msr(msr: u32) -> bool {
    (0x480..=0x492).contains(&msr)
}

fn canonical(value: u64) -> bool {
    let top = value >> 47;
    top == 0 || top == (1 << 17) - 1
}

fn cpuid_bit(leaf: u32, reg: usize, bit: u32) -> bool {
    let r = __cpuid_count(leaf, 0);
    let v = [r.eax, r.ebx, r.ecx, r.edx][reg];
    v & (1 << bit) != 0
}

fn read_cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3 has no side effect.
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) v, options(nomem, nostack)) };
    v
}

fn read_cr8() -> u64 {
    let v: u64;
    // SAFETY: reading CR8 has no side effect.
    unsafe { core::arch::asm!("mov {}, cr8", out(reg) v, options(nomem, nostack)) };
    v
}

fn xgetbv(xcr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: only called with CR4.OSXSAVE set; reads a register.
    unsafe {
        core::arch::asm!("xgetbv", in("ecx") xcr, out("eax") lo, out("edx") hi, options(nomem, nostack))
    };
    u64::from(hi) << 32 | u64::from(lo)
}

/// IN of `size` bytes from `port`, with RAX holding `rax` before: RAX after.
fn port_in(port: u16, size: u8, rax: u64) -> u64 {
    let mut rax = rax;
    // SAFETY: port reads touch no memory the program uses; the ports the
    // fuzzer reads have no effect that could stop the guest.
    unsafe {
        match size {
            1 => {
                core::arch::asm!("in al, dx", in("dx") port, inout("rax") rax, options(nomem, nostack))
            }
            2 => {
                core::arch::asm!("in ax, dx", in("dx") port, inout("rax") rax, options(nomem, nostack))
            }
            _ => {
                core::arch::asm!("in eax, dx", in("dx") port, inout("rax") rax, options(nomem, nostack))
            }
        }
    }
    rax
}

fn port_out(port: u16, size: u8, value: u32) {
    // SAFETY: the fuzzer writes no port that ends the run or that the
    // guest's console or own devices need (see `port_op`).
    unsafe {
        match size {
            1 => {
                core::arch::asm!("out dx, al", in("dx") port, in("al") value as u8, options(nomem, nostack))
            }
            2 => {
                core::arch::asm!("out dx, ax", in("dx") port, in("ax") value as u16, options(nomem, nostack))
            }
            _ => {
                core::arch::asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack))
            }
        }
    }
}

/// Ports the guest owns (no VM exit): `devices::ports::GUEST_PORTS`.
const GUEST_PORTS: [(u16, u16); 8] = [
    (0x20, 0x21),
    (0x40, 0x43),
    (0x61, 0x61),
    (0x70, 0x71),
    (0x80, 0x80),
    (0xa0, 0xa1),
    (0x3f8, 0x3ff),
    (0x4d0, 0x4d1),
];

fn guest_port(port: u32) -> bool {
    port <= 0xffff
        && GUEST_PORTS
            .iter()
            .any(|&(a, b)| (u32::from(a)..=u32::from(b)).contains(&port))
}

/// An access of `size` bytes at `port` exits (some byte is not the guest's).
fn exits(port: u16, size: u8) -> bool {
    (0..u32::from(size)).any(|i| !guest_port(u32::from(port) + i))
}

/// Registers of the guest's own devices that are safe to read.
const SAFE_NATIVE_READS: [u16; 12] = [
    0x21, 0xa1, 0x61, 0x71, 0x80, 0x3f9, 0x3fb, 0x3fc, 0x3fd, 0x3ff, 0x4d0, 0x4d1,
];

const INTERESTING_PORTS: [u16; 40] = [
    0x00, 0x08, 0x0f, 0x1f, 0x20, 0x22, 0x60, 0x64, 0x70, 0x80, 0x81, 0x87, 0x8f, 0x92, 0xb2, 0xc0,
    0xd4, 0xdf, 0xe9, 0xf4, 0x1f0, 0x2f8, 0x2fe, 0x3e8, 0x3f6, 0x3fe, 0x402, 0x510, 0x600, 0x602,
    0x603, 0x604, 0x605, 0xcf8, 0xcf9, 0xcfc, 0xcff, 0x8900, 0xfffe, 0xffff,
];

impl Fuzzer {
    pub(super) fn cr_op(&mut self) -> Outcome {
        match self.rng.below(5) {
            0 => self.cr0_op(),
            1 => self.cr4_op(),
            2 => self.cr3_op(),
            3 => self.cr8_op(),
            _ => self.efer_op(),
        }
    }

    fn cr0_op(&mut self) -> Outcome {
        let c0 = Cr0::read_raw();
        let (value, expect_gp) = match self.rng.below(8) {
            0..=3 => {
                let bits = self.rng.pick(&[
                    CR0_MP,
                    CR0_EM,
                    CR0_TS,
                    CR0_NE,
                    CR0_WP,
                    CR0_AM,
                    CR0_CD,
                    CR0_CD | CR0_NW,
                    CR0_NW,
                    CR0_NE | CR0_CD,
                ]);
                let v = c0 ^ bits;
                (v, v & CR0_NW != 0 && v & CR0_CD == 0)
            }
            4 => (c0 | 1 << self.rng.range(32, 63), true),
            5 => (c0 & !CR0_PG, true),
            6 => (c0 & !CR0_PE, true),
            _ => return self.cr0_reserved(c0),
        };
        let result = probe::write_cr0(value);
        let seen = Cr0::read_raw();
        let restored = probe::write_cr0(c0);
        let now = Cr0::read_raw();
        self.ensure(
            restored.is_ok() && now == c0,
            "CR0 could not be restored",
            format_args!("{c0:#x}: {restored:?}, reads {now:#x}"),
        )?;
        if expect_gp {
            self.ensure(
                result == Err(GP),
                "a MOV to CR0 the architecture refuses was not refused with #GP",
                format_args!("{c0:#x} -> {value:#x}: {result:?}"),
            )
        } else {
            self.ensure(
                result.is_ok() && seen & CR0_DEFINED == value & CR0_DEFINED,
                "CR0 does not read back what was written",
                format_args!("{c0:#x} -> {value:#x}: {result:?}, reads {seen:#x}"),
            )
        }
    }

    /// A reserved CR0 bit written natively (no owned bit changes) and
    /// through the hypervisor (NE changes too): both must end alike.
    fn cr0_reserved(&mut self, c0: u64) -> Outcome {
        let bit = 1u64 << self.rng.pick(&CR0_RESERVED_LOW);
        let native = probe::write_cr0(c0 | bit);
        let native_seen = Cr0::read_raw();
        let r1 = probe::write_cr0(c0);
        let emulated = probe::write_cr0((c0 ^ CR0_NE) | bit);
        let emulated_seen = Cr0::read_raw() ^ CR0_NE;
        let r2 = probe::write_cr0(c0);
        self.ensure(
            r1.is_ok() && r2.is_ok() && Cr0::read_raw() == c0,
            "CR0 could not be restored",
            format_args!("{c0:#x}: {r1:?} {r2:?}"),
        )?;
        self.ensure(
            native.is_ok() == emulated.is_ok() && native_seen & bit == emulated_seen & bit,
            "a MOV to CR0 the hypervisor carries out differs from the CPU's own on a reserved bit",
            format_args!(
                "bit {bit:#x}: the CPU {native:?} (reads {native_seen:#x}), the hypervisor {emulated:?} (reads {emulated_seen:#x})"
            ),
        )
    }

    fn cr4_op(&mut self) -> Outcome {
        let c4 = Cr4::read_raw();
        let (value, expect) = match self.rng.below(10) {
            0..=4 => {
                let (bit, leaf, reg, cpuid) = self.rng.pick(&CR4_FEATURES);
                let v = c4 ^ (1 << bit);
                let setting = v & (1 << bit) != 0;
                let offered = cpuid_bit(leaf, reg, cpuid);
                // Setting a feature's bit needs the feature; clearing is fine.
                let expect = if setting && !offered {
                    Some(Err(GP))
                } else {
                    Some(Ok(()))
                };
                (v, expect)
            }
            5 => (c4 | CR4_VMXE, Some(Err(GP))),
            6 => (c4 & !CR4_PAE, Some(Err(GP))),
            7 => (c4 ^ CR4_LA57, Some(Err(GP))),
            8 => {
                let bit = self.rng.pick(&CR4_RESERVED);
                (c4 | 1 << bit, Some(Err(GP)))
            }
            _ => (c4 | 1 << self.rng.range(32, 63), Some(Err(GP))),
        };
        let result = probe::write_cr4(value);
        let seen = Cr4::read_raw();
        let restored = probe::write_cr4(c4);
        self.ensure(
            restored.is_ok() && Cr4::read_raw() == c4,
            "CR4 could not be restored",
            format_args!("{c4:#x}: {restored:?}"),
        )?;
        if let Some(expect) = expect {
            self.ensure(
                result == expect,
                "a MOV to CR4 was refused where the CPUID the guest sees allows it, or accepted where it does not",
                format_args!("{c4:#x} -> {value:#x}: {result:?}, expected {expect:?}"),
            )?;
        }
        self.ensure(
            result.is_err() || seen == value,
            "CR4 does not read back what was written",
            format_args!("{c4:#x} -> {value:#x}: reads {seen:#x}"),
        )
    }

    fn cr3_op(&mut self) -> Outcome {
        let c3 = read_cr3();
        let (value, expect_gp) = match self.rng.below(4) {
            0 => (c3, false),
            1 => (c3 | 0x18, false),
            2 => (copy_pml4() | self.rng.pick(&[0, 0x8, 0x10, 0x18]), false),
            _ => (
                c3 | 1 << self.rng.range(u64::from(self.layout.maxphy), 62),
                true,
            ),
        };
        let result = probe::write_cr3(value);
        // The guest runs on: its memory still reads as before.
        let sample = probe::read(self.layout.image.0 * PAGE);
        let restored = probe::write_cr3(c3);
        self.ensure(
            restored.is_ok() && read_cr3() == c3,
            "CR3 could not be restored",
            format_args!("{c3:#x}: {restored:?}"),
        )?;
        let expected = if expect_gp { Err(GP) } else { Ok(()) };
        self.ensure(
            result == expected && sample.is_ok(),
            "a MOV to CR3 was refused where it is valid, or accepted with reserved bits",
            format_args!("{value:#x}: {result:?}, expected {expected:?}; memory read {sample:x?}"),
        )
    }

    fn cr8_op(&mut self) -> Outcome {
        let old = read_cr8();
        let value = match self.rng.below(4) {
            0..=2 => self.rng.below(16),
            _ => self.rng.pick(&[16, 0xff, 1 << 32, u64::MAX]),
        };
        let result = probe::write_cr8(value);
        let seen = read_cr8();
        let restored = probe::write_cr8(old);
        self.ensure(
            restored.is_ok() && read_cr8() == old,
            "CR8 could not be restored",
            format_args!("{old}: {restored:?}"),
        )?;
        let ok = if value < 16 {
            result.is_ok() && seen == value
        } else {
            result == Err(GP)
        };
        self.ensure(
            ok,
            "CR8 does not take 0..15 and refuse the rest",
            format_args!("{value:#x}: {result:?}, reads {seen:#x}"),
        )
    }

    fn efer_op(&mut self) -> Outcome {
        let Ok(efer) = probe::rdmsr(IA32_EFER) else {
            return Err(self.fail("EFER cannot be read", format_args!("")));
        };
        let nx = cpuid_bit(0x8000_0001, 3, 20);
        let (value, expect_gp) = match self.rng.below(5) {
            0 => (efer ^ EFER_SCE, false),
            1 => (efer ^ EFER_NXE, !nx && efer & EFER_NXE == 0),
            2 => (efer & !EFER_LME, true),
            3 => (
                efer | 1
                    << self
                        .rng
                        .pick(&[1, 2, 3, 4, 5, 6, 7, 9, 12, 13, 16, 20, 40, 63]),
                true,
            ),
            _ => (efer, false),
        };
        let result = probe::wrmsr(IA32_EFER, value);
        let seen = probe::rdmsr(IA32_EFER);
        let restored = probe::wrmsr(IA32_EFER, efer);
        self.ensure(
            restored.is_ok() && probe::rdmsr(IA32_EFER) == Ok(efer),
            "EFER could not be restored",
            format_args!("{efer:#x}: {restored:?}"),
        )?;
        if expect_gp {
            self.ensure(
                result == Err(GP),
                "an EFER value the architecture refuses was taken",
                format_args!("{efer:#x} -> {value:#x}: {result:?}"),
            )
        } else {
            self.ensure(
                result.is_ok() && seen == Ok(value),
                "EFER does not take or read back a valid value",
                format_args!("{efer:#x} -> {value:#x}: {result:?}, reads {seen:x?}"),
            )
        }
    }

    fn msr_number(&mut self) -> u32 {
        match self.rng.below(8) {
            0..=2 => self.rng.pick(&INTERESTING_MSRS),
            3 => self.rng.below(0x2000) as u32,
            4 => 0xc000_0000 + self.rng.below(0x2000) as u32,
            5 => 0x800 + self.rng.below(0x100) as u32,
            6 => 0x4000_0000 + self.rng.below(0x200) as u32,
            _ => self.rng.next() as u32,
        }
    }

    pub(super) fn msr_op(&mut self) -> Outcome {
        match self.rng.below(6) {
            0 | 1 => {
                let msr = self.msr_number();
                let r = probe::rdmsr(msr);
                let expected = match msr {
                    m if is_x2apic(m) || is_vmx_msr(m) => Some(Err(GP)),
                    0x3a => Some(Ok(1)),
                    0x1a0 => Some(Ok(1 | 1 << 11 | 1 << 12)),
                    _ => None,
                };
                match expected {
                    Some(e) => self.ensure(
                        r == e,
                        "an MSR reads otherwise than the platform documents",
                        format_args!("MSR {msr:#x}: {r:x?}, expected {e:x?}"),
                    ),
                    None => self.ensure(
                        matches!(r, Ok(_) | Err(GP)),
                        "RDMSR raised an exception other than #GP",
                        format_args!("MSR {msr:#x}: {r:x?}"),
                    ),
                }
            }
            2 => self.passed_msr(),
            3 => self.emulated_msr(),
            4 => self.tsc_write(),
            _ => {
                // A write to an MSR the guest may not write: #GP.
                let msr = loop {
                    let m = self.msr_number();
                    // The MSRs a guest may write: its own, the emulated ones,
                    // and all MTRRs (their capability included).
                    let writable = PASSED.contains(&m)
                        || m == IA32_GS_BASE
                        || (0x200..=0x2ff).contains(&m)
                        || matches!(m, 0xfe | 0x10 | 0x1b | 0x8b | 0x1a0 | 0x1d9 | 0xc000_0080);
                    if !writable {
                        break m;
                    }
                };
                let value = self.edge();
                let r = probe::wrmsr(msr, value);
                self.ensure(
                    r == Err(GP),
                    "a write to an MSR the guest does not have was not refused with #GP",
                    format_args!("MSR {msr:#x} = {value:#x}: {r:?}"),
                )
            }
        }
    }

    /// An MSR the guest owns: a random value (canonical where it must be),
    /// read back, restored.
    fn passed_msr(&mut self) -> Outcome {
        let msr = self.rng.pick(&PASSED);
        let Ok(old) = probe::rdmsr(msr) else {
            return Err(self.fail(
                "a passed-through MSR cannot be read",
                format_args!("{msr:#x}"),
            ));
        };
        let value = match self.rng.below(3) {
            0 => self.rng.next(),
            1 => self.rng.next() & 0x0000_7fff_ffff_ffff,
            _ => self.edge(),
        };
        let valid = match msr {
            m if CANONICAL.contains(&m) => canonical(value),
            0x277 => value
                .to_le_bytes()
                .iter()
                .all(|b| matches!(b, 0 | 1 | 4 | 5 | 6 | 7)),
            _ => true,
        };
        let r = probe::wrmsr(msr, value);
        let seen = probe::rdmsr(msr);
        let restored = probe::wrmsr(msr, old);
        self.ensure(
            restored.is_ok() && probe::rdmsr(msr) == Ok(old),
            "a passed-through MSR could not be restored",
            format_args!("{msr:#x} = {old:#x}: {restored:?}"),
        )?;
        if matches!(msr, 0x174 | 0xc000_0081 | 0xc000_0084 | 0xc000_0103) {
            // Reserved bits vary by CPU: either answer, but a taken value
            // must read back as the CPU keeps it.
            return self.ensure(
                matches!(r, Ok(()) | Err(GP)),
                "WRMSR raised an exception other than #GP",
                format_args!("{msr:#x} = {value:#x}: {r:?}"),
            );
        }
        self.ensure(
            r.is_ok() == valid && (r.is_err() || seen == Ok(value)),
            "a passed-through MSR takes an invalid value or refuses a valid one",
            format_args!("{msr:#x} = {value:#x}: {r:?}, reads {seen:x?}"),
        )
    }

    /// The MSRs the hypervisor emulates: MTRRs read back what they took,
    /// DEBUGCTL takes only 0, MISC_ENABLE and the microcode signature
    /// ignore writes.
    fn emulated_msr(&mut self) -> Outcome {
        match self.rng.below(3) {
            0 => {
                let msr = self.rng.pick(&MTRRS);
                let old = probe::rdmsr(msr);
                let value = if self.rng.chance(50) {
                    self.edge()
                } else {
                    self.rng.next() & 0xfff
                };
                let r = probe::wrmsr(msr, value);
                let seen = probe::rdmsr(msr);
                if let Ok(old) = old {
                    let back = probe::wrmsr(msr, old);
                    self.ensure(
                        back.is_ok(),
                        "an MTRR could not be restored",
                        format_args!("{msr:#x} = {old:#x}: {back:?}"),
                    )?;
                }
                self.ensure(
                    matches!(r, Ok(()) | Err(GP)) && (r.is_err() || seen == Ok(value)),
                    "an MTRR does not read back what it took",
                    format_args!("{msr:#x} = {value:#x}: {r:?}, reads {seen:x?}"),
                )
            }
            1 => {
                let value = if self.rng.chance(50) { 0 } else { self.edge() };
                let r = probe::wrmsr(0x1d9, value);
                self.ensure(
                    (value == 0) == r.is_ok() && probe::rdmsr(0x1d9) == Ok(0),
                    "DEBUGCTL takes something other than 0",
                    format_args!("{value:#x}: {r:?}"),
                )
            }
            _ => {
                let msr = self.rng.pick(&[0x1a0, 0x8b]);
                let before = probe::rdmsr(msr);
                let value = self.edge();
                let r = probe::wrmsr(msr, value);
                self.ensure(
                    r.is_ok() && probe::rdmsr(msr) == before,
                    "a write the hypervisor ignores changed the MSR or faulted",
                    format_args!("{msr:#x} = {value:#x}: {r:?}"),
                )
            }
        }
    }

    /// The guest's TSC set to a random value, then back (close to) where it was.
    fn tsc_write(&mut self) -> Outcome {
        let start = crate::rdtsc();
        let value = self.edge();
        let r = probe::wrmsr(0x10, value);
        let seen = crate::rdtsc();
        let elapsed = 1000;
        let back = probe::wrmsr(0x10, start + elapsed);
        let now = crate::rdtsc();
        self.ensure(
            r.is_ok() && back.is_ok() && now >= start && now - start < 1 << 32,
            "the guest's TSC could not be set and set back",
            format_args!("{value:#x}: {r:?} (read {seen:#x}), back {back:?}"),
        )
    }

    pub(super) fn xcr_op(&mut self) -> Outcome {
        let xsave = cpuid_bit(1, 2, 26);
        let c4 = Cr4::read_raw();
        if !xsave || self.rng.chance(10) {
            // Without OSXSAVE, XSETBV is #UD.
            if c4 & CR4_OSXSAVE != 0 {
                return Ok(());
            }
            let r = probe::xsetbv(0, 1);
            return self.ensure(
                r == Err(UD),
                "XSETBV without CR4.OSXSAVE did not raise #UD",
                format_args!("{r:?}"),
            );
        }
        let set = probe::write_cr4(c4 | CR4_OSXSAVE);
        self.ensure(
            set.is_ok(),
            "CR4.OSXSAVE could not be set",
            format_args!("{set:?}"),
        )?;
        let old = xgetbv(0);
        let leaf = __cpuid_count(0xd, 0);
        let supported = u64::from(leaf.edx) << 32 | u64::from(leaf.eax);
        let (xcr, value) = match self.rng.below(10) {
            0..=5 => (
                0,
                self.rng
                    .pick(&[1, 3, 7, 0, 2, 5, 0xe7, 0x1f, 0x207, supported]),
            ),
            6 => (0, self.rng.next() & supported),
            7 => (0, self.edge()),
            8 => (1, self.rng.pick(&[0, 1, 3])),
            _ => (self.rng.range(2, 0xffff) as u32, 1),
        };
        let valid = xcr == 0
            && value & 1 != 0
            && value & !supported == 0
            && !(value & 4 != 0 && value & 2 == 0)
            && (value & 0xe0 == 0 || (value & 0xe0 == 0xe0 && value & 4 != 0))
            && (value & 0x18 == 0 || value & 0x18 == 0x18)
            && (value & 0x6_0000 == 0 || value & 0x6_0000 == 0x6_0000);
        let r = probe::xsetbv(xcr, value);
        let back = probe::xsetbv(0, old);
        let c4_back = probe::write_cr4(c4);
        self.ensure(
            back.is_ok() && c4_back.is_ok() && Cr4::read_raw() == c4,
            "XCR0 or CR4 could not be restored",
            format_args!("{old:#x}: {back:?} {c4_back:?}"),
        )?;
        if xcr == 1 {
            return self.ensure(
                matches!(r, Ok(()) | Err(GP)),
                "XSETBV of XCR1 raised an exception other than #GP",
                format_args!("{value:#x}: {r:?}"),
            );
        }
        self.ensure(
            r.is_ok() == valid && (r.is_ok() || r == Err(GP)),
            "XSETBV took an invalid XCR0 or refused a valid one",
            format_args!("XCR{xcr} = {value:#x} (supported {supported:#x}): {r:?}"),
        )
    }

    pub(super) fn cpuid_op(&mut self) -> Outcome {
        let leaf = match self.rng.below(6) {
            0 => self
                .rng
                .pick(&[0, 1, 7, 0xd, 0x8000_0000, 0x8000_0001, 0x8000_0008]),
            1 => self.rng.pick(&[
                0x4000_0000,
                0x4000_0001,
                0x4000_0002,
                0x4000_00ff,
                0x4000_0100,
            ]),
            2 => self.rng.below(0x20) as u32,
            3 => 0x8000_0000 + self.rng.below(0x20) as u32,
            _ => self.rng.next() as u32,
        };
        let sub = if self.rng.chance(50) {
            0
        } else {
            self.rng.next() as u32
        };
        let r = __cpuid_count(leaf, sub);
        match leaf {
            1 => self.ensure(
                r.ecx & (1 << 31) != 0 && r.ecx & (1 << 5 | 1 << 6 | 1 << 3 | 1 << 21) == 0,
                "CPUID leaf 1 offers VMX, SMX, MONITOR or x2APIC, or lacks the hypervisor bit",
                format_args!("ecx {:#x}", r.ecx),
            ),
            0x4000_0000 => self.ensure(
                r.eax == hv_abi::CPUID_FEATURES
                    && [r.ebx, r.ecx, r.edx]
                        .iter()
                        .flat_map(|w| w.to_le_bytes())
                        .eq(hv_abi::CPUID_SIGNATURE),
                "the hypervisor's CPUID leaf is wrong",
                format_args!("{:#x} {:#x} {:#x} {:#x}", r.eax, r.ebx, r.ecx, r.edx),
            ),
            0x4000_0001 => self.ensure(
                u64::from(r.eax) == hv_abi::VERSION,
                "the hypervisor's CPUID version leaf is wrong",
                format_args!("eax {:#x}", r.eax),
            ),
            _ => {
                let _ = __cpuid(0);
                Ok(())
            }
        }
    }

    pub(super) fn vmx_op(&mut self) -> Outcome {
        static mut SCRATCH: [u64; 4] = [0; 4];
        let insn = self.rng.pick(&VmxInsn::ALL);
        let operand = match self.rng.below(4) {
            0 => self
                .rng
                .pick(&[0xfed0_0000, 1 << 40, self.layout.ram_top()]),
            _ => &raw mut SCRATCH as u64,
        };
        let value = self.edge();
        let r = probe::vmx(insn, operand, value);
        // A memory operand outside RAM may fault first (operand fetches
        // come before the VM exit).
        let scratch = operand == &raw mut SCRATCH as u64;
        self.ensure(
            r == Err(UD) || (!scratch && r == Err(GP)),
            "a VMX instruction did not raise #UD in the guest",
            format_args!("{insn:?} operand {operand:#x} value {value:#x}: {r:?}"),
        )
    }

    pub(super) fn port_op(&mut self) -> Outcome {
        let port = if self.rng.chance(50) {
            self.rng.pick(&INTERESTING_PORTS)
        } else {
            self.rng.next() as u16
        };
        let size = self.rng.pick(&[1u8, 2, 4]);
        if self.rng.chance(50) {
            return self.port_read(port, size);
        }
        let value = self.rng.next() as u32;
        let exiting = exits(port, size);
        let value = match (port, size) {
            // Ends the run (the exit port), the guest's own devices (no
            // exit: its console among them).
            (0xf4, _) => return self.port_read(port, size),
            _ if !exiting => return self.port_read(port, size),
            // The i8042: commands that do nothing harmful, the output port
            // with the reset line high.
            (0x64, 1) => {
                let command = self.rng.pick(&[
                    0x20u8, 0xa7, 0xa8, 0xad, 0xae, 0xd1, 0xdd, 0xf1, 0xf3, 0xfd, 0xff,
                ]);
                port_out(0x64, 1, u32::from(command));
                match command {
                    0x20 => {
                        port_in(0x60, 1, 0);
                    }
                    0xd1 => port_out(0x60, 1, u32::from(self.rng.next() as u8 | 0x03)),
                    _ => {}
                }
                return Ok(());
            }
            (0x60, 1) => return self.port_read(port, size),
            // Fast reset, CPU reset, S5: their bits clear.
            (0x92, 1) => value & !1,
            (0xcf9, 1) => value & !0x04,
            (0x604, _) => value & !(1 << 13),
            (0x605, _) => value & !(1 << 5),
            _ => value,
        };
        port_out(port, size, value);
        // A hidden port keeps nothing.
        if hidden(port, size) {
            return self.port_read(port, size);
        }
        Ok(())
    }

    fn port_read(&mut self, port: u16, size: u8) -> Outcome {
        // The guest's own devices answer natively: only registers whose
        // read has no effect (and that every emulator implements).
        let port = if !exits(port, size) && !SAFE_NATIVE_READS.contains(&port) {
            0x510
        } else {
            port
        };
        let before = self.rng.next();
        let after = port_in(port, size, before);
        let mask: u64 = match size {
            1 => 0xff,
            2 => 0xffff,
            _ => 0xffff_ffff,
        };
        // IN to AL/AX keeps the rest of RAX; IN to EAX clears the upper half.
        let kept = if size == 4 {
            after >> 32 == 0
        } else {
            after & !mask == before & !mask
        };
        self.ensure(
            kept,
            "IN changed RAX beyond its operand",
            format_args!("port {port:#x} size {size}: {before:#x} -> {after:#x}"),
        )?;
        let value = after & mask;
        if port == 0xe9 {
            return self.ensure(
                value == 0xe9 & mask,
                "the debug port does not read 0xE9",
                format_args!("size {size}: {value:#x}"),
            );
        }
        if hidden(port, size) {
            return self.ensure(
                value == mask,
                "a hidden port does not read all ones",
                format_args!("port {port:#x} size {size}: {value:#x}"),
            );
        }
        Ok(())
    }

    /// Addresses outside the guest's RAM and devices, up to 1 TiB (and a
    /// little past), with the exception a read or write there must raise.
    fn stray_address(&mut self, fetch: bool) -> (u64, u8) {
        let address = loop {
            let a = self.stray_candidate(fetch);
            let page = a / PAGE;
            let last = a.wrapping_add(7) / PAGE;
            let crossing_ram_end = a < self.layout.ram_top() && last == self.layout.end();
            let view = self.model.current;
            // Not a device page, not a page the current view remaps, not
            // RAM the guest still has.
            let clear = |g: u64| {
                let device = self.layout.mmio.contains(&g);
                let remapped = view != 0 && self.model.remap_of(view, g).is_some();
                let ram = self.layout.is_backed(g.wrapping_mul(PAGE))
                    && !self.model.is_released(&self.layout, g);
                !(device || remapped || ram)
            };
            if (clear(page) || crossing_ram_end) && clear(last) {
                break a;
            }
        };
        let phys = 1u64 << self.layout.maxphy.min(40);
        let vector = if !canonical(address) {
            GP
        } else if address >= 1 << 40 || address >= phys {
            PF
        } else {
            GP
        };
        (address, vector)
    }

    fn stray_candidate(&mut self, fetch: bool) -> u64 {
        let top = self.layout.ram_top();
        match self.rng.below(10) {
            0..=2 => top + self.rng.below((1 << 40) - top) / 8 * 8,
            3 => 0xc000_0000 + self.rng.below(0x4000_0000) / 8 * 8,
            4 => 0xfed0_0000 + self.rng.below(PAGE / 8) * 8,
            5 if !fetch => top - self.rng.range(1, 7),
            6 => match self.tagged_released() {
                Some(g) => g * PAGE + self.rng.below(PAGE / 8) * 8,
                None => top + PAGE,
            },
            7 => (1 << 40) - 8,
            8 if !fetch => self
                .rng
                .pick(&[1 << 47, 0xdead_0000_0000_0000, 0xffff_7fff_ffff_fff0]),
            _ => top + self.rng.below(1 << 30) / 8 * 8,
        }
    }

    pub(super) fn stray_op(&mut self) -> Outcome {
        let (address, vector) = self.stray_address(false);
        // A byte access just below the end of RAM is RAM: only 8 bytes
        // cross it.
        let wide = address < self.layout.ram_top();
        let (what, r) = match if wide {
            self.rng.below(2) * 2
        } else {
            self.rng.below(4)
        } {
            0 => ("read", probe::read(address).map(|_| ())),
            1 => ("byte read", probe::read_u8(address).map(|_| ())),
            2 => ("write", probe::write(address, 0x5354_5241_5953_5452)),
            _ => ("byte write", probe::write_u8(address, 0x5a)),
        };
        self.ensure(
            r == Err(vector),
            "a stray access outside the guest's memory was not refused as it must be",
            format_args!("{what} of {address:#x}: {r:?}, expected vector {vector}"),
        )
    }

    pub(super) fn fetch_op(&mut self) -> Outcome {
        let (address, vector) = self.stray_address(true);
        let r = probe::fetch(address);
        self.ensure(
            r == Err(vector),
            "a fetch outside the guest's memory was not refused as it must be",
            format_args!("fetch of {address:#x}: {r:?}, expected vector {vector}"),
        )
    }
}

/// The port reads as an empty bus: it exits, and the hypervisor gives it
/// no meaning (`devices::ports`).
fn hidden(port: u16, size: u8) -> bool {
    if !exits(port, size) {
        return false;
    }
    !matches!(
        (port, size),
        (0xe9, _) | (0x60 | 0x64 | 0x92, 1) | (0xcf9, 1) | (0x600..=0x605, _)
    )
}

/// A copy of the guest's PML4 (the same mappings) for CR3 to point at.
fn copy_pml4() -> u64 {
    #[repr(C, align(4096))]
    struct Table([u64; 512]);
    static mut COPY: Table = Table([0; 512]);
    unsafe extern "C" {
        static boot_pml4: [u64; 512];
    }
    // SAFETY: the boot PML4 is only read; the copy is this function's own
    // and identity-mapped.
    unsafe {
        let copy = &raw mut COPY;
        (*copy).0 = boot_pml4;
        copy as u64
    }
}
