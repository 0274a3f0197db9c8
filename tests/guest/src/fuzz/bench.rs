//! Figure (scenario `hostile-bench`, `scripts/figures hostile`): the most
//! expensive hypercalls a guest can construct, each timed alone with the
//! TSC (in Bochs: instructions, the hypervisor's included, and the time
//! its synchronous log lines take). The hypervisor runs each with
//! interrupts off: this is how long one guest can hold a CPU, and the
//! lock every vCPU of the guest needs, with one call. Prints each case and
//! the worst.

use hv_abi::{access, call};
use hv_boot::bootinfo::BootInfo;

use super::model::{ARENA_PAGES, BUFFER_PAGES, Layout, PAGE};
use crate::scenarios::{Outcome, check, hypercall, hypervisor_present};
use crate::{println, probe, rdtsc};

/// Views made for the cases that need many.
const MANY: u64 = 511;
/// Disjoint log-dirty ranges, one page each, every other gfn from `FAR`.
const RANGES: u64 = 4096;
const FAR: u64 = 1 << 30;

struct Bench {
    layout: Layout,
    worst: (&'static str, u64, i64),
    /// The RAM's gfns below 4 GiB, `[1 MiB, top)`.
    ram: (u64, u64),
}

impl Bench {
    /// Times one call; prints it with what was set up.
    fn time(&mut self, name: &'static str, setup: &str, number: u64, args: [u64; 4]) -> i64 {
        let start = rdtsc();
        let result = hypercall(number, &args);
        let ticks = rdtsc() - start;
        println!("hostile-bench: {name}: {ticks} TSC cycles, result {result} ({setup})");
        if ticks > self.worst.1 {
            self.worst = (name, ticks, result);
        }
        result
    }

    fn arrays(&self) -> (u64, u64) {
        let base = (self.layout.end() - BUFFER_PAGES) * PAGE;
        (base, base + 2 * PAGE)
    }

    /// Fills the arrays for a SET_MEM_ACCESS_MULTI of `gfns` with `a`.
    fn fill(&self, gfns: impl Iterator<Item = u64>, a: u64) -> u64 {
        let (g, acc) = self.arrays();
        let mut n = 0;
        for (i, gfn) in gfns.take(512).enumerate() {
            let _ = probe::write(g + 8 * i as u64, gfn);
            let _ = probe::write_u8(acc + i as u64, a as u8);
            n += 1;
        }
        n
    }

    /// Creates views until the hypervisor refuses; returns how many.
    fn fill_views(&self, limit: u64) -> u64 {
        (0..limit)
            .take_while(|_| hypercall(call::ALTP2M_CREATE_VIEW, &[access::RWX]) > 0)
            .count() as u64
    }

    /// 512 gfns spread over all RAM: one per 2 MiB region where RAM allows.
    fn spread(&self) -> impl Iterator<Item = u64> + use<> {
        let (first, end) = self.ram;
        let step = ((end - first) / 512).max(1);
        (0..512)
            .map(move |i| first + i * step)
            .filter(move |&g| g < end)
    }
}

pub fn hostile_bench(boot: &BootInfo) -> Outcome {
    check(hypervisor_present(), "needs the hypervisor")?;
    crate::interrupts::disable();
    let layout = Layout::new(boot)?;
    let ram = (0x100, layout.end());
    let mut b = Bench {
        layout,
        worst: ("none", 0, 0),
        ram,
    };
    let arena = b.layout.first;
    println!(
        "hostile-bench: guest RAM to {:#x}, {} pages",
        b.layout.ram_top(),
        ram.1 - ram.0
    );
    b.time(
        "VERSION (a round trip, for scale)",
        "nothing",
        call::VERSION,
        [0; 4],
    );
    let (counts, _) = b.arrays();
    b.time(
        "EXIT_COUNTS",
        "80 counters",
        call::EXIT_COUNTS,
        [counts, 80, 0, 0],
    );

    hypercall(call::ALTP2M_SET_STATE, &[1]);
    // One view, superpages split by 512 entries in distinct 2 MiB regions.
    let v = hypercall(call::ALTP2M_CREATE_VIEW, &[access::RWX]) as u64;
    let n = b.fill(b.spread(), access::RX);
    let (g, a) = b.arrays();
    b.time(
        "ALTP2M_SET_MEM_ACCESS_MULTI",
        "512 entries, one per 2 MiB region, in a fresh view",
        call::ALTP2M_SET_MEM_ACCESS_MULTI,
        [v, g, a, n],
    );
    let v2 = hypercall(call::ALTP2M_CREATE_VIEW, &[access::RWX]) as u64;
    b.time(
        "ALTP2M_SET_SUPPRESS_VE_MULTI",
        "512 pages across two 2 MiB regions, in a fresh view",
        call::ALTP2M_SET_SUPPRESS_VE_MULTI,
        [v2, arena + 256, arena + 767, 0],
    );
    b.time(
        "ALTP2M_CHANGE_GFN",
        "a gfn near the top of the 48-bit space shows an arena page (tables built down to 4K)",
        call::ALTP2M_CHANGE_GFN,
        [v2, (1 << 36) - 1, arena, 0],
    );
    b.time(
        "ALTP2M_DESTROY_VIEW",
        "a view with 512 split regions",
        call::ALTP2M_DESTROY_VIEW,
        [v, 0, 0, 0],
    );
    hypercall(call::ALTP2M_SET_STATE, &[0]);

    // Many views, each with a split 2 MiB region per 2 MiB of RAM (up to
    // 16), holding two pages, one with an alias to it in every view.
    hypercall(call::ALTP2M_SET_STATE, &[1]);
    let views = b.fill_views(MANY);
    let n = b.fill(b.spread().take(16), access::RX);
    let (held, target, alias) = (arena + 99, arena + 100, arena + 101);
    for view in 1..=views {
        hypercall(call::ALTP2M_SET_MEM_ACCESS_MULTI, &[view, g, a, n]);
        hypercall(call::ALTP2M_SET_MEM_ACCESS, &[view, held, access::RWX]);
        hypercall(call::ALTP2M_SET_MEM_ACCESS, &[view, target, access::RWX]);
        hypercall(call::ALTP2M_CHANGE_GFN, &[view, alias, target]);
    }
    let setup = format_setup(views, "views, each with 16 split 2 MiB regions");
    // Log-dirty over all RAM in every view, every arena page dirty.
    b.time(
        "LOGDIRTY_TRACK",
        &format_setup(views, "views with split regions; 2^24 pages from gfn 0"),
        call::LOGDIRTY_TRACK,
        [0, 1 << 24, 0, 0],
    );
    for page in arena..arena + ARENA_PAGES - BUFFER_PAGES {
        let at = page * PAGE + 0x40;
        let _ = probe::read(at).and_then(|value| probe::write(at, value));
    }
    let bitmap = (b.layout.end() - BUFFER_PAGES + 4) * PAGE;
    b.time(
        "LOGDIRTY_FETCH",
        &format_setup(
            views,
            "views with split regions; 32768 pages from gfn 0, the arena dirty",
        ),
        call::LOGDIRTY_FETCH,
        [0, 32768, bitmap, 0],
    );
    // The balloon reaches every view that holds the page (and reports
    // every entry it drops: an alias in each view).
    b.time(
        "BALLOON_RELEASE",
        &format_setup(views, "views holding the page, no alias"),
        call::BALLOON_RELEASE,
        [held, 0, 0, 0],
    );
    b.time(
        "BALLOON_RELEASE",
        &format_setup(views, "views holding the page and an alias to it"),
        call::BALLOON_RELEASE,
        [target, 0, 0, 0],
    );
    b.time(
        "ALTP2M_SET_STATE off",
        &setup,
        call::ALTP2M_SET_STATE,
        [0, 0, 0, 0],
    );

    // Many disjoint log-dirty ranges (past RAM: a range is recorded
    // whatever it maps): every view keeps them all, a new view copies them.
    hypercall(call::ALTP2M_SET_STATE, &[1]);
    let mut ranges = 0;
    for i in 0..RANGES {
        if hypercall(call::LOGDIRTY_TRACK, &[FAR + 2 * i, 1]) == 0 {
            ranges += 1;
        }
    }
    b.time(
        "ALTP2M_CREATE_VIEW",
        &format_setup(ranges, "disjoint log-dirty ranges to copy"),
        call::ALTP2M_CREATE_VIEW,
        [access::RWX, 0, 0, 0],
    );
    let more = b.fill_views(MANY);
    b.time(
        "LOGDIRTY_TRACK",
        &format_setup(
            more + 1,
            "views, each with the disjoint ranges; one more range",
        ),
        call::LOGDIRTY_TRACK,
        [FAR + 2 * RANGES, 1, 0, 0],
    );
    println!(
        "hostile-bench: with {ranges} disjoint log-dirty ranges, {} views could be made (then {})",
        more + 1,
        hypercall(call::ALTP2M_CREATE_VIEW, &[access::RWX])
    );
    hypercall(call::ALTP2M_SET_STATE, &[0]);

    // The display at its largest, every page dirty.
    let fb = arena + 1024;
    b.time("DISPLAY_SET", "64 pages", call::DISPLAY_SET, [fb, 64, 0, 0]);
    for page in fb..fb + 64 {
        let _ = probe::write(page * PAGE + 0x40, page);
    }
    b.time(
        "DISPLAY_REFRESH",
        "64 dirty pages",
        call::DISPLAY_REFRESH,
        [0; 4],
    );
    b.time(
        "DISPLAY_CHECKSUM",
        "64 pages",
        call::DISPLAY_CHECKSUM,
        [0; 4],
    );
    hypercall(call::DISPLAY_SET, &[0, 0]);

    let (name, ticks, result) = b.worst;
    println!("hostile-bench: worst: {name}: {ticks} TSC cycles (result {result})");
    Ok(())
}

fn format_setup(n: u64, what: &str) -> heapless::String<128> {
    let mut s = heapless::String::new();
    let _ = core::fmt::Write::write_fmt(&mut s, format_args!("{n} {what}"));
    s
}
