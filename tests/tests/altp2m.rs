//! altp2m in the running hypervisor, driven by the test guest in Bochs
//! (corei7_skylake_x: EPT, VMFUNC EPTP switching, #VE).

use hv_tests::{Boot, Engine, Run};

fn run(hv_cmdline: &str, scenarios: &str) -> Run {
    Boot::new(Engine::Bochs)
        .cmdline(hv_cmdline)
        .guest(scenarios)
        .run()
}

#[test]
fn every_hypercall_with_good_and_bad_arguments() {
    let run = run("", "altp2m memory-calls");
    run.expect_scenarios_passed(&["altp2m", "memory-calls"]);
    run.clean_up();
}

#[test]
fn modes_decide_what_the_guest_may_call() {
    // The calls outside altp2m work the same in every mode.
    let external = run("altp2m=external", "mode-external memory-calls");
    external.expect_scenarios_passed(&["mode-external", "memory-calls"]);
    external
        .expect_line("altp2m mode External")
        .expect_line("refused: altp2m mode External");
    let limited = run("altp2m=limited", "mode-limited memory-calls");
    limited.expect_scenarios_passed(&["mode-limited", "memory-calls"]);
    limited.expect_line("refused: altp2m mode Limited");
    // A refused call is logged once, however often the guest repeats it.
    let create_refusals = limited
        .lines()
        .filter(|l| l.contains("hypercall 0x14 refused"))
        .count();
    assert_eq!(create_refusals, 1, "{}", limited.report());
    external.clean_up();
    limited.clean_up();
}

#[test]
fn vmfunc_switches_views_without_exits_and_refuses_invalid_or_hidden_slots() {
    let run = run("", "vmfunc");
    run.expect_scenarios_passed(&["vmfunc"]);
    run.expect_line("vmfunc: 101 switches cost 1 VM exits");
    run.clean_up();
}

#[test]
fn ve_reaches_the_guest_with_gfn_qualification_and_view_and_can_be_rearmed() {
    let run = run("", "ve");
    run.expect_scenarios_passed(&["ve"]);
    run.expect_line("ve: 2 #VEs; last: gpa 0x405010, qualification 0x1aa, view 1")
        // Not re-armed: the next violation exits and the monitor steps it.
        .expect_line("monitor: access view=1 gfn=0x405 access=w entry=rx");
    run.clean_up();
}

#[test]
fn a_hidden_breakpoint_is_hit_on_execution_and_invisible_to_reads() {
    let run = run("", "hidden-breakpoint");
    run.expect_scenarios_passed(&["hidden-breakpoint"]);
    run.expect_line(
        "hidden-breakpoint: read 0xb8 through the execute view, the call returned 42 and 42",
    )
    .expect_line("monitor: access view=1 gfn=0x600 access=r entry=x")
    .expect_line("monitor: breakpoint view=1 gfn=0x600 rip=0x600000 action=step-in-view-0");
    run.clean_up();
}

#[test]
fn a_ballooned_page_is_unreachable_through_every_alias_and_other_divergence_stays() {
    let run = run("", "balloon");
    run.expect_scenarios_passed(&["balloon"]);
    run.expect_line(
        "monitor: dropped view=1 gfn=0x501 pages=1 access=rwx reason=SourceChanged remap-of=0x500",
    )
    .expect_line(
        "monitor: dropped view=2 gfn=0x502 pages=1 access=rwx reason=SourceChanged remap-of=0x500",
    )
    .expect_line("EPT violation: read of 0x500000")
    .expect_line("balloon: after release: a sees G1 0x51, b sees G2 0x52 and G4 0x55");
    run.clean_up();
}

#[test]
fn the_display_does_not_freeze_when_the_view_was_created_early_or_late() {
    // display-vs-logdirty: the guest's LOGDIRTY_FETCH and the display's
    // refresh share one dirty log; neither may take the other's updates.
    let run = run("", "display display-late display-vs-logdirty");
    run.expect_scenarios_passed(&["display", "display-late", "display-vs-logdirty"]);
    run.expect_line("display: tracking 16 pages from gfn 0x800")
        .expect_line("guest: display: the periodic tick refreshed the display")
        .expect_no_line("frozen display");
    // Every frame after the first had its dirty pages copied.
    let copied = run
        .lines()
        .filter(|l| l.contains("display: frame") && !l.contains(": 0 pages copied"))
        .count();
    assert!(copied >= 8, "{}", run.report());
    run.clean_up();
}

/// The display figure's frames: (dirty pages, VM exits) per frame.
fn frame_exits(run: &Run) -> Vec<(u64, u64)> {
    run.lines()
        .filter_map(|l| {
            let rest = l.split_once("display-bench: frame with ")?.1;
            let (pages, rest) = rest.split_once(" dirty pages: ")?;
            let exits = rest.split_once(" VM exits")?.0;
            Some((pages.parse().ok()?, exits.parse().ok()?))
        })
        .collect()
}

#[test]
fn with_pml_a_display_frame_costs_one_exit_and_the_display_never_freezes() {
    let run = run("", "display display-late display-bench");
    run.expect_scenarios_passed(&["display", "display-late", "display-bench"]);
    run.expect_line("log-dirty by PML")
        .expect_no_line("frozen display");
    let frames = frame_exits(&run);
    assert_eq!(
        frames.iter().map(|f| f.0).collect::<Vec<_>>(),
        [1, 4, 16, 64],
        "{}",
        run.report()
    );
    for (pages, exits) in frames {
        assert!(
            exits <= 1,
            "a frame of {pages} dirty pages cost {exits} exits\n{}",
            run.report()
        );
    }
    run.clean_up();
}

#[test]
fn with_pml_masked_write_faults_keep_the_display_alive() {
    let run = run("vmx.mask=pml", "display display-late display-bench");
    run.expect_scenarios_passed(&["display", "display-late", "display-bench"]);
    run.expect_line("log-dirty by write protection")
        .expect_no_line("frozen display");
    for (pages, exits) in frame_exits(&run) {
        assert!(
            exits > pages,
            "a write fault per page: {pages} pages, {exits} exits\n{}",
            run.report()
        );
    }
    run.clean_up();
}

#[test]
fn tracked_ranges_are_bounded_by_the_hypervisors_memory() {
    let run = run("", "logdirty-limit");
    run.expect_scenarios_passed(&["logdirty-limit"]);
    run.expect_line("one-page ranges tracked, then ENOMEM");
    run.clean_up();
}

/// A hostile guest runs the hypervisor out of its heap and frame quotas:
/// every refusal is ENOMEM, the hypervisor stays up, the guest gets it all
/// back, and the run ends with every frame returned and the hypervisor's
/// image unchanged.
#[test]
fn a_guest_that_exhausts_its_quotas_gets_enomem_and_nothing_leaks() {
    let run = run("guest.heap=256 guest.frames=300", "exhaust");
    run.expect_scenarios_passed(&["exhaust"]);
    let held = run
        .line("vmm: the guest held at most ")
        .unwrap_or_else(|| panic!("no quota line\n{}", run.report()));
    let frames: u64 = held
        .split("at most ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{held}"));
    assert!(frames <= 300, "the frame quota held: {held}");
    run.expect_line("(quota 300)")
        .expect_line("(quota 256 KiB)")
        .expect_no_line("panic");
    run.clean_up();
}
