//! hv-ctl: the host side of the hypervisor's control channel
//! (`docs/control.md`). A typed [`Client`] over any [`Transport`] (a serial
//! device or pty, a unix socket, TCP), with one method per command, the
//! events the hypervisor reports and their answers; guest memory images in
//! raw and LiME formats ([`dump`]); and the `hvctl` command-line tool built
//! on them. The protocol itself is the `hv-control` crate, shared with the
//! hypervisor.

pub mod client;
pub mod dump;
pub mod json;
pub mod transport;

pub use client::{Client, Error, EventRecord, Result, Session};
pub use hv_control as protocol;
pub use transport::{Serial, Transport};

/// Access names (`hv_abi::access` order, Xen's `xenmem_access_t`).
pub const ACCESS_NAMES: [&str; 10] = [
    "n", "r", "w", "rw", "x", "rx", "wx", "rwx", "rx2rw", "n2rwx",
];

/// The access value of a name (`rwx`) or number.
pub fn parse_access(text: &str) -> Option<u8> {
    ACCESS_NAMES
        .iter()
        .position(|&n| n == text)
        .map(|i| i as u8)
        .or_else(|| text.parse().ok())
}

/// The name of an access value.
pub fn access_name(access: u8) -> String {
    ACCESS_NAMES
        .get(usize::from(access))
        .map_or_else(|| access.to_string(), |n| (*n).to_string())
}
