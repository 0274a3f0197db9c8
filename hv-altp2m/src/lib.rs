//! hv-altp2m: alternate EPT views of one guest, filled lazily from the host p2m.
#![no_std]
