//! Where things live: the shard owning an endpoint's directory entry or a domain's mesh link,
//! and the pure routing decision for one local recipient.

use super::*;

/// The shard that owns the relay-mesh link to `domain` (case-insensitive).
pub fn domain_shard(domain: &str, shards: usize) -> usize {
    let mut hasher = rustc_hash::FxHasher::default();
    domain
        .bytes()
        .for_each(|b| hasher.write_u8(b.to_ascii_lowercase()));
    shard_of(hasher.finish(), shards)
}

/// The home shard of an endpoint: the same on every shard and in every run (FxHash is not
/// seeded), over the local part and the lower-cased domain, matching [`Endpoint`] equality.
pub fn home_shard(endpoint: &Endpoint, shards: usize) -> usize {
    let mut hasher = rustc_hash::FxHasher::default();
    hasher.write(endpoint.local().as_bytes());
    hasher.write_u8(b'@');
    endpoint
        .domain()
        .bytes()
        .for_each(|b| hasher.write_u8(b.to_ascii_lowercase()));
    shard_of(hasher.finish(), shards)
}

pub(super) fn shard_of(hash: u64, shards: usize) -> usize {
    (hash % shards.max(1) as u64) as usize
}

/// Where data for a recipient of this relay's domain goes from this shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    /// To the relay's own service at that well-known endpoint.
    Service,
    /// To the channel it is attached on (this shard or another).
    Channel(ChannelRef),
    /// To its home shard: this shard's replica of the directory may lag the home shard's.
    HomeShard(usize),
    /// Not attached, as its home shard (this one) knows: hold it or report it.
    Absent,
}

/// The routing decision for `recipient`, from this shard's replica of the directory alone.
pub(super) fn route(
    directory: &EndpointMap<ChannelRef>,
    recipient: &Endpoint,
    shard: usize,
    shards: usize,
) -> Route {
    if recipient.is_service() {
        return Route::Service;
    }
    if let Some(at) = directory.get(recipient) {
        return Route::Channel(*at);
    }
    match home_shard(recipient, shards) {
        home if home == shard => Route::Absent,
        home => Route::HomeShard(home),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(name: &str) -> Endpoint {
        Endpoint::parse(name).unwrap()
    }

    #[test]
    fn an_attached_recipient_is_reached_where_it_is_attached() {
        let fred = endpoint("fred@example.com");
        let at = ChannelRef {
            shard: 1,
            conn: ConnId(7),
            channel: 3,
        };
        let mut directory = EndpointMap::default();
        directory.insert(fred.clone(), at);
        for shard in 0..2 {
            assert_eq!(route(&directory, &fred, shard, 2), Route::Channel(at));
        }
    }

    #[test]
    fn an_unknown_recipient_goes_home_unless_this_is_its_home() {
        let directory = EndpointMap::default();
        let barney = endpoint("barney@example.com");
        let home = home_shard(&barney, 4);
        for shard in 0..4 {
            let expected = if shard == home {
                Route::Absent
            } else {
                Route::HomeShard(home)
            };
            assert_eq!(route(&directory, &barney, shard, 4), expected);
        }
        // One shard is everyone's home.
        assert_eq!(route(&directory, &barney, 0, 1), Route::Absent);
    }

    #[test]
    fn a_well_known_endpoint_is_served_on_every_shard() {
        let report = endpoint("apex=report@example.com");
        let mut directory = EndpointMap::default();
        // Not even an entry (attach refuses one) would route it elsewhere.
        let at = ChannelRef {
            shard: 1,
            conn: ConnId(7),
            channel: 3,
        };
        directory.insert(report.clone(), at);
        for shard in 0..3 {
            assert_eq!(route(&directory, &report, shard, 3), Route::Service);
        }
    }
}
