//! Fleet rollout: staged waves, promotion without rebuild, 50
//! frontends through an nginx caching edge, metrics, the CI publish script.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use imgdeploy_common::digest::Sha256Digest;
use imgdeploy_common::rollout::in_wave;
use imgdeploy_tests::deploy::Deployment;
use imgdeploy_tests::nginx::Nginx;
use imgdeploy_tests::{bin, read_as_reader, require_root, run, run_bin, Keys};

fn sha_of(build: &serde_json::Value) -> Sha256Digest {
    build["sha256"].as_str().unwrap().parse().unwrap()
}

/// A machine id that is (or is not) in a wave of `percent` for `image`.
fn machine_id(image: &Sha256Digest, percent: u8, inside: bool) -> String {
    (0..).map(|i| format!("{i:032x}")).find(|id| in_wave(id, image, percent) == inside).unwrap()
}

#[test]
fn privileged_staged_rollout_and_promotion() {
    if !require_root("privileged_staged_rollout_and_promotion") {
        return;
    }
    let d = Deployment::new("", "");
    d.publish_to("beta", "v1", 0, &[]);
    let v1 = run_bin(
        "imgbuild",
        [
            "promote",
            "--repo",
            d.repo.to_str().unwrap(),
            "--from",
            "beta",
            "--to",
            "stable",
            "--key",
            d.keys.key.to_str().unwrap(),
            "--json",
        ],
    )
    .ok()
    .json();
    let beta: serde_json::Value = serde_json::from_slice(&fs::read(d.repo.join("beta.json")).unwrap()).unwrap();
    assert_eq!(v1["image"]["sha256"], beta["image"]["sha256"], "promotion changed the image");
    assert_eq!(v1["index"], beta["index"]);
    assert_eq!((v1["channel"].as_str(), v1["serial"].as_u64()), (Some("stable"), Some(1)));
    let metrics = d.dir.path().join("metrics/imgdeploy.prom");
    fs::create_dir_all(metrics.parent().unwrap()).unwrap();
    d.imgdeploy(&["apply"]).ok();
    assert_eq!(d.active_version().as_deref(), Some("v1"));

    // v2 goes to beta, then to stable as a 50% wave.
    let v2 = d.publish_to("beta", "v2", 0, &[]);
    let image = sha_of(&v2);
    let p = run_bin(
        "imgbuild",
        [
            "promote",
            "--repo",
            d.repo.to_str().unwrap(),
            "--from",
            "beta",
            "--to",
            "stable",
            "--percent",
            "50",
            "--key",
            d.keys.key.to_str().unwrap(),
            "--json",
        ],
    )
    .ok()
    .json();
    assert_eq!((p["serial"].as_u64(), p["rollout"].as_u64()), (Some(2), Some(50)));
    let outside = machine_id(&image, 50, false);
    d.write_config(&format!("machine_id = \"{outside}\"\nmetrics_file = \"{}\"", metrics.display()));
    let r = d.imgdeploy(&["apply", "--json"]).ok().json();
    assert_eq!(r["result"], "not-in-wave", "{r}");
    assert_eq!(d.active_version().as_deref(), Some("v1"));
    assert_eq!(d.status()["last_apply"]["result"], "not-in-wave");
    // Pausing (0%) keeps everyone out; the host in the wave at 50% takes it.
    let r0 = run_bin(
        "imgbuild",
        [
            "rollout",
            "--repo",
            d.repo.to_str().unwrap(),
            "--channel",
            "stable",
            "--percent",
            "0",
            "--key",
            d.keys.key.to_str().unwrap(),
            "--json",
        ],
    )
    .ok()
    .json();
    assert_eq!(
        (r0["serial"].as_u64(), r0["rollout"].as_u64(), r0["image"]["sha256"].as_str()),
        (Some(3), Some(0), v2["sha256"].as_str())
    );
    let inside = machine_id(&image, 50, true);
    d.write_config(&format!("machine_id = \"{inside}\"\nmetrics_file = \"{}\"", metrics.display()));
    assert_eq!(d.imgdeploy(&["apply", "--json"]).ok().json()["result"], "not-in-wave");
    run_bin(
        "imgbuild",
        [
            "rollout",
            "--repo",
            d.repo.to_str().unwrap(),
            "--channel",
            "stable",
            "--percent",
            "50",
            "--key",
            d.keys.key.to_str().unwrap(),
        ],
    )
    .ok();
    assert_eq!(d.imgdeploy(&["apply", "--json"]).ok().json()["result"], "switched");
    assert_eq!(d.active_version().as_deref(), Some("v2"));
    // Going to 100% re-signs the same image: the host is already there.
    run_bin(
        "imgbuild",
        [
            "rollout",
            "--repo",
            d.repo.to_str().unwrap(),
            "--channel",
            "stable",
            "--percent",
            "100",
            "--key",
            d.keys.key.to_str().unwrap(),
        ],
    )
    .ok();
    let up = d.imgdeploy(&["apply"]).ok();
    assert!(up.stdout.contains("up to date"), "{}", up.stdout);

    // The metrics file parses as Prometheus text format and says what happened.
    let text = fs::read_to_string(&metrics).unwrap();
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).unwrap_or_else(|e| panic!("{e}: {text}"));
    let value = |name: &str| {
        scrape.samples.iter().find(|s| s.metric == name).map(|s| match s.value {
            prometheus_parse::Value::Gauge(v) => v,
            ref other => panic!("{name} is {other:?}"),
        })
    };
    // Serial 5 re-signed the same image at 100%: no install, but the slot
    // now records serial 5 (it used to keep serial 4, which let a replayed
    // serial 4 manifest pass the floor; see trust.rs).
    assert_eq!(value("imgdeploy_active_serial"), Some(5.0), "{text}");
    assert_eq!(value("imgdeploy_last_apply_success"), Some(1.0));
    assert!(value("imgdeploy_last_apply_timestamp_seconds").unwrap() > 1.7e9);
    assert!(value("imgdeploy_last_apply_duration_seconds").is_some());
    assert!(
        value("imgdeploy_last_apply_downloaded_bytes").is_some()
            && value("imgdeploy_last_apply_reused_bytes").is_some()
    );
    // A failed apply is visible too.
    let r = d.imgdeploy(&["apply", "--source", "http://127.0.0.1:9/stable.json"]);
    assert_ne!(r.code, 0);
    let text = fs::read_to_string(&metrics).unwrap();
    assert!(text.contains("imgdeploy_last_apply_success{channel=\"stable\"} 0"), "{text}");
    // status --json carries the same facts.
    let st = d.status();
    assert_eq!(st["last_apply"]["result"], "failed");
}

/// 50 frontends apply one update through an nginx caching edge in front of
/// an nginx origin: the origin sends each image byte once.
#[test]
fn privileged_fifty_deployers_through_a_caching_edge() {
    if !require_root("privileged_fifty_deployers_through_a_caching_edge") {
        return;
    }
    let work = imgdeploy_tests::readable_tempdir();
    let keys = Keys::generate();
    let repo = work.path().join("repo");
    let tree = work.path().join("tree");
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("version"), "fleet-1").unwrap();
    fs::write(tree.join("data"), imgdeploy_tests::noise(3_000_000, 7)).unwrap();
    let b = imgdeploy_tests::build_image(&tree, &keys, "stable", &repo, &["--level", "1"]);
    let size = b["size"].as_u64().unwrap();
    let origin = Nginx::serve(&repo);
    let cache = work.path().join("cache");
    fs::create_dir_all(&cache).unwrap();
    let edge = Nginx::start(
        &repo, // unused: every location proxies
        &format!("proxy_cache_path {} levels=1:2 keys_zone=img:10m max_size=1g inactive=1d use_temp_path=off;", cache.display()),
        &format!(
            "proxy_http_version 1.1; proxy_cache img; proxy_cache_lock on; proxy_cache_lock_timeout 60s; proxy_cache_lock_age 60s;\n\
             location /images/ {{ proxy_pass http://127.0.0.1:{0}; proxy_cache_valid 200 30d; }}\n\
             location /indexes/ {{ proxy_pass http://127.0.0.1:{0}; proxy_cache_valid 200 30d; }}\n\
             location / {{ proxy_pass http://127.0.0.1:{0}; proxy_cache_valid 200 5s; }}",
            origin.port
        ),
    );
    let n = 50;
    let hosts: Vec<_> = (0..n)
        .map(|i| {
            let dir = work.path().join(format!("host{i}"));
            fs::create_dir_all(&dir).unwrap();
            let cfg = dir.join("imgdeploy.toml");
            fs::write(
                &cfg,
                format!(
                    "source = \"{}\"\ntrusted_keys = [\"{}\"]\nstate_dir = \"{}/state\"\nlink = \"{}/link\"\n",
                    edge.url("stable.json"),
                    keys.public.display(),
                    dir.display(),
                    dir.display()
                ),
            )
            .unwrap();
            (dir, cfg)
        })
        .collect();
    let children: Vec<_> = hosts
        .iter()
        .map(|(_, cfg)| {
            Command::new(bin("imgdeploy"))
                .arg("-q")
                .arg("-c")
                .arg(cfg)
                .arg("apply")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "a deployer failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    for (dir, _) in &hosts {
        assert_eq!(read_as_reader(&dir.join("link/version")).unwrap(), "fleet-1");
    }
    let bytes = |log: Vec<String>| imgdeploy_tests::nginx::image_bytes_sent(&log).0;
    let (fleet, from_origin) = (bytes(edge.log()), bytes(origin.log()));
    eprintln!(
        "{n} deployers: {fleet} image bytes served by the edge, {from_origin} by the origin (ratio {:.1})",
        fleet as f64 / from_origin as f64
    );
    assert_eq!(fleet, n as u64 * size, "every deployer got the whole image from the edge");
    assert_eq!(from_origin, size, "the origin must send each image byte once");
    for (dir, _) in &hosts {
        run(Command::new("umount").arg(dir.join("state/mnt/a")));
    }
}

#[test]
fn ci_publish_and_promote_scripts_keep_the_key_secret() {
    let work = tempfile::tempdir().unwrap();
    let keys = Keys::generate();
    let pem = fs::read_to_string(&keys.key).unwrap();
    let tree = work.path().join("tree");
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("f"), b"x").unwrap();
    let repo = work.path().join("repo");
    let script = |name: &str| Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/ci").join(name);
    let out = run(Command::new("bash")
        .arg(script("publish.sh"))
        .arg(&tree)
        .arg(&repo)
        .arg("beta")
        .arg("ci-123")
        .env("IMGBUILD", bin("imgbuild"))
        .env("IMGBUILD_KEY_PEM", &pem)
        .env("TMPDIR", work.path()))
    .ok();
    let body = pem.lines().nth(1).unwrap();
    assert!(!out.stdout.contains(body) && !out.stderr.contains(body), "the key was printed");
    assert_eq!(out.json()["version"], "ci-123");
    let leftovers: Vec<_> = fs::read_dir(work.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("tmp."))
        .collect();
    assert!(leftovers.is_empty(), "temp key left behind: {leftovers:?}");
    run_bin("imgbuild", ["verify", repo.join("beta.json").to_str().unwrap(), "--pub", keys.public.to_str().unwrap()])
        .ok();
    let p = run(Command::new("bash")
        .arg(script("promote.sh"))
        .arg(&repo)
        .arg("beta")
        .arg("stable")
        .arg("25")
        .env("IMGBUILD", bin("imgbuild"))
        .env("IMGBUILD_KEY_FILE", &keys.key))
    .ok()
    .json();
    assert_eq!((p["channel"].as_str(), p["rollout"].as_u64()), (Some("stable"), Some(25)));
    // The scheduled refresh re-signs both channels (serial + 1, same image), from a copy without images.
    let before: serde_json::Value = serde_json::from_slice(&fs::read(repo.join("stable.json")).unwrap()).unwrap();
    fs::rename(repo.join("images"), work.path().join("images.away")).unwrap();
    let r = run(Command::new("bash")
        .arg(script("refresh.sh"))
        .arg(&repo)
        .arg("beta")
        .arg("stable")
        .arg("gamma")
        .env("IMGBUILD", bin("imgbuild"))
        .env("IMGBUILD_KEY_PEM", &pem)
        .env("TMPDIR", work.path()))
    .ok();
    assert!(!r.stdout.contains(body) && !r.stderr.contains(body), "the key was printed");
    assert!(r.stderr.contains("gamma has no manifest yet"), "{}", r.stderr);
    fs::rename(work.path().join("images.away"), repo.join("images")).unwrap();
    let after: serde_json::Value = serde_json::from_slice(&fs::read(repo.join("stable.json")).unwrap()).unwrap();
    assert_eq!(after["serial"].as_u64(), before["serial"].as_u64().map(|s| s + 1));
    assert_eq!(
        (after["image"].clone(), after["rollout"].clone()),
        (before["image"].clone(), before["rollout"].clone())
    );
    run_bin("imgbuild", ["verify", repo.join("stable.json").to_str().unwrap(), "--pub", keys.public.to_str().unwrap()])
        .ok();
    // Without a key the script says what to set.
    let none = run(Command::new("bash")
        .arg(script("publish.sh"))
        .arg(&tree)
        .arg(&repo)
        .arg("beta")
        .env("IMGBUILD", bin("imgbuild"))
        .env_remove("IMGBUILD_KEY_PEM")
        .env_remove("IMGBUILD_KEY_FILE"));
    assert_ne!(none.code, 0);
    assert!(none.stderr.contains("IMGBUILD_KEY_PEM"), "{}", none.stderr);
}
