//! A second client of fleeteventd's event socket, for tests that need another process or another
//! uid than the test's own (run under `setpriv`): `powernode-event-client SOCKET MESSAGE...`
//! connects, sends each message, and prints each reply on its own line. Exits non-zero, saying
//! why, when it cannot connect or a reply does not come within five seconds.

#![allow(clippy::print_stdout)]

use std::os::fd::AsRawFd;

use anyhow::{Context, Result};
use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr, sockopt};

/// Long enough for a loaded machine, short enough that a daemon that never accepts (finding 8)
/// fails the test promptly.
const REPLY_TIMEOUT_SECS: i64 = 5;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .context("usage: powernode-event-client SOCKET MESSAGE...")?;
    let fd = nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let tv = nix::sys::time::TimeVal::new(REPLY_TIMEOUT_SECS, 0);
    // SO_SNDTIMEO also bounds connect() on a unix socket whose backlog is full.
    nix::sys::socket::setsockopt(&fd, sockopt::SendTimeout, &tv)?;
    nix::sys::socket::setsockopt(&fd, sockopt::ReceiveTimeout, &tv)?;
    nix::sys::socket::connect(fd.as_raw_fd(), &UnixAddr::new(path.as_str())?)
        .with_context(|| format!("connecting to {path}"))?;
    let mut buf = vec![0u8; 4096];
    for msg in args {
        nix::sys::socket::send(fd.as_raw_fd(), msg.as_bytes(), MsgFlags::empty())
            .context("sending")?;
        let n = nix::sys::socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())
            .context("no reply from the event socket")?;
        println!("{}", String::from_utf8_lossy(&buf[..n]));
    }
    Ok(())
}
