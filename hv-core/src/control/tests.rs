//! The server driven as a tool would drive it: frames into the simulated
//! control line, the exit handlers raising events, the vCPU's side
//! (`stop`, `resume`) played as its hold loop plays it.

extern crate std;

use core::cell::RefCell;
use std::vec::Vec;

use hv_control::{
    ALL_VCPUS, Answer, Command, Decoded, Decoder, ErrorCode, EventKind, Message, Reply, ReplyBody,
    class, id,
};
use hv_ept::Gfn;
use x86::vmx::vmcs::{control as fields, guest as g, ro};

use super::*;
use crate::abi::{access, call};
use crate::exits::tests::{Machine, stopped, two_vcpus};
use crate::vmx::exit::ExitReason;
use crate::vmx::vmcs::Vmcs;

/// What came back on the line, decoded.
#[derive(Debug)]
enum Out {
    Reply {
        id: u16,
        seq: u32,
        result: Result<Vec<u8>, ErrorCode>,
    },
    Event {
        seq: u32,
        event: hv_control::Event,
    },
}

impl SharedVm for RefCell<&mut Vm> {
    fn lock_vm(&self) -> impl core::ops::DerefMut<Target = Vm> + '_ {
        std::cell::RefMut::map(self.borrow_mut(), |vm| &mut **vm)
    }
}

/// A tool at the other end of the simulated line.
struct Tool {
    m: Machine,
    seq: u32,
    decoder: Decoder,
}

impl Tool {
    fn new(m: Machine) -> Self {
        Self {
            m,
            seq: 0,
            decoder: Decoder::new(),
        }
    }

    /// A machine with a control line and the vCPU's clock running.
    fn machine() -> Machine {
        let mut m = Machine::new();
        line_on(&mut m);
        m
    }

    fn send_bytes(&mut self, bytes: &[u8]) {
        self.m.platform.control_in.extend(bytes);
    }

    fn send(&mut self, command: Command<'_>) -> u32 {
        self.seq += 1;
        let mut buf = [0u8; hv_control::MAX_FRAME];
        let n = Message::Command {
            seq: self.seq,
            command,
        }
        .encode(&mut buf)
        .unwrap();
        self.send_bytes(&buf[..n]);
        self.seq
    }

    fn answer(&mut self, event: &Out, answer: Answer) {
        let Out::Event { seq, event } = event else {
            panic!("not an event: {event:?}");
        };
        let mut buf = [0u8; 64];
        let n = Message::Answer {
            id: event.id(),
            seq: *seq,
            answer,
        }
        .encode(&mut buf)
        .unwrap();
        self.send_bytes(&buf[..n]);
    }

    /// One round of the server on this vCPU's CPU.
    fn serve(&mut self) {
        let Machine {
            platform, vm, vmcs, ..
        } = &mut self.m;
        let shared = RefCell::new(vm);
        serve(&shared, vmcs, platform, 0);
    }

    /// Everything the hypervisor sent since the last call.
    fn received(&mut self) -> Vec<Out> {
        let bytes: Vec<u8> = self.m.platform.control_out.drain(..).collect();
        let mut out = Vec::new();
        for b in bytes {
            if let Some(Decoded::Frame(frame)) = self.decoder.push(b) {
                match Message::decode(&frame).unwrap() {
                    Message::Reply { id, seq, reply } => out.push(Out::Reply {
                        id,
                        seq,
                        result: reply_bytes(frame.payload, reply),
                    }),
                    Message::Event { seq, event } => out.push(Out::Event { seq, event }),
                    other => panic!("the hypervisor sent {other:?}"),
                }
            }
        }
        out
    }

    /// Sends a command, serves, and returns its reply's result (the body's
    /// bytes after the status, or the error).
    fn call(&mut self, command: Command<'_>) -> Result<Vec<u8>, ErrorCode> {
        let seq = self.send(command);
        self.serve();
        let replies: Vec<Out> = self.received();
        match replies.as_slice() {
            [Out::Reply { id, seq: s, result }] if *s == seq && *id == command.id() => {
                result.clone()
            }
            other => panic!("expected one reply to {seq}, got {other:?}"),
        }
    }

    /// A tool in session with altp2m on and one view made (rwx).
    fn with_view() -> (Self, u16) {
        let mut t = Self::new(Self::machine());
        t.hello();
        t.call(Command::Altp2mSetState { on: true }).unwrap();
        let view = t
            .call(Command::CreateView {
                default_access: access::RWX as u8,
            })
            .unwrap();
        (t, u16_at(&view, 0))
    }

    fn hello(&mut self) {
        let body = self
            .call(Command::Hello {
                version: 1,
                liveness_ms: 0,
            })
            .unwrap();
        assert_eq!(body[..2], 1u16.to_le_bytes());
    }

    /// The vCPU's hold loop, once: stop, serve, resume. Returns whether it
    /// runs on.
    fn hold_round(&mut self) -> bool {
        let Machine { vm, vcpu, vmcs, .. } = &mut self.m;
        if !vm.control.vcpus[0].stopped {
            stop(vm, vmcs, vcpu);
        }
        self.serve();
        let Machine {
            platform,
            vm,
            vcpu,
            vmcs,
        } = &mut self.m;
        resume(vm, vmcs, platform, vcpu)
    }
}

fn reply_bytes(payload: &[u8], reply: Reply<'_>) -> Result<Vec<u8>, ErrorCode> {
    reply.map(|_| payload[4..].to_vec())
}

fn line_on(m: &mut Machine) {
    m.platform.control_line = true;
    m.vmcs.tsc_step = 1;
    // The VM was made before the line: give it one, as Vm::create would.
    m.vm.control = Control::new(&m.platform, m.vm.vcpus(), 8 << 20).unwrap();
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap())
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

#[test]
fn commands_before_hello_get_no_session_and_hello_checks_the_version() {
    let mut t = Tool::new(Tool::machine());
    assert_eq!(
        t.call(Command::Ping { nonce: 7 }),
        Err(ErrorCode::NoSession)
    );
    assert_eq!(
        t.call(Command::Hello {
            version: 2,
            liveness_ms: 0
        }),
        Err(ErrorCode::BadVersion)
    );
    t.hello();
    assert_eq!(
        t.call(Command::Ping { nonce: 7 }),
        Ok(7u64.to_le_bytes().to_vec())
    );
    assert_eq!(t.m.vm.control.stats.commands, 4);
}

#[test]
fn garbage_corruption_and_cut_frames_get_errors_and_the_next_frame_is_found() {
    let mut t = Tool::new(Tool::machine());
    t.hello();
    // Garbage before a frame is skipped.
    t.send_bytes(b"\x00\xffnoise HVC");
    assert!(t.call(Command::Ping { nonce: 1 }).is_ok());
    // A payload whose CRC fails: BAD_FRAME with the frame's id and seq.
    let mut buf = [0u8; 64];
    let n = Message::Command {
        seq: 99,
        command: Command::Ping { nonce: 5 },
    }
    .encode(&mut buf)
    .unwrap();
    buf[n - 1] ^= 0x40;
    t.send_bytes(&buf[..n]);
    t.serve();
    match t.received().as_slice() {
        [Out::Reply { id, seq, result }] => {
            assert_eq!(
                (*id, *seq, result.clone()),
                (id::PING, 99, Err(ErrorCode::BadFrame))
            );
        }
        other => panic!("{other:?}"),
    }
    // A frame cut short: its header promises a payload that never comes.
    // The line goes idle, the server says so, and the next frame is found.
    let n = Message::Command {
        seq: 100,
        command: Command::Ping { nonce: 6 },
    }
    .encode(&mut buf)
    .unwrap();
    t.send_bytes(&buf[..n - 3]);
    t.m.vmcs.tsc_step = 10;
    t.serve();
    match t.received().as_slice() {
        [Out::Reply { seq, result, .. }] => {
            assert_eq!((*seq, result.clone()), (100, Err(ErrorCode::BadFrame)));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        t.call(Command::Ping { nonce: 8 }),
        Ok(8u64.to_le_bytes().to_vec())
    );
    // An answer to an event that does not exist.
    let n = Message::Answer {
        id: id::EVENT_BREAKPOINT,
        seq: 1234,
        answer: Answer::CONTINUE,
    }
    .encode(&mut buf)
    .unwrap();
    t.send_bytes(&buf[..n]);
    t.serve();
    match t.received().as_slice() {
        [Out::Reply { result, .. }] => assert_eq!(*result, Err(ErrorCode::NoSuchEvent)),
        other => panic!("{other:?}"),
    }
    assert!(t.m.vm.control.stats.bad_frames >= 2);
}

#[test]
fn capabilities_follow_the_masked_cpu_and_the_notify_commands_refuse_without_ve() {
    use crate::vmx::caps::Masked;
    use hv_control::feature;
    // The guest's bits (CPUID) are the protocol's.
    assert_eq!(
        [
            crate::abi::feature::VMFUNC,
            crate::abi::feature::VE,
            crate::abi::feature::MTF,
            crate::abi::feature::PML
        ],
        [feature::VMFUNC, feature::VE, feature::MTF, feature::PML]
    );
    let cases = [
        (Masked::PML, feature::VMFUNC | feature::VE),
        (Masked::VMFUNC, feature::VE | feature::PML),
        (Masked::VE | Masked::PML, feature::VMFUNC),
        (Masked::VMFUNC | Masked::VE | Masked::PML, 0),
    ];
    for (mask, want) in cases {
        let mut m = Machine::on(&crate::exits::tests::caps().mask(mask), |_| {});
        line_on(&mut m);
        let mut t = Tool::new(m);
        t.hello();
        let caps = t.call(Command::Capabilities).unwrap();
        let features = u32::from_le_bytes(caps[0..4].try_into().unwrap());
        assert_eq!(features, want | feature::SHADOW_PAGES, "{mask:?}");
        let events = u32::from_le_bytes(caps[4..8].try_into().unwrap());
        assert_eq!(events & class::VE != 0, want & feature::VE != 0, "{mask:?}");
        if want & feature::VE == 0 {
            let enable = Command::VcpuEnableNotify {
                vcpu: 0,
                gfn: 0x300,
            };
            assert_eq!(t.call(enable), Err(ErrorCode::NotSupported));
            let disable = Command::VcpuDisableNotify { vcpu: 0 };
            assert_eq!(t.call(disable), Err(ErrorCode::NotSupported));
        }
    }
}

#[test]
fn capabilities_and_memory_map_describe_the_vm() {
    let mut t = Tool::new(Tool::machine());
    t.hello();
    let caps = t.call(Command::Capabilities).unwrap();
    let features = u32::from_le_bytes(caps[0..4].try_into().unwrap());
    assert_eq!(
        features,
        hv_control::feature::VMFUNC
            | hv_control::feature::VE
            | hv_control::feature::PML
            | hv_control::feature::SHADOW_PAGES,
        "Bochs's skylake_x: VMFUNC, #VE and PML, no MTF"
    );
    assert_eq!(u16_at(&caps, 8), 1, "one vCPU");
    let map = t.call(Command::MemoryMap).unwrap();
    let count = usize::from(u16_at(&map, 0));
    let total: u64 = (0..count).map(|i| u64_at(&map, 2 + i * 16 + 8)).sum();
    assert_eq!(total, u64_at(&caps, 17), "ram_bytes is the map's sum");
    assert!(total > 7 << 20 && total <= 8 << 20);
}

#[test]
fn memory_reads_and_writes_go_through_the_host_p2m_and_are_checked() {
    let mut t = Tool::new(Tool::machine());
    t.hello();
    t.call(Command::WriteMemory {
        gpa: 0x30_0ff0,
        data: b"introspected",
    })
    .unwrap();
    let mut guest = [0u8; 12];
    t.m.vm.read(&t.m.platform, 0x30_0ff0, &mut guest).unwrap();
    assert_eq!(&guest, b"introspected");
    assert_eq!(
        t.call(Command::ReadMemory {
            gpa: 0x30_0ff0,
            len: 12
        }),
        Ok(b"introspected".to_vec())
    );
    assert_eq!(
        t.call(Command::ReadMemory {
            gpa: 0xfee0_0000,
            len: 4
        }),
        Err(ErrorCode::Fault),
        "the local APIC is not guest RAM"
    );
    assert_eq!(
        t.call(Command::WriteMemory {
            gpa: 1 << 45,
            data: b"x"
        }),
        Err(ErrorCode::Fault)
    );
}

#[test]
fn views_made_by_the_tool_are_the_guests_views_and_errors_match_the_hypercalls() {
    let (mut t, view) = Tool::with_view();
    t.call(Command::SetMemAccess {
        view,
        gfn: 0x300,
        access: access::RX as u8,
    })
    .unwrap();
    // The guest sees what the tool did (mixed mode: one state).
    assert_eq!(
        t.m.call(call::ALTP2M_GET_MEM_ACCESS, &[u64::from(view), 0x300]),
        access::RX as i64
    );
    assert_eq!(
        t.call(Command::GetMemAccess { view, gfn: 0x300 }),
        Ok(std::vec![access::RX as u8])
    );
    assert_eq!(
        t.call(Command::SwitchView { view: 77 }),
        Err(ErrorCode::Inval),
        "a view that does not exist"
    );
    assert_eq!(
        t.call(Command::SetMemAccess {
            view,
            gfn: 0x300,
            access: 42
        }),
        Err(ErrorCode::Inval)
    );
    assert_eq!(
        t.call(Command::GetVcpuView { vcpu: 3 }),
        Err(ErrorCode::Inval),
        "no such vCPU in altp2m's eyes"
    );
    t.call(Command::SwitchView { view }).unwrap();
    assert_eq!(t.m.vm.altp2m.vcpu_view(0), Ok(view));
    assert!(
        t.m.vm.coherence.take_reapply(0),
        "the vCPU writes its EPTP again before it enters"
    );
    assert_eq!(
        t.call(Command::DestroyView { view }),
        Err(ErrorCode::Busy),
        "the vCPU runs on it"
    );
}

#[test]
fn shadow_pages_are_accounted_remapped_and_unmapped_everywhere_when_freed() {
    let (mut t, view) = Tool::with_view();
    let before = t.m.platform.outstanding();
    let shadow = u64_at(&t.call(Command::AllocShadowPage).unwrap(), 0);
    assert!(shadow >= 1 << 18, "above 4 GiB and guest RAM: {shadow:#x}");
    let second = u64_at(&t.call(Command::AllocShadowPage).unwrap(), 0);
    assert_eq!(second, shadow + 1);
    t.call(Command::WriteMemory {
        gpa: shadow << 12,
        data: &[0xcc],
    })
    .unwrap();
    t.call(Command::ChangeGfn {
        view,
        old_gfn: 0x300,
        new_gfn: shadow,
    })
    .unwrap();
    assert_eq!(
        t.m.vm.altp2m.remap_source(view, Gfn(0x300)),
        Ok(Some(Gfn(shadow)))
    );
    t.call(Command::FreeShadowPage { gfn: shadow }).unwrap();
    assert_eq!(
        t.m.vm.altp2m.remap_source(view, Gfn(0x300)),
        Ok(None),
        "the remap went with its page"
    );
    assert_eq!(
        t.call(Command::FreeShadowPage { gfn: shadow }),
        Err(ErrorCode::NoEnt)
    );
    assert_eq!(
        t.call(Command::VcpuEnableNotify {
            vcpu: 0,
            gfn: second
        }),
        Err(ErrorCode::Inval),
        "a shadow page is never a #VE page"
    );
    t.call(Command::FreeShadowPage { gfn: second }).unwrap();
    // The host p2m keeps the tables it made for the shadow area; the
    // pages themselves come and go.
    let settled = t.m.platform.outstanding();
    assert!(settled < before + 8);
    // The freed gfn is taken again first.
    assert_eq!(
        u64_at(&t.call(Command::AllocShadowPage).unwrap(), 0),
        shadow
    );
    assert_eq!(t.m.platform.outstanding(), settled + 1);
    t.call(Command::FreeShadowPage { gfn: shadow }).unwrap();
    assert_eq!(t.m.platform.outstanding(), settled);
    t.call(Command::AllocShadowPage).unwrap();
    let platform = t.m.destroy();
    assert_eq!(
        platform.outstanding(),
        0,
        "teardown frees held shadow pages too"
    );
}

/// A view with gfn 0x300 read-only, the vCPU on it, a tool in session
/// with `classes` on.
fn monitored(classes: u32) -> (Tool, u16) {
    let (mut t, view) = Tool::with_view();
    t.call(Command::SetMemAccess {
        view,
        gfn: 0x300,
        access: access::RX as u8,
    })
    .unwrap();
    t.call(Command::SwitchView { view }).unwrap();
    t.call(Command::SetEvents { classes }).unwrap();
    t.m.vm.coherence.take_reapply(0);
    crate::views::apply(&mut t.m.vmcs, &t.m.vm, &t.m.vcpu);
    t.m.vmcs.write(g::RFLAGS, 0x2);
    (t, view)
}

#[test]
fn a_denied_access_holds_the_vcpu_until_the_tool_answers_and_the_stealth_flow_runs() {
    let (mut t, view) = monitored(class::MEM_ACCESS);
    assert!(stopped(t.m.touch(0x30_0008, true)).is_none());
    assert!(t.m.vcpu.step.is_none(), "no default step: the tool decides");
    assert!(
        t.m.platform.events.is_empty(),
        "no log line: the tool has it"
    );
    assert!(t.m.vm.control.must_stop(0));
    assert!(!t.hold_round(), "held");
    let event = match t.received().pop() {
        Some(e @ Out::Event { .. }) => e,
        other => panic!("{other:?}"),
    };
    let Out::Event { event: ev, .. } = &event else {
        unreachable!()
    };
    assert_eq!(ev.context.view, view);
    assert_eq!(ev.context.rip, 0x1000);
    assert_eq!(
        ev.kind,
        EventKind::MemAccess {
            gpa: 0x30_0008,
            gla: None,
            access: hv_control::access_bits::WRITE,
            entry: access::RX as u8,
        }
    );
    // Still held while unanswered; the event is not sent twice at once.
    assert!(!t.hold_round());
    assert!(t.received().is_empty());
    // Registers can be read while held.
    let regs = t.call(Command::GetRegisters { vcpu: 0 }).unwrap();
    assert_eq!(u64_at(&regs, 16 * 8), 0x1000, "RIP");
    // Switch to view 0 and single-step.
    t.answer(
        &event,
        Answer {
            switch_view: Some(0),
            single_step: true,
        },
    );
    assert!(t.hold_round(), "runs on for one instruction");
    assert!(matches!(
        t.received().as_slice(),
        [Out::Reply { result: Ok(_), .. }]
    ));
    assert_eq!(t.m.vm.altp2m.vcpu_view(0), Ok(0));
    assert!(t.m.vcpu.step.is_some_and(|s| s.for_tool));
    assert_eq!(t.m.vmcs.read(fields::EPTP_FULL), t.m.vm.p2m.eptp());
    // The step's #DB: a SINGLE_STEP event holds the vCPU again.
    t.m.vmcs
        .write(ro::VMEXIT_INTERRUPTION_INFO, 1 << 31 | 3 << 8 | 1);
    assert!(stopped(t.m.exit(ExitReason::ExceptionOrNmi)).is_none());
    assert!(t.m.vcpu.step.is_none());
    assert_eq!(
        t.m.vmcs.read(g::RFLAGS) & 1 << 8,
        0,
        "TF as the guest had it"
    );
    assert!(!t.hold_round());
    let step = match t.received().pop() {
        Some(e @ Out::Event { .. }) => e,
        other => panic!("{other:?}"),
    };
    let Out::Event { event: ev, .. } = &step else {
        unreachable!()
    };
    assert_eq!((ev.kind, ev.context.view), (EventKind::SingleStep, 0));
    // Back to the monitored view.
    t.answer(
        &step,
        Answer {
            switch_view: Some(view),
            single_step: false,
        },
    );
    assert!(t.hold_round());
    assert_eq!(t.m.vm.altp2m.vcpu_view(0), Ok(view));
    assert_eq!(
        t.m.vmcs.read(fields::EPTP_FULL),
        t.m.vm.altp2m.eptp(&t.m.vm.p2m, view).unwrap()
    );
    assert_eq!(t.m.vm.control.stats.answers, 2);
}

#[test]
fn a_session_that_ends_releases_held_vcpus_with_the_default_action() {
    let (mut t, _) = monitored(class::MEM_ACCESS);
    assert!(stopped(t.m.touch(0x30_0008, true)).is_none());
    assert!(!t.hold_round());
    t.received();
    t.call(Command::Bye).unwrap();
    assert_eq!(t.m.vm.control.classes(), 0, "every class off");
    assert!(t.hold_round(), "released");
    assert!(
        t.m.vcpu.step.is_some_and(|s| !s.for_tool),
        "the hypervisor's own step in view 0, as without a tool"
    );
    assert_eq!(t.m.vmcs.read(fields::EPTP_FULL), t.m.vm.p2m.eptp());
}

#[test]
fn a_silent_tool_loses_its_session_after_its_liveness_time() {
    let (mut t, _) = monitored(class::MEM_ACCESS);
    t.call(Command::Hello {
        version: 1,
        liveness_ms: 50,
    })
    .unwrap();
    t.call(Command::SetEvents {
        classes: class::MEM_ACCESS,
    })
    .unwrap();
    assert!(stopped(t.m.touch(0x30_0008, true)).is_none());
    assert!(!t.hold_round(), "held, the event sent");
    t.m.vmcs.tsc_step = 100;
    // The tool says nothing: the session ends, the vCPU goes on.
    assert!(!t.hold_round());
    assert!(t.hold_round());
    assert!(!t.m.vm.control.in_session());
    assert!(t.m.vcpu.step.is_some(), "the default action");
}

#[test]
fn an_unanswered_event_is_sent_again_with_its_sequence_number() {
    let (mut t, _) = monitored(class::MEM_ACCESS);
    assert!(stopped(t.m.touch(0x30_0008, true)).is_none());
    assert!(!t.hold_round());
    let first = t.received();
    t.m.vmcs.tsc_step = 1000;
    for _ in 0..3 {
        assert!(!t.hold_round());
    }
    let again = t.received();
    let seq = |o: &[Out]| match o {
        [Out::Event { seq, .. }, ..] => *seq,
        other => panic!("{other:?}"),
    };
    assert_eq!(seq(&first), seq(&again));
}

#[test]
fn pause_replies_once_the_vcpu_is_stopped_and_registers_round_trip() {
    let mut t = Tool::new(Tool::machine());
    t.hello();
    t.m.vmcs.write(g::RFLAGS, 0x202);
    assert_eq!(
        t.call(Command::GetRegisters { vcpu: 0 }),
        Err(ErrorCode::NotPaused)
    );
    let seq = t.send(Command::Pause { vcpu: ALL_VCPUS });
    t.serve();
    assert!(t.received().is_empty(), "no reply before the vCPU stops");
    t.m.vcpu.regs.rbx = 0x1234;
    assert!(!t.hold_round());
    match t.received().as_slice() {
        [Out::Reply { id, seq: s, result }] => {
            assert_eq!((*id, *s, result.clone()), (id::PAUSE, seq, Ok(Vec::new())));
        }
        other => panic!("{other:?}"),
    }
    let bytes = t.call(Command::GetRegisters { vcpu: 0 }).unwrap();
    let mut regs = hv_control::Registers::default();
    {
        let mut r = hv_control::wire::Reader::new(&bytes);
        for g in regs.gprs.iter_mut() {
            *g = r.u64().unwrap();
        }
    }
    assert_eq!(regs.gprs[hv_control::gpr::RBX], 0x1234);
    let mut full = registers::read(&t.m.vmcs, &t.m.vcpu.regs);
    full.gprs[hv_control::gpr::RBX] = 0x5678;
    full.rip = 0x2000;
    let mut bad = full;
    bad.cr4 |= 1 << 13;
    assert_eq!(
        t.call(Command::SetRegisters { vcpu: 0, regs: bad }),
        Err(ErrorCode::Inval),
        "CR4.VMXE"
    );
    let mut bad = full;
    bad.kernel_gs_base = 0x8000_0000_0000_0000;
    assert_eq!(
        t.call(Command::SetRegisters { vcpu: 0, regs: bad }),
        Err(ErrorCode::Inval),
        "a non-canonical KERNEL_GS_BASE would fault the hypervisor's WRMSR"
    );
    t.call(Command::SetRegisters {
        vcpu: 0,
        regs: full,
    })
    .unwrap();
    assert!(!t.hold_round(), "still paused");
    assert_eq!(t.m.vcpu.regs.rbx, 0x5678, "written back by the vCPU");
    assert_eq!(t.m.vmcs.read(g::RIP), 0x2000);
    t.call(Command::Resume { vcpu: 0 }).unwrap();
    assert!(t.hold_round());
    assert_eq!(
        t.call(Command::GetRegisters { vcpu: 0 }),
        Err(ErrorCode::NotPaused)
    );
    assert_eq!(t.call(Command::Pause { vcpu: 5 }), Err(ErrorCode::NoEnt));
}

#[test]
fn pausing_another_vcpu_kicks_it_out_of_the_guest() {
    let mut m = two_vcpus();
    line_on(&mut m);
    let mut t = Tool::new(m);
    t.hello();
    let coherence = t.m.vm.coherence;
    assert_eq!(coherence.enter(1), None);
    t.m.platform.kicks.clear();
    // The kick makes vCPU 1 exit; the command waits for that.
    t.m.platform.kicked_exit = Some((coherence, 0));
    t.send(Command::Pause { vcpu: 1 });
    t.serve();
    assert!(t.received().is_empty());
    assert_eq!(t.m.platform.kicks, [(1, crate::platform::Kick::Nmi)]);
    assert!(t.m.vm.control.must_stop(1));
    assert!(!t.m.vm.control.must_stop(0));
    // vCPU 1 stops (its own CPU publishes it); the reply goes out.
    t.m.vm.control.vcpus[1].stopped = true;
    t.serve();
    assert!(matches!(
        t.received().as_slice(),
        [Out::Reply { result: Ok(_), .. }]
    ));
}

#[test]
fn cr3_writes_are_reported_before_they_take_effect() {
    let mut t = Tool::new(Tool::machine());
    t.hello();
    t.call(Command::SetEvents {
        classes: class::CR3_WRITE,
    })
    .unwrap();
    crate::views::apply(&mut t.m.vmcs, &t.m.vm, &t.m.vcpu);
    assert_ne!(
        t.m.vmcs.read(fields::PRIMARY_PROCBASED_EXEC_CONTROLS) & 1 << 15,
        0,
        "CR3-load exiting on"
    );
    t.m.vmcs.write(g::CR3, 0x5000);
    t.m.vmcs.write(g::RIP, 0x1000);
    t.m.vmcs.write(ro::VMEXIT_INSTRUCTION_LEN, 3);
    t.m.vcpu.regs.rax = 0x7000;
    // MOV CR3, RAX.
    t.m.vmcs.write(ro::EXIT_QUALIFICATION, 3);
    assert!(stopped(t.m.exit(ExitReason::CrAccess)).is_none());
    assert_eq!(t.m.vmcs.read(g::CR3), 0x5000, "not yet");
    assert!(!t.hold_round());
    let event = t.received().pop().unwrap();
    let Out::Event { event: ev, .. } = &event else {
        panic!("{event:?}")
    };
    assert_eq!(
        ev.kind,
        EventKind::Cr3Write {
            old: 0x5000,
            new: 0x7000
        }
    );
    t.answer(&event, Answer::CONTINUE);
    assert!(t.hold_round());
    assert!(matches!(
        t.received().as_slice(),
        [Out::Reply { result: Ok(_), .. }]
    ));
    assert_eq!(t.m.vmcs.read(g::CR3), 0x7000);
    assert_eq!(t.m.vmcs.read(g::RIP), 0x1003);
    // Off again: CR3 loads run without exits.
    t.call(Command::SetEvents { classes: 0 }).unwrap();
    crate::views::apply(&mut t.m.vmcs, &t.m.vm, &t.m.vcpu);
    assert_eq!(
        t.m.vmcs.read(fields::PRIMARY_PROCBASED_EXEC_CONTROLS) & 1 << 15,
        0
    );
}

#[test]
fn ve_events_come_from_the_hypervisors_own_ve_delivery() {
    let (mut t, view) = monitored(class::VE | class::MEM_ACCESS);
    t.call(Command::SetSuppressVe {
        view,
        gfn: 0x300,
        suppress: false,
    })
    .unwrap();
    t.call(Command::VcpuEnableNotify {
        vcpu: 0,
        gfn: 0x200,
    })
    .unwrap();
    // The vCPU takes the new #VE page at its next entry.
    assert!(t.m.vm.coherence.take_reapply(0));
    take_notify(&mut t.m.vm, &mut t.m.vcpu);
    crate::views::apply(&mut t.m.vmcs, &t.m.vm, &t.m.vcpu);
    assert_eq!(
        t.m.vmcs.read(fields::SECONDARY_PROCBASED_EXEC_CONTROLS) & 1 << 18,
        0,
        "the CPU's #VE is off: every #VE goes through the hypervisor"
    );
    assert!(stopped(t.m.touch(0x30_0008, true)).is_none());
    assert_eq!(t.m.injected(), 1 << 31 | 3 << 8 | 20, "#VE injected");
    let mut info = [0u8; 34];
    t.m.vm.read(&t.m.platform, 0x20_0000, &mut info).unwrap();
    assert_eq!(info[0..4], 48u32.to_le_bytes());
    assert_eq!(info[4..8], u32::MAX.to_le_bytes(), "semaphore set");
    assert_eq!(u64_at(&info, 24), 0x30_0008);
    assert_eq!(u16_at(&info, 32), view);
    assert!(!t.hold_round());
    let event = t.received().pop().unwrap();
    assert!(matches!(
        event,
        Out::Event {
            event: hv_control::Event {
                kind: EventKind::Ve { gpa: 0x30_0008, .. },
                ..
            },
            ..
        }
    ));
    t.answer(&event, Answer::CONTINUE);
    assert!(t.hold_round());
    // The guest has not released the semaphore: the next violation is a
    // MEM_ACCESS event, as the CPU would exit.
    assert!(stopped(t.m.touch(0x30_0010, true)).is_none());
    assert!(!t.hold_round());
    assert!(matches!(
        t.received().pop(),
        Some(Out::Event {
            event: hv_control::Event {
                kind: EventKind::MemAccess { .. },
                ..
            },
            ..
        })
    ));
}

#[test]
fn a_hidden_breakpoint_holds_the_vcpu_and_its_default_is_the_step_in_view_0() {
    let (mut t, view) = Tool::with_view();
    let shadow = u64_at(&t.call(Command::AllocShadowPage).unwrap(), 0);
    t.call(Command::ChangeGfn {
        view,
        old_gfn: 0x300,
        new_gfn: shadow,
    })
    .unwrap();
    t.call(Command::SwitchView { view }).unwrap();
    t.call(Command::SetEvents {
        classes: class::BREAKPOINT,
    })
    .unwrap();
    // Paging off: RIP is the physical address.
    t.m.vmcs.write(g::CR0, 0x31);
    t.m.vmcs.write(fields::VMENTRY_CONTROLS, 0);
    t.m.vmcs.write(g::RIP, 0x30_0010);
    t.m.vmcs.write(ro::VMEXIT_INSTRUCTION_LEN, 1);
    t.m.vmcs
        .write(ro::VMEXIT_INTERRUPTION_INFO, 1 << 31 | 6 << 8 | 3);
    assert!(stopped(t.m.exit(ExitReason::ExceptionOrNmi)).is_none());
    assert_eq!(t.m.injected() & 1 << 31, 0, "not the guest's breakpoint");
    assert!(!t.hold_round());
    match t.received().pop() {
        Some(Out::Event { event, .. }) => {
            assert_eq!(
                event.kind,
                EventKind::Breakpoint {
                    gpa: 0x30_0010,
                    gla: 0x30_0010
                }
            );
            assert_eq!(event.context.view, view);
        }
        other => panic!("{other:?}"),
    }
    // The tool goes away without answering: the default action.
    t.call(Command::Hello {
        version: 1,
        liveness_ms: 0,
    })
    .unwrap();
    assert!(t.hold_round());
    assert!(t.m.vcpu.step.is_some_and(|s| !s.for_tool));
}

#[test]
fn translate_walks_the_stopped_vcpus_tables() {
    let mut t = Tool::new(Tool::machine());
    t.hello();
    // Paging off: identity within 4 GiB.
    t.m.vmcs.write(g::CR0, 0x31);
    t.send(Command::Pause { vcpu: 0 });
    t.serve();
    assert!(!t.hold_round());
    t.received();
    let tr = t
        .call(Command::Translate {
            vcpu: 0,
            cr3: 0,
            gva: 0x1234_5678,
        })
        .unwrap();
    assert_eq!(u64_at(&tr, 0), 0x1234_5678);
    assert_eq!(tr[9], hv_control::paging::NONE);
    // 32-bit paging with an empty directory: nothing is mapped.
    t.m.vmcs.write(g::CR0, 0x8000_0031);
    t.m.vm.control.vcpus[0].stopped = false;
    assert!(!t.hold_round());
    assert_eq!(
        t.call(Command::Translate {
            vcpu: 0,
            cr3: 0x10_0000,
            gva: 0x1000
        }),
        Err(ErrorCode::Fault)
    );
}

#[test]
fn the_tool_cannot_make_the_server_allocate_without_bound() {
    let mut t = Tool::new(Tool::machine());
    t.hello();
    let before = t.m.platform.outstanding();
    for _ in 0..MAX_SHADOW_PAGES {
        t.call(Command::AllocShadowPage).unwrap();
    }
    assert_eq!(t.call(Command::AllocShadowPage), Err(ErrorCode::NoMem));
    assert!(t.m.platform.outstanding() - before <= MAX_SHADOW_PAGES + 16);
    // A platform out of frames: a clean refusal.
    let mut t = Tool::new(Tool::machine());
    t.hello();
    t.m.platform.limit = Some(t.m.platform.outstanding());
    assert_eq!(t.call(Command::AllocShadowPage), Err(ErrorCode::NoMem));
}

#[test]
fn a_guest_altp2m_call_in_external_mode_is_refused_but_the_tool_may() {
    let mut m = Machine::with(|c| c.altp2m_mode = hv_abi::Altp2mMode::External);
    line_on(&mut m);
    let mut t = Tool::new(m);
    t.hello();
    assert_eq!(
        t.m.call(call::ALTP2M_SET_STATE, &[1]),
        crate::abi::error::EPERM
    );
    t.call(Command::Altp2mSetState { on: true }).unwrap();
    assert_eq!(t.call(Command::Altp2mGetState), Ok(std::vec![1]));
    let caps = t.call(Command::Capabilities).unwrap();
    assert_eq!(caps[12], hv_control::mode::EXTERNAL);
    let _ = ReplyBody::Done;
}

/// A frame with a checked header around any payload.
fn raw_frame(kind: u8, id: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = std::vec![0u8; hv_control::HEADER_LEN];
    hv_control::frame::write_header(&mut frame, kind, id, seq, payload);
    frame.extend_from_slice(payload);
    frame
}

#[test]
fn oversized_and_unknown_frames_get_their_errors() {
    let mut t = Tool::new(Tool::machine());
    t.hello();
    // A header promising more than MAX_PAYLOAD: refused from the header alone.
    let mut big = raw_frame(1, id::PING, 41, &[0; 8]);
    big[12..16].copy_from_slice(&(hv_control::MAX_PAYLOAD as u32 + 1).to_le_bytes());
    hv_control::frame::seal_header(&mut big[..hv_control::HEADER_LEN]);
    t.send_bytes(&big[..hv_control::HEADER_LEN]);
    t.serve();
    // An unknown command id, and a known one with a payload of the wrong size.
    t.send_bytes(&raw_frame(1, 0x7f, 42, &[]));
    t.send_bytes(&raw_frame(1, id::PING, 43, &[1, 2, 3]));
    t.serve();
    t.serve();
    let got: Vec<(u32, Result<Vec<u8>, ErrorCode>)> = t
        .received()
        .into_iter()
        .map(|o| match o {
            Out::Reply { seq, result, .. } => (seq, result),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        got,
        [
            (41, Err(ErrorCode::TooBig)),
            (42, Err(ErrorCode::UnknownMessage)),
            (43, Err(ErrorCode::BadFrame)),
        ]
    );
    assert!(
        t.call(Command::Ping { nonce: 1 }).is_ok(),
        "and the line goes on"
    );
}

mod fuzz {
    use proptest::prelude::*;

    use super::*;

    /// Any command id (and a few that are none), any payload, any kind.
    fn frames() -> impl Strategy<Value = Vec<(u8, u16, Vec<u8>)>> {
        let ids: Vec<u16> = Command::IDS
            .iter()
            .copied()
            .chain(hv_control::Event::IDS)
            .chain([0, 0x7f, 0xffff])
            .collect();
        proptest::collection::vec(
            (
                prop_oneof![Just(1u8), Just(1u8), Just(1u8), Just(4u8), 0u8..8],
                proptest::sample::select(ids),
                proptest::collection::vec(any::<u8>(), 0..48),
            ),
            1..40,
        )
    }

    proptest! {
        // 64 cases by default; PROPTEST_CASES for a long run.
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
        ))]

        /// Whatever frames come (well framed, with random payloads: random
        /// gfns, views, vCPUs, registers, accesses), the server answers
        /// each once, never panics, and leaks no frame: after the session
        /// and the VM end, the platform has every frame back.
        #[test]
        fn random_commands_are_answered_and_leak_nothing(frames in frames()) {
            let mut t = Tool::new(Tool::machine());
            t.hello();
            let mut sent = 0;
            for (i, (kind, id, payload)) in frames.iter().enumerate() {
                t.send_bytes(&raw_frame(*kind, *id, 1000 + i as u32, payload));
                sent += 1;
                // Play the vCPU: an event or a pause holds it; it serves.
                for _ in 0..3 {
                    if t.m.vm.control.must_stop(0) {
                        t.hold_round();
                    } else {
                        t.serve();
                    }
                }
            }
            let replies = t
                .received()
                .into_iter()
                .filter(|o| matches!(o, Out::Reply { seq, .. } if *seq >= 1000))
                .count();
            prop_assert!(replies <= sent);
            // PAUSE's reply waits for the vCPU; every other frame gets one.
            let paused = frames.iter().filter(|f| f.1 == id::PAUSE).count();
            prop_assert!(replies + paused >= sent, "{} replies for {} frames", replies, sent);
            let platform = t.m.destroy();
            prop_assert_eq!(platform.outstanding(), 0);
        }
    }
}
