//! Guest images, by boot protocol. Only Multiboot for now.

mod multiboot;

pub use multiboot::*;

#[cfg(test)]
pub(crate) use multiboot::tests;
