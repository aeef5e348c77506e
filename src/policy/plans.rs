//! plans.toml: what each plan allows (key cap, monthly quota, rate, burst).

use crate::diagnostics::ConfigErrors;
use crate::diagnostics::Reporter;
use crate::limits::gcra::BucketParams;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use toml::Spanned;

/// One plan's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub name: String,
    /// Active keys an account may hold.
    pub max_keys: u32,
    /// Requests forwarded per quota period.
    pub monthly_requests: u64,
    /// Per-key token bucket.
    pub bucket: BucketParams,
}

/// All plans by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plans(BTreeMap<String, Plan>);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlansFile {
    plans: BTreeMap<String, PlanFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    max_keys: Spanned<u32>,
    monthly_requests: Spanned<u64>,
    #[serde(default = "ten")]
    rate_per_second: Spanned<u32>,
    #[serde(default = "ten")]
    burst: Spanned<u32>,
}

fn ten() -> Spanned<u32> {
    Spanned::new(0..0, 10)
}

impl Plans {
    /// Reads and validates a plans file.
    pub fn load(path: &Path) -> Result<Plans, ConfigErrors> {
        let source = crate::diagnostics::read_source(path)?;
        Self::parse(path, &source)
    }

    /// Validates a plans document; `path` only names it in errors.
    pub fn parse(path: &Path, source: &str) -> Result<Plans, ConfigErrors> {
        let raw: PlansFile = crate::diagnostics::parse_toml(path, source)?;
        let mut r = Reporter::new(path, source);
        if raw.plans.is_empty() {
            r.whole("plans", "at least one plan is required");
        }
        let mut plans = BTreeMap::new();
        for (name, p) in raw.plans {
            let field = |f: &str| format!("plans.{name}.{f}");
            for (f, v) in [("rate_per_second", &p.rate_per_second), ("burst", &p.burst)] {
                if *v.get_ref() == 0 {
                    r.at(v.span(), field(f), "must be at least 1, got 0");
                }
            }
            if *p.monthly_requests.get_ref() == 0 {
                r.at(
                    p.monthly_requests.span(),
                    field("monthly_requests"),
                    "must be at least 1, got 0",
                );
            }
            plans.insert(
                name.clone(),
                Plan {
                    name: name.clone(),
                    max_keys: *p.max_keys.get_ref(),
                    monthly_requests: *p.monthly_requests.get_ref(),
                    bucket: BucketParams {
                        rate_per_second: *p.rate_per_second.get_ref(),
                        burst: *p.burst.get_ref(),
                    },
                },
            );
        }
        r.finish(Plans(plans))
    }

    pub fn get(&self, name: &str) -> Option<&Plan> {
        self.0.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// The largest key cap of any plan (0 with no plans).
    pub fn largest_max_keys(&self) -> u32 {
        self.0.values().map(|p| p.max_keys).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(src: &str) -> Result<Plans, String> {
        Plans::parse(Path::new("plans.toml"), src).map_err(|e| e.to_string())
    }

    #[test]
    fn shipped_plans_load() {
        let plans = Plans::load(Path::new("lua-free-policies/plans.toml")).unwrap();
        let caps: Vec<u32> = ["free", "starter", "pro", "plus"]
            .iter()
            .map(|n| plans.get(n).unwrap().max_keys)
            .collect();
        assert_eq!(caps, [1, 3, 10, 10]);
        for n in ["free", "starter", "pro", "plus"] {
            let p = plans.get(n).unwrap();
            assert_eq!(
                p.bucket,
                BucketParams {
                    rate_per_second: 10,
                    burst: 10
                }
            );
        }
    }

    #[test]
    fn zero_rate_and_burst_are_located() {
        let err = parse(
            "[plans.free]\nmax_keys = 1\nmonthly_requests = 5\nrate_per_second = 0\nburst = 0\n",
        )
        .unwrap_err();
        assert_eq!(
            err,
            "plans.toml:4:19: plans.free.rate_per_second: must be at least 1, got 0\n\
             plans.toml:5:9: plans.free.burst: must be at least 1, got 0"
        );
    }

    #[test]
    fn unknown_field_is_an_error() {
        let err =
            parse("[plans.free]\nmax_keys = 1\nmonthly_requests = 5\nburts = 3\n").unwrap_err();
        assert!(
            err.starts_with("plans.toml:4:1: plans.free.burts: unknown field `burts`"),
            "{err}"
        );
    }
}
