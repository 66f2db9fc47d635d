//! The PROXY protocol (v1 text and v2 binary): the header a TCP load balancer sends ahead of
//! a connection to say who the client really is. Parsing is `ppp`'s; this module reads the
//! header off the socket without consuming a byte of what follows it.

use std::net::SocketAddr;
use std::time::Duration;

use ppp::{HeaderResult, PartialResult};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Longest header accepted: v2's fixed part and addresses, with room for TLVs.
const MAX_HEADER_BYTES: usize = 1024;
/// Longest v1 (text) header, by the specification.
const V1_MAX_BYTES: usize = 107;
/// How long to wait for the rest of a header that arrived in pieces.
const PARTIAL_HEADER_WAIT: Duration = Duration::from_millis(5);

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("connection closed before a PROXY protocol header")]
    Closed,
    #[error("no valid PROXY protocol header")]
    Invalid,
    #[error("PROXY protocol header longer than {MAX_HEADER_BYTES} bytes")]
    TooLong,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads the PROXY protocol header at the start of `stream`. Returns the client address it
/// names, or `None` for a connection the balancer made itself (v1 `UNKNOWN`, v2 `LOCAL`,
/// such as its health checks), which keeps the socket's own peer address.
pub async fn read_header(stream: &mut TcpStream) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut buffer = vec![0u8; MAX_HEADER_BYTES];
    loop {
        let available = stream.peek(&mut buffer).await?;
        if available == 0 {
            return Err(ProxyHeaderError::Closed);
        }
        let parsed = HeaderResult::parse(&buffer[..available]);
        let (length, source) = match &parsed {
            HeaderResult::V1(Ok(header)) => (header.header.len(), v1_source(&header.addresses)),
            HeaderResult::V2(Ok(header)) => (header.len(), v2_source(header)),
            incomplete if incomplete.is_incomplete() => {
                if available == buffer.len() {
                    return Err(ProxyHeaderError::TooLong);
                }
                // A v1 header ends at its first CRLF, within 107 bytes: past that, more
                // bytes cannot complete it.
                let peeked = &buffer[..available];
                if peeked.starts_with(b"PROXY")
                    && (peeked.windows(2).any(|w| w == b"\r\n") || available > V1_MAX_BYTES)
                {
                    return Err(ProxyHeaderError::Invalid);
                }
                // `peek` returns at once while any byte is waiting, so wait for more to come.
                tokio::time::sleep(PARTIAL_HEADER_WAIT).await;
                continue;
            }
            _ => return Err(ProxyHeaderError::Invalid),
        };
        stream.read_exact(&mut buffer[..length]).await?;
        return Ok(source);
    }
}

fn v1_source(addresses: &ppp::v1::Addresses) -> Option<SocketAddr> {
    match addresses {
        ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Unknown => None,
    }
}

fn v2_source(header: &ppp::v2::Header<'_>) -> Option<SocketAddr> {
    if header.command != ppp::v2::Command::Proxy {
        return None;
    }
    match header.addresses {
        ppp::v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// Sends `chunks` (with a pause between them) and returns what `read_header` made of
    /// them, plus the bytes left on the connection after it.
    async fn receive(chunks: Vec<Vec<u8>>) -> (Result<Option<SocketAddr>, String>, Vec<u8>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let sender = tokio::spawn(async move {
            let mut client = TcpStream::connect(address).await.unwrap();
            for chunk in chunks {
                client.write_all(&chunk).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let (mut stream, _) = listener.accept().await.unwrap();
        let result = read_header(&mut stream).await.map_err(|e| e.to_string());
        sender.await.unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        (result, rest)
    }

    #[tokio::test]
    async fn a_v1_header_gives_the_client_address_and_leaves_the_request() {
        let (source, rest) = receive(vec![
            b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 80\r\nGET / HTTP/1.1\r\n\r\n".to_vec(),
        ])
        .await;
        assert_eq!(source.unwrap(), Some("203.0.113.7:51234".parse().unwrap()));
        assert_eq!(rest, b"GET / HTTP/1.1\r\n\r\n");
    }

    #[tokio::test]
    async fn a_header_split_across_packets_is_read_whole() {
        let (source, rest) = receive(vec![
            b"PROXY TCP6 2001:db8::1 ".to_vec(),
            b"2001:db8::2 443 8443\r\nrest".to_vec(),
        ])
        .await;
        assert_eq!(source.unwrap(), Some("[2001:db8::1]:443".parse().unwrap()));
        assert_eq!(rest, b"rest");
    }

    #[tokio::test]
    async fn a_v2_header_gives_the_client_address_and_local_gives_none() {
        let header = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (
                "198.51.100.9:40000".parse::<SocketAddr>().unwrap(),
                "10.0.0.1:443".parse::<SocketAddr>().unwrap(),
            ),
        )
        .build()
        .unwrap();
        let mut sent = header.clone();
        sent.extend_from_slice(b"\x16\x03\x01");
        let (source, rest) = receive(vec![sent]).await;
        assert_eq!(source.unwrap(), Some("198.51.100.9:40000".parse().unwrap()));
        assert_eq!(rest, b"\x16\x03\x01");

        let local = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Local,
            ppp::v2::Protocol::Unspecified,
            ppp::v2::Addresses::Unspecified,
        )
        .build()
        .unwrap();
        assert_eq!(receive(vec![local]).await.0.unwrap(), None);
    }

    #[tokio::test]
    async fn a_connection_without_a_header_is_refused() {
        let (result, _) = receive(vec![b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()]).await;
        assert!(result.is_err());
        let (result, _) = receive(vec![]).await;
        assert!(result.is_err());
        let (result, _) =
            receive(vec![b"PROXY TCP4 nonsense\r\nGET / HTTP/1.1\r\n".to_vec()]).await;
        assert!(result.is_err());
    }
}
