//! What the hypervisor emulates, virtualizes or filters for a guest: port
//! I/O (`ports`), the debug console (`console`), the ACPI tables that
//! describe the guest's platform (`acpi`).

pub mod acpi;
pub mod console;
pub mod mtrr;
pub mod ports;
