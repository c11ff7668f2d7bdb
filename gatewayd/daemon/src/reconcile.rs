//! The one reconcile contract. Every component that writes state follows it: the load
//! balancer ([`LoadBalancer`]), the egress gateway ([`EgressGateway`]), the program
//! attachments ([`Datapath`]), the node encryption ([`Encryption`]), the backends' neighbour
//! entries ([`Neighbours`]) and the egress addresses ([`EgressAddresses`]).
//!
//! - [`Reconcile::plan`] computes, from the desired state and the settings, what the component
//!   will write: a named plan type per component. It writes nothing (it may read the maps or
//!   netlink), and an error there rejects the change.
//! - [`Reconcile::apply`] executes a plan: the only code that writes.
//!
//! [`Components::program`] plans every component before it applies any, then applies them in
//! one fixed order, so a change that any component's plan rejects leaves every component as it
//! was. (A write the kernel refuses midway stops the applies after it; the load balancer and
//! the egress gateway then re-read what their maps really hold.)
//! How a component orders its own writes (the load balancer's phases, IPsec states before their
//! policies) stays inside its apply.
//!
//! One plan touches the system: the node encryption's, when the mode changes, starts the new
//! mode's device (WireGuard) or installs and removes one probe XFRM state (IPsec), because
//! whether the machine can run a mode is only known by trying, and a mode it cannot run must
//! be refused before anything changes. It is planned last, so it runs only once every other
//! component has accepted the change.

use crate::config::Settings;
use crate::datapath::Datapath;
use crate::egress::gateway::EgressGateway;
use crate::encryption::Encryption;
use crate::host::addresses::EgressAddresses;
use crate::host::neighbours::Neighbours;
use crate::lb::balancer::LoadBalancer;
use crate::model::DesiredState;
use anyhow::{Context, Result};

/// A component that programs part of the desired state.
// The daemon drives its components from one thread (a current-thread runtime): their futures
// need no `Send` bound, which is what the lint is about.
#[allow(async_fn_in_trait)]
pub trait Reconcile {
    /// What [`apply`](Self::apply) will write.
    type Plan;

    /// What it takes to make the component serve `desired` under `settings`. Writes nothing.
    async fn plan(&self, desired: &DesiredState, settings: &Settings) -> Result<Self::Plan>;

    /// Writes a plan made by [`plan`](Self::plan) from the component's current state.
    async fn apply(&mut self, plan: Self::Plan) -> Result<()>;
}

/// Every component the daemon runs, and the desired state of the last change they all applied.
/// The type parameters are there for the tests, which run fakes; the daemon uses the defaults.
pub struct Components<
    Lb = LoadBalancer,
    Egress = EgressGateway,
    Attach = Datapath,
    Crypt = Encryption,
    Neigh = Neighbours,
    Addr = EgressAddresses,
> {
    pub lb: Lb,
    pub egress: Egress,
    pub attachments: Attach,
    pub encryption: Crypt,
    pub neighbours: Neigh,
    pub addresses: Addr,
    /// The desired state of the last change every component applied.
    in_force: DesiredState,
}

impl<Lb, Egress, Attach, Crypt, Neigh, Addr> Components<Lb, Egress, Attach, Crypt, Neigh, Addr>
where
    Lb: Reconcile,
    Egress: Reconcile,
    Attach: Reconcile,
    Crypt: Reconcile,
    Neigh: Reconcile,
    Addr: Reconcile,
{
    pub fn new(
        lb: Lb,
        egress: Egress,
        attachments: Attach,
        encryption: Crypt,
        neighbours: Neigh,
        addresses: Addr,
    ) -> Self {
        Components {
            lb,
            egress,
            attachments,
            encryption,
            neighbours,
            addresses,
            in_force: DesiredState::default(),
        }
    }

    /// Makes every component serve `desired`. Every plan is made before the first write, so a
    /// change one component rejects (capacity, an egress address missing, a mode the kernel
    /// cannot run) leaves all of them as they were. Then, in this order:
    /// 1. the load balancer's maps;
    /// 2. the egress gateway's maps;
    /// 3. the attachments (the programs those maps feed go on the interfaces that need them);
    /// 4. the node encryption (the old mode stops once the new one runs);
    /// 5. the backends' neighbour entries, and 6. the egress addresses: the host catches up
    ///    with what the datapath now serves.
    pub async fn program(&mut self, desired: DesiredState, settings: &Settings) -> Result<()> {
        let lb = self.lb.plan(&desired, settings).await?;
        let egress = self.egress.plan(&desired, settings).await?;
        let attachments = self.attachments.plan(&desired, settings).await?;
        let neighbours = self.neighbours.plan(&desired, settings).await?;
        let addresses = self.addresses.plan(&desired, settings).await?;
        // Last: the one plan that may start something (see the module's documentation).
        let encryption = self
            .encryption
            .plan(&desired, settings)
            .await
            .context("node encryption")?;

        self.lb.apply(lb).await?;
        self.egress.apply(egress).await?;
        self.attachments.apply(attachments).await?;
        self.encryption
            .apply(encryption)
            .await
            .context("node encryption")?;
        self.neighbours.apply(neighbours).await?;
        self.addresses.apply(addresses).await?;
        self.in_force = desired;
        Ok(())
    }

    /// The desired state of the last change every component applied.
    pub fn in_force(&self) -> &DesiredState {
        &self.in_force
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    /// A component that writes down what it is asked to do, and fails its plan or its apply
    /// when told to.
    struct Fake {
        name: &'static str,
        calls: Rc<RefCell<Vec<String>>>,
        fail_plan: bool,
        fail_apply: bool,
    }

    /// A plan that says which component made it.
    struct FakePlan(&'static str);

    impl Reconcile for Fake {
        type Plan = FakePlan;

        async fn plan(&self, _: &DesiredState, _: &Settings) -> Result<FakePlan> {
            self.calls.borrow_mut().push(format!("plan {}", self.name));
            if self.fail_plan {
                anyhow::bail!("{} refuses", self.name);
            }
            Ok(FakePlan(self.name))
        }

        async fn apply(&mut self, plan: FakePlan) -> Result<()> {
            assert_eq!(plan.0, self.name, "a component applies its own plan");
            self.calls.borrow_mut().push(format!("apply {}", self.name));
            if self.fail_apply {
                anyhow::bail!("{} failed", self.name);
            }
            Ok(())
        }
    }

    type Fakes = Components<Fake, Fake, Fake, Fake, Fake, Fake>;

    const ORDER: [&str; 6] = [
        "lb",
        "egress",
        "attachments",
        "encryption",
        "neighbours",
        "addresses",
    ];

    /// Fakes in the daemon's order; `plan_fails` / `apply_fails` name the one that fails.
    fn fakes(plan_fails: Option<&str>, apply_fails: Option<&str>) -> (Fakes, Rc<RefCell<Vec<String>>>) {
        let calls = Rc::new(RefCell::new(Vec::new()));
        let fake = |name| Fake {
            name,
            calls: calls.clone(),
            fail_plan: plan_fails == Some(name),
            fail_apply: apply_fails == Some(name),
        };
        let components = Components::new(
            fake("lb"),
            fake("egress"),
            fake("attachments"),
            fake("encryption"),
            fake("neighbours"),
            fake("addresses"),
        );
        (components, calls)
    }

    fn settings() -> Settings {
        crate::config::parse("", &crate::config::AnyHost)
            .expect("the empty config is valid")
            .settings
    }

    fn desired(peer: &str) -> DesiredState {
        DesiredState {
            peers: vec![crate::model::Peer {
                name: peer.into(),
                public_key: String::new(),
                endpoint: None,
                allowed_ips: vec![],
            }],
            ..Default::default()
        }
    }

    fn run(components: &mut Fakes, desired: DesiredState) -> Result<()> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(components.program(desired, &settings()))
    }

    #[test]
    fn every_component_plans_before_any_applies_and_applies_go_in_the_documented_order() {
        let (mut components, calls) = fakes(None, None);
        run(&mut components, desired("a")).unwrap();
        let calls = calls.borrow();
        let (plans, applies) = calls.split_at(ORDER.len());
        assert!(plans.iter().all(|c| c.starts_with("plan ")), "{calls:?}");
        // The encryption plans last: its plan may start a device.
        assert_eq!(plans.last().map(String::as_str), Some("plan encryption"));
        let applied: Vec<String> = ORDER.iter().map(|n| format!("apply {n}")).collect();
        assert_eq!(applies, applied.as_slice());
        assert_eq!(components.in_force(), &desired("a"));
    }

    #[test]
    fn a_plan_that_fails_anywhere_means_no_apply_at_all() {
        for failing in ORDER {
            let (mut components, calls) = fakes(Some(failing), None);
            let e = run(&mut components, desired("a")).unwrap_err();
            assert!(format!("{e:#}").contains(&format!("{failing} refuses")), "{e:#}");
            let calls = calls.borrow();
            assert!(
                calls.iter().all(|c| c.starts_with("plan ")),
                "{failing}: {calls:?}"
            );
            assert_eq!(components.in_force(), &DesiredState::default(), "{failing}");
        }
    }

    #[test]
    fn a_failed_apply_stops_the_later_ones_and_keeps_the_state_in_force() {
        let (mut components, calls) = fakes(None, None);
        run(&mut components, desired("a")).unwrap();
        calls.borrow_mut().clear();
        components.attachments.fail_apply = true;
        assert!(run(&mut components, desired("b")).is_err());
        let applies: Vec<String> = calls
            .borrow()
            .iter()
            .filter(|c| c.starts_with("apply "))
            .cloned()
            .collect();
        assert_eq!(applies, ["apply lb", "apply egress", "apply attachments"]);
        assert_eq!(components.in_force(), &desired("a"));
    }
}
