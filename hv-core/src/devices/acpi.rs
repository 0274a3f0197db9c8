//! The ACPI tables the hypervisor gives a guest: just enough for an OS to
//! find its CPUs, its local APIC and I/O APICs, its interrupt routing and
//! how to power off, all consistent with what it really gets.
//!
//! RSDP (ACPI 2.0, with both RSDT and XSDT), FADT (PM1a event and control
//! blocks at ports the hypervisor filters; no PM timer, no SMI command
//! port: ACPI mode from the start; i8042 present), FACS, DSDT (only `\_S5`),
//! MADT (one local APIC per vCPU with its APIC id, the I/O APICs, interrupt
//! source overrides and local APIC NMI entries as the firmware gave them).
//! Byte layouts: ACPI 6.5, sections 5.2.5 (RSDP), 5.2.6 (header), 5.2.9
//! (FADT), 5.2.10 (FACS), 5.2.12 (MADT).

use alloc::vec::Vec;

use crate::devices::ports::{PM1A_CNT, PM1A_EVT, SLP_TYP_S5};

/// An I/O APIC the guest is given (passed through).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoApic {
    pub id: u8,
    pub address: u32,
    pub gsi_base: u32,
}

/// An ISA interrupt routed to another GSI or with other polarity/trigger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterruptOverride {
    pub bus_irq: u8,
    pub gsi: u32,
    /// MPS INTI flags (polarity, trigger mode).
    pub flags: u16,
}

/// Which local APIC LINT pin is wired to NMI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LapicNmi {
    /// ACPI processor UID, 0xFF for all.
    pub processor: u8,
    pub flags: u16,
    pub lint: u8,
}

/// What the firmware told the hypervisor about the machine's interrupt
/// hardware, which the guest gets as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPlatform {
    pub local_apic: u64,
    pub io_apics: Vec<IoApic>,
    pub overrides: Vec<InterruptOverride>,
    pub lapic_nmis: Vec<LapicNmi>,
}

impl HostPlatform {
    /// A PC as Bochs and QEMU describe it: one I/O APIC at 0xFEC00000, the
    /// timer on GSI 2, the SCI level-triggered, NMI on LINT1.
    pub fn pc() -> Self {
        Self {
            local_apic: 0xfee0_0000,
            io_apics: alloc::vec![IoApic {
                id: 1,
                address: 0xfec0_0000,
                gsi_base: 0,
            }],
            overrides: alloc::vec![
                InterruptOverride {
                    bus_irq: 0,
                    gsi: 2,
                    flags: 0,
                },
                InterruptOverride {
                    bus_irq: 9,
                    gsi: 9,
                    flags: 0xd,
                },
            ],
            lapic_nmis: alloc::vec![LapicNmi {
                processor: 0xff,
                flags: 0,
                lint: 1,
            }],
        }
    }
}

/// Where the tables go in guest memory (the BIOS area the RSDP scan of
/// ACPI 5.2.5.1 covers; reserved in the guest's memory map).
pub const TABLES_AT: u64 = 0xe_0000;

const OEM_ID: &[u8; 6] = b"RSTHV ";
const OEM_TABLE_ID: &[u8; 8] = b"HVALTP2M";
/// SCI on ISA IRQ 9, as on PCs.
const SCI_IRQ: u16 = 9;

/// The tables as one blob to copy to [`TABLES_AT`], the RSDP first.
pub fn tables(platform: &HostPlatform, apic_ids: &[u32]) -> Vec<u8> {
    // The RSDP, RSDT and XSDT come first (their sizes are fixed by the two
    // entries); the FACS must be 64-byte aligned.
    const RSDT: usize = 0x40;
    const XSDT: usize = 0x80;
    const FACS: usize = 0xc0;
    let at = |offset: usize| TABLES_AT + offset as u64;
    let mut blob = alloc::vec![0u8; FACS];
    blob.extend_from_slice(&facs());
    let place = |blob: &mut Vec<u8>, table: &[u8]| {
        let offset = blob.len().next_multiple_of(16);
        blob.resize(offset, 0);
        blob.extend_from_slice(table);
        offset
    };
    let dsdt = place(&mut blob, &dsdt());
    let fadt = place(&mut blob, &fadt(at(FACS), at(dsdt)));
    let madt = place(&mut blob, &madt(platform, apic_ids));
    let entries = [at(fadt), at(madt)];
    let rsdt: Vec<u8> = entries
        .iter()
        .flat_map(|&a| (a as u32).to_le_bytes())
        .collect();
    let rsdt = sdt(b"RSDT", 1, &rsdt);
    blob[RSDT..RSDT + rsdt.len()].copy_from_slice(&rsdt);
    let xsdt: Vec<u8> = entries.iter().flat_map(|a| a.to_le_bytes()).collect();
    let xsdt = sdt(b"XSDT", 1, &xsdt);
    blob[XSDT..XSDT + xsdt.len()].copy_from_slice(&xsdt);
    blob[..36].copy_from_slice(&rsdp(at(RSDT), at(XSDT)));
    blob
}

/// RSDP, ACPI 2.0 form (36 bytes).
fn rsdp(rsdt: u64, xsdt: u64) -> [u8; 36] {
    let mut r = [0u8; 36];
    r[0..8].copy_from_slice(b"RSD PTR ");
    r[9..15].copy_from_slice(OEM_ID);
    r[15] = 2;
    r[16..20].copy_from_slice(&(rsdt as u32).to_le_bytes());
    r[20..24].copy_from_slice(&36u32.to_le_bytes());
    r[24..32].copy_from_slice(&xsdt.to_le_bytes());
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// A table: the 36-byte header, then `body`, with its checksum.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = 36 + body.len();
    let mut t = alloc::vec![0u8; len];
    t[0..4].copy_from_slice(signature);
    t[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    t[8] = revision;
    t[10..16].copy_from_slice(OEM_ID);
    t[16..24].copy_from_slice(OEM_TABLE_ID);
    t[24..28].copy_from_slice(&1u32.to_le_bytes());
    t[28..32].copy_from_slice(b"RHV ");
    t[32..36].copy_from_slice(&1u32.to_le_bytes());
    t[36..].copy_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// A generic address structure for a system I/O port block.
fn gas_io(port: u16, bytes: u8) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O
    g[1] = bytes * 8;
    g[3] = if bytes == 4 { 3 } else { 2 }; // access size: dword / word
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

/// FADT, revision 5 (ACPI 5.0 layout, 268 bytes).
fn fadt(facs: u64, dsdt: u64) -> Vec<u8> {
    let mut b = alloc::vec![0u8; 268 - 36];
    let mut put = |offset: usize, bytes: &[u8]| {
        b[offset - 36..offset - 36 + bytes.len()].copy_from_slice(bytes);
    };
    put(36, &(facs as u32).to_le_bytes());
    put(40, &(dsdt as u32).to_le_bytes());
    put(46, &SCI_IRQ.to_le_bytes());
    // SMI_CMD 0: no transition to make, the machine is in ACPI mode.
    put(56, &u32::from(PM1A_EVT).to_le_bytes());
    put(64, &u32::from(PM1A_CNT).to_le_bytes());
    put(88, &[4]); // PM1_EVT_LEN
    put(89, &[2]); // PM1_CNT_LEN
    // IAPC_BOOT_ARCH: legacy devices, 8042; no VGA, no MSI, no ASPM.
    put(109, &(0b11u16 | 1 << 2 | 1 << 3 | 1 << 4).to_le_bytes());
    // Flags: WBINVD, C1 supported, power and sleep buttons are control
    // methods (none exist), RTC wake in fixed regs not supported.
    put(112, &(1u32 | 1 << 2 | 1 << 4 | 1 << 5).to_le_bytes());
    put(131, &[0]); // FADT minor version
    put(132, &facs.to_le_bytes()); // X_FIRMWARE_CTRL
    put(140, &dsdt.to_le_bytes()); // X_DSDT
    put(148, &gas_io(PM1A_EVT, 4));
    put(172, &gas_io(PM1A_CNT, 2));
    sdt(b"FACP", 5, &b)
}

/// FACS (64 bytes): no firmware waking vector, no global lock owner.
fn facs() -> [u8; 64] {
    let mut f = [0u8; 64];
    f[0..4].copy_from_slice(b"FACS");
    f[4..8].copy_from_slice(&64u32.to_le_bytes());
    f[32] = 2; // version
    f
}

/// DSDT: `Name (_S5, Package (4) { 5, 5, 0, 0 })` and nothing else.
fn dsdt() -> Vec<u8> {
    let typ = SLP_TYP_S5 as u8;
    // NameOp "_S5_" PackageOp PkgLength(8) NumElements(4)
    //   BytePrefix typ, BytePrefix typ, ZeroOp, ZeroOp.
    let aml = [
        0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, typ, 0x0a, typ, 0x00, 0x00,
    ];
    sdt(b"DSDT", 2, &aml)
}

/// MADT: local APICs of the vCPUs, then I/O APICs, overrides, NMI wiring.
fn madt(platform: &HostPlatform, apic_ids: &[u32]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(platform.local_apic as u32).to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: 8259s present
    for (uid, &id) in apic_ids.iter().enumerate() {
        b.extend_from_slice(&[0, 8, uid as u8, id as u8]);
        b.extend_from_slice(&1u32.to_le_bytes()); // enabled
    }
    for io in &platform.io_apics {
        b.extend_from_slice(&[1, 12, io.id, 0]);
        b.extend_from_slice(&io.address.to_le_bytes());
        b.extend_from_slice(&io.gsi_base.to_le_bytes());
    }
    for o in &platform.overrides {
        b.extend_from_slice(&[2, 10, 0, o.bus_irq]);
        b.extend_from_slice(&o.gsi.to_le_bytes());
        b.extend_from_slice(&o.flags.to_le_bytes());
    }
    for n in &platform.lapic_nmis {
        b.extend_from_slice(&[4, 6, n.processor]);
        b.extend_from_slice(&n.flags.to_le_bytes());
        b.push(n.lint);
    }
    sdt(b"APIC", 4, &b)
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)))
}

#[cfg(test)]
mod tests {
    extern crate std;

    use core::ptr::NonNull;

    use acpi::madt::{Madt, MadtEntry};
    use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};

    use super::*;

    /// The tables as a guest would see them: the blob placed at TABLES_AT.
    #[derive(Clone)]
    struct Blob(&'static [u8]);

    impl AcpiHandler for Blob {
        unsafe fn map_physical_region<T>(
            &self,
            address: usize,
            size: usize,
        ) -> PhysicalMapping<Self, T> {
            let offset = address - TABLES_AT as usize;
            assert!(offset + size <= self.0.len(), "a table outside the blob");
            let ptr = NonNull::new(self.0[offset..].as_ptr() as *mut T).unwrap();
            // SAFETY: the pointer is into the leaked blob, which lives for
            // the test, and covers `size` bytes (checked above).
            unsafe { PhysicalMapping::new(address, ptr, size, size, self.clone()) }
        }

        fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
    }

    #[test]
    fn the_tables_parse_and_list_exactly_the_vcpus_and_the_interrupt_hardware() {
        let blob: &'static [u8] = std::vec::Vec::leak(tables(&HostPlatform::pc(), &[0, 1]));
        // SAFETY: the handler serves the blob, which holds the RSDP first.
        let acpi = unsafe { AcpiTables::from_rsdp(Blob(blob), TABLES_AT as usize) }.unwrap();
        let madt = acpi.find_table::<Madt>().unwrap();
        let mut cpus = std::vec::Vec::new();
        let mut io_apics = std::vec::Vec::new();
        let mut overrides = std::vec::Vec::new();
        let mut nmis = 0;
        for entry in madt.get().entries() {
            match entry {
                MadtEntry::LocalApic(e) => cpus.push((e.processor_id, e.apic_id, { e.flags })),
                MadtEntry::IoApic(e) => io_apics.push(({ e.io_apic_address }, e.io_apic_id)),
                MadtEntry::InterruptSourceOverride(e) => {
                    overrides.push((e.irq, { e.global_system_interrupt }))
                }
                MadtEntry::LocalApicNmi(e) => {
                    nmis += 1;
                    assert_eq!(e.nmi_line, 1);
                }
                _ => panic!("an unexpected MADT entry"),
            }
        }
        assert_eq!(cpus, [(0, 0, 1), (1, 1, 1)]);
        assert_eq!(io_apics, [(0xfec0_0000, 1)]);
        assert_eq!(overrides, [(0, 2), (9, 9)]);
        assert_eq!(nmis, 1);
        assert_eq!({ madt.get().local_apic_address }, 0xfee0_0000);
        let fadt = acpi.find_table::<acpi::fadt::Fadt>().unwrap();
        let pm1a = fadt.get().pm1a_control_block().unwrap();
        assert_eq!(pm1a.address, u64::from(PM1A_CNT));
        assert_eq!({ fadt.get().sci_interrupt }, 9);
        if let Err(e) = acpi.dsdt() {
            panic!("no DSDT: {e:?}");
        }
        // The \_S5 package in the DSDT's AML.
        let dsdt = acpi.dsdt().unwrap();
        let start = dsdt.address - TABLES_AT as usize;
        let aml = &blob[start..start + dsdt.length as usize];
        let s5 = aml.windows(4).position(|w| w == b"_S5_").unwrap();
        assert_eq!(aml[s5 + 7..s5 + 10], [0x0a, SLP_TYP_S5 as u8, 0x0a]);
    }

    #[test]
    fn every_table_sums_to_zero() {
        let blob = tables(&HostPlatform::pc(), &[3]);
        assert_eq!(blob[..20].iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        assert_eq!(blob[..36].iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        let mut offsets = std::vec![0x40, 0x80];
        for i in 0..2 {
            let entry = &blob[0x80 + 36 + 8 * i..0x80 + 44 + 8 * i];
            offsets
                .push(u64::from_le_bytes(entry.try_into().unwrap()) as usize - TABLES_AT as usize);
        }
        let fadt = offsets[2];
        let dsdt = u64::from_le_bytes(blob[fadt + 140..fadt + 148].try_into().unwrap());
        offsets.push(dsdt as usize - TABLES_AT as usize);
        assert_eq!(&blob[offsets[4]..offsets[4] + 4], b"DSDT");
        for offset in offsets {
            let len = u32::from_le_bytes(blob[offset + 4..offset + 8].try_into().unwrap()) as usize;
            let sum = blob[offset..offset + len]
                .iter()
                .fold(0u8, |a, &b| a.wrapping_add(b));
            assert_eq!(sum, 0, "table at {offset:#x}");
        }
    }
}
