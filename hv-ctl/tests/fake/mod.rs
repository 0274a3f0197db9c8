//! `FakeHypervisor`: a TEST DOUBLE of the hypervisor's control server, not
//! the hypervisor. It speaks the real protocol (hv-control's frames and
//! messages) over a real socket and keeps a toy model of a guest (RAM as a
//! map of pages, vCPU registers, views as access maps, remaps) so that the
//! client's requests have observable effects. Tests inject events with
//! [`FakeHypervisor::emit`] and read back what answers did to the vCPUs.
//! The real end-to-end tests run against the hypervisor in an emulator.

#![allow(dead_code, reason = "each test binary uses part of the double")]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hv_control::*;
use hv_ctl::Transport;

pub const PAGE: u64 = PAGE_SIZE as u64;

/// The toy guest and the session, shared with the test.
#[derive(Default)]
pub struct State {
    pub ram: Vec<Range>,
    pub pages: BTreeMap<u64, Vec<u8>>,
    pub session: bool,
    pub paused: Vec<bool>,
    pub regs: Vec<Registers>,
    pub altp2m: bool,
    /// view -> (gfn -> access); view 0 always exists.
    pub views: BTreeMap<u16, HashMap<u64, u8>>,
    pub remaps: HashMap<(u16, u64), u64>,
    pub vcpu_view: Vec<u16>,
    pub classes: u32,
    /// Events sent and not answered yet: seq -> (id, vcpu).
    pub held: BTreeMap<u32, (u16, u16)>,
    /// Every answer taken, in order.
    pub answers: Vec<(u32, Answer)>,
    /// Whether every vCPU was paused at each memory read.
    pub reads_while_paused: Vec<bool>,
    /// Bytes to send before the next reply (garbage on the line).
    pub noise_before_reply: Vec<u8>,
    /// Flip a payload bit of the next reply.
    pub corrupt_next_reply: bool,
    /// Do not reply at all (a hung hypervisor).
    pub mute: bool,
    pub frames_in: u64,
}

pub struct FakeHypervisor {
    pub state: Arc<Mutex<State>>,
    inject: Sender<Event>,
    stop: Sender<()>,
    thread: Option<JoinHandle<()>>,
}

pub const VCPUS: usize = 2;

impl FakeHypervisor {
    /// Serves one end of a socket pair; returns the fake and the tool's end.
    pub fn start() -> (Self, UnixStream) {
        let (tool, hv) = UnixStream::pair().unwrap();
        (Self::serve(hv), tool)
    }

    /// Serves `end` on a thread.
    pub fn serve(end: UnixStream) -> Self {
        let mut state = State {
            ram: vec![
                Range {
                    start: 0,
                    len: 0x9f000,
                },
                Range {
                    start: 0x10_0000,
                    len: 0x30_0000,
                },
            ],
            paused: vec![false; VCPUS],
            regs: vec![Registers::default(); VCPUS],
            vcpu_view: vec![0; VCPUS],
            ..State::default()
        };
        state.views.insert(0, HashMap::new());
        let state = Arc::new(Mutex::new(state));
        let (inject, injected) = channel();
        let (stop, stopped) = channel();
        let shared = state.clone();
        let thread = std::thread::spawn(move || serve(end, shared, injected, stopped));
        Self {
            state,
            inject,
            stop,
            thread: Some(thread),
        }
    }

    /// Sends an event as if a vCPU hit it; the vCPU is held until answered.
    pub fn emit(&self, event: Event) {
        self.inject.send(event).unwrap();
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    /// The guest byte at `gpa` as the fake fills untouched RAM.
    pub fn initial_byte(gpa: u64) -> u8 {
        (gpa.wrapping_mul(31) >> 3) as u8
    }
}

impl Drop for FakeHypervisor {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    mut end: UnixStream,
    state: Arc<Mutex<State>>,
    injected: Receiver<Event>,
    stopped: Receiver<()>,
) {
    let mut decoder = Box::new(Decoder::new());
    let mut next_event_seq = 1000u32;
    let mut out = Vec::new();
    loop {
        if stopped.try_recv().is_ok() {
            return;
        }
        while let Ok(event) = injected.try_recv() {
            let mut s = state.lock().unwrap();
            let seq = next_event_seq;
            next_event_seq += 1;
            s.held.insert(seq, (event.id(), event.context.vcpu));
            push(&mut out, &Message::Event { seq, event });
        }
        let mut buf = [0u8; 4096];
        let n = match end.recv(&mut buf, Duration::from_millis(5)) {
            Ok(n) => n,
            Err(_) => return,
        };
        for &b in &buf[..n] {
            let mut handle =
                |d: Decoded<'_>| handle_decoded(&state, d, &mut out, &mut next_event_seq);
            if let Some(d) = decoder.push(b) {
                handle(d);
                while let Some(d) = decoder.poll() {
                    handle(d);
                }
            }
        }
        if !out.is_empty() {
            if end.send(&out).is_err() {
                return;
            }
            out.clear();
        }
    }
}

fn push(out: &mut Vec<u8>, message: &Message<'_>) {
    let mut buf = vec![0; MAX_FRAME];
    let n = message.encode(&mut buf).expect("the fake's messages fit");
    out.extend_from_slice(&buf[..n]);
}

fn reply(state: &mut State, out: &mut Vec<u8>, id: u16, seq: u32, reply: Reply<'_>) {
    if state.mute {
        return;
    }
    out.append(&mut state.noise_before_reply);
    let start = out.len();
    push(out, &Message::Reply { id, seq, reply });
    if std::mem::take(&mut state.corrupt_next_reply) {
        let last = out.len() - 1;
        out[last] ^= 0x40;
        assert!(out.len() > start + HEADER_LEN, "a reply with a payload");
    }
}

fn handle_decoded(
    state: &Mutex<State>,
    decoded: Decoded<'_>,
    out: &mut Vec<u8>,
    next_seq: &mut u32,
) {
    let mut s = state.lock().unwrap();
    s.frames_in += 1;
    let frame = match decoded {
        Decoded::Frame(f) => f,
        Decoded::Error(e) => {
            let h = e.header();
            return reply(&mut s, out, h.id, h.seq, Err(e.code()));
        }
    };
    match Message::decode(&frame) {
        Err(e) => reply(&mut s, out, frame.id, frame.seq, Err(e.code())),
        Ok(Message::Command { seq, command }) => {
            let id = command.id();
            let result = if !s.session && !matches!(command, Command::Hello { .. }) {
                Err(ErrorCode::NoSession)
            } else {
                execute(&mut s, command)
            };
            match result {
                Ok(body) => {
                    // Bodies borrow the state's pages: encode here.
                    let owned = body;
                    reply(&mut s, out, id, seq, Ok(owned.as_body()));
                }
                Err(e) => reply(&mut s, out, id, seq, Err(e)),
            }
        }
        Ok(Message::Answer { id, seq, answer }) => {
            let Some((event_id, vcpu)) = s.held.get(&seq).copied().filter(|(i, _)| *i == id) else {
                return reply(&mut s, out, id, seq, Err(ErrorCode::NoSuchEvent));
            };
            s.held.remove(&seq);
            s.answers.push((seq, answer));
            if let Some(view) = answer.switch_view {
                if !s.views.contains_key(&view) {
                    return reply(&mut s, out, id, seq, Err(ErrorCode::Inval));
                }
                s.vcpu_view[usize::from(vcpu)] = view;
            }
            reply(&mut s, out, event_id, seq, Ok(ReplyBody::Done));
            if answer.single_step {
                let view = s.vcpu_view[usize::from(vcpu)];
                let event = Event {
                    context: Context {
                        vcpu,
                        view,
                        rip: s.regs[usize::from(vcpu)].rip + 1,
                        cr3: s.regs[usize::from(vcpu)].cr3,
                    },
                    kind: EventKind::SingleStep,
                };
                let seq = *next_seq;
                *next_seq += 1;
                s.held.insert(seq, (event.id(), vcpu));
                push(out, &Message::Event { seq, event });
            }
        }
        // A hypervisor receives no replies or events.
        Ok(_) => reply(
            &mut s,
            out,
            frame.id,
            frame.seq,
            Err(ErrorCode::UnknownMessage),
        ),
    }
}

/// A reply body that owns its data.
#[expect(clippy::large_enum_variant, reason = "short-lived, one per reply")]
enum Owned {
    Body(ReplyBody<'static>),
    Ranges(Vec<Range>),
    Bytes(Vec<u8>),
    Dirty(u32, Vec<u8>),
}

impl Owned {
    fn as_body(&self) -> ReplyBody<'_> {
        match self {
            Owned::Body(b) => *b,
            Owned::Ranges(r) => ReplyBody::MemoryMap(List::Items(r)),
            Owned::Bytes(b) => ReplyBody::Memory(b),
            Owned::Dirty(n, bitmap) => ReplyBody::Dirty { dirty: *n, bitmap },
        }
    }
}

fn in_ram(s: &State, gpa: u64) -> bool {
    s.ram
        .iter()
        .any(|r| (r.start..r.start + r.len).contains(&gpa))
}

fn vcpu(s: &State, v: u16) -> Result<usize, ErrorCode> {
    let i = usize::from(v);
    if i < s.paused.len() {
        Ok(i)
    } else {
        Err(ErrorCode::NoEnt)
    }
}

fn view(s: &State, v: u16) -> Result<u16, ErrorCode> {
    if s.views.contains_key(&v) {
        Ok(v)
    } else {
        Err(ErrorCode::Inval)
    }
}

fn page_of(s: &mut State, gpa: u64) -> &mut Vec<u8> {
    let page = gpa / PAGE;
    s.pages.entry(page).or_insert_with(|| {
        (0..PAGE)
            .map(|i| FakeHypervisor::initial_byte(page * PAGE + i))
            .collect()
    })
}

fn execute(s: &mut State, command: Command<'_>) -> Result<Owned, ErrorCode> {
    use Command as C;
    let done = Ok(Owned::Body(ReplyBody::Done));
    match command {
        C::Hello { version, .. } => {
            if version != u16::from(VERSION) {
                return Err(ErrorCode::BadVersion);
            }
            s.session = true;
            Ok(Owned::Body(ReplyBody::Hello {
                version: u16::from(VERSION),
                max_payload: MAX_PAYLOAD as u32,
            }))
        }
        C::Bye => {
            s.session = false;
            s.classes = 0;
            s.held.clear();
            done
        }
        C::Ping { nonce } => Ok(Owned::Body(ReplyBody::Pong { nonce })),
        C::Capabilities => Ok(Owned::Body(ReplyBody::Capabilities(Capabilities {
            features: feature::VMFUNC | feature::VE | feature::SHADOW_PAGES,
            events: class::ALL,
            vcpus: s.paused.len() as u16,
            max_views: 511,
            altp2m_mode: mode::EXTERNAL,
            hv_version: hv_abi::VERSION as u32,
            ram_bytes: s.ram.iter().map(|r| r.len).sum(),
        }))),
        C::MemoryMap => Ok(Owned::Ranges(s.ram.clone())),
        C::SetEvents { classes } => {
            if classes & !class::ALL != 0 {
                return Err(ErrorCode::NotSupported);
            }
            s.classes = classes;
            Ok(Owned::Body(ReplyBody::Events { classes }))
        }
        C::Pause { vcpu: v } | C::Resume { vcpu: v } => {
            let pause = matches!(command, C::Pause { .. });
            if v == ALL_VCPUS {
                s.paused.iter_mut().for_each(|p| *p = pause);
            } else {
                let i = vcpu(s, v)?;
                s.paused[i] = pause;
            }
            done
        }
        C::GetRegisters { vcpu: v } => {
            let i = vcpu(s, v)?;
            Ok(Owned::Body(ReplyBody::Registers(s.regs[i])))
        }
        C::SetRegisters { vcpu: v, regs } => {
            let i = vcpu(s, v)?;
            if !s.paused[i] {
                return Err(ErrorCode::NotPaused);
            }
            s.regs[i] = regs;
            done
        }
        C::Translate { gva, .. } => {
            // The toy guest's paging: the kernel half maps to physical 0.
            let gpa = gva
                .checked_sub(0xffff_8000_0000_0000)
                .ok_or(ErrorCode::Fault)?;
            Ok(Owned::Body(ReplyBody::Translation(Translation {
                gpa,
                page_shift: 12,
                paging: paging::LEVEL4,
                perms: perm::WRITE,
            })))
        }
        C::ReadMemory { gpa, len } => {
            if !in_ram(s, gpa) {
                return Err(ErrorCode::Fault);
            }
            let paused = s.paused.iter().all(|&p| p);
            s.reads_while_paused.push(paused);
            let at = (gpa % PAGE) as usize;
            let bytes = page_of(s, gpa)[at..at + usize::from(len)].to_vec();
            Ok(Owned::Bytes(bytes))
        }
        C::WriteMemory { gpa, data } => {
            if !in_ram(s, gpa) {
                return Err(ErrorCode::Fault);
            }
            let at = (gpa % PAGE) as usize;
            page_of(s, gpa)[at..at + data.len()].copy_from_slice(data);
            done
        }
        C::Altp2mGetState => Ok(Owned::Body(ReplyBody::Flag(s.altp2m))),
        C::Altp2mSetState { on } => {
            s.altp2m = on;
            if !on {
                s.views.retain(|&v, _| v == 0);
                s.vcpu_view.iter_mut().for_each(|v| *v = 0);
            }
            done
        }
        C::VcpuEnableNotify { vcpu: v, .. } | C::VcpuDisableNotify { vcpu: v } => {
            vcpu(s, v)?;
            done
        }
        C::CreateView { default_access } => {
            if !s.altp2m || default_access > 9 {
                return Err(ErrorCode::Inval);
            }
            let v = (1..512u16)
                .find(|v| !s.views.contains_key(v))
                .ok_or(ErrorCode::Inval)?;
            s.views.insert(v, HashMap::new());
            Ok(Owned::Body(ReplyBody::View(v)))
        }
        C::DestroyView { view: v } => {
            if v == 0 {
                return Err(ErrorCode::Inval);
            }
            view(s, v)?;
            if s.vcpu_view.contains(&v) {
                return Err(ErrorCode::Busy);
            }
            s.views.remove(&v);
            done
        }
        C::SwitchView { view: v } => {
            view(s, v)?;
            s.vcpu_view.iter_mut().for_each(|x| *x = v);
            done
        }
        C::SwitchVcpuView { vcpu: c, view: v } => {
            let i = vcpu(s, c)?;
            s.vcpu_view[i] = view(s, v)?;
            done
        }
        C::GetVcpuView { vcpu: c } => {
            let i = vcpu(s, c)?;
            Ok(Owned::Body(ReplyBody::View(s.vcpu_view[i])))
        }
        C::SetMemAccess {
            view: v,
            gfn,
            access,
        } => {
            set_access(s, v, gfn, access)?;
            done
        }
        C::SetMemAccessMulti { view: v, entries } => {
            let mut applied = 0;
            for e in entries.iter() {
                match set_access(s, v, e.gfn, e.access) {
                    Ok(()) => applied += 1,
                    Err(e) if applied == 0 => return Err(e),
                    Err(_) => break,
                }
            }
            Ok(Owned::Body(ReplyBody::Applied(applied)))
        }
        C::GetMemAccess { view: v, gfn } => {
            view(s, v)?;
            let access = s.views[&v].get(&gfn).copied().unwrap_or(7);
            Ok(Owned::Body(ReplyBody::Access(access)))
        }
        C::ChangeGfn {
            view: v,
            old_gfn,
            new_gfn,
        } => {
            if v == 0 {
                return Err(ErrorCode::Inval);
            }
            view(s, v)?;
            if new_gfn == hv_abi::INVALID_GFN {
                s.remaps.remove(&(v, old_gfn));
            } else {
                s.remaps.insert((v, old_gfn), new_gfn);
            }
            done
        }
        C::SetSuppressVe { view: v, .. } => {
            view(s, v)?;
            done
        }
        C::SetSuppressVeMulti {
            view: v,
            first_gfn,
            last_gfn,
            ..
        } => {
            view(s, v)?;
            Ok(Owned::Body(ReplyBody::Applied(
                (last_gfn - first_gfn + 1) as u32,
            )))
        }
        C::GetSuppressVe { view: v, .. } => {
            view(s, v)?;
            Ok(Owned::Body(ReplyBody::Flag(true)))
        }
        C::SetVisibility { view: v, .. } => {
            view(s, v)?;
            done
        }
        C::LogdirtyStart { .. } | C::LogdirtyStop { .. } => done,
        C::LogdirtyFetch { pages, .. } => {
            // Every third page dirty.
            let mut bitmap = vec![0u8; pages.div_ceil(8) as usize];
            let mut dirty = 0;
            for i in (0..pages).step_by(3) {
                bitmap[(i / 8) as usize] |= 1 << (i % 8);
                dirty += 1;
            }
            Ok(Owned::Dirty(dirty, bitmap))
        }
        C::AllocShadowPage => Ok(Owned::Body(ReplyBody::Gfn(0x10_0000))),
        C::FreeShadowPage { .. } => done,
    }
}

fn set_access(s: &mut State, v: u16, gfn: u64, access: u8) -> Result<(), ErrorCode> {
    view(s, v)?;
    if access > 9 || access == 2 || access == 6 {
        return Err(ErrorCode::Inval);
    }
    if !in_ram(s, gfn * PAGE) {
        return Err(ErrorCode::NoEnt);
    }
    s.views.get_mut(&v).unwrap().insert(gfn, access);
    Ok(())
}

/// Held events' seqs, in order.
pub fn held(fake: &FakeHypervisor) -> VecDeque<u32> {
    fake.with(|s| s.held.keys().copied().collect())
}
