//! The step schedule's state and decisions: which first steps perturb (SAM steps) and which leave
//! the weights for a single-gradient step. The rules are those of [`Schedule`]; everything here is
//! scalar, so the CPU and GPU engines decide alike, and checkpoints carry all of it.

use crate::config::Schedule;

/// What the schedule has seen and counted. `Copy`, so that a first step decides on a copy and
/// keeps it only once the step has succeeded (a failed call changes nothing).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct ScheduleState {
    /// Decisions taken so far: the `t` of the rules.
    pub t: u64,
    /// The random schedule's SplitMix64 state.
    pub rng: u64,
    /// AE-SAM's moving mean and variance of `||g||^2` (0 before the first step).
    pub mean: f64,
    pub var: f64,
    /// Completed SAM steps (not skipped) and single-gradient steps.
    pub sam_steps: u64,
    pub single_steps: u64,
    /// LookSAM: this worker's `||g_v||^2` over its tensors, `None` before the first `g_v` is kept.
    pub gv_local_sq: Option<f64>,
}

impl ScheduleState {
    /// The state before the first step.
    pub fn new(schedule: &Schedule) -> ScheduleState {
        let rng = match *schedule {
            Schedule::Random { seed, .. } => seed,
            _ => 0,
        };
        ScheduleState { t: 0, rng, mean: 0.0, var: 0.0, sam_steps: 0, single_steps: 0, gv_local_sq: None }
    }

    /// Takes the decision of step `t` from the (global) squared gradient norm and advances: `true`
    /// for a SAM step.
    pub fn decide(&mut self, schedule: &Schedule, grad_sq: f64) -> bool {
        let t = self.t;
        self.t += 1;
        match *schedule {
            Schedule::Every => true,
            Schedule::Interval { k } | Schedule::LookSam { k, .. } => t.is_multiple_of(k),
            Schedule::Random { p, .. } => unit_interval(splitmix64(&mut self.rng)) < p,
            Schedule::AeSam { delta, lambda1, lambda2, planned_steps } => {
                self.mean = delta * self.mean + (1.0 - delta) * grad_sq;
                let dev = grad_sq - self.mean;
                self.var = delta * self.var + (1.0 - delta) * dev * dev;
                let progress = (t as f64 / planned_steps as f64).min(1.0);
                let c = lambda1 + (lambda2 - lambda1) * progress;
                grad_sq >= self.mean + c * self.var.sqrt()
            }
        }
    }
}

/// One step of SplitMix64 (Steele, Lea and Flood 2014): the generator of the random schedule,
/// small, fast, and the same on every platform.
pub(crate) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The top 53 bits of `x` as a number in `[0, 1)`: `p = 1` always passes, `p = 0` never does.
pub(crate) fn unit_interval(x: u64) -> f64 {
    (x >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first outputs for seed 1234567, as printed by the reference C implementation
    /// (splitmix64.c, Vigna) for that seed.
    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        let mut s = 1234567u64;
        let got: Vec<u64> = (0..3).map(|_| splitmix64(&mut s)).collect();
        assert_eq!(got, [6457827717110365317, 3203168211198807973, 9817491932198370423]);
    }

    #[test]
    fn probabilities_zero_and_one_are_exact() {
        let mut st = ScheduleState::new(&Schedule::Random { p: 0.0, seed: 9 });
        assert!((0..1000).all(|_| !st.decide(&Schedule::Random { p: 0.0, seed: 9 }, 1.0)));
        let mut st = ScheduleState::new(&Schedule::Random { p: 1.0, seed: 9 });
        assert!((0..1000).all(|_| st.decide(&Schedule::Random { p: 1.0, seed: 9 }, 1.0)));
    }
}
