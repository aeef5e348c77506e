//! Rate-limit and quota decisions: pure logic, clock injected.

pub(crate) mod blocks;
pub mod gcra;
pub(crate) mod local;
pub mod quota;
