//! A simulated machine for host tests of the VMX layer: byte-addressable
//! frames with accounting, and the guest's console lines and monitor events.

extern crate std;

use std::collections::{BTreeMap, BTreeSet};
use std::string::String;
use std::vec::Vec;

use hv_ept::{EptMemory, Mfn};

use crate::platform::Platform;

#[derive(Default)]
pub struct SimPlatform {
    frames: BTreeMap<u64, Vec<u8>>,
    next: u64,
    freed: BTreeSet<u64>,
    /// Fail allocations once this many frames are out.
    pub limit: Option<usize>,
    pub console: Vec<String>,
    pub events: Vec<String>,
    pub screen: Vec<u8>,
    /// An NMI the next `take_nmi` reports.
    pub nmi: bool,
    /// Kicks sent, in order.
    pub kicks: Vec<(usize, crate::platform::Kick)>,
    /// The other vCPUs' side of a kick: each kicked vCPU leaves guest mode
    /// on the view given here (as its exit would publish it).
    pub kicked_exit: Option<(&'static crate::smp::Coherence, u64)>,
    /// The machine has a control line: bytes the tool sent, and bytes the
    /// hypervisor sent.
    pub control_line: bool,
    pub control_in: std::collections::VecDeque<u8>,
    pub control_out: Vec<u8>,
}

impl SimPlatform {
    pub fn new() -> Self {
        Self {
            next: 0x1000,
            ..Self::default()
        }
    }

    pub fn is_allocated(&self, mfn: u64) -> bool {
        self.frames.contains_key(&mfn)
    }

    /// Frames currently allocated.
    pub fn outstanding(&self) -> usize {
        self.frames.len()
    }

    fn frame(&self, mfn: u64) -> &Vec<u8> {
        self.frames
            .get(&mfn)
            .unwrap_or_else(|| panic!("access to unallocated frame {mfn:#x}"))
    }

    fn frame_mut(&mut self, mfn: u64) -> &mut Vec<u8> {
        self.frames
            .get_mut(&mfn)
            .unwrap_or_else(|| panic!("access to unallocated frame {mfn:#x}"))
    }
}

impl EptMemory for SimPlatform {
    fn alloc_frame(&mut self) -> Option<Mfn> {
        self.alloc_frames(1, 1)
    }

    fn free_frame(&mut self, frame: Mfn) {
        self.free_frames(frame, 1);
    }

    fn read_entry(&self, table: Mfn, index: usize) -> u64 {
        let bytes = &self.frame(table.0)[index * 8..index * 8 + 8];
        u64::from_le_bytes(bytes.try_into().unwrap())
    }

    fn write_entry(&mut self, table: Mfn, index: usize, value: u64) {
        self.frame_mut(table.0)[index * 8..index * 8 + 8].copy_from_slice(&value.to_le_bytes());
    }
}

impl Platform for SimPlatform {
    fn alloc_frames(&mut self, count: u64, align: u64) -> Option<Mfn> {
        if self
            .limit
            .is_some_and(|limit| self.frames.len() as u64 + count > limit as u64)
        {
            return None;
        }
        let first = self.next.next_multiple_of(align);
        self.next = first + count;
        for mfn in first..first + count {
            // Garbage, so code that relies on fresh frames being zero shows up.
            self.frames.insert(mfn, std::vec![0xa5; 4096]);
        }
        Some(Mfn(first))
    }

    fn free_frames(&mut self, first: Mfn, count: u64) {
        for mfn in first.0..first.0 + count {
            assert!(
                self.frames.remove(&mfn).is_some(),
                "double free of frame {mfn:#x}"
            );
            self.freed.insert(mfn);
        }
    }

    fn read_phys(&self, address: u64, buf: &mut [u8]) {
        let at = (address % 4096) as usize;
        buf.copy_from_slice(&self.frame(address / 4096)[at..at + buf.len()]);
    }

    fn write_phys(&mut self, address: u64, data: &[u8]) {
        let at = (address % 4096) as usize;
        self.frame_mut(address / 4096)[at..at + data.len()].copy_from_slice(data);
    }

    fn guest_console_line(&mut self, line: &str) {
        self.console.push(line.into());
    }

    fn monitor_event(&mut self, line: &str) {
        self.events.push(line.into());
    }

    fn kick(&mut self, vcpu: usize, kick: crate::platform::Kick) {
        self.kicks.push((vcpu, kick));
        if let Some((coherence, view)) = self.kicked_exit {
            coherence.take_kick(vcpu);
            coherence.exit(vcpu, view);
        }
    }

    fn take_nmi(&mut self) -> bool {
        core::mem::take(&mut self.nmi)
    }

    fn show_text(&mut self, cells: &[u8]) {
        self.screen = cells.to_vec();
    }

    fn has_control_line(&self) -> bool {
        self.control_line
    }

    fn control_receive(&mut self) -> Option<u8> {
        self.control_in.pop_front()
    }

    fn control_send(&mut self, bytes: &[u8]) {
        self.control_out.extend_from_slice(bytes);
    }

    /// One TSC cycle per millisecond: timeouts in tests are counted in ms.
    fn tsc_khz(&self) -> u64 {
        1
    }
}
