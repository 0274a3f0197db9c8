//! hv-tests: host-side harness that builds the hypervisor ISO, boots it in an emulator and reads its serial log.
