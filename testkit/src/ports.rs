//! TCP ports on 127.0.0.1: a free one for a server about to start, and whether a NATS server
//! answers on one. A free port is bound then released, so another process may take it before
//! it is used; the servers of [`crate::nats_server`] and [`crate::nats_cluster`] retry on
//! another port when that happens. Nothing here knows the CRM.

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

/// A free TCP port on 127.0.0.1, or why there is none.
pub fn try_free_port() -> std::io::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// [`try_free_port`] for tests: panics when there is no free port.
pub fn free_port() -> u16 {
    try_free_port().unwrap_or_else(|e| panic!("no free TCP port on 127.0.0.1: {e}"))
}

/// `count` free ports, all different.
pub fn distinct_free_ports(count: usize) -> Vec<u16> {
    let mut ports: Vec<u16> = Vec::with_capacity(count);
    while ports.len() < count {
        let port = free_port();
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    ports
}

/// Whether a NATS server on 127.0.0.1:`port` sends its `INFO` greeting.
pub fn accepts_clients(port: u16) -> bool {
    let Ok(stream) = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    ) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("INFO")
}
