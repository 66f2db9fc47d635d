//! Handing the proxy over to a new process without dropping a request.
//!
//! The running daemon listens on `<control socket>.upgrade`. A new `proxy run --upgrade`
//! connects and says `upgrade`; the old process freezes changes (a deploy under way finishes
//! first), sends its listening sockets (`SCM_RIGHTS`) with their addresses, and waits. The new
//! process loads the state file, takes over the control socket path, starts accepting and
//! says `ready`; only then does the old process stop accepting and drain. If anything fails
//! before `ready`, the old process thaws and keeps serving.
//!
//! The HTTP/3 socket (UDP) is sent too, but two processes cannot read one UDP socket: each
//! would get packets of the other's QUIC connections. So the new process reads it only once
//! the old one has finished its HTTP/3 requests and stopped reading, which it says by closing
//! the handover connection. Until then, TCP serves everyone.
//!
//! Under systemd, `systemctl reload` sends SIGUSR2: the old process starts the binary found at
//! its own path with `--upgrade`, and the new one reports itself as the main PID.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use sendfd::{RecvWithFd, SendWithFd};
use serde::{Deserialize, Serialize};

/// How long each side waits for the other during a handover.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(60);

/// The path of the handover socket that belongs to `control_socket`.
pub fn socket_path(control_socket: &Path) -> PathBuf {
    let mut name = control_socket.as_os_str().to_owned();
    name.push(".upgrade");
    PathBuf::from(name)
}

/// The listening sockets a process can hand on.
pub struct Listeners {
    pub http: OwnedFd,
    pub https: OwnedFd,
    /// The HTTP/3 socket, when this process serves HTTP/3.
    pub http3: Option<OwnedFd>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Offer {
    http: SocketAddr,
    https: SocketAddr,
    /// Present when a third socket, the HTTP/3 one, follows the two TCP ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    http3: Option<SocketAddr>,
}

/// What a new process receives from the old one.
pub struct TakenOver {
    pub http: std::net::TcpListener,
    pub https: std::net::TcpListener,
    /// The old process's HTTP/3 socket: read it only after [`OldProcess::released`].
    pub http3: Option<std::net::UdpSocket>,
    /// Told `ready` once the new process serves.
    old_process: UnixStream,
}

impl TakenOver {
    /// Tells the old process to stop accepting and drain.
    pub fn ready(mut self) -> anyhow::Result<OldProcess> {
        self.old_process
            .write_all(b"ready\n")
            .context("cannot tell the old process we are ready")?;
        Ok(OldProcess(self.old_process))
    }
}

/// The old process, draining after a handover.
pub struct OldProcess(UnixStream);

impl OldProcess {
    /// Blocks until the old process no longer reads the HTTP/3 socket (it closes the handover
    /// connection then, or by exiting), or `limit` has passed.
    pub fn released(self, limit: Duration) {
        let _ = self.0.set_read_timeout(Some(limit));
        let mut rest = Vec::new();
        let _ = (&self.0).read_to_end(&mut rest);
    }
}

/// Old side: the connection to the process that took over. Dropping it tells that process
/// the HTTP/3 socket is free to read.
pub struct NewProcess(#[allow(dead_code)] UnixStream);

/// New side: asks the process serving `control_socket` for its listeners.
pub fn take_over(control_socket: &Path) -> anyhow::Result<TakenOver> {
    let path = socket_path(control_socket);
    let mut stream = UnixStream::connect(&path).with_context(|| {
        format!(
            "no running proxy to take over from ({} does not answer)",
            path.display()
        )
    })?;
    stream.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
    stream.write_all(b"upgrade\n")?;
    let mut message = [0u8; 1024];
    let mut fds = [-1; 3];
    let (length, fd_count) = stream
        .recv_with_fd(&mut message, &mut fds)
        .context("no answer from the old process")?;
    // Owning the descriptors first means they are closed on every error below.
    let owned: Vec<OwnedFd> = fds[..fd_count]
        .iter()
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    let offer: Offer = serde_json::from_slice(&message[..length])
        .context("the old process sent no usable offer")?;
    let expected = if offer.http3.is_some() { 3 } else { 2 };
    if owned.len() != expected {
        bail!("the old process sent {fd_count} sockets instead of {expected}");
    }
    let mut owned = owned.into_iter();
    let (Some(http), Some(https)) = (owned.next(), owned.next()) else {
        bail!("the old process sent {fd_count} sockets instead of {expected}");
    };
    let http3 = owned.next().map(std::net::UdpSocket::from);
    tracing::info!(http = %offer.http, https = %offer.https, http3 = ?offer.http3, "Received listening sockets from the old process");
    Ok(TakenOver {
        http: std::net::TcpListener::from(http),
        https: std::net::TcpListener::from(https),
        http3,
        old_process: stream,
    })
}

/// Old side: the handover socket, owner-only, replacing any stale one.
pub fn listen(control_socket: &Path) -> anyhow::Result<UnixListener> {
    let path = socket_path(control_socket);
    let staging = path.with_extension(format!("upgrade.{}", std::process::id()));
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging)
        .with_context(|| format!("cannot listen on {}", staging.display()))?;
    std::fs::set_permissions(
        &staging,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    std::fs::rename(&staging, &path)?;
    Ok(listener)
}

/// The addresses of the sockets offered, in the order they are sent.
pub struct Addresses {
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub http3: Option<SocketAddr>,
}

/// Old side: one handover attempt on an accepted connection. Returns once the new process is
/// ready; an error means it is not, and this process keeps serving.
pub fn hand_over(
    stream: UnixStream,
    listeners: &Listeners,
    addresses: &Addresses,
) -> anyhow::Result<NewProcess> {
    stream.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if line.trim() != "upgrade" {
        bail!("unexpected handover request {line:?}");
    }
    let http3 = listeners.http3.as_ref().zip(addresses.http3);
    let offer = serde_json::to_vec(&Offer {
        http: addresses.http,
        https: addresses.https,
        http3: http3.map(|(_, address)| address),
    })?;
    let mut fds = vec![listeners.http.as_raw_fd(), listeners.https.as_raw_fd()];
    fds.extend(http3.map(|(fd, _)| fd.as_raw_fd()));
    stream.send_with_fd(&offer, &fds)?;
    line.clear();
    reader.read_line(&mut line)?;
    if line.trim() != "ready" {
        let mut rest = String::new();
        let _ = reader.read_to_string(&mut rest);
        bail!("the new process did not get ready");
    }
    Ok(NewProcess(stream))
}

/// Tells systemd (when it supervises us, `Type=notify`) a state such as `READY=1`.
pub fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|address| socket.send_to_addr(state.as_bytes(), &address))
    } else {
        socket.send_to(state.as_bytes(), Path::new(&path))
    };
    if let Err(error) = sent {
        tracing::warn!(%error, "Cannot notify systemd");
    }
}

/// Starts this binary again (the file now at our path: a new version after an upgrade) with
/// the same arguments plus `--upgrade`.
pub fn spawn_successor() -> anyhow::Result<u32> {
    let exe = std::env::current_exe().context("cannot find this binary")?;
    // After the binary is replaced, /proc/self/exe names the old file as "... (deleted)".
    let exe = PathBuf::from(
        exe.to_string_lossy()
            .trim_end_matches(" (deleted)")
            .to_string(),
    );
    let mut args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| arg != "--upgrade")
        .collect();
    args.push("--upgrade".to_string());
    let mut child = std::process::Command::new(&exe)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    let pid = child.id();
    // Reap it if it fails, so no zombie is left behind.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(pid)
}
