//! The `--schedule` specification of `samopt demo`: which steps of the SAM run take two gradients.
//!
//! `every | interval:K | random:P | looksam:K[:ALPHA] | aesam`, parsed strictly. The generator seed
//! of `random` and the planned length of `aesam` come from the run, so a specification becomes a
//! [`samopt::Schedule`] only once the run is known ([`Spec::schedule`]).

use std::fmt;

use samopt::Schedule;

/// LookSAM's `alpha` when the specification leaves it out (the paper's value).
pub const LOOKSAM_ALPHA: f64 = 0.7;

/// The usage line of the specification, for help and error messages.
pub const USAGE: &str = "every, interval:K, random:P, looksam:K[:ALPHA] or aesam";

/// A parsed `--schedule` value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Spec {
    Every,
    Interval(u64),
    Random(f64),
    LookSam(u64, f64),
    AeSam,
}

impl Spec {
    /// The schedules the comparison mode runs beside SGD and SAM when no `--schedule` is given.
    pub const COMPARED: [Spec; 4] =
        [Spec::Interval(10), Spec::Random(0.2), Spec::LookSam(5, LOOKSAM_ALPHA), Spec::AeSam];

    /// The library's schedule for a run of `planned_steps` steps; `seed` seeds `random`.
    pub fn schedule(self, seed: u64, planned_steps: u64) -> Schedule {
        match self {
            Spec::Every => Schedule::Every,
            Spec::Interval(k) => Schedule::Interval { k },
            Spec::Random(p) => Schedule::Random { p, seed },
            Spec::LookSam(k, alpha) => Schedule::LookSam { k, alpha },
            Spec::AeSam => Schedule::ae_sam(planned_steps.max(1)),
        }
    }

    /// Whether the SAM run needs writable gradient buffers: LookSAM with the host's own optimizer,
    /// which takes LookSAM's direction from them.
    pub fn writes_gradients(self) -> bool {
        matches!(self, Spec::LookSam(..))
    }
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Spec::Every => write!(f, "every"),
            Spec::Interval(k) => write!(f, "interval:{k}"),
            Spec::Random(p) => write!(f, "random:{p}"),
            Spec::LookSam(k, alpha) => write!(f, "looksam:{k}:{alpha}"),
            Spec::AeSam => write!(f, "aesam"),
        }
    }
}

fn period(name: &str, k: &str) -> Result<u64, String> {
    match k.parse::<u64>() {
        Ok(0) => Err(format!("{name}'s period K = 0: it is at least 1")),
        Ok(k) => Ok(k),
        Err(_) => Err(format!("{name}'s period K = {k:?} is not a whole number >= 1")),
    }
}

/// Parses a `--schedule` value; the error says what is wrong with it (clap adds the flag and the
/// value).
pub fn parse(s: &str) -> Result<Spec, String> {
    let mut parts = s.split(':');
    let name = parts.next().unwrap_or_default();
    let args: Vec<&str> = parts.collect();
    let arity = |allowed: &[usize], form: &str| {
        if allowed.contains(&args.len()) {
            Ok(())
        } else if allowed == [0] {
            Err(format!("{name} takes no parameters{form}"))
        } else {
            Err(format!("write {name} as {form}"))
        }
    };
    match name {
        "every" => {
            arity(&[0], "")?;
            Ok(Spec::Every)
        }
        "interval" => {
            arity(&[1], "interval:K (SAM on every K-th step)")?;
            Ok(Spec::Interval(period("interval", args[0])?))
        }
        "random" => {
            arity(&[1], "random:P (SAM with probability P)")?;
            let p: f64 = args[0].parse().map_err(|_| format!("random's P = {:?} is not a number", args[0]))?;
            if (0.0..=1.0).contains(&p) {
                Ok(Spec::Random(p))
            } else {
                Err(format!("random's P = {p}: a probability is in [0, 1]"))
            }
        }
        "looksam" => {
            arity(&[1, 2], "looksam:K or looksam:K:ALPHA")?;
            let k = period("looksam", args[0])?;
            let alpha = match args.get(1) {
                None => LOOKSAM_ALPHA,
                Some(a) => a.parse::<f64>().map_err(|_| format!("looksam's ALPHA = {a:?} is not a number"))?,
            };
            if alpha.is_finite() && alpha >= 0.0 {
                Ok(Spec::LookSam(k, alpha))
            } else {
                Err(format!("looksam's ALPHA = {alpha}: it must be finite and >= 0"))
            }
        }
        "aesam" => {
            arity(&[0], " (delta 0.9, threshold -1 -> 1 over the run)")?;
            Ok(Spec::AeSam)
        }
        _ => Err(format!("unknown schedule {name:?}: use {USAGE}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        for s in ["every", "interval:1", "interval:10", "random:0", "random:0.2", "random:1", "looksam:5:0.7", "aesam"]
        {
            assert_eq!(parse(s).unwrap().to_string(), s);
        }
        assert_eq!(parse("looksam:3").unwrap(), Spec::LookSam(3, LOOKSAM_ALPHA));
        for s in [
            "",
            "Every",
            "every:1",
            "interval",
            "interval:0",
            "interval:-1",
            "interval:1.5",
            "interval:2:3",
            "random",
            "random:1.5",
            "random:-0.1",
            "random:nan",
            "random:x",
            "looksam",
            "looksam:0",
            "looksam:5:-1",
            "looksam:5:inf",
            "looksam:5:nan",
            "looksam:5:0.7:1",
            "aesam:x",
            "aesam:",
            "sam",
        ] {
            assert!(parse(s).is_err(), "{s:?} was accepted");
        }
    }
}
