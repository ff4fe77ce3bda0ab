//! Throttling rules in a session: one shared token bucket per rule in force
//! when the session starts, applied to every network link whose source and
//! target addresses the rule matches. The in-process link (proxy and
//! repository in one process) is never throttled.

use crate::config::ThrottleRule;
use arca_transport::throttle::TokenBucket;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Instant;

pub struct Throttles {
    rules: Vec<(ThrottleRule, Arc<TokenBucket>)>,
}

impl Throttles {
    pub fn new(rules: &[ThrottleRule]) -> Self {
        let now = jiff::Zoned::now();
        let minute = (now.hour() as u16) * 60 + now.minute() as u16;
        let start = Instant::now();
        Self {
            rules: rules
                .iter()
                .filter(|r| r.active_at(minute))
                .map(|r| (r.clone(), Arc::new(TokenBucket::new(r.rate, start))))
                .collect(),
        }
    }

    /// The buckets, and the rules' names, for traffic to `target`.
    pub fn for_target(&self, target: SocketAddr) -> (Vec<Arc<TokenBucket>>, Vec<String>) {
        let source = local_ip_towards(target);
        self.rules
            .iter()
            .filter(|(r, _)| r.matches(source, target.ip()))
            .map(|(r, b)| (b.clone(), r.name.clone()))
            .unzip()
    }
}

/// The address this host sends from to reach `target` (a connected UDP
/// socket sends nothing; the kernel just picks the route).
fn local_ip_towards(target: SocketAddr) -> IpAddr {
    let bind = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    UdpSocket::bind(bind)
        .and_then(|s| s.connect(target).and_then(|()| s.local_addr()))
        .map(|a| a.ip())
        .unwrap_or(if target.is_ipv4() {
            IpAddr::from([0, 0, 0, 0])
        } else {
            IpAddr::from([0u16; 8])
        })
}
