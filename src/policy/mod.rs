//! Declarative policies from lua-free-policies/: plans (plans.toml) and route policies
//! (routes.toml), validated before they take effect, evaluated natively.

pub mod plans;
pub mod routes;

use crate::diagnostics::ConfigErrors;
pub use plans::{Plan, Plans};
pub use routes::{InstanceSource, RoutePolicies, RoutePolicy, ScopeRule, StoreErrorMode};
use std::path::Path;

/// Everything in the policy directory.
#[derive(Debug, Clone, Default)]
pub struct Policies {
    pub plans: Plans,
    pub routes: RoutePolicies,
}

impl Policies {
    /// Loads `dir/plans.toml` and (if present) `dir/routes.toml`, reporting every problem.
    pub fn load(dir: &Path) -> Result<Policies, ConfigErrors> {
        let plans = Plans::load(&dir.join("plans.toml"));
        let routes_path = dir.join("routes.toml");
        let routes = if routes_path.exists() {
            RoutePolicies::load(&routes_path)
        } else {
            Ok(RoutePolicies::default())
        };
        match (plans, routes) {
            (Ok(plans), Ok(routes)) => Ok(Policies { plans, routes }),
            (plans, routes) => {
                let mut errors = plans.err().map(|e| e.0).unwrap_or_default();
                errors.extend(routes.err().map(|e| e.0).unwrap_or_default());
                Err(ConfigErrors(errors))
            }
        }
    }
}
