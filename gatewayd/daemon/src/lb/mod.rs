//! The load balancer: Maglev tables ([`maglev`]), the pure planner ([`plan`]), the map writer
//! ([`maps`]).

pub mod maglev;
pub mod maps;
pub mod plan;
