//! The `probe` check's parts that need no machine: finding a kernel
//! function in /proc/kallsyms, finding a kernel address in /proc/kcore's
//! ELF program headers, and the mailbox the check shares with a tool
//! outside the guest (the control channel's Linux test,
//! `tests/tests/control.rs`).
//!
//! The check: init prints where its mailbox page is (guest-physical, from
//! /proc/self/pagemap) and which function it will call, waits for the tool
//! (which hides a breakpoint on the function meanwhile), makes its calls,
//! reads the function's first bytes through /proc/kcore, and after the
//! tool removed its breakpoint reads them again. It passes when every call
//! returned what it must and both reads saw the same, unpatched code: the
//! breakpoint was invisible to the guest.
//!
//! | mailbox word | written by | meaning |
//! |---|---|---|
//! | 0 | init | [`MAGIC`] once init waits for the tool |
//! | 1 | tool | [`GO`]: the breakpoint is armed; [`FINISH`]: removed |
//! | 2 | init | calls made so far |
//! | 3 | init | the function's first 8 bytes as init read them |
//! | 4 | init | [`WAITING`], [`CALLED`], [`FINISHED`] |

/// The function init calls: a system call, reached only by the calls the
/// check makes (no kernel thread calls it).
pub const FUNCTION: &str = "__x64_sys_getppid";
pub const MAGIC: u64 = 0x4856_4354_4c21_0002;
pub const GO: u64 = 1;
pub const FINISH: u64 = 2;
pub const WAITING: u64 = 1;
pub const CALLED: u64 = 2;
pub const FINISHED: u64 = 3;
/// The mailbox's words.
pub const WORD_MAGIC: usize = 0;
pub const WORD_TOOL: usize = 1;
pub const WORD_CALLS: usize = 2;
pub const WORD_BYTES: usize = 3;
pub const WORD_STATE: usize = 4;

/// The address of `name` in /proc/kallsyms text (`None` if absent or if
/// the kernel hides addresses: all zero).
pub fn kallsyms_address(kallsyms: &str, name: &str) -> Option<u64> {
    kallsyms.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        let address = u64::from_str_radix(words.next()?, 16).ok()?;
        let _kind = words.next()?;
        (words.next()? == name && address != 0).then_some(address)
    })
}

/// The file offset of kernel address `address` in /proc/kcore, from the
/// start of the file (ELF64 header and program headers).
pub fn kcore_offset(header: &[u8], address: u64) -> Option<u64> {
    let u16_at = |at: usize| Some(u16::from_le_bytes(header.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(header.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(header.get(at..at + 8)?.try_into().ok()?));
    if header.get(..5)? != b"\x7fELF\x02" {
        return None;
    }
    let (phoff, entsize, count) = (u64_at(0x20)?, u16_at(0x36)?, u16_at(0x38)?);
    (0..usize::from(count)).find_map(|i| {
        let at = usize::try_from(phoff).ok()? + i * usize::from(entsize);
        const PT_LOAD: u32 = 1;
        let (kind, offset, vaddr, size) = (
            u32_at(at)?,
            u64_at(at + 8)?,
            u64_at(at + 16)?,
            u64_at(at + 32)?,
        );
        (kind == PT_LOAD && address >= vaddr && address - vaddr < size)
            .then(|| offset + (address - vaddr))
    })
}

/// The check's verdict: every call returned the parent of PID 1 (0), and
/// both reads of the function saw the same bytes, not a breakpoint.
pub fn verdict(calls: u64, wrong: u64, before: &[u8], after: &[u8]) -> Result<String, String> {
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let what = format!(
        "{calls} calls of {FUNCTION}, its first bytes {} before and {} after the tool's breakpoint",
        hex(before),
        hex(after)
    );
    if wrong > 0 {
        Err(format!("{what}: {wrong} calls returned a wrong value"))
    } else if before.is_empty() || before != after {
        Err(format!("{what}: the reads differ"))
    } else if before[0] == 0xcc {
        Err(format!("{what}: the guest saw the breakpoint"))
    } else {
        Ok(what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_function_and_refuses_hidden_addresses() {
        let kallsyms =
            "ffffffff810a1230 T __x64_sys_getpid\nffffffff810a1260 T __x64_sys_getppid\n";
        assert_eq!(
            kallsyms_address(kallsyms, FUNCTION),
            Some(0xffff_ffff_810a_1260)
        );
        assert_eq!(
            kallsyms_address("0000000000000000 T __x64_sys_getppid", FUNCTION),
            None
        );
        assert_eq!(kallsyms_address(kallsyms, "nope"), None);
    }

    fn elf_with(loads: &[(u64, u64, u64)]) -> Vec<u8> {
        let mut h = vec![0u8; 64 + 56 * loads.len()];
        h[..5].copy_from_slice(b"\x7fELF\x02");
        h[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        h[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        h[0x38..0x3a].copy_from_slice(&(loads.len() as u16).to_le_bytes());
        for (i, &(offset, vaddr, size)) in loads.iter().enumerate() {
            let at = 64 + 56 * i;
            h[at..at + 4].copy_from_slice(&1u32.to_le_bytes());
            h[at + 8..at + 16].copy_from_slice(&offset.to_le_bytes());
            h[at + 16..at + 24].copy_from_slice(&vaddr.to_le_bytes());
            h[at + 32..at + 40].copy_from_slice(&size.to_le_bytes());
        }
        h
    }

    #[test]
    fn kcore_offsets_come_from_the_load_segment_that_covers_the_address() {
        let h = elf_with(&[
            (0x1000, 0xffff_8880_0000_0000, 0x1000_0000),
            (0x7fff_8100_0000, 0xffff_ffff_8100_0000, 0x200_0000),
        ]);
        assert_eq!(
            kcore_offset(&h, 0xffff_ffff_810a_1260),
            Some(0x7fff_810a_1260)
        );
        assert_eq!(kcore_offset(&h, 0xffff_8880_0000_0010), Some(0x1010));
        assert_eq!(kcore_offset(&h, 0xffff_ffff_a000_0000), None);
        assert_eq!(kcore_offset(b"not elf", 0), None);
    }

    #[test]
    fn the_verdict_wants_right_results_and_the_same_unpatched_bytes() {
        let code = [0xf3, 0x0f, 0x1e, 0xfa];
        assert!(verdict(5, 0, &code, &code).is_ok());
        assert!(verdict(5, 1, &code, &code).is_err());
        assert!(verdict(5, 0, &code, &[0xcc, 0x0f, 0x1e, 0xfa]).is_err());
        assert!(verdict(5, 0, &[0xcc], &[0xcc]).is_err());
        assert!(verdict(5, 0, &[], &[]).is_err());
    }
}
