//! The Linux x86 zero page (`struct boot_params`) and the setup header in
//! it, as little-endian fields at byte offsets over a 4 KiB page. Offsets are
//! those of Documentation/arch/x86/boot.rst (setup header, the same offsets
//! in the bzImage file and in the zero page) and zero-page.rst (the rest).
//!
//! Why not a crate: rust-vmm's `linux-loader` has the definitions but needs
//! `std` (it is built on `vm-memory`); `linux-boot-params` builds `no_std`
//! but gives `repr(C, packed)` structs only, which become guest bytes (and
//! are read back from an untrusted image) only through `unsafe` transmutes.
//! Fields over a byte array need neither; the tests check every offset here
//! against `linux-boot-params`' structs with `offset_of!`.

use alloc::boxed::Box;

/// One field: byte offset and size (1, 2, 4 or 8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub offset: usize,
    pub size: usize,
}

const fn field(offset: usize, size: usize) -> Field {
    Field { offset, size }
}

impl Field {
    /// The field's value in `bytes` (an image or a zero page), if they reach it.
    pub fn read(self, bytes: &[u8]) -> Option<u64> {
        let raw = bytes.get(self.offset..self.offset + self.size)?;
        Some(
            raw.iter()
                .rev()
                .fold(0u64, |value, &b| value << 8 | u64::from(b)),
        )
    }
}

// The setup header (boot.rst "The Real-Mode Kernel Header").
pub const SETUP_SECTS: Field = field(0x1f1, 1);
pub const SYSSIZE: Field = field(0x1f4, 4);
pub const BOOT_FLAG: Field = field(0x1fe, 2);
/// A short jump (0xEB, offset) whose offset gives the header's length.
pub const JUMP: Field = field(0x200, 2);
pub const HEADER: Field = field(0x202, 4);
pub const VERSION: Field = field(0x206, 2);
pub const CODE32_START: Field = field(0x214, 4);
pub const TYPE_OF_LOADER: Field = field(0x210, 1);
pub const LOADFLAGS: Field = field(0x211, 1);
pub const RAMDISK_IMAGE: Field = field(0x218, 4);
pub const RAMDISK_SIZE: Field = field(0x21c, 4);
pub const EXT_LOADER_VER: Field = field(0x226, 1);
pub const EXT_LOADER_TYPE: Field = field(0x227, 1);
pub const CMD_LINE_PTR: Field = field(0x228, 4);
pub const INITRD_ADDR_MAX: Field = field(0x22c, 4);
pub const KERNEL_ALIGNMENT: Field = field(0x230, 4);
pub const RELOCATABLE_KERNEL: Field = field(0x234, 1);
pub const MIN_ALIGNMENT: Field = field(0x235, 1);
pub const XLOADFLAGS: Field = field(0x236, 2);
pub const CMDLINE_SIZE: Field = field(0x238, 4);
pub const HARDWARE_SUBARCH: Field = field(0x23c, 4);
pub const HARDWARE_SUBARCH_DATA: Field = field(0x240, 8);
pub const SETUP_DATA: Field = field(0x250, 8);
pub const PREF_ADDRESS: Field = field(0x258, 8);
pub const INIT_SIZE: Field = field(0x260, 4);

// The rest of the zero page (zero-page.rst).
pub const ACPI_RSDP_ADDR: Field = field(0x070, 8);
pub const EXT_RAMDISK_IMAGE: Field = field(0x0c0, 4);
pub const EXT_RAMDISK_SIZE: Field = field(0x0c4, 4);
pub const EXT_CMD_LINE_PTR: Field = field(0x0c8, 4);
pub const E820_ENTRIES: Field = field(0x1e8, 1);
/// Nonzero tells the kernel the loader copied garbage over the zero page.
pub const SENTINEL: Field = field(0x1ef, 1);
/// `struct boot_e820_entry e820_table[128]`: addr u64, size u64, type u32.
pub const E820_TABLE: usize = 0x2d0;
pub const E820_ENTRY_SIZE: usize = 20;
pub const E820_MAX_ENTRIES_ZEROPAGE: usize = 128;

/// "HdrS" at [`HEADER`].
pub const HDRS: u64 = 0x5372_6448;
pub const BOOT_FLAG_MAGIC: u64 = 0xaa55;
/// The setup header starts here, in the file and in the zero page.
pub const SETUP_HEADER_START: usize = 0x1f1;
/// The setup header must end before `edd_mbr_sig_buffer` (0x290).
pub const SETUP_HEADER_END_MAX: usize = 0x290;
/// `loadflags` bit 0: the protected-mode code loads at 1 MiB (a bzImage).
pub const LOADED_HIGH: u64 = 1 << 0;
/// `xloadflags` bit 0: the 64-bit entry point at load address + 0x200.
pub const XLF_KERNEL_64: u64 = 1 << 0;
/// `type_of_loader` of a loader without an assigned id.
pub const LOADER_UNDEFINED: u64 = 0xff;
pub const SIZE: usize = 4096;

/// A zero page being filled in.
#[derive(Clone, PartialEq, Eq)]
pub struct ZeroPage(Box<[u8; SIZE]>);

impl Default for ZeroPage {
    fn default() -> Self {
        Self(Box::new([0; SIZE]))
    }
}

impl ZeroPage {
    /// Every field above lies inside the page (a test checks it), so a
    /// write is never cut short.
    pub fn set(&mut self, field: Field, value: u64) {
        let bytes = value.to_le_bytes();
        if let Some(dst) = self.0.get_mut(field.offset..field.offset + field.size) {
            dst.copy_from_slice(&bytes[..field.size]);
        }
    }

    pub fn get(&self, field: Field) -> u64 {
        field.read(&self.0[..]).unwrap_or(0)
    }

    /// Copies bytes `SETUP_HEADER_START..end` of the image (the caller
    /// checked `end` against the image and [`SETUP_HEADER_END_MAX`]).
    pub fn copy_setup_header(&mut self, image: &[u8], end: usize) {
        if let (Some(dst), Some(src)) = (
            self.0.get_mut(SETUP_HEADER_START..end),
            image.get(SETUP_HEADER_START..end),
        ) {
            dst.copy_from_slice(src);
        }
    }

    /// Writes the E820 table; the caller checked the count against
    /// [`E820_MAX_ENTRIES_ZEROPAGE`].
    pub fn set_e820(&mut self, entries: impl ExactSizeIterator<Item = (u64, u64, u32)>) {
        self.set(E820_ENTRIES, entries.len() as u64);
        for (i, (addr, size, kind)) in entries.take(E820_MAX_ENTRIES_ZEROPAGE).enumerate() {
            let at = E820_TABLE + i * E820_ENTRY_SIZE;
            self.set(field(at, 8), addr);
            self.set(field(at + 8, 8), size);
            self.set(field(at + 16, 4), u64::from(kind));
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0[..]
    }
}

#[cfg(test)]
mod tests {
    use core::mem::offset_of;

    use linux_boot_params::{BootE820Entry, BootParams, SetupHeader};

    use super::*;

    #[test]
    fn offsets_match_the_kernel_structs() {
        let hdr = |offset: usize| SETUP_HEADER_START + offset;
        let cases = [
            (SETUP_SECTS, hdr(offset_of!(SetupHeader, setup_sects))),
            (SYSSIZE, hdr(offset_of!(SetupHeader, syssize))),
            (BOOT_FLAG, hdr(offset_of!(SetupHeader, boot_flag))),
            (JUMP, hdr(offset_of!(SetupHeader, jump))),
            (HEADER, hdr(offset_of!(SetupHeader, header))),
            (VERSION, hdr(offset_of!(SetupHeader, version))),
            (TYPE_OF_LOADER, hdr(offset_of!(SetupHeader, type_of_loader))),
            (LOADFLAGS, hdr(offset_of!(SetupHeader, loadflags))),
            (CODE32_START, hdr(offset_of!(SetupHeader, code32_start))),
            (RAMDISK_IMAGE, hdr(offset_of!(SetupHeader, ramdisk_image))),
            (RAMDISK_SIZE, hdr(offset_of!(SetupHeader, ramdisk_size))),
            (EXT_LOADER_VER, hdr(offset_of!(SetupHeader, ext_loader_ver))),
            (
                EXT_LOADER_TYPE,
                hdr(offset_of!(SetupHeader, ext_loader_type)),
            ),
            (CMD_LINE_PTR, hdr(offset_of!(SetupHeader, cmd_line_ptr))),
            (
                INITRD_ADDR_MAX,
                hdr(offset_of!(SetupHeader, initrd_addr_max)),
            ),
            (
                KERNEL_ALIGNMENT,
                hdr(offset_of!(SetupHeader, kernel_alignment)),
            ),
            (
                RELOCATABLE_KERNEL,
                hdr(offset_of!(SetupHeader, relocatable_kernel)),
            ),
            (MIN_ALIGNMENT, hdr(offset_of!(SetupHeader, min_alignment))),
            (XLOADFLAGS, hdr(offset_of!(SetupHeader, xloadflags))),
            (CMDLINE_SIZE, hdr(offset_of!(SetupHeader, cmdline_size))),
            (
                HARDWARE_SUBARCH,
                hdr(offset_of!(SetupHeader, hardware_subarch)),
            ),
            (
                HARDWARE_SUBARCH_DATA,
                hdr(offset_of!(SetupHeader, hardware_subarch_data)),
            ),
            (SETUP_DATA, hdr(offset_of!(SetupHeader, setup_data))),
            (PREF_ADDRESS, hdr(offset_of!(SetupHeader, pref_address))),
            (INIT_SIZE, hdr(offset_of!(SetupHeader, init_size))),
            (ACPI_RSDP_ADDR, offset_of!(BootParams, acpi_rsdp_addr)),
            (EXT_RAMDISK_IMAGE, offset_of!(BootParams, ext_ramdisk_image)),
            (EXT_RAMDISK_SIZE, offset_of!(BootParams, ext_ramdisk_size)),
            (EXT_CMD_LINE_PTR, offset_of!(BootParams, ext_cmd_line_ptr)),
            (E820_ENTRIES, offset_of!(BootParams, e820_entries)),
            (SENTINEL, offset_of!(BootParams, sentinel)),
        ];
        for (field, expected) in cases {
            assert_eq!(field.offset, expected, "{field:?}");
            assert!(field.offset + field.size <= SIZE);
        }
        assert_eq!(offset_of!(BootParams, hdr), SETUP_HEADER_START);
        assert_eq!(offset_of!(BootParams, e820_table), E820_TABLE);
        assert_eq!(size_of::<BootE820Entry>(), E820_ENTRY_SIZE);
        assert_eq!(size_of::<BootParams>(), SIZE);
        assert_eq!(
            E820_TABLE + E820_MAX_ENTRIES_ZEROPAGE * E820_ENTRY_SIZE,
            offset_of!(BootParams, _pad8),
            "the table ends where the kernel's does"
        );
        assert_eq!(HDRS, u64::from(linux_boot_params::LINUX_BOOT_HEADER_MAGIC));
        assert!(
            SETUP_HEADER_START + size_of::<SetupHeader>() <= SETUP_HEADER_END_MAX,
            "today's header fits the hole it is copied into"
        );
    }

    #[test]
    fn fields_are_little_endian_and_bounded() {
        let mut page = ZeroPage::default();
        page.set(PREF_ADDRESS, 0x1122_3344_5566_7788);
        assert_eq!(page.bytes()[0x258], 0x88);
        assert_eq!(page.bytes()[0x25f], 0x11);
        assert_eq!(page.get(PREF_ADDRESS), 0x1122_3344_5566_7788);
        page.set(TYPE_OF_LOADER, 0x1ff);
        assert_eq!(page.get(TYPE_OF_LOADER), 0xff, "one byte written");
        assert_eq!(page.bytes()[0x211], 0, "the next field is untouched");
        assert_eq!(INIT_SIZE.read(&[0u8; 0x263]), None, "a short image");
    }
}
