//! Load balancing: which server of a service takes the next request.
//!
//! Two policies, both cheap enough to run on every request:
//! - **Smooth weighted round robin**, nginx's algorithm: every pick adds each eligible server's weight
//!   to its running score, takes the highest score and subtracts the total weight from it. Weights
//!   1:3 give the sequence B B A B, spread out rather than in bursts, and over any window of
//!   `sum(weights)` picks the shares are exact. The state is one `i64` per server behind a mutex held
//!   for a loop over the servers; nothing awaits inside it.
//! - **Least requests with the power of two choices**: pick two distinct eligible servers at random
//!   and take the one with fewer requests in flight relative to its weight. Unlike a full scan this
//!   avoids sending every new request to the same momentarily-idle server (herding), and it needs no
//!   lock at all: the in-flight counts are atomics read without coordination.
//!
//! Which servers are eligible (healthy, not yet tried for this request, weight above zero) is decided
//! by the caller and passed in as a predicate, so this module stays pure and unit-testable.

use std::sync::Mutex;

use rand::Rng;

use crate::config::LoadBalancer;

pub(crate) enum Balancer {
    RoundRobin { current: Mutex<Vec<i64>> },
    LeastRequests,
}

impl Balancer {
    pub(crate) fn new(kind: LoadBalancer, servers: usize) -> Balancer {
        match kind {
            LoadBalancer::RoundRobin => Balancer::RoundRobin {
                current: Mutex::new(vec![0; servers]),
            },
            LoadBalancer::LeastRequests => Balancer::LeastRequests,
        }
    }

    /// Chooses among the servers `i` with `weights[i] > 0 && eligible(i)`; `None` when there is none.
    pub(crate) fn pick(
        &self,
        weights: &[u32],
        eligible: impl Fn(usize) -> bool,
        in_flight: impl Fn(usize) -> usize,
    ) -> Option<usize> {
        let ok = |i: usize| weights[i] > 0 && eligible(i);
        match self {
            Balancer::RoundRobin { current } => {
                // A poisoned lock only means another thread panicked mid-pick; the scores are still
                // plain integers, so keep using them.
                let mut current = current.lock().unwrap_or_else(|p| p.into_inner());
                let mut total = 0i64;
                let mut best: Option<usize> = None;
                for i in 0..weights.len() {
                    if !ok(i) {
                        continue;
                    }
                    let w = i64::from(weights[i]);
                    current[i] += w;
                    total += w;
                    if best.is_none_or(|b| current[i] > current[b]) {
                        best = Some(i);
                    }
                }
                if let Some(b) = best {
                    current[b] -= total;
                }
                best
            }
            Balancer::LeastRequests => {
                let count = (0..weights.len()).filter(|&i| ok(i)).count();
                let nth = |n: usize| (0..weights.len()).filter(|&i| ok(i)).nth(n);
                match count {
                    0 => None,
                    1 => nth(0),
                    _ => {
                        let mut rng = rand::rng();
                        let x = rng.random_range(0..count);
                        let mut y = rng.random_range(0..count - 1);
                        if y >= x {
                            y += 1;
                        }
                        let (a, b) = (nth(x)?, nth(y)?);
                        // Compare (in_flight + 1) / weight without division: a wins when
                        // (a_in + 1) * w_b <= (b_in + 1) * w_a.
                        let score_a = (in_flight(a) as u128 + 1) * u128::from(weights[b]);
                        let score_b = (in_flight(b) as u128 + 1) * u128::from(weights[a]);
                        Some(if score_a <= score_b { a } else { b })
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_round_robin_follows_nginx_sequence() {
        // nginx's documented example: weights 5, 1, 1 give a a b a c a a.
        let b = Balancer::new(LoadBalancer::RoundRobin, 3);
        let seq: Vec<usize> = (0..7)
            .map(|_| b.pick(&[5, 1, 1], |_| true, |_| 0).unwrap())
            .collect();
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn round_robin_shares_are_exact_and_skip_ineligible_servers() {
        let b = Balancer::new(LoadBalancer::RoundRobin, 3);
        let mut hits = [0; 3];
        for _ in 0..400 {
            hits[b.pick(&[1, 3, 2], |i| i != 2, |_| 0).unwrap()] += 1;
        }
        assert_eq!(hits, [100, 300, 0]);
        assert_eq!(b.pick(&[1, 3, 2], |_| false, |_| 0), None);
        assert_eq!(b.pick(&[0, 0, 4], |_| true, |_| 0), Some(2));
    }

    #[test]
    fn least_requests_prefers_the_less_loaded_of_two() {
        let b = Balancer::new(LoadBalancer::LeastRequests, 2);
        for _ in 0..100 {
            assert_eq!(
                b.pick(&[1, 1], |_| true, |i| if i == 0 { 5 } else { 1 }),
                Some(1)
            );
        }
        // weight counts: 4 in flight on weight 4 is lighter than 2 in flight on weight 1
        for _ in 0..100 {
            assert_eq!(
                b.pick(&[4, 1], |_| true, |i| if i == 0 { 4 } else { 2 }),
                Some(0)
            );
        }
        assert_eq!(b.pick(&[1, 1, 1], |i| i == 2, |_| 9), Some(2));
        assert_eq!(b.pick(&[1, 1], |_| false, |_| 0), None);
    }

    #[test]
    fn least_requests_spreads_ties() {
        let b = Balancer::new(LoadBalancer::LeastRequests, 3);
        let mut hits = [0; 3];
        for _ in 0..3000 {
            hits[b.pick(&[1, 1, 1], |_| true, |_| 0).unwrap()] += 1;
        }
        assert!(hits.iter().all(|&h| h > 700), "{hits:?}");
    }
}
