//! hv-ept: the host p2m of a guest kept in the EPT format the CPU walks.
#![no_std]
