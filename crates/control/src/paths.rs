//! Where the control socket and the state live: the same places kamal-proxy uses, so Kamal's
//! volumes and `docker exec` calls find them.

use std::path::PathBuf;

/// `$KAMAL_PROXY_SOCKET`, else `$XDG_RUNTIME_DIR/kamal-proxy.sock`, else `/tmp/kamal-proxy.sock`.
pub fn socket_path() -> PathBuf {
    if let Some(path) = non_empty_env("KAMAL_PROXY_SOCKET") {
        return PathBuf::from(path);
    }
    match non_empty_env("XDG_RUNTIME_DIR") {
        Some(dir) => PathBuf::from(dir).join("kamal-proxy.sock"),
        None => PathBuf::from("/tmp/kamal-proxy.sock"),
    }
}

/// `$HOME/.config/kamal-proxy`.
pub fn config_dir() -> PathBuf {
    let home = non_empty_env("HOME").unwrap_or_else(|| ".".to_string());
    PathBuf::from(home).join(".config").join("kamal-proxy")
}

/// `$HOME/.config/kamal-proxy/kamal-proxy.state`.
pub fn state_path() -> PathBuf {
    config_dir().join("kamal-proxy.state")
}

/// `$HOME/.config/kamal-proxy/certs`: the ACME cache.
pub fn certificates_dir() -> PathBuf {
    config_dir().join("certs")
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}
