//! The tool's commands, run under the VM lock on whichever CPU serves the
//! line. Arguments were checked for shape and bounds by `hv_control`;
//! here they are checked against the VM (vCPUs, views, RAM) as the
//! hypercalls check them, with the same errors.

use alloc::vec::Vec;

use hv_control::{
    ALL_VCPUS, Capabilities, Command, ErrorCode, List, MAX_PAYLOAD, Message, PAGE_SIZE, Range,
    ReplyBody, Translation, VERSION, class, feature, mode,
};
use hv_ept::{Gfn, Order, P2mAccess, P2mType};

use super::{Control, MAX_SHADOW_PAGES, Session, registers};
use crate::abi::Altp2mMode;
use crate::loader::MemoryKind;
use crate::operations::{self, Altp2mOp, FETCH_MAX, p2m_access};
use crate::platform::{Kick, Platform};
use crate::vcpu::paging::{self, PagingRegs};
use crate::views;
use crate::vm::Vm;
use crate::vmx::Cpu;

/// What became of a command.
pub enum Outcome {
    /// Its reply is in the transmit buffer: this many bytes.
    Sent(usize),
    /// Its reply comes later (a `PAUSE` waiting for its vCPUs).
    Later,
    /// It failed: an error reply.
    Failed(ErrorCode),
}

/// The event classes this VM can report.
fn supported_classes(vm: &Vm) -> u32 {
    let ve = if vm.features.ve { class::VE } else { 0 };
    class::MEM_ACCESS | class::BREAKPOINT | class::CR3_WRITE | ve
}

/// A hypercall error as the protocol's.
fn hv_error(e: i64) -> ErrorCode {
    ErrorCode::from_hypercall(e).unwrap_or(ErrorCode::Inval)
}

/// Whether `vcpu` (or every vCPU, for [`ALL_VCPUS`]) is stopped or parked.
pub fn paused(vm: &Vm, vcpu: u16) -> bool {
    targets(vm, vcpu)
        .is_ok_and(|mut t| t.all(|v| vm.control.vcpus[v].stopped || vm.coherence.parked(v)))
}

/// The vCPUs a `vcpu` argument names.
fn targets(vm: &Vm, vcpu: u16) -> Result<core::ops::Range<usize>, ErrorCode> {
    let n = vm.vcpus();
    let range = if vcpu == ALL_VCPUS {
        0..n
    } else if usize::from(vcpu) < n {
        usize::from(vcpu)..usize::from(vcpu) + 1
    } else {
        return Err(ErrorCode::NoEnt);
    };
    Ok(range)
}

/// One vCPU by its argument.
fn one(vm: &Vm, vcpu: u16) -> Result<usize, ErrorCode> {
    let v = usize::from(vcpu);
    if v < vm.vcpus() {
        Ok(v)
    } else {
        Err(ErrorCode::NoEnt)
    }
}

/// Makes every vCPU write its VMCS fields that follow the views and the
/// event classes again before it next enters (kicking those in the guest).
fn reapply_all(vm: &Vm, platform: &mut impl Platform) {
    for v in 0..vm.vcpus() {
        vm.coherence
            .request_reapply(v, |v| platform.kick(v, Kick::Nmi));
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "the server's context, passed through"
)]
pub fn run<C: Cpu, P: Platform>(
    vm: &mut Vm,
    cpu: &mut C,
    platform: &mut P,
    caller: usize,
    seq: u32,
    command: Command<'_>,
    now: u64,
    tx: &mut [u8],
) -> Outcome {
    let id = command.id();
    let result = match command {
        Command::Hello {
            version,
            liveness_ms,
        } => hello(&mut vm.control, version, liveness_ms, now),
        _ if vm.control.session.is_none() => Err(ErrorCode::NoSession),
        _ => execute(vm, cpu, platform, caller, seq, command),
    };
    match result {
        Ok(Some(built)) => built.encode(vm, tx, id, seq),
        Ok(None) => Outcome::Later,
        Err(e) => Outcome::Failed(e),
    }
}

/// Opens a session (ending the one before, if any).
fn hello(control: &mut Control, version: u16, liveness_ms: u32, now: u64) -> Executed {
    if version != u16::from(VERSION) {
        return Err(ErrorCode::BadVersion);
    }
    if control.end_session() {
        log::info!("control: a new HELLO ended the previous session");
    }
    control.session = Some(Session {
        liveness_tsc: control.ms_to_tsc(u64::from(liveness_ms)),
        last_heard: now,
    });
    log::info!("control: session opened (liveness {liveness_ms} ms)");
    body(Built::Hello)
}

/// A successful command's reply body, by value (memory and bitmaps in
/// arrays: the server's path takes nothing from the heap).
enum Built {
    Done,
    Hello,
    Pong(u64),
    Capabilities(Capabilities),
    MemoryMap,
    Events(u32),
    Registers(usize),
    Translation(Translation),
    Memory {
        page: [u8; PAGE_SIZE],
        len: usize,
    },
    Gfn(u64),
    Flag(bool),
    View(u16),
    Access(u8),
    Applied(u32),
    Dirty {
        dirty: u32,
        bitmap: [u8; (FETCH_MAX / 8) as usize],
        bytes: usize,
    },
}

impl Built {
    fn encode(self, vm: &Vm, tx: &mut [u8], id: u16, seq: u32) -> Outcome {
        let mut ranges = heapless::Vec::<Range, { hv_control::MAX_RANGES }>::new();
        let body = match &self {
            Self::Done => ReplyBody::Done,
            Self::Hello => ReplyBody::Hello {
                version: u16::from(VERSION),
                max_payload: MAX_PAYLOAD as u32,
            },
            Self::Pong(nonce) => ReplyBody::Pong { nonce: *nonce },
            Self::Capabilities(c) => ReplyBody::Capabilities(*c),
            Self::MemoryMap => {
                for r in vm.memory_map.iter().filter(|r| r.kind == MemoryKind::Ram) {
                    if ranges
                        .push(Range {
                            start: r.start,
                            len: r.end - r.start,
                        })
                        .is_err()
                    {
                        break;
                    }
                }
                ReplyBody::MemoryMap(List::Items(&ranges))
            }
            Self::Events(classes) => ReplyBody::Events { classes: *classes },
            Self::Registers(v) => ReplyBody::Registers(vm.control.vcpus[*v].registers),
            Self::Translation(t) => ReplyBody::Translation(*t),
            Self::Memory { page, len } => ReplyBody::Memory(&page[..*len]),
            Self::Gfn(gfn) => ReplyBody::Gfn(*gfn),
            Self::Flag(flag) => ReplyBody::Flag(*flag),
            Self::View(view) => ReplyBody::View(*view),
            Self::Access(access) => ReplyBody::Access(*access),
            Self::Applied(n) => ReplyBody::Applied(*n),
            Self::Dirty {
                dirty,
                bitmap,
                bytes,
            } => ReplyBody::Dirty {
                dirty: *dirty,
                bitmap: &bitmap[..*bytes],
            },
        };
        let message = Message::Reply {
            id,
            seq,
            reply: Ok(body),
        };
        match message.encode(tx) {
            Ok(n) => Outcome::Sent(n),
            // Every body fits a frame by construction; refuse rather than panic.
            Err(_) => Outcome::Failed(ErrorCode::Inval),
        }
    }
}

type Executed = Result<Option<Built>, ErrorCode>;

fn done() -> Executed {
    Ok(Some(Built::Done))
}

fn body(built: Built) -> Executed {
    Ok(Some(built))
}

fn execute<C: Cpu, P: Platform>(
    vm: &mut Vm,
    cpu: &mut C,
    platform: &mut P,
    caller: usize,
    seq: u32,
    command: Command<'_>,
) -> Executed {
    match command {
        // Taken by `run`.
        Command::Hello { .. } => Err(ErrorCode::Inval),
        Command::Bye => {
            vm.control.end_session();
            reapply_all(vm, platform);
            log::info!("control: session closed by the tool");
            done()
        }
        Command::Ping { nonce } => body(Built::Pong(nonce)),
        Command::Capabilities => body(Built::Capabilities(capabilities(vm))),
        Command::MemoryMap => body(Built::MemoryMap),
        Command::SetEvents { classes } => {
            if classes & !supported_classes(vm) != 0 {
                return Err(ErrorCode::NotSupported);
            }
            vm.control.classes = classes;
            reapply_all(vm, platform);
            body(Built::Events(classes))
        }
        Command::Pause { vcpu } => {
            if vm.control.pause_reply.is_some() {
                return Err(ErrorCode::TryAgain);
            }
            for v in targets(vm, vcpu)? {
                vm.control.vcpus[v].paused = true;
                vm.coherence
                    .request_reapply(v, |v| platform.kick(v, Kick::Nmi));
            }
            if paused(vm, vcpu) {
                return done();
            }
            vm.control.pause_reply = Some((seq, vcpu));
            Ok(None)
        }
        Command::Resume { vcpu } => {
            for v in targets(vm, vcpu)? {
                vm.control.vcpus[v].paused = false;
            }
            done()
        }
        Command::GetRegisters { vcpu } => {
            let v = one(vm, vcpu)?;
            if !paused(vm, vcpu) {
                return Err(ErrorCode::NotPaused);
            }
            body(Built::Registers(v))
        }
        Command::SetRegisters { vcpu, regs } => {
            let v = one(vm, vcpu)?;
            let state = &vm.control.vcpus[v];
            if !state.stopped {
                // Parked in wait-for-SIPI, the vCPU's state is the INIT state
                // the guest's SIPI replaces.
                return Err(if paused(vm, vcpu) {
                    ErrorCode::Busy
                } else {
                    ErrorCode::NotPaused
                });
            }
            registers::check(&regs, &vm.cr_fixed, vm.p2m.caps().paddr_bits)
                .map_err(|_| ErrorCode::Inval)?;
            let state = &mut vm.control.vcpus[v];
            state.registers = regs;
            state.registers_changed = true;
            done()
        }
        Command::Translate { vcpu, cr3, gva } => {
            let v = one(vm, vcpu)?;
            if !paused(vm, vcpu) {
                return Err(ErrorCode::NotPaused);
            }
            let r = &vm.control.vcpus[v].registers;
            let regs = PagingRegs {
                cr0: r.cr0,
                cr3: if cr3 == 0 { r.cr3 } else { cr3 },
                cr4: r.cr4,
                efer: r.efer,
            };
            let walked = paging::walk(&regs, gva, |gpa, bytes| {
                paging::read_entry(vm, platform, gpa, bytes)
            })
            .ok_or(ErrorCode::Fault)?;
            use hv_control::perm;
            let perms = if walked.writable { perm::WRITE } else { 0 }
                | if walked.user { perm::USER } else { 0 }
                | if walked.no_execute {
                    perm::NO_EXECUTE
                } else {
                    0
                };
            body(Built::Translation(Translation {
                gpa: walked.gpa,
                page_shift: walked.page_shift,
                paging: walked.mode as u8,
                perms,
            }))
        }
        Command::ReadMemory { gpa, len } => {
            // Guest RAM and shadow pages, through the host p2m.
            let len = usize::from(len);
            let mut page = [0u8; PAGE_SIZE];
            vm.read(platform, gpa, &mut page[..len])
                .map_err(|_| ErrorCode::Fault)?;
            body(Built::Memory { page, len })
        }
        Command::WriteMemory { gpa, data } => {
            vm.write(platform, gpa, data)
                .map_err(|_| ErrorCode::Fault)?;
            done()
        }
        Command::VcpuEnableNotify { vcpu, gfn } => {
            let v = one(vm, vcpu)?;
            let gfn = Gfn(gfn);
            if vm.control.is_shadow(gfn) {
                return Err(ErrorCode::Inval);
            }
            let mfn = operations::notify_page(vm, platform, gfn).map_err(hv_error)?;
            vm.control.vcpus[v].notify = Some(Some((gfn, mfn)));
            vm.coherence
                .request_reapply(v, |v| platform.kick(v, Kick::Nmi));
            done()
        }
        Command::VcpuDisableNotify { vcpu } => {
            let v = one(vm, vcpu)?;
            operations::notify_supported(vm).map_err(hv_error)?;
            vm.control.vcpus[v].notify = Some(None);
            vm.coherence
                .request_reapply(v, |v| platform.kick(v, Kick::Nmi));
            done()
        }
        Command::SetMemAccessMulti { view, entries } => {
            let mut items = Vec::new();
            items
                .try_reserve_exact(entries.len())
                .map_err(|_| ErrorCode::NoMem)?;
            for e in entries.iter() {
                let access = p2m_access(u64::from(e.access)).ok_or(ErrorCode::Inval)?;
                items.push((Gfn(e.gfn), access));
            }
            let n = altp2m(
                vm,
                cpu,
                platform,
                caller,
                Altp2mOp::SetMemAccessMulti {
                    view,
                    items: &items,
                },
            )?;
            body(Built::Applied(n as u32))
        }
        Command::LogdirtyStart { first_gfn, pages }
        | Command::LogdirtyStop { first_gfn, pages } => {
            let on = matches!(command, Command::LogdirtyStart { .. });
            operations::logdirty_track(vm, platform, first_gfn, u64::from(pages), on)
                .map_err(hv_error)?;
            views::flush(vm, cpu, platform, caller);
            done()
        }
        Command::LogdirtyFetch { first_gfn, pages } => {
            let mut bitmap = [0u8; (FETCH_MAX / 8) as usize];
            let pages = u64::from(pages);
            let dirty = operations::logdirty_fetch(
                vm,
                cpu,
                platform,
                caller,
                first_gfn,
                pages,
                &mut bitmap,
            )
            .map_err(hv_error)?;
            body(Built::Dirty {
                dirty,
                bitmap,
                bytes: pages.div_ceil(8) as usize,
            })
        }
        Command::AllocShadowPage => {
            let gfn = alloc_shadow(vm, platform)?;
            body(Built::Gfn(gfn))
        }
        Command::FreeShadowPage { gfn } => {
            free_shadow(vm, cpu, platform, caller, Gfn(gfn))?;
            done()
        }
        other => {
            let op = altp2m_op(other)?;
            let value = altp2m(vm, cpu, platform, caller, op)?;
            match other {
                Command::Altp2mGetState | Command::GetSuppressVe { .. } => {
                    body(Built::Flag(value != 0))
                }
                Command::CreateView { .. } | Command::GetVcpuView { .. } => {
                    body(Built::View(value as u16))
                }
                Command::GetMemAccess { .. } => body(Built::Access(value as u8)),
                Command::SetSuppressVeMulti { .. } => body(Built::Applied(value as u32)),
                _ => done(),
            }
        }
    }
}

/// The altp2m operation a command mirrors.
fn altp2m_op(command: Command<'_>) -> Result<Altp2mOp<'static>, ErrorCode> {
    let access = |a: u8| p2m_access(u64::from(a)).ok_or(ErrorCode::Inval);
    Ok(match command {
        Command::Altp2mGetState => Altp2mOp::GetState,
        Command::Altp2mSetState { on } => Altp2mOp::SetState(on),
        Command::CreateView { default_access } => Altp2mOp::CreateView(access(default_access)?),
        Command::DestroyView { view } => Altp2mOp::DestroyView(view),
        Command::SwitchView { view } => Altp2mOp::SwitchView(view),
        Command::SwitchVcpuView { vcpu, view } => Altp2mOp::SwitchVcpuView {
            vcpu: usize::from(vcpu),
            view,
        },
        Command::GetVcpuView { vcpu } => Altp2mOp::GetVcpuView(usize::from(vcpu)),
        Command::SetMemAccess {
            view,
            gfn,
            access: a,
        } => Altp2mOp::SetMemAccess {
            view,
            gfn: Gfn(gfn),
            access: access(a)?,
        },
        Command::GetMemAccess { view, gfn } => Altp2mOp::GetMemAccess {
            view,
            gfn: Gfn(gfn),
        },
        Command::ChangeGfn {
            view,
            old_gfn,
            new_gfn,
        } => Altp2mOp::ChangeGfn {
            view,
            old: Gfn(old_gfn),
            new: (new_gfn != crate::abi::INVALID_GFN).then_some(Gfn(new_gfn)),
        },
        Command::SetSuppressVe {
            view,
            gfn,
            suppress,
        } => Altp2mOp::SetSuppressVe {
            view,
            gfn: Gfn(gfn),
            suppress,
        },
        Command::SetSuppressVeMulti {
            view,
            first_gfn,
            last_gfn,
            suppress,
        } => Altp2mOp::SetSuppressVeMulti {
            view,
            first: first_gfn,
            last: last_gfn,
            suppress,
        },
        Command::GetSuppressVe { view, gfn } => Altp2mOp::GetSuppressVe {
            view,
            gfn: Gfn(gfn),
        },
        Command::SetVisibility { view, visible } => Altp2mOp::SetVisibility { view, visible },
        _ => return Err(ErrorCode::UnknownMessage),
    })
}

/// Runs an altp2m operation for the tool: the change is in force on every
/// CPU before the reply (INVEPT here, a shootdown elsewhere), and every
/// vCPU's VMCS follows before it enters again.
fn altp2m<C: Cpu, P: Platform>(
    vm: &mut Vm,
    cpu: &mut C,
    platform: &mut P,
    caller: usize,
    op: Altp2mOp<'_>,
) -> Result<i64, ErrorCode> {
    let value = operations::altp2m(vm, platform, caller, op).map_err(hv_error)?;
    views::flush(vm, cpu, platform, caller);
    reapply_all(vm, platform);
    Ok(value)
}

fn capabilities(vm: &Vm) -> Capabilities {
    // The guest's feature bits are the protocol's (a test holds them equal).
    let features = vm.features.abi_bits() | feature::SHADOW_PAGES;
    Capabilities {
        features,
        events: supported_classes(vm),
        vcpus: vm.vcpus() as u16,
        max_views: (hv_altp2m::MAX_VIEWS - 1) as u16,
        altp2m_mode: match vm.altp2m_mode {
            Altp2mMode::External => mode::EXTERNAL,
            Altp2mMode::Mixed => mode::MIXED,
            Altp2mMode::Limited => mode::LIMITED,
        },
        hv_version: crate::abi::VERSION as u32,
        ram_bytes: vm
            .memory_map
            .iter()
            .filter(|r| r.kind == MemoryKind::Ram)
            .map(|r| r.end - r.start)
            .sum(),
    }
}

/// A zeroed hypervisor page mapped at the first free gfn of the shadow
/// area (above guest RAM and 4 GiB) as RAM in the host p2m, so views can
/// remap guest gfns to it.
fn alloc_shadow(vm: &mut Vm, platform: &mut impl Platform) -> Result<u64, ErrorCode> {
    let control: &Control = &vm.control;
    if control.shadows.len() >= MAX_SHADOW_PAGES {
        return Err(ErrorCode::NoMem);
    }
    // The first gap in the sorted list.
    let index = control
        .shadows
        .iter()
        .enumerate()
        .find(|(i, (gfn, _))| gfn.0 != control.shadow_base + *i as u64)
        .map_or(control.shadows.len(), |(i, _)| i);
    let gfn = Gfn(control.shadow_base + index as u64);
    gfn.check().map_err(|_| ErrorCode::NoMem)?;
    let mfn = platform.alloc_frames(1, 1).ok_or(ErrorCode::NoMem)?;
    platform.zero_frame(mfn);
    let mapping = hv_altp2m::Mapping {
        mfn,
        ty: P2mType::RamRw,
        access: P2mAccess::Rwx,
    };
    if let Err(e) = vm
        .altp2m
        .host_set_entry(platform, &mut vm.p2m, gfn, Order::PAGE_4K, mapping)
    {
        platform.free_frames(mfn, 1);
        return Err(hv_error(operations::errno(e)));
    }
    // Room was reserved for MAX_SHADOW_PAGES: this never reallocates.
    vm.control.shadows.insert(index, (gfn, mfn));
    Ok(gfn.0)
}

/// Unmaps a shadow page from the host and every view (remaps to it
/// included), makes sure no CPU still translates to it, and frees it.
fn free_shadow<C: Cpu, P: Platform>(
    vm: &mut Vm,
    cpu: &mut C,
    platform: &mut P,
    caller: usize,
    gfn: Gfn,
) -> Result<(), ErrorCode> {
    let index = vm
        .control
        .shadows
        .binary_search_by_key(&gfn.0, |s| s.0.0)
        .map_err(|_| ErrorCode::NoEnt)?;
    vm.altp2m
        .host_remove(platform, &mut vm.p2m, gfn, Order::PAGE_4K)
        .map_err(|e| hv_error(operations::errno(e)))?;
    views::flush(vm, cpu, platform, caller);
    let (_, mfn) = vm.control.shadows.remove(index);
    platform.free_frames(mfn, 1);
    Ok(())
}
