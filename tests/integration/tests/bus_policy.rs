//! The D-Bus policy in units/usr/share/dbus-1/system.d/com.powernode.conf, enforced by a real
//! dbus-daemon: root may call methods, group `powernode-observe` may only read, everyone else nothing.

use anyhow::{Context, Result, ensure};
use powernode_integration_tests::bus::{Caller, PrivateBus, busctl, is_access_denied};
use powernode_integration_tests::{describe, ensure_group, ensure_user};
use std::process::Output;

const NAME: &str = "com.powernode.Identity1";
const PATH: &str = "/com/powernode/Identity1";
const IFACE: &str = "com.powernode.Identity1";

/// Stand-in service: one read-only property, one writable property, one method.
struct Identity {
    label: String,
}

#[zbus::interface(name = "com.powernode.Identity1")]
impl Identity {
    fn ping(&self, text: &str) -> String {
        format!("pong:{text}")
    }

    #[zbus(property)]
    fn version(&self) -> String {
        "test-1".into()
    }

    #[zbus(property)]
    fn label(&self) -> String {
        self.label.clone()
    }

    #[zbus(property)]
    fn set_label(&mut self, label: String) {
        self.label = label;
    }
}

fn call_ping(address: &str, caller: &Caller) -> Result<Output> {
    busctl(
        address,
        caller,
        &["call", NAME, PATH, IFACE, "Ping", "s", "hi"],
    )
}

fn get_version(address: &str, caller: &Caller) -> Result<Output> {
    busctl(
        address,
        caller,
        &["get-property", NAME, PATH, IFACE, "Version"],
    )
}

fn set_label(address: &str, caller: &Caller, value: &str) -> Result<Output> {
    busctl(
        address,
        caller,
        &["set-property", NAME, PATH, IFACE, "Label", "s", value],
    )
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn expect_ok(what: &str, out: &Output) -> Result<String> {
    ensure!(
        out.status.success(),
        "{what} should succeed:\n{}",
        describe(out)
    );
    Ok(stdout(out))
}

fn expect_denied(what: &str, out: &Output) -> Result<()> {
    ensure!(
        is_access_denied(out),
        "{what} should be refused by the bus policy:\n{}",
        describe(out)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_separates_root_group_members_and_others() -> Result<()> {
    let gid = ensure_group("powernode-observe")?;
    let bus = PrivateBus::start()?;
    // The policy lets root own the names too, so the service can live in this process.
    let _service = zbus::connection::Builder::address(bus.address())
        .name(NAME)
        .serve_at(
            PATH,
            Identity {
                label: "initial".into(),
            },
        )
        .build()
        .await
        .context("serving com.powernode.Identity1 on the private bus as root")?;

    let address = bus.address().to_string();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let root = Caller::root();
        let nobody = Caller::nobody();
        let member = Caller::nobody_in_group(gid);

        // root: everything.
        assert_eq!(
            expect_ok("root: Ping", &call_ping(&address, &root)?)?,
            r#"s "pong:hi""#
        );
        assert_eq!(
            expect_ok("root: get Version", &get_version(&address, &root)?)?,
            r#"s "test-1""#
        );
        expect_ok("root: set Label", &set_label(&address, &root, "by-root")?)?;

        // nobody: nothing, not even a property read.
        expect_denied("nobody: Ping", &call_ping(&address, &nobody)?)?;
        expect_denied("nobody: get Version", &get_version(&address, &nobody)?)?;
        expect_denied("nobody: set Label", &set_label(&address, &nobody, "x")?)?;
        expect_denied(
            "nobody: Introspect",
            &busctl(&address, &nobody, &["introspect", NAME, PATH])?,
        )?;

        // group powernode-observe: read-only.
        assert_eq!(
            expect_ok("member: get Version", &get_version(&address, &member)?)?,
            r#"s "test-1""#
        );
        expect_ok(
            "member: introspect",
            &busctl(&address, &member, &["introspect", NAME, PATH])?,
        )?;
        expect_denied("member: Ping", &call_ping(&address, &member)?)?;
        expect_denied(
            "member: set Label",
            &set_label(&address, &member, "by-member")?,
        )?;

        // The refused Set really did not happen.
        let label = busctl(
            &address,
            &root,
            &["get-property", NAME, PATH, IFACE, "Label"],
        )?;
        assert_eq!(expect_ok("root: get Label", &label)?, r#"s "by-root""#);
        Ok(())
    })
    .await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_outside_the_policy_cannot_be_owned() -> Result<()> {
    let bus = PrivateBus::start()?;
    let result = zbus::connection::Builder::address(bus.address())
        .name("com.powernode.NotInPolicy1")
        .build()
        .await;
    let err = result
        .err()
        .context("owning a name the policy does not list should fail")?;
    ensure!(
        err.to_string().contains("AccessDenied") || err.to_string().contains("not allowed"),
        "unexpected error owning an unlisted name: {err}"
    );
    Ok(())
}

/// Stand-in for com.powernode.Mount1.
struct Mount;

#[zbus::interface(name = "com.powernode.Mount1")]
impl Mount {
    fn ping(&self) -> String {
        "pong".into()
    }
}

/// One uid per daemon: each may call only the services the privilege map gives it. Here
/// Mount1: the agent (user powernode) may call it; identityd and fleeteventd's users may not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_daemon_user_reaches_only_its_peers() -> Result<()> {
    let agent = ensure_user("powernode")?;
    let identity = ensure_user("powernode-identity")?;
    let events = ensure_user("powernode-events")?;
    let bus = PrivateBus::start()?;
    let _service = zbus::connection::Builder::address(bus.address())
        .name("com.powernode.Mount1")
        .serve_at("/com/powernode/Mount1", Mount)
        .build()
        .await
        .context("serving com.powernode.Mount1 on the private bus as root")?;
    let address = bus.address().to_string();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let ping = |uid: u32| {
            busctl(
                &address,
                &Caller {
                    uid,
                    gid: powernode_integration_tests::bus::NOBODY,
                    groups: Vec::new(),
                },
                &[
                    "call",
                    "com.powernode.Mount1",
                    "/com/powernode/Mount1",
                    "com.powernode.Mount1",
                    "Ping",
                ],
            )
        };
        assert_eq!(
            expect_ok("agent: Mount1.Ping", &ping(agent)?)?,
            r#"s "pong""#
        );
        expect_denied("identityd: Mount1.Ping", &ping(identity)?)?;
        expect_denied("fleeteventd: Mount1.Ping", &ping(events)?)?;
        Ok(())
    })
    .await??;
    Ok(())
}
