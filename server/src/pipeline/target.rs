//! Which addresses webhooks may be sent to (protection against server-side request forgery).
//!
//! A listener URL names a host; what counts is the address it resolves to *when hookd
//! connects*, so the check runs in the HTTP client's resolver (and on literal IPs, which skip
//! the resolver, both at registration and before each attempt). By default link-local,
//! cloud-metadata, unspecified, broadcast and multicast addresses are refused, also where an
//! IPv6 address carries one of them inside (IPv4-mapped, IPv4-compatible, NAT64, 6to4); the
//! strict policy refuses every address that is not public; an allow list opens ranges an
//! operator wants. Every range is kept in IPv6 form (an IPv4 range is its IPv4-mapped IPv6
//! range), so one comparison covers an address in either form and no prefix arithmetic can
//! wrap. Pure address logic plus one resolver; nothing here sends a request.

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

impl PolicyKind {
    fn flag(self) -> &'static str {
        match self {
            PolicyKind::Default => "--target-policy default",
            PolicyKind::Strict => "--target-policy strict",
            PolicyKind::Open => "--target-policy open",
        }
    }
}

/// The 128 bits of an address in IPv6 form: an IPv4 address as its IPv4-mapped IPv6 address.
fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// Length of the IPv4-mapped prefix `::ffff:0:0/96`.
const MAPPED_PREFIX: u8 = 96;
const MAPPED_NETWORK: u128 = 0xffff_u128 << 32;

/// An address range such as `10.0.0.0/8`, `fd00::/8` or `::ffff:10.0.0.0/104`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network in IPv6 form, with the bits past the prefix cleared.
    network: u128,
    /// 0 to 128, counted in IPv6 form (an IPv4 /8 is /104 here).
    prefix: u8,
}

fn mask(prefix: u8) -> u128 {
    match prefix {
        0 => 0,
        prefix => u128::MAX << (128 - u32::from(prefix.min(128))),
    }
}

impl Cidr {
    /// The range `network/prefix`, `prefix` counted in the address's own family.
    const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Self {
        let v4 = u32::from_be_bytes([a, b, c, d]) as u128;
        let prefix = MAPPED_PREFIX + prefix;
        Self { network: (MAPPED_NETWORK | v4) & (u128::MAX << (128 - prefix as u32)), prefix }
    }

    const fn v6(network: u128, prefix: u8) -> Self {
        let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - prefix as u32) };
        Self { network: network & mask, prefix }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        bits(ip) & mask(self.prefix) == self.network
    }

    /// Whether the range lies within `::ffff:0:0/96`: it is an IPv4 range.
    fn is_v4(&self) -> bool {
        self.prefix >= MAPPED_PREFIX && self.network & mask(MAPPED_PREFIX) == MAPPED_NETWORK
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = text.split_once('/').unwrap_or((text, ""));
        let network: IpAddr =
            address.trim().parse().map_err(|_| format!("{text:?} is not an address range like 10.0.0.0/8"))?;
        let max: u8 = if network.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = if prefix.is_empty() {
            max
        } else {
            prefix.trim().parse().map_err(|_| format!("{text:?} has a bad prefix length"))?
        };
        if prefix > max {
            return Err(format!("{text:?}: the prefix length is at most {max}"));
        }
        let prefix = if network.is_ipv4() { prefix + MAPPED_PREFIX } else { prefix };
        Ok(Self::v6(bits(network), prefix))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_v4() {
            let v4 = Ipv4Addr::from((self.network & u128::from(u32::MAX)) as u32);
            write!(f, "{v4}/{}", self.prefix - MAPPED_PREFIX)
        } else {
            write!(f, "{}/{}", Ipv6Addr::from(self.network), self.prefix)
        }
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

/// What the default policy refuses: addresses that are never a webhook receiver and the
/// cloud metadata services (also reachable where an IPv6 address carries one inside).
const NEVER: [(&str, Cidr); 10] = [
    ("unspecified", Cidr::v4(0, 0, 0, 0, 32)),
    ("unspecified", Cidr::v6(0, 128)),
    ("link-local", Cidr::v4(169, 254, 0, 0, 16)),
    ("link-local", Cidr::v6(0xfe80 << 112, 10)),
    ("multicast", Cidr::v4(224, 0, 0, 0, 4)),
    ("multicast", Cidr::v6(0xff00 << 112, 8)),
    ("broadcast", Cidr::v4(255, 255, 255, 255, 32)),
    // Alibaba Cloud; AWS over IPv6; Azure's wire server.
    ("a cloud metadata address", Cidr::v4(100, 100, 100, 200, 32)),
    ("a cloud metadata address", Cidr::v6(0xfd00_0ec2_0000_0000_0000_0000_0000_0254, 128)),
    ("a cloud metadata address", Cidr::v4(168, 63, 129, 16, 32)),
];

/// What the strict policy refuses besides [`NEVER`]: every special-purpose range of the IANA
/// registries that is not globally reachable, and the IPv6 ranges that lead to an IPv4
/// address (those are refused whole rather than judged by the address inside).
const NON_PUBLIC: [(&str, Cidr); 23] = [
    ("in \"this network\" (0.0.0.0/8)", Cidr::v4(0, 0, 0, 0, 8)),
    ("private (10.0.0.0/8)", Cidr::v4(10, 0, 0, 0, 8)),
    ("in the shared address space (100.64.0.0/10)", Cidr::v4(100, 64, 0, 0, 10)),
    ("loopback", Cidr::v4(127, 0, 0, 0, 8)),
    ("private (172.16.0.0/12)", Cidr::v4(172, 16, 0, 0, 12)),
    ("an IETF protocol assignment (192.0.0.0/24)", Cidr::v4(192, 0, 0, 0, 24)),
    ("for documentation (192.0.2.0/24)", Cidr::v4(192, 0, 2, 0, 24)),
    ("a 6to4 relay (192.88.99.0/24)", Cidr::v4(192, 88, 99, 0, 24)),
    ("private (192.168.0.0/16)", Cidr::v4(192, 168, 0, 0, 16)),
    ("for benchmarking (198.18.0.0/15)", Cidr::v4(198, 18, 0, 0, 15)),
    ("for documentation (198.51.100.0/24)", Cidr::v4(198, 51, 100, 0, 24)),
    ("for documentation (203.0.113.0/24)", Cidr::v4(203, 0, 113, 0, 24)),
    ("reserved (240.0.0.0/4)", Cidr::v4(240, 0, 0, 0, 4)),
    ("loopback", Cidr::v6(1, 128)),
    ("IPv4-compatible (::/96)", Cidr::v6(0, 96)),
    ("NAT64 (64:ff9b::/96)", Cidr::v6(0x0064_ff9b << 96, 96)),
    ("local-use NAT64 (64:ff9b:1::/48)", Cidr::v6(0x0064_ff9b_0001 << 80, 48)),
    ("discard-only (100::/64)", Cidr::v6(0x0100 << 112, 64)),
    ("an IETF protocol assignment (2001::/23)", Cidr::v6(0x2001 << 112, 23)),
    ("for documentation (2001:db8::/32)", Cidr::v6(0x2001_0db8 << 96, 32)),
    ("6to4 (2002::/16)", Cidr::v6(0x2002 << 112, 16)),
    ("unique local (fc00::/7)", Cidr::v6(0xfc00 << 112, 7)),
    ("site-local (fec0::/10)", Cidr::v6(0xfec0 << 112, 10)),
];

/// The IPv4 address an IPv6 address leads to, where it carries one inside: IPv4-compatible
/// (`::a.b.c.d`), NAT64 (`64:ff9b::a.b.c.d`) and 6to4 (`2002:aabb:ccdd::/48`). IPv4-mapped
/// addresses need no unwrapping: ranges are kept in that form.
fn carried_v4(ip: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(v6) = ip else { return None };
    let bits = u128::from(v6);
    let low = Ipv4Addr::from((bits & u128::from(u32::MAX)) as u32);
    if Cidr::v6(0, 96).contains(ip) && bits > 1 {
        return Some(low);
    }
    if Cidr::v6(0x0064_ff9b << 96, 96).contains(ip) {
        return Some(low);
    }
    if Cidr::v6(0x2002 << 112, 16).contains(ip) {
        return Some(Ipv4Addr::from(((bits >> 80) & u128::from(u32::MAX)) as u32));
    }
    None
}

/// Why the target policy refuses an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    ip: IpAddr,
    /// The IPv4 address inside `ip` that the rule refused, when it was that one.
    carried: Option<Ipv4Addr>,
    rule: &'static str,
    policy: PolicyKind,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.carried {
            Some(v4) => write!(f, "{} leads to {v4}, which is {}", self.ip, self.rule)?,
            None => write!(f, "{} is {}", self.ip, self.rule)?,
        }
        write!(f, " (refused by {}; --allow-targets opens a range)", self.policy.flag())
    }
}

impl TargetPolicy {
    /// Whether a connection to `ip` is allowed.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.check(ip).is_ok()
    }

    /// Allows `ip`, or says which rule refuses it.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refused> {
        if self.kind == PolicyKind::Open || self.allow.iter().any(|range| range.contains(ip)) {
            return Ok(());
        }
        let refused = |carried, rule| Err(Refused { ip, carried, rule, policy: self.kind });
        let strict = self.kind == PolicyKind::Strict;
        let rules = NEVER.iter().chain(if strict { &NON_PUBLIC[..] } else { &[] });
        for (rule, range) in rules.clone() {
            if range.contains(ip) {
                return refused(None, rule);
            }
        }
        if let Some(v4) = carried_v4(ip) {
            for (rule, range) in rules {
                if range.contains(IpAddr::V4(v4)) {
                    return refused(Some(v4), rule);
                }
            }
        }
        Ok(())
    }

    /// Checks a URL whose host is a literal IP (those skip the resolver); a name passes here
    /// and is checked when it is resolved. The error reads `refused: <why>`.
    pub fn check_literal(&self, url: &str) -> Result<(), String> {
        match url::Url::parse(url) {
            Ok(parsed) => self.check_url(&parsed),
            Err(_) => Ok(()),
        }
    }

    /// [`TargetPolicy::check_literal`] of a URL already parsed.
    pub fn check_url(&self, parsed: &url::Url) -> Result<(), String> {
        let ip = match parsed.host() {
            Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
            Some(url::Host::Ipv6(v6)) => IpAddr::V6(v6),
            _ => return Ok(()),
        };
        self.check(ip).map_err(|refused| format!("refused: {refused}"))
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
            let mut first_refusal = None;
            let allowed: Vec<SocketAddr> = resolved
                .iter()
                .copied()
                .filter(|addr| match policy.check(addr.ip()) {
                    Ok(()) => true,
                    Err(refused) => {
                        first_refusal.get_or_insert(refused);
                        false
                    }
                })
                .collect();
            if let (true, Some(refused)) = (allowed.is_empty(), first_refusal) {
                let message =
                    format!("refused: {host} resolves only to addresses the target policy refuses: {refused}");
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

    fn policy(kind: PolicyKind, allow: &[&str]) -> TargetPolicy {
        TargetPolicy { kind, allow: allow.iter().map(|range| range.parse().unwrap()).collect() }
    }

    /// The IPv4-mapped form of an IPv4 address, as text.
    fn mapped(v4: &str) -> String {
        format!("::ffff:{v4}")
    }

    #[test]
    fn the_default_policy_refuses_link_local_metadata_and_what_leads_there() {
        let policy = TargetPolicy::default();
        for refused in [
            "169.254.169.254",
            "169.254.1.1",
            "fe80::1",
            "fd00:ec2::254",
            "100.100.100.200",
            "168.63.129.16",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "ff02::1",
            "255.255.255.255",
            // The same, carried inside IPv6 addresses.
            "::ffff:169.254.169.254",
            "::169.254.169.254",
            "64:ff9b::169.254.169.254",
            "2002:a9fe:a9fe::1",
            "::ffff:100.100.100.200",
        ] {
            assert!(!policy.allows(ip(refused)), "{refused}");
        }
        for allowed in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.10",
            "93.184.216.34",
            "::1",
            "2606:2800:220:1::1",
            "64:ff9b::93.184.216.34",
            "::ffff:10.0.0.1",
        ] {
            assert!(policy.allows(ip(allowed)), "{allowed}");
        }
    }

    #[test]
    fn the_strict_policy_refuses_every_special_purpose_range_in_every_form() {
        let policy = policy(PolicyKind::Strict, &[]);
        // (an address inside the range, the range's rule as the refusal names it)
        let v4_ranges = [
            ("0.1.2.3", "this network"),
            ("10.1.2.3", "private"),
            ("100.64.0.1", "shared address space"),
            ("127.0.0.1", "loopback"),
            ("169.254.169.254", "link-local"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.0.0.8", "IETF protocol assignment"),
            ("192.0.2.1", "documentation"),
            ("192.88.99.1", "6to4 relay"),
            ("192.168.0.10", "private"),
            ("198.18.0.1", "benchmarking"),
            ("198.19.255.254", "benchmarking"),
            ("198.51.100.7", "documentation"),
            ("203.0.113.9", "documentation"),
            ("224.0.0.1", "multicast"),
            ("240.0.0.1", "reserved"),
            ("255.255.255.255", "broadcast"),
            ("100.100.100.200", "metadata"),
        ];
        for (address, rule) in v4_ranges {
            for form in [address.to_owned(), mapped(address)] {
                let refused = policy.check(ip(&form)).expect_err(&form);
                assert!(refused.to_string().contains(rule), "{form}: {refused}");
                assert!(refused.to_string().contains("--target-policy strict"), "{refused}");
            }
        }
        let v6_ranges = [
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("::10.0.0.1", "IPv4-compatible"),
            ("64:ff9b::8.8.8.8", "NAT64"),
            ("64:ff9b::10.0.0.1", "NAT64"),
            ("64:ff9b:1::1", "local-use NAT64"),
            ("100::1", "discard"),
            ("2001::1", "IETF protocol assignment"),
            ("2001:db8::1", "documentation"),
            ("2002:0808:0808::1", "6to4"),
            ("fc00::1", "unique local"),
            ("fd12::1", "unique local"),
            ("fe80::1", "link-local"),
            ("fec0::1", "site-local"),
            ("febf::1", "link-local"),
            ("ff02::1", "multicast"),
            ("fd00:ec2::254", "metadata"),
        ];
        for (address, rule) in v6_ranges {
            let refused = policy.check(ip(address)).expect_err(address);
            assert!(refused.to_string().contains(rule), "{address}: {refused}");
        }
        for public in ["93.184.216.34", "::ffff:93.184.216.34", "2606:2800:220:1::1", "1.1.1.1", "198.20.0.1"] {
            assert!(policy.allows(ip(public)), "{public}");
        }
    }

    #[test]
    fn the_allow_list_opens_ranges_in_either_form() {
        let policy = policy(PolicyKind::Strict, &["10.0.0.0/8", "::1"]);
        assert!(policy.allows(ip("10.200.0.1")));
        assert!(policy.allows(ip("::ffff:10.200.0.1")), "an IPv4 range covers the mapped form");
        assert!(policy.allows(ip("::1")));
        assert!(policy.allows(ip("11.0.0.1")), "public addresses stay allowed");
        assert!(!policy.allows(ip("192.168.0.1")));
        let open = TargetPolicy { kind: PolicyKind::Open, allow: Vec::new() };
        assert!(open.allows(ip("169.254.169.254")));
    }

    // Regression: a mapped range was kept as an IPv4 network with its IPv6 prefix length,
    // whose mask wrapped to nothing and allowed every IPv4 address.
    #[test]
    fn an_ipv4_mapped_allow_range_opens_only_its_own_addresses() {
        for allow in ["::ffff:10.0.0.0/104", "::ffff:10.1.2.3", "::ffff:10.1.2.3/128"] {
            let policy = policy(PolicyKind::Default, &[allow]);
            assert!(policy.allows(ip("10.1.2.3")), "{allow}");
            assert!(!policy.allows(ip("169.254.169.254")), "{allow} must not open the metadata address");
            assert!(!policy.allows(ip("::ffff:169.254.169.254")), "{allow}");
            let strict = TargetPolicy { kind: PolicyKind::Strict, ..policy };
            assert!(!strict.allows(ip("192.168.1.1")), "{allow} must not open other private addresses");
        }
        let short: Cidr = "::ffff:0.0.0.0/96".parse().unwrap();
        assert!(short.contains(ip("8.8.8.8")) && !short.contains(ip("2606:2800:220:1::1")));
    }

    #[test]
    fn ranges_parse_match_and_print() {
        let range: Cidr = "192.168.0.0/16".parse().unwrap();
        assert!(range.contains(ip("192.168.255.1")) && !range.contains(ip("192.169.0.1")));
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(ip("8.8.8.8")));
        assert!(!"0.0.0.0/0".parse::<Cidr>().unwrap().contains(ip("2606:2800:220:1::1")));
        assert!("::/0".parse::<Cidr>().unwrap().contains(ip("8.8.8.8")));
        for (text, shown) in [
            ("10.0.0.1", "10.0.0.1/32"),
            ("10.9.9.9/8", "10.0.0.0/8"),
            ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
            ("fd00::/8", "fd00::/8"),
            ("::/0", "::/0"),
        ] {
            assert_eq!(text.parse::<Cidr>().unwrap().to_string(), shown, "{text}");
        }
        for bad in ["10.0.0.0/33", "nope/8", "::/129", "10.0.0.0/x", "::ffff:10.0.0.0/129"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn literal_ip_urls_are_checked() {
        let policy = TargetPolicy::default();
        let refusal = policy.check_literal("http://169.254.169.254/latest/meta-data").unwrap_err();
        assert!(refusal.starts_with("refused: 169.254.169.254 is link-local"), "{refusal}");
        assert!(policy.check_literal("http://[fe80::1]:8080/").is_err());
        assert!(policy.check_literal("http://[::ffff:169.254.169.254]/").is_err());
        assert!(policy.check_literal("http://[64:ff9b::a9fe:a9fe]/").is_err());
        assert!(policy.check_literal("http://127.0.0.1:8080/").is_ok());
        assert!(policy.check_literal("https://example.com/").is_ok(), "names are checked by the resolver");
    }
}
