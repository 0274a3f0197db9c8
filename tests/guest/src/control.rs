//! The `control` scenario: the guest's half of the control channel's
//! end-to-end test (`tests/tests/control.rs`), which a tool drives from
//! outside through the hypervisor. The guest knows nothing of the tool but
//! a mailbox page it shares with it by address (printed on the console):
//!
//! | word | written by | meaning |
//! |---|---|---|
//! | 0 | guest | `MAGIC` once the guest waits for the tool |
//! | 1 | tool | 1: go (the breakpoint is in place), 2: finish (removed) |
//! | 2 | guest | calls of the probe made so far |
//! | 3 | guest | the first byte of the probe's code, as the guest read it |
//! | 4 | guest | 1 waiting, 2 done with the calls, 3 finished |
//!
//! The probe is a function on a page of its own (`lea rax, [rdi + 0x11];
//! ret`); the tool hides a breakpoint on its first byte in a shadow view.
//! Whatever the tool does, the guest must see its code work and read as
//! written: the breakpoint is invisible to it.

use crate::altp2m::{read_u8, write_u8};
use crate::scenarios::{Outcome, check};
use crate::{println, rdtsc};

const MAILBOX: u64 = 0x70_0000;
const CODE: u64 = 0x70_1000;
const PROBE: [u8; 5] = [0x48, 0x8d, 0x47, 0x11, 0xc3];
const MAGIC: u64 = 0x4856_4354_4c21_0001;
const CALLS: u64 = 5;
const GO: u64 = 1;
const FINISH: u64 = 2;
/// How long the guest waits for the tool, in TSC cycles (about 5 minutes
/// of Bochs's emulated time: every command crosses a slow serial line).
const PATIENCE: u64 = 60_000_000_000;

fn word(i: u64) -> u64 {
    // SAFETY: the mailbox is identity-mapped guest RAM this scenario owns;
    // the tool writes it through the hypervisor, hence volatile.
    unsafe { core::ptr::read_volatile((MAILBOX + i * 8) as *const u64) }
}

fn set_word(i: u64, value: u64) {
    // SAFETY: as for `word`.
    unsafe { core::ptr::write_volatile((MAILBOX + i * 8) as *mut u64, value) }
}

fn wait_for_tool(value: u64, why: &'static str) -> Outcome {
    let start = rdtsc();
    while word(1) != value {
        if rdtsc() - start > PATIENCE {
            return Err(why);
        }
        core::hint::spin_loop();
    }
    Ok(())
}

fn probe(x: u64) -> u64 {
    // SAFETY: CODE holds PROBE, a complete function of the sysv64 ABI.
    let f: extern "sysv64" fn(u64) -> u64 = unsafe { core::mem::transmute(CODE as usize) };
    f(x)
}

pub fn scenario() -> Outcome {
    for i in 0..4096 {
        write_u8(CODE + i, 0xcc);
    }
    for (i, b) in PROBE.iter().enumerate() {
        write_u8(CODE + i as u64, *b);
    }
    for i in 0..8 {
        set_word(i, 0);
    }
    set_word(4, 1);
    set_word(0, MAGIC);
    println!("control: mailbox={MAILBOX:#x} code={CODE:#x} calls={CALLS}");
    wait_for_tool(GO, "the tool never said go")?;
    for i in 0..CALLS {
        check(probe(i) == i + 0x11, "the probe returned a wrong value")?;
        set_word(2, i + 1);
    }
    let first = read_u8(CODE);
    set_word(3, u64::from(first));
    set_word(4, 2);
    println!("control: {CALLS} calls made, the probe's first byte reads {first:#04x}");
    check(
        first == PROBE[0],
        "a read of the probe's code saw the breakpoint",
    )?;
    wait_for_tool(FINISH, "the tool never finished")?;
    check(
        read_u8(CODE) == PROBE[0] && probe(1) == 0x12,
        "the probe after the tool removed its breakpoint",
    )?;
    set_word(4, 3);
    Ok(())
}
