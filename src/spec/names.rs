//! Every dataset and attack name of the paper, and which ones this build runs. Defences
//! are the ones registered in `crate::defences::REGISTRY`.

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
    ("issba", Implemented),
    ("batt", Implemented),
    ("wanet", Implemented),
    ("cat", Implemented),
];

pub fn availability(table: &[(&str, Availability)], name: &str) -> Option<Availability> {
    table.iter().find(|(n, _)| *n == name).map(|(_, a)| *a)
}

/// The base attack of a `cat+<base>` grid entry (CAT on that attack; paper Table 18).
pub fn cat_base(name: &str) -> Option<&str> {
    name.strip_prefix("cat+")
}

/// Availability of an attack name, `cat+<base>` included (known when its base is a known
/// attack other than CAT itself; implemented when both are).
pub fn attack_availability(name: &str) -> Option<Availability> {
    let Some(base) = cat_base(name) else {
        return availability(ATTACKS, name);
    };
    if base == "cat" || cat_base(base).is_some() {
        return None;
    }
    let b = availability(ATTACKS, base)?;
    let c = availability(ATTACKS, "cat")?;
    Some(if b == Implemented && c == Implemented {
        Implemented
    } else {
        NotYet
    })
}

/// Availability of a name on a grid axis.
pub fn axis_availability(axis: &str, name: &str) -> Option<Availability> {
    match axis {
        "dataset" => availability(DATASETS, name),
        "attack" => attack_availability(name),
        _ => crate::defences::registered(name).map(|_| Implemented),
    }
}
