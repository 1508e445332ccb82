//! The order in which to try a service's SRV targets (RFC 2782, "Usage rules"): by priority,
//! lowest first; within one priority, a weighted random order in which a target's chance to come
//! next is proportional to its weight. A pure function of the records and a random number
//! generator, so that tests can seed the generator.

/// One SRV record's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Srv {
    /// Lower is tried first.
    pub priority: u16,
    /// Relative chance among the targets of the same priority.
    pub weight: u16,
    /// The service's port on the target.
    pub port: u16,
    /// The target host, a domain name (absolute, with its final dot, or not); `.` is the root.
    pub target: String,
}

impl Srv {
    /// Whether the target is the root, `.`: no host.
    pub fn is_root(&self) -> bool {
        self.target == "." || self.target.is_empty()
    }
}

/// A lone SRV record whose target is `.`: "the service is decidedly not available at this
/// domain" (RFC 2782). No fallback to the domain's own addresses applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotAvailable;

/// The targets of `records` in the order to try them (RFC 2782's selection): priorities in
/// ascending order; within each, repeatedly the zero-weight records first, then the others, in the
/// order received, each with the running sum of the weights so far; a uniform random number
/// between 0 and the total weight (inclusive) picks the first record whose running sum is at
/// least the number, which is taken out before the next pick. Targets that are `.` are left out;
/// a single record with the target `.` is [`NotAvailable`].
pub fn order(records: Vec<Srv>, rng: &mut fastrand::Rng) -> Result<Vec<Srv>, NotAvailable> {
    if let [only] = records.as_slice() {
        if only.is_root() {
            return Err(NotAvailable);
        }
    }
    let mut records: Vec<Srv> = records.into_iter().filter(|r| !r.is_root()).collect();
    // Stable: the received order is kept within a priority.
    records.sort_by_key(|r| r.priority);
    let mut ordered = Vec::with_capacity(records.len());
    let mut rest = records.as_slice();
    while let Some(first) = rest.first() {
        let same = rest
            .iter()
            .position(|r| r.priority != first.priority)
            .unwrap_or(rest.len());
        let (level, next) = rest.split_at(same);
        // Zero weights at the beginning, the received order kept otherwise; taking one out
        // keeps that arrangement for the next pick.
        let mut unordered: Vec<&Srv> = level.iter().filter(|r| r.weight == 0).collect();
        unordered.extend(level.iter().filter(|r| r.weight != 0));
        while !unordered.is_empty() {
            let total: u64 = unordered.iter().map(|r| u64::from(r.weight)).sum();
            let pick = rng.u64(0..=total);
            let mut running = 0u64;
            let chosen = unordered
                .iter()
                .position(|r| {
                    running += u64::from(r.weight);
                    running >= pick
                })
                .unwrap_or(unordered.len() - 1);
            ordered.push(unordered.remove(chosen).clone());
        }
        rest = next;
    }
    Ok(ordered)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn srv(priority: u16, weight: u16, target: &str) -> Srv {
        Srv {
            priority,
            weight,
            port: 912,
            target: target.to_owned(),
        }
    }

    fn targets(records: &[Srv]) -> Vec<&str> {
        records.iter().map(|r| r.target.as_str()).collect()
    }

    #[test]
    fn priorities_are_tried_lowest_first() {
        let records = vec![
            srv(20, 5, "c."),
            srv(10, 5, "a."),
            srv(30, 0, "d."),
            srv(10, 5, "b."),
        ];
        for seed in 0..50 {
            let ordered = order(records.clone(), &mut fastrand::Rng::with_seed(seed)).unwrap();
            let priorities: Vec<u16> = ordered.iter().map(|r| r.priority).collect();
            assert_eq!(priorities, [10, 10, 20, 30], "seed {seed}");
            let mut first_two = targets(&ordered[..2]);
            first_two.sort_unstable();
            assert_eq!(first_two, ["a.", "b."]);
        }
    }

    #[test]
    fn within_a_priority_the_first_target_follows_the_weights() {
        // Picks are uniform over 0..=100: a. wins on 0..=10 (11 of 101), b. on 11..=30 (20),
        // c. on 31..=100 (70).
        let records = vec![srv(0, 10, "a."), srv(0, 20, "b."), srv(0, 70, "c.")];
        let mut rng = fastrand::Rng::with_seed(2782);
        let rounds = 20_000;
        let mut first = [0usize; 3];
        for _ in 0..rounds {
            let ordered = order(records.clone(), &mut rng).unwrap();
            assert_eq!(ordered.len(), 3);
            let index = ["a.", "b.", "c."]
                .iter()
                .position(|t| *t == ordered[0].target)
                .unwrap();
            first[index] += 1;
        }
        for (count, expected) in first.iter().zip([11.0, 20.0, 70.0]) {
            let share = *count as f64 / rounds as f64;
            let expected = expected / 101.0;
            assert!(
                (share - expected).abs() < 0.015,
                "first picks {first:?}: {share} against {expected}"
            );
        }
    }

    #[test]
    fn the_second_pick_is_weighted_among_those_left() {
        // After c. (weight 70) is taken first, a. and b. share 0..=30: a. on 0..=10 (11 of 31).
        let records = vec![srv(0, 10, "a."), srv(0, 20, "b."), srv(0, 70, "c.")];
        let mut rng = fastrand::Rng::with_seed(7);
        let (mut c_first, mut a_second) = (0usize, 0usize);
        for _ in 0..20_000 {
            let ordered = order(records.clone(), &mut rng).unwrap();
            if ordered[0].target == "c." {
                c_first += 1;
                if ordered[1].target == "a." {
                    a_second += 1;
                }
            }
        }
        let share = a_second as f64 / c_first as f64;
        assert!((share - 11.0 / 31.0).abs() < 0.02, "{share}");
    }

    #[test]
    fn zero_weights_come_first_in_the_list_but_are_seldom_picked_first() {
        // z. (weight 0) is first in the list with running sum 0: only a pick of 0 takes it
        // first (1 in 101); it is never dropped.
        let records = vec![srv(0, 100, "w."), srv(0, 0, "z.")];
        let mut rng = fastrand::Rng::with_seed(1);
        let rounds = 20_000;
        let mut z_first = 0;
        for _ in 0..rounds {
            let ordered = order(records.clone(), &mut rng).unwrap();
            assert_eq!(ordered.len(), 2);
            if ordered[0].target == "z." {
                z_first += 1;
            }
        }
        let share = z_first as f64 / rounds as f64;
        assert!((share - 1.0 / 101.0).abs() < 0.005, "{share}");
    }

    #[test]
    fn all_zero_weights_keep_the_received_order() {
        let records = vec![srv(0, 0, "a."), srv(0, 0, "b."), srv(0, 0, "c.")];
        let ordered = order(records, &mut fastrand::Rng::with_seed(3)).unwrap();
        assert_eq!(targets(&ordered), ["a.", "b.", "c."]);
    }

    #[test]
    fn the_same_seed_gives_the_same_order() {
        let records: Vec<Srv> = (0..8)
            .map(|i| srv(i % 2, 10 + i, &format!("t{i}.")))
            .collect();
        let once = order(records.clone(), &mut fastrand::Rng::with_seed(42)).unwrap();
        let again = order(records, &mut fastrand::Rng::with_seed(42)).unwrap();
        assert_eq!(once, again);
    }

    #[test]
    fn a_lone_dot_target_means_no_service() {
        assert_eq!(
            order(vec![srv(0, 0, ".")], &mut fastrand::Rng::with_seed(0)),
            Err(NotAvailable)
        );
        // Among others, a `.` target is only left out.
        let ordered = order(
            vec![srv(0, 0, "."), srv(1, 0, "a.")],
            &mut fastrand::Rng::with_seed(0),
        )
        .unwrap();
        assert_eq!(targets(&ordered), ["a."]);
        assert_eq!(order(vec![], &mut fastrand::Rng::with_seed(0)), Ok(vec![]));
    }
}
