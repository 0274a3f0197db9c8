//! The control channel end to end: the hypervisor in Bochs, a tool (the
//! `hv-ctl` library) on the harness's pty at COM3. With the test guest:
//! every command with good and bad arguments, and a stealth breakpoint
//! (DRAKVUF's flow) on the guest's probe function that the guest never
//! notices. Figures for the notes are printed as `figure:` lines.

use std::time::{Duration, Instant};

use hv_ctl::protocol::{
    ALL_VCPUS, Answer, ErrorCode, EventKind, access_bits, class, feature, paging,
};
use hv_ctl::{Client, Error, Serial};
use hv_tests::{Boot, Engine, Running, exit, linux_assets};

const RWX: u8 = hv_abi::access::RWX as u8;
const X: u8 = hv_abi::access::X as u8;
const GO: u64 = 1;
const FINISH: u64 = 2;
/// The guest's mailbox words (tests/guest/src/control.rs).
const MAGIC: u64 = 0x4856_4354_4c21_0001;
const WORD_GO: u64 = 1;
const WORD_STATE: u64 = 4;
const WORD_BYTE: u64 = 3;
const STATE_DONE: u64 = 2;

fn refused<T: std::fmt::Debug>(result: Result<T, Error>, code: ErrorCode, what: &str) {
    match result {
        Err(Error::Refused(c)) if c == code => {}
        other => panic!("{what}: expected {code:?}, got {other:?}"),
    }
}

fn word(c: &mut Client<Serial>, mailbox: u64, i: u64) -> u64 {
    let bytes = c.read_memory(mailbox + i * 8, 8).expect("read the mailbox");
    u64::from_le_bytes(bytes.try_into().unwrap())
}

/// `key=0x...` in the guest's line.
fn field(line: &str, key: &str) -> u64 {
    let value = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"));
    match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).unwrap(),
        None => value.parse().unwrap(),
    }
}

/// Waits for the guest's mailbox line and magic; returns the mailbox's
/// and the probe's addresses and the number of calls the guest makes.
fn guest_ready(running: &mut Running, c: &mut Client<Serial>) -> (u64, u64, u64) {
    let line = running
        .wait_for_line("control: mailbox=", Duration::from_secs(600))
        .expect("the guest's mailbox line");
    let (mailbox, code, calls) = (
        field(&line, "mailbox="),
        field(&line, "code="),
        field(&line, "calls="),
    );
    let waited = Instant::now();
    while word(c, mailbox, 0) != MAGIC {
        assert!(waited.elapsed() < Duration::from_secs(300), "no magic");
        std::thread::sleep(Duration::from_millis(500));
    }
    (mailbox, code, calls)
}

/// Hides an INT3 on the probe's first byte in a new view (a shadow copy of
/// its page, execute-only), turns breakpoint and access events on and puts
/// the guest on that view. Returns the view and the shadow page's gfn.
fn arm_stealth_breakpoint(c: &mut Client<Serial>, code: u64) -> (u16, u64) {
    assert_eq!(
        c.read_memory(code, 1).unwrap(),
        [0x48],
        "the probe starts with REX.W"
    );
    arm_breakpoint_at(c, code)
}

/// [`arm_stealth_breakpoint`] at guest-physical `code`.
fn arm_breakpoint_at(c: &mut Client<Serial>, code: u64) -> (u16, u64) {
    c.set_altp2m_state(true).unwrap();
    let view = c.create_view(RWX).unwrap();
    let shadow = c.alloc_shadow_page().unwrap();
    let code_gfn = code >> 12;
    let mut page = c.read_memory(code_gfn << 12, 4096).unwrap();
    page[(code & 0xfff) as usize] = 0xcc;
    c.write_memory(shadow << 12, &page).unwrap();
    c.change_gfn(view, code_gfn, shadow).unwrap();
    c.set_mem_access(view, code_gfn, X).unwrap();
    assert_eq!(c.mem_access(view, code_gfn).unwrap(), X);
    c.set_events(class::BREAKPOINT | class::MEM_ACCESS).unwrap();
    c.switch_view(view).unwrap();
    (view, shadow)
}

/// What [`serve_stealth_breakpoint`] saw.
struct Seen {
    hits: u64,
    reads: u64,
    steps: u64,
    took: Duration,
}

/// DRAKVUF's answers until the guest's mailbox says its calls are done: a
/// hit or a read of the code page goes to the clean view 0 for one step,
/// the step's end back to the shadow view. Every event is checked: a hit at
/// `code` (guest-physical) and `gla` (its linear address), reads of the
/// code's page only, steps in view 0.
fn serve_stealth_breakpoint(
    c: &mut Client<Serial>,
    mailbox: u64,
    view: u16,
    code: u64,
    gla: u64,
) -> Seen {
    let mut seen = Seen {
        hits: 0,
        reads: 0,
        steps: 0,
        took: Duration::ZERO,
    };
    let started = Instant::now();
    let to_clean_view_and_step = Answer {
        switch_view: Some(0),
        single_step: true,
    };
    loop {
        let Some(e) = c.next_event(Duration::from_secs(5)).unwrap() else {
            if word(c, mailbox, WORD_STATE) == STATE_DONE {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(1200),
                "the guest never finished its calls ({} hits)",
                seen.hits
            );
            continue;
        };
        assert_eq!(e.event.context.vcpu, 0);
        match e.event.kind {
            EventKind::Breakpoint { gpa, gla: at } => {
                assert_eq!((gpa, at), (code, gla));
                assert_eq!(e.event.context.view, view);
                assert_eq!(e.event.context.rip, gla);
                seen.hits += 1;
                c.answer(&e, to_clean_view_and_step).unwrap();
            }
            EventKind::MemAccess { gpa, access, .. } => {
                assert_eq!(gpa >> 12, code >> 12, "only the code's page is watched");
                assert_eq!(access, access_bits::READ, "the guest reads its code");
                seen.reads += 1;
                c.answer(&e, to_clean_view_and_step).unwrap();
            }
            EventKind::SingleStep => {
                assert_eq!(e.event.context.view, 0, "the step ran in the clean view");
                seen.steps += 1;
                c.answer(
                    &e,
                    Answer {
                        switch_view: Some(view),
                        single_step: false,
                    },
                )
                .unwrap();
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    seen.took = started.elapsed();
    assert!(
        seen.reads >= 1,
        "the guest's read of its code came as an event"
    );
    assert_eq!(seen.steps, seen.hits + seen.reads);
    seen
}

/// Undoes [`arm_breakpoint_at`]: the guest back on view 0, events off, the
/// remap reverted, the shadow page freed, the view gone, altp2m off.
fn remove_stealth_breakpoint(c: &mut Client<Serial>, view: u16, code_gfn: u64, shadow: u64) {
    c.switch_view(0).unwrap();
    c.set_events(0).unwrap();
    c.change_gfn(view, code_gfn, hv_abi::INVALID_GFN).unwrap();
    c.free_shadow_page(shadow).unwrap();
    c.destroy_view(view).unwrap();
    c.set_altp2m_state(false).unwrap();
}

fn start() -> (Running, Client<Serial>) {
    let mut boot = Boot::new(Engine::Bochs).guest("control").control(true);
    // Every command crosses Bochs's paced serial line: minutes under load.
    boot.timeout = Duration::from_secs(900);
    let mut running = boot.start();
    let client = running.connect_tool(Duration::from_secs(300));
    (running, client)
}

#[test]
fn a_tool_drives_every_command_and_a_stealth_breakpoint_the_guest_never_sees() {
    let (mut running, mut c) = start();
    let caps = c.capabilities().unwrap();
    assert_eq!(caps.vcpus, 1);
    assert_eq!(
        caps.features & (feature::VMFUNC | feature::VE | feature::SHADOW_PAGES),
        feature::VMFUNC | feature::VE | feature::SHADOW_PAGES
    );
    assert_eq!(caps.features & feature::MTF, 0, "Bochs has no MTF");
    assert_eq!(caps.events, class::ALL);
    let map = c.memory_map().unwrap();
    assert_eq!(map.iter().map(|r| r.len).sum::<u64>(), caps.ram_bytes);
    // Bad arguments: clean refusals, the session goes on.
    refused(
        c.read_memory(0xfee0_0000, 16),
        ErrorCode::Fault,
        "the local APIC",
    );
    refused(
        c.registers(0),
        ErrorCode::NotPaused,
        "registers of a running vCPU",
    );
    refused(
        c.registers(7),
        ErrorCode::NoEnt,
        "a vCPU that does not exist",
    );
    refused(
        c.set_events(1 << 3),
        ErrorCode::NotSupported,
        "an unknown class",
    );
    refused(
        c.switch_view(300),
        ErrorCode::Inval,
        "a view that does not exist",
    );
    refused(
        c.free_shadow_page(0x1234),
        ErrorCode::NoEnt,
        "not a shadow page",
    );
    refused(
        c.set_mem_access(1, 0x100, 42),
        ErrorCode::Inval,
        "an access value",
    );
    refused(
        c.logdirty_fetch(0, 40_000),
        ErrorCode::Inval,
        "too many pages",
    );
    assert_eq!(c.ping(0x5eed).unwrap(), 0x5eed);
    let pinged = Instant::now();
    const PINGS: u32 = 20;
    for nonce in 0..u64::from(PINGS) {
        assert_eq!(c.ping(nonce).unwrap(), nonce);
    }
    println!(
        "figure: control PING round trip {:.0} ms (mean, a running guest: the tick's latency and the line's pacing; Bochs, 115200 baud)",
        pinged.elapsed().as_secs_f64() * 1000.0 / f64::from(PINGS)
    );

    let (mailbox, code, calls) = guest_ready(&mut running, &mut c);

    // Paused: registers, translation, a refused and an accepted write.
    c.pause(ALL_VCPUS).unwrap();
    let regs = c.registers(0).unwrap();
    assert!(
        regs.cr0 & 1 << 31 != 0 && regs.efer & 1 << 10 != 0,
        "64-bit paging"
    );
    let t = c.translate(0, 0, mailbox).unwrap();
    assert_eq!(
        (t.gpa, t.paging),
        (mailbox, paging::LEVEL4),
        "identity-mapped"
    );
    refused(
        c.translate(0, 0, 0x7fff_ffff_0000),
        ErrorCode::Fault,
        "an unmapped address",
    );
    let mut bad = regs;
    bad.cr4 |= 1 << 13;
    refused(c.set_registers(0, bad), ErrorCode::Inval, "CR4.VMXE");
    c.set_registers(0, regs).unwrap();
    assert_eq!(c.registers(0).unwrap(), regs);
    // Log-dirty over the mailbox: the tool's own write shows.
    let gfn = mailbox >> 12;
    c.logdirty_start(gfn, 1).unwrap();
    c.write_memory(mailbox + 7 * 8, &[0x5a]).unwrap();
    let (dirty, bitmap) = c.logdirty_fetch(gfn, 1).unwrap();
    assert_eq!((dirty, bitmap[0] & 1), (1, 1));
    c.logdirty_stop(gfn, 1).unwrap();
    c.resume(ALL_VCPUS).unwrap();
    // A session ends and another begins on the same line.
    let serial = c.bye().unwrap();
    let mut c = Client::connect(serial).unwrap();

    // The stealth breakpoint: the probe's page shown from a shadow copy
    // with INT3 in a view where it is execute-only.
    let (view, shadow) = arm_stealth_breakpoint(&mut c, code);
    let code_gfn = code >> 12;
    c.write_memory(mailbox + WORD_GO * 8, &GO.to_le_bytes())
        .unwrap();

    let seen = serve_stealth_breakpoint(&mut c, mailbox, view, code, code);
    assert_eq!(seen.hits, calls, "one hit per call");
    assert_eq!(
        word(&mut c, mailbox, WORD_BYTE),
        0x48,
        "the guest read the original byte"
    );
    let events = seen.hits + seen.reads + seen.steps;
    println!(
        "figure: control events: {events} in {:.1} s = {:.2} events/s (each answered; Bochs, COM3 at 115200 baud)",
        seen.took.as_secs_f64(),
        events as f64 / seen.took.as_secs_f64()
    );

    // Removed: the guest finishes on its own.
    remove_stealth_breakpoint(&mut c, view, code_gfn, shadow);
    // The guest ends its run as soon as it sees this: no BYE after it.
    c.write_memory(mailbox + WORD_GO * 8, &FINISH.to_le_bytes())
        .unwrap();
    let run = running.wait();
    run.expect_scenarios_passed(&["control"])
        .expect_torn_down_cleanly()
        .expect_line("control: session opened")
        .expect_line("control: session closed by the tool");
    let stats = run
        .line("control: served ")
        .unwrap_or_else(|| panic!("no control figures\n{}", run.report()));
    println!("figure: {stats}");
}

#[test]
fn a_tool_that_vanishes_while_its_event_waits_releases_the_vcpu_and_a_new_tool_connects() {
    let (mut running, mut c) = start();
    let (mailbox, code, _) = guest_ready(&mut running, &mut c);
    arm_stealth_breakpoint(&mut c, code);
    c.write_memory(mailbox + WORD_GO * 8, &GO.to_le_bytes())
        .unwrap();
    let e = c
        .next_event(Duration::from_secs(300))
        .unwrap()
        .expect("the first hit");
    assert!(matches!(e.event.kind, EventKind::Breakpoint { .. }));
    // The tool dies without answering: the guest's vCPU stays held.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        word(&mut c, mailbox, 2),
        0,
        "no call completes while the hit waits"
    );
    // Another tool connects: the old session ends, its held vCPU goes on
    // with the default action (the hypervisor's step in view 0), and with
    // no events wanted the remaining hits and the read are the
    // hypervisor's alone.
    let serial = c.into_transport();
    let mut c = Client::connect(serial).unwrap();
    assert_eq!(c.capabilities().unwrap().vcpus, 1);
    let waited = Instant::now();
    while word(&mut c, mailbox, WORD_STATE) != STATE_DONE {
        assert!(
            waited.elapsed() < Duration::from_secs(600),
            "the released guest never finished its calls"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    assert_eq!(word(&mut c, mailbox, WORD_BYTE), 0x48);
    assert!(
        c.next_event(Duration::from_secs(1)).unwrap().is_none(),
        "a new session starts with every event class off"
    );
    c.write_memory(mailbox + WORD_GO * 8, &FINISH.to_le_bytes())
        .unwrap();
    let run = running.wait();
    run.expect_scenarios_passed(&["control"])
        .expect_torn_down_cleanly()
        .expect_line("control: a new HELLO ended the previous session");
}

/// `name`'s address in a System.map.
fn system_map_address(map: &str, name: &str) -> Option<u64> {
    map.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        let address = u64::from_str_radix(words.next()?, 16).ok()?;
        (words.nth(1)? == name).then_some(address)
    })
}

#[test]
fn a_tool_hides_a_breakpoint_in_debians_kernel_and_linux_never_sees_it() {
    const CALLS: u64 = 6;
    const FUNCTION: &str = "__x64_sys_getppid";
    const GUEST_MIB: u32 = 256;
    let assets = linux_assets().unwrap_or_else(|why| panic!("{why}"));
    let map = std::fs::read_to_string(&assets.system_map).unwrap();
    let function = system_map_address(&map, FUNCTION).expect("the function in System.map");
    let mut boot = Boot::new(Engine::Bochs)
        .linux_ram(
            GUEST_MIB,
            &format!("hvtest.expect=hv hvtest.memtest=0 hvtest.probe={CALLS}"),
        )
        .control(true);
    boot.timeout = Duration::from_secs(1500);
    let mut running = boot.start();
    let mut c = running.connect_tool(Duration::from_secs(300));
    let Some(line) = running.wait_for_line("probe: mailbox=", Duration::from_secs(1200)) else {
        panic!("no probe line\n{}", running.stop().report())
    };
    let mailbox = field(&line, "mailbox=");
    assert_eq!(
        field(&line, "address="),
        function,
        "nokaslr: System.map's address is the running kernel's"
    );
    let waited = Instant::now();
    while word(&mut c, mailbox, 0) != 0x4856_4354_4c21_0002 {
        assert!(waited.elapsed() < Duration::from_secs(300), "no magic");
        std::thread::sleep(Duration::from_millis(500));
    }
    // The kernel's own page tables say where the function is.
    c.pause(ALL_VCPUS).unwrap();
    let t = c.translate(0, 0, function).unwrap();
    c.resume(ALL_VCPUS).unwrap();
    assert_eq!(t.paging, paging::LEVEL4);
    let original = c.read_memory(t.gpa, 8).unwrap();
    let (view, shadow) = arm_breakpoint_at(&mut c, t.gpa);
    let code_gfn = t.gpa >> 12;
    c.write_memory(mailbox + WORD_GO * 8, &GO.to_le_bytes())
        .unwrap();
    let seen = serve_stealth_breakpoint(&mut c, mailbox, view, t.gpa, function);
    assert!(seen.hits >= CALLS, "{} hits for {CALLS} calls", seen.hits);
    let bytes = word(&mut c, mailbox, WORD_BYTE).to_le_bytes();
    assert_eq!(
        bytes.as_slice(),
        original.as_slice(),
        "init read the original code"
    );
    println!(
        "figure: Linux stealth breakpoint: {} hits, {} reads of the page, {} steps in {:.1} s",
        seen.hits,
        seen.reads,
        seen.steps,
        seen.took.as_secs_f64()
    );
    remove_stealth_breakpoint(&mut c, view, code_gfn, shadow);
    // CR3 writes, opt-in: each one holds the vCPU before it takes effect.
    c.set_events(class::CR3_WRITE).unwrap();
    for _ in 0..4 {
        let e = c
            .next_event(Duration::from_secs(120))
            .unwrap()
            .expect("Linux writes CR3 (task switches, page-table isolation)");
        let EventKind::Cr3Write { old, new } = e.event.kind else {
            panic!("unexpected event {:?}", e.event.kind)
        };
        assert_eq!(old, e.event.context.cr3, "reported before it takes effect");
        assert!(new != 0, "a CR3 write of 0");
        c.answer(&e, Answer::CONTINUE).unwrap();
    }
    c.set_events(0).unwrap();
    // An event raised before the class went off still holds its vCPU.
    while let Some(e) = c.next_event(Duration::from_secs(5)).unwrap() {
        assert!(matches!(e.event.kind, EventKind::Cr3Write { .. }));
        c.answer(&e, Answer::CONTINUE).unwrap();
    }
    c.write_memory(mailbox + WORD_GO * 8, &FINISH.to_le_bytes())
        .unwrap();
    let run = running.wait();
    run.expect_exit(exit::OK)
        .expect_line("guest: PASS probe")
        .expect_no_line("guest: FAIL")
        .expect_torn_down_cleanly();
    println!("figure: {}", run.line("INFO  exits: ").unwrap_or_default());
    println!(
        "figure: {}",
        run.line("control: served ").unwrap_or_default()
    );
    run.clean_up();
}
