//! The identity cascade's network strategies against fake metadata services and a fake claim
//! server on loopback (tests/integration/src/metadata.rs): each cloud's wire format and headers,
//! the three user-data formats, hostile replies (garbage, binary, 100 MB, invalid UUID, no
//! answer, refused, 404 vs 500 vs reset), the deadline, precedence, and claim polling.
//! The real probe code runs; only the metadata base URL points at loopback. Which clouds are
//! asked at all follows the fake DMI tree under the node root (none: every cloud is asked).
#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use powernode::config::Config;
use powernode::identity::{self, Ctx, Resolution, Settings, Source};
use powernode::paths::Paths;
use powernode_integration_tests::metadata::{
    ClaimStep, Cloud, FakeClaim, FakeMetadata, QEMU_DMI, UserData, fake_dmi, refused_url,
};

const UUID: &str = "0b6a4c1e-5f7d-4c1a-9e2b-3d4f5a6b7c8d";
const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

fn put(root: &Path, rel: &str, content: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, content).unwrap();
}

fn settings(url: &str) -> Settings {
    Settings {
        metadata_url: url.to_string(),
        // No guestinfo tool on the test host; vSphere has its own tests.
        vsphere_command: Vec::new(),
        claim_min_poll: Duration::from_millis(20),
        ..Settings::default()
    }
}

fn ctx(root: &Path, url: &str) -> Ctx {
    Ctx::new(Paths::new(root), settings(url)).unwrap()
}

async fn run(root: &Path, url: &str) -> Resolution {
    identity::discover(&ctx(root, url)).await
}

fn trail(r: &Resolution) -> String {
    r.trail.join("\n")
}

fn json_ud(uuid: &str) -> Vec<u8> {
    format!(
        r#"{{"instance_uuid":"{uuid}","bootstrap_token":"tok-json","platform_url":"https://p.example","ca_pem":{}}}"#,
        serde_json::to_string(CA).unwrap()
    )
    .into_bytes()
}

/// A raw HTTP/1.1 request; returns the status code (proves what the fakes enforce).
fn raw_status(url: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> u16 {
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn the_fakes_enforce_each_clouds_headers() {
    let aws = FakeMetadata::start(Cloud::Aws, UserData::Body(b"x".to_vec())).unwrap();
    assert_eq!(raw_status(aws.url(), "PUT", "/latest/api/token", &[]), 400);
    assert_eq!(raw_status(aws.url(), "GET", "/latest/user-data", &[]), 401);
    assert_eq!(
        raw_status(
            aws.url(),
            "GET",
            "/latest/user-data",
            &[("X-aws-ec2-metadata-token", "forged")]
        ),
        401
    );
    assert_eq!(
        raw_status(
            aws.url(),
            "PUT",
            "/latest/api/token",
            &[("X-aws-ec2-metadata-token-ttl-seconds", "60")]
        ),
        200
    );
    let gcp = FakeMetadata::start(Cloud::Gcp, UserData::Unset).unwrap();
    assert_eq!(
        raw_status(gcp.url(), "GET", "/computeMetadata/v1/", &[]),
        403
    );
    assert_eq!(
        raw_status(
            gcp.url(),
            "GET",
            "/computeMetadata/v1/",
            &[("Metadata-Flavor", "Google")]
        ),
        200
    );
    let az = FakeMetadata::start(Cloud::Azure, UserData::Unset).unwrap();
    let p = "/metadata/instance?api-version=2021-02-01";
    assert_eq!(raw_status(az.url(), "GET", p, &[]), 400);
    assert_eq!(
        raw_status(
            az.url(),
            "GET",
            "/metadata/instance",
            &[("Metadata", "true")]
        ),
        400,
        "api-version is required"
    );
    assert_eq!(raw_status(az.url(), "GET", p, &[("Metadata", "true")]), 200);
}

#[tokio::test]
async fn every_cloud_in_its_wire_format_and_every_user_data_format() {
    let words = format!(
        "powernode.instance_uuid={UUID} powernode.bootstrap_token=tok-words powernode.platform_url=https://p.example"
    );
    let lines =
        format!("#!/bin/sh\nexport ID=\"{UUID}\"\nKEY='tok-lines'\nSERVER=https://p.example\n");
    let cases: Vec<(Cloud, Vec<u8>, Source, &str, &str)> = vec![
        (
            Cloud::Aws,
            json_ud(UUID),
            Source::Aws,
            "tok-json",
            "/latest/user-data (json)",
        ),
        (
            Cloud::Gcp,
            words.clone().into_bytes(),
            Source::Gcp,
            "tok-words",
            "/computeMetadata/v1/instance/attributes/user-data (powernode.* words)",
        ),
        (
            Cloud::Azure,
            lines.clone().into_bytes(),
            Source::Azure,
            "tok-lines",
            "/metadata/instance/compute/userData?api-version=2021-01-01&format=text (ID=/KEY= lines)",
        ),
        (
            Cloud::DigitalOcean,
            json_ud(UUID),
            Source::Digitalocean,
            "tok-json",
            "/metadata/v1/user-data (json)",
        ),
        (
            Cloud::Hetzner,
            lines.into_bytes(),
            Source::Hetzner,
            "tok-lines",
            "/hetzner/v1/userdata (ID=/KEY= lines)",
        ),
    ];
    for (cloud, body, source, token, evidence) in cases {
        let fake = FakeMetadata::start(cloud, UserData::Body(body)).unwrap();
        let root = tempfile::tempdir().unwrap();
        let r = run(root.path(), fake.url()).await;
        let t = trail(&r);
        let id = r
            .identity
            .unwrap_or_else(|| panic!("{cloud:?}: no identity:\n{t}"));
        assert_eq!(id.source, source, "{t}");
        assert_eq!(id.instance_uuid, UUID);
        assert_eq!(id.bootstrap_token.as_deref(), Some(token));
        assert_eq!(id.platform_url.as_deref(), Some("https://p.example"));
        assert!(
            id.evidence.starts_with(&format!(
                "{}: user-data from {}",
                source.as_str(),
                fake.url()
            )),
            "{}",
            id.evidence
        );
        assert!(id.evidence.ends_with(evidence), "{}", id.evidence);
        // Every earlier cloud saw this fake and called it "not this cloud".
        assert!(!t.contains("error"), "{cloud:?}: {t}");
    }
}

/// Each cloud's detection request, as the fakes log it (status left off).
const DETECTIONS: [(Cloud, &str); 5] = [
    (Cloud::Aws, "PUT /latest/api/token"),
    (Cloud::Gcp, "GET /computeMetadata/v1/"),
    (Cloud::Azure, "GET /metadata/instance?api-version="),
    (Cloud::DigitalOcean, "GET /metadata/v1/id"),
    (Cloud::Hetzner, "GET /hetzner/v1/metadata/instance-id"),
];

fn asked(reqs: &[String], cloud: Cloud) -> bool {
    let prefix = cloud.path_prefix();
    reqs.iter().any(|l| {
        l.split_whitespace()
            .nth(1)
            .is_some_and(|p| p.starts_with(prefix))
    })
}

/// Firmware that names a cloud: only that cloud is asked, and it is found.
#[tokio::test]
async fn the_firmware_names_the_only_cloud_asked() {
    for cloud in Cloud::ALL {
        let fake = FakeMetadata::start(cloud, UserData::Body(json_ud(UUID))).unwrap();
        let root = tempfile::tempdir().unwrap();
        fake_dmi(root.path(), cloud.dmi()).unwrap();
        let r = run(root.path(), fake.url()).await;
        let t = trail(&r);
        let id = r
            .identity
            .unwrap_or_else(|| panic!("{cloud:?}: no identity:\n{t}"));
        assert_eq!(id.instance_uuid, UUID, "{cloud:?}");
        let reqs = fake.requests();
        for other in Cloud::ALL {
            assert_eq!(
                asked(&reqs, other),
                other == cloud,
                "{cloud:?} node, {other:?}: {reqs:?}"
            );
        }
        let skipped = t
            .lines()
            .filter(|l| l.contains(": not probed: the firmware does not name this cloud"))
            .count();
        let earlier = Cloud::ALL.iter().position(|c| *c == cloud).unwrap();
        assert_eq!(
            skipped, earlier,
            "the clouds before {cloud:?} are skipped:\n{t}"
        );
    }
}

/// DMI saying "Hetzner": only Hetzner is asked, even though every cloud before it in the
/// cascade order has a server answering on the metadata address.
#[tokio::test]
async fn hetzner_firmware_asks_only_hetzner() {
    let fake = FakeMetadata::start(Cloud::Hetzner, UserData::Body(json_ud(UUID))).unwrap();
    let root = tempfile::tempdir().unwrap();
    fake_dmi(
        root.path(),
        &[("sys_vendor", "Hetzner"), ("product_name", "vServer")],
    )
    .unwrap();
    let r = run(root.path(), fake.url()).await;
    let t = trail(&r);
    assert_eq!(r.identity.map(|i| i.source), Some(Source::Hetzner), "{t}");
    let reqs = fake.requests();
    assert!(!reqs.is_empty());
    assert!(
        reqs.iter().all(|l| l.starts_with("GET /hetzner/")),
        "{reqs:?}"
    );
    for name in ["aws", "gcp", "azure", "digitalocean"] {
        assert!(
            t.contains(&format!("{name}: not probed: the firmware does not name this cloud (sys_vendor=\"Hetzner\", product_name=\"vServer\")")),
            "{name}:\n{t}"
        );
    }
}

/// A machine that is no cloud (QEMU, a laptop, a server on a LAN) sends nothing to the
/// metadata address, whatever answers there; also when the DMI directory holds no vendor
/// strings at all.
#[tokio::test]
async fn a_qemu_firmware_asks_no_cloud() {
    for dmi in [QEMU_DMI, &[]] {
        for cloud in Cloud::ALL {
            let fake = FakeMetadata::start(cloud, UserData::Body(json_ud(UUID))).unwrap();
            let root = tempfile::tempdir().unwrap();
            fake_dmi(root.path(), dmi).unwrap();
            put(root.path(), "etc/identity.cfg", "ID=from-cfg\n");
            let r = run(root.path(), fake.url()).await;
            let t = trail(&r);
            assert_eq!(
                r.identity.map(|i| i.source),
                Some(Source::IdentityCfg),
                "{t}"
            );
            assert_eq!(
                fake.requests(),
                Vec::<String>::new(),
                "{cloud:?} fake, DMI {dmi:?}"
            );
            assert_eq!(
                t.matches(": not probed: the firmware does not name this cloud")
                    .count(),
                5,
                "{t}"
            );
        }
    }
}

/// No DMI at all (no `/sys/class/dmi/id`): the only case where every cloud is asked.
#[tokio::test]
async fn without_dmi_every_cloud_is_asked() {
    let fake = FakeMetadata::start(Cloud::Hetzner, UserData::Unset).unwrap();
    let root = tempfile::tempdir().unwrap();
    put(root.path(), "etc/identity.cfg", "ID=from-cfg\n");
    let r = run(root.path(), fake.url()).await;
    assert_eq!(r.identity.map(|i| i.source), Some(Source::IdentityCfg));
    let reqs = fake.requests();
    for (cloud, detection) in DETECTIONS {
        assert!(
            reqs.iter().any(|l| l.starts_with(detection)),
            "{cloud:?} not asked: {reqs:?}"
        );
    }
}

#[tokio::test]
async fn aws_uses_an_imdsv2_session_token() {
    let fake = FakeMetadata::start(Cloud::Aws, UserData::Body(json_ud(UUID))).unwrap();
    let root = tempfile::tempdir().unwrap();
    let r = run(root.path(), fake.url()).await;
    assert_eq!(r.identity.unwrap().source, Source::Aws);
    let reqs = fake.requests();
    let put = reqs
        .iter()
        .position(|l| l == "PUT /latest/api/token -> 200")
        .unwrap();
    let get = reqs
        .iter()
        .position(|l| l == "GET /latest/user-data -> 200")
        .unwrap();
    assert!(put < get, "{reqs:?}");
    assert!(!reqs.iter().any(|l| l.ends_with("-> 401")), "{reqs:?}");
}

#[tokio::test]
async fn user_data_that_is_not_ours_or_not_text() {
    let root = tempfile::tempdir().unwrap();
    for (body, needle) in [
        (
            &b"#cloud-config\npackages: [htop]\n"[..],
            "holds no powernode identity",
        ),
        (&b"\x1f\x8b\x08\x00\x00\x00\xff\xfe binary"[..], "not UTF-8"),
        (&b"{\"instance_uuid\": [1,2"[..], "JSON"),
        (&b"   \n"[..], "is empty"),
    ] {
        let fake = FakeMetadata::start(Cloud::Gcp, UserData::Body(body.to_vec())).unwrap();
        let r = run(root.path(), fake.url()).await;
        let t = trail(&r);
        assert!(r.identity.is_none(), "{t}");
        let line = r.trail.iter().find(|l| l.starts_with("gcp:")).unwrap();
        assert!(line.contains(needle), "{needle}: {line}");
    }
    let fake = FakeMetadata::start(
        Cloud::Aws,
        UserData::Body(br#"{"instance_uuid":"../../etc/passwd"}"#.to_vec()),
    )
    .unwrap();
    let r = run(root.path(), fake.url()).await;
    assert!(r.identity.is_none());
    let t = trail(&r);
    assert!(
        t.contains("aws: error") && t.contains("not a UUID-like identifier"),
        "{t}"
    );
}

#[tokio::test]
async fn a_100_mb_body_is_capped_and_refused_quickly() {
    let root = tempfile::tempdir().unwrap();
    for declare_length in [true, false] {
        let fake = FakeMetadata::start(
            Cloud::DigitalOcean,
            UserData::Huge {
                bytes: 100 * 1024 * 1024,
                declare_length,
            },
        )
        .unwrap();
        let start = Instant::now();
        let r = run(root.path(), fake.url()).await;
        let spent = start.elapsed();
        assert!(r.identity.is_none());
        let t = trail(&r);
        assert!(
            t.contains("digitalocean: error") && t.contains("exceeds the limit of 65536 bytes"),
            "{t}"
        );
        assert!(spent < Duration::from_secs(2), "{spent:?}");
    }
}

#[tokio::test]
async fn absent_vs_not_ready_vs_reset() {
    let root = tempfile::tempdir().unwrap();
    // 404: the cloud is there, the instance has no user-data — absent, asked once.
    let fake = FakeMetadata::start(Cloud::Hetzner, UserData::Status(404)).unwrap();
    let r = run(root.path(), fake.url()).await;
    let t = trail(&r);
    assert!(t.contains("hetzner: instance has no user-data"), "{t}");
    let n = |fake: &FakeMetadata| {
        fake.requests()
            .iter()
            .filter(|l| l.starts_with("GET /hetzner/v1/userdata"))
            .count()
    };
    assert_eq!(n(&fake), 1);

    // 500: not ready — retried with jitter until the deadline, then an error.
    let fake = FakeMetadata::start(Cloud::Hetzner, UserData::Status(500)).unwrap();
    let start = Instant::now();
    let r = run(root.path(), fake.url()).await;
    let t = trail(&r);
    assert!(r.identity.is_none());
    assert!(
        t.contains("hetzner: error") && t.contains("HTTP 500"),
        "{t}"
    );
    assert!(n(&fake) >= 2, "500 must be retried: {:?}", fake.requests());
    assert!(
        start.elapsed() < Duration::from_millis(2600),
        "{:?}",
        start.elapsed()
    );

    // 503 twice, then data: the retry gets there.
    let fake = FakeMetadata::start(Cloud::Hetzner, UserData::FlakyThen(2, json_ud(UUID))).unwrap();
    let r = run(root.path(), fake.url()).await;
    assert_eq!(
        r.identity.map(|i| i.source),
        Some(Source::Hetzner),
        "{:?}",
        fake.requests()
    );

    // Connection reset: not ready, an error (not "absent").
    let fake = FakeMetadata::resetting().unwrap();
    let r = run(root.path(), fake.url()).await;
    let t = trail(&r);
    assert!(
        t.contains("aws: error") && t.contains("aws: not ready") && t.contains("reset"),
        "{t}"
    );
    assert!(t.contains("gcp: error"), "{t}");
}

#[tokio::test]
async fn refused_is_absent_and_fast() {
    let root = tempfile::tempdir().unwrap();
    let url = refused_url().unwrap();
    let start = Instant::now();
    let r = run(root.path(), &url).await;
    let spent = start.elapsed();
    assert!(r.identity.is_none());
    let t = trail(&r);
    for c in ["aws", "gcp", "azure", "digitalocean", "hetzner"] {
        assert!(t.contains(&format!("{c}: not this cloud (")), "{c}: {t}");
    }
    assert!(t.contains("connection refused"), "{t}");
    assert!(spent < Duration::from_millis(500), "{spent:?}");
}

#[tokio::test]
async fn a_server_that_never_answers_costs_one_deadline() {
    let root = tempfile::tempdir().unwrap();
    let fake = FakeMetadata::silent().unwrap();
    let start = Instant::now();
    let r = run(root.path(), fake.url()).await;
    let spent = start.elapsed();
    assert!(r.identity.is_none());
    let t = trail(&r);
    let want = format!(
        "no answer within the {} ms deadline",
        powernode::identity::CLOUD_DEADLINE.as_millis()
    );
    assert!(t.contains(&want), "{t}");
    assert!(
        spent >= Duration::from_millis(1400) && spent < Duration::from_millis(2500),
        "all five probes concurrently, bounded by one deadline: {spent:?}"
    );
}

#[tokio::test]
async fn local_sources_before_the_clouds_send_nothing_and_clouds_beat_later_sources() {
    let fake = FakeMetadata::start(Cloud::Aws, UserData::Body(json_ud(UUID))).unwrap();
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    // identity.cfg, DMI (with a platform URL) and a config drive rank below the clouds.
    put(r, "etc/identity.cfg", "ID=from-cfg\n");
    fake_dmi(r, Cloud::Aws.dmi()).unwrap();
    put(
        r,
        "sys/class/dmi/id/product_uuid",
        "4C4C4544-0042-3510-8052-B4C04F564433\n",
    );
    put(r, "run/powernode/config-drive/user-data", "ID=from-drive\n");
    let mut s = settings(fake.url());
    s.platform.url = Some("https://p.example".into());
    let id = identity::discover(&Ctx::new(Paths::new(r), s.clone()).unwrap())
        .await
        .identity
        .unwrap();
    assert_eq!((id.source, id.instance_uuid.as_str()), (Source::Aws, UUID));

    // fw-cfg ranks above: it wins and not one request reaches the metadata service.
    let before = fake.requests().len();
    put(
        r,
        "sys/firmware/qemu_fw_cfg/by_name/opt/com.powernode/instance_uuid/raw",
        "from-fwcfg\n",
    );
    let id = identity::discover(&Ctx::new(Paths::new(r), s).unwrap())
        .await
        .identity
        .unwrap();
    assert_eq!(id.source, Source::FwCfg);
    assert_eq!(fake.requests().len(), before, "{:?}", fake.requests());
}

#[tokio::test]
async fn offline_resolution_never_probes_the_network() {
    let fake = FakeMetadata::start(Cloud::Aws, UserData::Body(json_ud(UUID))).unwrap();
    let root = tempfile::tempdir().unwrap();
    put(root.path(), "etc/identity.cfg", "ID=from-cfg\n");
    let mut c = ctx(root.path(), fake.url());
    c.settings.offline = true;
    let r = identity::discover(&c).await;
    assert_eq!(r.identity.unwrap().source, Source::IdentityCfg);
    let r2 = identity::resolve_offline(&c);
    assert_eq!(r2.identity.unwrap().source, Source::IdentityCfg);
    assert!(
        r2.trail
            .iter()
            .any(|l| l == "aws: not probed (offline resolution)")
    );
    assert!(fake.requests().is_empty(), "{:?}", fake.requests());
}

#[tokio::test]
async fn metadata_url_from_config_and_environment() {
    let cfg =
        Config::from_toml_str("[identity]\nmetadata_url = \"http://127.0.0.1:9/\"\n").unwrap();
    let s = Settings::from_config_with(&cfg, None).unwrap();
    assert_eq!(s.metadata_url, "http://127.0.0.1:9");
    let s = Settings::from_config_with(&cfg, Some("http://127.0.0.1:10")).unwrap();
    assert_eq!(
        s.metadata_url, "http://127.0.0.1:10",
        "the environment wins"
    );
    let s = Settings::from_config_with(&Config::default(), None).unwrap();
    assert_eq!(s.metadata_url, "http://169.254.169.254");
    let err = Settings::from_config_with(&Config::default(), Some("https://x"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("plain http://"), "{err}");
}

/// A node with a boot identity.cfg that asks to be claimed.
fn claim_root(claim: &FakeClaim) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    put(
        r,
        "boot/identity.cfg",
        &format!(
            "ID=\nKEY=\nSERVER={}\nCA_PEM_FILE=/boot/powernode-ca.pem\n",
            claim.url
        ),
    );
    put(r, "boot/powernode-ca.pem", &claim.ca_pem);
    put(r, "sys/class/net/eth0/address", "52:54:00:AB:CD:EF\n");
    put(r, "sys/class/net/lo/address", "00:00:00:00:00:00\n");
    put(r, "proc/sys/kernel/hostname", "node-7\n");
    put(
        r,
        "sys/class/dmi/id/product_uuid",
        "4C4C4544-0042-3510-8052-B4C04F564433\n",
    );
    root
}

#[tokio::test]
async fn claim_pending_then_claimed() {
    let claim = FakeClaim::start(vec![
        ClaimStep::Pending {
            code: "K7M2QX9P".into(),
            poll_after: 0,
        },
        ClaimStep::Pending {
            code: "K7M2QX9P".into(),
            poll_after: 0,
        },
        ClaimStep::Claimed {
            instance_uuid: UUID.into(),
            token: "fresh-token".into(),
        },
    ])
    .unwrap();
    // A cloud is present too: claim ranks above it.
    let fake = FakeMetadata::start(Cloud::Aws, UserData::Body(json_ud("cloud-one"))).unwrap();
    let root = claim_root(&claim);
    let codes: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = codes.clone();
    let mut c = ctx(root.path(), fake.url());
    c.settings.on_claim_code = Some(Arc::new(move |code: &str| {
        seen.lock().unwrap().push(code.into())
    }));
    let r = identity::discover(&c).await;
    let t = trail(&r);
    let id = r.identity.unwrap_or_else(|| panic!("{t}"));
    assert_eq!(id.source, Source::Claim, "{t}");
    assert_eq!(id.instance_uuid, UUID);
    assert_eq!(id.bootstrap_token.as_deref(), Some("fresh-token"));
    assert_eq!(id.platform_url.as_deref(), Some(claim.url.as_str()));
    assert_eq!(id.ca_pem.as_deref(), Some(claim.ca_pem.as_str()));
    assert!(
        id.evidence.contains("claim code K7M2QX9P"),
        "{}",
        id.evidence
    );
    assert_eq!(
        *codes.lock().unwrap(),
        vec!["K7M2QX9P".to_string()],
        "banner shown once per code"
    );
    let reqs = claim.requests();
    assert_eq!(reqs.len(), 3);
    let first = &reqs[0];
    assert_eq!(first["mac"], "52:54:00:ab:cd:ef");
    assert_eq!(first["dmi_uuid"], "4c4c4544-0042-3510-8052-b4c04f564433");
    assert_eq!(first["hostname"], "node-7");
    assert_eq!(first["agent_version"], powernode::AGENT_VERSION);
    assert_eq!(first["architecture"], powernode::architecture());
}

#[tokio::test]
async fn claim_expired_is_a_clear_error_and_the_cascade_moves_on() {
    let claim = FakeClaim::start(vec![
        ClaimStep::Pending {
            code: "ABCD2346".into(),
            poll_after: 0,
        },
        ClaimStep::Expired,
    ])
    .unwrap();
    let url = refused_url().unwrap();
    let root = claim_root(&claim);
    let r = run(root.path(), &url).await;
    let t = trail(&r);
    assert!(r.identity.is_none(), "{t}");
    assert!(
        t.contains("claim: error") && t.contains("expired") && t.contains("ABCD2346"),
        "{t}"
    );

    // A refused claim (4xx) is an error too, not an endless loop.
    let claim = FakeClaim::start(vec![ClaimStep::Http(400)]).unwrap();
    let root = claim_root(&claim);
    let r = run(root.path(), &url).await;
    let t = trail(&r);
    assert!(t.contains("claim: error") && t.contains("400"), "{t}");
}

#[tokio::test]
async fn boot_identity_cfg_pass_through_and_missing_ca() {
    let url = refused_url().unwrap();
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    put(
        r,
        "boot/identity.cfg",
        &format!(
            "ID={UUID}\nKEY=k\nSERVER=https://p.example\nCA_PEM=\"{}\"\n",
            CA.replace('\n', "\\n")
        ),
    );
    let id = run(r, &url).await.identity.unwrap();
    assert_eq!(id.source, Source::Claim);
    assert_eq!(
        id.evidence,
        format!("ID and KEY in {}", r.join("boot/identity.cfg").display())
    );

    put(r, "boot/identity.cfg", "SERVER=https://p.example\n");
    put(r, "sys/class/net/eth0/address", "52:54:00:00:00:01\n");
    let res = run(r, &url).await;
    let t = trail(&res);
    assert!(t.contains("no CA_PEM or CA_PEM_FILE"), "{t}");
}
