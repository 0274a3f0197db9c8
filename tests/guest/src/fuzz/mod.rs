//! The hostile-guest fuzzer (scenario `fuzz`, `seed=N calls=N seeds=N
//! trace=1`): seeded random operations of every kind a guest can aim at the
//! hypervisor, each checked against what the interface documents (and
//! against the exact result where the fuzzer's model of the hypervisor's
//! state predicts one), with the guest kept alive throughout:
//!
//! - every hypercall number of `hv-abi` and random ones, with edge and
//!   random arguments: views 0/511/512/2^16/u64::MAX, gfns past RAM, in the
//!   MMIO hole, at the local APIC, beyond 48 bits, buffers crossing the end
//!   of RAM and the legacy area, arrays and bitmaps straddling pages;
//! - views: creation with every default access, switches by hypercall and
//!   VMFUNC (random indexes: an invalid or hidden one must raise #UD),
//!   access restrictions, suppress-#VE, remaps, visibility, altp2m on/off;
//! - running inside views with #VE: a restricted page touched with #VE
//!   allowed must raise #VE (and only such pages may);
//! - code in the arena called through views: it must run the frame the
//!   view shows (or, stepped, the page's own), and an INT3 in a remapped
//!   page is a hidden breakpoint the hypervisor steps over;
//! - the balloon: a page is filled with a marker and given back; no view,
//!   remap or alias may show the marker afterwards. Every other arena page
//!   carries a tag naming its gfn, so a view showing a frame that is not the
//!   guest's (or not the one it should be) is seen at once;
//! - log-dirty (a write is never lost, through any view), the display
//!   (its copy matches the framebuffer), the local APIC relocated onto RAM,
//!   holes and released pages and back (the RAM under it comes back);
//! - CR0/CR3/CR4/CR8/EFER/XCR0 writes (restored at once, recovered from
//!   #GP), MSRs, CPUID, VMX instructions (#UD), port I/O of every size to
//!   every kind of port, stray reads, writes and fetches up to 1 TiB.
//!
//! It prints `fuzz: seed S: N calls (by class ...), M faults recovered,
//! result clean` per seed, or the operation that broke an invariant (with
//! the last hypercalls), and fails. What it leaves out (and why) is in
//! `docs/limits.md`.

pub mod bench;
mod calls;
mod machine;
mod memory;
mod model;
mod rng;
mod ve;

use core::fmt;

use hv_abi::{call, error};
use hv_boot::bootinfo::BootInfo;

use crate::scenarios::{Outcome, hypercall};
use crate::{interrupts, paging, println, probe};
use model::{Layout, Mode, Model};
use rng::Rng;

pub use ve::on_ve;

/// The command line's fuzzer options.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// `seed=`: the first seed.
    pub seed: u64,
    /// `calls=`: operations per seed.
    pub calls: u64,
    /// `seeds=`: how many seeds, from `seed` on.
    pub seeds: u64,
    /// `trace=1`: print every operation (to replay a failing seed).
    pub trace: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            seed: 1,
            calls: 2000,
            seeds: 1,
            trace: false,
        }
    }
}

/// The kinds of operation, with their weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Hypercall,
    Unknown,
    View,
    Vmfunc,
    Access,
    Remap,
    Touch,
    Exec,
    Ve,
    Balloon,
    Logdirty,
    Display,
    Scan,
    Apic,
    Cr,
    Msr,
    Xcr,
    Cpuid,
    Vmx,
    Port,
    Stray,
    Fetch,
}

const CLASSES: [(Class, &str, u64); 22] = [
    (Class::Hypercall, "hypercall", 20),
    (Class::Unknown, "unknown-call", 2),
    (Class::View, "view", 7),
    (Class::Vmfunc, "vmfunc", 8),
    (Class::Access, "access", 8),
    (Class::Remap, "remap", 6),
    (Class::Touch, "touch", 10),
    (Class::Exec, "exec", 3),
    (Class::Ve, "ve", 4),
    (Class::Balloon, "balloon", 1),
    (Class::Logdirty, "logdirty", 3),
    (Class::Display, "display", 2),
    (Class::Scan, "scan", 1),
    (Class::Apic, "apic", 1),
    (Class::Cr, "cr", 4),
    (Class::Msr, "msr", 5),
    (Class::Xcr, "xcr", 2),
    (Class::Cpuid, "cpuid", 2),
    (Class::Vmx, "vmx", 2),
    (Class::Port, "port", 8),
    (Class::Stray, "stray", 3),
    (Class::Fetch, "fetch", 1),
];

/// A hypercall as made: number, arguments, result.
#[derive(Clone, Copy, Debug)]
struct Made {
    number: u64,
    args: [u64; 4],
    result: i64,
}

/// What a hypercall may return: an exact value, or a success range and errors.
#[derive(Clone, Copy, Debug)]
pub enum Expect {
    Exact(i64),
    Set {
        ok: Option<(i64, i64)>,
        errors: &'static [i64],
    },
}

impl Expect {
    pub fn allows(&self, result: i64) -> bool {
        match *self {
            Self::Exact(v) => result == v,
            Self::Set { ok, errors } => {
                ok.is_some_and(|(lo, hi)| (lo..=hi).contains(&result)) || errors.contains(&result)
            }
        }
    }
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Exact(v) => write!(f, "exactly {v}"),
            Self::Set { ok, errors } => {
                if let Some((lo, hi)) = ok {
                    write!(f, "{lo}..={hi} or ")?;
                }
                write!(f, "{errors:?}")
            }
        }
    }
}

pub struct Fuzzer {
    rng: Rng,
    seed: u64,
    layout: Layout,
    model: Model,
    /// Operations by class.
    counts: [u64; CLASSES.len()],
    hypercalls: u64,
    /// Faults recovered and #VEs handled before this seed.
    faults_before: u64,
    ves_before: u64,
    spurious_before: u64,
    op: u64,
    class: Class,
    trace: bool,
    recent: heapless::Deque<Made, 8>,
    /// Pages given back in this seed.
    released_now: u64,
    /// The page a disabled local APIC reads from, during the APIC operation.
    read_only_page: Option<u64>,
    /// `VMFUNC` is offered (EPTP switching).
    vmfunc: bool,
    /// The first failure (its detail line is printed when it happens).
    failed: Option<&'static str>,
}

unsafe extern "C" {
    static boot_stack_top: u8;
}

/// The guest's stack (64 KiB below `boot_stack_top`, the shared entry
/// code's): its lowest 4 KiB carry a pattern, so running deep into it is
/// seen before the stack overruns the page tables below.
const STACK: u64 = 64 * 1024;
const GUARD: u64 = 4096;
const GUARD_WORD: u64 = 0x5354_4143_4b47_5244;

fn stack_bottom() -> u64 {
    &raw const boot_stack_top as u64 - STACK
}

fn arm_stack_guard() {
    for i in 0..GUARD / 8 {
        // SAFETY: the stack's lowest page, far below anything in use.
        unsafe { core::ptr::write_volatile((stack_bottom() + 8 * i) as *mut u64, GUARD_WORD) };
    }
}

fn stack_guard_intact() -> bool {
    // SAFETY: as for `arm_stack_guard`.
    (0..GUARD / 8).all(|i| unsafe {
        core::ptr::read_volatile((stack_bottom() + 8 * i) as *const u64) == GUARD_WORD
    })
}

/// Sets the fuzzer up for this boot: interrupts off, 1 TiB mapped, the
/// arena found, #VE claimed.
fn fuzzer(boot: &BootInfo, config: &Config) -> Result<Fuzzer, &'static str> {
    crate::scenarios::check(
        crate::scenarios::hypervisor_present(),
        "needs the hypervisor",
    )?;
    interrupts::disable();
    paging::map_up_to_1_tib();
    let layout = Layout::new(boot)?;
    let mode = detect_mode();
    println!(
        "fuzz: arena {:#x}..{:#x} ({} pages, {} for buffers), guest image gfns {:#x}..{:#x}, physical-address width {}, altp2m mode {mode:?}",
        layout.first * model::PAGE,
        layout.ram_top(),
        model::ARENA_PAGES,
        model::BUFFER_PAGES,
        layout.image.0,
        layout.image.1,
        layout.maxphy
    );
    let fuzzer = Fuzzer {
        rng: Rng::new(config.seed),
        seed: config.seed,
        layout,
        model: Model::new(mode),
        counts: [0; CLASSES.len()],
        hypercalls: 0,
        faults_before: 0,
        ves_before: 0,
        spurious_before: 0,
        op: 0,
        class: Class::Hypercall,
        trace: config.trace,
        recent: heapless::Deque::new(),
        released_now: 0,
        read_only_page: None,
        vmfunc: false,
        failed: None,
    };
    ve::claim(&fuzzer.layout, config.trace);
    arm_stack_guard();
    Ok(fuzzer)
}

/// Runs `config.seeds` seeds from `config.seed` in this boot.
pub fn run(boot: &BootInfo, options: &crate::scenarios::Options) -> Outcome {
    let config = options.fuzz;
    let mut fuzzer = fuzzer(boot, &config)?;
    let mut totals = (0u64, 0u64);
    let result = (|| {
        for seed in config.seed..config.seed.saturating_add(config.seeds) {
            fuzzer.seed_run(seed, config.calls, true)?;
            totals.0 += config.calls;
            totals.1 += 1;
        }
        Ok(())
    })();
    ve::release();
    if config.seeds > 1 && result.is_ok() {
        println!(
            "fuzz: {} seeds from {}: {} calls in all, {} hypercalls, {} pages given back, all clean",
            totals.1,
            config.seed,
            totals.0,
            fuzzer.hypercalls,
            fuzzer.model.released_count()
        );
    }
    result
}

/// `fuzz-end`: a seed's operations, then, with whatever state they left
/// (views, remaps, tracking, a display, pages given back), one of the
/// ways a guest ends the run, chosen by the seed (modulo 6): the exit port
/// (status 42), an i8042 reset pulse, an i8042 output-port write, port
/// 0x92's fast reset, 0xCF9's CPU reset, ACPI S5 (sizes and other bits
/// random). The hypervisor must end the run that way and
/// still get every frame back.
pub fn run_end(boot: &BootInfo, options: &crate::scenarios::Options) -> Outcome {
    let config = options.fuzz;
    let mut fuzzer = fuzzer(boot, &config)?;
    fuzzer.seed_run(config.seed, config.calls, false)?;
    let (what, port, size, value) = match config.seed % 6 {
        0 => (
            "the exit port",
            hv_abi::EXIT_PORT,
            fuzzer.rng.pick(&[1u8, 2, 4]),
            42 | 0xa500,
        ),
        1 => (
            "an i8042 reset pulse",
            0x64,
            1,
            0xf0 | (2 * fuzzer.rng.below(8) as u32),
        ),
        2 => {
            crate::ports::outb(0x64, 0xd1);
            (
                "an i8042 output-port write",
                0x60,
                1,
                0xfe & fuzzer.rng.next() as u32,
            )
        }
        3 => ("port 0x92", 0x92, 1, 1 | fuzzer.rng.next() as u32 & 0xfe),
        4 => ("port 0xcf9", 0xcf9, 1, 4 | fuzzer.rng.next() as u32 & 0xfb),
        _ => match fuzzer.rng.below(3) {
            0 => ("ACPI S5", 0x604, 2, 5 << 10 | 1 << 13),
            1 => ("ACPI S5", 0x604, 4, 5 << 10 | 1 << 13 | 1),
            _ => ("ACPI S5", 0x605, 1, 5 << 2 | 1 << 5),
        },
    };
    println!(
        "fuzz-end: seed {}: ending through {what} (OUT {port:#x} size {size} value {value:#x})",
        config.seed
    );
    crate::console::drain();
    // SAFETY: ends the run, which is the point.
    unsafe {
        match size {
            1 => core::arch::asm!("out dx, al", in("dx") port, in("al") value as u8),
            2 => core::arch::asm!("out dx, ax", in("dx") port, in("ax") value as u16),
            _ => core::arch::asm!("out dx, eax", in("dx") port, in("eax") value),
        }
    }
    ve::release();
    Err("still running after an operation that ends the run")
}

/// The altp2m mode, from what the guest may call.
fn detect_mode() -> Mode {
    if hypercall(call::ALTP2M_GET_STATE, &[]) != error::EPERM {
        Mode::Mixed
    } else if hypercall(call::ALTP2M_VCPU_DISABLE_NOTIFY, &[]) == error::EPERM {
        Mode::External
    } else {
        Mode::Limited
    }
}

impl Fuzzer {
    /// One seed's operations; with `finish`, the final scan and clean-up.
    fn seed_run(&mut self, seed: u64, calls: u64, finish: bool) -> Outcome {
        self.rng = Rng::new(seed);
        self.seed = seed;
        self.counts = [0; CLASSES.len()];
        self.faults_before = probe::recovered();
        self.ves_before = ve::count();
        self.spurious_before = ve::spurious();
        self.released_now = 0;
        let hypercalls = self.hypercalls;
        self.start()?;
        let weights: heapless::Vec<u64, 32> = CLASSES.iter().map(|c| c.2).collect();
        for op in 0..calls {
            self.op = op;
            let i = self.rng.weighted(&weights);
            self.class = CLASSES[i].0;
            self.counts[i] += 1;
            if self.trace {
                println!("fuzz: seed {seed} op {op}: {}", CLASSES[i].1);
            } else if op % 500 == 0 && op > 0 {
                println!("fuzz: seed {seed}: {op} calls");
            }
            self.step()?;
            self.ve_problems()?;
            self.read_only_page = None;
            if !stack_guard_intact() {
                let class = self.class;
                return Err(self.fail(
                    "the fuzzer ran within 4 KiB of the end of its stack",
                    format_args!("class {class:?}"),
                ));
            }
        }
        self.op = calls;
        if !finish {
            return Ok(());
        }
        self.finish()?;
        let faults = probe::recovered() - self.faults_before;
        let ves = ve::count() - self.ves_before;
        let spurious = ve::spurious() - self.spurious_before;
        let mut by_class: heapless::String<512> = heapless::String::new();
        for (i, (_, name, _)) in CLASSES.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            let _ = fmt::Write::write_fmt(
                &mut by_class,
                format_args!("{sep}{name} {}", self.counts[i]),
            );
        }
        println!(
            "fuzz: seed {seed}: {calls} calls (by class {by_class}), {faults} faults recovered, result clean"
        );
        println!(
            "fuzz: seed {seed}: {} hypercalls, {ves} #VEs handled, {} pages given back ({} in all); known issues (docs/limits.md): {spurious} #VEs for pages the hypervisor write-protects itself",
            self.hypercalls - hypercalls,
            self.released_now,
            self.model.released_count(),
        );
        Ok(())
    }

    fn step(&mut self) -> Outcome {
        match self.class {
            Class::Hypercall => self.hypercall_op(),
            Class::Unknown => self.unknown_op(),
            Class::View => self.view_op(),
            Class::Vmfunc => self.vmfunc_op(),
            Class::Access => self.access_op(),
            Class::Remap => self.remap_op(),
            Class::Touch => self.touch_op(),
            Class::Exec => self.exec_op(),
            Class::Ve => self.ve_op(),
            Class::Balloon => self.balloon_op(),
            Class::Logdirty => self.logdirty_op(),
            Class::Display => self.display_op(),
            Class::Scan => self.scan_op(),
            Class::Apic => self.apic_op(),
            Class::Cr => self.cr_op(),
            Class::Msr => self.msr_op(),
            Class::Xcr => self.xcr_op(),
            Class::Cpuid => self.cpuid_op(),
            Class::Vmx => self.vmx_op(),
            Class::Port => self.port_op(),
            Class::Stray => self.stray_op(),
            Class::Fetch => self.fetch_op(),
        }
    }

    /// A new seed starts from a clean hypervisor state: altp2m off, no
    /// display, the arena's view-0 access full and its tags in place.
    fn start(&mut self) -> Outcome {
        self.model.reset();
        if self.model.mode == Mode::Mixed {
            self.expect(call::ALTP2M_SET_STATE, [0; 4], Expect::Exact(0))?;
        }
        // A display left by whatever ran before is stopped (its range is
        // then no longer tracked: the model cannot know it, and does not
        // need to).
        let stopped = self.call(call::DISPLAY_SET, [0; 4]);
        self.check_result(
            call::DISPLAY_SET,
            [0; 4],
            stopped,
            Expect::Set {
                ok: Some((0, 0)),
                errors: &[error::ENOENT],
            },
        )?;
        self.vmfunc = self.model.mode == Mode::Mixed && {
            self.expect(call::ALTP2M_SET_STATE, [1, 0, 0, 0], Expect::Exact(0))?;
            let offered = probe::vmfunc(0).is_ok();
            self.expect(call::ALTP2M_SET_STATE, [0; 4], Expect::Exact(0))?;
            offered
        };
        self.open_arena(0)?;
        self.stamp_all()
    }

    /// Checks and puts everything back: the final scan through every view,
    /// then altp2m off, notification off, no display.
    fn finish(&mut self) -> Outcome {
        self.final_scan()?;
        if let Some((first, pages)) = self.model.display.take() {
            self.expect(call::DISPLAY_SET, [0; 4], Expect::Exact(0))?;
            self.model.logdirty(first, first + pages - 1, false);
        }
        if self.model.mode != Mode::External {
            self.expect(call::ALTP2M_VCPU_DISABLE_NOTIFY, [0; 4], Expect::Exact(0))?;
            self.model.notify = None;
        }
        if self.model.mode == Mode::Mixed {
            self.expect(call::ALTP2M_SET_STATE, [0; 4], Expect::Exact(0))?;
            self.model.altp2m_off();
        }
        ve::sync(&self.model);
        self.ve_problems()
    }

    /// Makes a hypercall, noting it for a failure report.
    fn call(&mut self, number: u64, args: [u64; 4]) -> i64 {
        self.hypercalls += 1;
        if self.trace {
            println!("fuzz:   call {number:#x} {args:x?}");
        }
        let result = hypercall(number, &args);
        if self.recent.is_full() {
            self.recent.pop_front();
        }
        let _ = self.recent.push_back(Made {
            number,
            args,
            result,
        });
        result
    }

    /// Makes a hypercall and checks its result.
    fn expect(&mut self, number: u64, args: [u64; 4], expect: Expect) -> Result<i64, &'static str> {
        let result = self.call(number, args);
        self.check_result(number, args, result, expect)?;
        Ok(result)
    }

    fn check_result(
        &mut self,
        number: u64,
        args: [u64; 4],
        result: i64,
        expect: Expect,
    ) -> Result<i64, &'static str> {
        // What the documentation allows, whatever the model predicts.
        let documented = calls::documented(number, self.model.mode);
        if !documented.allows(result) {
            return Err(self.fail(
                "a hypercall returned a value outside its documented set",
                format_args!(
                    "call {number:#x} {args:#x?} returned {result}, documented: {documented}"
                ),
            ));
        }
        if !expect.allows(result) {
            return Err(self.fail(
                "a hypercall returned another result than the interface defines",
                format_args!("call {number:#x} {args:#x?} returned {result}, expected {expect}"),
            ));
        }
        Ok(result)
    }

    /// Reports a broken invariant: the seed, the operation, the detail and
    /// the last hypercalls. Returns the scenario's failure reason.
    fn fail(&mut self, why: &'static str, detail: fmt::Arguments<'_>) -> &'static str {
        if self.failed.is_none() {
            println!(
                "fuzz: seed {} op {} ({:?}): FAIL: {why}: {detail}",
                self.seed, self.op, self.class
            );
            for m in self.recent.iter() {
                println!(
                    "fuzz:   recent call {:#x} {:x?} -> {}",
                    m.number, m.args, m.result
                );
            }
            println!(
                "fuzz:   model: altp2m {}, view {}, views {:?}, notify {:?}, display {:?}",
                self.model.enabled,
                self.model.current,
                self.model.live_views().as_slice(),
                self.model.notify,
                self.model.display
            );
            self.failed = Some(why);
        }
        why
    }

    /// Invariants the #VE handler checks, reported here. A #VE for a page
    /// whose access allows everything must be the hypervisor's own write
    /// protection (a known issue, docs/limits.md): the page, or the page a
    /// remap shows there, is tracked log-dirty, or is the read-only page of
    /// a disabled local APIC.
    fn ve_problems(&mut self) -> Outcome {
        for (gpa, view) in ve::take_unexplained() {
            let gfn = gpa / model::PAGE;
            let shown = self.model.remap_of(view as u16, gfn).unwrap_or(gfn);
            let read_only = self.read_only_page == Some(gfn);
            if !self.model.tracked(gfn) && !self.model.tracked(shown) && !read_only {
                return Err(self.fail(
                    "a #VE for a page whose access allows everything and that is not tracked log-dirty",
                    format_args!("gpa {gpa:#x} in view {view}"),
                ));
            }
        }
        match ve::problem() {
            None => Ok(()),
            Some((why, gpa, view)) => {
                Err(self.fail(why, format_args!("#VE for gpa {gpa:#x} in view {view}")))
            }
        }
    }

    /// Checks a fact, failing with `why` and `detail` when it is false.
    fn ensure(&mut self, ok: bool, why: &'static str, detail: fmt::Arguments<'_>) -> Outcome {
        if ok {
            Ok(())
        } else {
            Err(self.fail(why, detail))
        }
    }
}
