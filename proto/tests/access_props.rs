//! Property tests of access-entry selection and actor escaping (RFC 3341 §3, §3.1; ACC-06,
//! ACC-07, ACC-09), against an oracle written here from the digest's rules rather than from
//! the implementation:
//!
//! * among the owner's entries whose actor pattern matches an actor, the one selected is the
//!   best by domain (exact, then `*.suffix` covering the fewest characters, then `*`), then by
//!   local part (exact, then the wildcard covering the fewest characters: `address/*`,
//!   `apex=*` for services, `*` for the rest);
//! * any literal local part escaped with `\*` and `\\` names exactly that endpoint, and the
//!   pattern writes back as the same escaped text.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use apex_proto::apex::access::{escape, AccessEntry, AccessTable, Action, ActorPattern};
use apex_proto::apex::addr::Endpoint;
use proptest::prelude::*;

/// An actor: a local address (a service's when `service`), an optional subaddress, and a
/// domain of one to four labels under `.net` (never the owner's domain).
#[derive(Debug, Clone)]
struct Actor {
    service: bool,
    address: String,
    subaddress: Option<String>,
    labels: Vec<String>,
}

impl Actor {
    fn local(&self) -> String {
        let address = if self.service {
            format!("apex={}", self.address)
        } else {
            self.address.clone()
        };
        match &self.subaddress {
            Some(sub) => format!("{address}/{sub}"),
            None => address,
        }
    }

    fn domain(&self) -> String {
        let mut labels = self.labels.clone();
        labels.push("net".into());
        labels.join(".")
    }
}

fn actor() -> impl Strategy<Value = Actor> {
    (
        any::<bool>(),
        "[a-z]{1,6}",
        proptest::option::of("[a-z]{1,6}"),
        proptest::collection::vec("[a-z]{1,5}", 1..4),
    )
        .prop_map(|(service, address, subaddress, labels)| Actor {
            service,
            address,
            subaddress,
            labels,
        })
}

/// How well one part of a pattern matches, by the digest's rule: kind (exact, narrower
/// wildcard, `*`), then the characters its wildcard covers. Smaller is better.
type Rank = (u8, usize);

/// Every domain pattern matching the actor's domain, with its rank by the digest's rule
/// (smaller is better).
fn domain_options(actor: &Actor) -> Vec<(String, Rank)> {
    let domain = actor.domain();
    let mut options = vec![(domain.clone(), (0, 0)), ("*".to_owned(), (2, 0))];
    // `*.suffix` for every suffix of whole labels, the domain itself included (it matches
    // the domain too), covering the characters before the suffix.
    let labels: Vec<&str> = domain.split('.').collect();
    for start in 0..labels.len() {
        let suffix = labels[start..].join(".");
        options.push((format!("*.{suffix}"), (1, domain.len() - suffix.len())));
    }
    options
}

/// Every local pattern matching the actor's local part, with its rank.
fn local_options(actor: &Actor) -> Vec<(String, Rank)> {
    let local = actor.local();
    let mut options = vec![(escape(&local).into_owned(), (0, 0))];
    if let Some(sub) = &actor.subaddress {
        let address = local.strip_suffix(&format!("/{sub}")).unwrap();
        options.push((format!("{address}/*"), (1, sub.len())));
    }
    if actor.service {
        options.push(("apex=*".to_owned(), (1, local.len() - "apex=".len())));
    } else {
        options.push(("*".to_owned(), (1, local.len())));
    }
    options
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// ACC-09: the entry selected is the best of those that match, by domain then local part.
    #[test]
    fn acc_09_the_most_specific_matching_entry_is_selected(
        actor in actor(),
        picks in proptest::collection::vec(any::<proptest::sample::Index>(), 1..8),
    ) {
        let owner = Endpoint::parse("fred@owner.test").unwrap();
        let actor_endpoint = Endpoint::parse(&format!("{}@{}", actor.local(), actor.domain())).unwrap();
        let mut candidates = Vec::new();
        for (local, local_rank) in local_options(&actor) {
            for (domain, domain_rank) in domain_options(&actor) {
                candidates.push((format!("{local}@{domain}"), (domain_rank, local_rank)));
            }
        }
        let mut table = AccessTable::new();
        let mut chosen: Vec<(String, (Rank, Rank), Action)> = Vec::new();
        for (n, pick) in picks.iter().enumerate() {
            let (pattern, rank) = pick.get(&candidates).clone();
            if chosen.iter().any(|(p, ..)| *p == pattern) {
                continue;
            }
            let action = Action::parse(&format!("s{n}:op")).unwrap();
            let actor_pattern = ActorPattern::parse(&pattern).unwrap();
            prop_assert!(actor_pattern.matches(&actor_endpoint), "{pattern} should match {actor_endpoint}");
            table.set(AccessEntry::new(owner.clone(), actor_pattern, vec![action.clone()]));
            chosen.push((pattern, rank, action));
        }
        let best = chosen.iter().min_by_key(|(_, rank, _)| *rank).unwrap();
        let selection = table.select(&owner, &actor_endpoint).unwrap();
        prop_assert_eq!(
            selection.actions(),
            std::slice::from_ref(&best.2),
            "selected {} among {:?}",
            selection.actor(),
            chosen.iter().map(|(p, r, _)| (p, r)).collect::<Vec<_>>()
        );
    }

    /// ACC-07: a literal local part with `*` and `\` in it, escaped, names exactly that
    /// endpoint (no wildcard), and writes back as the same text.
    #[test]
    fn acc_07_escaping_round_trips(local in "[a-z*\\\\]{1,12}", domain in "[a-z]{1,8}\\.(com|net)") {
        let escaped = format!("{}@{domain}", escape(&local));
        let pattern = ActorPattern::parse(&escaped).unwrap();
        prop_assert!(!pattern.is_wildcard(), "{escaped}");
        prop_assert_eq!(pattern.to_string(), escaped.clone());
        let endpoint = Endpoint::parse(&format!("{local}@{domain}")).unwrap();
        prop_assert!(pattern.matches(&endpoint));
        // ...and nothing else of that domain.
        let other = Endpoint::parse(&format!("{local}x@{domain}")).unwrap();
        prop_assert!(!pattern.matches(&other));
    }
}
