//! Who the client is: the TCP peer, unless the peer is a trusted proxy, in which case the
//! rightmost address of `X-Forwarded-For` that is not itself a trusted proxy. And the key that
//! per-client limits count under (an IPv6 client by its /64, so that rotating addresses inside
//! one allocation does not escape a limit).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An address block, e.g. `10.0.0.0/8` or `2001:db8::/32` (a bare address is its own /32 or
/// /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

/// Why a CIDR did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("not an IP address or CIDR block (e.g. \"10.0.0.0/8\")")]
    Syntax,
    #[error("the prefix length is longer than the address")]
    PrefixTooLong,
    #[error("bits are set below the prefix length (write the network address)")]
    HostBits,
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net = canonical(IpAddr::from_str(addr).map_err(|_| CidrError::Syntax)?);
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().map_err(|_| CidrError::PrefixTooLong)?
            }
            Some(_) => return Err(CidrError::Syntax),
            None => max,
        };
        if prefix > max {
            return Err(CidrError::PrefixTooLong);
        }
        if masked(net, prefix) != net {
            return Err(CidrError::HostBits);
        }
        Ok(Self { net, prefix })
    }
}

impl Cidr {
    /// The block's prefix length (0: every address of its family).
    pub fn prefix_len(&self) -> u8 {
        self.prefix
    }

    /// True when `ip` is inside this block (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        ip.is_ipv4() == self.net.is_ipv4() && masked(ip, self.prefix) == self.net
    }
}

/// `::ffff:a.b.c.d` is `a.b.c.d`: one client, one spelling.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// `ip` with every bit below `prefix` cleared.
fn masked(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits & mask))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & mask))
        }
    }
}

/// The peers whose `X-Forwarded-*` headers are believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(pub Vec<Cidr>);

impl TrustedProxies {
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    /// The client behind `peer`: `peer` itself unless it is trusted; then, walking the
    /// `X-Forwarded-For` values (in header order) from the right, the first address that is
    /// not trusted. An entry that is not an address ends the walk at the last address that
    /// was (nothing a client wrote before a trusted hop is believed).
    pub fn client<'a>(
        &self,
        peer: IpAddr,
        forwarded_for: impl Iterator<Item = &'a [u8]>,
    ) -> IpAddr {
        self.chain(peer, forwarded_for)[0]
    }

    /// The client followed by the trusted hops between it and `peer`, left to right (the
    /// peer not included, unless nothing else is believed): what the gateway believes of the
    /// forwarding chain. Anything a client wrote left of that is dropped.
    pub fn chain<'a>(
        &self,
        peer: IpAddr,
        forwarded_for: impl Iterator<Item = &'a [u8]>,
    ) -> Vec<IpAddr> {
        let peer = canonical(peer);
        if !self.trusts(peer) {
            return vec![peer];
        }
        let values: Vec<&[u8]> = forwarded_for.collect();
        let mut believed = vec![peer];
        for entry in values.iter().rev().flat_map(|v| v.rsplit(|b| *b == b',')) {
            let Some(ip) = std::str::from_utf8(entry).ok().and_then(entry_ip) else {
                break;
            };
            believed.push(ip);
            if !self.trusts(ip) {
                break;
            }
        }
        // peer, hop, …, client (right to left): drop the peer unless it is all there is.
        if believed.len() > 1 {
            believed.remove(0);
        }
        believed.reverse();
        believed
    }
}

/// An `X-Forwarded-For` entry's address: `a.b.c.d`, `a.b.c.d:port`, `v6`, `[v6]` or
/// `[v6]:port` (some balancers write ports), surrounding spaces ignored.
fn entry_ip(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    IpAddr::from_str(entry)
        .ok()
        .or_else(|| std::net::SocketAddr::from_str(entry).ok().map(|a| a.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))
                .and_then(|e| IpAddr::from_str(e).ok())
        })
        .map(canonical)
}

/// The prefix of an IPv6 site (a customer's usual allocation): a site holds 65,536 /64s.
pub const SITE_PREFIX: u8 = 48;

/// The IPv6 site a client's limit key belongs to, when clients count by a longer prefix than
/// a site's (`None` for IPv4, or when `ipv6_prefix` is a site or wider): what aggregates the
/// per-client budgets one holder of a /48 could otherwise multiply by 65,536.
pub fn site_key(client: IpAddr, ipv6_prefix: u8) -> Option<IpAddr> {
    match client {
        IpAddr::V6(_) if ipv6_prefix > SITE_PREFIX => Some(masked(client, SITE_PREFIX)),
        _ => None,
    }
}

/// The address a per-client limit counts under: IPv4 as it is, IPv6 by its first
/// `ipv6_prefix` bits (64: one customer allocation).
pub fn limit_key(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match canonical(ip) {
        v4 @ IpAddr::V4(_) => v4,
        v6 => masked(v6, ipv6_prefix),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn trusted(list: &[&str]) -> TrustedProxies {
        TrustedProxies(list.iter().map(|c| c.parse().unwrap()).collect())
    }

    #[test]
    fn an_ipv6_client_belongs_to_its_site() {
        assert_eq!(site_key(ip("2001:db8:5:9::"), 64), Some(ip("2001:db8:5::")));
        assert_eq!(site_key(ip("2001:db8:5::"), 48), None);
        assert_eq!(site_key(ip("203.0.113.9"), 64), None);
    }

    #[test]
    fn cidrs_parse_and_contain() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains(ip("10.255.0.1")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(c.contains(ip("::ffff:10.1.2.3")));
        let c: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(c.contains(ip("2001:db8:1::5")));
        assert!(!c.contains(ip("2001:db9::5")));
        assert!(!c.contains(ip("10.0.0.1")));
        assert!("127.0.0.1"
            .parse::<Cidr>()
            .unwrap()
            .contains(ip("127.0.0.1")));
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(ip("8.8.8.8")));
        assert_eq!("10.0.0.1/8".parse::<Cidr>(), Err(CidrError::HostBits));
        assert_eq!("10.0.0.0/33".parse::<Cidr>(), Err(CidrError::PrefixTooLong));
        assert_eq!("10.0.0.0/".parse::<Cidr>(), Err(CidrError::Syntax));
        assert_eq!("10.0.0.0/+8".parse::<Cidr>(), Err(CidrError::Syntax));
        assert_eq!("example.com".parse::<Cidr>(), Err(CidrError::Syntax));
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_hop() {
        let t = trusted(&["127.0.0.1", "10.0.0.0/8"]);
        let client =
            |peer: &str, xff: &[&str]| t.client(ip(peer), xff.iter().map(|v| v.as_bytes()));
        // Untrusted peer: its headers mean nothing.
        assert_eq!(client("203.0.113.9", &["1.1.1.1"]), ip("203.0.113.9"));
        // Trusted peer: the rightmost address it did not add itself.
        assert_eq!(client("127.0.0.1", &["1.1.1.1"]), ip("1.1.1.1"));
        assert_eq!(
            client("127.0.0.1", &["9.9.9.9, 1.1.1.1, 10.0.0.5"]),
            ip("1.1.1.1")
        );
        assert_eq!(
            client("127.0.0.1", &["9.9.9.9", "1.1.1.1,10.0.0.5"]),
            ip("1.1.1.1")
        );
        // Nothing but trusted hops: the leftmost of them.
        assert_eq!(client("127.0.0.1", &["10.0.0.7, 10.0.0.5"]), ip("10.0.0.7"));
        assert_eq!(client("127.0.0.1", &[]), ip("127.0.0.1"));
        // Garbage ends the walk at the last address believed.
        assert_eq!(
            client("127.0.0.1", &["1.1.1.1, junk, 10.0.0.5"]),
            ip("10.0.0.5")
        );
        assert_eq!(client("127.0.0.1", &["1.1.1.1, "]), ip("127.0.0.1"));
        assert_eq!(
            client("::ffff:127.0.0.1", &["2001:db8::1"]),
            ip("2001:db8::1")
        );
    }

    #[test]
    fn ipv6_clients_are_limited_per_allocation() {
        assert_eq!(
            limit_key(ip("2001:db8:1:2:aaaa::1"), 64),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            limit_key(ip("2001:db8:1:2:ffff::9"), 64),
            ip("2001:db8:1:2::")
        );
        assert_ne!(limit_key(ip("2001:db8:1:3::1"), 64), ip("2001:db8:1:2::"));
        assert_eq!(limit_key(ip("2001:db8::1"), 128), ip("2001:db8::1"));
        assert_eq!(limit_key(ip("192.0.2.7"), 64), ip("192.0.2.7"));
        assert_eq!(limit_key(ip("::ffff:192.0.2.7"), 64), ip("192.0.2.7"));
    }

    proptest! {
        /// Whatever a client writes in front of a trusted hop, the answer is an address the
        /// trusted chain vouches for: the peer, or an entry at or right of the first untrusted
        /// one from the right.
        #[test]
        fn a_client_cannot_choose_its_address_past_a_trusted_hop(
            spoofed in proptest::collection::vec(any::<u32>(), 0..4),
            real in any::<u32>(),
        ) {
            let t = trusted(&["127.0.0.1"]);
            let real = IpAddr::V4(Ipv4Addr::from(real));
            prop_assume!(!t.trusts(real));
            let mut chain: Vec<String> =
                spoofed.iter().map(|n| Ipv4Addr::from(*n).to_string()).collect();
            chain.push(real.to_string());
            let header = chain.join(", ");
            prop_assert_eq!(t.client(ip("127.0.0.1"), [header.as_bytes()].into_iter()), real);
        }
    }
}
