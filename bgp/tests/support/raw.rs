//! A scripted raw BGP peer for probing the daemons with hand-made messages (e.g. a
//! NOTIFICATION in OpenSent or OpenConfirm), independent of podroute's codec. The daemon is
//! configured active towards `endpoint` and connects to our listener.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::{Endpoint, HarnessError, Result, err};

pub struct RawPeer {
    pub endpoint: Endpoint,
    listener: TcpListener,
}

impl RawPeer {
    pub fn listen(endpoint: Endpoint) -> Result<RawPeer> {
        let listener = TcpListener::bind((endpoint.addr, endpoint.port))
            .map_err(|e| HarnessError(format!("bind {}:{}: {e}", endpoint.addr, endpoint.port)))?;
        listener.set_nonblocking(true).expect("nonblocking");
        Ok(RawPeer { endpoint, listener })
    }

    /// Wait for the daemon to connect.
    pub fn accept(&self, timeout: Duration) -> Result<TcpStream> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).expect("blocking");
                    s.set_read_timeout(Some(Duration::from_secs(10)))
                        .expect("timeout");
                    return Ok(s);
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => return err(format!("raw peer: no connection within {timeout:?}: {e}")),
            }
        }
    }
}

/// Read one BGP message: (type, body after the 19-byte header).
pub fn read_msg(s: &mut TcpStream) -> Result<(u8, Vec<u8>)> {
    let mut hdr = [0u8; 19];
    s.read_exact(&mut hdr)
        .map_err(|e| HarnessError(format!("read header: {e}")))?;
    let len = u16::from_be_bytes([hdr[16], hdr[17]]) as usize;
    if len < 19 {
        return err(format!("bad length {len}"));
    }
    let mut body = vec![0u8; len - 19];
    s.read_exact(&mut body)
        .map_err(|e| HarnessError(format!("read body: {e}")))?;
    Ok((hdr[18], body))
}

pub fn write_msg(s: &mut TcpStream, msg_type: u8, body: &[u8]) -> Result<()> {
    let mut m = vec![0xffu8; 16];
    m.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
    m.push(msg_type);
    m.extend_from_slice(body);
    s.write_all(&m)
        .map_err(|e| HarnessError(format!("write: {e}")))
}

/// OPEN body: version 4, `asn` (AS_TRANS if > 65535, plus the 4-octet AS capability), hold,
/// router id, capabilities multiprotocol IPv4+IPv6 unicast and 4-octet AS.
pub fn open_body(asn: u32, hold: u16, router_id: Ipv4Addr) -> Vec<u8> {
    let my_as = if asn > 65535 { 23456u16 } else { asn as u16 };
    let mut caps = Vec::new();
    for (afi, safi) in [(1u16, 1u8), (2, 1)] {
        caps.extend_from_slice(&[1, 4]);
        caps.extend_from_slice(&afi.to_be_bytes());
        caps.extend_from_slice(&[0, safi]);
    }
    caps.extend_from_slice(&[65, 4]);
    caps.extend_from_slice(&asn.to_be_bytes());
    let mut b = vec![4];
    b.extend_from_slice(&my_as.to_be_bytes());
    b.extend_from_slice(&hold.to_be_bytes());
    b.extend_from_slice(&router_id.octets());
    b.push((caps.len() + 2) as u8);
    b.push(2);
    b.push(caps.len() as u8);
    b.extend_from_slice(&caps);
    b
}

pub const OPEN: u8 = 1;
pub const NOTIFICATION: u8 = 3;
pub const KEEPALIVE: u8 = 4;

pub fn notification_body(code: u8, subcode: u8, data: &[u8]) -> Vec<u8> {
    let mut b = vec![code, subcode];
    b.extend_from_slice(data);
    b
}
