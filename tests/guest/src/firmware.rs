//! The platform description the guest boots with: the ACPI tables, found
//! through the loader's RSDP tag or by the BIOS-area scan (ACPI 5.2.5.1;
//! the hypervisor puts its RSDP at 0xE0000), read with the `acpi` crate:
//! the MADT's processors and I/O APICs, the FADT's PM1a control block and
//! the DSDT's `\_S5` sleep type.

use acpi::AcpiTables;
use acpi::address::AddressSpace;
use acpi::fadt::Fadt;
use acpi::madt::{Madt, MadtEntry};
use hv_boot::acpi_tables::{IdentityMapped, s5_sleep_type};
use hv_boot::bootinfo::BootInfo;

/// A processor's local APIC as the MADT lists it.
#[derive(Clone, Copy, Debug)]
pub struct Cpu {
    pub apic_id: u8,
    pub enabled: bool,
}

#[derive(Debug)]
pub struct Description {
    /// How the RSDP was found.
    pub found_by: &'static str,
    pub local_apic: u64,
    pub cpus: heapless::Vec<Cpu, 16>,
    /// I/O APICs: id and MMIO address.
    pub io_apics: heapless::Vec<(u8, u32), 8>,
    /// The PM1a control block's I/O port, if the FADT names one in I/O space.
    pub pm1a_control: Option<u16>,
    /// SLP_TYPa of `\_S5` in the DSDT.
    pub s5_sleep_type: Option<u8>,
}

/// Reads the tables. `Err` says what is missing.
pub fn read(boot: &BootInfo) -> Result<Description, &'static str> {
    // SAFETY: the RSDT/XSDT address comes from the loader's validated RSDP
    // tag; the scan reads the BIOS areas, identity-mapped like all of the
    // low 4 GiB.
    let (tables, found_by) = unsafe {
        match boot.acpi_root {
            Some(root) => (
                AcpiTables::from_rsdt(IdentityMapped, root.revision, root.address as usize),
                "the loader's RSDP tag",
            ),
            None => (
                AcpiTables::search_for_rsdp_bios(IdentityMapped),
                "the BIOS-area scan",
            ),
        }
    };
    let tables = tables.map_err(|_| "no RSDP or no valid root table")?;
    let madt = tables.find_table::<Madt>().map_err(|_| "no MADT")?;
    let mut d = Description {
        found_by,
        local_apic: u64::from(madt.get().local_apic_address),
        cpus: heapless::Vec::new(),
        io_apics: heapless::Vec::new(),
        pm1a_control: None,
        s5_sleep_type: None,
    };
    for entry in madt.get().entries() {
        match entry {
            MadtEntry::LocalApic(e) => {
                let cpu = Cpu {
                    apic_id: e.apic_id,
                    enabled: e.flags & 1 != 0,
                };
                d.cpus.push(cpu).map_err(|_| "more than 16 processors")?;
            }
            MadtEntry::IoApic(e) => {
                d.io_apics
                    .push((e.io_apic_id, e.io_apic_address))
                    .map_err(|_| "more than 8 I/O APICs")?;
            }
            MadtEntry::LocalApicAddressOverride(e) => d.local_apic = e.local_apic_address,
            _ => {}
        }
    }
    let fadt = tables.find_table::<Fadt>().map_err(|_| "no FADT")?;
    if let Ok(block) = fadt.pm1a_control_block()
        && block.address_space == AddressSpace::SystemIo
    {
        d.pm1a_control = u16::try_from(block.address).ok();
    }
    if let Ok(dsdt) = tables.dsdt() {
        // SAFETY: the DSDT's AML, as its validated header measures it,
        // identity-mapped.
        let aml =
            unsafe { core::slice::from_raw_parts(dsdt.address as *const u8, dsdt.length as usize) };
        d.s5_sleep_type = s5_sleep_type(aml);
    }
    Ok(d)
}
