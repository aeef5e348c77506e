//! Route matching: longest prefix on the normalised path, on whole segments.

use crate::config::Route;

/// Routes ordered for matching.
pub struct Router {
    /// (prefix, route index), longest prefix first.
    ordered: Vec<(String, usize)>,
}

impl Router {
    pub fn new(routes: &[Route]) -> Self {
        let mut ordered: Vec<(String, usize)> = routes
            .iter()
            .enumerate()
            .map(|(i, r)| (r.prefix.clone(), i))
            .collect();
        ordered.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        Self { ordered }
    }

    /// The index of the route for `path` ([`crate::path::prefix_matches`]: the rule route
    /// policies use too).
    pub fn find(&self, path: &str) -> Option<usize> {
        self.ordered
            .iter()
            .find_map(|(prefix, i)| crate::path::prefix_matches(prefix, path).then_some(*i))
    }

    /// The index of the route `path` would match were ASCII letter case ignored.
    pub fn find_ignoring_case(&self, path: &str) -> Option<usize> {
        self.ordered.iter().find_map(|(prefix, i)| {
            crate::path::prefix_matches_ignoring_case(prefix, path).then_some(*i)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AuthMode;

    fn route(prefix: &str) -> Route {
        Route {
            prefix: prefix.into(),
            auth: AuthMode::Open,
            upstream: 0,
            forward_api_key: false,
        }
    }

    #[test]
    fn longest_prefix_wins() {
        let r = Router::new(&[
            route("/api/"),
            route("/api/v1/"),
            route("/api/auth/"),
            route("/api/v1/status"),
        ]);
        assert_eq!(r.find("/api/v1/status"), Some(3));
        assert_eq!(r.find("/api/v1/status/x"), Some(3));
        assert_eq!(r.find("/api/v1/statusX"), Some(1));
        assert_eq!(r.find("/api/v1x"), Some(0));
        assert_eq!(r.find("/api/v1/messages/send"), Some(1));
        assert_eq!(r.find("/api/v1"), Some(1));
        assert_eq!(r.find("/api/auth/login"), Some(2));
        assert_eq!(r.find("/api/V1/messages"), Some(0));
        assert_eq!(r.find_ignoring_case("/api/V1/messages"), Some(1));
        assert_eq!(r.find_ignoring_case("/API/v1/STATUS"), Some(3));
        assert_eq!(r.find_ignoring_case("/api/v1/STATUSX"), Some(1));
        assert_eq!(r.find_ignoring_case("/API/V1"), Some(1));
        assert_eq!(r.find("/api/api-keys"), Some(0));
        assert_eq!(r.find("/api"), Some(0));
        assert_eq!(r.find("/API/v1/x"), None);
        assert_eq!(r.find("/internal"), None);
    }
}
