//! Which addresses webhooks may be sent to (protection against server-side request forgery).
//!
//! A listener URL names a host; what counts is the address it resolves to *when hookd
//! connects*, so the check runs in the HTTP client's resolver (and on literal IPs, which skip
//! the resolver). By default link-local and cloud-metadata addresses are refused; the strict
//! policy refuses every non-public address; an allow list opens ranges an operator wants.
//! Pure address logic plus one resolver; nothing here sends a request.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

/// The built-in policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyKind {
    /// Refuse link-local and cloud metadata addresses (and unspecified/multicast ones).
    Default,
    /// Refuse every address that is not public: also loopback and private ranges.
    Strict,
    /// Refuse nothing.
    Open,
}

/// An address range such as `10.0.0.0/8` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = text.split_once('/').unwrap_or((text, ""));
        let network: IpAddr =
            address.trim().parse().map_err(|_| format!("{text:?} is not an address range like 10.0.0.0/8"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = if prefix.is_empty() {
            max
        } else {
            prefix.trim().parse().map_err(|_| format!("{text:?} has a bad prefix length"))?
        };
        if prefix > max {
            return Err(format!("{text:?}: the prefix length is at most {max}"));
        }
        Ok(Self { network: canonical(network), prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The policy in force: a kind plus ranges always allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetPolicy {
    pub kind: PolicyKind,
    pub allow: Vec<Cidr>,
}

impl Default for TargetPolicy {
    fn default() -> Self {
        Self { kind: PolicyKind::Default, allow: Vec::new() }
    }
}

/// An IPv4-mapped IPv6 address is judged as the IPv4 address it carries.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Cloud metadata endpoints outside the link-local ranges.
const METADATA: [IpAddr; 2] =
    [IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)), IpAddr::V6(Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254))];

fn never_a_target(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast() || v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unspecified() || v6.is_multicast() || (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

fn is_non_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let shared = Cidr { network: IpAddr::V4(Ipv4Addr::new(100, 64, 0, 0)), prefix: 10 };
            v4.is_loopback() || v4.is_private() || shared.contains(ip) || v4.octets()[0] == 0
        }
        IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

impl TargetPolicy {
    /// Whether a connection to `ip` is allowed.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if self.allow.iter().any(|range| range.contains(ip)) {
            return true;
        }
        match self.kind {
            PolicyKind::Open => true,
            PolicyKind::Default => !never_a_target(ip) && !METADATA.contains(&ip),
            PolicyKind::Strict => !never_a_target(ip) && !METADATA.contains(&ip) && !is_non_public(ip),
        }
    }

    /// Checks a URL whose host is a literal IP (those skip the resolver).
    pub fn check_literal(&self, url: &str) -> Result<(), String> {
        let Ok(parsed) = url::Url::parse(url) else { return Ok(()) };
        let ip = match parsed.host() {
            Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
            Some(url::Host::Ipv6(v6)) => IpAddr::V6(v6),
            _ => return Ok(()),
        };
        if self.allows(ip) { Ok(()) } else { Err(format!("refused: {ip} is not allowed by the target policy")) }
    }
}

/// A resolver that drops addresses the policy refuses, checked at connect time.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    policy: Arc<TargetPolicy>,
}

impl GuardedResolver {
    pub fn new(policy: Arc<TargetPolicy>) -> Self {
        Self { policy }
    }
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = resolved.iter().copied().filter(|addr| policy.allows(addr.ip())).collect();
            if allowed.is_empty() && !resolved.is_empty() {
                let message = format!("refused: {host} resolves only to addresses the target policy refuses");
                return Err(message.into());
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn the_default_policy_refuses_link_local_and_metadata_only() {
        let policy = TargetPolicy::default();
        for refused in [
            "169.254.169.254",
            "169.254.1.1",
            "fe80::1",
            "fd00:ec2::254",
            "100.100.100.200",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(!policy.allows(ip(refused)), "{refused}");
        }
        for allowed in ["127.0.0.1", "10.1.2.3", "192.168.0.10", "93.184.216.34", "::1", "2606:2800:220:1::1"] {
            assert!(policy.allows(ip(allowed)), "{allowed}");
        }
    }

    #[test]
    fn the_strict_policy_refuses_every_non_public_address() {
        let policy = TargetPolicy { kind: PolicyKind::Strict, allow: Vec::new() };
        for refused in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.0.10",
            "100.64.0.1",
            "::1",
            "fd12::1",
            "::ffff:10.0.0.1",
            "169.254.169.254",
        ] {
            assert!(!policy.allows(ip(refused)), "{refused}");
        }
        assert!(policy.allows(ip("93.184.216.34")));
    }

    #[test]
    fn the_allow_list_opens_ranges() {
        let policy = TargetPolicy {
            kind: PolicyKind::Strict,
            allow: vec!["10.0.0.0/8".parse().unwrap(), "::1".parse().unwrap()],
        };
        assert!(policy.allows(ip("10.200.0.1")));
        assert!(policy.allows(ip("::1")));
        assert!(policy.allows(ip("11.0.0.1")), "public addresses stay allowed");
        assert!(!policy.allows(ip("192.168.0.1")));
        let open = TargetPolicy { kind: PolicyKind::Open, allow: Vec::new() };
        assert!(open.allows(ip("169.254.169.254")));
    }

    #[test]
    fn ranges_parse_and_match() {
        let range: Cidr = "192.168.0.0/16".parse().unwrap();
        assert!(range.contains(ip("192.168.255.1")) && !range.contains(ip("192.169.0.1")));
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(ip("8.8.8.8")));
        assert_eq!("10.0.0.1".parse::<Cidr>().unwrap().to_string(), "10.0.0.1/32");
        for bad in ["10.0.0.0/33", "nope/8", "::/129", "10.0.0.0/x"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn literal_ip_urls_are_checked() {
        let policy = TargetPolicy::default();
        assert!(policy.check_literal("http://169.254.169.254/latest/meta-data").is_err());
        assert!(policy.check_literal("http://[fe80::1]:8080/").is_err());
        assert!(policy.check_literal("http://127.0.0.1:8080/").is_ok());
        assert!(policy.check_literal("https://example.com/").is_ok(), "names are checked by the resolver");
    }
}
