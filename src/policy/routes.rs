//! routes.toml: per path prefix and method, what a request needs (scope, subscription, instance)
//! and how it is limited (per-IP limits, behaviour when the store fails).
//!
//! Restricted keys are denied by default: a key with scopes passes only a policy that names
//! one of them (or says `scope = "none"`), a key with instance ids only a policy that says
//! where the instance comes from (or `instance = "none"`). Prefixes match on whole segments,
//! by the rule the router uses ([`crate::path::prefix_matches`]); `HEAD` matches as `GET`.

use crate::diagnostics::ConfigErrors;
use crate::diagnostics::Reporter;
use crate::limits::gcra::BucketParams;
use http::Method;
use serde::Deserialize;
use std::path::Path;
use std::str::FromStr;
use toml::Spanned;

/// What a route does when the store cannot decide the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorMode {
    /// 503 SERVICE_UNAVAILABLE with Retry-After.
    FailClosed,
    /// Forward a known (cached) caller unmetered, counted in metrics.
    FailOpen,
}

/// Which scope a restricted key needs on a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScopeRule {
    /// A key with scopes must carry this one.
    Required(String),
    /// `scope = "none"`: the route needs no scope; every key may call it.
    NotNeeded,
}

/// Where a request names the instance it acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceSource {
    /// `instance = "none"`: the route acts on no instance; instance-restricted keys may call it.
    InstanceFree,
    /// The n-th segment (0-based) of the normalised path: `/api/v1/instances/{id}` is segment 3.
    /// `name` (`param`, default `instanceId`) is what a backend may read the instance from
    /// instead of its route parameter (Laravel's input, Spring's binding): a restricted key's
    /// request may not name it in its query or body.
    PathSegment { segment: usize, name: String },
    /// A query parameter.
    Query(String),
    /// A top-level string field of a JSON body (read, bounded, and forwarded unchanged).
    Body(String),
}

impl InstanceSource {
    /// The name a backend may read the instance by (`""` for an instance-free route).
    pub fn name(&self) -> &str {
        match self {
            InstanceSource::InstanceFree => "",
            InstanceSource::PathSegment { name, .. }
            | InstanceSource::Query(name)
            | InstanceSource::Body(name) => name,
        }
    }
}

/// The rules for one prefix (and optionally some methods).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePolicy {
    pub prefix: String,
    /// Empty: every method.
    pub methods: Vec<Method>,
    /// `None`: not declared, so keys with scopes are refused.
    pub scope: Option<ScopeRule>,
    pub require_subscription: Option<bool>,
    pub instance: Option<InstanceSource>,
    pub ip_limit: Option<BucketParams>,
    pub on_store_error: Option<StoreErrorMode>,
    /// Where it is declared: `route[index]`, and the line and column of its prefix.
    pub declared: (usize, usize, usize),
}

impl RoutePolicy {
    /// Whether it says anything that only an API key can be held to: a scope, an instance
    /// source, a subscription required.
    pub fn binds_keys(&self) -> bool {
        matches!(self.scope, Some(ScopeRule::Required(_)))
            || matches!(
                self.instance,
                Some(
                    InstanceSource::PathSegment { .. }
                        | InstanceSource::Query(_)
                        | InstanceSource::Body(_)
                )
            )
            || self.require_subscription == Some(true)
    }
}

/// All route policies; the most specific match wins (longest prefix, then a method list over none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutePolicies {
    pub scopes: Vec<String>,
    ordered: Vec<RoutePolicy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutesFile {
    #[serde(default)]
    scopes: Vec<Spanned<String>>,
    #[serde(default)]
    route: Vec<RouteFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    prefix: Spanned<String>,
    #[serde(default)]
    methods: Vec<Spanned<String>>,
    scope: Option<Spanned<String>>,
    require_subscription: Option<bool>,
    /// `"none"` or a table ([`InstanceFile`]), told apart in `validate`.
    instance: Option<Spanned<toml::Value>>,
    ip_rate_per_second: Option<Spanned<u32>>,
    ip_burst: Option<Spanned<u32>>,
    on_store_error: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceFile {
    from: String,
    segment: Option<usize>,
    param: Option<String>,
    field: Option<String>,
}

impl RoutePolicies {
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        let source = crate::diagnostics::read_source(path)?;
        Self::parse(path, &source)
    }

    pub fn parse(path: &Path, source: &str) -> Result<Self, ConfigErrors> {
        let raw: RoutesFile = crate::diagnostics::parse_toml(path, source)?;
        let mut r = Reporter::new(path, source);
        for s in &raw.scopes {
            if s.get_ref() == "none" {
                r.at(
                    s.span(),
                    "scopes",
                    "\"none\" is reserved (scope = \"none\" marks a route that needs no scope)",
                );
            } else if !valid_scope(s.get_ref()) {
                r.at(
                    s.span(),
                    "scopes",
                    format!(
                        "\"{}\" is not a scope name: 1 to 64 lower-case letters, digits and : . _ -",
                        s.get_ref()
                    ),
                );
            }
        }
        let scopes: Vec<String> = raw.scopes.iter().map(|s| s.get_ref().clone()).collect();
        // (policy, route index, line of its prefix)
        let mut out: Vec<(RoutePolicy, usize, usize)> = Vec::new();
        for (i, route) in raw.route.iter().enumerate() {
            let (line, column) = crate::diagnostics::line_col(source, route.prefix.span().start);
            let policy = validate(&mut r, i, route, &scopes, (i, line, column));
            let overlap = |o: &RoutePolicy| {
                o.prefix == policy.prefix
                    && (o.methods.is_empty()
                        || policy.methods.is_empty()
                        || o.methods.iter().any(|m| policy.methods.contains(m)))
            };
            if let Some((_, j, other_line)) = out.iter().find(|(o, _, _)| overlap(o)) {
                r.at(
                    route.prefix.span(),
                    format!("route[{i}].prefix"),
                    format!(
                        "\"{}\" overlaps route[{j}] (line {other_line}) for the same methods: conflicting rules",
                        policy.prefix
                    ),
                );
                continue;
            }
            out.push((policy, i, line));
        }
        let mut ordered: Vec<RoutePolicy> = out.into_iter().map(|(p, _, _)| p).collect();
        ordered.sort_by(|a, b| {
            b.prefix
                .len()
                .cmp(&a.prefix.len())
                .then(b.methods.is_empty().cmp(&a.methods.is_empty()).reverse())
        });
        r.finish(RoutePolicies { scopes, ordered })
    }

    /// Every policy, most specific first.
    pub fn iter(&self) -> impl Iterator<Item = &RoutePolicy> {
        self.ordered.iter()
    }

    /// The policy for a request, if any declares it. `HEAD` matches entries listing `GET`.
    pub fn find(&self, method: &Method, path: &str) -> Option<&RoutePolicy> {
        let method = if method == Method::HEAD {
            &Method::GET
        } else {
            method
        };
        self.ordered.iter().find(|p| {
            crate::path::prefix_matches(&p.prefix, path)
                && (p.methods.is_empty() || p.methods.contains(method))
        })
    }

    /// True when `scope` is declared and so may be given to a key (none may when no scope
    /// is declared).
    pub fn knows_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }

    pub fn len(&self) -> usize {
        self.ordered.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ordered.is_empty()
    }
}

/// A scope name, in `routes.toml` and on a key alike: 1–64 lower-case letters, digits and
/// `: . _ -` (one item of the comma-separated list a key's scopes are forwarded as).
pub fn valid_scope(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b':' | b'_' | b'-' | b'.')
        })
}

fn validate(
    r: &mut Reporter,
    i: usize,
    route: &RouteFile,
    scopes: &[String],
    declared: (usize, usize, usize),
) -> RoutePolicy {
    let field = |f: &str| format!("route[{i}].{f}");
    let prefix = route.prefix.get_ref().clone();
    if let Some(problem) = crate::path::prefix_problem(&prefix) {
        r.at(
            route.prefix.span(),
            field("prefix"),
            format!("\"{prefix}\" {problem}"),
        );
    }
    let methods = route
        .methods
        .iter()
        .filter_map(|m| match Method::from_str(m.get_ref()) {
            Ok(method) if m.get_ref().bytes().all(|b| b.is_ascii_uppercase()) => Some(method),
            _ => {
                r.at(
                    m.span(),
                    field("methods"),
                    format!("\"{}\" is not an HTTP method (use upper case)", m.get_ref()),
                );
                None
            }
        })
        .collect();
    if let Some(scope) = &route.scope {
        if scope.get_ref() != "none" && !scopes.iter().any(|s| s == scope.get_ref()) {
            r.at(
                scope.span(),
                field("scope"),
                format!(
                    "unknown scope \"{}\" (declare it in scopes)",
                    scope.get_ref()
                ),
            );
        }
    }
    let instance = route.instance.as_ref().and_then(|inst| {
        let span = inst.span();
        let table = match inst.get_ref() {
            toml::Value::String(s) if s == "none" => return Some(InstanceSource::InstanceFree),
            v => v.clone().try_into::<InstanceFile>().ok(),
        };
        let source = match table
            .as_ref()
            .map(|t| (t.from.as_str(), t.segment, &t.param, &t.field))
        {
            Some(("path", Some(segment), param, None)) if param.as_ref().is_none_or(|p| !p.is_empty()) => {
                InstanceSource::PathSegment {
                    segment,
                    name: param.clone().unwrap_or_else(|| "instanceId".to_owned()),
                }
            }
            Some(("query", None, Some(p), None)) if !p.is_empty() => {
                InstanceSource::Query(p.clone())
            }
            Some(("body", None, None, Some(f))) if !f.is_empty() => {
                InstanceSource::Body(f.clone())
            }
            _ => {
                r.at(
                    span,
                    field("instance"),
                    "expected \"none\", { from = \"path\", segment = N[, param = \"...\"] }, { from = \"query\", param = \"...\" } or { from = \"body\", field = \"...\" }",
                );
                return None;
            }
        };
        Some(source)
    });
    let mut positive = |v: &Option<Spanned<u32>>, f: &str| {
        v.as_ref().map(|v| {
            if *v.get_ref() == 0 {
                r.at(v.span(), field(f), "must be at least 1, got 0");
            }
            *v.get_ref()
        })
    };
    let rate = positive(&route.ip_rate_per_second, "ip_rate_per_second");
    let burst = positive(&route.ip_burst, "ip_burst");
    let ip_limit = match (rate, burst) {
        (None, None) => None,
        (rate, burst) => {
            let rate = rate.unwrap_or(10);
            Some(BucketParams {
                rate_per_second: rate,
                burst: burst.unwrap_or(rate),
            })
        }
    };
    let on_store_error = route
        .on_store_error
        .as_ref()
        .and_then(|m| match m.get_ref().as_str() {
            "fail_closed" => Some(StoreErrorMode::FailClosed),
            "fail_open" => Some(StoreErrorMode::FailOpen),
            other => {
                r.at(
                    m.span(),
                    field("on_store_error"),
                    format!("unknown mode \"{other}\" (expected \"fail_closed\" or \"fail_open\")"),
                );
                None
            }
        });
    RoutePolicy {
        prefix,
        methods,
        scope: route.scope.as_ref().map(|s| match s.get_ref().as_str() {
            "none" => ScopeRule::NotNeeded,
            name => ScopeRule::Required(name.to_owned()),
        }),
        require_subscription: route.require_subscription,
        instance,
        ip_limit,
        on_store_error,
        declared,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(src: &str) -> Result<RoutePolicies, String> {
        RoutePolicies::parse(Path::new("routes.toml"), src).map_err(|e| e.to_string())
    }

    #[test]
    fn the_shipped_policies_load() {
        let p = RoutePolicies::load(Path::new("lua-free-policies/routes.toml")).unwrap();
        let send = p.find(&Method::POST, "/api/v1/messages/send").unwrap();
        assert_eq!(
            send.scope,
            Some(ScopeRule::Required("messages:send".into()))
        );
        assert_eq!(
            send.instance,
            Some(InstanceSource::Body("instanceId".into()))
        );
        assert_eq!(send.require_subscription, Some(true));
        let instance = p.find(&Method::PATCH, "/api/v1/instances/x").unwrap();
        assert_eq!(
            instance.instance,
            Some(InstanceSource::PathSegment {
                segment: 3,
                name: "instanceId".into()
            })
        );
    }

    fn scope_of(p: &RoutePolicies, m: Method, path: &str) -> Option<Option<ScopeRule>> {
        p.find(&m, path).map(|p| p.scope.clone())
    }

    #[test]
    fn most_specific_wins() {
        let p = parse(
            "scopes = [\"a\", \"b\"]\n\
             [[route]]\nprefix = \"/api/v1/\"\nscope = \"a\"\n\
             [[route]]\nprefix = \"/api/v1/x/\"\nmethods = [\"GET\"]\nscope = \"b\"\n\
             [[route]]\nprefix = \"/api/v1/x/\"\nmethods = [\"POST\"]\n",
        )
        .unwrap();
        let named = |s: &str| Some(Some(ScopeRule::Required(s.into())));
        assert_eq!(scope_of(&p, Method::GET, "/api/v1/x/1"), named("b"));
        assert_eq!(scope_of(&p, Method::HEAD, "/api/v1/x/1"), named("b"));
        assert_eq!(scope_of(&p, Method::GET, "/api/v1/x"), named("b"));
        assert_eq!(scope_of(&p, Method::POST, "/api/v1/x/1"), Some(None));
        assert_eq!(scope_of(&p, Method::DELETE, "/api/v1/x/1"), named("a"));
        assert_eq!(scope_of(&p, Method::GET, "/api/v1/xy"), named("a"));
        assert!(p.find(&Method::GET, "/api/other").is_none());
    }

    #[test]
    fn prefixes_match_whole_segments_and_none_is_a_keyword() {
        let p = parse(
            "scopes = [\"a\"]\n\
             [[route]]\nprefix = \"/api/v1/status\"\nscope = \"none\"\ninstance = \"none\"\n",
        )
        .unwrap();
        let status = p.find(&Method::GET, "/api/v1/status").unwrap();
        assert_eq!(status.scope, Some(ScopeRule::NotNeeded));
        assert_eq!(status.instance, Some(InstanceSource::InstanceFree));
        assert!(p.find(&Method::GET, "/api/v1/status/x").is_some());
        assert!(p.find(&Method::GET, "/api/v1/statusX").is_none());
        assert!(p.knows_scope("a"));
        assert!(!p.knows_scope("none"));
        // No scopes declared: no scope is known, so none may be given to a key.
        assert!(!parse("").unwrap().knows_scope("a"));
        assert_eq!(
            parse("scopes = [\"none\"]\n").unwrap_err(),
            "routes.toml:1:11: scopes: \"none\" is reserved (scope = \"none\" marks a route that needs no scope)"
        );
    }

    #[test]
    fn scope_names_are_single_list_items() {
        assert!(parse("scopes = [\"messages:send\", \"a.b_c-1\"]\n").is_ok());
        for bad in ["a,b", "a b", "", "é", "Messages:send", "a/b"] {
            let err = parse(&format!("scopes = [{bad:?}]\n")).unwrap_err();
            assert!(err.contains("is not a scope name"), "{bad:?}: {err}");
        }
        assert!(parse(&format!("scopes = [{:?}]\n", "a".repeat(65))).is_err());
    }

    #[test]
    fn every_problem_is_located_word_for_word() {
        let err = parse(
            "scopes = [\"messages:send\"]\n\
             [[route]]\nprefix = \"/api/v1/a\"\nscope = \"messages:sned\"\n\
             [[route]]\nprefix = \"/api/v1/b\"\nmethods = [\"get\"]\nip_rate_per_second = 0\nip_burst = 0\n\
             [[route]]\nprefix = \"/api/v1/a\"\nmethods = [\"POST\"]\n\
             [[route]]\nprefix = \"api/v1/c\"\ninstance = { from = \"header\", field = \"x\" }\non_store_error = \"maybe\"\n",
        )
        .unwrap_err();
        assert_eq!(
            err,
            "routes.toml:4:9: route[0].scope: unknown scope \"messages:sned\" (declare it in scopes)\n\
             routes.toml:7:12: route[1].methods: \"get\" is not an HTTP method (use upper case)\n\
             routes.toml:8:22: route[1].ip_rate_per_second: must be at least 1, got 0\n\
             routes.toml:9:12: route[1].ip_burst: must be at least 1, got 0\n\
             routes.toml:11:10: route[2].prefix: \"/api/v1/a\" overlaps route[0] (line 3) for the same methods: conflicting rules\n\
             routes.toml:14:10: route[3].prefix: \"api/v1/c\" must start with '/'\n\
             routes.toml:15:12: route[3].instance: expected \"none\", { from = \"path\", segment = N[, param = \"...\"] }, { from = \"query\", param = \"...\" } or { from = \"body\", field = \"...\" }\n\
             routes.toml:16:18: route[3].on_store_error: unknown mode \"maybe\" (expected \"fail_closed\" or \"fail_open\")"
        );
    }
}
