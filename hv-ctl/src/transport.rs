//! Byte channels to the hypervisor's control port: a serial device or pty
//! (what the emulators give, see docs/control.md "Transport"), a unix
//! socket (what `scripts/run --control` offers), or a TCP address (QEMU's
//! `-chardev socket`, a serial-to-network adapter).

use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// A two-way byte channel.
pub trait Transport: Send {
    /// Reads what is there, waiting at most `timeout` for the first byte:
    /// `Ok(0)` if none came, an `UnexpectedEof` error if the other end
    /// closed.
    fn recv(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize>;
    /// Writes all of `bytes`.
    fn send(&mut self, bytes: &[u8]) -> io::Result<()>;
}

fn closed() -> io::Error {
    io::Error::new(ErrorKind::UnexpectedEof, "the control channel was closed")
}

/// Reads from a stream whose reads time out (`set_read_timeout`).
fn recv_timed(read: io::Result<usize>) -> io::Result<usize> {
    match read {
        Ok(0) => Err(closed()),
        Ok(n) => Ok(n),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(0),
        Err(e) if e.kind() == ErrorKind::Interrupted => Ok(0),
        Err(e) => Err(e),
    }
}

/// A zero timeout would mean "block" to `set_read_timeout`.
fn at_least_a_millisecond(timeout: Duration) -> Duration {
    timeout.max(Duration::from_millis(1))
}

impl Transport for UnixStream {
    fn recv(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize> {
        self.set_read_timeout(Some(at_least_a_millisecond(timeout)))?;
        recv_timed(self.read(buf))
    }

    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write_all(bytes)
    }
}

impl Transport for TcpStream {
    fn recv(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize> {
        self.set_read_timeout(Some(at_least_a_millisecond(timeout)))?;
        recv_timed(self.read(buf))
    }

    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write_all(bytes)
    }
}

/// A serial device or a pty (either side), in raw mode: every byte passes
/// as it is, none is echoed or translated.
pub struct Serial {
    file: File,
}

impl Serial {
    /// Opens `path` and sets it raw.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NOCTTY)
            .open(path)?;
        Self::from_file(file)
    }

    /// Takes an open tty (for example a pty master the harness made) and
    /// sets it raw.
    pub fn from_file(file: File) -> io::Result<Self> {
        make_raw(&file)?;
        Ok(Self { file })
    }
}

/// Raw mode: no line discipline, no echo, 8 data bits, 115200 baud (what
/// the hypervisor's COM3 runs at; a pty ignores the speed).
pub fn make_raw(fd: &impl AsFd) -> io::Result<()> {
    use nix::sys::termios::{BaudRate, SetArg, cfmakeraw, cfsetspeed, tcgetattr, tcsetattr};
    let mut attrs = tcgetattr(fd.as_fd()).map_err(io::Error::from)?;
    cfmakeraw(&mut attrs);
    cfsetspeed(&mut attrs, BaudRate::B115200).map_err(io::Error::from)?;
    tcsetattr(fd.as_fd(), SetArg::TCSANOW, &attrs).map_err(io::Error::from)
}

impl Transport for Serial {
    fn recv(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let millis = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(millis)) {
            Ok(0) => return Ok(0),
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok(0),
            Err(e) => return Err(e.into()),
        }
        let revents = fds[0].revents().unwrap_or(PollFlags::empty());
        if !revents.contains(PollFlags::POLLIN) && revents.intersects(PollFlags::POLLHUP) {
            // A pty whose other side nobody holds open.
            return Err(closed());
        }
        match self.file.read(buf) {
            Ok(0) => Err(closed()),
            Ok(n) => Ok(n),
            // Linux returns EIO on a pty master whose slave was closed.
            Err(e) if e.raw_os_error() == Some(nix::libc::EIO) => Err(closed()),
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(e),
        }
    }

    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)?;
        self.file.flush()
    }
}

/// Opens what `target` names: `unix:PATH`, `tcp:HOST:PORT`, `serial:PATH`,
/// or a bare path (a socket is a unix socket, anything else a serial
/// device or pty) or `HOST:PORT`.
pub fn open(target: &str) -> io::Result<Box<dyn Transport>> {
    if let Some(path) = target.strip_prefix("unix:") {
        return Ok(Box::new(UnixStream::connect(path)?));
    }
    if let Some(addr) = target.strip_prefix("tcp:") {
        return Ok(Box::new(tcp(addr)?));
    }
    if let Some(path) = target.strip_prefix("serial:") {
        return Ok(Box::new(Serial::open(Path::new(path))?));
    }
    let path = Path::new(target);
    match std::fs::metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => Ok(Box::new(UnixStream::connect(path)?)),
        Ok(_) => Ok(Box::new(Serial::open(path)?)),
        Err(_) if target.contains(':') && !target.contains('/') => Ok(Box::new(tcp(target)?)),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("{target}: {e} (expected a socket, a serial device or pty, or HOST:PORT)"),
        )),
    }
}

fn tcp(addr: &str) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn recv(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize> {
        (**self).recv(buf, timeout)
    }

    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        (**self).send(bytes)
    }
}
