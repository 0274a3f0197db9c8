//! The control channel of a run (docs/control.md, "Transport"): a pty whose
//! slave side is the emulator's COM3 (Bochs `mode=term`, QEMU's tty
//! backend) and whose master side the test drives through `hv_ctl`. A pty
//! needs no network, so Bochs keeps its network namespace, and it works the
//! same for both emulators. For a person, [`bridge`] serves the master on a
//! unix socket that `hvctl --connect` takes, one client after another.

use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hv_ctl::{Serial, Transport};

/// Index of the control port among the serial ports (COM3, 0x3E8).
pub const COM_INDEX: usize = 2;

/// A pty for the emulator's COM3.
pub struct Channel {
    /// The slave's path, which the emulator opens.
    pub path: PathBuf,
    /// The master, until the test takes it.
    pub host: Option<Serial>,
    /// Held open for the run: a pty whose slave nobody holds gives the
    /// master EIO, and the emulator opens it only after it starts.
    _slave: OwnedFd,
}

impl Channel {
    pub fn open() -> Result<Self, String> {
        let pty = nix::pty::openpty(None, None)
            .map_err(|e| format!("cannot make a pty for the control channel: {e}"))?;
        let path = nix::unistd::ttyname(&pty.slave)
            .map_err(|e| format!("the control channel's pty has no name: {e}"))?;
        hv_ctl::transport::make_raw(&pty.slave)
            .map_err(|e| format!("cannot set the control channel's pty raw: {e}"))?;
        let host = Serial::from_file(File::from(pty.master))
            .map_err(|e| format!("cannot set the control channel's pty raw: {e}"))?;
        Ok(Self {
            path,
            host: Some(host),
            _slave: pty.slave,
        })
    }
}

/// Serves `host` on a unix socket at `socket` from a thread: each client in
/// turn gets the channel's bytes and its bytes go to the channel. Bytes
/// that arrive while no client is connected wait in the pty.
pub fn bridge(host: Serial, socket: &Path) -> Result<(), String> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)
        .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
    let host = Arc::new(Mutex::new(host));
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            relay(&host, client);
        }
    });
    Ok(())
}

/// Copies both ways until the client goes (or the channel fails).
fn relay(host: &Mutex<Serial>, mut client: UnixStream) {
    const TICK: Duration = Duration::from_millis(5);
    let mut buf = [0u8; 4096];
    let mut host = host.lock().expect("one relay at a time");
    loop {
        match client.recv(&mut buf, TICK) {
            Ok(0) => {}
            Ok(n) => {
                if host.send(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
        match host.recv(&mut buf, TICK) {
            Ok(0) => {}
            Ok(n) => {
                if let Err(e) = client.send(&buf[..n])
                    && e.kind() != ErrorKind::WouldBlock
                {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}
