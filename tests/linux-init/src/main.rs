//! `/init` of the Linux guest (see the library's documentation). It runs as
//! PID 1: if it exited or died, the kernel would panic ("Attempted to kill
//! init"), so every check returns an outcome (panics are caught too) and the
//! program always ends in one of the exit paths, which do not return.

use std::arch::asm;
use std::arch::x86_64::{__cpuid, _rdtsc};
use std::ffi::CString;
use std::fs;
use std::io::{self, Write};
use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

use hv_linux_init::checks::{self, CpuidSeen, MemoryView, TimerReading};
use hv_linux_init::params::{ExitPath, Params};
use hv_linux_init::probe::{self as probes, FUNCTION};
use hv_linux_init::{Outcome, pattern, procfs, status, summary};

fn main() {
    // First, before anything else runs: under Bochs the TSC counts ticks
    // since power-on (one per emulated instruction, plus the time skipped
    // while every CPU halts).
    let tsc = rdtsc();
    let notes = mount_and_open_console();
    let uptime = read("/proc/uptime").ok().and_then(|t| procfs::uptime(&t));
    say(&format!(
        "started (tsc {tsc}, uptime {})",
        uptime.map_or("?".into(), |u| format!("{u:.2}"))
    ));
    for note in &notes {
        say(note);
    }
    let cmdline = read("/proc/cmdline").unwrap_or_default();
    let release = read("/proc/sys/kernel/osrelease").unwrap_or_default();
    say(&format!(
        "kernel {}, cmdline: {}",
        release.trim(),
        cmdline.trim()
    ));
    let params = Params::parse(&cmdline);
    for warning in &params.warnings {
        say(&format!("cmdline: {warning}"));
    }

    let mut outcomes = Vec::new();
    let mut ours = false;
    let mut report = |outcome: Outcome| {
        out(&outcome.line());
        outcomes.push(outcome);
    };
    report(guarded("cpuid", || {
        let (outcome, seen_ours) = cpuid_check(&params);
        ours = seen_ours;
        outcome
    }));
    report(guarded("memory", || memory_check(&params)));
    report(guarded("timer", timer_check));
    if params.probe_calls > 0 {
        report(guarded("probe", || probe_check(&params)));
    }
    if params.memtest_mib == 0 {
        say("memtest skipped (hvtest.memtest=0)");
    } else {
        report(guarded("memtest", || memtest_check(&params)));
    }
    if params.dmesg {
        print_kernel_log();
    }
    say(&summary(&outcomes));
    finish(params.exit, ours, status(&outcomes));
}

/// Console output; errors are dropped (there is nowhere else to report them).
fn out(line: &str) {
    let mut stdout = io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

fn say(line: &str) {
    out(&format!("hv-linux-init: {line}"));
}

fn read(path: &str) -> Result<String, String> {
    fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))
}

/// Runs a check; a panic becomes a failure instead of killing PID 1.
fn guarded(name: &'static str, check: impl FnOnce() -> Outcome) -> Outcome {
    panic::catch_unwind(AssertUnwindSafe(check)).unwrap_or_else(|payload| {
        let why = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("?");
        Outcome::fail(name, format!("panicked: {why}"))
    })
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no memory effects; Linux leaves it enabled for user space.
    unsafe { _rdtsc() }
}

fn errno() -> io::Error {
    io::Error::last_os_error()
}

/// Mounts proc, sysfs and devtmpfs, and gives the program a console on
/// fds 0..2 if the kernel could not (no /dev/console in the initramfs).
/// Returns what went wrong, to print once the console works.
fn mount_and_open_console() -> Vec<String> {
    let mut notes = Vec::new();
    for (fstype, target) in [("proc", "/proc"), ("sysfs", "/sys"), ("devtmpfs", "/dev")] {
        let _ = fs::create_dir_all(target);
        let (source, path) = (cstring(fstype), cstring(target));
        // SAFETY: the strings are NUL-terminated and live across the call; no data argument.
        let rc = unsafe {
            libc::mount(
                source.as_ptr(),
                path.as_ptr(),
                source.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        let err = errno();
        if rc != 0 && err.raw_os_error() != Some(libc::EBUSY) {
            notes.push(format!("mount {fstype} on {target}: {err}"));
        }
    }
    // SAFETY: F_GETFD only queries the descriptor.
    if unsafe { libc::fcntl(1, libc::F_GETFD) } < 0 {
        let console = cstring("/dev/console");
        // SAFETY: a NUL-terminated path; the descriptor is ours.
        let fd = unsafe { libc::open(console.as_ptr(), libc::O_RDWR) };
        for target in 0..3 {
            // SAFETY: dup2 of an open descriptor onto 0..2.
            unsafe { libc::dup2(fd, target) };
        }
        notes.push(format!(
            "no console from the kernel, opened /dev/console (fd {fd})"
        ));
    }
    notes
}

fn cstring(text: &str) -> CString {
    CString::new(text).unwrap_or_default()
}

/// Lets this process run on `cpus` only; false if the kernel refused.
fn set_affinity(cpus: &[usize]) -> bool {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus.iter().filter(|&&cpu| cpu < libc::CPU_SETSIZE as usize) {
        // SAFETY: `cpu` is below CPU_SETSIZE, inside the set.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) == 0 }
}

/// Moves this process to `cpu`; true if it now runs there (the kernel
/// migrates the caller before sched_setaffinity returns).
fn pin_to(cpu: usize) -> bool {
    // SAFETY: no arguments.
    set_affinity(&[cpu]) && unsafe { libc::sched_getcpu() } == cpu as i32
}

fn cpuid_here(cpu: usize) -> CpuidSeen {
    let (basic, base, features) = (
        __cpuid(1),
        __cpuid(hv_abi::CPUID_BASE),
        __cpuid(hv_abi::CPUID_FEATURES),
    );
    let mut signature = [0; 12];
    for (chunk, register) in signature.chunks_mut(4).zip([base.ebx, base.ecx, base.edx]) {
        chunk.copy_from_slice(&register.to_le_bytes());
    }
    CpuidSeen {
        cpu,
        hypervisor_bit: basic.ecx & (1 << 31) != 0,
        max_leaf: base.eax,
        signature,
        version: features.eax,
    }
}

/// CPUID on every online CPU; also whether CPU 0 (or the first CPU that
/// answered) shows our hypervisor, which picks the automatic exit path.
fn cpuid_check(params: &Params) -> (Outcome, bool) {
    let online = read("/sys/devices/system/cpu/online").ok();
    let cpus = online
        .as_deref()
        .and_then(procfs::cpu_list)
        .unwrap_or_else(|| vec![0]);
    let mut seen = Vec::new();
    let mut unreachable = Vec::new();
    for &cpu in &cpus {
        if pin_to(cpu) {
            seen.push(cpuid_here(cpu));
        } else {
            unreachable.push(cpu);
        }
    }
    set_affinity(&cpus);
    let ours = seen.first().is_some_and(CpuidSeen::ours);
    if !unreachable.is_empty() {
        let why = format!("could not run on CPUs {unreachable:?} of online {cpus:?}");
        return (Outcome::fail("cpuid", why), ours);
    }
    let flags = read("/proc/cpuinfo")
        .map_or_else(|_| Vec::new(), |t| procfs::cpuinfo_flag(&t, "hypervisor"));
    (checks::cpuid(params.expect, &seen, &flags), ours)
}

fn memory_check(params: &Params) -> Outcome {
    let iomem = match read("/proc/iomem") {
        Ok(text) => procfs::iomem(&text),
        Err(why) => return Outcome::fail("memory", why),
    };
    let Some(mem_total) = read("/proc/meminfo")
        .ok()
        .and_then(|t| procfs::meminfo_kib(&t, "MemTotal"))
    else {
        return Outcome::fail("memory", "no MemTotal in /proc/meminfo");
    };
    let view = MemoryView {
        firmware_ram: firmware_memmap().map(|ranges| procfs::total(&ranges, "System RAM")),
        iomem_ram: procfs::total(&iomem, "System RAM"),
        mem_total: mem_total * 1024,
        kernel: procfs::kernel_memory_line(&kernel_log()),
    };
    checks::memory(params.mem_mib, &view)
}

/// `/sys/firmware/memmap`: the memory map as the boot loader handed it over.
fn firmware_memmap() -> Option<Vec<procfs::Range>> {
    let mut ranges = Vec::new();
    for entry in fs::read_dir("/sys/firmware/memmap").ok()?.flatten() {
        let dir = entry.path();
        let field = |name: &str| fs::read_to_string(dir.join(name)).ok();
        ranges.push(procfs::memmap_entry(
            &field("start")?,
            &field("end")?,
            &field("type")?,
        )?);
    }
    (!ranges.is_empty()).then_some(ranges)
}

/// Spins until `done` says so or `limit` has passed on CLOCK_MONOTONIC,
/// and at most for a TSC budget (so a clock that does not advance cannot
/// hang the run); returns the monotonic time that passed.
fn spin_until(limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    const TSC_BUDGET: u64 = 1 << 32;
    let start = Instant::now();
    let tsc = rdtsc();
    while start.elapsed() < limit && rdtsc().wrapping_sub(tsc) < TSC_BUDGET && !done() {
        std::hint::spin_loop();
    }
    start.elapsed()
}

fn busy_wait(duration: Duration) -> Duration {
    spin_until(duration, || false)
}

fn timer_reading() -> Result<TimerReading, String> {
    Ok(TimerReading {
        interrupts: procfs::interrupts(&read("/proc/interrupts")?),
        uptime: procfs::uptime(&read("/proc/uptime")?).ok_or("/proc/uptime: no number")?,
    })
}

fn timer_check() -> Outcome {
    // A busy wait rather than a sleep: a sleep needs the very timer
    // interrupts under test to wake up.
    let readings = timer_reading().and_then(|before| {
        let waited = busy_wait(Duration::from_millis(100));
        Ok((before, timer_reading()?, waited))
    });
    match readings {
        Ok((before, after, waited)) => {
            let mut outcome = checks::timer(&before, &after, waited.as_secs_f64());
            if let Ok(source) =
                read("/sys/devices/system/clocksource/clocksource0/current_clocksource")
            {
                outcome.detail += &format!(", clocksource {}", source.trim());
            }
            outcome
        }
        Err(why) => Outcome::fail("timer", why),
    }
}

/// Room left for the kernel and this program when the test takes memory:
/// running PID 1 out of memory would panic the kernel.
const MEMTEST_HEADROOM_MIB: u64 = 32;

fn memtest_check(params: &Params) -> Outcome {
    const NAME: &str = "memtest";
    let mib = params.memtest_mib;
    let available = read("/proc/meminfo")
        .ok()
        .and_then(|t| procfs::meminfo_kib(&t, "MemAvailable"))
        .unwrap_or(0)
        / 1024;
    if mib + MEMTEST_HEADROOM_MIB > available {
        return Outcome::fail(
            NAME,
            format!(
                "{mib} MiB requested, MemAvailable {available} MiB leaves less than {MEMTEST_HEADROOM_MIB} MiB"
            ),
        );
    }
    let len = (mib << 20) as usize / size_of::<u64>();
    let seed = params.seed.unwrap_or_else(rdtsc);
    let started = Instant::now();
    let mut words: Vec<u64> = Vec::new();
    let written = match pattern::fill(&mut words, len, seed) {
        Ok(sum) => sum,
        Err(e) => return Outcome::fail(NAME, format!("cannot allocate {mib} MiB: {e}")),
    };
    let filled = started.elapsed();
    let readback = pattern::verify(&words, seed);
    let verified = started.elapsed();
    let rate = |d: Duration| mib as f64 / d.as_secs_f64().max(1e-9);
    let timing = format!(
        "{mib} MiB, seed {seed:#x}: allocate+write {:.2} s ({:.0} MiB/s), read {:.2} s ({:.0} MiB/s)",
        filled.as_secs_f64(),
        rate(filled),
        (verified - filled).as_secs_f64(),
        rate(verified - filled)
    );
    if readback.mismatches == 0 && readback.checksum == written {
        Outcome::pass(NAME, format!("{timing}, checksum {written:#018x} matches"))
    } else {
        Outcome::fail(
            NAME,
            format!(
                "{} words differ (first at byte {:#x}), checksum {:#018x} written, {:#018x} read; {timing}",
                readback.mismatches,
                readback.first_mismatch.unwrap_or(0) * size_of::<u64>(),
                written,
                readback.checksum
            ),
        )
    }
}

/// The kernel's log buffer, through syslog(2).
fn kernel_log() -> String {
    // SAFETY: SYSLOG_ACTION_SIZE_BUFFER (10) takes no buffer.
    let size = unsafe { libc::klogctl(10, std::ptr::null_mut(), 0) };
    let mut buffer = vec![0u8; size.max(0) as usize];
    // SAFETY: SYSLOG_ACTION_READ_ALL (3) writes at most `len` bytes into the buffer.
    let len = unsafe { libc::klogctl(3, buffer.as_mut_ptr().cast(), buffer.len() as i32) };
    buffer.truncate(len.max(0) as usize);
    String::from_utf8_lossy(&buffer).into_owned()
}

fn print_kernel_log() {
    say("kernel log:");
    for line in kernel_log().lines() {
        out(&format!("  {line}"));
    }
}

/// Gives this process access to I/O ports `first..first + count`.
fn allow_ports(first: u16, count: u16) -> Result<(), String> {
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    match unsafe { libc::ioperm(first.into(), count.into(), 1) } {
        0 => Ok(()),
        _ => Err(format!("ioperm({first:#x}, {count}): {}", errno())),
    }
}

/// # Safety
/// The process must have access to `port` (`allow_ports`), or the write
/// faults and kills PID 1.
unsafe fn outb(port: u16, value: u8) {
    // SAFETY: the caller granted access to the port.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

/// # Safety
/// As for [`outb`].
unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: the caller granted access to the port.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    };
    value
}

fn write_exit_port(status: u8) -> Result<(), String> {
    allow_ports(hv_abi::EXIT_PORT, 1)?;
    // SAFETY: access granted just above.
    unsafe { outb(hv_abi::EXIT_PORT, status) };
    Ok(())
}

/// The i8042's "pulse reset line" command, once its input buffer is empty.
fn i8042_reset() -> Result<(), String> {
    const STATUS: u16 = 0x64;
    const INPUT_FULL: u8 = 1 << 1;
    allow_ports(STATUS, 1)?;
    for _ in 0..100_000 {
        // SAFETY: access granted just above.
        if unsafe { inb(STATUS) } & INPUT_FULL == 0 {
            break;
        }
    }
    // SAFETY: access granted just above.
    unsafe { outb(STATUS, 0xfe) };
    Ok(())
}

fn reboot(command: libc::c_int) -> String {
    // SAFETY: ends the machine or fails with an error; no memory is passed.
    unsafe { libc::reboot(command) };
    errno().to_string()
}

/// Waits until the console has sent what was written to it (the tty's
/// buffer and the UART's transmitter are empty), for at most a second, so
/// the last lines are not lost when the machine ends. Polled, not
/// tcdrain(): that sleeps on transmit interrupts, and must not hang the run
/// when they are what is broken.
fn drain_console() {
    spin_until(Duration::from_secs(1), || {
        let (mut queued, mut lsr): (libc::c_int, libc::c_int) = (0, 0);
        // SAFETY: both requests write one int through the pointer given.
        let (q, l) = unsafe {
            (
                libc::ioctl(1, libc::TIOCOUTQ, &mut queued),
                libc::ioctl(1, libc::TIOCSERGETLSR, &mut lsr),
            )
        };
        // Not a serial port (the requests fail): nothing to wait for.
        q != 0 || (queued == 0 && (l != 0 || lsr & TIOCSER_TEMT != 0))
    });
}

/// TIOCSERGETLSR's bit: the UART's transmitter is empty.
const TIOCSER_TEMT: libc::c_int = 1;

/// Ends the run. The chosen path first; when it returns (nothing there to
/// end the run), the fallbacks: reset -> reboot -> power-off, port -> power-off.
fn finish(exit: ExitPath, ours: bool, status: u8) -> ! {
    let path = match exit {
        ExitPath::Auto if ours => ExitPath::Port,
        ExitPath::Auto => ExitPath::PowerOff,
        path => path,
    };
    let settle = || {
        busy_wait(Duration::from_millis(200));
    };
    let say = |line: &str| {
        say(line);
        drain_console();
    };
    if path == ExitPath::Port {
        say(&format!(
            "exit via port {:#x} status {status}",
            hv_abi::EXIT_PORT
        ));
        match write_exit_port(status) {
            Ok(()) => settle(),
            Err(why) => say(&why),
        }
    }
    if path == ExitPath::Reset {
        say(&format!("exit via reset status {status}"));
        match i8042_reset() {
            Ok(()) => settle(),
            Err(why) => say(&why),
        }
    }
    if matches!(path, ExitPath::Reset | ExitPath::Reboot) {
        say(&format!("exit via reboot status {status}"));
        say(&format!("reboot: {}", reboot(libc::RB_AUTOBOOT)));
    }
    say(&format!("exit via poweroff status {status}"));
    // SAFETY: no arguments; flushes nothing that matters but is harmless.
    unsafe { libc::sync() };
    say(&format!("poweroff: {}", reboot(libc::RB_POWER_OFF)));
    say("no exit path worked; halting");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// The probe check (`hvtest.probe=N`, see `hv_linux_init::probe`): calls
/// a kernel function a tool outside the guest watches, and reads its code.
fn probe_check(params: &Params) -> Outcome {
    const NAME: &str = "probe";
    match probe_run(params.probe_calls) {
        Ok(Ok(what)) => Outcome::pass(NAME, what),
        Ok(Err(why)) | Err(why) => Outcome::fail(NAME, why),
    }
}

fn probe_run(calls: u64) -> Result<Result<String, String>, String> {
    let kallsyms = read("/proc/kallsyms")?;
    let address = probes::kallsyms_address(&kallsyms, FUNCTION)
        .ok_or_else(|| format!("{FUNCTION} is not in /proc/kallsyms"))?;
    // Keep the mailbox where the tool finds it: locked, never migrated.
    let _ = fs::write("/proc/sys/vm/compact_unevictable_allowed", "0");
    let mailbox = Mailbox::new()?;
    say(&format!(
        "probe: mailbox={:#x} function={FUNCTION} address={address:#x} calls={calls}",
        mailbox.gpa
    ));
    mailbox.set(probes::WORD_STATE, probes::WAITING);
    mailbox.set(probes::WORD_MAGIC, probes::MAGIC);
    mailbox.wait_for(probes::GO, "the tool never armed its breakpoint")?;
    let mut wrong = 0;
    for i in 0..calls {
        // SAFETY: getppid has no arguments and cannot fail.
        let parent = unsafe { libc::syscall(libc::SYS_getppid) };
        if parent != 0 {
            wrong += 1;
        }
        mailbox.set(probes::WORD_CALLS, i + 1);
    }
    let before = kcore_read(address, 8)?;
    let first = u64::from_le_bytes(before.as_slice().try_into().unwrap_or_default());
    mailbox.set(probes::WORD_BYTES, first);
    mailbox.set(probes::WORD_STATE, probes::CALLED);
    say(&format!(
        "probe: {calls} calls made, the tool may remove its breakpoint"
    ));
    mailbox.wait_for(probes::FINISH, "the tool never removed its breakpoint")?;
    let after = kcore_read(address, 8)?;
    // SAFETY: as above.
    if unsafe { libc::syscall(libc::SYS_getppid) } != 0 {
        wrong += 1;
    }
    mailbox.set(probes::WORD_STATE, probes::FINISHED);
    Ok(probes::verdict(calls, wrong, &before, &after))
}

/// `len` bytes of kernel memory at `address`, through /proc/kcore.
fn kcore_read(address: u64, len: usize) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::FileExt;
    let kcore = fs::File::open("/proc/kcore").map_err(|e| format!("/proc/kcore: {e}"))?;
    let mut header = vec![0u8; 64 * 1024];
    let n = kcore
        .read_at(&mut header, 0)
        .map_err(|e| format!("/proc/kcore: {e}"))?;
    let offset = probes::kcore_offset(&header[..n], address)
        .ok_or_else(|| format!("{address:#x} is in no segment of /proc/kcore"))?;
    let mut bytes = vec![0u8; len];
    kcore
        .read_exact_at(&mut bytes, offset)
        .map_err(|e| format!("/proc/kcore at {offset:#x}: {e}"))?;
    Ok(bytes)
}

/// A locked page of init's memory whose guest-physical address a tool
/// outside the guest writes to.
struct Mailbox {
    words: *mut u64,
    gpa: u64,
}

impl Mailbox {
    fn new() -> Result<Self, String> {
        // SAFETY: an anonymous private mapping of one page, nothing aliased.
        let page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_LOCKED | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if page == libc::MAP_FAILED {
            return Err(format!("mmap: {}", errno()));
        }
        let words = page.cast::<u64>();
        // SAFETY: the page is ours, mapped and writable; touching it makes it resident.
        unsafe { std::ptr::write_bytes(words, 0, 512) };
        let pagemap = fs::File::open("/proc/self/pagemap").map_err(|e| format!("pagemap: {e}"))?;
        let mut entry = [0u8; 8];
        use std::os::unix::fs::FileExt;
        pagemap
            .read_exact_at(&mut entry, page as u64 / 4096 * 8)
            .map_err(|e| format!("pagemap: {e}"))?;
        let entry = u64::from_le_bytes(entry);
        let pfn = entry & ((1 << 55) - 1);
        if entry & 1 << 63 == 0 || pfn == 0 {
            return Err(format!("pagemap gives no frame ({entry:#x}): not root?"));
        }
        Ok(Self {
            words,
            gpa: pfn * 4096,
        })
    }

    fn get(&self, word: usize) -> u64 {
        // SAFETY: `word` < 512, inside the mapped page; the tool writes it
        // from outside, hence volatile.
        unsafe { std::ptr::read_volatile(self.words.add(word)) }
    }

    fn set(&self, word: usize, value: u64) {
        // SAFETY: as for `get`.
        unsafe { std::ptr::write_volatile(self.words.add(word), value) }
    }

    /// Waits (about 20 minutes of the guest's time at most) until the tool
    /// writes `value` into its word.
    fn wait_for(&self, value: u64, why: &str) -> Result<(), String> {
        let start = Instant::now();
        while self.get(probes::WORD_TOOL) != value {
            if start.elapsed() > Duration::from_secs(1200) {
                return Err(why.to_owned());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}
