//! ACPI discovery: the CPUs (APIC ids) from the MADT.

use acpi::AcpiTables;
use acpi::madt::{Madt, MadtEntry};
use alloc::vec::Vec;
use hv_boot::acpi_tables::IdentityMapped;
use hv_boot::bootinfo::AcpiRoot;
use hv_core::devices::acpi::{HostPlatform, InterruptOverride, IoApic, LapicNmi};
use log::{info, warn};

pub const MAX_CPUS: usize = 64;

/// The processors the firmware lists as usable, and the interrupt hardware
/// a guest will get.
#[derive(Debug)]
pub struct Cpus {
    pub apic_ids: heapless::Vec<u32, MAX_CPUS>,
    pub platform: HostPlatform,
}

/// Finds the MADT (through the boot loader's RSDP copy, or by scanning the BIOS
/// area) and lists the enabled processors.
pub fn discover(root: Option<AcpiRoot>) -> Option<Cpus> {
    // SAFETY: the root pointer comes from the loader's validated RSDP tag; the
    // BIOS scan reads the legacy BIOS areas, which the direct map covers.
    let tables = unsafe {
        match root {
            Some(root) => {
                AcpiTables::from_rsdt(IdentityMapped, root.revision, root.address as usize)
            }
            None => AcpiTables::search_for_rsdp_bios(IdentityMapped),
        }
    };
    let tables = match tables {
        Ok(tables) => tables,
        Err(e) => {
            warn!("acpi: no usable tables ({e:?})");
            return None;
        }
    };
    let madt = match tables.find_table::<Madt>() {
        Ok(madt) => madt,
        Err(e) => {
            warn!("acpi: no MADT ({e:?})");
            return None;
        }
    };
    let mut cpus = Cpus {
        apic_ids: heapless::Vec::new(),
        platform: HostPlatform {
            local_apic: u64::from(madt.get().local_apic_address),
            io_apics: Vec::new(),
            overrides: Vec::new(),
            lapic_nmis: Vec::new(),
        },
    };
    let p = &mut cpus.platform;
    // MADT flags: bit 0 enabled, bit 1 online capable (ACPI 6.5 5.2.12.2).
    for entry in madt.get().entries() {
        let (id, flags) = match entry {
            MadtEntry::LocalApic(e) => (u32::from(e.apic_id), e.flags),
            MadtEntry::LocalX2Apic(e) => (e.x2apic_id, e.flags),
            MadtEntry::IoApic(e) => {
                p.io_apics.push(IoApic {
                    id: e.io_apic_id,
                    address: e.io_apic_address,
                    gsi_base: e.global_system_interrupt_base,
                });
                continue;
            }
            MadtEntry::InterruptSourceOverride(e) if e.bus == 0 => {
                p.overrides.push(InterruptOverride {
                    bus_irq: e.irq,
                    gsi: e.global_system_interrupt,
                    flags: e.flags,
                });
                continue;
            }
            MadtEntry::LocalApicNmi(e) => {
                p.lapic_nmis.push(LapicNmi {
                    processor: e.processor_id,
                    flags: e.flags,
                    lint: e.nmi_line,
                });
                continue;
            }
            _ => continue,
        };
        if flags & 0b11 != 0 && !cpus.apic_ids.contains(&id) && cpus.apic_ids.push(id).is_err() {
            warn!("acpi: more than {MAX_CPUS} CPUs; the rest are ignored");
            break;
        }
    }
    info!(
        "acpi: {} CPUs, APIC ids {:?}, local APIC at {:#x}, I/O APICs {:x?}",
        cpus.apic_ids.len(),
        cpus.apic_ids.as_slice(),
        cpus.platform.local_apic,
        cpus.platform
            .io_apics
            .iter()
            .map(|io| io.address)
            .collect::<Vec<_>>()
    );
    Some(cpus)
}
