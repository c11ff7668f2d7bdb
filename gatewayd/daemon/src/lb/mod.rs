//! Load balancing logic that needs no kernel: Maglev tables and the reconcile planner.

pub mod maglev;
pub mod reconcile;
