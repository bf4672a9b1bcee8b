//! Every dataset name of the paper, and which ones this build runs. Attacks and defences
//! are the ones registered in `crate::attacks::REGISTRY` and `crate::defences::REGISTRY`.

/// Whether a named component can be run by this version of ieu-bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    Implemented,
    /// Named by the paper and accepted in specs, but planning it is an error.
    NotYet,
}

use Availability::*;

pub const DATASETS: &[(&str, Availability)] = &[
    ("synthetic", Implemented),
    ("cifar10", Implemented),
    ("gtsrb", Implemented),
    ("tinyimagenet", Implemented),
    ("imagefolder", Implemented),
];

pub fn availability(table: &[(&str, Availability)], name: &str) -> Option<Availability> {
    table.iter().find(|(n, _)| *n == name).map(|(_, a)| *a)
}

/// Availability of a name on a grid axis.
pub fn axis_availability(axis: &str, name: &str) -> Option<Availability> {
    match axis {
        "dataset" => availability(DATASETS, name),
        // `<attack>+<base>` included (`cat+blended`).
        "attack" => crate::attacks::resolve(name).map(|_| Implemented),
        _ => crate::defences::registered(name).map(|_| Implemented),
    }
}
