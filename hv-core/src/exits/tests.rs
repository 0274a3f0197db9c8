//! Exit handlers driven the way the CPU would: a fake VMCS with the exit's
//! fields, a guest built on a simulated machine, then the handler.

extern crate std;
use std::vec::Vec;

use hv_ept::walk::{Access, AccessKind, EptFault, PmlLog, translate, translate_logged};
use hv_ept::{Gfn, P2mType};
use x86::vmx::vmcs::{control, guest as g, ro};

use super::*;
use crate::loader::tests::elf;
use crate::testing::SimPlatform;
use crate::vcpu::{GuestRegisters, Vcpu, VcpuId};
use crate::vm::{GuestConfig, GuestError, Vm, VmError};
use crate::vmx::caps::{VmxCaps, tests::bochs_skylake_x};
use crate::vmx::vmcs::Vmcs;
use crate::vmx::vmcs::tests::FakeVmcs;

const IMAGE_AT: u64 = 0x20_0000;
/// Bochs's corei7_skylake_x: VMFUNC, #VE, the preemption timer, VPID and
/// wait-for-SIPI, but no monitor trap flag, so single steps use TF.
pub(crate) fn caps() -> VmxCaps {
    VmxCaps::new(bochs_skylake_x(), 46)
}

pub(crate) fn image() -> Vec<u8> {
    elf(IMAGE_AT, 0x2000, 0x4000, IMAGE_AT + 0x40, None, true)
}

pub(crate) fn config(image: &[u8]) -> GuestConfig<'_> {
    GuestConfig {
        memory_mib: 8,
        image,
        cmdline: "scenario=test",
        modules: &[],
        boot: crate::loader::BootOptions::default(),
        altp2m_mode: hv_abi::Altp2mMode::Mixed,
        boot_views: crate::vm::BootViews::Host,
        logdirty_all: false,
        host: std::boxed::Box::leak(std::boxed::Box::new(
            crate::devices::acpi::HostPlatform::pc(),
        )),
        apic_ids: &[0],
        coherence: std::boxed::Box::leak(std::boxed::Box::new(crate::smp::Coherence::new(2))),
    }
}

/// The same CPU with PML masked: log-dirty by write protection.
fn caps_without_pml() -> VmxCaps {
    caps().mask(crate::vmx::caps::Masked::PML)
}

fn new_guest(platform: &mut SimPlatform) -> Vm {
    let image = image();
    Vm::create(&caps(), &config(&image), platform).unwrap()
}

pub(crate) struct Machine {
    pub(crate) platform: SimPlatform,
    pub(crate) vm: Vm,
    pub(crate) vcpu: Vcpu,
    pub(crate) vmcs: FakeVmcs,
}

impl Machine {
    pub(crate) fn new() -> Self {
        Self::with(|_| {})
    }

    /// A machine whose guest configuration `change` adjusts first.
    pub(crate) fn with(change: impl FnOnce(&mut GuestConfig<'_>)) -> Self {
        Self::on(&caps(), change)
    }

    /// A machine on a CPU with `caps`, its VMCS holding the controls, the
    /// PML buffer and the fields that follow the views (as `Vcpu::load`
    /// writes them; the host state it also writes needs the real CPU).
    pub(crate) fn on(caps: &VmxCaps, change: impl FnOnce(&mut GuestConfig<'_>)) -> Self {
        let mut platform = SimPlatform::new();
        let image = image();
        let mut config = config(&image);
        change(&mut config);
        let vm = Vm::create(caps, &config, &mut platform).unwrap();
        let vcpu = Vcpu::new(&vm, VcpuId::BSP, &mut platform).unwrap();
        let mut vmcs = FakeVmcs::default();
        let c = &vm.controls;
        vmcs.write(
            control::PRIMARY_PROCBASED_EXEC_CONTROLS,
            u64::from(c.primary),
        );
        vmcs.write(
            control::SECONDARY_PROCBASED_EXEC_CONTROLS,
            u64::from(c.secondary),
        );
        vcpu.pml.write_vmcs(&mut vmcs);
        crate::views::apply(&mut vmcs, &vm, &vcpu);
        vmcs.write(g::RIP, 0x1000);
        vmcs.write(ro::VMEXIT_INSTRUCTION_LEN, 2);
        // 64-bit mode, like the test guest: injected exceptions carry their
        // error codes, registers are used whole.
        vmcs.write(g::CR0, 0x8000_0031);
        vmcs.write(control::VMENTRY_CONTROLS, crate::vcpu::cr::ENTRY_IA32E_MODE);
        vmcs.write(g::CS_ACCESS_RIGHTS, 0xa09b);
        Self {
            platform,
            vm,
            vcpu,
            vmcs,
        }
    }

    pub(crate) fn exit(&mut self, reason: ExitReason) -> Flow {
        // Counted as the run loop does.
        self.vm.counters[usize::from(reason.basic())] += 1;
        // As every VM exit does: the valid bit of the injection field is clear.
        let info = self.vmcs.read(control::VMENTRY_INTERRUPTION_INFO_FIELD);
        self.vmcs
            .write(control::VMENTRY_INTERRUPTION_INFO_FIELD, info & !(1 << 31));
        let mut ctx = ExitCtx {
            cpu: &mut self.vmcs,
            vcpu: &mut self.vcpu,
            vm: &mut self.vm,
            platform: &mut self.platform,
        };
        handle(reason, &mut ctx)
    }

    /// Tears the vCPU and the VM down; their frames go back to the platform.
    pub(crate) fn destroy(self) -> SimPlatform {
        let Machine {
            mut platform,
            vm,
            vcpu,
            mut vmcs,
        } = self;
        vcpu.destroy(&mut vmcs, &mut platform);
        vm.destroy(&mut platform);
        platform
    }

    pub(crate) fn injected(&self) -> u64 {
        self.vmcs.read(control::VMENTRY_INTERRUPTION_INFO_FIELD)
    }
}

pub(crate) fn stopped(flow: Flow) -> Option<GuestEnd> {
    match flow {
        Flow::Stop(end) => Some(end),
        Flow::Resume => None,
    }
}

#[test]
fn guest_ram_follows_the_pc_layout_and_holds_the_image() {
    let mut platform = SimPlatform::new();
    let guest = new_guest(&mut platform);
    let entry = |gfn| guest.p2m.get_entry(&platform, Gfn(gfn)).unwrap();
    assert_eq!(entry(0).ty, P2mType::RamRw);
    assert_eq!(entry(0x9e).ty, P2mType::RamRw);
    assert_eq!(
        entry(0x9f).ty,
        P2mType::RamRw,
        "the legacy area is backed by guest pages"
    );
    assert_eq!(entry(0xc0).ty, P2mType::RamRw);
    assert!(
        guest.memory_map.iter().any(|e| e.start == 0x9_f000
            && e.end == 0x10_0000
            && e.kind == crate::loader::MemoryKind::Reserved),
        "but reserved in the memory map"
    );
    let mut rsdp = [0u8; 8];
    guest.read(&platform, 0xe_0000, &mut rsdp).unwrap();
    assert_eq!(&rsdp, b"RSD PTR ", "the ACPI tables are there");
    let apic = entry(0xfee00);
    assert_eq!(
        (apic.mfn, apic.ty),
        (Some(hv_ept::Mfn(0xfee00)), P2mType::MmioDirect),
        "the local APIC is passed through"
    );
    assert_eq!(entry(0xfec00).ty, P2mType::MmioDirect, "and the I/O APIC");
    assert_eq!(entry(0xfed00).mfn, None, "and nothing else of the hole");
    assert_eq!(entry(0x100).ty, P2mType::RamRw);
    assert_eq!(
        entry(0x200).order,
        hv_ept::Order::PAGE_2M,
        "2 MiB-aligned RAM uses 2 MiB pages"
    );
    assert_eq!(entry(0x800).mfn, None, "above 8 MiB");
    let mut first = [0u8; 4];
    guest.read(&platform, IMAGE_AT, &mut first).unwrap();
    assert_eq!(
        u32::from_le_bytes(first),
        0xe852_50d6,
        "the image's Multiboot 2 header"
    );
    let mut bss = [0xffu8; 16];
    guest.read(&platform, IMAGE_AT + 0x3000, &mut bss).unwrap();
    assert_eq!(bss, [0; 16], "bss and fresh RAM are zero");
    let crate::loader::EntryState::Multiboot { ebx, .. } = guest.entry else {
        panic!("{:?}", guest.entry)
    };
    assert_eq!(
        u64::from(ebx),
        IMAGE_AT + 0x4000,
        "boot information after the image"
    );
    let ram = guest.ram_frames();
    assert_eq!(ram, 8 << 8, "RAM and the legacy area: 8 MiB of frames");
    guest.destroy(&mut platform);
    assert_eq!(
        platform.outstanding(),
        0,
        "every RAM and table frame comes back"
    );
}

#[test]
fn guest_creation_out_of_memory_at_every_point_leaks_nothing() {
    let image = image();
    for limit in 0..40 {
        let mut platform = SimPlatform::new();
        platform.limit = Some(limit);
        let result = Vm::create(&caps(), &config(&image), &mut platform);
        match result {
            Err(VmError::Guest(GuestError::NoMemory)) => {
                assert_eq!(platform.outstanding(), 0, "limit {limit}")
            }
            Ok(guest) => {
                guest.destroy(&mut platform);
                assert_eq!(platform.outstanding(), 0);
            }
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn a_bad_image_is_refused_before_any_memory_is_taken() {
    let mut platform = SimPlatform::new();
    let result = Vm::create(&caps(), &config(b"\x7fELF garbage"), &mut platform);
    assert!(matches!(result, Err(VmError::Guest(GuestError::Image(_)))));
    assert_eq!(platform.outstanding(), 0);
    let outside = elf(0x7f_f000, 0x2000, 0x2000, 0x7f_f000, None, true);
    let result = Vm::create(&caps(), &config(&outside), &mut platform);
    assert!(matches!(
        result,
        Err(VmError::Guest(GuestError::Image(
            crate::loader::ImageError::OutsideRam { .. }
        )))
    ));
}

#[test]
fn debug_port_output_becomes_lines_and_the_exit_port_ends_the_run() {
    let mut m = Machine::new();
    for &byte in b"hi\n" {
        m.vcpu.regs.rax = u64::from(byte);
        m.vmcs.write(
            ro::EXIT_QUALIFICATION,
            u64::from(crate::abi::DEBUG_PORT) << 16,
        );
        assert!(stopped(m.exit(ExitReason::Io)).is_none());
    }
    assert_eq!(m.platform.console, ["hi"]);
    assert_eq!(m.vmcs.read(g::RIP), 0x1006, "each OUT was skipped");
    m.vcpu.regs.rax = 42;
    m.vmcs.write(
        ro::EXIT_QUALIFICATION,
        u64::from(crate::abi::EXIT_PORT) << 16,
    );
    assert_eq!(stopped(m.exit(ExitReason::Io)), Some(GuestEnd::Exited(42)));
}

#[test]
fn a_reset_through_the_keyboard_controller_ends_the_run() {
    let mut m = Machine::new();
    m.vcpu.regs.rax = 0xfe;
    m.vmcs.write(ro::EXIT_QUALIFICATION, 0x64 << 16);
    assert_eq!(
        stopped(m.exit(ExitReason::Io)),
        Some(GuestEnd::Reset(crate::devices::ports::ResetPath::I8042))
    );
    assert!(
        m.vmcs.port_writes.is_empty(),
        "the real i8042 never sees it"
    );
}

#[test]
fn reads_of_absent_ports_give_all_ones_into_al_only() {
    let mut m = Machine::new();
    m.vcpu.regs.rax = 0x1234_5678_9abc_de00;
    m.vmcs.write(ro::EXIT_QUALIFICATION, 0x2f8 << 16 | 1 << 3);
    m.exit(ExitReason::Io);
    assert_eq!(m.vcpu.regs.rax, 0x1234_5678_9abc_deff);
    m.vmcs
        .write(ro::EXIT_QUALIFICATION, 0x2f8 << 16 | 1 << 3 | 3);
    m.exit(ExitReason::Io);
    assert_eq!(
        m.vcpu.regs.rax, 0xffff_ffff,
        "32-bit IN clears the upper half"
    );
}

#[test]
fn exit_counts_hypercall_checks_its_buffer() {
    let mut m = Machine::new();
    m.vm.counters[10] = 7;
    m.vcpu.regs = GuestRegisters {
        rax: crate::abi::call::EXIT_COUNTS,
        rdi: 0x30_0000,
        rsi: 16,
        ..Default::default()
    };
    m.exit(ExitReason::Vmcall);
    assert_eq!(m.vcpu.regs.rax, 16);
    let mut counter = [0u8; 8];
    m.vm.read(&m.platform, 0x30_0000 + 10 * 8, &mut counter)
        .unwrap();
    assert_eq!(u64::from_le_bytes(counter), 7);
    // Device pages, beyond RAM, and straddling the end of RAM all fail.
    for bad in [0xfee0_0000, 0x1_0000_0000, (8 << 20) - 8] {
        m.vcpu.regs = GuestRegisters {
            rax: crate::abi::call::EXIT_COUNTS,
            rdi: bad,
            rsi: 16,
            ..Default::default()
        };
        m.exit(ExitReason::Vmcall);
        assert_eq!(
            m.vcpu.regs.rax as i64,
            crate::abi::error::EFAULT,
            "buffer {bad:#x}"
        );
    }
    m.vcpu.regs = GuestRegisters {
        rax: 0xdead,
        ..Default::default()
    };
    m.exit(ExitReason::Vmcall);
    assert_eq!(m.vcpu.regs.rax as i64, crate::abi::error::ENOSYS);
}

#[test]
fn user_mode_may_not_make_hypercalls() {
    let mut m = Machine::new();
    m.vmcs.write(g::SS_ACCESS_RIGHTS, 0x93 | 3 << 5);
    m.vcpu.regs.rax = crate::abi::call::VERSION;
    m.exit(ExitReason::Vmcall);
    assert_eq!(m.vcpu.regs.rax as i64, crate::abi::error::EPERM);
}

#[test]
fn a_stray_access_is_reported_with_gp_and_a_hopeless_one_stops_the_guest() {
    let mut m = Machine::new();
    m.vmcs.write(ro::GUEST_PHYSICAL_ADDR_FULL, 0x1_2345_6000);
    m.vmcs.write(ro::EXIT_QUALIFICATION, 0b10);
    assert!(stopped(m.exit(ExitReason::EptViolation)).is_none());
    assert_eq!(m.injected(), 0x8000_0b0d, "#GP(0)");
    assert_eq!(m.vmcs.read(g::RIP), 0x1000, "the access is not skipped");
    assert_eq!(m.vm.stray_accesses, 1);
    m.vmcs.write(ro::IDT_VECTORING_INFO, 1 << 31 | 14);
    let end = stopped(m.exit(ExitReason::EptViolation));
    assert!(matches!(
        end,
        Some(GuestEnd::Stopped(StopReason::Unsupported(_)))
    ));
}

#[test]
fn a_write_to_a_log_dirty_page_marks_it_and_makes_it_writable() {
    let mut m = Machine::on(&caps_without_pml(), |_| {});
    let gfn = Gfn(0x300);
    m.vm.p2m
        .change_type_range(
            &mut m.platform,
            gfn,
            gfn,
            P2mType::RamRw,
            P2mType::RamLogdirty,
        )
        .unwrap();
    assert_eq!(
        m.vm.p2m.get_entry(&m.platform, gfn).unwrap().ty,
        P2mType::RamLogdirty
    );
    // As the CPU does: the marked entry first gives a misconfiguration; once
    // resolved, the write to the (now read-only) log-dirty page a violation.
    m.vmcs
        .write(ro::GUEST_PHYSICAL_ADDR_FULL, gfn.0 << 12 | 0x10);
    assert!(stopped(m.exit(ExitReason::EptMisconfig)).is_none());
    m.vmcs.write(ro::EXIT_QUALIFICATION, 0b10 | 0b101 << 3);
    assert!(stopped(m.exit(ExitReason::EptViolation)).is_none());
    assert!(m.vm.dirty.is_dirty(gfn));
    assert_eq!(
        m.vm.p2m.get_entry(&m.platform, gfn).unwrap().ty,
        P2mType::RamRw
    );
    assert_eq!(m.injected(), 0, "nothing injected");
}

#[test]
fn apic_base_writes_are_emulated() {
    let mut m = Machine::new();
    m.vcpu.regs = GuestRegisters {
        rcx: 0x1b,
        rax: 0xfee0_0000,
        ..Default::default()
    };
    m.exit(ExitReason::Wrmsr);
    m.vcpu.regs.rcx = 0x1b;
    m.exit(ExitReason::Rdmsr);
    assert_eq!(m.vcpu.regs.edx_eax(), 0xfee0_0100, "disabled, BSP kept");
    m.vcpu.regs = GuestRegisters {
        rcx: 0x1b,
        rax: 0xfee0_0c00,
        ..Default::default()
    };
    m.exit(ExitReason::Wrmsr);
    assert_eq!(m.injected(), 0x8000_0b0d, "x2APIC refused");
    m.vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
    m.vcpu.regs = GuestRegisters {
        rcx: 0x8d4,
        ..Default::default()
    };
    m.exit(ExitReason::Rdmsr);
    assert_eq!(m.injected(), 0x8000_0b0d, "unknown MSR");
}

#[test]
fn cr4_vmxe_is_refused_and_cr0_writes_keep_ne() {
    let mut m = Machine::new();
    crate::vcpu::cr::write_cr0(&mut m.vmcs, &m.vm.cr_fixed, crate::vcpu::cr::CR0_PE);
    crate::vcpu::cr::write_cr4(&mut m.vmcs, &m.vm.cr_fixed, 0);
    m.vcpu.regs.rbx = crate::vcpu::cr::CR4_VMXE;
    m.vmcs.write(ro::EXIT_QUALIFICATION, 4 | 3 << 8);
    m.exit(ExitReason::CrAccess);
    assert_eq!(m.injected(), 0x8000_0b0d);
    m.vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
    m.vcpu.regs.rbx = crate::vcpu::cr::CR0_PE | 0x20 | crate::vcpu::cr::CR0_ET;
    m.vmcs.write(ro::EXIT_QUALIFICATION, 3 << 8);
    m.exit(ExitReason::CrAccess);
    assert_eq!(m.injected(), 0);
    assert_eq!(
        crate::vcpu::cr::guest_cr0(&m.vmcs),
        crate::vcpu::cr::CR0_PE | 0x20 | crate::vcpu::cr::CR0_ET
    );
    assert_eq!(
        m.vmcs.read(g::RIP),
        0x1002,
        "only the accepted write was skipped"
    );
}

#[test]
fn init_then_sipi_starts_real_mode_at_the_vector() {
    let mut m = Machine::new();
    m.exit(ExitReason::Init);
    assert_eq!(
        m.vmcs.read(g::ACTIVITY_STATE),
        crate::vcpu::state::WAIT_FOR_SIPI
    );
    m.vmcs.write(ro::EXIT_QUALIFICATION, 0x9a);
    m.exit(ExitReason::Sipi);
    assert_eq!(m.vmcs.read(g::ACTIVITY_STATE), crate::vcpu::state::ACTIVE);
    assert_eq!(m.vmcs.read(g::CS_SELECTOR), 0x9a00);
    assert_eq!(m.vmcs.read(g::CS_BASE), 0x9_a000);
    assert_eq!(m.vmcs.read(g::RIP), 0);
    assert_eq!(
        crate::vcpu::cr::guest_cr0(&m.vmcs) & crate::vcpu::cr::CR0_PE,
        0
    );
}

/// An INIT resets the processor: no interrupt shadow, no pending debug
/// exception, and never "blocking by SMI" outside SMM, which VM entry
/// refuses. Bochs saves that bit at the INIT exit of a vCPU that a SIPI
/// took out of wait-for-SIPI (found by the test guest's INIT-SIPI-SIPI: the
/// INIT held back in wait-for-SIPI arrives after the first SIPI).
#[test]
fn an_init_leaves_no_blocking_for_the_wait_for_sipi_entry() {
    let mut m = Machine::new();
    m.vmcs.write(g::INTERRUPTIBILITY_STATE, 0b1101);
    m.vmcs.write(g::PENDING_DBG_EXCEPTIONS, 1 << 14);
    m.exit(ExitReason::Init);
    assert_eq!(
        m.vmcs.read(g::ACTIVITY_STATE),
        crate::vcpu::state::WAIT_FOR_SIPI
    );
    assert_eq!(m.vmcs.read(g::INTERRUPTIBILITY_STATE), 0);
    assert_eq!(m.vmcs.read(g::PENDING_DBG_EXCEPTIONS), 0);
}

#[test]
fn an_unhandled_exit_stops_the_guest_with_its_name() {
    let mut m = Machine::new();
    let end = stopped(m.exit(ExitReason::Invd));
    let Some(GuestEnd::Stopped(reason)) = end else {
        panic!("{end:?}")
    };
    assert!(std::format!("{reason}").contains("unhandled VM exit INVD (reason 13)"));
}

#[test]
fn vmx_instructions_and_mwait_get_ud() {
    let mut m = Machine::new();
    for reason in [ExitReason::Vmxon, ExitReason::Mwait] {
        m.vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
        assert!(stopped(m.exit(reason)).is_none());
        assert_eq!(m.injected(), 0x8000_0306);
    }
}

#[test]
fn xsetbv_checks_the_value() {
    let mut m = Machine::new();
    m.vcpu.regs = GuestRegisters {
        rax: 0b111,
        ..Default::default()
    };
    m.exit(ExitReason::Xsetbv);
    assert_eq!(m.vmcs.xcr0, Some(0b111));
    m.vcpu.regs = GuestRegisters {
        rax: 0b101,
        ..Default::default()
    };
    m.exit(ExitReason::Xsetbv);
    assert_eq!(m.injected(), 0x8000_0b0d);
}

// altp2m, log-dirty, balloon and display through the exit handlers.

use crate::abi::{access, call, error};

impl Machine {
    /// Makes hypercall `number` and returns RAX.
    pub(crate) fn call(&mut self, number: u64, args: &[u64]) -> i64 {
        let arg = |i: usize| args.get(i).copied().unwrap_or(0);
        self.vcpu.regs = GuestRegisters {
            rax: number,
            rdi: arg(0),
            rsi: arg(1),
            rdx: arg(2),
            r10: arg(3),
            ..Default::default()
        };
        assert!(stopped(self.exit(ExitReason::Vmcall)).is_none());
        self.vcpu.regs.rax as i64
    }

    /// A guest access to `gpa` as the CPU makes it: the EPT walk (the SDM
    /// walk model) through the VMCS's EPTP, logging writes in the vCPU's
    /// PML buffer when PML is on; each fault is the exit the CPU would
    /// take, handled, until the access goes through. Returns the exits.
    fn access(&mut self, gpa: u64, kind: AccessKind) -> u64 {
        let caps = *self.vm.p2m.caps();
        let a = Access {
            kind,
            ..Access::read()
        };
        for exits in 0..16 {
            let eptp = self.vmcs.read(control::EPTP_FULL);
            let r = match self.vcpu.pml.frame() {
                Some(buffer) => {
                    let index = self.vmcs.read(g::PML_INDEX) as u16;
                    let mut log = PmlLog { buffer, index };
                    let r = translate_logged(&mut self.platform, &caps, eptp, gpa, a, &mut log);
                    self.vmcs.write(g::PML_INDEX, u64::from(log.index));
                    r
                }
                None => translate(&mut self.platform, &caps, eptp, gpa, a),
            };
            let reason = match r {
                Ok(_) => return exits,
                Err(EptFault::Misconfig { .. }) => ExitReason::EptMisconfig,
                Err(EptFault::Violation { qualification, .. }) => {
                    self.vmcs
                        .write(ro::EXIT_QUALIFICATION, qualification.bits());
                    ExitReason::EptViolation
                }
                Err(EptFault::PmlFull) => ExitReason::PmlFull,
                Err(other) => panic!("access to {gpa:#x}: {other:?}"),
            };
            self.vmcs.write(ro::GUEST_PHYSICAL_ADDR_FULL, gpa);
            assert!(stopped(self.exit(reason)).is_none());
        }
        panic!("access to {gpa:#x} did not settle")
    }

    fn write_guest(&mut self, gpa: u64) -> u64 {
        self.access(gpa, AccessKind::Write)
    }

    /// An EPT exit at `gpa` as the CPU would give it: first the
    /// misconfiguration of a pending type change, if any, then the violation.
    pub(crate) fn touch(&mut self, gpa: u64, write: bool) -> Flow {
        self.vmcs.write(ro::GUEST_PHYSICAL_ADDR_FULL, gpa);
        if self
            .vm
            .p2m
            .get_entry(&self.platform, Gfn(gpa >> 12))
            .is_ok_and(|e| e.recalc)
        {
            assert!(stopped(self.exit(ExitReason::EptMisconfig)).is_none());
        }
        self.vmcs
            .write(ro::EXIT_QUALIFICATION, if write { 0b010 } else { 0b001 });
        self.exit(ExitReason::EptViolation)
    }
}

#[test]
fn switching_views_by_hypercall_updates_eptp_and_index() {
    let mut m = Machine::new();
    let host_eptp = m.vm.p2m.eptp();
    assert_eq!(
        m.call(call::ALTP2M_CREATE_VIEW, &[access::RWX]),
        error::EINVAL,
        "altp2m off"
    );
    assert_eq!(m.call(call::ALTP2M_SET_STATE, &[1]), 0);
    assert_eq!(
        m.call(call::ALTP2M_CREATE_VIEW, &[access::W]),
        error::EINVAL,
        "write without read"
    );
    assert_eq!(
        m.call(call::ALTP2M_CREATE_VIEW, &[42]),
        error::EINVAL,
        "no such access value"
    );
    let v = m.call(call::ALTP2M_CREATE_VIEW, &[access::RWX]);
    assert_eq!(v, 1);
    assert_eq!(m.call(call::ALTP2M_SWITCH_VIEW, &[1 << 20]), error::EINVAL);
    assert_eq!(m.call(call::ALTP2M_SWITCH_VIEW, &[v as u64]), 0);
    let view_eptp = m.vm.altp2m.eptp(&m.vm.p2m, 1).unwrap();
    assert_ne!(view_eptp, host_eptp);
    assert_eq!(m.vmcs.read(control::EPTP_FULL), view_eptp);
    assert_eq!(m.vmcs.read(control::EPTP_INDEX), 1);
    assert_eq!(
        m.vmcs.read(control::VM_FUNCTION_CONTROLS_FULL),
        1,
        "EPTP switching on"
    );
    assert_eq!(
        m.vmcs.read(control::EPTP_LIST_ADDR_FULL),
        m.vm.altp2m.visible_list().hpa()
    );
    assert_ne!(
        m.vmcs.read(control::EXCEPTION_BITMAP) & 1 << 3,
        0,
        "#BP intercepted for hidden breakpoints"
    );
    assert_eq!(m.call(call::ALTP2M_DESTROY_VIEW, &[1]), error::EBUSY);
    assert_eq!(m.call(call::ALTP2M_SET_STATE, &[0]), 0);
    assert_eq!(
        m.vmcs.read(control::EPTP_FULL),
        host_eptp,
        "back on the host p2m"
    );
    assert_eq!(m.vmcs.read(control::VM_FUNCTION_CONTROLS_FULL), 0);
    let platform = m.destroy();
    assert_eq!(platform.outstanding(), 0, "views and lists freed");
}

#[test]
fn a_vmfunc_switch_is_picked_up_from_the_eptp_index() {
    let mut m = Machine::new();
    m.call(call::ALTP2M_SET_STATE, &[1]);
    let v = m.call(call::ALTP2M_CREATE_VIEW, &[access::RWX]) as u64;
    m.vmcs.write(control::EPTP_INDEX, v);
    crate::views::sync(&mut m.vm, &m.vcpu, m.vmcs.read(control::EPTP_INDEX)).unwrap();
    assert_eq!(m.vm.altp2m.vcpu_view(0), Ok(v as u16));
    m.vmcs.write(control::EPTP_INDEX, 77);
    assert!(
        crate::views::sync(&mut m.vm, &m.vcpu, m.vmcs.read(control::EPTP_INDEX)).is_err(),
        "a view that does not exist"
    );
}

#[test]
fn the_mode_refuses_altp2m_calls_and_logs_each_once() {
    let mut m = Machine::new();
    m.vm.altp2m_mode = hv_abi::Altp2mMode::Limited;
    assert_eq!(m.call(call::ALTP2M_SET_STATE, &[1]), error::EPERM);
    assert_eq!(m.call(call::ALTP2M_SET_STATE, &[1]), error::EPERM);
    assert_eq!(m.vm.refusals_logged.count_ones(), 1);
    assert_eq!(
        m.call(call::ALTP2M_VCPU_ENABLE_NOTIFY, &[0x300]),
        0,
        "notify is the guest's in limited mode"
    );
    assert_eq!(m.call(call::VERSION, &[]), crate::abi::VERSION as i64);
}

#[test]
fn a_denied_access_in_a_view_is_reported_and_stepped_in_view_0() {
    let mut m = Machine::new();
    m.call(call::ALTP2M_SET_STATE, &[1]);
    let v = m.call(call::ALTP2M_CREATE_VIEW, &[access::RWX]) as u64;
    assert_eq!(
        m.call(call::ALTP2M_SET_MEM_ACCESS, &[v, 0x300, access::RX]),
        0
    );
    m.call(call::ALTP2M_SWITCH_VIEW, &[v]);
    m.vmcs.write(g::RFLAGS, 0x2);
    assert!(stopped(m.touch(0x30_0008, true)).is_none());
    assert_eq!(m.platform.events.len(), 1);
    assert!(
        m.platform.events[0].starts_with("access view=1 gfn=0x300 access=w entry=rx"),
        "{:?}",
        m.platform.events
    );
    assert_eq!(
        m.vmcs.read(control::EPTP_FULL),
        m.vm.p2m.eptp(),
        "the instruction runs in view 0"
    );
    assert_eq!(
        m.vm.altp2m.vcpu_view(0),
        Ok(v as u16),
        "while the vCPU stays on its view for everyone else"
    );
    assert_eq!(m.vmcs.read(g::RFLAGS) & 1 << 8, 1 << 8, "single-stepped");
    assert_ne!(
        m.vmcs.read(control::EXCEPTION_BITMAP) & 1 << 1,
        0,
        "#DB intercepted"
    );
    // The #DB of the step: back to the view, TF as the guest had it, nothing injected.
    m.vmcs
        .write(ro::VMEXIT_INTERRUPTION_INFO, 1 << 31 | 3 << 8 | 1);
    assert!(stopped(m.exit(ExitReason::ExceptionOrNmi)).is_none());
    assert_eq!(m.vm.altp2m.vcpu_view(0), Ok(v as u16));
    assert_eq!(
        m.vmcs.read(control::EPTP_FULL),
        m.vm.altp2m.eptp(&m.vm.p2m, v as u16).unwrap()
    );
    assert_eq!(m.vmcs.read(g::RFLAGS) & 1 << 8, 0);
    assert_eq!(m.injected(), 0);
    assert_eq!(m.vmcs.read(control::EXCEPTION_BITMAP) & 1 << 1, 0);
}

/// A view that denies writes to gfn 0x300, the vCPU on it, a step started
/// by a denied write.
fn stepping_machine() -> (Machine, u16) {
    let mut m = Machine::new();
    m.call(call::ALTP2M_SET_STATE, &[1]);
    let v = m.call(call::ALTP2M_CREATE_VIEW, &[access::RWX]) as u64;
    m.call(call::ALTP2M_SET_MEM_ACCESS, &[v, 0x300, access::RX]);
    m.call(call::ALTP2M_SWITCH_VIEW, &[v]);
    m.vmcs.write(g::RFLAGS, 0x2);
    assert!(stopped(m.touch(0x30_0008, true)).is_none());
    assert!(m.vcpu.step.is_some());
    (m, v as u16)
}

#[test]
fn a_stepped_instruction_that_switches_views_ends_where_it_asked() {
    // The stepped instruction is a hypercall to view 0: the vCPU answers 0
    // at once and stays there after the step.
    let (mut m, v) = stepping_machine();
    assert_eq!(
        m.call(call::ALTP2M_GET_VCPU_VIEW, &[0]),
        i64::from(v),
        "its view during the step"
    );
    m.vmcs.write(g::RFLAGS, 0x2 | 1 << 8);
    assert_eq!(m.call(call::ALTP2M_SWITCH_VIEW, &[0]), 0);
    assert!(
        m.vcpu.step.is_none(),
        "the emulated instruction ended the step"
    );
    assert_eq!(m.vm.altp2m.vcpu_view(0), Ok(0));
    assert_eq!(m.vmcs.read(control::EPTP_FULL), m.vm.p2m.eptp());
    // The stepped instruction is VMFUNC 0: the EPTP index says so.
    let (mut m, _) = stepping_machine();
    m.vmcs.write(control::EPTP_INDEX, 0);
    m.vmcs
        .write(ro::VMEXIT_INTERRUPTION_INFO, 1 << 31 | 3 << 8 | 1);
    crate::views::sync(&mut m.vm, &m.vcpu, m.vmcs.read(control::EPTP_INDEX)).unwrap();
    assert!(stopped(m.exit(ExitReason::ExceptionOrNmi)).is_none());
    assert_eq!(m.vm.altp2m.vcpu_view(0), Ok(0), "VMFUNC 0 is not undone");
    assert_eq!(m.vmcs.read(control::EPTP_FULL), m.vm.p2m.eptp());
}

#[test]
fn a_view_hidden_under_a_stepping_vcpu_is_kept_and_cannot_be_destroyed() {
    let (mut m, v) = stepping_machine();
    assert_eq!(m.call(call::ALTP2M_SET_VISIBILITY, &[u64::from(v), 0]), 0);
    assert_eq!(
        m.call(call::ALTP2M_DESTROY_VIEW, &[u64::from(v)]),
        error::EBUSY,
        "the stepping vCPU is on it"
    );
    m.vmcs
        .write(ro::VMEXIT_INTERRUPTION_INFO, 1 << 31 | 3 << 8 | 1);
    assert!(stopped(m.exit(ExitReason::ExceptionOrNmi)).is_none());
    assert_eq!(m.vm.altp2m.vcpu_view(0), Ok(v), "back on the hidden view");
    assert_eq!(
        m.vmcs.read(control::EPTP_FULL),
        m.vm.altp2m.eptp(&m.vm.p2m, v).unwrap()
    );
    // Hiding view 0 does not stop the next denied access from stepping.
    assert_eq!(m.call(call::ALTP2M_SET_VISIBILITY, &[0, 0]), 0);
    assert!(stopped(m.touch(0x30_0010, true)).is_none());
    assert!(m.vcpu.step.is_some(), "stepped, not #GP");
    assert_eq!(m.injected() & (1 << 31), 0);
}

#[test]
fn a_page_fault_of_a_stepped_instruction_reaches_the_guest_with_its_address() {
    let (mut m, _) = stepping_machine();
    m.vmcs.write(ro::EXIT_QUALIFICATION, 0xdead_b000);
    m.vmcs.write(
        ro::VMEXIT_INTERRUPTION_INFO,
        1 << 31 | 1 << 11 | 3 << 8 | 14,
    );
    m.vmcs.write(ro::VMEXIT_INTERRUPTION_ERR_CODE, 2);
    assert!(stopped(m.exit(ExitReason::ExceptionOrNmi)).is_none());
    assert_eq!(m.vmcs.cr2, 0xdead_b000, "CR2 from the exit qualification");
    assert_eq!(m.injected(), 1 << 31 | 1 << 11 | 3 << 8 | 14);
    assert!(m.vcpu.step.is_none());
}

#[test]
fn a_guests_own_breakpoint_is_delivered_to_it() {
    let mut m = Machine::new();
    m.call(call::ALTP2M_SET_STATE, &[1]);
    m.vmcs.write(g::RIP, 0x30_0000);
    m.vmcs.write(ro::VMEXIT_INSTRUCTION_LEN, 1);
    m.vmcs
        .write(ro::VMEXIT_INTERRUPTION_INFO, 1 << 31 | 6 << 8 | 3);
    assert!(stopped(m.exit(ExitReason::ExceptionOrNmi)).is_none());
    assert_eq!(
        m.injected(),
        1 << 31 | 6 << 8 | 3,
        "INT3 re-delivered as a software exception"
    );
    assert_eq!(m.vmcs.read(control::VMENTRY_INSTRUCTION_LEN), 1);
    assert!(m.platform.events.is_empty());
}

#[test]
fn a_page_dropped_from_many_views_is_one_report_line_per_kind() {
    let mut m = Machine::new();
    m.call(call::ALTP2M_SET_STATE, &[1]);
    let views: std::vec::Vec<u64> = (0..5)
        .map(|_| m.call(call::ALTP2M_CREATE_VIEW, &[access::RWX]) as u64)
        .collect();
    for &v in &views {
        // Each view holds the page (a restriction) and an alias of it.
        assert_eq!(
            m.call(call::ALTP2M_SET_MEM_ACCESS, &[v, 0x300, access::RX]),
            0
        );
        assert_eq!(m.call(call::ALTP2M_CHANGE_GFN, &[v, 0x301, 0x300]), 0);
    }
    assert_eq!(m.call(call::ALTP2M_DESTROY_VIEW, &[views[3]]), 0);
    m.platform.events.clear();
    assert_eq!(m.call(call::BALLOON_RELEASE, &[0x300]), 0);
    let dropped: std::vec::Vec<_> = m
        .platform
        .events
        .iter()
        .filter(|e| e.contains("dropped"))
        .collect();
    assert_eq!(dropped.len(), 2, "{dropped:?}");
    assert!(
        dropped
            .iter()
            .any(|e| e.contains("dropped view=1-3,5 gfn=0x300 pages=1 access=rx")),
        "{dropped:?}"
    );
    assert!(
        dropped.iter().any(
            |e| e.contains("dropped view=1-3,5 gfn=0x301 pages=1 access=rx")
                && e.contains("remap-of=0x300")
        ),
        "{dropped:?}"
    );
}

#[test]
fn a_ballooned_page_leaves_every_view_and_its_frame_is_freed_once() {
    let mut m = Machine::new();
    m.call(call::ALTP2M_SET_STATE, &[1]);
    let v = m.call(call::ALTP2M_CREATE_VIEW, &[access::RWX]) as u64;
    assert_eq!(m.call(call::ALTP2M_CHANGE_GFN, &[v, 0x301, 0x300]), 0);
    let frame =
        m.vm.p2m
            .get_entry(&m.platform, Gfn(0x300))
            .unwrap()
            .mfn
            .unwrap();
    assert_eq!(m.call(call::BALLOON_RELEASE, &[0x300]), 0);
    assert!(!m.platform.is_allocated(frame.0), "the frame went back");
    assert_eq!(m.call(call::BALLOON_RELEASE, &[0x300]), error::ENOENT);
    assert!(
        m.vmcs.inveptions.iter().any(Option::is_some),
        "the views' EPTPs were flushed"
    );
    assert!(
        m.platform
            .events
            .iter()
            .any(|e| e.contains("dropped view=1 gfn=0x301")),
        "{:?}",
        m.platform.events
    );
    let mut byte = [0u8];
    assert!(
        m.vm.read(&m.platform, 0x30_0000, &mut byte).is_err(),
        "no longer guest RAM"
    );
    let platform = m.destroy();
    assert_eq!(
        platform.outstanding(),
        0,
        "teardown frees the rest, not that frame again"
    );
}

#[test]
fn the_display_copies_exactly_the_pages_written_and_matches_the_framebuffer() {
    for caps in [caps(), caps_without_pml()] {
        display_copies_exactly_the_pages_written(&caps);
    }
}

fn display_copies_exactly_the_pages_written(caps: &VmxCaps) {
    let mut m = Machine::on(caps, |_| {});
    let fb = 0x400u64;
    assert_eq!(m.call(call::DISPLAY_SET, &[fb, 65]), error::EINVAL);
    assert_eq!(
        m.call(call::DISPLAY_SET, &[0x7fe, 4]),
        error::EFAULT,
        "past the end of RAM"
    );
    let watchdog = m.vm.tick_period();
    assert_eq!(m.call(call::DISPLAY_SET, &[fb, 4]), 0);
    assert!(
        m.vm.tick_period() < watchdog,
        "the tick runs at the display's rate"
    );
    assert_eq!(
        m.vmcs.read(g::VMX_PREEMPTION_TIMER_VALUE),
        u64::from(m.vm.tick_period()),
        "at once"
    );
    assert_eq!(m.call(call::DISPLAY_REFRESH, &[]), 0, "nothing written yet");
    // The guest writes page 2: logged by the CPU (PML) or by the
    // hypervisor on the write fault.
    m.write_guest((fb + 2) << 12);
    m.vm.write(&mut m.platform, (fb + 2) << 12, b"frame")
        .unwrap();
    assert_eq!(m.call(call::DISPLAY_REFRESH, &[]), 1);
    let mut fb_bytes = std::vec![0u8; 4 * 4096];
    m.vm.read(&m.platform, fb << 12, &mut fb_bytes).unwrap();
    let want = crate::abi::display_checksum(fb_bytes.iter().copied());
    assert_eq!(m.call(call::DISPLAY_CHECKSUM, &[]) as u64, want);
    assert_eq!(
        m.platform.screen.len(),
        80 * 25 * 2,
        "page 0 mirrored to the text screen"
    );
    assert_eq!(m.call(call::DISPLAY_SET, &[0, 0]), 0);
    assert_eq!(
        m.vmcs.read(g::VMX_PREEMPTION_TIMER_VALUE),
        u64::from(watchdog),
        "no display: the watchdog's tick again"
    );
    assert_eq!(
        m.vm.p2m.get_entry(&m.platform, Gfn(fb)).unwrap().ty,
        P2mType::RamRw
    );
    let platform = m.destroy();
    assert_eq!(platform.outstanding(), 0);
}

#[test]
fn log_dirty_fetch_checks_its_buffer_before_clearing_anything() {
    for caps in [caps(), caps_without_pml()] {
        log_dirty_fetch_checks_its_buffer(&caps);
    }
}

fn log_dirty_fetch_checks_its_buffer(caps: &VmxCaps) {
    let mut m = Machine::on(caps, |_| {});
    assert_eq!(m.call(call::LOGDIRTY_TRACK, &[0x500, 8]), 0);
    m.write_guest(0x50_3000);
    assert_eq!(
        m.call(call::LOGDIRTY_FETCH, &[0x500, 8, 0xfec0_0000]),
        error::EFAULT
    );
    assert_eq!(
        m.call(call::LOGDIRTY_FETCH, &[0x500, 8, 0x60_0000]),
        1,
        "the dirty page survived the bad call"
    );
    let mut bitmap = [0u8];
    m.vm.read(&m.platform, 0x60_0000, &mut bitmap).unwrap();
    assert_eq!(bitmap[0], 1 << 3);
    assert_eq!(m.call(call::LOGDIRTY_FETCH, &[0x500, 8, 0x60_0000]), 0);
}

#[test]
fn the_display_and_the_guests_log_dirty_fetch_do_not_take_each_others_writes() {
    for caps in [caps(), caps_without_pml()] {
        display_and_fetch_share_the_dirty_log(&caps);
    }
}

fn display_and_fetch_share_the_dirty_log(caps: &VmxCaps) {
    let mut m = Machine::on(caps, |_| {});
    let fb = 0x400u64;
    let checksum = |m: &Machine| {
        let mut bytes = std::vec![0u8; 4 * 4096];
        m.vm.read(&m.platform, fb << 12, &mut bytes).unwrap();
        crate::abi::display_checksum(bytes.iter().copied())
    };
    assert_eq!(m.call(call::DISPLAY_SET, &[fb, 4]), 0);
    assert_eq!(m.call(call::LOGDIRTY_TRACK, &[fb, 4]), 0);
    // The guest's fetch takes a write first: the next refresh still copies it.
    m.write_guest((fb + 1) << 12);
    m.vm.write(&mut m.platform, (fb + 1) << 12, b"one").unwrap();
    assert_eq!(m.call(call::LOGDIRTY_FETCH, &[fb, 4, 0x60_0000]), 1);
    assert_eq!(m.call(call::DISPLAY_REFRESH, &[]), 1, "page 1 still copied");
    assert_eq!(m.call(call::DISPLAY_CHECKSUM, &[]) as u64, checksum(&m));
    assert_eq!(m.call(call::DISPLAY_REFRESH, &[]), 0, "and only once");
    // A refresh takes a write first: the guest's next fetch still sees it,
    // once, and a fetch of another range does not.
    m.write_guest((fb + 3) << 12);
    assert_eq!(m.call(call::DISPLAY_REFRESH, &[]), 1);
    assert_eq!(m.call(call::LOGDIRTY_FETCH, &[fb, 3, 0x60_0000]), 0);
    m.vm.write(&mut m.platform, 0x60_0000, &[0]).unwrap();
    assert_eq!(m.call(call::LOGDIRTY_FETCH, &[fb, 4, 0x60_0000]), 1);
    let mut bitmap = [0u8];
    m.vm.read(&m.platform, 0x60_0000, &mut bitmap).unwrap();
    assert_eq!(bitmap[0], 1 << 3);
    assert_eq!(m.call(call::LOGDIRTY_FETCH, &[fb, 4, 0x60_0000]), 0);
    assert_eq!(m.call(call::DISPLAY_SET, &[0, 0]), 0);
    let platform = m.destroy();
    assert_eq!(platform.outstanding(), 0);
}

#[test]
fn outside_64_bit_mode_hypercalls_see_the_low_halves_of_registers() {
    let mut m = Machine::new();
    m.vmcs.write(control::VMENTRY_CONTROLS, 0);
    m.vmcs.write(g::CS_ACCESS_RIGHTS, 0xc09b);
    assert_eq!(
        m.call(0xdead_0000_0000_0000 | call::VERSION, &[]),
        crate::abi::VERSION as i64
    );
}

#[test]
fn mov_cr8_reaches_the_guests_own_tpr_and_pae_paging_loads_pdptes() {
    let mut m = Machine::new();
    m.vcpu.regs.rcx = 0x9;
    m.vmcs.write(ro::EXIT_QUALIFICATION, 8 | 1 << 8);
    m.exit(ExitReason::CrAccess);
    assert_eq!(m.vmcs.cr8, 9);
    m.vmcs.write(ro::EXIT_QUALIFICATION, 8 | 1 << 4 | 2 << 8);
    m.exit(ExitReason::CrAccess);
    assert_eq!(m.vcpu.regs.rdx, 9, "MOV from CR8");
    m.vcpu.regs.rcx = 0x10;
    m.vmcs.write(ro::EXIT_QUALIFICATION, 8 | 1 << 8);
    m.exit(ExitReason::CrAccess);
    assert_eq!(m.injected(), 0x8000_0b0d, "reserved TPR bits");
    // Legacy PAE paging: the PDPTEs at CR3 go to the VMCS when paging starts.
    m.vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
    m.vmcs.write(control::VMENTRY_CONTROLS, 0);
    m.vmcs.write(g::CS_ACCESS_RIGHTS, 0xc09b);
    m.vmcs.write(g::IA32_EFER_FULL, 0);
    crate::vcpu::cr::write_cr0(&mut m.vmcs, &m.vm.cr_fixed, crate::vcpu::cr::CR0_PE);
    crate::vcpu::cr::write_cr4(&mut m.vmcs, &m.vm.cr_fixed, crate::vcpu::cr::CR4_PAE);
    let pdptes: [u64; 4] = [0x30_1001, 0, 0x30_2001, 0];
    let bytes: Vec<u8> = pdptes.iter().flat_map(|p| p.to_le_bytes()).collect();
    m.vm.write(&mut m.platform, 0x30_0000, &bytes).unwrap();
    m.vmcs.write(g::CR3, 0x30_0000);
    m.vcpu.regs.rax = crate::vcpu::cr::CR0_PE | crate::vcpu::cr::CR0_PG | 0x20;
    m.vmcs.write(ro::EXIT_QUALIFICATION, 0);
    m.exit(ExitReason::CrAccess);
    assert_eq!(m.injected(), 0);
    assert_eq!(m.vmcs.read(g::PDPTE0_FULL), 0x30_1001);
    assert_eq!(m.vmcs.read(g::PDPTE2_FULL), 0x30_2001);
    assert!(
        m.vmcs.invvpids.contains(&crate::vcpu::GUEST_VPID),
        "paging changed: VPID flushed"
    );
    // A present PDPTE with reserved bits makes the MOV fault and changes nothing.
    crate::vcpu::cr::write_cr0(&mut m.vmcs, &m.vm.cr_fixed, crate::vcpu::cr::CR0_PE);
    m.vm.write(
        &mut m.platform,
        0x30_0000,
        &(0x30_1001u64 | 1 << 5).to_le_bytes(),
    )
    .unwrap();
    m.exit(ExitReason::CrAccess);
    assert_eq!(m.injected(), 0x8000_0b0d);
    assert_eq!(
        crate::vcpu::cr::guest_cr0(&m.vmcs) & crate::vcpu::cr::CR0_PG,
        0
    );
}

#[test]
fn clearing_paging_in_64_bit_code_faults() {
    let mut m = Machine::new();
    crate::vcpu::cr::write_cr4(&mut m.vmcs, &m.vm.cr_fixed, crate::vcpu::cr::CR4_PAE);
    m.vmcs.write(
        g::IA32_EFER_FULL,
        crate::vcpu::cr::EFER_LME | crate::vcpu::cr::EFER_LMA,
    );
    m.vcpu.regs.rax = crate::vcpu::cr::CR0_PE;
    m.vmcs.write(ro::EXIT_QUALIFICATION, 0);
    m.exit(ExitReason::CrAccess);
    assert_eq!(m.injected(), 0x8000_0b0d);
}

#[test]
fn a_fault_in_a_stepped_instruction_ends_the_step_and_reaches_the_view() {
    let mut m = Machine::new();
    m.call(call::ALTP2M_SET_STATE, &[1]);
    let v = m.call(call::ALTP2M_CREATE_VIEW, &[access::RWX]) as u64;
    m.call(call::ALTP2M_SET_MEM_ACCESS, &[v, 0x300, access::R]);
    m.call(call::ALTP2M_SWITCH_VIEW, &[v]);
    m.vmcs.write(g::RFLAGS, 0x2);
    m.touch(0x30_0000, true);
    assert_eq!(
        m.vmcs.read(control::EXCEPTION_BITMAP),
        u64::from(u32::MAX),
        "every exception ends a TF step"
    );
    // The instruction raised #PF in view 0: back to the view, the guest gets it.
    m.vmcs.write(
        ro::VMEXIT_INTERRUPTION_INFO,
        1 << 31 | 1 << 11 | 3 << 8 | 14,
    );
    m.vmcs.write(ro::VMEXIT_INTERRUPTION_ERR_CODE, 2);
    m.exit(ExitReason::ExceptionOrNmi);
    assert_eq!(m.vm.altp2m.vcpu_view(0), Ok(v as u16));
    assert_eq!(m.injected(), 1 << 31 | 1 << 11 | 3 << 8 | 14);
    assert_eq!(m.vmcs.read(g::RFLAGS) & 1 << 8, 0);
    // An emulated instruction ends a step too (no #DB would come).
    m.touch(0x30_0000, true);
    assert!(m.vcpu.step.is_some());
    m.vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
    m.call(call::VERSION, &[]);
    assert!(
        m.vcpu.step.is_none(),
        "the VMCALL completed the stepped instruction"
    );
    assert_eq!(m.vm.altp2m.vcpu_view(0), Ok(v as u16));
    assert_eq!(
        m.vmcs.read(g::PENDING_DBG_EXCEPTIONS) & crate::vcpu::events::PENDING_BS,
        0,
        "no #DB the guest did not ask for"
    );
}

#[test]
fn a_guest_nmi_is_forwarded_once_the_guest_can_take_it() {
    let mut m = Machine::new();
    m.vmcs.write(ro::VMEXIT_INTERRUPTION_INFO, 0x8000_0202);
    assert!(stopped(m.exit(ExitReason::ExceptionOrNmi)).is_none());
    assert!(m.vcpu.pending.nmi, "owed to the guest");
    m.vmcs
        .write(g::INTERRUPTIBILITY_STATE, crate::vcpu::events::BLOCKING_NMI);
    m.vcpu.pending.deliver(&mut m.vmcs);
    assert_eq!(
        m.injected() & (1 << 31),
        0,
        "the guest still handles an NMI"
    );
    assert!(m.vcpu.pending.nmi);
    // The NMI-window exit: the guest's handler returned.
    m.vmcs.write(g::INTERRUPTIBILITY_STATE, 0);
    assert!(stopped(m.exit(ExitReason::NmiWindow)).is_none());
    m.vcpu.pending.deliver(&mut m.vmcs);
    assert_eq!(m.injected(), 0x8000_0202, "NMI, vector 2");
    assert!(!m.vcpu.pending.nmi);
}

/// After an NMI exit (and the SIPI exit of a vCPU that waited for SIPI)
/// NMIs are unblocked in root mode with an IRET, as the SDM leaves them
/// blocked after an NMI exit: Bochs 2.7 keeps them blocked in the guest
/// too, and every later kick of the vCPU would be held until its next tick.
#[test]
fn nmi_and_sipi_exits_unblock_nmis() {
    let mut m = Machine::new();
    m.vmcs.write(ro::VMEXIT_INTERRUPTION_INFO, 0x8000_0202);
    assert!(stopped(m.exit(ExitReason::ExceptionOrNmi)).is_none());
    assert_eq!(m.vmcs.nmis_unblocked, 1);
    m.exit(ExitReason::Init);
    m.vmcs.write(ro::EXIT_QUALIFICATION, 0x08);
    assert!(stopped(m.exit(ExitReason::Sipi)).is_none());
    assert_eq!(m.vmcs.nmis_unblocked, 2);
}

/// "Blocking by SMI" is never entered: VM entry refuses it outside SMM,
/// where guests never run, and Bochs 2.7 saves it at every exit of a vCPU
/// started by a SIPI exit (its wait-for-SIPI state masked SMIs for good).
#[test]
fn smi_blocking_a_vm_exit_reports_is_dropped_before_entry() {
    let mut m = Machine::new();
    m.vmcs.write(g::INTERRUPTIBILITY_STATE, 0b0101);
    m.vcpu.pending.deliver(&mut m.vmcs);
    assert_eq!(m.vmcs.read(g::INTERRUPTIBILITY_STATE), 0b0001);
}

#[test]
fn a_kick_is_not_the_guests_nmi() {
    let mut m = two_vcpus();
    let coherence = m.vm.coherence;
    // vCPU 1 switches vCPU 0's view while vCPU 0 runs: a kick, an NMI exit.
    assert_eq!(coherence.enter(0), None);
    coherence.request_reapply(0, |v| coherence.exit(v, 0));
    m.vmcs.write(ro::VMEXIT_INTERRUPTION_INFO, 0x8000_0202);
    assert!(stopped(m.exit(ExitReason::ExceptionOrNmi)).is_none());
    assert!(!m.vcpu.pending.nmi, "the kick's NMI is the hypervisor's");
    // The next NMI exit is the guest's again.
    assert!(stopped(m.exit(ExitReason::ExceptionOrNmi)).is_none());
    assert!(m.vcpu.pending.nmi);
}

#[test]
fn the_watchdog_stops_a_guest_halted_for_good_and_only_that() {
    let mut m = Machine::new();
    let halted = |m: &mut Machine, rflags: u64| {
        m.vmcs.write(g::ACTIVITY_STATE, crate::vcpu::state::HLT);
        m.vmcs.write(g::RFLAGS, rflags);
        m.exit(ExitReason::PreemptionTimer)
    };
    // Halted with interrupts on: its own timer wakes it.
    for _ in 0..5 {
        assert!(stopped(halted(&mut m, 0x202)).is_none());
    }
    assert_eq!(
        m.vmcs.read(g::VMX_PREEMPTION_TIMER_VALUE),
        u64::from(m.vm.tick_period()),
        "the tick is rearmed"
    );
    // An NMI owed to it would wake it.
    m.vcpu.pending.nmi = true;
    assert!(stopped(halted(&mut m, 0x2)).is_none());
    assert!(stopped(halted(&mut m, 0x2)).is_none());
    m.vcpu.pending.nmi = false;
    assert!(
        stopped(halted(&mut m, 0x2)).is_none(),
        "one tick is not enough"
    );
    assert_eq!(
        stopped(halted(&mut m, 0x2)),
        Some(GuestEnd::Stopped(StopReason::Halted))
    );
}

fn wrmsr(m: &mut Machine, msr: u32, value: u64) -> u64 {
    m.vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
    m.vcpu.regs.rcx = u64::from(msr);
    m.vcpu.regs.set_edx_eax(value);
    assert!(stopped(m.exit(ExitReason::Wrmsr)).is_none());
    m.injected()
}

#[test]
fn the_local_apic_page_follows_the_guests_apic_base_and_the_physical_one_stays() {
    let mut m = Machine::new();
    let entry = |m: &Machine, gfn| m.vm.p2m.get_entry(&m.platform, Gfn(gfn)).unwrap();
    let ram_frame = entry(&m, 0x500).mfn;
    // Relocated onto RAM: the APIC answers there, the old page is gone.
    assert_eq!(wrmsr(&mut m, 0x1b, 0x50_0000 | 1 << 11), 0);
    assert_eq!(entry(&m, 0x500).ty, P2mType::MmioDirect);
    assert_eq!(entry(&m, 0x500).mfn, Some(hv_ept::Mfn(0xfee00)));
    assert_eq!(entry(&m, 0xfee00).mfn, None, "nothing at the old base");
    // Disabled: the page reads as all ones, the physical APIC is masked.
    assert_eq!(wrmsr(&mut m, 0x1b, 0x50_0000), 0);
    assert!(m.vmcs.lapic_disabled);
    let disabled = entry(&m, 0x500);
    assert_eq!(disabled.ty, P2mType::RamRo);
    let mut word = [0u8; 4];
    m.platform
        .read_phys(disabled.mfn.unwrap().hpa() + 0x20, &mut word);
    assert_eq!(word, [0xff; 4]);
    // Back at the reset base: the RAM page returns as it was.
    assert_eq!(wrmsr(&mut m, 0x1b, crate::vcpu::APIC_BASE_RESET), 0);
    assert_eq!(entry(&m, 0x500).mfn, ram_frame);
    assert_eq!(entry(&m, 0x500).ty, P2mType::RamRw);
    assert_eq!(entry(&m, 0xfee00).ty, P2mType::MmioDirect);
    // Beyond the physical-address width: #GP, nothing moves.
    assert_eq!(wrmsr(&mut m, 0x1b, 1 << 50 | 1 << 11), 0x8000_0b0d);
    assert_eq!(m.vcpu.apic_base, crate::vcpu::APIC_BASE_RESET);
    let platform = m.destroy();
    assert_eq!(platform.outstanding(), 0, "the all-ones frame too");
}

#[test]
fn tsc_writes_become_an_offset_and_mtrrs_read_back() {
    let mut m = Machine::new();
    m.vmcs.tsc = 1000;
    assert_eq!(wrmsr(&mut m, 0x10, 5000), 0);
    assert_eq!(m.vmcs.read(control::TSC_OFFSET_FULL), 4000);
    assert_eq!(wrmsr(&mut m, 0x2ff, 0xc06), 0);
    m.vcpu.regs.rcx = 0x2ff;
    assert!(stopped(m.exit(ExitReason::Rdmsr)).is_none());
    assert_eq!(m.vcpu.regs.edx_eax(), 0xc06);
    assert_eq!(wrmsr(&mut m, 0x2ff, 0x02), 0x8000_0b0d, "no memory type 2");
}

#[test]
fn a_guest_can_boot_on_a_fresh_view_or_switched_between_two() {
    let m = Machine::with(|c| c.boot_views = crate::vm::BootViews::Fresh);
    assert!(m.vm.altp2m.is_enabled());
    assert_eq!(m.vm.altp2m.vcpu_view(0), Ok(1));
    assert_eq!(
        m.vm.altp2m.max_mapped_pfn(&m.vm.p2m, 1),
        Ok(Gfn(0)),
        "empty: every page is copied lazily"
    );
    let mut m = Machine::with(|c| c.boot_views = crate::vm::BootViews::Switching);
    assert_eq!(m.vm.altp2m.vcpu_view(0), Ok(1));
    assert!(stopped(m.exit(ExitReason::PreemptionTimer)).is_none());
    assert_eq!(m.vm.altp2m.vcpu_view(0), Ok(2), "the tick switched");
    assert_eq!(
        m.vmcs.read(control::EPTP_FULL),
        m.vm.altp2m.eptp(&m.vm.p2m, 2).unwrap()
    );
    assert!(stopped(m.exit(ExitReason::PreemptionTimer)).is_none());
    assert_eq!(m.vm.altp2m.vcpu_view(0), Ok(1));
}

#[test]
fn all_ram_under_log_dirty_is_fetched_on_every_tick() {
    for caps in [caps(), caps_without_pml()] {
        all_ram_under_log_dirty_is_fetched(&caps);
    }
}

fn all_ram_under_log_dirty_is_fetched(caps: &VmxCaps) {
    let mut m = Machine::on(caps, |c| c.logdirty_all = true);
    assert_eq!(
        m.vm.p2m.get_entry(&m.platform, Gfn(0x300)).unwrap().ty,
        P2mType::RamLogdirty
    );
    m.write_guest(0x30_0000);
    m.write_guest(0x40_1000);
    assert!(stopped(m.exit(ExitReason::PreemptionTimer)).is_none());
    let totals = m.vm.logdirty_all.unwrap();
    assert_eq!((totals.fetches, totals.pages), (1, 2));
    assert_eq!(
        m.vm.p2m.get_entry(&m.platform, Gfn(0x300)).unwrap().ty,
        P2mType::RamLogdirty,
        "re-armed"
    );
    assert!(stopped(m.exit(ExitReason::PreemptionTimer)).is_none());
    assert_eq!(m.vm.logdirty_all.unwrap().pages, 2, "nothing new");
}

// Log-dirty through PML: the CPU logs writes in the vCPU's buffer, drained
// at the start of every exit.

#[test]
fn a_pml_guest_has_a_buffer_ad_flags_and_the_control_and_frees_them() {
    let m = Machine::new();
    assert!(m.vm.features.pml);
    let frame = m.vcpu.pml.frame().expect("a PML buffer");
    assert_eq!(m.vmcs.read(control::PML_ADDR_FULL), frame.hpa());
    assert_eq!(m.vmcs.read(g::PML_INDEX), 511);
    let pml = x86::vmx::vmcs::control::SecondaryControls::ENABLE_PML.bits();
    assert_ne!(m.vm.controls.secondary & pml, 0);
    assert_ne!(m.vmcs.read(control::EPTP_FULL) & 1 << 6, 0, "A/D on");
    assert_eq!(m.vm.p2m.log_mode(), hv_ept::LogMode::Pml);
    let platform = m.destroy();
    assert_eq!(
        platform.outstanding(),
        0,
        "the buffer is freed with the vCPU"
    );
    let m = Machine::on(&caps_without_pml(), |_| {});
    assert!(!m.vm.features.pml && m.vcpu.pml.frame().is_none());
    assert_eq!(m.vm.controls.secondary & pml, 0);
    assert_eq!(m.vmcs.read(control::EPTP_FULL) & 1 << 6, 0);
    assert_eq!(m.destroy().outstanding(), 0);
}

/// Exits of display frames with 1, 4, 16 and 64 dirty pages after a first
/// frame that writes them all: the guest's writes, plus the refresh call.
fn display_frame_exits(caps: &VmxCaps) -> std::vec::Vec<u64> {
    let mut m = Machine::on(caps, |c| c.memory_mib = 16);
    let fb = 0x800u64;
    assert_eq!(m.call(call::DISPLAY_SET, &[fb, 64]), 0);
    let write_all = |m: &mut Machine, n: u64| -> u64 {
        (0..n).map(|p| m.write_guest((fb + p) << 12)).sum::<u64>()
    };
    write_all(&mut m, 64);
    assert_eq!(m.call(call::DISPLAY_REFRESH, &[]), 64);
    let mut exits = std::vec::Vec::new();
    for n in [1, 4, 16, 64] {
        let e = write_all(&mut m, n);
        assert_eq!(m.call(call::DISPLAY_REFRESH, &[]), n as i64, "{n} pages");
        exits.push(e + 1);
    }
    assert_eq!(m.destroy().outstanding(), 0);
    exits
}

#[test]
fn a_display_frame_costs_one_exit_with_pml_and_a_fault_a_page_without() {
    assert_eq!(display_frame_exits(&caps()), [1, 1, 1, 1]);
    let faults = display_frame_exits(&caps_without_pml());
    for (exits, n) in faults.iter().zip([1, 4, 16, 64]) {
        assert!(*exits > n, "{faults:?}");
    }
}

#[test]
fn a_full_pml_buffer_exits_and_no_write_is_lost() {
    let mut m = Machine::on(&caps(), |c| c.memory_mib = 16);
    let first = 0x800u64;
    let pages = 600u64;
    let at = 0x60_0000;
    assert_eq!(m.call(call::LOGDIRTY_TRACK, &[first, pages]), 0);
    // The first round splits the superpages (exits, which drain).
    for p in 0..pages {
        m.write_guest((first + p) << 12);
    }
    assert_eq!(
        m.call(call::LOGDIRTY_FETCH, &[first, pages, at]),
        pages as i64
    );
    let exits: u64 = (0..pages).map(|p| m.write_guest((first + p) << 12)).sum();
    let full = m.vm.counters[ExitReason::PmlFull.basic() as usize];
    assert_eq!(
        (exits, full),
        (1, 1),
        "600 logged pages fill 512 entries once"
    );
    assert_eq!(
        m.call(call::LOGDIRTY_FETCH, &[first, pages, at]),
        pages as i64
    );
    let mut bitmap = [0u8; 75];
    m.vm.read(&m.platform, at, &mut bitmap).unwrap();
    assert!(bitmap.iter().all(|&b| b == 0xff));
    assert_eq!(m.call(call::LOGDIRTY_FETCH, &[first, pages, at]), 0);
}

#[test]
fn a_write_through_an_alias_before_a_vmfunc_is_logged_against_its_source() {
    let mut m = Machine::new();
    let (source, alias) = (0x500u64, 0x510u64);
    assert_eq!(m.call(call::ALTP2M_SET_STATE, &[1]), 0);
    let a = m.call(call::ALTP2M_CREATE_VIEW, &[access::RWX]) as u64;
    let b = m.call(call::ALTP2M_CREATE_VIEW, &[access::RWX]) as u64;
    assert_eq!(m.call(call::ALTP2M_CHANGE_GFN, &[a, alias, source]), 0);
    assert_eq!(m.call(call::LOGDIRTY_TRACK, &[source, 0x20]), 0);
    assert_eq!(m.call(call::ALTP2M_SWITCH_VIEW, &[a]), 0);
    m.write_guest(alias << 12);
    let at = 0x60_0000;
    assert_eq!(m.call(call::LOGDIRTY_FETCH, &[source, 0x20, at]), 1);
    // Now a write costs no exit: through the alias in view a, then a VMFUNC
    // to view b (no exit either), then the fetch's exit drains the buffer.
    assert_eq!(m.write_guest(alias << 12), 0);
    let eptp_b = m.vm.altp2m.eptp(&m.vm.p2m, b as u16).unwrap();
    m.vmcs.write(control::EPTP_FULL, eptp_b);
    m.vmcs.write(control::EPTP_INDEX, b);
    crate::views::sync(&mut m.vm, &m.vcpu, b).unwrap();
    assert_eq!(m.call(call::LOGDIRTY_FETCH, &[source, 0x20, at]), 1);
    let mut bitmap = [0u8; 4];
    m.vm.read(&m.platform, at, &mut bitmap).unwrap();
    assert_eq!(bitmap, [1, 0, 0, 0], "the source, not the alias");
}

#[test]
fn garbage_in_the_pml_buffer_is_reported_not_fatal() {
    let mut m = Machine::new();
    let frame = m.vcpu.pml.frame().unwrap();
    use hv_ept::EptMemory;
    m.platform.write_entry(frame, 511, u64::MAX);
    m.platform.write_entry(frame, 510, 1 << 60);
    m.vmcs.write(g::PML_INDEX, 509);
    assert!(stopped(m.exit(ExitReason::PmlFull)).is_none());
    assert_eq!(m.vmcs.read(g::PML_INDEX), 511, "emptied");
    // An index out of range reads as a full buffer: all 512 entries.
    m.vmcs.write(g::PML_INDEX, 0x1234);
    assert!(stopped(m.exit(ExitReason::PmlFull)).is_none());
    assert_eq!(m.vmcs.read(g::PML_INDEX), 511);
    assert_eq!(m.vm.dirty.dirty_count(), 1, "the zeroed entries name gfn 0");
}

#[test]
fn a_vcpu_out_of_frames_takes_no_pml_buffer_with_it() {
    let mut platform = SimPlatform::new();
    let vm = new_guest(&mut platform);
    let before = platform.outstanding();
    for spare in 0..2 {
        platform.limit = Some(before + spare);
        assert!(Vcpu::new(&vm, VcpuId::BSP, &mut platform).is_err());
        assert_eq!(platform.outstanding(), before, "{spare} spare frames");
    }
    platform.limit = None;
    let vcpu = Vcpu::new(&vm, VcpuId::BSP, &mut platform).unwrap();
    assert_eq!(platform.outstanding(), before + 2, "VMCS and PML buffer");
    vcpu.destroy(&mut FakeVmcs::default(), &mut platform);
    vm.destroy(&mut platform);
    assert_eq!(platform.outstanding(), 0);
}

/// A machine whose VM has two vCPUs: this one (0) and another one (1) whose
/// CPU the tests play through `smp::Coherence`.
pub(crate) fn two_vcpus() -> Machine {
    Machine::with(|c| c.apic_ids = &[0, 1])
}

#[test]
fn switching_another_vcpus_view_kicks_it_to_reapply_its_fields() {
    let mut m = two_vcpus();
    m.call(call::ALTP2M_SET_STATE, &[1]);
    let v = m.call(call::ALTP2M_CREATE_VIEW, &[access::RWX]) as u64;
    let coherence = m.vm.coherence;
    // vCPU 1 is in guest mode; the call returns once the kick made it leave.
    assert_eq!(coherence.enter(1), None);
    m.platform.kicks.clear();
    m.platform.kicked_exit = Some((coherence, 0));
    assert_eq!(m.call(call::ALTP2M_SWITCH_VCPU_VIEW, &[1, v]), 0);
    assert_eq!(m.vm.altp2m.vcpu_view(1), Ok(v as u16));
    assert_eq!(m.vm.altp2m.vcpu_view(0), Ok(0), "this vCPU stays");
    assert_eq!(m.platform.kicks, [(1, crate::platform::Kick::Nmi)]);
    assert!(
        coherence.must_reapply(1),
        "vCPU 1 may not enter before it wrote its fields"
    );
    assert!(coherence.take_reapply(1), "vCPU 1 writes its EPTP again");
    assert!(!coherence.take_reapply(0));
}

/// vCPU 1's exit after vCPU 0 switched its view reads the EPTP index its
/// hardware still had: that is not a VMFUNC to take over, the switch
/// stands (found by the test guest's smp-views: the kick's own exit
/// switched vCPU 1 back).
#[test]
fn another_vcpus_switch_survives_its_next_exit() {
    let mut m = two_vcpus();
    m.call(call::ALTP2M_SET_STATE, &[1]);
    let v = m.call(call::ALTP2M_CREATE_VIEW, &[access::RWX]) as u64;
    let other = Vcpu::new(&m.vm, VcpuId(1), &mut m.platform).unwrap();
    assert_eq!(m.call(call::ALTP2M_SWITCH_VCPU_VIEW, &[1, v]), 0);
    // vCPU 1 exits (the kick) with the index of view 0 in its VMCS.
    crate::views::sync(&mut m.vm, &other, 0).unwrap();
    assert_eq!(m.vm.altp2m.vcpu_view(1), Ok(v as u16));
    assert!(m.vm.coherence.take_reapply(1));
    // Once its fields are written again, a VMFUNC is seen as before.
    crate::views::sync(&mut m.vm, &other, 0).unwrap();
    assert_eq!(m.vm.altp2m.vcpu_view(1), Ok(0));
    other.destroy(&mut m.vmcs, &mut m.platform);
}

#[test]
fn a_view_another_vcpu_switched_to_by_vmfunc_cannot_be_destroyed() {
    let mut m = two_vcpus();
    m.call(call::ALTP2M_SET_STATE, &[1]);
    let v = m.call(call::ALTP2M_CREATE_VIEW, &[access::RWX]) as u64;
    let coherence = m.vm.coherence;
    // vCPU 1 VMFUNCs to the view without an exit: altp2m does not know.
    assert_eq!(coherence.enter(1), None);
    m.platform.kicked_exit = Some((coherence, v));
    assert_eq!(
        m.call(call::ALTP2M_DESTROY_VIEW, &[v]),
        error::EBUSY,
        "the kick made vCPU 1 publish its view"
    );
    assert_eq!(
        m.vm.altp2m.is_visible(v as u16),
        Ok(true),
        "the refused destroy put the view back in the EPTP list"
    );
    // vCPU 1 left the view (VMFUNC back to 0): now it goes.
    if let Some(epoch) = coherence.enter(1) {
        coherence.flushed(1, epoch);
    }
    m.platform.kicked_exit = Some((coherence, 0));
    assert_eq!(m.call(call::ALTP2M_DESTROY_VIEW, &[v]), 0);
}

#[test]
fn a_page_given_back_is_shot_down_on_every_vcpu_first() {
    let mut m = two_vcpus();
    let coherence = m.vm.coherence;
    assert_eq!(coherence.enter(1), None);
    m.platform.kicked_exit = Some((coherence, 0));
    assert_eq!(m.call(call::BALLOON_RELEASE, &[0x300]), 0);
    assert_eq!(
        m.platform.kicks,
        [(1, crate::platform::Kick::Nmi)],
        "vCPU 1 was in guest mode: kicked before the frame went back"
    );
    assert!(
        coherence.enter(1).is_some(),
        "and it flushes before it enters again"
    );
}

#[test]
fn the_guest_is_stopped_only_when_every_vcpu_is_halted_for_good() {
    let mut m = two_vcpus();
    let halted = |m: &mut Machine| {
        m.vmcs.write(g::ACTIVITY_STATE, crate::vcpu::state::HLT);
        m.vmcs.write(g::RFLAGS, 0x2);
        m.exit(ExitReason::PreemptionTimer)
    };
    for _ in 0..4 {
        assert!(stopped(halted(&mut m)).is_none(), "vCPU 1 still runs");
    }
    // vCPU 1 parks in wait-for-SIPI (a CPU the guest took offline).
    m.vm.coherence.park(1);
    assert_eq!(
        stopped(halted(&mut m)),
        Some(GuestEnd::Stopped(StopReason::Halted))
    );
}

mod masked;
