//! Hypercalls: what each may return (docs/hypercalls.md), the argument
//! generators (edge values, the model's objects, random numbers), and the
//! operations on views, VMFUNC, access, suppress-#VE and remaps, each with
//! the exact result the model predicts where the interface defines one.

use hv_abi::{access, call, error::*};

use super::model::{
    ARENA_PAGES, BUFFER_PAGES, GFN_MAX, Kind, MAX_LIVE_VIEWS, Mode, PAGE, ViewInfo, access_valid,
};
use super::{Expect, Fuzzer};
use crate::probe;
use crate::scenarios::Outcome;

/// Every hypercall number of `hv-abi`.
pub const ALL_CALLS: [u64; 25] = [
    call::VERSION,
    call::EXIT_COUNTS,
    call::ALTP2M_GET_STATE,
    call::ALTP2M_SET_STATE,
    call::ALTP2M_VCPU_ENABLE_NOTIFY,
    call::ALTP2M_VCPU_DISABLE_NOTIFY,
    call::ALTP2M_CREATE_VIEW,
    call::ALTP2M_DESTROY_VIEW,
    call::ALTP2M_SWITCH_VIEW,
    call::ALTP2M_SWITCH_VCPU_VIEW,
    call::ALTP2M_GET_VCPU_VIEW,
    call::ALTP2M_SET_MEM_ACCESS,
    call::ALTP2M_SET_MEM_ACCESS_MULTI,
    call::ALTP2M_GET_MEM_ACCESS,
    call::ALTP2M_CHANGE_GFN,
    call::ALTP2M_SET_SUPPRESS_VE,
    call::ALTP2M_SET_SUPPRESS_VE_MULTI,
    call::ALTP2M_GET_SUPPRESS_VE,
    call::ALTP2M_SET_VISIBILITY,
    call::LOGDIRTY_TRACK,
    call::LOGDIRTY_FETCH,
    call::BALLOON_RELEASE,
    call::DISPLAY_SET,
    call::DISPLAY_REFRESH,
    call::DISPLAY_CHECKSUM,
];

/// Exit reasons the hypervisor counts (`EXIT_COUNTS` entries).
pub const EXIT_REASONS: u64 = 80;
const MULTI_MAX: u64 = 512;
const FETCH_MAX: u64 = 32768;
pub const TRACK_MAX: u64 = 1 << 24;
const DISPLAY_MAX: u64 = 64;

const fn set(ok: Option<(i64, i64)>, errors: &'static [i64]) -> Expect {
    Expect::Set { ok, errors }
}

/// What docs/hypercalls.md lets call `number` return.
pub fn documented(number: u64, mode: Mode) -> Expect {
    let altp2m = (call::ALTP2M_GET_STATE..=call::ALTP2M_SET_VISIBILITY).contains(&number);
    let notify = matches!(
        number,
        call::ALTP2M_VCPU_ENABLE_NOTIFY | call::ALTP2M_VCPU_DISABLE_NOTIFY
    );
    if altp2m && (mode == Mode::External || (mode == Mode::Limited && !notify)) {
        return Expect::Exact(EPERM);
    }
    match number {
        call::VERSION => Expect::Exact(hv_abi::VERSION as i64),
        call::EXIT_COUNTS => set(Some((0, EXIT_REASONS as i64)), &[EFAULT]),
        call::ALTP2M_GET_STATE => set(Some((0, 1)), &[]),
        call::ALTP2M_SET_STATE => set(Some((0, 0)), &[EINVAL, ENOMEM]),
        call::ALTP2M_VCPU_ENABLE_NOTIFY => set(Some((0, 0)), &[EINVAL, EOPNOTSUPP]),
        call::ALTP2M_VCPU_DISABLE_NOTIFY => Expect::Exact(0),
        call::ALTP2M_CREATE_VIEW => set(Some((1, 511)), &[EINVAL, ENOMEM]),
        call::ALTP2M_DESTROY_VIEW => set(Some((0, 0)), &[EINVAL, EBUSY]),
        call::ALTP2M_SWITCH_VIEW | call::ALTP2M_SWITCH_VCPU_VIEW => set(Some((0, 0)), &[EINVAL]),
        call::ALTP2M_GET_VCPU_VIEW => set(Some((0, 511)), &[EINVAL]),
        call::ALTP2M_SET_MEM_ACCESS | call::ALTP2M_CHANGE_GFN | call::ALTP2M_SET_SUPPRESS_VE => {
            set(Some((0, 0)), &[EINVAL, ENOENT, ENOMEM])
        }
        call::ALTP2M_SET_MEM_ACCESS_MULTI => set(
            Some((1, MULTI_MAX as i64)),
            &[EINVAL, ENOENT, EFAULT, ENOMEM],
        ),
        call::ALTP2M_GET_MEM_ACCESS => set(Some((0, access::N2RWX as i64)), &[EINVAL, ENOENT]),
        call::ALTP2M_SET_SUPPRESS_VE_MULTI => {
            set(Some((1, MULTI_MAX as i64)), &[EINVAL, ENOENT, ENOMEM])
        }
        call::ALTP2M_GET_SUPPRESS_VE => set(Some((0, 1)), &[EINVAL, ENOENT]),
        call::ALTP2M_SET_VISIBILITY => set(Some((0, 0)), &[EINVAL]),
        call::LOGDIRTY_TRACK => set(Some((0, 0)), &[EINVAL, ENOMEM]),
        call::LOGDIRTY_FETCH => set(Some((0, FETCH_MAX as i64)), &[EINVAL, EFAULT, ENOMEM]),
        call::BALLOON_RELEASE => set(Some((0, 0)), &[ENOENT, EBUSY, EINVAL, ENOMEM]),
        call::DISPLAY_SET => set(Some((0, 0)), &[EBUSY, EFAULT, EINVAL, ENOENT, ENOMEM]),
        call::DISPLAY_REFRESH => set(Some((0, DISPLAY_MAX as i64)), &[ENOENT, ENOMEM]),
        call::DISPLAY_CHECKSUM => set(Some((0, i64::MAX)), &[ENOENT]),
        _ => Expect::Exact(ENOSYS),
    }
}

/// Values at the edges of every argument's range.
const EDGES: [u64; 16] = [
    0,
    1,
    2,
    511,
    512,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    GFN_MAX,
    GFN_MAX + 1,
    1 << 40,
    i64::MAX as u64,
    u64::MAX - 1,
    u64::MAX,
];

impl Fuzzer {
    // ---- argument generators ----

    pub(super) fn edge(&mut self) -> u64 {
        match self.rng.below(4) {
            0 => self.rng.next(),
            _ => self.rng.pick(&EDGES),
        }
    }

    /// A view index: the model's views mostly, edges and random numbers.
    pub(super) fn view_arg(&mut self) -> u64 {
        match self.rng.below(20) {
            0..=9 => {
                let views = self.model.live_views();
                if views.is_empty() {
                    0
                } else {
                    u64::from(self.rng.pick(&views))
                }
            }
            10..=12 => 0,
            13..=15 => self.rng.range(1, 511),
            16..=18 => self
                .rng
                .pick(&[512, 600, 0xffff, 0x1_0000, 1 << 32, u64::MAX]),
            _ => self.rng.next(),
        }
    }

    /// An arena page, tagged (not a buffer page); may have been given back.
    pub(super) fn tagged_page(&mut self) -> u64 {
        // Most choices fall on the first 256 pages, so restrictions, remaps
        // and tracking meet on the same pages.
        let span = if self.rng.chance(75) {
            256
        } else {
            ARENA_PAGES - BUFFER_PAGES
        };
        self.layout.first + self.rng.below(span)
    }

    /// A gfn an operation that changes something may name: an arena page,
    /// or one that is not RAM. Never the guest's own pages.
    pub(super) fn mut_gfn(&mut self) -> u64 {
        let top = self.layout.end();
        match self.rng.below(20) {
            0..=12 => self.tagged_page(),
            13 => top - 1 - self.rng.below(BUFFER_PAGES),
            14 => self
                .rng
                .pick(&[top, top + 1, 0xfed00, 0xc0000, 0xfffff, 0x10_0000]),
            15 => self.rng.pick(&self.layout.mmio.clone()),
            16 => self.rng.range(top, 1 << 28),
            17 => self
                .rng
                .pick(&[GFN_MAX, GFN_MAX + 1, 1 << 40, u64::MAX >> 12, u64::MAX - 1]),
            _ => self.rng.next(),
        }
    }

    /// Any gfn, for calls that only read or whose change is harmless
    /// anywhere (suppress-#VE, log-dirty tracking): also the guest's own.
    pub(super) fn any_gfn(&mut self) -> u64 {
        match self.rng.below(4) {
            0 => self.rng.below(self.layout.end()),
            1 => self.rng.range(self.layout.image.0, self.layout.image.1 - 1),
            _ => self.mut_gfn(),
        }
    }

    pub(super) fn access_arg(&mut self) -> u64 {
        match self.rng.below(10) {
            0..=6 => self.rng.below(10),
            7 => self.rng.pick(&[access::W, access::WX]),
            8 => self.rng.pick(&[10, 11, 255, 256, 0x1_0002, u64::MAX]),
            _ => self.rng.next(),
        }
    }

    pub(super) fn flag_arg(&mut self) -> u64 {
        match self.rng.below(10) {
            0..=3 => 0,
            4..=7 => 1,
            8 => 2,
            _ => self.edge(),
        }
    }

    /// A guest-physical buffer of `len` bytes for the hypervisor to write
    /// (or read): in the buffer pages (straddling pages, ending at the end
    /// of RAM or one byte past it), in the legacy area, or not RAM.
    pub(super) fn buffer_arg(&mut self, len: u64) -> u64 {
        let top = self.layout.ram_top();
        let buffers = top - BUFFER_PAGES * PAGE;
        let len = len.min(BUFFER_PAGES * PAGE / 2);
        match self.rng.below(16) {
            0..=8 => buffers + self.rng.below(BUFFER_PAGES * PAGE - len),
            9 => top - len,
            10 => top - len + self.rng.range(1, 8),
            11 => self
                .rng
                .pick(&[0x9_f000 - len / 2, 0x10_0000 - len / 2, 0x9_f000 - 8]),
            12 => self
                .rng
                .pick(&[0xfed0_0000, 0xfee0_0000, 0xfec0_0000, 0xc000_0000 - 8]),
            13 => self
                .rng
                .pick(&[1 << 40, u64::MAX - 7, u64::MAX, top + PAGE]),
            14 => (self.tagged_released().unwrap_or(self.layout.end())) * PAGE,
            _ => buffers + PAGE - len / 2,
        }
    }

    /// `gfn`, or the first gfn past RAM where `gfn` is a buffer page:
    /// buffer pages are never restricted (the guest writes the arrays and
    /// reads the bitmaps there, and each denied access would be a monitor
    /// event).
    pub(super) fn unrestricted(&self, gfn: u64) -> u64 {
        if self.layout.is_buffer(gfn) {
            self.layout.end()
        } else {
            gfn
        }
    }

    /// An arena page given back, if any.
    pub(super) fn tagged_released(&mut self) -> Option<u64> {
        for _ in 0..16 {
            let g = self.tagged_page();
            if self.model.kind(&self.layout, g) == Kind::Released {
                return Some(g);
            }
        }
        None
    }

    // ---- operations ----

    /// One call of `hv-abi`, arguments from the generators.
    pub(super) fn hypercall_op(&mut self) -> Outcome {
        let number = self.rng.pick(&ALL_CALLS);
        match number {
            call::VERSION => {
                let args = [self.edge(), self.edge(), 0, 0];
                self.expect(number, args, Expect::Exact(1)).map(|_| ())
            }
            call::EXIT_COUNTS => self.exit_counts(),
            call::ALTP2M_GET_STATE..=call::ALTP2M_SET_VISIBILITY
                if self.model.mode != Mode::Mixed =>
            {
                let args = [
                    self.view_arg(),
                    self.mut_gfn(),
                    self.access_arg(),
                    self.edge(),
                ];
                let notify_call = number == call::ALTP2M_VCPU_DISABLE_NOTIFY;
                let expect = if self.model.mode == Mode::Limited && notify_call {
                    Expect::Exact(0)
                } else if self.model.mode == Mode::Limited
                    && number == call::ALTP2M_VCPU_ENABLE_NOTIFY
                {
                    return self.ve_op();
                } else {
                    Expect::Exact(EPERM)
                };
                if self.expect(number, args, expect)? == 0 && notify_call {
                    self.model.notify = None;
                }
                Ok(())
            }
            call::ALTP2M_GET_STATE => {
                let args = [self.edge(), 0, 0, 0];
                let expect = Expect::Exact(i64::from(self.model.enabled));
                self.expect(number, args, expect).map(|_| ())
            }
            call::ALTP2M_SET_STATE => {
                let flag = self.flag_arg();
                self.set_state(flag)
            }
            call::ALTP2M_VCPU_ENABLE_NOTIFY | call::ALTP2M_VCPU_DISABLE_NOTIFY => self.ve_op(),
            call::ALTP2M_CREATE_VIEW => {
                let a = self.access_arg();
                self.create_view(a)
            }
            call::ALTP2M_DESTROY_VIEW => {
                let v = self.view_arg();
                self.destroy_view(v)
            }
            call::ALTP2M_SWITCH_VIEW => {
                let v = self.view_arg();
                self.switch_view(None, v)
            }
            call::ALTP2M_SWITCH_VCPU_VIEW => {
                let vcpu = self.rng.pick(&[0, 0, 0, 1, 5, u64::MAX, 1 << 32]);
                let v = self.view_arg();
                self.switch_view(Some(vcpu), v)
            }
            call::ALTP2M_GET_VCPU_VIEW => {
                let vcpu = self.rng.pick(&[0, 0, 1, 2, u64::MAX, 1 << 32]);
                let expect = if vcpu == 0 {
                    Expect::Exact(i64::from(self.model.current))
                } else {
                    Expect::Exact(EINVAL)
                };
                self.expect(number, [vcpu, 0, 0, 0], expect).map(|_| ())
            }
            call::ALTP2M_SET_MEM_ACCESS => {
                let (v, g, a) = (self.view_arg(), self.mut_gfn(), self.access_arg());
                let g = self.unrestricted(g);
                self.set_mem_access(v, g, a)
            }
            call::ALTP2M_SET_MEM_ACCESS_MULTI => {
                let v = self.view_arg();
                self.set_mem_access_multi(v)
            }
            call::ALTP2M_GET_MEM_ACCESS | call::ALTP2M_GET_SUPPRESS_VE => {
                let (v, g) = (self.view_arg(), self.any_gfn());
                self.get_entry(number, v, g)
            }
            call::ALTP2M_CHANGE_GFN => {
                let v = self.view_arg();
                self.change_gfn(v)
            }
            call::ALTP2M_SET_SUPPRESS_VE => {
                let (v, g, f) = (self.view_arg(), self.any_gfn(), self.flag_arg());
                self.set_suppress_ve(v, g, f)
            }
            call::ALTP2M_SET_SUPPRESS_VE_MULTI => {
                let v = self.view_arg();
                self.set_suppress_ve_multi(v)
            }
            call::ALTP2M_SET_VISIBILITY => {
                let (v, f) = (self.view_arg(), self.flag_arg());
                self.set_visibility(v, f)
            }
            call::LOGDIRTY_TRACK => self.logdirty_track(),
            call::LOGDIRTY_FETCH => self.logdirty_fetch(),
            call::BALLOON_RELEASE => self.balloon_refused(),
            call::DISPLAY_SET => self.display_set(),
            call::DISPLAY_REFRESH => self.display_refresh(),
            _ => self.display_checksum(),
        }
    }

    /// A call number `hv-abi` does not have: ENOSYS, whatever the arguments.
    pub(super) fn unknown_op(&mut self) -> Outcome {
        let number = loop {
            let n = match self.rng.below(4) {
                0 => self.rng.below(0x100),
                1 => self
                    .rng
                    .pick(&[0x02, 0x0f, 0x21, 0x2f, 0x32, 0x41, 0x53, 0xff, 0x100]),
                _ => self.edge(),
            };
            if !ALL_CALLS.contains(&n) {
                break n;
            }
        };
        let args = [self.edge(), self.edge(), self.edge(), self.edge()];
        self.expect(number, args, Expect::Exact(ENOSYS)).map(|_| ())
    }

    fn exit_counts(&mut self) -> Outcome {
        let edge = self.edge();
        let n = self.rng.pick(&[0, 1, 8, 79, 80, 81, 1000, u64::MAX, edge]);
        let count = n.min(EXIT_REASONS);
        let at = self.buffer_arg(count * 8);
        let expect = if count == 0 || self.model.writable(&self.layout, at, count * 8) {
            Expect::Exact(count as i64)
        } else {
            Expect::Exact(EFAULT)
        };
        self.expect(call::EXIT_COUNTS, [at, n, 0, 0], expect)
            .map(|_| ())
    }

    pub(super) fn set_state(&mut self, flag: u64) -> Outcome {
        if flag > 1 {
            return self
                .expect(
                    call::ALTP2M_SET_STATE,
                    [flag, 0, 0, 0],
                    Expect::Exact(EINVAL),
                )
                .map(|_| ());
        }
        self.expect(call::ALTP2M_SET_STATE, [flag, 0, 0, 0], Expect::Exact(0))?;
        match (flag, self.model.enabled) {
            (1, false) => self.model.altp2m_on(),
            (0, true) => self.model.altp2m_off(),
            _ => {}
        }
        super::ve::sync(&self.model);
        Ok(())
    }

    fn create_expect(&self, default: u64) -> Expect {
        if !self.model.enabled || !access_valid(default) || self.model.live_views().len() >= 511 {
            Expect::Exact(EINVAL)
        } else {
            set(Some((1, 511)), &[ENOMEM])
        }
    }

    /// Creates a view with `default` access. A view whose default is not
    /// rwx is opened (the guest's own pages rwx) or hidden at once.
    pub(super) fn create_view(&mut self, default: u64) -> Outcome {
        if self.model.live_views().len() >= MAX_LIVE_VIEWS && self.model.enabled {
            // Keep the views few: destroy one instead.
            let views = self.model.live_views();
            let v = self.rng.pick(&views);
            return self.destroy_view(u64::from(v));
        }
        let expect = self.create_expect(default);
        let view = self.expect(call::ALTP2M_CREATE_VIEW, [default, 0, 0, 0], expect)?;
        if view <= 0 {
            return Ok(());
        }
        let fresh = self.model.views[view as usize].is_none();
        self.ensure(
            fresh,
            "CREATE_VIEW returned a view that exists",
            format_args!("view {view}"),
        )?;
        self.model.views[view as usize] = Some(ViewInfo {
            visible: true,
            runnable: default == access::RWX,
        });
        if default != access::RWX {
            if self.rng.chance(50) {
                self.open_image(view as u64)?;
            } else {
                self.set_visibility(view as u64, 0)?;
            }
        }
        Ok(())
    }

    /// Gives the guest's own pages and the buffer pages rwx in `view`: the
    /// guest can run there.
    fn open_image(&mut self, view: u64) -> Outcome {
        let (start, end) = self.layout.image;
        let buffers = self.layout.end() - BUFFER_PAGES..self.layout.end();
        let gfns = self.array_at(0);
        let accesses = self.array_at(1);
        let mut n = 0;
        for g in (start..end).chain(buffers) {
            if self.model.kind(&self.layout, g) == Kind::Released {
                continue;
            }
            self.put(gfns + 8 * n, g);
            self.put_u8(accesses + n, access::RWX as u8);
            n += 1;
        }
        self.expect(
            call::ALTP2M_SET_MEM_ACCESS_MULTI,
            [view, gfns, accesses, n],
            Expect::Exact(n as i64),
        )?;
        if let Some(info) = self.model.views[view as usize].as_mut() {
            info.runnable = true;
        }
        Ok(())
    }

    pub(super) fn destroy_view(&mut self, view: u64) -> Outcome {
        let expect = if !self.model.altp2m_view(view) {
            EINVAL
        } else if view == u64::from(self.model.current) {
            EBUSY
        } else {
            0
        };
        self.expect(
            call::ALTP2M_DESTROY_VIEW,
            [view, 0, 0, 0],
            Expect::Exact(expect),
        )?;
        if expect == 0 {
            self.model.destroy_view(view as u16);
        }
        Ok(())
    }

    /// SWITCH_VIEW (or SWITCH_VCPU_VIEW of `vcpu`) to `view`.
    pub(super) fn switch_view(&mut self, vcpu: Option<u64>, view: u64) -> Outcome {
        let ok = self.model.switchable(view) && vcpu.is_none_or(|v| v == 0);
        if ok && !self.model.runnable(view) {
            // The model never leaves a view the guest cannot run on visible.
            return Err(self.fail(
                "the model let a view the guest cannot run on be visible",
                format_args!("view {view}"),
            ));
        }
        let (number, args) = match vcpu {
            None => (call::ALTP2M_SWITCH_VIEW, [view, 0, 0, 0]),
            Some(vcpu) => (call::ALTP2M_SWITCH_VCPU_VIEW, [vcpu, view, 0, 0]),
        };
        self.expect(number, args, Expect::Exact(if ok { 0 } else { EINVAL }))?;
        if ok {
            self.model.current = view as u16;
        }
        Ok(())
    }

    pub(super) fn set_visibility(&mut self, view: u64, flag: u64) -> Outcome {
        // Never show a view the guest cannot run on.
        let flag = if flag == 1 && !self.model.runnable(view) && self.model.active(view) {
            0
        } else {
            flag
        };
        let ok = self.model.active(view) && flag <= 1;
        self.expect(
            call::ALTP2M_SET_VISIBILITY,
            [view, flag, 0, 0],
            Expect::Exact(if ok { 0 } else { EINVAL }),
        )?;
        if ok {
            let visible = flag == 1;
            if view == 0 {
                self.model.view0_visible = visible;
            } else if let Some(info) = self.model.views[view as usize].as_mut() {
                info.visible = visible;
            }
        }
        Ok(())
    }

    /// Focused on views: altp2m on, create, destroy, switch, show and hide.
    pub(super) fn view_op(&mut self) -> Outcome {
        if self.model.mode != Mode::Mixed {
            return self.hypercall_op();
        }
        if !self.model.enabled {
            return self.set_state(1);
        }
        match self.rng.below(40) {
            0 => self.set_state(0),
            1 => self.fill_views(),
            2..=12 => {
                let default = if self.rng.chance(60) {
                    access::RWX
                } else {
                    self.rng.below(10)
                };
                self.create_view(default)
            }
            13..=18 => {
                let v = self.view_arg();
                self.destroy_view(v)
            }
            19..=30 => {
                let target = self.runnable_view();
                let vcpu = self.rng.chance(30).then_some(0);
                self.switch_view(vcpu, target)
            }
            _ => {
                let v = self.view_arg();
                let flag = self.rng.below(2);
                self.set_visibility(v, flag)
            }
        }
    }

    /// A view the guest can run on (0 included), or another index.
    pub(super) fn runnable_view(&mut self) -> u64 {
        let views = self.model.live_views();
        let runnable: heapless::Vec<u16, 512> = views
            .iter()
            .copied()
            .filter(|&v| self.model.runnable(u64::from(v)))
            .collect();
        if runnable.is_empty() || self.rng.chance(15) {
            if self.rng.chance(50) {
                0
            } else {
                self.view_arg()
            }
        } else {
            u64::from(self.rng.pick(&runnable))
        }
    }

    /// Creates views until all 511 exist (the next is refused), then
    /// destroys them again.
    fn fill_views(&mut self) -> Outcome {
        let before = self.model.live_views().len();
        let mut made: heapless::Vec<u16, 512> = heapless::Vec::new();
        loop {
            let r = self.call(call::ALTP2M_CREATE_VIEW, [access::RWX, 0, 0, 0]);
            if r == EINVAL {
                break;
            }
            if !(1..=511).contains(&r) {
                return self
                    .check_result(
                        call::ALTP2M_CREATE_VIEW,
                        [access::RWX, 0, 0, 0],
                        r,
                        Expect::Exact(1),
                    )
                    .map(|_| ());
            }
            let _ = made.push(r as u16);
            if made.len() > 511 {
                break;
            }
        }
        let n = before + made.len();
        self.ensure(
            n == 511,
            "views could be created beyond 511, or fewer than 511 exist",
            format_args!("{before} views, {} more created", made.len()),
        )?;
        for v in made {
            self.expect(
                call::ALTP2M_DESTROY_VIEW,
                [u64::from(v), 0, 0, 0],
                Expect::Exact(0),
            )?;
        }
        Ok(())
    }

    /// VMFUNC to a random index (leaf 0), or another leaf: #UD unless the
    /// index names a visible view; then the hypervisor must see the switch.
    pub(super) fn vmfunc_op(&mut self) -> Outcome {
        let leaf = if self.rng.chance(10) {
            self.rng.pick(&[1, 2, 63, 64, u32::MAX])
        } else {
            0
        };
        let index = match self.rng.below(10) {
            0..=5 => self.runnable_view(),
            6 => self.rng.range(1, 511),
            7 => self.rng.pick(&[512, 513, 0xffff, 0x1_0000]),
            _ => self.rng.next() as u32 as u64,
        };
        let index32 = index as u32;
        let ok = leaf == 0 && self.vmfunc && self.model.switchable(u64::from(index32));
        if ok && !self.model.runnable(u64::from(index32)) {
            return Err(self.fail(
                "the model let a view the guest cannot run on be visible",
                format_args!("view {index32}"),
            ));
        }
        let result = probe::vmfunc_leaf(leaf, index32);
        let expected = if ok { Ok(()) } else { Err(6) };
        self.ensure(
            result == expected,
            "VMFUNC did not switch to a visible view, or did not raise #UD for an invalid or hidden one",
            format_args!("leaf {leaf} index {index32}: {result:?}, expected {expected:?}"),
        )?;
        if ok {
            self.model.current = index32 as u16;
        }
        let current = if self.model.mode == Mode::Mixed {
            i64::from(self.model.current)
        } else {
            EPERM
        };
        self.expect(call::ALTP2M_GET_VCPU_VIEW, [0; 4], Expect::Exact(current))
            .map(|_| ())
    }

    /// Access and suppress-#VE on arena pages in the model's views.
    pub(super) fn access_op(&mut self) -> Outcome {
        if self.model.mode != Mode::Mixed {
            return self.hypercall_op();
        }
        let view = if self.rng.chance(85) {
            let views = self.model.live_views();
            if views.is_empty() || self.rng.chance(20) {
                0
            } else {
                u64::from(self.rng.pick(&views))
            }
        } else {
            self.view_arg()
        };
        match self.rng.below(10) {
            0..=3 => {
                let gfn = self.tagged_page();
                let a = if self.rng.chance(85) {
                    self.rng.pick(&[
                        access::N,
                        access::R,
                        access::RW,
                        access::X,
                        access::RX,
                        access::RWX,
                        access::RX2RW,
                        access::N2RWX,
                    ])
                } else {
                    self.access_arg()
                };
                self.set_mem_access(view, gfn, a)
            }
            4..=6 => self.set_mem_access_multi(view),
            7 => {
                let gfn = self.tagged_page();
                let flag = self.flag_arg();
                self.set_suppress_ve(view, gfn, flag)
            }
            8 => self.set_suppress_ve_multi(view),
            _ => {
                let gfn = self.tagged_page();
                let number = self
                    .rng
                    .pick(&[call::ALTP2M_GET_MEM_ACCESS, call::ALTP2M_GET_SUPPRESS_VE]);
                self.get_entry(number, view, gfn)
            }
        }
    }

    /// What a per-gfn call on `view` at `gfn` gives, the view and gfn being
    /// the only possible failures: None for "0 or the value", else the error.
    fn entry_error(&self, view: u64, gfn: u64) -> Option<i64> {
        if view > u64::from(u16::MAX) || !self.model.active(view) {
            return Some(EINVAL);
        }
        let kind = self.model.kind(&self.layout, gfn);
        if kind == Kind::OutOfRange {
            return Some(EINVAL);
        }
        // A view's own alias at a gfn stays whatever the host does there.
        let aliased = view != 0 && self.model.remap_of(view as u16, gfn).is_some();
        match kind.mapped() {
            Some(false) if !aliased => Some(ENOENT),
            _ => None,
        }
    }

    pub(super) fn set_mem_access(&mut self, view: u64, gfn: u64, a: u64) -> Outcome {
        let valid = access_valid(a);
        self.set_and_read_back(call::ALTP2M_SET_MEM_ACCESS, view, gfn, a, valid)
    }

    pub(super) fn set_suppress_ve(&mut self, view: u64, gfn: u64, flag: u64) -> Outcome {
        self.set_and_read_back(call::ALTP2M_SET_SUPPRESS_VE, view, gfn, flag, flag <= 1)
    }

    /// SET_MEM_ACCESS or SET_SUPPRESS_VE of `value` (`valid` or EINVAL),
    /// then its GET reads the value back.
    fn set_and_read_back(
        &mut self,
        number: u64,
        view: u64,
        gfn: u64,
        value: u64,
        valid: bool,
    ) -> Outcome {
        let expect = if view > u64::from(u16::MAX) || !valid {
            EINVAL
        } else {
            self.entry_error(view, gfn).unwrap_or(0)
        };
        self.expect(number, [view, gfn, value, 0], Expect::Exact(expect))?;
        if expect == 0 {
            let get = if number == call::ALTP2M_SET_MEM_ACCESS {
                call::ALTP2M_GET_MEM_ACCESS
            } else {
                call::ALTP2M_GET_SUPPRESS_VE
            };
            self.expect(get, [view, gfn, 0, 0], Expect::Exact(value as i64))?;
        }
        Ok(())
    }

    fn get_entry(&mut self, number: u64, view: u64, gfn: u64) -> Outcome {
        let expect = match self.entry_error(view, gfn) {
            Some(e) => Expect::Exact(e),
            None if number == call::ALTP2M_GET_MEM_ACCESS => {
                set(Some((0, access::N2RWX as i64)), &[])
            }
            None => set(Some((0, 1)), &[]),
        };
        self.expect(number, [view, gfn, 0, 0], expect).map(|_| ())
    }

    /// The multi result of a run of per-gfn steps, each `None` (applied)
    /// or the error it stops at: the error if the first stops, else how
    /// many were applied; `all` if none stops.
    fn multi_expect(steps: impl Iterator<Item = Option<i64>>, all: u64) -> Expect {
        for (i, step) in steps.enumerate() {
            match step {
                Some(e) if i == 0 => return Expect::Exact(e),
                Some(_) => return Expect::Exact(i as i64),
                None => {}
            }
        }
        Expect::Exact(all as i64)
    }

    /// Two arrays in the buffer pages (gfns, accesses), or bad pointers.
    pub(super) fn set_mem_access_multi(&mut self, view: u64) -> Outcome {
        let count = match self.rng.below(10) {
            0..=5 => self.rng.range(1, 32),
            6 | 7 => self.rng.range(1, MULTI_MAX),
            8 => MULTI_MAX,
            _ => self.rng.pick(&[0, MULTI_MAX + 1, 100_000, u64::MAX]),
        };
        let n = count.min(MULTI_MAX);
        let mut gfns = self.array_at(0);
        let mut accesses = self.array_at(1);
        // A run of arena pages (splitting superpages), or scattered ones.
        let run = self.rng.chance(40).then(|| self.tagged_page());
        // What the items come to: an access out of range refuses the
        // whole call; else the first item that fails stops it.
        let mut out_of_range = false;
        let mut stop: Option<(u64, i64)> = None;
        // A run stays clear of the buffer pages.
        let run = run.map(|first| first.min(self.layout.end() - BUFFER_PAGES - n));
        for i in 0..n {
            let gfn = match run {
                Some(first) => first + i,
                None => {
                    let g = self.mut_gfn();
                    self.unrestricted(g)
                }
            };
            let a = if self.rng.chance(97) {
                self.rng.pick(&[
                    access::R,
                    access::RW,
                    access::RX,
                    access::RWX,
                    access::N,
                    access::X,
                ])
            } else {
                self.access_arg() & 0xff
            };
            self.put(gfns + 8 * i, gfn);
            self.put_u8(accesses + i, a as u8);
            out_of_range |= a > access::N2RWX;
            if stop.is_none() {
                let error = if access_valid(a) {
                    self.entry_error(view, gfn)
                } else {
                    Some(EINVAL)
                };
                stop = error.map(|e| (i, e));
            }
        }
        let bad = match self.rng.below(20) {
            0 => {
                gfns = self.buffer_arg(n * 8);
                self.defuse_gfns(gfns, n);
                true
            }
            1 => {
                accesses = self.buffer_arg(n);
                true
            }
            _ => false,
        };
        let expect = if count == 0 || count > MULTI_MAX || view > u64::from(u16::MAX) {
            Expect::Exact(EINVAL)
        } else if bad {
            // The arrays' content is whatever is there: only the pointers
            // are known.
            if !self.model.writable(&self.layout, gfns, n * 8)
                || !self.model.writable(&self.layout, accesses, n)
            {
                Expect::Exact(EFAULT)
            } else {
                documented_multi()
            }
        } else if out_of_range {
            // An access value out of range refuses the whole call.
            Expect::Exact(EINVAL)
        } else {
            match stop {
                None => Expect::Exact(n as i64),
                Some((0, e)) => Expect::Exact(e),
                Some((i, _)) => Expect::Exact(i as i64),
            }
        };
        self.expect(
            call::ALTP2M_SET_MEM_ACCESS_MULTI,
            [view, gfns, accesses, count],
            expect,
        )
        .map(|_| ())
    }

    /// A gfn array whose content is whatever a pointer finds there (earlier
    /// operations' arrays) may name the guest's own pages, and a restriction
    /// of its GDT, IDT or stack in view 0 stops the guest (an event's
    /// delivery through a denied page needs MTF: docs/limits.md). Keeps the
    /// found values, but for those that name the guest's image or a buffer
    /// page.
    fn defuse_gfns(&mut self, gfns: u64, n: u64) {
        if !self.model.writable(&self.layout, gfns, n * 8) {
            return;
        }
        let (start, end) = self.layout.image;
        for i in 0..n {
            let at = gfns + 8 * i;
            let Ok(g) = probe::read(at) else { continue };
            if (start..end).contains(&g) || self.layout.is_buffer(g) {
                self.put(at, self.layout.end());
            }
        }
    }

    /// A range from an arena page (or an edge), at most 512 pages, or a
    /// bad one.
    pub(super) fn set_suppress_ve_multi(&mut self, view: u64) -> Outcome {
        let first = if self.rng.chance(80) {
            self.tagged_page()
        } else {
            self.mut_gfn()
        };
        let last = match self.rng.below(10) {
            0..=5 => first.saturating_add(self.rng.below(64)),
            6 => first.saturating_add(MULTI_MAX - 1),
            7 => first.saturating_add(MULTI_MAX),
            8 => first.saturating_sub(1),
            _ => self.edge(),
        };
        let flag = self.flag_arg();
        let expect = if flag > 1
            || view > u64::from(u16::MAX)
            || first > last
            || last - first >= MULTI_MAX
        {
            Expect::Exact(EINVAL)
        } else {
            Self::multi_expect(
                (first..=last).map(|g| self.entry_error(view, g)),
                last - first + 1,
            )
        };
        self.expect(
            call::ALTP2M_SET_SUPPRESS_VE_MULTI,
            [view, first, last, flag],
            expect,
        )
        .map(|_| ())
    }

    /// Remaps: an arena page (or a hole) shows another arena page (or
    /// nothing mapped, or the revert).
    pub(super) fn remap_op(&mut self) -> Outcome {
        if self.model.mode != Mode::Mixed {
            return self.hypercall_op();
        }
        let view = if self.rng.chance(85) {
            let views = self.model.live_views();
            if views.is_empty() {
                self.view_arg()
            } else {
                u64::from(self.rng.pick(&views))
            }
        } else {
            self.view_arg()
        };
        self.change_gfn_in(view)
    }

    fn change_gfn(&mut self, view: u64) -> Outcome {
        self.change_gfn_in(view)
    }

    fn change_gfn_in(&mut self, view: u64) -> Outcome {
        let old = match self.rng.below(10) {
            0..=7 => self.tagged_page(),
            _ => self.mut_gfn(),
        };
        // The #VE page stays what it is in every view (docs/limits.md);
        // the buffer pages take the hypervisor's reads and writes by their
        // host frame, so no view remaps them either.
        if Some(old) == self.model.notify
            || self.layout.is_buffer(old)
            || self.model.remaps.is_full()
        {
            return Ok(());
        }
        // Another remap of the same view's pages, a revert, or anything.
        let existing: heapless::Vec<u64, 256> = self
            .model
            .remaps
            .iter()
            .filter(|r| u64::from(r.view) == view)
            .map(|r| r.old)
            .collect();
        let (old, new) = match self.rng.below(10) {
            // A breakpoint page: the shadow of a hidden breakpoint.
            0 => (old, self.tagged_page() / 16 * 16 + 5),
            1..=5 => (old, self.tagged_page()),
            6 | 7 if !existing.is_empty() => (self.rng.pick(&existing), hv_abi::INVALID_GFN),
            6 | 7 => (old, hv_abi::INVALID_GFN),
            8 => (old, self.mut_gfn()),
            _ => (old, self.edge()),
        };
        if Some(old) == self.model.notify || self.layout.is_buffer(old) {
            return Ok(());
        }
        let expect = if view == 0 || !self.model.altp2m_view(view) || old > GFN_MAX {
            EINVAL
        } else if new == hv_abi::INVALID_GFN {
            if self.model.remap_of(view as u16, old).is_some() {
                0
            } else {
                EINVAL
            }
        } else {
            match self.model.kind(&self.layout, new) {
                Kind::OutOfRange => EINVAL,
                Kind::Released | Kind::Hole => ENOENT,
                Kind::Mmio => EINVAL,
                Kind::Live | Kind::Spare => 0,
            }
        };
        self.expect(
            call::ALTP2M_CHANGE_GFN,
            [view, old, new, 0],
            Expect::Exact(expect),
        )?;
        if expect == 0 {
            if new == hv_abi::INVALID_GFN {
                self.model.drop_remap(view as u16, old);
            } else {
                self.model.set_remap(view as u16, old, new);
            }
        }
        Ok(())
    }

    // ---- buffers in the arena ----

    /// The start of scratch array `i` (0 or 1) in the buffer pages: 4 KiB
    /// each, page-aligned, away from where buffer_arg puts most buffers.
    pub(super) fn array_at(&self, i: u64) -> u64 {
        (self.layout.end() - BUFFER_PAGES) * PAGE + i * PAGE * 2
    }

    pub(super) fn put(&mut self, at: u64, value: u64) {
        if probe::write(at, value).is_err() {
            // View 0 restricts the page: lift it and write again.
            self.call(call::ALTP2M_SET_MEM_ACCESS, [0, at / PAGE, access::RWX, 0]);
            let _ = probe::write(at, value);
        }
    }

    pub(super) fn put_u8(&mut self, at: u64, value: u8) {
        if probe::write_u8(at, value).is_err() {
            self.call(call::ALTP2M_SET_MEM_ACCESS, [0, at / PAGE, access::RWX, 0]);
            let _ = probe::write_u8(at, value);
        }
    }
}

fn documented_multi() -> Expect {
    set(
        Some((1, MULTI_MAX as i64)),
        &[EINVAL, ENOENT, EFAULT, ENOMEM],
    )
}
