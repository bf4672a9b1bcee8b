//! Every dataset, attack and defence name of the paper, and which ones this build runs.

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

pub const ATTACKS: &[(&str, Availability)] = &[
    ("badnets-white", Implemented),
    ("badnets-pattern", Implemented),
    ("blended", Implemented),
    ("trojan-sq", Implemented),
    ("trojan-wm", Implemented),
    ("l0-inv", Implemented),
    ("l2-inv", Implemented),
    ("smooth", Implemented),
    ("sig", Implemented),
    ("issba", NotYet),
    ("batt", Implemented),
    ("wanet", Implemented),
    ("cat", NotYet),
];

pub const DEFENCES: &[(&str, Availability)] = &[
    ("none", Implemented),
    ("ieu", Implemented),
    ("abl", NotYet),
    ("ibau", NotYet),
    ("attnblock", NotYet),
];

pub fn availability(table: &[(&str, Availability)], name: &str) -> Option<Availability> {
    table.iter().find(|(n, _)| *n == name).map(|(_, a)| *a)
}
