//! A private origin: nginx over TLS with its own CA, a client certificate
//! required, and a bearer token checked on every request. The frontend gets
//! through with the credentials its config names, deltas included; without
//! any one of them it is refused and keeps serving; and the token never
//! reaches a server that is not the origin: not an impostor with a
//! certificate from another CA, not the target of a redirect, not the
//! terminal or a file other users can read.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use imgdeploy_tests::deploy::Deployment;
use imgdeploy_tests::nginx::Nginx;
use imgdeploy_tests::{require_root, run_bin, sh};

/// A test-only token, generated per run.
fn token() -> String {
    let noise = imgdeploy_tests::noise(16, std::process::id() as u64);
    noise.iter().map(|b| format!("{b:02x}")).collect()
}

/// A CA (`NAME-ca.pem`), a server certificate for 127.0.0.1 and a client
/// certificate signed by it, in `dir`.
fn make_ca(dir: &Path, name: &str) {
    let d = dir.display();
    sh(&format!(
        "set -e; cd {d}
         openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {name}-ca.key -out {name}-ca.pem \
           -days 2 -subj /CN={name}-ca 2>/dev/null
         for who in server client; do
           openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {name}-$who.key -out {name}-$who.csr \
             -subj /CN=127.0.0.1 2>/dev/null
         done
         printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\nextendedKeyUsage=serverAuth\\n' > server.ext
         printf 'basicConstraints=CA:FALSE\\nextendedKeyUsage=clientAuth\\n' > client.ext
         for who in server client; do
           openssl x509 -req -in {name}-$who.csr -CA {name}-ca.pem -CAkey {name}-ca.key -CAcreateserial \
             -out {name}-$who.pem -days 2 -extfile $who.ext 2>/dev/null
         done
         chmod 600 {name}-*.key"
    ));
}

/// Records the status and the Authorization header of every request.
const LOG_FORMAT: &str =
    "log_format auth '$request \"$http_range\" $status \"$http_authorization\" \"$http_x_api_key\"';";

/// nginx over TLS with `name`'s server certificate; `extra` adds to its server block.
fn tls_server(root: &Path, certs: &Path, name: &str, extra: &str) -> Nginx {
    let c = certs.display();
    Nginx::serve_tls(
        root,
        LOG_FORMAT,
        &format!(
            "ssl_certificate {c}/{name}-server.pem; ssl_certificate_key {c}/{name}-server.key;\n\
             access_log {c}/{name}-access.log auth;\n{extra}"
        ),
    )
}

fn private_config(certs: &Path, headers: Option<&Path>, ca: bool, client: bool) -> String {
    let c = certs.display();
    let mut lines = String::new();
    if let Some(h) = headers {
        lines += &format!("http_headers_file = \"{}\"\n", h.display());
    }
    if ca {
        lines += &format!("tls_ca_bundle = \"{c}/origin-ca.pem\"\n");
    }
    if client {
        lines += &format!("tls_client_cert = \"{c}/origin-client.pem\"\ntls_client_key = \"{c}/origin-client.key\"\n");
    }
    lines
}

fn log_of(certs: &Path, name: &str) -> Vec<String> {
    fs::read_to_string(certs.join(format!("{name}-access.log")))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn privileged_a_private_origin_gets_its_credentials_and_nobody_else_does() {
    if !require_root("privileged_a_private_origin_gets_its_credentials_and_nobody_else_does") {
        return;
    }
    let d = Deployment::new("", "");
    let certs: PathBuf = d.dir.path().join("certs");
    fs::create_dir(&certs).unwrap();
    make_ca(&certs, "origin");
    make_ca(&certs, "impostor");
    let token = token();
    let headers = certs.join("headers");
    // ureq drops `Authorization` on a redirect by itself; a custom header it would forward.
    fs::write(&headers, format!("# the bucket's read token\nAuthorization: Bearer {token}\nX-Api-Key: {token}\n"))
        .unwrap();
    fs::set_permissions(&headers, fs::Permissions::from_mode(0o600)).unwrap();
    // The impostor has a certificate from another CA, asks for no client
    // certificate and takes any token. The origin requires all three.
    let impostor = tls_server(&d.repo, &certs, "impostor", "");
    let c = certs.display();
    // Where the origin redirects: a plain HTTP server that logs what it is sent.
    let redirected = Nginx::start(&d.repo, LOG_FORMAT, &format!("access_log {c}/redirected-access.log auth;"));
    let origin = tls_server(
        &d.repo,
        &certs,
        "origin",
        &format!(
            "ssl_client_certificate {c}/origin-ca.pem; ssl_verify_client on;\n\
             if ($http_authorization != \"Bearer {token}\") {{ return 401; }}\n\
             location = /moved.json {{ return 302 {}; }}",
            redirected.url("stable.json")
        ),
    );
    let source = origin.https_url("stable.json");
    let all = private_config(&certs, Some(&headers), true, true);
    d.write_config(&all);

    // 1. With every credential: a full download, then a delta.
    d.publish_to("stable", "v1", 256 * 1024, &[]);
    let r = d.imgdeploy(&["apply", "--source", &source, "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(d.active_version().as_deref(), Some("v1"));
    d.publish_to("stable", "v2", 256 * 1024, &["--deltas", "0"]);
    let r = d.imgdeploy(&["apply", "--source", &source, "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["download"]["mode"], "delta", "{}", r.stdout);
    assert_eq!(d.active_version().as_deref(), Some("v2"));
    let log = log_of(&certs, "origin");
    assert!(log.iter().any(|l| l.contains("\"bytes=") && l.contains(" 206 ")), "no Range request: {log:#?}");
    assert!(log.iter().all(|l| l.contains(" 200 ") || l.contains(" 206 ")), "a request lacked a credential: {log:#?}");
    assert!(!r.stderr.contains(&token) && !r.stdout.contains(&token), "the token was printed");
    // imgbuild verify reaches the same origin with the same files.
    let v = run_bin(
        "imgbuild",
        [
            "verify",
            &source,
            "--pub",
            &d.keys.public.display().to_string(),
            "--http-headers-file",
            &headers.display().to_string(),
            "--tls-ca-bundle",
            &format!("{c}/origin-ca.pem"),
            "--tls-client-cert",
            &format!("{c}/origin-client.pem"),
            "--tls-client-key",
            &format!("{c}/origin-client.key"),
        ],
    );
    assert_eq!(v.code, 0, "imgbuild verify: {}", v.stderr);

    // 2. Without one credential, the origin refuses and v2 keeps serving.
    let apply = ["apply", "--source", source.as_str()];
    d.write_config(&private_config(&certs, None, true, true));
    d.assert_refused("no token", &apply, "answered HTTP 401", "v2");
    d.write_config(&private_config(&certs, Some(&headers), true, false));
    d.assert_refused("no client certificate", &apply, "answered HTTP 400", "v2");
    d.write_config(&private_config(&certs, Some(&headers), false, true));
    d.assert_refused("the origin's CA not trusted", &apply, "cannot fetch", "v2");

    // 3. A token file other users can read is refused before any request.
    d.write_config(&all);
    let before = log_of(&certs, "origin").len();
    fs::set_permissions(&headers, fs::Permissions::from_mode(0o644)).unwrap();
    d.assert_refused("a readable token file", &apply, "is readable by other users (mode 644)", "v2");
    assert_eq!(log_of(&certs, "origin").len(), before, "a request was made with an exposed token");
    fs::set_permissions(&headers, fs::Permissions::from_mode(0o600)).unwrap();

    // 4. The attacks: the impostor, and a redirect from the origin to a
    //    plain HTTP server. Neither gets a request, let alone the token.
    let r = d.imgdeploy(&["apply", "--source", &impostor.https_url("stable.json")]);
    assert_ne!(r.code, 0, "the impostor was accepted: {}", r.stderr);
    assert!(r.stderr.contains("cannot fetch"), "{}", r.stderr);
    let moved = origin.https_url("moved.json");
    d.assert_refused(
        "a redirect",
        &["apply", "--source", &moved],
        "requests carrying private headers follow no redirect",
        "v2",
    );
    for server in ["impostor", "redirected"] {
        let seen = log_of(&certs, server);
        assert!(seen.is_empty(), "the {server} server got a request: {seen:?}");
    }
    d.assert_link_sound();
}
