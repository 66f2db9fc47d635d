//! Handing the proxy over to a new process without dropping a request.
//!
//! The running daemon listens on `<control socket>.upgrade`. A new `proxy run --upgrade`
//! connects and says `upgrade`; the old process freezes changes (a deploy under way finishes
//! first), sends its listening sockets (`SCM_RIGHTS`) with their addresses, and waits. The new
//! process loads the state file, takes over the control socket path, starts accepting and
//! says `ready`; only then does the old process stop accepting and drain. If anything fails
//! before `ready`, the old process thaws and keeps serving.
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
}

#[derive(Debug, Serialize, Deserialize)]
struct Offer {
    http: SocketAddr,
    https: SocketAddr,
}

/// What a new process receives from the old one.
pub struct TakenOver {
    pub http: std::net::TcpListener,
    pub https: std::net::TcpListener,
    /// Told `ready` once the new process serves.
    old_process: UnixStream,
}

impl TakenOver {
    /// Tells the old process to stop accepting and drain.
    pub fn ready(mut self) -> anyhow::Result<()> {
        self.old_process
            .write_all(b"ready\n")
            .context("cannot tell the old process we are ready")
    }
}

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
    let mut fds = [-1; 2];
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
    let [http, https]: [OwnedFd; 2] = owned
        .try_into()
        .map_err(|_| anyhow::anyhow!("the old process sent {fd_count} sockets instead of 2"))?;
    tracing::info!(http = %offer.http, https = %offer.https, "Received listening sockets from the old process");
    Ok(TakenOver {
        http: std::net::TcpListener::from(http),
        https: std::net::TcpListener::from(https),
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

/// Old side: one handover attempt on an accepted connection. Returns once the new process is
/// ready; an error means it is not, and this process keeps serving.
pub fn hand_over(
    stream: UnixStream,
    listeners: &Listeners,
    offer_http: SocketAddr,
    offer_https: SocketAddr,
) -> anyhow::Result<()> {
    stream.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if line.trim() != "upgrade" {
        bail!("unexpected handover request {line:?}");
    }
    let offer = serde_json::to_vec(&Offer {
        http: offer_http,
        https: offer_https,
    })?;
    stream.send_with_fd(
        &offer,
        &[listeners.http.as_raw_fd(), listeners.https.as_raw_fd()],
    )?;
    line.clear();
    reader.read_line(&mut line)?;
    if line.trim() != "ready" {
        let mut rest = String::new();
        let _ = reader.read_to_string(&mut rest);
        bail!("the new process did not get ready");
    }
    Ok(())
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
