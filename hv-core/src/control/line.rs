//! The line: bytes in and out of the control UART, frames decoded and
//! encoded, and the order things go out in (replies, then events, then a
//! pause's late reply).

use alloc::boxed::Box;
use alloc::vec::Vec;

use hv_control::{Decoded, Decoder, ErrorCode, MAX_FRAME, Message, ReplyBody};

use super::{Resolution, commands};
use crate::platform::Platform;
use crate::vm::Vm;
use crate::vmx::Cpu;

/// A frame whose bytes stop coming for this long (ms) was cut short.
const IDLE_MS: u64 = 100;
/// Frames one call of [`serve`] takes at most before the vCPU goes back
/// to its guest (a held vCPU's loop calls again at once).
const FRAMES_PER_SERVE: usize = 16;

/// The decoder (one frame of receive buffer) and one frame of transmit
/// buffer: 10 KiB, allocated once with the VM.
pub struct Line {
    decoder: Decoder,
    tx: [u8; MAX_FRAME],
}

/// A line on the heap. (A one-element array: stable Rust has no fallible
/// `Box::new`, but a `Vec`'s fallible reservation converts into one.)
pub type BoxedLine = Box<[Line; 1]>;

impl Line {
    pub fn new() -> Option<BoxedLine> {
        let mut lines = Vec::new();
        lines.try_reserve_exact(1).ok()?;
        lines.push(Self {
            decoder: Decoder::new(),
            tx: [0; MAX_FRAME],
        });
        lines.into_boxed_slice().try_into().ok()
    }
}

/// The VM behind its lock, as the server takes it: a `spin::Mutex` in the
/// hypervisor; host tests hand in a VM they own.
pub trait SharedVm {
    fn lock_vm(&self) -> impl core::ops::DerefMut<Target = Vm> + '_;
}

impl SharedVm for spin::Mutex<Vm> {
    fn lock_vm(&self) -> impl core::ops::DerefMut<Target = Vm> + '_ {
        self.lock()
    }
}

/// Serves the line if no other CPU does: sends what is due (replies,
/// events, a completed pause's reply) and takes the frames the tool sent,
/// running each command under the VM lock. Returns at once when the line
/// is quiet; never holds the VM lock across UART I/O.
pub fn serve<C: Cpu, P: Platform>(
    machine: &impl SharedVm,
    cpu: &mut C,
    platform: &mut P,
    vcpu: usize,
) {
    let Some(mut line) = machine.lock_vm().control.line.take() else {
        return;
    };
    let mut frames = 0;
    loop {
        let now = cpu.rdtsc();
        let out = outgoing(&mut machine.lock_vm(), &mut line[0].tx, now);
        if let Some(n) = out {
            platform.control_send(&line[0].tx[..n]);
            continue;
        }
        if frames >= FRAMES_PER_SERVE || !receive_one(&mut line[0], machine, cpu, platform, vcpu) {
            break;
        }
        frames += 1;
    }
    machine.lock_vm().control.line = Some(line);
}

/// The next frame to send that is not a reply: an event not sent yet or
/// due again, or the reply to a `PAUSE` whose vCPUs are all stopped now.
/// Also ends a session whose tool went silent.
fn outgoing(vm: &mut Vm, tx: &mut [u8], now: u64) -> Option<usize> {
    let control = &mut vm.control;
    if let Some(session) = control.session
        && session.liveness_tsc != 0
        && now.saturating_sub(session.last_heard) > session.liveness_tsc
    {
        log::warn!("control: no frame from the tool within its liveness time: session ended");
        control.end_session();
    }
    control.session?;
    let resend = control.ms_to_tsc(super::RESEND_MS);
    for v in control.vcpus.iter_mut() {
        if v.resolution.is_some() {
            continue;
        }
        let Some(held) = v.held.as_mut() else {
            continue;
        };
        if held
            .sent_at
            .is_some_and(|at| now.saturating_sub(at) < resend)
        {
            continue;
        }
        held.sent_at = Some(now);
        let message = Message::Event {
            seq: held.seq,
            event: held.event,
        };
        return message.encode(tx).ok();
    }
    let (seq, vcpu) = control.pause_reply?;
    if !commands::paused(vm, vcpu) {
        return None;
    }
    vm.control.pause_reply = None;
    let message = Message::Reply {
        id: hv_control::id::PAUSE,
        seq,
        reply: Ok(ReplyBody::Done),
    };
    message.encode(tx).ok()
}

/// Takes one frame off the line (or what is left of a bad one) and handles
/// it; false if the line had nothing (or only a frame cut short by an
/// idle line, which gets its error reply).
fn receive_one<C: Cpu, P: Platform>(
    line: &mut Line,
    machine: &impl SharedVm,
    cpu: &mut C,
    platform: &mut P,
    vcpu: usize,
) -> bool {
    let Line { decoder, tx } = line;
    let mut handle = |decoded: Decoded<'_>, cpu: &mut C, platform: &mut P| {
        let now = cpu.rdtsc();
        let n = {
            let mut vm = machine.lock_vm();
            handle_decoded(&mut vm, cpu, platform, vcpu, decoded, tx, now)
        };
        if let Some(n) = n {
            platform.control_send(&tx[..n]);
        }
    };
    // Bytes already buffered (after a bad frame) may hold the next frame.
    if let Some(decoded) = decoder.poll() {
        handle(decoded, cpu, platform);
        return true;
    }
    let mut idle_since: Option<u64> = None;
    let idle = machine.lock_vm().control.ms_to_tsc(IDLE_MS);
    loop {
        match platform.control_receive() {
            Some(byte) => {
                idle_since = None;
                if let Some(decoded) = decoder.push(byte) {
                    handle(decoded, cpu, platform);
                    return true;
                }
            }
            None if !decoder.is_mid_frame() => return false,
            None => {
                let now = cpu.rdtsc();
                if now.saturating_sub(*idle_since.get_or_insert(now)) > idle {
                    if let Some(decoded) = decoder.expire() {
                        handle(decoded, cpu, platform);
                    }
                    return false;
                }
                core::hint::spin_loop();
            }
        }
    }
}

/// Handles one decoded frame; returns the size of the reply it put in `tx`.
fn handle_decoded<C: Cpu, P: Platform>(
    vm: &mut Vm,
    cpu: &mut C,
    platform: &mut P,
    vcpu: usize,
    decoded: Decoded<'_>,
    tx: &mut [u8],
    now: u64,
) -> Option<usize> {
    let control = &mut vm.control;
    if let Some(session) = control.session.as_mut() {
        session.last_heard = now;
    }
    let (id, seq, result) = match decoded {
        Decoded::Error(e) => {
            control.stats.bad_frames += 1;
            let h = e.header();
            (h.id, h.seq, Err(e.code()))
        }
        Decoded::Frame(frame) => match Message::decode(&frame) {
            Err(e) => {
                control.stats.bad_frames += 1;
                (frame.id, frame.seq, Err(e.code()))
            }
            Ok(Message::Command { seq, command }) => {
                control.stats.commands += 1;
                let id = command.id();
                let ran = commands::run(vm, cpu, platform, vcpu, seq, command, now, tx);
                let took = cpu.rdtsc().saturating_sub(now);
                vm.control.stats.command(id, took);
                match ran {
                    commands::Outcome::Sent(n) => return Some(n),
                    commands::Outcome::Later => return None,
                    commands::Outcome::Failed(e) => (id, seq, Err(e)),
                }
            }
            Ok(Message::Answer { id, seq, answer }) => (id, seq, answer_event(vm, id, seq, answer)),
            // A tool sends neither.
            Ok(Message::Reply { id, seq, .. }) => (id, seq, Err(ErrorCode::UnknownMessage)),
            Ok(Message::Event { seq, event }) => (event.id(), seq, Err(ErrorCode::UnknownMessage)),
        },
    };
    let message = Message::Reply {
        id,
        seq,
        reply: result.map(|()| ReplyBody::Done),
    };
    message.encode(tx).ok()
}

/// An answer to a held event: recorded for its vCPU, which carries it out.
fn answer_event(
    vm: &mut Vm,
    id: u16,
    seq: u32,
    answer: hv_control::Answer,
) -> Result<(), ErrorCode> {
    if vm.control.session.is_none() {
        return Err(ErrorCode::NoSession);
    }
    if let Some(view) = answer.switch_view
        && !super::view_exists(vm, view)
    {
        return Err(ErrorCode::Inval);
    }
    let state = vm
        .control
        .vcpus
        .iter_mut()
        .find(|v| {
            v.resolution.is_none() && v.held.is_some_and(|h| h.seq == seq && h.event.id() == id)
        })
        .ok_or(ErrorCode::NoSuchEvent)?;
    state.resolution = Some(Resolution::Answered(answer));
    Ok(())
}
