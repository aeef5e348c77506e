//! The PROXY protocol (HAProxy's v1 text and v2 binary headers): what a TCP load balancer writes
//! before a connection's first byte to name the client it accepted. A listener with the option
//! on requires the header from every peer; the address in it is believed only from a trusted
//! peer and then becomes the connection's peer address, which everything downstream (per-client
//! caps and limits, logs, `X-Forwarded-For`) reads. Bytes read past the header are put back for
//! TLS or HTTP.

use pingora::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{GetSocketDigest, SocketDigest};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// The v2 header's first twelve bytes.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 header starts so.
const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest v1 header, CRLF included (the spec's bound).
const V1_MAX: usize = 107;
/// The v2 header's fixed part: signature, version and command, family, length.
const V2_FIXED: usize = 16;
/// The longest v2 address block and TLVs accepted (the format allows 64 KiB; balancers send a
/// few hundred bytes at most), so that a connection that has not been admitted yet cannot make
/// the gateway hold much.
const V2_MAX_BODY: usize = 4096;

/// What a complete header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Header {
    /// A proxied TCP connection from this client address.
    Proxied(SocketAddr),
    /// No client to believe: v2 `LOCAL` (the balancer's own health check), v1 `UNKNOWN`, or an
    /// address family that is not IP. The TCP peer stays the client.
    Unknown,
}

/// Why a connection's PROXY header was refused (the connection is closed).
#[derive(Debug, thiserror::Error)]
pub(crate) enum HeaderError {
    #[error("the connection did not start with a PROXY protocol header")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    #[error("the connection closed inside its PROXY protocol header")]
    Closed,
    /// Closed before its first byte: a TCP health check, not a refusal.
    #[error("the connection closed before sending anything")]
    Silent,
    #[error("the PROXY protocol header was not complete within the header timeout")]
    TimedOut,
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

impl HeaderError {
    /// Whether this is a refusal worth counting and logging (a silent close is not).
    pub(crate) fn is_refusal(&self) -> bool {
        !matches!(self, Self::Silent)
    }
}

/// Parses a header at the start of `buf`: `Ok(Some((header, length)))` when it is complete,
/// `Ok(None)` when the bytes so far are a valid beginning.
pub(crate) fn parse(buf: &[u8]) -> Result<Option<(Header, usize)>, HeaderError> {
    let starts = |prefix: &[u8]| {
        let n = buf.len().min(prefix.len());
        buf[..n] == prefix[..n]
    };
    if starts(&V2_SIGNATURE) {
        parse_v2(buf)
    } else if starts(V1_PREFIX) {
        parse_v1(buf)
    } else {
        Err(HeaderError::Missing)
    }
}

fn parse_v1(buf: &[u8]) -> Result<Option<(Header, usize)>, HeaderError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(HeaderError::Malformed("a v1 header longer than 107 bytes"))
        } else {
            Ok(None)
        };
    };
    let line = std::str::from_utf8(&buf[V1_PREFIX.len()..end])
        .map_err(|_| HeaderError::Malformed("a v1 header that is not ASCII"))?;
    let mut fields = line.split(' ');
    let header = match fields.next() {
        // The rest of the line is to be ignored (the spec).
        Some("UNKNOWN") => Header::Unknown,
        Some(proto @ ("TCP4" | "TCP6")) => {
            let (Some(src), Some(dst), Some(sport), Some(dport), None) = (
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
            ) else {
                return Err(HeaderError::Malformed(
                    "a v1 header without exactly two addresses and two ports",
                ));
            };
            let ip = |s: &str| -> Result<IpAddr, HeaderError> {
                let ip = if proto == "TCP4" {
                    s.parse::<Ipv4Addr>().map(IpAddr::V4).ok()
                } else {
                    s.parse::<Ipv6Addr>().map(IpAddr::V6).ok()
                };
                ip.ok_or(HeaderError::Malformed(
                    "a v1 address that is not of its protocol",
                ))
            };
            let (src, _) = (ip(src)?, ip(dst)?);
            let (sport, _) = (port(sport)?, port(dport)?);
            Header::Proxied(SocketAddr::new(src, sport))
        }
        _ => {
            return Err(HeaderError::Malformed(
                "a v1 protocol other than TCP4, TCP6 or UNKNOWN",
            ))
        }
    };
    Ok(Some((header, end + 2)))
}

/// A v1 port: decimal, no sign, no leading zero, at most 65535.
fn port(s: &str) -> Result<u16, HeaderError> {
    let bad = HeaderError::Malformed("a v1 port that is not a number from 0 to 65535");
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return Err(bad);
    }
    s.parse().map_err(|_| bad)
}

fn parse_v2(buf: &[u8]) -> Result<Option<(Header, usize)>, HeaderError> {
    if buf.len() < V2_FIXED {
        return Ok(None);
    }
    let (version, command) = (buf[12] >> 4, buf[12] & 0x0f);
    if version != 2 {
        return Err(HeaderError::Malformed("a v2 header of another version"));
    }
    let (family, transport) = (buf[13] >> 4, buf[13] & 0x0f);
    let length = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if length > V2_MAX_BODY {
        return Err(HeaderError::Malformed("a v2 header longer than 4 KiB"));
    }
    let total = V2_FIXED + length;
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[V2_FIXED..total];
    let header = match command {
        // LOCAL: the balancer speaks for itself; the addresses are to be ignored.
        0 => Header::Unknown,
        1 => match (family, transport) {
            (1, 1) if body.len() >= 12 => {
                let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
                let port = u16::from_be_bytes([body[8], body[9]]);
                Header::Proxied(SocketAddr::new(IpAddr::V4(ip), port))
            }
            (2, 1) if body.len() >= 36 => {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&body[..16]);
                let port = u16::from_be_bytes([body[32], body[33]]);
                Header::Proxied(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port))
            }
            (1 | 2, 1) => return Err(HeaderError::Malformed("a v2 address block too short")),
            // UNSPEC, or a Unix socket on the balancer's side: no IP client to name.
            (0, _) | (3, 1) => Header::Unknown,
            _ => {
                return Err(HeaderError::Malformed(
                    "a v2 header for a transport other than a stream",
                ))
            }
        },
        _ => {
            return Err(HeaderError::Malformed(
                "a v2 command other than LOCAL or PROXY",
            ))
        }
    };
    Ok(Some((header, total)))
}

/// Reads the header at the start of `stream` within `timeout`; what was read past it is put
/// back for the next reader.
pub(crate) async fn read(stream: &mut L4Stream, timeout: Duration) -> Result<Header, HeaderError> {
    tokio::time::timeout(timeout, read_unbounded(stream))
        .await
        .map_err(|_| HeaderError::TimedOut)?
}

async fn read_unbounded(stream: &mut L4Stream) -> Result<Header, HeaderError> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        if let Some((header, used)) = parse(&buf)? {
            if used < buf.len() {
                stream.rewind(&buf[used..]);
            }
            return Ok(header);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(if buf.is_empty() {
                HeaderError::Silent
            } else {
                HeaderError::Closed
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The connection's peer IP address, as its socket digest has it.
pub(crate) fn peer_ip(stream: &L4Stream) -> Option<IpAddr> {
    stream
        .get_socket_digest()
        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()))
}

/// The port a connection's peer address gets when a trusted balancer's PROXY header named no
/// client: no TCP peer has it.
pub(crate) const UNNAMED_PORT: u16 = 0;

/// Makes `client` the connection's peer address for everything that reads it later.
pub(crate) fn set_peer(stream: &mut L4Stream, client: SocketAddr) {
    let digest = SocketDigest::from_raw_fd(stream.as_raw_fd());
    // A fresh cell: the set cannot fail.
    let _ = digest.peer_addr.set(Some(PeerAddr::Inet(client)));
    stream.set_socket_digest(digest);
}

/// Reads the header a PROXY-protocol listener requires; from a peer `trusts` accepts, the
/// client it names becomes the connection's peer address. From any other peer the header is
/// read and its address ignored.
pub(crate) async fn accept(
    stream: &mut L4Stream,
    timeout: Duration,
    trusts: impl Fn(IpAddr) -> bool,
) -> Result<(), HeaderError> {
    let header = read(stream, timeout).await?;
    match (header, peer_ip(stream)) {
        (Header::Proxied(client), Some(peer)) if trusts(peer) => set_peer(stream, client),
        // The balancer names no client (its own health check, a client of another family):
        // the peer stays, marked by port 0 (no TCP peer has it) as speaking for nobody. Its
        // forwarding headers are then not believed: they came from whoever it relayed.
        (Header::Unknown, Some(peer)) if trusts(peer) => {
            set_peer(stream, SocketAddr::new(peer, UNNAMED_PORT));
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(family);
        out.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn v2_inet(src: Ipv4Addr, sport: u16, tlvs: &[u8]) -> Vec<u8> {
        let mut body = src.octets().to_vec();
        body.extend_from_slice(&[10, 0, 0, 1]);
        body.extend_from_slice(&sport.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        body.extend_from_slice(tlvs);
        v2(1, 0x11, &body)
    }

    fn complete(buf: &[u8]) -> (Header, usize) {
        parse(buf).unwrap().unwrap()
    }

    #[test]
    fn v1_names_the_client() {
        let line = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\nGET / HTTP/1.1\r\n";
        let (h, n) = complete(line);
        assert_eq!(h, Header::Proxied("203.0.113.7:51234".parse().unwrap()));
        assert_eq!(&line[n..n + 3], b"GET");
        let line = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n";
        assert_eq!(
            complete(line).0,
            Header::Proxied("[2001:db8::1]:1".parse().unwrap())
        );
        assert_eq!(complete(b"PROXY UNKNOWN\r\n"), (Header::Unknown, 15));
        assert_eq!(
            complete(b"PROXY UNKNOWN ffff::1 whatever\r\n").0,
            Header::Unknown
        );
    }

    #[test]
    fn v1_refuses_what_is_not_exactly_the_format() {
        for bad in [
            &b"PROXY TCP4 203.0.113.7 10.0.0.1 51234\r\n"[..],
            b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443 x\r\n",
            b"PROXY TCP4 203.0.113.7  10.0.0.1 51234 443\r\n",
            b"PROXY TCP4 2001:db8::1 10.0.0.1 51234 443\r\n",
            b"PROXY TCP6 203.0.113.7 2001:db8::2 51234 443\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 051234 443\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 65536 443\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 +1 443\r\n",
            b"PROXY TCP4 203.0.113.07 10.0.0.1 1 443\r\n",
            b"PROXY UDP4 203.0.113.7 10.0.0.1 1 443\r\n",
            b"PROXY tcp4 203.0.113.7 10.0.0.1 1 443\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(HeaderError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = [b"PROXY UNKNOWN ".as_slice(), &[b'a'; 100]].concat();
        assert!(matches!(parse(&long), Err(HeaderError::Malformed(_))));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\n"),
            Err(HeaderError::Missing)
        ));
        assert!(matches!(parse(b"proxy "), Err(HeaderError::Missing)));
    }

    #[test]
    fn v2_names_the_client_and_skips_its_tlvs() {
        let mut buf = v2_inet(Ipv4Addr::new(198, 51, 100, 9), 4000, &[0x04, 0, 1, 0xaa]);
        let len = buf.len();
        buf.extend_from_slice(b"\x16\x03\x01");
        assert_eq!(
            complete(&buf),
            (Header::Proxied("198.51.100.9:4000".parse().unwrap()), len)
        );
        let mut body = "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets().to_vec();
        body.extend_from_slice(&[0; 16]);
        body.extend_from_slice(&[0x1f, 0x90, 0, 80]);
        assert_eq!(
            complete(&v2(1, 0x21, &body)).0,
            Header::Proxied("[2001:db8::7]:8080".parse().unwrap())
        );
        // LOCAL, UNSPEC and Unix sockets name no client.
        assert_eq!(complete(&v2(0, 0x11, &[0; 12])).0, Header::Unknown);
        assert_eq!(complete(&v2(1, 0x00, &[])).0, Header::Unknown);
        assert_eq!(complete(&v2(1, 0x31, &[0; 216])).0, Header::Unknown);
    }

    #[test]
    fn v2_refuses_a_header_longer_than_4_kib_before_reading_it() {
        let mut start = V2_SIGNATURE.to_vec();
        start.extend_from_slice(&[0x21, 0x11, 0x10, 0x01]);
        assert!(matches!(parse(&start), Err(HeaderError::Malformed(_))));
        start[14..16].copy_from_slice(&4096u16.to_be_bytes());
        assert!(parse(&start).unwrap().is_none());
    }

    #[test]
    fn v2_refuses_other_versions_commands_transports_and_short_blocks() {
        let mut other_version = v2(1, 0x11, &[0; 12]);
        other_version[12] = 0x11;
        for bad in [
            other_version,
            v2(2, 0x11, &[0; 12]),
            v2(1, 0x12, &[0; 12]),
            v2(1, 0x11, &[0; 11]),
            v2(1, 0x21, &[0; 35]),
        ] {
            assert!(matches!(parse(&bad), Err(HeaderError::Malformed(_))));
        }
    }

    proptest! {
        /// Any prefix of a valid header asks for more; the whole one is read exactly.
        #[test]
        fn prefixes_ask_for_more(a in any::<u32>(), port in any::<u16>(), tlv in proptest::collection::vec(any::<u8>(), 0..64), v1 in any::<bool>()) {
            let src = Ipv4Addr::from(a);
            let whole = if v1 {
                format!("PROXY TCP4 {src} 10.0.0.1 {port} 443\r\n").into_bytes()
            } else {
                v2_inet(src, port, &tlv)
            };
            for cut in 0..whole.len() {
                prop_assert!(parse(&whole[..cut]).unwrap().is_none());
            }
            let mut followed = whole.clone();
            followed.extend_from_slice(b"GET /");
            let (h, n) = complete(&followed);
            prop_assert_eq!(h, Header::Proxied(SocketAddr::new(IpAddr::V4(src), port)));
            prop_assert_eq!(n, whole.len());
        }

        /// Arbitrary bytes never panic, and a complete header never claims more than it saw.
        #[test]
        fn arbitrary_input_is_answered(bytes in proptest::collection::vec(any::<u8>(), 0..300), v2_start in any::<bool>()) {
            let buf = if v2_start { [V2_SIGNATURE.as_slice(), &bytes].concat() } else { [V1_PREFIX, &bytes].concat() };
            if let Ok(Some((_, n))) = parse(&buf) {
                prop_assert!(n <= buf.len());
            }
        }
    }
}
