//! Where a request goes: the route for a path (longest prefix, whole segments) and the upstream
//! pools behind the routes (round robin, health checks). Below the reloadable snapshot, which
//! holds one router and one set of pools per configuration.

pub(crate) mod router;
pub(crate) mod upstream;
