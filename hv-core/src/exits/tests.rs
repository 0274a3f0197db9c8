//! Exit handlers driven the way the CPU would: a fake VMCS with the exit's
//! fields, a guest built on a simulated machine, then the handler.

extern crate std;
use std::vec::Vec;

use hv_ept::{EptCaps, Gfn, P2mType};
use x86::vmx::vmcs::{control, guest as g, ro};

use super::*;
use crate::cr::tests::BOCHS;
use crate::guest::{Features, Guest, GuestConfig, GuestError};
use crate::loader::tests::elf;
use crate::testing::SimPlatform;
use crate::vcpu::GuestRegisters;
use crate::vmcs::tests::FakeVmcs;

const IMAGE_AT: u64 = 0x20_0000;
const FEATURES: Features = Features {
    vmfunc: true,
    ve: true,
    tick: true,
};

fn image() -> Vec<u8> {
    elf(IMAGE_AT, 0x2000, 0x4000, IMAGE_AT + 0x40, None, true)
}

fn config(image: &[u8]) -> GuestConfig<'_> {
    GuestConfig {
        memory_mib: 8,
        image,
        cmdline: "scenario=test",
        force_multiboot1: false,
        altp2m_mode: hv_abi::Altp2mMode::Mixed,
    }
}

fn new_guest(platform: &mut SimPlatform) -> Guest {
    let image = image();
    Guest::create(&config(&image), EptCaps::ALL, BOCHS, FEATURES, platform).unwrap()
}

struct Machine {
    platform: SimPlatform,
    guest: Guest,
    vmcs: FakeVmcs,
    regs: GuestRegisters,
}

impl Machine {
    fn new() -> Self {
        let mut platform = SimPlatform::new();
        let guest = new_guest(&mut platform);
        let mut vmcs = FakeVmcs::default();
        vmcs.write(g::RIP, 0x1000);
        vmcs.write(ro::VMEXIT_INSTRUCTION_LEN, 2);
        Self {
            platform,
            guest,
            vmcs,
            regs: GuestRegisters::default(),
        }
    }

    fn exit(&mut self, reason: u16) -> Flow {
        let mut ctx = ExitCtx {
            vmcs: &mut self.vmcs,
            regs: &mut self.regs,
            guest: &mut self.guest,
            platform: &mut self.platform,
        };
        handle(reason, &mut ctx)
    }

    fn injected(&self) -> u64 {
        self.vmcs.read(control::VMENTRY_INTERRUPTION_INFO_FIELD)
    }
}

fn stopped(flow: Flow) -> Option<GuestEnd> {
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
        entry(0x9f).mfn,
        None,
        "EBDA page and legacy hole are not RAM"
    );
    assert_eq!(entry(0xc0).mfn, None);
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
    assert_eq!(
        guest.boot_info,
        IMAGE_AT + 0x4000,
        "boot information after the image"
    );
    let ram = guest.ram_frames();
    assert_eq!(ram, 0x9f + (8 << 8) - 0x100);
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
        let result = Guest::create(
            &config(&image),
            EptCaps::ALL,
            BOCHS,
            FEATURES,
            &mut platform,
        );
        match result {
            Err(GuestError::NoMemory) => assert_eq!(platform.outstanding(), 0, "limit {limit}"),
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
    let result = Guest::create(
        &config(b"\x7fELF garbage"),
        EptCaps::ALL,
        BOCHS,
        FEATURES,
        &mut platform,
    );
    assert!(matches!(result, Err(GuestError::Image(_))));
    assert_eq!(platform.outstanding(), 0);
    let outside = elf(0x7f_f000, 0x2000, 0x2000, 0x7f_f000, None, true);
    let result = Guest::create(
        &config(&outside),
        EptCaps::ALL,
        BOCHS,
        FEATURES,
        &mut platform,
    );
    assert!(matches!(
        result,
        Err(GuestError::Image(
            crate::loader::ImageError::OutsideRam { .. }
        ))
    ));
}

#[test]
fn serial_output_becomes_lines_and_the_exit_port_ends_the_run() {
    let mut m = Machine::new();
    for &byte in b"hi\n" {
        m.regs.rax = u64::from(byte);
        m.vmcs
            .write(ro::EXIT_QUALIFICATION, u64::from(crate::abi::COM1) << 16);
        assert!(stopped(m.exit(crate::exit_reason::IO_INSTRUCTION)).is_none());
    }
    assert_eq!(m.platform.console, ["hi"]);
    assert_eq!(m.vmcs.read(g::RIP), 0x1006, "each OUT was skipped");
    m.regs.rax = 42;
    m.vmcs.write(
        ro::EXIT_QUALIFICATION,
        u64::from(crate::abi::EXIT_PORT) << 16,
    );
    assert_eq!(
        stopped(m.exit(crate::exit_reason::IO_INSTRUCTION)),
        Some(GuestEnd::Exited(42))
    );
}

#[test]
fn reads_of_absent_ports_give_all_ones_into_al_only() {
    let mut m = Machine::new();
    m.regs.rax = 0x1234_5678_9abc_de00;
    m.vmcs.write(ro::EXIT_QUALIFICATION, 0x80 << 16 | 1 << 3);
    m.exit(crate::exit_reason::IO_INSTRUCTION);
    assert_eq!(m.regs.rax, 0x1234_5678_9abc_deff);
    m.vmcs
        .write(ro::EXIT_QUALIFICATION, 0x80 << 16 | 1 << 3 | 3);
    m.exit(crate::exit_reason::IO_INSTRUCTION);
    assert_eq!(m.regs.rax, 0xffff_ffff, "32-bit IN clears the upper half");
}

#[test]
fn exit_counts_hypercall_checks_its_buffer() {
    let mut m = Machine::new();
    m.guest.counters[10] = 7;
    m.regs = GuestRegisters {
        rax: crate::abi::call::EXIT_COUNTS,
        rdi: 0x30_0000,
        rsi: 16,
        ..Default::default()
    };
    m.exit(crate::exit_reason::VMCALL);
    assert_eq!(m.regs.rax, 16);
    let mut counter = [0u8; 8];
    m.guest
        .read(&m.platform, 0x30_0000 + 10 * 8, &mut counter)
        .unwrap();
    assert_eq!(u64::from_le_bytes(counter), 7);
    // The legacy hole, beyond RAM, and straddling the end of RAM all fail.
    for bad in [0xa_0000, 0x1_0000_0000, (8 << 20) - 8] {
        m.regs = GuestRegisters {
            rax: crate::abi::call::EXIT_COUNTS,
            rdi: bad,
            rsi: 16,
            ..Default::default()
        };
        m.exit(crate::exit_reason::VMCALL);
        assert_eq!(
            m.regs.rax as i64,
            crate::abi::error::EFAULT,
            "buffer {bad:#x}"
        );
    }
    m.regs = GuestRegisters {
        rax: 0xdead,
        ..Default::default()
    };
    m.exit(crate::exit_reason::VMCALL);
    assert_eq!(m.regs.rax as i64, crate::abi::error::ENOSYS);
}

#[test]
fn user_mode_may_not_make_hypercalls() {
    let mut m = Machine::new();
    m.vmcs.write(g::SS_ACCESS_RIGHTS, 0x93 | 3 << 5);
    m.regs.rax = crate::abi::call::VERSION;
    m.exit(crate::exit_reason::VMCALL);
    assert_eq!(m.regs.rax as i64, crate::abi::error::EPERM);
}

#[test]
fn a_stray_access_is_reported_with_gp_and_a_hopeless_one_stops_the_guest() {
    let mut m = Machine::new();
    m.vmcs.write(ro::GUEST_PHYSICAL_ADDR_FULL, 0x1_2345_6000);
    m.vmcs.write(ro::EXIT_QUALIFICATION, 0b10);
    assert!(stopped(m.exit(crate::exit_reason::EPT_VIOLATION)).is_none());
    assert_eq!(m.injected(), 0x8000_0b0d, "#GP(0)");
    assert_eq!(m.vmcs.read(g::RIP), 0x1000, "the access is not skipped");
    assert_eq!(m.guest.stray_accesses, 1);
    m.vmcs.write(ro::IDT_VECTORING_INFO, 1 << 31 | 14);
    let end = stopped(m.exit(crate::exit_reason::EPT_VIOLATION));
    assert!(matches!(
        end,
        Some(GuestEnd::Stopped(StopReason::Unsupported(_)))
    ));
}

#[test]
fn a_write_to_a_log_dirty_page_marks_it_and_makes_it_writable() {
    let mut m = Machine::new();
    let gfn = Gfn(0x300);
    m.guest
        .p2m
        .change_type_range(
            &mut m.platform,
            gfn,
            gfn,
            P2mType::RamRw,
            P2mType::RamLogdirty,
        )
        .unwrap();
    assert_eq!(
        m.guest.p2m.get_entry(&m.platform, gfn).unwrap().ty,
        P2mType::RamLogdirty
    );
    // As the CPU does: the marked entry first gives a misconfiguration; once
    // resolved, the write to the (now read-only) log-dirty page a violation.
    m.vmcs
        .write(ro::GUEST_PHYSICAL_ADDR_FULL, gfn.0 << 12 | 0x10);
    assert!(stopped(m.exit(crate::exit_reason::EPT_MISCONFIG)).is_none());
    m.vmcs.write(ro::EXIT_QUALIFICATION, 0b10 | 0b101 << 3);
    assert!(stopped(m.exit(crate::exit_reason::EPT_VIOLATION)).is_none());
    assert!(m.guest.dirty.is_dirty(gfn));
    assert_eq!(
        m.guest.p2m.get_entry(&m.platform, gfn).unwrap().ty,
        P2mType::RamRw
    );
    assert_eq!(m.injected(), 0, "nothing injected");
}

#[test]
fn apic_base_writes_are_emulated() {
    let mut m = Machine::new();
    m.regs = GuestRegisters {
        rcx: 0x1b,
        rax: 0xfee0_0000,
        ..Default::default()
    };
    m.exit(crate::exit_reason::WRMSR);
    m.regs.rcx = 0x1b;
    m.exit(crate::exit_reason::RDMSR);
    assert_eq!(m.regs.edx_eax(), 0xfee0_0100, "disabled, BSP kept");
    m.regs = GuestRegisters {
        rcx: 0x1b,
        rax: 0xfee0_0c00,
        ..Default::default()
    };
    m.exit(crate::exit_reason::WRMSR);
    assert_eq!(m.injected(), 0x8000_0b0d, "x2APIC refused");
    m.vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
    m.regs = GuestRegisters {
        rcx: 0x8d4,
        ..Default::default()
    };
    m.exit(crate::exit_reason::RDMSR);
    assert_eq!(m.injected(), 0x8000_0b0d, "unknown MSR");
}

#[test]
fn cr4_vmxe_is_refused_and_cr0_writes_keep_ne() {
    let mut m = Machine::new();
    crate::cr::write_cr0(&mut m.vmcs, &BOCHS, crate::cr::CR0_PE);
    crate::cr::write_cr4(&mut m.vmcs, &BOCHS, 0);
    m.regs.rbx = crate::cr::CR4_VMXE;
    m.vmcs.write(ro::EXIT_QUALIFICATION, 4 | 3 << 8);
    m.exit(crate::exit_reason::CR_ACCESS);
    assert_eq!(m.injected(), 0x8000_0b0d);
    m.vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
    m.regs.rbx = crate::cr::CR0_PE | 0x20 | crate::cr::CR0_ET;
    m.vmcs.write(ro::EXIT_QUALIFICATION, 3 << 8);
    m.exit(crate::exit_reason::CR_ACCESS);
    assert_eq!(m.injected(), 0);
    assert_eq!(
        crate::cr::guest_cr0(&m.vmcs),
        crate::cr::CR0_PE | 0x20 | crate::cr::CR0_ET
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
    m.exit(crate::exit_reason::INIT_SIGNAL);
    assert_eq!(m.vmcs.read(g::ACTIVITY_STATE), crate::state::WAIT_FOR_SIPI);
    m.vmcs.write(ro::EXIT_QUALIFICATION, 0x9a);
    m.exit(crate::exit_reason::SIPI);
    assert_eq!(m.vmcs.read(g::ACTIVITY_STATE), crate::state::ACTIVE);
    assert_eq!(m.vmcs.read(g::CS_SELECTOR), 0x9a00);
    assert_eq!(m.vmcs.read(g::CS_BASE), 0x9_a000);
    assert_eq!(m.vmcs.read(g::RIP), 0);
    assert_eq!(crate::cr::guest_cr0(&m.vmcs) & crate::cr::CR0_PE, 0);
}

#[test]
fn an_unhandled_exit_stops_the_guest_with_its_name() {
    let mut m = Machine::new();
    let end = stopped(m.exit(crate::exit_reason::INVD));
    let Some(GuestEnd::Stopped(reason)) = end else {
        panic!("{end:?}")
    };
    assert!(std::format!("{reason}").contains("unhandled VM exit INVD (reason 13)"));
}

#[test]
fn vmx_instructions_and_mwait_get_ud() {
    let mut m = Machine::new();
    for reason in [27, crate::exit_reason::MWAIT] {
        m.vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
        assert!(stopped(m.exit(reason)).is_none());
        assert_eq!(m.injected(), 0x8000_0306);
    }
}

#[test]
fn xsetbv_checks_the_value() {
    let mut m = Machine::new();
    m.regs = GuestRegisters {
        rax: 0b111,
        ..Default::default()
    };
    m.exit(crate::exit_reason::XSETBV);
    assert_eq!(m.platform.xcr0, Some(0b111));
    m.regs = GuestRegisters {
        rax: 0b101,
        ..Default::default()
    };
    m.exit(crate::exit_reason::XSETBV);
    assert_eq!(m.injected(), 0x8000_0b0d);
}
