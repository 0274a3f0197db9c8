//! Reading ACPI tables in place where physical memory is identity-mapped
//! (the hypervisor's direct map, the test guest's low 4 GiB): the `acpi`
//! crate's handler that maps nothing, and the one thing of the DSDT's AML an
//! OS needs to power off, the `\_S5` sleep type.

use core::ptr::NonNull;

use acpi::{AcpiHandler, PhysicalMapping};

/// Physical address = virtual address.
#[derive(Clone, Copy, Debug)]
pub struct IdentityMapped;

impl AcpiHandler for IdentityMapped {
    unsafe fn map_physical_region<T>(
        &self,
        physical_address: usize,
        size: usize,
    ) -> PhysicalMapping<Self, T> {
        // SAFETY: the caller's physical memory is identity-mapped (the
        // handler's contract), and the acpi crate asks only for regions it
        // found through validated table pointers.
        unsafe {
            PhysicalMapping::new(
                physical_address,
                NonNull::new(physical_address as *mut T).expect("ACPI never maps address 0"),
                size,
                size,
                *self,
            )
        }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// SLP_TYPa of `Name (_S5, Package () { a, b, ... })` in an AML stream:
/// the package's first element (ACPI 6.5 section 7.4.2). Found the way
/// small kernels do, by its encoding rather than by running the AML:
/// NameOp, `_S5_` (or `\_S5_`), PackageOp, PkgLength, NumElements, then an
/// integer (ZeroOp, OneOp or a byte, word or dword constant).
pub fn s5_sleep_type(aml: &[u8]) -> Option<u8> {
    const NAME_OP: u8 = 0x08;
    const PACKAGE_OP: u8 = 0x12;
    (0..aml.len().saturating_sub(4)).find_map(|at| {
        if &aml[at..at + 4] != b"_S5_" {
            return None;
        }
        let named = match at {
            0 => false,
            1 => aml[0] == NAME_OP,
            _ => aml[at - 1] == NAME_OP || (aml[at - 1] == b'\\' && aml[at - 2] == NAME_OP),
        };
        if !named || *aml.get(at + 4)? != PACKAGE_OP {
            return None;
        }
        // PkgLength: bits 7-6 of its lead byte count the bytes that follow.
        let lead = *aml.get(at + 5)?;
        let first = at + 5 + 1 + usize::from(lead >> 6) + 1;
        match *aml.get(first)? {
            0x00 => Some(0),
            0x01 => Some(1),
            0x0a..=0x0c => aml.get(first + 1).copied(),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AML of a DSDT in `tables` (the blob the hypervisor gives its guests).
    fn dsdt_aml(tables: &[u8]) -> &[u8] {
        let at = tables
            .windows(4)
            .position(|w| w == b"DSDT")
            .expect("a DSDT");
        let len = u32::from_le_bytes(tables[at + 4..at + 8].try_into().unwrap()) as usize;
        &tables[at + 36..at + len]
    }

    #[test]
    fn finds_the_sleep_type_in_the_hypervisors_own_dsdt() {
        use hv_core::devices::acpi::{HostPlatform, tables};
        use hv_core::devices::ports::SLP_TYP_S5;
        let blob = tables(&HostPlatform::pc(), &[0]);
        assert_eq!(s5_sleep_type(dsdt_aml(&blob)), Some(SLP_TYP_S5 as u8));
    }

    #[test]
    fn reads_every_integer_encoding_behind_a_rooted_or_plain_name() {
        // Bochs's and QEMU's old DSDT: Name (\_S5, Package (4) { Zero, ... }).
        let rooted_zero = [
            0x10, 0x08, b'\\', b'_', b'S', b'5', b'_', 0x12, 0x06, 0x04, 0x00, 0x00, 0x00, 0x00,
        ];
        assert_eq!(s5_sleep_type(&rooted_zero), Some(0));
        let one = [
            0x08, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x04, 0x01, 0x01, 0x00, 0x00,
        ];
        assert_eq!(s5_sleep_type(&one), Some(1));
        // A two-byte PkgLength and a word constant.
        let word = [
            0x08, b'_', b'S', b'5', b'_', 0x12, 0x40, 0x01, 0x02, 0x0b, 0x07, 0x00, 0x0b, 0x07,
            0x00,
        ];
        assert_eq!(s5_sleep_type(&word), Some(7));
    }

    #[test]
    fn a_mention_that_is_not_the_package_is_not_taken() {
        // A method reading \_S5 (no NameOp before it), then the real one.
        let aml = [
            0x70, b'_', b'S', b'5', b'_', 0x60, 0x08, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x04,
            0x0a, 0x05, 0x0a, 0x05, 0x00, 0x00,
        ];
        assert_eq!(s5_sleep_type(&aml), Some(5));
        assert_eq!(s5_sleep_type(b"\x08_S5_"), None, "no package after it");
        assert_eq!(
            s5_sleep_type(&[0x08, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x04, 0x5b]),
            None
        );
        assert_eq!(s5_sleep_type(&[]), None);
    }
}
