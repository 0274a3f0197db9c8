//! hv-core: VMX bring-up, VMCS management and VM-exit handling.
#![no_std]
