//! The client against `FakeHypervisor`, a test double that speaks the
//! protocol over a real socket pair (see tests/fake/mod.rs): every command
//! reaches the other end as the right message and its reply comes back
//! typed; events are queued, answered and acknowledged in order; dumps are
//! consistent; a noisy, corrupting or silent line is handled.

mod fake;

use std::io::Cursor;
use std::time::Duration;

use fake::{FakeHypervisor, held};
use hv_control::*;
use hv_ctl::client::page_pieces;
use hv_ctl::dump::{self, Sinks, parse_lime};
use hv_ctl::{Client, Error};

fn connect() -> (FakeHypervisor, Client<std::os::unix::net::UnixStream>) {
    let (fake, end) = FakeHypervisor::start();
    let client = Client::connect_with(end, 0, Duration::from_secs(10)).expect("hello");
    (fake, client)
}

const SECOND: Duration = Duration::from_secs(1);

#[test]
fn hello_capabilities_memory_map_and_ping() {
    let (fake, mut c) = connect();
    assert_eq!(c.session.version, u16::from(VERSION));
    assert_eq!(c.session.max_payload as usize, MAX_PAYLOAD);
    let caps = c.capabilities().unwrap();
    assert_eq!(caps.vcpus, 2);
    assert_eq!(caps.ram_bytes, 0x9f000 + 0x30_0000);
    assert_ne!(caps.features & feature::SHADOW_PAGES, 0);
    let map = c.memory_map().unwrap();
    assert_eq!(map, fake.with(|s| s.ram.clone()));
    assert_eq!(c.ping(0xdead_beef).unwrap(), 0xdead_beef);
    c.bye().unwrap();
    assert!(!fake.with(|s| s.session));
}

#[test]
fn commands_before_hello_are_refused() {
    let (fake, mut end) = FakeHypervisor::start();
    let mut buf = [0u8; MAX_FRAME];
    let n = Message::Command {
        seq: 9,
        command: Command::Ping { nonce: 1 },
    }
    .encode(&mut buf)
    .unwrap();
    use hv_ctl::Transport;
    end.send(&buf[..n]).unwrap();
    let mut decoder = Decoder::new();
    let mut got = None;
    for _ in 0..200 {
        let mut b = [0u8; 256];
        let n = end.recv(&mut b, Duration::from_millis(20)).unwrap();
        for &x in &b[..n] {
            if let Some(Decoded::Frame(f)) = decoder.push(x) {
                got = Some(Message::decode(&f).map(|m| format!("{m:?}")).unwrap());
            }
        }
        if got.is_some() {
            break;
        }
    }
    assert_eq!(
        got.unwrap(),
        format!(
            "{:?}",
            Message::Reply {
                id: id::PING,
                seq: 9,
                reply: Err(ErrorCode::NoSession)
            }
        )
    );
    drop(fake);
}

#[test]
fn memory_reads_and_writes_are_cut_at_pages() {
    assert_eq!(
        page_pieces(0x1ffe, 4 + 4096).collect::<Vec<_>>(),
        vec![(0x1ffe, 2), (0x2000, 4096), (0x3000, 2)]
    );
    assert_eq!(page_pieces(0x5000, 0).count(), 0);
    let (fake, mut c) = connect();
    let gpa = 0x10_0ff0;
    let bytes = c.read_memory(gpa, 0x30).unwrap();
    let want: Vec<u8> = (gpa..gpa + 0x30)
        .map(FakeHypervisor::initial_byte)
        .collect();
    assert_eq!(bytes, want);
    let data: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
    c.write_memory(0x10_1800, &data).unwrap();
    assert_eq!(c.read_memory(0x10_1800, data.len()).unwrap(), data);
    // Outside RAM: the hypervisor's EFAULT, typed.
    assert!(matches!(
        c.read_memory(0xa0000, 16),
        Err(Error::Refused(ErrorCode::Fault))
    ));
    drop(fake);
}

#[test]
fn registers_are_read_modified_and_written_on_a_paused_vcpu() {
    let (fake, mut c) = connect();
    let mut regs = c.registers(1).unwrap();
    regs.rip = 0xffff_ffff_8100_0000;
    regs.gprs[gpr::RAX] = 42;
    regs.segments[seg::GS].base = 0xffff_8880_0000_0000;
    assert!(matches!(
        c.set_registers(1, regs),
        Err(Error::Refused(ErrorCode::NotPaused))
    ));
    c.pause(1).unwrap();
    c.set_registers(1, regs).unwrap();
    assert_eq!(c.registers(1).unwrap(), regs);
    assert_eq!(fake.with(|s| s.regs[1]), regs);
    assert!(matches!(
        c.registers(7),
        Err(Error::Refused(ErrorCode::NoEnt))
    ));
    let t = c.translate(0, 0, 0xffff_8000_0012_3456).unwrap();
    assert_eq!(t.gpa, 0x12_3456);
}

#[test]
fn every_altp2m_operation_reaches_the_hypervisor() {
    let (fake, mut c) = connect();
    assert!(!c.altp2m_state().unwrap());
    assert!(matches!(
        c.create_view(7),
        Err(Error::Refused(ErrorCode::Inval))
    ));
    c.set_altp2m_state(true).unwrap();
    let view = c.create_view(7).unwrap();
    assert_eq!(view, 1);
    c.set_mem_access(view, 0x100, 5).unwrap();
    assert_eq!(c.mem_access(view, 0x100).unwrap(), 5);
    let entries: Vec<AccessEntry> = (0x101..0x101 + 600)
        .map(|gfn| AccessEntry { gfn, access: 1 })
        .collect();
    // 600 entries: two commands (512 + 88), all applied.
    assert_eq!(c.set_mem_access_multi(view, &entries).unwrap(), 600);
    assert_eq!(c.mem_access(view, 0x101 + 599).unwrap(), 1);
    // `w` cannot be expressed in EPT: refused as by the hypercall.
    assert!(matches!(
        c.set_mem_access(view, 0x100, 2),
        Err(Error::Refused(ErrorCode::Inval))
    ));
    c.change_gfn(view, 0x100, 0x200).unwrap();
    assert_eq!(
        fake.with(|s| s.remaps.get(&(view, 0x100)).copied()),
        Some(0x200)
    );
    c.change_gfn(view, 0x100, hv_abi::INVALID_GFN).unwrap();
    assert!(fake.with(|s| s.remaps.is_empty()));
    c.set_suppress_ve(view, 0x100, false).unwrap();
    assert!(c.suppress_ve(view, 0x100).unwrap());
    assert_eq!(
        c.set_suppress_ve_multi(view, 0x100, 0x10f, true).unwrap(),
        16
    );
    c.set_visibility(view, false).unwrap();
    c.enable_notify(0, 0x150).unwrap();
    c.disable_notify(0).unwrap();
    c.switch_vcpu_view(1, view).unwrap();
    assert_eq!(c.vcpu_view(1).unwrap(), view);
    assert!(matches!(
        c.destroy_view(view),
        Err(Error::Refused(ErrorCode::Busy))
    ));
    c.switch_view(0).unwrap();
    c.destroy_view(view).unwrap();
    assert!(matches!(
        c.switch_view(view),
        Err(Error::Refused(ErrorCode::Inval))
    ));
    c.logdirty_start(0x100, 64).unwrap();
    let (dirty, bitmap) = c.logdirty_fetch(0x100, 20).unwrap();
    assert_eq!(
        (dirty, bitmap),
        (7, vec![0b0100_1001, 0b1001_0010, 0b0000_0100])
    );
    c.logdirty_stop(0x100, 64).unwrap();
    let gfn = c.alloc_shadow_page().unwrap();
    c.free_shadow_page(gfn).unwrap();
    assert_eq!(
        c.set_events(class::MEM_ACCESS | class::BREAKPOINT).unwrap(),
        3
    );
    assert!(matches!(
        c.set_events(1 << 9),
        Err(Error::Refused(ErrorCode::NotSupported))
    ));
}

fn breakpoint(vcpu: u16, view: u16) -> Event {
    Event {
        context: Context {
            vcpu,
            view,
            rip: 0xffff_ffff_8100_1000,
            cr3: 0x1234_5000,
        },
        kind: EventKind::Breakpoint {
            gpa: 0x10_1000,
            gla: 0xffff_ffff_8100_1000,
        },
    }
}

#[test]
fn the_stealth_breakpoint_flow_runs_from_the_tool() {
    // DRAKVUF's flow: INT3 in a shadow page of view V -> event -> switch to
    // the clean view 0 and single-step -> step event -> back to V.
    let (fake, mut c) = connect();
    c.set_altp2m_state(true).unwrap();
    let shadow_view = c.create_view(7).unwrap();
    let shadow = c.alloc_shadow_page().unwrap();
    c.change_gfn(shadow_view, 0x101, shadow).unwrap();
    c.set_events(class::BREAKPOINT).unwrap();
    c.switch_view(shadow_view).unwrap();

    fake.emit(breakpoint(0, shadow_view));
    let hit = c
        .next_event(5 * SECOND)
        .unwrap()
        .expect("the breakpoint event");
    assert_eq!(hit.event.context.view, shadow_view);
    assert!(matches!(hit.event.kind, EventKind::Breakpoint { .. }));
    assert_eq!(held(&fake), [hit.seq]);
    c.answer(
        &hit,
        Answer {
            switch_view: Some(0),
            single_step: true,
        },
    )
    .unwrap();
    let step = c
        .next_event(5 * SECOND)
        .unwrap()
        .expect("the single-step event");
    assert_eq!(step.event.kind, EventKind::SingleStep);
    assert_eq!(step.event.context.view, 0, "stepped in the clean view");
    c.answer(
        &step,
        Answer {
            switch_view: Some(shadow_view),
            single_step: false,
        },
    )
    .unwrap();
    assert_eq!(fake.with(|s| s.vcpu_view[0]), shadow_view);
    assert!(held(&fake).is_empty(), "the vCPU runs again");
    // An answer to an event that is not waiting.
    assert!(matches!(
        c.answer(&hit, Answer::CONTINUE),
        Err(Error::Refused(ErrorCode::NoSuchEvent))
    ));
}

#[test]
fn events_of_the_previous_session_are_not_the_new_ones() {
    // A vCPU held by a tool that vanished: its event, sent again while
    // unanswered, may be on the line when the next tool says HELLO.
    let (fake, end) = FakeHypervisor::start();
    fake.emit(breakpoint(0, 0));
    std::thread::sleep(Duration::from_millis(100));
    let mut c = Client::connect_with(end, 0, Duration::from_secs(10)).expect("hello");
    assert_eq!(c.pending_events(), 0);
    assert!(c.next_event(Duration::from_millis(50)).unwrap().is_none());
    // The new session's own events come through.
    fake.emit(breakpoint(0, 0));
    assert!(c.next_event(5 * SECOND).unwrap().is_some());
}

#[test]
fn events_that_arrive_during_a_call_keep_their_order() {
    let (fake, mut c) = connect();
    for vcpu in [0, 1, 0] {
        fake.emit(breakpoint(vcpu, 0));
    }
    // Let them reach the socket before the call, so they come first.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(c.ping(5).unwrap(), 5);
    assert_eq!(c.pending_events(), 3);
    let mut seqs = Vec::new();
    while let Some(e) = c.next_event(Duration::from_millis(50)).unwrap() {
        seqs.push((e.seq, e.event.context.vcpu));
        c.answer(&e, Answer::CONTINUE).unwrap();
    }
    assert_eq!(seqs, [(1000, 0), (1001, 1), (1002, 0)]);
    assert_eq!(fake.with(|s| s.answers.len()), 3);
    assert!(c.next_event(Duration::from_millis(50)).unwrap().is_none());
}

#[test]
fn a_dump_is_consistent_and_readable_as_raw_and_lime() {
    let (fake, mut c) = connect();
    c.write_memory(0x10_2000, b"Linux version 6.1.0-test")
        .unwrap();
    let only = Range {
        start: 0x9_0000,
        len: 0x7_3000,
    };
    let mut raw = Cursor::new(Vec::new());
    let mut lime = Vec::new();
    let mut calls = 0;
    let dumped = dump::dump(
        &mut c,
        Some(only),
        Sinks {
            raw: Some(&mut raw),
            lime: Some(&mut lime),
        },
        |_, _| calls += 1,
    )
    .unwrap();
    // Clipped to RAM: the end of low memory and the start of high memory.
    let want = vec![
        Range {
            start: 0x9_0000,
            len: 0xf000,
        },
        Range {
            start: 0x10_0000,
            len: 0x3000,
        },
    ];
    assert_eq!(dumped.ranges, want);
    assert_eq!(dumped.bytes, 0x12000);
    assert_eq!(calls, 0x12);
    // Every read happened with the guest paused, and it runs again.
    let (reads, paused_now) = fake.with(|s| (s.reads_while_paused.clone(), s.paused.clone()));
    assert_eq!(reads.len(), 0x12);
    assert!(reads.iter().all(|&p| p));
    assert_eq!(paused_now, [false, false]);
    // Raw: file offset = guest-physical address.
    let raw = raw.into_inner();
    assert_eq!(raw.len(), 0x10_3000);
    assert_eq!(&raw[0x10_2000..0x10_2000 + 24], b"Linux version 6.1.0-test");
    assert_eq!(raw[0x9_5555], FakeHypervisor::initial_byte(0x9_5555));
    assert!(raw[0x9f000..0x10_0000].iter().all(|&b| b == 0), "the hole");
    // LiME: one header per range, inclusive end, then the bytes.
    let parsed = parse_lime(&lime).unwrap();
    assert_eq!(parsed.iter().map(|(r, _)| *r).collect::<Vec<_>>(), want);
    assert_eq!(&lime[..4], &0x4c69_4d45u32.to_le_bytes());
    assert_eq!(&lime[16..24], &0x9_efffu64.to_le_bytes());
    for (range, at) in parsed {
        assert_eq!(
            &lime[at..at + range.len as usize],
            &raw[range.start as usize..(range.start + range.len) as usize]
        );
    }
    assert_eq!(
        fake.with(|s| s.frames_in) as usize,
        1 + 1 + 1 + 1 + 0x12 + 1
    );
}

#[test]
fn garbage_before_a_reply_is_skipped() {
    let (fake, mut c) = connect();
    fake.with(|s| s.noise_before_reply = b"HV\x00garbage HVCP\x01\x02 more".to_vec());
    assert_eq!(c.ping(77).unwrap(), 77);
    assert_eq!(c.ping(78).unwrap(), 78);
}

#[test]
fn a_corrupted_reply_fails_its_call_at_once() {
    let (fake, mut c) = connect();
    fake.with(|s| s.corrupt_next_reply = true);
    let started = std::time::Instant::now();
    match c.ping(1) {
        Err(Error::Protocol(why)) => assert!(why.contains("corrupted"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < 5 * SECOND, "not by timing out");
    assert_eq!(c.ping(2).unwrap(), 2, "the next call works");
}

#[test]
fn a_silent_hypervisor_times_out() {
    let (fake, end) = FakeHypervisor::start();
    let mut c = Client::connect_with(end, 0, Duration::from_millis(300)).unwrap();
    fake.with(|s| s.mute = true);
    assert!(matches!(c.ping(1), Err(Error::Timeout { .. })));
    drop(fake);
    // The other end gone: an I/O error, not a hang.
    assert!(matches!(c.ping(2), Err(Error::Io(_))));
}
