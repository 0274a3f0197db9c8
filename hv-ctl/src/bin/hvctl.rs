//! `hvctl`: drives the hypervisor's control channel from the command line
//! (docs/control.md). Every command of the protocol is a subcommand;
//! `watch` prints events as JSON lines; `dump` writes guest memory images.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use hv_control::{ALL_VCPUS, AccessEntry, Answer, Range, Registers, class, feature, gpr, seg};
use hv_ctl::{Client, Transport, access_name, dump, json, parse_access, transport};

#[derive(Parser)]
#[command(
    name = "hvctl",
    about = "Drives the hypervisor's control channel (docs/control.md)",
    after_help = "CONNECT is a unix socket (what `scripts/run --control` prints), a serial device \
                  or pty, or HOST:PORT; prefixes unix:, serial:, tcp: force one. The environment \
                  variable HVCTL_CONNECT is used when --connect is absent."
)]
struct Cli {
    /// The control channel.
    #[arg(long, short, env = "HVCTL_CONNECT")]
    connect: String,
    /// Seconds a reply may take.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// The hypervisor ends the session (releasing held vCPUs) after this
    /// many milliseconds without a frame from hvctl (0: never).
    #[arg(long, default_value_t = 0)]
    liveness_ms: u32,
    #[command(subcommand)]
    command: Cmd,
}

/// A number in decimal or 0x hex.
fn num(text: &str) -> Result<u64, String> {
    let t = text.replace('_', "");
    match t.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    }
    .map_err(|e| format!("'{text}': {e}"))
}

fn num16(text: &str) -> Result<u16, String> {
    u16::try_from(num(text)?).map_err(|_| format!("'{text}' is over 65535"))
}

fn num32(text: &str) -> Result<u32, String> {
    u32::try_from(num(text)?).map_err(|_| format!("'{text}' is over 2^32 - 1"))
}

fn access(text: &str) -> Result<u8, String> {
    parse_access(text)
        .ok_or_else(|| format!("'{text}': not one of n r w rw x rx wx rwx rx2rw n2rwx"))
}

fn on_off(text: &str) -> Result<bool, String> {
    match text {
        "on" | "1" | "true" => Ok(true),
        "off" | "0" | "false" => Ok(false),
        _ => Err(format!("'{text}': on or off")),
    }
}

/// A gfn, or `invalid` (`hv_abi::INVALID_GFN`, reverts a remap).
fn gfn_or_invalid(text: &str) -> Result<u64, String> {
    if text == "invalid" {
        Ok(hv_abi::INVALID_GFN)
    } else {
        num(text)
    }
}

/// `GFN=ACCESS`.
fn access_entry(text: &str) -> Result<AccessEntry, String> {
    let (gfn, a) = text
        .split_once('=')
        .ok_or_else(|| format!("'{text}': GFN=ACCESS"))?;
    Ok(AccessEntry {
        gfn: num(gfn)?,
        access: access(a)?,
    })
}

/// Event classes: `mem,bp,cr3,ve`, `all` or `none`.
fn classes(text: &str) -> Result<u32, String> {
    text.split(',')
        .filter(|w| !w.is_empty())
        .try_fold(0, |acc, word| {
            Ok(acc
                | match word {
                    "mem" | "mem-access" => class::MEM_ACCESS,
                    "bp" | "breakpoint" => class::BREAKPOINT,
                    "cr3" => class::CR3_WRITE,
                    "ve" => class::VE,
                    "all" => class::ALL,
                    "none" => 0,
                    _ => return Err(format!("'{word}': one of mem bp cr3 ve all none")),
                })
        })
}

#[derive(Subcommand)]
enum Cmd {
    /// Session and capabilities (what hello agreed, what the hypervisor offers).
    Info,
    /// Round-trip time of a few pings.
    Ping {
        #[arg(default_value_t = 5)]
        count: u32,
    },
    /// The guest's RAM ranges.
    MemoryMap,
    /// Which event classes are reported: mem,bp,cr3,ve | all | none. A
    /// session's end turns them off again, so this shows what the
    /// hypervisor accepts; `watch --events` keeps them on while it watches.
    Events {
        #[arg(value_parser = classes)]
        classes: u32,
    },
    /// Pauses a vCPU (default: all).
    Pause {
        #[arg(long, value_parser = num16)]
        vcpu: Option<u16>,
    },
    /// Resumes a vCPU (default: all).
    Resume {
        #[arg(long, value_parser = num16)]
        vcpu: Option<u16>,
    },
    /// Prints a vCPU's registers; with NAME=VALUE words, changes those
    /// (get, modify, set): rax..r15, rip, rflags, cr0, cr2, cr3, cr4, dr7,
    /// efer, fs_base, gs_base, kernel_gs_base.
    Regs {
        #[arg(long, default_value = "0", value_parser = num16)]
        vcpu: u16,
        set: Vec<String>,
    },
    /// Translates a guest-virtual address with the guest's page tables.
    Translate {
        #[arg(value_parser = num)]
        gva: u64,
        #[arg(long, default_value = "0", value_parser = num16)]
        vcpu: u16,
        /// Page tables to use (default: the vCPU's CR3).
        #[arg(long, default_value = "0", value_parser = num)]
        cr3: u64,
    },
    /// Reads guest-physical memory: hex dump, or raw bytes to --out.
    Read {
        #[arg(value_parser = num)]
        gpa: u64,
        #[arg(value_parser = num)]
        len: u64,
        #[arg(long)]
        out: Option<String>,
    },
    /// Writes guest-physical memory from --hex or --file.
    Write {
        #[arg(value_parser = num)]
        gpa: u64,
        #[arg(long, conflicts_with = "file")]
        hex: Option<String>,
        #[arg(long)]
        file: Option<String>,
    },
    /// altp2m: on, off, or (no argument) the state.
    Altp2m {
        #[arg(value_parser = on_off)]
        state: Option<bool>,
    },
    /// #VE notification for a vCPU: the information page's gfn, or `off`.
    Notify {
        #[arg(long, default_value = "0", value_parser = num16)]
        vcpu: u16,
        gfn: String,
    },
    /// Creates a view with a default access; prints its index.
    CreateView {
        #[arg(default_value = "rwx", value_parser = access)]
        default_access: u8,
    },
    DestroyView {
        #[arg(value_parser = num16)]
        view: u16,
    },
    /// Switches every vCPU (or --vcpu) to a view.
    SwitchView {
        #[arg(value_parser = num16)]
        view: u16,
        #[arg(long, value_parser = num16)]
        vcpu: Option<u16>,
    },
    /// The view a vCPU runs on.
    GetView {
        #[arg(long, default_value = "0", value_parser = num16)]
        vcpu: u16,
    },
    /// Sets a page's access in a view.
    SetAccess {
        #[arg(value_parser = num16)]
        view: u16,
        #[arg(value_parser = num)]
        gfn: u64,
        #[arg(value_parser = access)]
        access: u8,
    },
    /// Sets many pages' access: GFN=ACCESS words.
    SetAccessMulti {
        #[arg(value_parser = num16)]
        view: u16,
        #[arg(value_parser = access_entry, required = true)]
        entries: Vec<AccessEntry>,
    },
    GetAccess {
        #[arg(value_parser = num16)]
        view: u16,
        #[arg(value_parser = num)]
        gfn: u64,
    },
    /// Shows NEW's frame at OLD in a view (NEW `invalid` reverts).
    ChangeGfn {
        #[arg(value_parser = num16)]
        view: u16,
        #[arg(value_parser = num)]
        old: u64,
        #[arg(value_parser = gfn_or_invalid)]
        new: u64,
    },
    /// Suppress-#VE of a page (or --last for a range of at most 512).
    SuppressVe {
        #[arg(value_parser = num16)]
        view: u16,
        #[arg(value_parser = num)]
        gfn: u64,
        #[arg(value_parser = on_off)]
        suppress: bool,
        #[arg(long, value_parser = num)]
        last: Option<u64>,
    },
    GetSuppressVe {
        #[arg(value_parser = num16)]
        view: u16,
        #[arg(value_parser = num)]
        gfn: u64,
    },
    /// Whether VMFUNC may switch to a view.
    Visibility {
        #[arg(value_parser = num16)]
        view: u16,
        #[arg(value_parser = on_off)]
        visible: bool,
    },
    /// Log-dirty: start, fetch (prints dirty gfns) or stop, for PAGES from FIRST.
    Logdirty {
        #[arg(value_parser = ["start", "fetch", "stop"])]
        action: String,
        #[arg(value_parser = num)]
        first: u64,
        #[arg(value_parser = num32)]
        pages: u32,
    },
    /// A hypervisor page outside the guest's memory map, for shadow copies.
    ShadowAlloc,
    ShadowFree {
        #[arg(value_parser = num)]
        gfn: u64,
    },
    /// Prints events as JSON lines.
    Watch {
        /// Event classes to turn on first (mem,bp,cr3,ve | all).
        #[arg(long, value_parser = classes)]
        events: Option<u32>,
        /// Answer each event with continue.
        #[arg(long)]
        auto_continue: bool,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long)]
        seconds: Option<f64>,
    },
    /// Writes the guest's RAM (paused meanwhile) as a raw image and/or LiME.
    Dump {
        #[arg(long)]
        raw: Option<String>,
        #[arg(long)]
        lime: Option<String>,
        /// Only this part: START:LEN (clipped to the memory map).
        #[arg(long)]
        range: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("hvctl: {why}");
            ExitCode::FAILURE
        }
    }
}

type Res = Result<(), Box<dyn std::error::Error>>;

fn run(cli: Cli) -> Res {
    let transport = transport::open(&cli.connect)
        .map_err(|e| format!("cannot open the control channel {}: {e}", cli.connect))?;
    let timeout = Duration::from_secs_f64(cli.timeout);
    let mut c = Client::connect_with(transport, cli.liveness_ms, timeout)?;
    command(&mut c, cli.command)?;
    c.bye()?;
    Ok(())
}

fn all_or(vcpu: Option<u16>) -> u16 {
    vcpu.unwrap_or(ALL_VCPUS)
}

fn command<T: Transport>(c: &mut Client<T>, cmd: Cmd) -> Res {
    match cmd {
        Cmd::Info => {
            let caps = c.capabilities()?;
            let features: Vec<&str> = [
                (feature::VMFUNC, "vmfunc"),
                (feature::VE, "ve"),
                (feature::MTF, "mtf"),
                (feature::PML, "pml"),
                (feature::SHADOW_PAGES, "shadow-pages"),
            ]
            .iter()
            .filter(|(bit, _)| caps.features & bit != 0)
            .map(|&(_, name)| name)
            .collect();
            println!(
                "protocol version {}, max payload {}",
                c.session.version, c.session.max_payload
            );
            println!("hypercall interface version {}", caps.hv_version);
            println!(
                "vcpus {}, max views {}, guest RAM {} MiB",
                caps.vcpus,
                caps.max_views,
                caps.ram_bytes >> 20
            );
            println!(
                "altp2m mode {}",
                ["external", "mixed", "limited"]
                    .get(usize::from(caps.altp2m_mode))
                    .unwrap_or(&"unknown")
            );
            println!("features: {}", features.join(" "));
            println!("event classes: {:#x}", caps.events);
        }
        Cmd::Ping { count } => {
            for i in 0..count {
                let started = Instant::now();
                let nonce = u64::from(i) ^ 0x5a5a_0000;
                let back = c.ping(nonce)?;
                if back != nonce {
                    return Err(
                        format!("ping {i}: nonce {back:#x} came back for {nonce:#x}").into(),
                    );
                }
                println!("ping {i}: {:.2} ms", started.elapsed().as_secs_f64() * 1e3);
            }
        }
        Cmd::MemoryMap => {
            for r in c.memory_map()? {
                println!(
                    "{:#x}..{:#x} ({} KiB)",
                    r.start,
                    r.start + r.len,
                    r.len >> 10
                );
            }
        }
        Cmd::Events { classes } => println!("reported: {:#x}", c.set_events(classes)?),
        Cmd::Pause { vcpu } => c.pause(all_or(vcpu))?,
        Cmd::Resume { vcpu } => c.resume(all_or(vcpu))?,
        Cmd::Regs { vcpu, set } => {
            let mut regs = c.registers(vcpu)?;
            if !set.is_empty() {
                for word in &set {
                    assign(&mut regs, word)?;
                }
                c.set_registers(vcpu, regs)?;
                regs = c.registers(vcpu)?;
            }
            print_registers(&regs);
        }
        Cmd::Translate { gva, vcpu, cr3 } => {
            let t = c.translate(vcpu, cr3, gva)?;
            println!(
                "{gva:#x} -> {:#x} (page {} KiB, paging mode {}, perms {:#x})",
                t.gpa,
                (1u64 << t.page_shift.min(63)) >> 10,
                t.paging,
                t.perms
            );
        }
        Cmd::Read { gpa, len, out } => {
            let bytes = c.read_memory(gpa, usize::try_from(len)?)?;
            match out {
                Some(path) => std::fs::write(&path, &bytes)?,
                None => hexdump(gpa, &bytes),
            }
        }
        Cmd::Write { gpa, hex, file } => {
            let data = match (hex, file) {
                (Some(hex), _) => parse_hex(&hex)?,
                (None, Some(file)) => std::fs::read(file)?,
                (None, None) => return Err("give --hex or --file".into()),
            };
            c.write_memory(gpa, &data)?;
        }
        Cmd::Altp2m { state: None } => println!("{}", if c.altp2m_state()? { "on" } else { "off" }),
        Cmd::Altp2m { state: Some(on) } => c.set_altp2m_state(on)?,
        Cmd::Notify { vcpu, gfn } if gfn == "off" => c.disable_notify(vcpu)?,
        Cmd::Notify { vcpu, gfn } => c.enable_notify(vcpu, num(&gfn)?)?,
        Cmd::CreateView { default_access } => println!("{}", c.create_view(default_access)?),
        Cmd::DestroyView { view } => c.destroy_view(view)?,
        Cmd::SwitchView { view, vcpu: None } => c.switch_view(view)?,
        Cmd::SwitchView {
            view,
            vcpu: Some(vcpu),
        } => c.switch_vcpu_view(vcpu, view)?,
        Cmd::GetView { vcpu } => println!("{}", c.vcpu_view(vcpu)?),
        Cmd::SetAccess { view, gfn, access } => c.set_mem_access(view, gfn, access)?,
        Cmd::SetAccessMulti { view, entries } => {
            let applied = c.set_mem_access_multi(view, &entries)?;
            println!("applied {applied} of {}", entries.len());
        }
        Cmd::GetAccess { view, gfn } => println!("{}", access_name(c.mem_access(view, gfn)?)),
        Cmd::ChangeGfn { view, old, new } => c.change_gfn(view, old, new)?,
        Cmd::SuppressVe {
            view,
            gfn,
            suppress,
            last: None,
        } => c.set_suppress_ve(view, gfn, suppress)?,
        Cmd::SuppressVe {
            view,
            gfn,
            suppress,
            last: Some(last),
        } => {
            println!(
                "applied {}",
                c.set_suppress_ve_multi(view, gfn, last, suppress)?
            );
        }
        Cmd::GetSuppressVe { view, gfn } => println!(
            "{}",
            if c.suppress_ve(view, gfn)? {
                "on"
            } else {
                "off"
            }
        ),
        Cmd::Visibility { view, visible } => c.set_visibility(view, visible)?,
        Cmd::Logdirty {
            action,
            first,
            pages,
        } => match action.as_str() {
            "start" => c.logdirty_start(first, pages)?,
            "stop" => c.logdirty_stop(first, pages)?,
            _ => {
                let (dirty, bitmap) = c.logdirty_fetch(first, pages)?;
                println!("{dirty} dirty");
                for i in 0..u64::from(pages) {
                    if bitmap
                        .get((i / 8) as usize)
                        .is_some_and(|b| b & (1 << (i % 8)) != 0)
                    {
                        println!("{:#x}", first + i);
                    }
                }
            }
        },
        Cmd::ShadowAlloc => println!("{:#x}", c.alloc_shadow_page()?),
        Cmd::ShadowFree { gfn } => c.free_shadow_page(gfn)?,
        Cmd::Watch {
            events,
            auto_continue,
            count,
            seconds,
        } => watch(c, events, auto_continue, count, seconds)?,
        Cmd::Dump { raw, lime, range } => dump_to(c, raw, lime, range)?,
    }
    Ok(())
}

fn watch<T: Transport>(
    c: &mut Client<T>,
    events: Option<u32>,
    auto_continue: bool,
    count: Option<u64>,
    seconds: Option<f64>,
) -> Res {
    if let Some(classes) = events {
        let on = c.set_events(classes)?;
        eprintln!("hvctl: reporting event classes {on:#x}");
    }
    let deadline = seconds.map(|s| Instant::now() + Duration::from_secs_f64(s));
    let mut seen = 0u64;
    let mut out = std::io::stdout().lock();
    while count.is_none_or(|n| seen < n) {
        let left = match deadline {
            Some(d) if Instant::now() >= d => break,
            Some(d) => d - Instant::now(),
            None => Duration::from_secs(1),
        };
        let Some(record) = c.next_event(left.min(Duration::from_secs(1)))? else {
            continue;
        };
        writeln!(out, "{}", json::event(&record))?;
        out.flush()?;
        seen += 1;
        if auto_continue {
            c.answer(&record, Answer::CONTINUE)?;
        }
    }
    Ok(())
}

fn dump_to<T: Transport>(
    c: &mut Client<T>,
    raw: Option<String>,
    lime: Option<String>,
    range: Option<String>,
) -> Res {
    if raw.is_none() && lime.is_none() {
        return Err("give --raw FILE and/or --lime FILE".into());
    }
    let only = match range {
        Some(text) => {
            let (start, len) = text.split_once(':').ok_or("--range START:LEN")?;
            Some(Range {
                start: num(start)?,
                len: num(len)?,
            })
        }
        None => None,
    };
    let mut raw_file = raw.as_deref().map(File::create).transpose()?;
    let mut lime_file = lime
        .as_deref()
        .map(File::create)
        .transpose()?
        .map(BufWriter::new);
    let started = Instant::now();
    let mut last_report = Instant::now();
    let done = dump::dump(
        c,
        only,
        dump::Sinks {
            raw: raw_file.as_mut().map(|f| f as &mut dyn dump::WriteSeek),
            lime: lime_file.as_mut().map(|f| f as &mut dyn Write),
        },
        |done, total| {
            if last_report.elapsed() >= Duration::from_secs(2) || done == total {
                last_report = Instant::now();
                let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-3);
                eprintln!(
                    "hvctl: dump {} of {} KiB ({:.0} B/s)",
                    done >> 10,
                    total >> 10,
                    rate
                );
            }
        },
    )?;
    if let Some(f) = raw_file {
        f.set_len(
            done.ranges
                .iter()
                .map(|r| r.start + r.len)
                .max()
                .unwrap_or(0),
        )?;
    }
    eprintln!(
        "hvctl: dumped {} bytes in {} ranges in {:.1} s",
        done.bytes,
        done.ranges.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Sets one register from `NAME=VALUE`.
fn assign(regs: &mut Registers, word: &str) -> Res {
    let (name, value) = word
        .split_once('=')
        .ok_or_else(|| format!("'{word}': NAME=VALUE"))?;
    let value = num(value)?;
    if let Some(i) = gpr::NAMES.iter().position(|&n| n == name) {
        regs.gprs[i] = value;
        return Ok(());
    }
    let slot = match name {
        "rip" => &mut regs.rip,
        "rflags" => &mut regs.rflags,
        "cr0" => &mut regs.cr0,
        "cr2" => &mut regs.cr2,
        "cr3" => &mut regs.cr3,
        "cr4" => &mut regs.cr4,
        "dr7" => &mut regs.dr7,
        "efer" => &mut regs.efer,
        "fs_base" => &mut regs.segments[seg::FS].base,
        "gs_base" => &mut regs.segments[seg::GS].base,
        "kernel_gs_base" => &mut regs.kernel_gs_base,
        _ => return Err(format!("no register '{name}'").into()),
    };
    *slot = value;
    Ok(())
}

fn print_registers(r: &Registers) {
    for (i, name) in gpr::NAMES.iter().enumerate() {
        print!(
            "{name:>6} {:#018x}{}",
            r.gprs[i],
            if i % 4 == 3 { "\n" } else { "  " }
        );
    }
    println!("   rip {:#018x}  rflags {:#018x}", r.rip, r.rflags);
    println!(
        "   cr0 {:#018x}     cr2 {:#018x}     cr3 {:#018x}     cr4 {:#018x}",
        r.cr0, r.cr2, r.cr3, r.cr4
    );
    println!(
        "  efer {:#018x}     dr7 {:#018x}  kgsbase {:#018x}",
        r.efer, r.dr7, r.kernel_gs_base
    );
    println!(
        "  gdtr {:#018x}/{:#06x}  idtr {:#018x}/{:#06x}",
        r.gdtr_base, r.gdtr_limit, r.idtr_base, r.idtr_limit
    );
    for (i, name) in seg::NAMES.iter().enumerate() {
        let s = &r.segments[i];
        println!(
            "    {name} {:#06x} base {:#018x} limit {:#010x} access {:#06x}",
            s.selector, s.base, s.limit, s.access
        );
    }
}

fn hexdump(gpa: u64, bytes: &[u8]) {
    for (i, line) in bytes.chunks(16).enumerate() {
        let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
        let text: String = line
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        println!(
            "{:#012x}  {:<47}  {text}",
            gpa + 16 * i as u64,
            hex.join(" ")
        );
    }
}

fn parse_hex(text: &str) -> Result<Vec<u8>, String> {
    let clean: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    if !clean.len().is_multiple_of(2) {
        return Err("--hex needs an even number of digits".into());
    }
    (0..clean.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&clean[i..i + 2], 16).map_err(|e| format!("--hex: {e}")))
        .collect()
}
