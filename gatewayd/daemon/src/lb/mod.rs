//! The load balancer: Maglev tables ([`maglev`]), the pure planner ([`plan`]), the map writer
//! ([`maps`]), and the component that runs them ([`balancer`]).

pub mod balancer;
pub mod maglev;
pub mod maps;
pub mod plan;
