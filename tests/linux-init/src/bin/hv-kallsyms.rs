//! `hv-kallsyms VMLINUX`: prints the System.map of an uncompressed kernel
//! image, decoded from its kallsyms tables (see `hv_linux_init::kallsyms`).
//! scripts/linux-assets runs it on Debian's kernel, whose package ships
//! only a placeholder System.map.

use std::io::{self, BufWriter, Write};
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: hv-kallsyms VMLINUX > System.map");
        return ExitCode::FAILURE;
    };
    let image = match std::fs::read(&path) {
        Ok(image) => image,
        Err(e) => {
            eprintln!("hv-kallsyms: {path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let symbols = match hv_linux_init::kallsyms::symbols(&image) {
        Ok(symbols) => symbols,
        Err(e) => {
            eprintln!("hv-kallsyms: {path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = BufWriter::new(io::stdout().lock());
    for symbol in &symbols {
        if writeln!(out, "{}", symbol.line()).is_err() {
            return ExitCode::FAILURE;
        }
    }
    match out.flush() {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}
