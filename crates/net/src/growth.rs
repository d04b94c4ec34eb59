//! When to open more connections: double them while each doubling still raises the rate
//! by a given factor. Shared by sync sessions and replication links; the caller measures
//! the rate at a fixed step and opens the connections.

/// What to do after one measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// No verdict yet (idle, or the step right after growing, which mixes two rates).
    Wait,
    /// The last doubling paid off (or this is the first measurement): double again.
    Grow,
    /// The rate stopped rising: stay as it is.
    Stop,
}

/// The doubling rule's state.
#[derive(Debug, Clone)]
pub struct Doubling {
    gain: f64,
    idle_rate: f64,
    base_rate: f64,
    settling: bool,
    /// The doubling's first judged step fell short: one more decides. A single step is
    /// one second of a link whose rate wobbles (a busy CPU, a retransmission); stopping on
    /// it kept a capped link at 2 connections for good.
    missed_once: bool,
}

impl Doubling {
    /// Grow while the rate rises by `gain` per doubling; rates below `idle_rate` give no
    /// verdict (nothing flowing, or something else is the limit).
    pub fn new(gain: f64, idle_rate: f64) -> Doubling {
        Doubling {
            gain,
            idle_rate,
            base_rate: 0.0,
            settling: false,
            missed_once: false,
        }
    }

    /// The verdict for the rate measured over the last step.
    pub fn step(&mut self, rate: f64) -> Step {
        if rate < self.idle_rate {
            return Step::Wait;
        }
        if self.settling {
            self.settling = false;
            return Step::Wait;
        }
        if self.base_rate > 0.0 && rate < self.base_rate * self.gain {
            if self.missed_once {
                return Step::Stop;
            }
            self.missed_once = true;
            return Step::Wait;
        }
        self.base_rate = rate;
        self.settling = true;
        self.missed_once = false;
        Step::Grow
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_while_it_pays_and_skips_the_mixed_step() {
        let mut d = Doubling::new(1.2, 10.0);
        assert_eq!(d.step(5.0), Step::Wait);
        assert_eq!(d.step(100.0), Step::Grow);
        assert_eq!(d.step(150.0), Step::Wait);
        assert_eq!(d.step(200.0), Step::Grow);
        assert_eq!(d.step(230.0), Step::Wait);
        // Two judged steps short of the gain: stop.
        assert_eq!(d.step(230.0), Step::Wait);
        assert_eq!(d.step(230.0), Step::Stop);
    }

    #[test]
    fn one_step_short_of_the_gain_is_judged_again() {
        let mut d = Doubling::new(1.2, 10.0);
        assert_eq!(d.step(100.0), Step::Grow);
        assert_eq!(d.step(110.0), Step::Wait);
        // A wobble: 110 is short of 120, but the next step says the doubling paid.
        assert_eq!(d.step(110.0), Step::Wait);
        assert_eq!(d.step(190.0), Step::Grow);
        // And the chance is per doubling: a short step after growing again waits once more.
        assert_eq!(d.step(200.0), Step::Wait);
        assert_eq!(d.step(200.0), Step::Wait);
        assert_eq!(d.step(200.0), Step::Stop);
    }
}
